"""Workqueues (kernel/workqueue.c): work items run in process context by kworkers.

Each CPU has two pools of ``kworker/N:M`` threads bound to it (normal and highpri,
``kworker/N:MH``), and one pool of unbound ``kworker/uP:M`` threads serves the unbound
workqueues. Every workqueue shares them: a workqueue is a name, flags, ``max_active``
and, per pool, its count of active items and its list of inactive ones (struct
pool_workqueue). The pools start with one worker each, made by the first Work() or
alloc_workqueue() of a kernel (process context), as the kernel starts them at boot.

Per-CPU pools are concurrency managed, as in the kernel: the next item starts only
when no worker of the pool is running (awake); when the running worker sleeps inside
an item (the scheduler tells the pool, see ``task.sched_hook``), an idle worker takes
the next item. A worker about to run items when no idle worker is left first creates
one, so a pool grows while its items sleep (up to MAX_POOL_WORKERS). Unbound pools
start every item at once, within ``max_active``. A work item never runs on two
workers at once: queueing it while it runs sends it to the pool where it runs.

queue_work() and friends may be called from any context, hard interrupts included
(that is what they are for: the bottom half of an interrupt handler); flushing,
cancelling (the _sync variants), allocating and destroying sleep.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import _emu_native as _native

from . import bug, checks, image, irqflags, preempt, records, task
from .completion import Completion
from .constants import TASK_IDLE, TASK_NORMAL, TASK_RUNNING
from .errors import CapacityError, EmuError, StaleObjectError
from .kthread import create_kworker, kthread_should_stop
from .kthread_worker import (
    POOL_HIGHPRI,
    POOL_UNBOUND,
    WORK_STRUCT_PENDING,
    WORK_STRUCT_TIMER,
    WORKER_ALIVE,
    WORKER_IDLE,
    WORKER_PREP,
    WorkBase,
    add_barrier,
    arm_work_timer,
    check_self_flush,
    complete_barriers,
    describe,
    disarm_work_timer,
    finish_instance,
    flush_one,
    flush_target,
    init_pool,
    init_work,
    init_work_timer,
    is_running_here,
    list_append,
    list_items,
    list_remove,
    live_work,
    pool_by_id,
    pool_lock,
    pool_unlock,
    run_work,
    running_handle,
    start_flush,
    start_instance,
    steal_queued,
    views,
    wait_barriers,
    work_handle,
    work_timer,
    works,
)
from .printk import KERN_ERR, KERN_WARNING, printk
from .sched import jiffies, schedule, schedule_timeout_uninterruptible
from .task import set_current_state, wake_slot, wake_up_process
from .timer import TimerList

WQ_BH = 1 << 0
WQ_UNBOUND = 1 << 1
WQ_FREEZABLE = 1 << 2
WQ_MEM_RECLAIM = 1 << 3
WQ_HIGHPRI = 1 << 4
WQ_CPU_INTENSIVE = 1 << 5
WQ_SYSFS = 1 << 6
WQ_POWER_EFFICIENT = 1 << 7
__WQ_DESTROYING = 1 << 15
__WQ_DRAINING = 1 << 16
__WQ_ORDERED = 1 << 17

WQ_MAX_ACTIVE = 512 * 4
WQ_DFL_ACTIVE = WQ_MAX_ACTIVE // 2
#: queue_work() leaves the CPU choice to the workqueue: the local CPU.
WORK_CPU_UNBOUND = image.NR_CPUS
WQ_NAME_LEN = image.WQ_NAME_LEN

_HIGHPRI_BASE = image.NR_CPUS
UNBOUND_POOL = 2 * image.NR_CPUS
#: (name, flags, max_active) of the system workqueues, at these record indices.
_SYSTEM_WQS = (("events", 0, 0), ("events_highpri", WQ_HIGHPRI, 0),
               ("events_unbound", WQ_UNBOUND, WQ_MAX_ACTIVE), ("events_long", 0, 0))


# --- workqueue handles ------------------------------------------------------------------------

class Workqueue:
    """``struct workqueue_struct *``: a handle on a workqueue of the shared image.

    Made by alloc_workqueue() (freed by destroy_workqueue(), not by the garbage
    collector), or one of the system workqueues (``emu.system_wq``, ...), which stand
    for that workqueue of whatever kernel runs. Handles pickle, so work functions and
    other tasks may use them.
    """

    __slots__ = ("index", "generation", "_system", "__weakref__")

    def __init__(self, index: int, generation: int, system: bool = False) -> None:
        self.index, self.generation, self._system = index, generation, system

    def __reduce__(self) -> tuple[Any, ...]:
        return (Workqueue, (self.index, self.generation, self._system))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Workqueue) and other.index == self.index
                and (other._system or self._system or other.generation == self.generation))

    def __hash__(self) -> int:
        return hash(self.index)

    @property
    def rec(self) -> Any:
        """The workqueue's record; StaleObjectError once it was destroyed."""
        if self._system:
            v = views()
            if v.hdr.wq_ready != 2:
                wq_init()
            if self.index == 1 and v.hdr.wq_highpri != 2 and not preempt.in_interrupt():
                _start_once("wq_highpri", _start_highpri)
            return v.workqueues[self.index]
        rec = views().workqueues[self.index]
        if rec.generation != self.generation or not rec.in_use:
            raise StaleObjectError(f"workqueue #{self.index} was destroyed: "
                                   "destroy_workqueue() ends every use of its handle")
        return rec

    @property
    def name(self) -> str:
        if self._system and image._this is None:
            return _SYSTEM_WQS[self.index][0]
        name: str = self.rec.name.decode("utf-8", "replace")
        return name

    def __repr__(self) -> str:
        try:
            return f"<Workqueue {self.name!r}>"
        except Exception:
            return f"<Workqueue #{self.index}>"


system_wq = Workqueue(0, 0, True)
system_highpri_wq = Workqueue(1, 0, True)
system_unbound_wq = Workqueue(2, 0, True)
system_long_wq = Workqueue(3, 0, True)


def _live_wq(wq: object, name: str = "wq") -> Any:
    if not isinstance(wq, Workqueue):
        raise checks.not_a(name, "an emu.Workqueue", wq) from None
    return wq.rec


class Work(WorkBase):
    """struct work_struct: ``fn(work)`` run in process context by a kworker.

    Creating the first Work of a kernel starts its worker pools (process context).
    """

    __slots__ = ()

    def __init__(self, fn: Callable[[Work], None]) -> None:
        wq_init()
        super().__init__(fn)


def INIT_WORK(work: Work, fn: Callable[[Work], None]) -> None:
    """(Re)initialise idle `work` with `fn`, called as ``fn(work)``."""
    init_work(work, fn, "INIT_WORK")


def work_pending(work: Work) -> bool:
    """True while `work` is queued and has not started (PENDING). Any context."""
    return bool(live_work(work, "work", Work).data & WORK_STRUCT_PENDING)


def current_work() -> Work | None:
    """The work item the current task is running, None outside one."""
    handle = running_handle()
    return handle if isinstance(handle, Work) else None


# --- pools and their kworkers -------------------------------------------------------------------

def wq_init() -> None:
    """Start the worker pools and the system workqueues of this kernel, once.

    Process context: it creates the first kworker of every pool."""
    if image.this().img.hdr.wq_ready != 2:
        if preempt.in_interrupt():
            raise EmuError("workqueues are not started yet: create a Work or a workqueue "
                           "in process context before queueing from interrupt context")
        _start_once("wq_ready", _start_pools)


def _start_once(field: str, start: Callable[[], None]) -> None:
    """Run `start` once per kernel, header `field` going 0 -> 1 (starting) -> 2 (done);
    a task that finds it starting waits."""
    hdr = image.this().img.hdr
    while getattr(hdr, field) != 2:
        if records.field_cmpxchg(hdr, field, 0, 1) == 0:
            try:
                start()
            except BaseException:
                records.field_store(hdr, field, 0)
                raise
            records.field_store(hdr, field, 2)
        else:
            schedule_timeout_uninterruptible(1)  # another task is starting them


def _start_pools() -> None:
    img = image.this().img
    ncpus = img.hdr.ncpus
    for i, (name, flags, max_active) in enumerate(_SYSTEM_WQS):
        index, _ = records.alloc_record("workqueues")
        assert index == i, "the system workqueues come first"
        _init_wq(img.workqueues[index], name, flags, max_active or WQ_DFL_ACTIVE)
    pools = [(cpu, cpu, 0) for cpu in range(ncpus)]
    pools += [(_HIGHPRI_BASE + cpu, cpu, POOL_HIGHPRI) for cpu in range(ncpus)]
    pools.append((UNBOUND_POOL, -1, POOL_UNBOUND))
    for pool_id, cpu, flags in pools:
        init_pool(img.worker_pools[pool_id], pool_id, cpu, flags)
    for pool_id, _, flags in pools:
        if not flags & POOL_HIGHPRI:  # those start with the first highpri workqueue
            _first_worker(img.worker_pools[pool_id])


def _first_worker(pool: Any) -> None:
    if not create_worker(pool):
        raise EmuError("no task slot left for a kworker: boot with a larger max_tasks=")


def _start_highpri() -> None:
    """The highpri pools' first workers (for system_highpri_wq or a WQ_HIGHPRI
    workqueue, in process context): a kernel that never uses them does not have them."""
    v = views()
    for cpu in range(image.this().img.hdr.ncpus):
        _first_worker(v.pools[_HIGHPRI_BASE + cpu])


def _init_wq(rec: Any, name: str, flags: int, max_active: int) -> None:
    rec.flags, rec.max_active = flags, max_active
    rec.name = name.encode("utf-8")[: WQ_NAME_LEN - 1]
    for pwq in rec.pwqs:
        pwq.head = pwq.tail = -1


def _worker_name(pool: Any, index: int) -> str:
    if pool.flags & POOL_UNBOUND:
        return f"kworker/u{2 * image.this().img.hdr.ncpus}:{index}"
    return f"kworker/{pool.cpu}:{index}{'H' if pool.flags & POOL_HIGHPRI else ''}"


def create_worker(pool: Any) -> bool:
    """Add an idle kworker to `pool`; False if the pool is full. Process context."""
    pool_lock(pool)
    try:
        free = [i for i, ent in enumerate(pool.workers) if ent.slot == -1]
        if not free:
            return False
        index = free[0]
        pool.workers[index].slot = -2  # reserved while the thread is created
    finally:
        pool_unlock(pool)
    name = _worker_name(pool, index)
    try:
        t = create_kworker(worker_thread, (pool.id, index), name,
                           None if pool.flags & POOL_UNBOUND else pool.cpu)
    except BaseException:
        pool.workers[index].slot = -1
        raise
    pool_lock(pool)
    ent = pool.workers[index]
    ent.generation = t.generation
    ent.flags = WORKER_ALIVE | WORKER_PREP
    ent.current, ent.current_wq = 0, -1
    ent.slot = t.slot
    pool.nr_workers += 1
    _set_idle(pool, ent, index, True)
    pool_unlock(pool)
    wake_up_process(t)
    return True


def _bound(pool: Any) -> bool:
    return not pool.flags & POOL_UNBOUND


def _need_more_worker(pool: Any) -> bool:
    """Items wait and no worker of the pool is running (an unbound pool: items wait)."""
    return pool.head != -1 and (not _bound(pool) or pool.nr_running == 0)


def _keep_working(pool: Any) -> bool:
    return pool.head != -1 and (not _bound(pool) or pool.nr_running <= 1)


def _idle_slot(pool: Any) -> int:
    """kick_pool()'s choice, under the pool lock: the task slot of an idle worker to
    wake once the lock is dropped (waking it under the lock would make it spin on
    the lock at once), -1 if none is idle."""
    mask = pool.idle_mask
    if not mask:
        return -1
    return int(pool.workers[(mask & -mask).bit_length() - 1].slot)


def _kick(slot: int) -> None:
    """Wake the worker _idle_slot() chose (after dropping the pool lock)."""
    if slot >= 0:
        wake_slot(slot, TASK_NORMAL)


def _set_idle(pool: Any, ent: Any, index: int, idle: bool) -> None:
    """worker_enter_idle() / worker_leave_idle() (under the pool lock)."""
    if idle:
        ent.flags |= WORKER_IDLE
        pool.nr_idle += 1
        pool.idle_mask |= 1 << index
    else:
        ent.flags &= ~WORKER_IDLE
        pool.nr_idle -= 1
        pool.idle_mask &= ~(1 << index)


def _pwq(wq: Any, pool: Any) -> Any:
    return wq.pwqs[0 if pool.flags & POOL_UNBOUND else pool.cpu]


def _dec_active(pool: Any, wq_index: int) -> None:
    """One active item of workqueue `wq_index` on `pool` is done: activate its next
    inactive one (under the pool's lock)."""
    if wq_index < 0:
        return
    wq = views().workqueues[wq_index]
    pwq = _pwq(wq, pool)
    pwq.nr_active -= 1
    if pwq.head != -1 and pwq.nr_active < wq.max_active:
        index = pwq.head
        list_remove(pwq, index)
        list_append(pool, index)
        works()[index].queued = 1
        pwq.nr_active += 1


def _next_item(pool: Any) -> int:
    """The first item of the worklist that no other worker of the pool runs, -1 if none
    (a re-queued item waits for its running instance: non-reentrancy)."""
    w = works()
    cur: int = pool.head
    while cur != -1 and w[cur].running:
        cur = w[cur].next
    return cur


# Per kworker process: its pool and worker entry.
_my_pool: Any = None
_my_index = -1


def worker_thread(data: tuple[int, int]) -> int:
    """A kworker's threadfn (kernel/workqueue.c: worker_thread()). Idle, it sleeps in
    TASK_IDLE (I). It stops only with the kernel."""
    global _my_pool, _my_index
    pool_id, _my_index = data
    pool = _my_pool = pool_by_id(pool_id)
    ent = pool.workers[_my_index]
    task.sched_hook = wq_worker_sched
    pool_lock(pool)
    while True:
        if kthread_should_stop():
            _worker_die(pool, ent)
            pool_unlock(pool)
            return 0
        if ent.flags & WORKER_IDLE:
            _set_idle(pool, ent, _my_index, False)
        _work(pool, ent)
        _set_idle(pool, ent, _my_index, True)
        set_current_state(TASK_IDLE)
        pool_unlock(pool)
        if kthread_should_stop():
            set_current_state(TASK_RUNNING)
        else:
            schedule()
        pool_lock(pool)


def _worker_die(pool: Any, ent: Any) -> None:
    if ent.flags & WORKER_IDLE:
        _set_idle(pool, ent, _my_index, False)
    pool.nr_workers -= 1
    ent.flags = 0
    ent.slot = -1


def _work(pool: Any, ent: Any) -> None:
    """Run items while the pool needs this worker (under the pool lock, which it drops
    around each item and to create a worker)."""
    managed = False
    while True:
        if not _need_more_worker(pool):
            return
        if pool.nr_idle or pool.manager or managed:
            break
        managed = _manage_workers(pool)  # may_start_working(): no idle worker left
    ent.flags &= ~WORKER_PREP
    if _bound(pool):
        pool.nr_running += 1
    while True:
        index = _next_item(pool)
        if index == -1:
            break
        _process_one_work(pool, ent, index)
        if not _keep_working(pool):
            break
    ent.flags |= WORKER_PREP
    if _bound(pool):
        pool.nr_running -= 1


def _manage_workers(pool: Any) -> bool:
    """Create an idle worker, the lock dropped meanwhile; False if none could be made."""
    pool.manager = os.getpid()
    pool_unlock(pool)
    try:
        return create_worker(pool)
    except EmuError as exc:  # no task slot left: go on with the workers there are
        printk(KERN_ERR + "workqueue: Failed to create a worker thread: %s", exc)
        return False
    finally:
        pool_lock(pool)
        pool.manager = 0


def _process_one_work(pool: Any, ent: Any, index: int) -> None:
    rec = works()[index]
    list_remove(pool, index)
    wq_index = rec.wq
    start_instance(rec, ent, _my_index, wq_index)
    ent.current = index + 1
    kick = _idle_slot(pool) if _need_more_worker(pool) else -1
    pool_unlock(pool)
    _kick(kick)
    generation = rec.generation
    try:
        run_work(rec, work_handle(DelayedWork if rec.timer >= 0 else Work, index, generation))
    finally:
        pool_lock(pool)
        comps = finish_instance(rec, ent, generation)
        _dec_active(pool, wq_index)
    if comps:
        pool_unlock(pool)
        complete_barriers(comps)
        pool_lock(pool)


def wq_worker_sched(sleeping: bool) -> None:
    """wq_worker_sleeping() / wq_worker_running(): a kworker running an item blocks,
    or runs again. A sleeping item must not hold up the rest of a per-CPU pool: when
    no worker of the pool is left running, an idle one takes the next item."""
    pool = _my_pool
    if running_handle() is None or pool is None or not _bound(pool):
        return
    kick = -1
    pool_lock(pool)
    try:
        if sleeping:
            pool.nr_running -= 1
            if _need_more_worker(pool):
                kick = _idle_slot(pool)
        else:
            pool.nr_running += 1
    finally:
        pool_unlock(pool)
    _kick(kick)


def _after_fork_in_child() -> None:
    global _my_pool, _my_index
    _my_pool, _my_index = None, -1


os.register_at_fork(after_in_child=_after_fork_in_child)


# --- queueing ----------------------------------------------------------------------------------

def _check_cpu(cpu: object) -> int:
    ncpus = image.this().img.hdr.ncpus
    if not isinstance(cpu, int) or isinstance(cpu, bool):
        raise checks.not_a("cpu", "an int CPU number", cpu)
    if cpu != WORK_CPU_UNBOUND and not 0 <= cpu < ncpus:
        raise ValueError(f"cpu {cpu} does not exist: this kernel has CPUs 0-{ncpus - 1} "
                         "(or WORK_CPU_UNBOUND)")
    return cpu


def _chained(wq_index: int) -> bool:
    """The current task runs an item of workqueue `wq_index` (is_chained_work())."""
    pool = _my_pool
    return (pool is not None and running_handle() is not None
            and pool.workers[_my_index].current_wq == wq_index)


def _queue(cpu: int, wq: Workqueue, wqrec: Any, work: Work, rec: Any) -> None:
    """__queue_work(): `work` is PENDING (ours); put it on a pool's list."""
    if wqrec.state & __WQ_DRAINING and not _chained(wq.index):
        if not records.field_xchg(wqrec, "warned", 1):
            bug.warn(f"workqueue: cannot queue {describe(rec)} on wq "
                     f"{wqrec.name.decode('utf-8', 'replace')}", depth=4)
        return  # dropped, and PENDING stays set, as in the kernel
    if wqrec.flags & WQ_UNBOUND:
        pool_id = UNBOUND_POOL
    else:
        if cpu == WORK_CPU_UNBOUND:
            cpu = max(irqflags.this_cpu(), 0)
        pool_id = cpu
        if wqrec.flags & WQ_HIGHPRI and image.this().img.hdr.wq_highpri == 2:
            pool_id += _HIGHPRI_BASE  # else (only from an interrupt): the normal pool
    last = rec.pool
    if 0 <= last < image.NR_WQ_POOLS and last != pool_id:
        pool_id = _running_pool(last, rec, wq.index, pool_id)
    pool = pool_by_id(pool_id)
    kick = -1
    pool_lock(pool)
    try:
        rec.pool = pool_id
        rec.wq = wq.index
        rec.queue_seq += 1
        pwq = _pwq(wqrec, pool)
        if pwq.nr_active < wqrec.max_active:
            pwq.nr_active += 1
            list_append(pool, work.index)
            rec.queued = 1
            if _need_more_worker(pool):
                kick = _idle_slot(pool)
        else:
            list_append(pwq, work.index)
            rec.queued = 2
    finally:
        pool_unlock(pool)
    _kick(kick)


def _running_pool(last: int, rec: Any, wq_index: int, pool_id: int) -> int:
    """Non-reentrancy: the pool where `rec` runs for the same workqueue, else `pool_id`."""
    pool = pool_by_id(last)
    pool_lock(pool)
    try:
        if rec.pool == last and rec.running:
            if pool.workers[rec.running - 1].current_wq == wq_index:
                return last
        return pool_id
    finally:
        pool_unlock(pool)


def queue_work_on(cpu: int, wq: Workqueue, work: Work) -> bool:
    """Queue `work` on `wq` on CPU `cpu` (for a per-CPU workqueue; WORK_CPU_UNBOUND:
    the local CPU). True if it was queued, False if it was already pending. A work
    whose function runs is not pending: it runs once more afterwards, never at the
    same time. Any context, hard interrupts included."""
    rec = live_work(work, "work", Work)
    wqrec = _live_wq(wq)
    if cpu != WORK_CPU_UNBOUND:
        _check_cpu(cpu)
    flags = irqflags.local_irq_save()
    try:
        if _native.or32(work._addr, WORK_STRUCT_PENDING) & WORK_STRUCT_PENDING:
            return False
        _queue(cpu, wq, wqrec, work, rec)
        return True
    finally:
        irqflags.local_irq_restore(flags)


def queue_work(wq: Workqueue, work: Work) -> bool:
    """queue_work_on() the local CPU. True if queued, False if already pending."""
    return queue_work_on(WORK_CPU_UNBOUND, wq, work)


def schedule_work(work: Work) -> bool:
    """queue_work() on system_wq."""
    return queue_work_on(WORK_CPU_UNBOUND, system_wq, work)


def schedule_work_on(cpu: int, work: Work) -> bool:
    """queue_work_on() on system_wq."""
    return queue_work_on(cpu, system_wq, work)


# --- flushing and cancelling ------------------------------------------------------------------

def flush_work(work: Work) -> bool:
    """Wait (uninterruptibly, D) until the last queued instance of `work` has finished.
    True if it waited, False if `work` was idle. Process context only. Flushing the
    work that runs the flush is reported (lockdep's recursive locking) and returns
    False: the kernel would wait forever."""
    return flush_one(live_work(work, "work", Work), "flush_work")


def _grab_pending(work: Work, rec: Any) -> bool:
    """try_to_grab_pending(), retried until it wins: afterwards `work` is PENDING (ours)
    and on no list. True if it was queued (that instance is cancelled)."""
    while True:
        flags = irqflags.local_irq_save()
        comps: list[tuple[int, int]] = []
        try:
            if not records.field_or(rec, "data", WORK_STRUCT_PENDING) & WORK_STRUCT_PENDING:
                return False
            if rec.data & WORK_STRUCT_TIMER and disarm_work_timer(work):
                return True  # a delayed work whose timer had not fired
            if _steal(work, rec, comps):
                return True
        finally:
            irqflags.local_irq_restore(flags)
            complete_barriers(comps)
        if rec.canceling > 1:
            schedule_timeout_uninterruptible(1)  # another cancel owns it: until it is done
        else:
            os.sched_yield()  # being queued right now: on a list in a moment


def _steal(work: Work, rec: Any, comps: list[tuple[int, int]]) -> bool:
    pool_id = rec.pool
    if not 0 <= pool_id < image.NR_WQ_POOLS:
        return False
    pool = pool_by_id(pool_id)
    kick = -1
    pool_lock(pool)
    try:
        if rec.pool != pool_id or not rec.queued:
            return False
        wq_index = rec.wq
        wqrec = views().workqueues[wq_index]
        if rec.queued == 2:
            list_remove(_pwq(wqrec, pool), work.index)
            comps += steal_queued(pool, rec, work.index)
        else:
            comps += steal_queued(pool, rec, work.index)
            _dec_active(pool, wq_index)
            if _need_more_worker(pool):
                kick = _idle_slot(pool)
        return True
    finally:
        pool_unlock(pool)
        _kick(kick)


def cancel_work_sync(work: Work) -> bool:
    """Cancel `work` and wait for its running instance to finish. True if it was
    pending (that instance never runs), False otherwise, even after waiting. Queue
    attempts meanwhile fail; on return `work` is neither pending nor running (a
    self-requeueing item included). Process context only."""
    rec = live_work(work, "work", Work)
    preempt.might_sleep(depth=2)
    records.field_add(rec, "canceling", 1)
    try:
        was_pending = _grab_pending(work, rec)
        if rec.running and not check_self_flush(rec, "cancel_work_sync"):
            comp = Completion()
            barrier = start_flush(rec, comp)
            if barrier is not None:
                wait_barriers(comp, [barrier])
        records.field_and(rec, "data", ~WORK_STRUCT_PENDING)
    finally:
        records.field_add(rec, "canceling", -1)
    return was_pending


def cancel_work(work: Work) -> bool:
    """Cancel a pending `work` without waiting: True if it was pending. Its function
    may still be running on return. Any context."""
    rec = live_work(work, "work", Work)
    was_pending = _grab_pending(work, rec)
    records.field_and(rec, "data", ~WORK_STRUCT_PENDING)
    return was_pending


# --- delayed work ---------------------------------------------------------------------------------

class DelayedWork(Work):
    """struct delayed_work: a work item and the timer (TIMER_IRQSAFE) that queues it
    after a delay; the timer is allocated and freed with the item."""

    __slots__ = ()

    def __init__(self, fn: Callable[[Work], None]) -> None:
        super().__init__(fn)
        init_work_timer(self, delayed_work_timer_fn)

    @property
    def work(self) -> DelayedWork:
        """&dwork->work: the item itself (flush_work(), work_pending() take it)."""
        return self

    @property
    def timer(self) -> TimerList:
        """&dwork->timer: the item's timer."""
        return work_timer(self)


def INIT_DELAYED_WORK(dwork: DelayedWork, fn: Callable[[Work], None]) -> None:
    """(Re)initialise idle `dwork` with `fn`, called as ``fn(dwork)``."""
    live_work(dwork, "dwork", DelayedWork)
    init_work(dwork, fn, "INIT_DELAYED_WORK")


def _wq_of(rec: Any) -> tuple[Workqueue, Any] | None:
    """The workqueue (handle, record) a delayed work's timer queues it on; None if it
    was destroyed meanwhile."""
    index = rec.wq
    wqrec = views().workqueues[index]
    if index < len(_SYSTEM_WQS):
        return Workqueue(index, 0, True), wqrec
    if not wqrec.in_use or wqrec.generation != rec.wq_generation:
        return None
    return Workqueue(index, wqrec.generation), wqrec


def delayed_work_timer_fn(timer: TimerList) -> None:
    """The timer's callback (softirq, interrupts off): queue the work on the workqueue
    and CPU it was queued for; WORK_CPU_UNBOUND: the CPU the timer fires on."""
    dwork: DelayedWork = timer.dwork
    rec = dwork._rec
    records.field_and(rec, "data", ~WORK_STRUCT_TIMER)
    target = _wq_of(rec)
    if target is None:  # the kernel's use-after-free
        bug.warn(f"workqueue: delayed work {describe(rec)} fired after its workqueue was "
                 "destroyed: it is dropped (cancel delayed work before destroy_workqueue())",
                 depth=2)
        records.field_and(rec, "data", ~WORK_STRUCT_PENDING)
        return
    _queue(rec.cpu, target[0], target[1], dwork, rec)


def _queue_delayed(cpu: int, wq: Workqueue, wqrec: Any, dwork: DelayedWork, rec: Any,
                   delay: int) -> None:
    """__queue_delayed_work(): `dwork` is PENDING (ours); queue it now or arm its timer."""
    if delay == 0:
        _queue(cpu, wq, wqrec, dwork, rec)
        return
    rec.wq, rec.wq_generation, rec.cpu = wq.index, wq.generation, cpu
    records.field_or(rec, "data", WORK_STRUCT_TIMER)
    try:
        arm_work_timer(dwork, jiffies() + delay)
    except BaseException:
        records.field_and(rec, "data", ~WORK_STRUCT_TIMER)
        raise


def _delayed_args(cpu: int, wq: Workqueue, dwork: DelayedWork, delay: int) -> tuple[Any, Any]:
    rec = live_work(dwork, "dwork", DelayedWork)
    wqrec = _live_wq(wq)
    _check_cpu(cpu)
    checks.check_int(delay, "delay", "unsigned long")
    return rec, wqrec


def queue_delayed_work_on(cpu: int, wq: Workqueue, dwork: DelayedWork, delay: int) -> bool:
    """Queue `dwork` on `wq` after `delay` jiffies (0: now): its timer, armed on this
    CPU, queues it on CPU `cpu` (WORK_CPU_UNBOUND: the CPU the timer fires on) once
    jiffies passes now + `delay`. False if it was already pending (its timer armed, or
    queued). Any context."""
    rec, wqrec = _delayed_args(cpu, wq, dwork, delay)
    flags = irqflags.local_irq_save()
    try:
        if _native.or32(dwork._addr, WORK_STRUCT_PENDING) & WORK_STRUCT_PENDING:
            return False
        try:
            _queue_delayed(cpu, wq, wqrec, dwork, rec, delay)
        except BaseException:
            records.field_and(rec, "data", ~WORK_STRUCT_PENDING)
            raise
        return True
    finally:
        irqflags.local_irq_restore(flags)


def queue_delayed_work(wq: Workqueue, dwork: DelayedWork, delay: int) -> bool:
    """queue_delayed_work_on() the local CPU."""
    return queue_delayed_work_on(WORK_CPU_UNBOUND, wq, dwork, delay)


def schedule_delayed_work(dwork: DelayedWork, delay: int) -> bool:
    """queue_delayed_work() on system_wq."""
    return queue_delayed_work_on(WORK_CPU_UNBOUND, system_wq, dwork, delay)


def mod_delayed_work_on(cpu: int, wq: Workqueue, dwork: DelayedWork, delay: int) -> bool:
    """Queue `dwork` after `delay` jiffies whatever its state: True if it was pending
    (its timer or its queued instance is replaced), False if it was idle. A running
    instance is unaffected. While a cancel_*_sync() of it runs, nothing is queued and
    it returns False (the item is disabled, as since Linux 6.10). Any context."""
    rec, wqrec = _delayed_args(cpu, wq, dwork, delay)
    if rec.canceling:
        return False
    was_pending = _grab_pending(dwork, rec)
    flags = irqflags.local_irq_save()
    try:
        _queue_delayed(cpu, wq, wqrec, dwork, rec, delay)
    except BaseException:
        records.field_and(rec, "data", ~WORK_STRUCT_PENDING)
        raise
    finally:
        irqflags.local_irq_restore(flags)
    return was_pending


def mod_delayed_work(wq: Workqueue, dwork: DelayedWork, delay: int) -> bool:
    """mod_delayed_work_on() the local CPU."""
    return mod_delayed_work_on(WORK_CPU_UNBOUND, wq, dwork, delay)


def cancel_delayed_work(dwork: DelayedWork) -> bool:
    """Cancel `dwork` without waiting: True if it was pending (its timer armed, or
    queued); its function may still run on return. If the timer's callback is running,
    this waits until it has queued the work, then takes it off. Any context."""
    live_work(dwork, "dwork", DelayedWork)
    return cancel_work(dwork)


def cancel_delayed_work_sync(dwork: DelayedWork) -> bool:
    """cancel_work_sync() for a delayed work: its timer is deleted too (True if it was
    armed: the work never runs). Process context only."""
    live_work(dwork, "dwork", DelayedWork)
    return cancel_work_sync(dwork)


def flush_delayed_work(dwork: DelayedWork) -> bool:
    """Queue `dwork` at once if its timer is armed (waiting for a running timer
    callback), then flush_work() it: True if it waited for an instance. Process
    context only."""
    rec = live_work(dwork, "dwork", DelayedWork)
    preempt.might_sleep(depth=2)
    if rec.timer >= 0 and disarm_work_timer(dwork, sync=True):
        flags = irqflags.local_irq_save()
        try:
            target = _wq_of(rec)
            if target is not None:
                _queue(rec.cpu, target[0], target[1], dwork, rec)
            else:  # its workqueue is gone: nothing to queue on
                records.field_and(rec, "data", ~WORK_STRUCT_PENDING)
        finally:
            irqflags.local_irq_restore(flags)
    return flush_work(dwork)


def _wq_pools(wqrec: Any) -> list[Any]:
    img = image.this().img
    if wqrec.flags & WQ_UNBOUND:
        return [img.worker_pools[UNBOUND_POOL]]
    v = views()
    pools = [v.pools[cpu] for cpu in range(img.hdr.ncpus)]
    if wqrec.flags & WQ_HIGHPRI:  # items queued before the highpri pools started: normal
        pools += [v.pools[_HIGHPRI_BASE + cpu] for cpu in range(img.hdr.ncpus)]
    return pools


def _items_of(pool: Any, wqrec: Any, wq_index: int) -> list[int]:
    """The items of workqueue `wq_index` queued on `pool` (active or not) or running
    there (under the pool lock)."""
    w = works()
    out = [i for i in list_items(pool) if w[i].wq == wq_index]
    out += list_items(_pwq(wqrec, pool))
    out += [ent.current - 1 for ent in pool.workers
            if ent.current and ent.current_wq == wq_index]
    return out


def flush_workqueue(wq: Workqueue) -> None:
    """Wait until every item queued on `wq` before the call has finished (items they
    queue meanwhile are not waited for). Process context only."""
    wqrec = _live_wq(wq)
    preempt.might_sleep(depth=2)
    if _chained(wq.index):
        me = task.current()
        bug.warn("\n".join([
            "WARNING: possible recursive locking detected",
            f"{me.comm}/{me.pid} is trying to acquire lock:",
            f"  ((wq_completion){wq.name}){{+.+.}}, at: flush_workqueue",
            "but task is already holding lock:",
            f"  ((wq_completion){wq.name}){{+.+.}}, at: process_one_work",
            "emu: flush_workqueue() from an item of that workqueue would wait for itself: "
            "the item is not waited for",
        ]), depth=2)
    comp = Completion()
    barriers: list[int] = []
    w = works()
    for pool in _wq_pools(wqrec):
        pool_lock(pool)
        try:
            for index in _items_of(pool, wqrec, wq.index):
                if is_running_here(w[index]):
                    continue
                target = flush_target(w[index])
                if target:
                    barriers.append(add_barrier(w[index], target, comp))
        finally:
            pool_unlock(pool)
    wait_barriers(comp, barriers)


def _busy(wq: Workqueue, wqrec: Any) -> bool:
    for pool in _wq_pools(wqrec):
        pool_lock(pool)
        try:
            if _items_of(pool, wqrec, wq.index):
                return True
        finally:
            pool_unlock(pool)
    return False


def drain_workqueue(wq: Workqueue) -> None:
    """Flush `wq` until it is empty; meanwhile only its own items may queue on it
    (others are refused: "workqueue: cannot queue"). Process context only."""
    wqrec = _live_wq(wq)
    records.field_or(wqrec, "state", __WQ_DRAINING)
    tries = 0
    while True:
        flush_workqueue(wq)
        if not _busy(wq, wqrec):
            break
        tries += 1
        if tries == 10 or (tries % 100 == 0 and tries <= 1000):
            printk(KERN_WARNING + "workqueue %s: drain_workqueue() isn't complete after %u tries",
                   wq.name, tries)
    records.field_and(wqrec, "state", ~__WQ_DRAINING)


def destroy_workqueue(wq: Workqueue) -> None:
    """Drain `wq` and free it. If it is still busy afterwards, that is reported
    ("destroy_workqueue: %s has the following busy pwq") and it is not freed. The
    system workqueues cannot be destroyed (a WARN). Process context only."""
    wqrec = _live_wq(wq)
    if wq._system:
        bug.warn(f"destroy_workqueue() of the system workqueue {wq.name}", depth=2)
        return
    records.field_or(wqrec, "state", __WQ_DESTROYING | __WQ_DRAINING)
    drain_workqueue(wq)
    records.field_or(wqrec, "state", __WQ_DRAINING)  # only its own items queue from now
    if _busy(wq, wqrec):
        bug.warn(f"destroy_workqueue: {wq.name} has the following busy pwq", depth=2)
        return
    records.free_record("workqueues", wq.index, wq.generation)


# --- creating ------------------------------------------------------------------------------------

def _wq_name(fmt: object, args: tuple[Any, ...]) -> str:
    if not isinstance(fmt, str):
        raise checks.not_a("fmt", "a str", fmt)
    try:
        name = fmt % args
    except (TypeError, ValueError) as exc:
        raise ValueError(f"fmt {fmt!r} does not fit its arguments {args!r}: {exc}") from None
    if len(name.encode("utf-8")) > WQ_NAME_LEN - 1:
        name = name.encode("utf-8")[: WQ_NAME_LEN - 1].decode("utf-8", "ignore")
        printk(KERN_WARNING + "workqueue: name exceeds WQ_NAME_LEN. Truncating to: %s", name)
    return name


def alloc_workqueue(fmt: str, flags: int, max_active: int, *args: Any) -> Workqueue:
    """A new workqueue named ``fmt % args``. `max_active`: items of it that may run at
    once per CPU (unbound: in all), 0 for the default (WQ_DFL_ACTIVE); out of range is
    reported and clamped to 1..WQ_MAX_ACTIVE. Flags: WQ_UNBOUND, WQ_HIGHPRI, ...
    Process context only (it may start the worker pools)."""
    name = _wq_name(fmt, args)
    checks.check_int(flags, "flags", "unsigned int")
    checks.check_int(max_active, "max_active", "int")
    if flags & WQ_BH:
        raise ValueError("flags: WQ_BH workqueues are not supported by emu")
    if max_active == 0:
        max_active = WQ_DFL_ACTIVE
    elif not 1 <= max_active <= WQ_MAX_ACTIVE:
        printk(KERN_WARNING + "workqueue: max_active %d requested for %s is out of range, clamping "
               "between %d and %d", max_active, name, 1, WQ_MAX_ACTIVE)
        max_active = min(max(max_active, 1), WQ_MAX_ACTIVE)
    wq_init()
    if flags & WQ_HIGHPRI:
        _start_once("wq_highpri", _start_highpri)
    try:
        index, generation = records.alloc_record("workqueues")
    except CapacityError:
        raise CapacityError(f"all {image.MAX_WORKQUEUES} workqueues of emu are in use: "
                            "destroy_workqueue() unused ones") from None
    _init_wq(image.this().img.workqueues[index], name, flags, max_active)
    return Workqueue(index, generation)


def alloc_ordered_workqueue(fmt: str, flags: int, *args: Any) -> Workqueue:
    """An unbound workqueue running one item at a time, in queueing order."""
    checks.check_int(flags, "flags", "unsigned int")
    return alloc_workqueue(fmt, flags | WQ_UNBOUND | __WQ_ORDERED, 1, *args)


__all__ = [
    "DelayedWork", "INIT_DELAYED_WORK", "queue_delayed_work", "queue_delayed_work_on",
    "schedule_delayed_work", "mod_delayed_work", "mod_delayed_work_on", "cancel_delayed_work",
    "cancel_delayed_work_sync", "flush_delayed_work",
    "Work", "Workqueue", "INIT_WORK", "work_pending", "current_work", "system_wq",
    "system_highpri_wq", "system_unbound_wq", "system_long_wq", "alloc_workqueue",
    "alloc_ordered_workqueue", "destroy_workqueue", "queue_work", "queue_work_on",
    "schedule_work", "schedule_work_on", "flush_work", "flush_workqueue", "drain_workqueue",
    "cancel_work_sync", "cancel_work", "WQ_UNBOUND", "WQ_HIGHPRI", "WQ_MEM_RECLAIM",
    "WQ_FREEZABLE", "WQ_CPU_INTENSIVE", "WQ_SYSFS", "WQ_POWER_EFFICIENT", "WQ_MAX_ACTIVE",
    "WQ_DFL_ACTIVE", "WORK_CPU_UNBOUND",
]
