"""kthread workers (kernel/kthread.c), and the work-item machinery workqueues share.

A kthread worker is one kthread that runs the work items queued on it one after
another, in queueing order (kthread_worker_fn()). A work item is a record of the
shared image holding its function (any callable, carried to the worker by value like
every callback, see callback.py) and its state: PENDING while it waits on a list,
which worker runs it, and three sequence numbers that flushing reads: ``queue_seq``
counts successful queueings, ``start_seq`` names the instance that runs (or ran last)
and ``done_seq`` the last instance that finished or was cancelled. A flush is a
barrier record linked to the item, holding the ``done_seq`` it waits for and the
flusher's completion; whoever moves ``done_seq`` past it completes it (the kernel's
wq_barrier, attached to the item instead of queued behind it).

Lists, sequence numbers and barriers change under the lock of the pool the item is
queued on or runs on (a raw lock, taken irqsave): queueing is safe from any context,
hard interrupts included. Flushing and cancelling sleep: process context only.

The pool record and the functions here are shared with workqueue.py, whose per-CPU
and unbound pools of ``kworker`` threads add concurrency management on top.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any

import _emu_native as _native

from . import bug, checks, image, irqflags, preempt, records
from .callback import callback_free, callback_load, callback_store, qualname
from .completion import Completion, complete, wait_for_completion
from .constants import TASK_INTERRUPTIBLE, TASK_NORMAL, TASK_RUNNING
from .errors import CapacityError, StaleObjectError
from .kthread import (
    check_cpu,
    kthread_create,
    kthread_create_on_cpu,
    kthread_should_stop,
    kthread_stop,
)
from .printk import log_store
from .sched import jiffies, schedule
from .task import Task, current, set_current_state, task_from_slot, wake_slot, wake_up_process
from .timer import TIMER_IRQSAFE, TimerList, mod_timer, timer_delete, timer_delete_sync, timer_setup
from .trace import WORK_END, WORK_START, trace_point

WORK_STRUCT_PENDING = 1 << 0
WORK_STRUCT_BARRIER = 1 << 8  # emu: the record is a flush barrier, not a work item
WORK_STRUCT_FREE = 1 << 9  # emu: its handle was dropped while busy: its worker frees it
WORK_STRUCT_TIMER = 1 << 10  # emu: a delayed work's timer is armed (the kernel asks it)
WORK_STRUCT_CLAIMED = 1 << 11  # emu: being freed

POOL_UNBOUND = 1 << 0  # no concurrency management
POOL_HIGHPRI = 1 << 1
POOL_KTHREAD_WORKER = 1 << 2  # a kthread worker: one thread, FIFO

WORKER_ALIVE = 1 << 0  # the entry is a worker (emu)
WORKER_IDLE = 1 << 2
WORKER_PREP = 1 << 3  # between leaving idle and running work: not counted as running

#: WorkRec.pool of a kthread worker's items: KTHREAD_WORKER_BASE + its index.
KTHREAD_WORKER_BASE = image.NR_WQ_POOLS


# --- pools --------------------------------------------------------------------------------------

class _Views:
    """This process's ctypes views of one kernel's work tables (made once: every
    access to a field of the image makes a new ctypes object)."""

    __slots__ = ("hdr", "works", "pools", "workqueues", "handles")

    def __init__(self, img: Any) -> None:
        self.hdr = img.hdr
        self.works = img.works
        self.workqueues = img.workqueues
        self.pools = {i: p for i, p in enumerate(img.worker_pools)}
        self.pools.update((KTHREAD_WORKER_BASE + i, p)
                          for i, p in enumerate(img.kthread_workers))
        #: (class, index, generation) -> the handle a worker passes to fn(work)
        self.handles: dict[tuple[type, int, int], Any] = {}


def views() -> _Views:
    img = image.this()
    v: _Views | None = img.wq_views
    if v is None:
        v = img.wq_views = _Views(img.img)
    return v


def pool_by_id(pool_id: int) -> Any:
    """The pool record that WorkRec.pool value `pool_id` names."""
    return views().pools[pool_id]


def work_handle(cls: type, index: int, generation: int) -> Any:
    """The handle on work `index` that a worker passes to its function (one per item)."""
    handles = views().handles
    key = (cls, index, generation)
    handle = handles.get(key)
    if handle is None:
        if len(handles) > 4096:
            handles.clear()
        handle = handles[key] = cls._from_index(index, generation)  # type: ignore[attr-defined]
    return handle


_LOCK_OFF = image.offsetof(image.WorkerPoolRec, "lock")
_DATA_OFF = image.offsetof(image.WorkRec, "data")


def pool_lock(pool: Any) -> None:
    """raw_spin_lock_irq(&pool->lock): any context."""
    records.raw_spin_lock(ctypes.addressof(pool) + _LOCK_OFF, "worker pool")


def pool_unlock(pool: Any) -> None:
    records.raw_spin_unlock(ctypes.addressof(pool) + _LOCK_OFF)


def init_pool(pool: Any, pool_id: int, cpu: int, flags: int) -> None:
    """Set up a zeroed pool record (no workers yet)."""
    pool.id, pool.cpu, pool.flags = pool_id, cpu, flags
    pool.head = pool.tail = -1
    for ent in pool.workers:
        ent.slot = -1
        ent.current_wq = -1


def works() -> Any:
    return views().works


def list_append(owner: Any, index: int) -> None:
    """Append work `index` to the list whose `head`/`tail` fields are `owner`'s."""
    w = works()
    w[index].next = -1
    if owner.tail == -1:
        owner.head = index
    else:
        w[owner.tail].next = index
    owner.tail = index


def list_remove(owner: Any, index: int) -> bool:
    """Unlink work `index` from `owner`'s list; False if it was not on it."""
    w = works()
    if owner.head == index:  # the common case: the worker takes the first item
        rec = w[index]
        owner.head = rec.next
        if owner.tail == index:
            owner.tail = -1
        rec.next = -1
        return True
    prev, cur = -1, owner.head
    while cur != -1 and cur != index:
        prev, cur = cur, w[cur].next
    if cur == -1:
        return False
    nxt = w[cur].next
    if prev == -1:
        owner.head = nxt
    else:
        w[prev].next = nxt
    if owner.tail == index:
        owner.tail = prev
    w[cur].next = -1
    return True


def list_items(owner: Any) -> list[int]:
    """The work indices on `owner`'s list, in order."""
    w = works()
    out, cur = [], owner.head
    while cur != -1:
        out.append(cur)
        cur = w[cur].next
    return out


def wake_worker(ent: Any) -> None:
    """Wake the kthread of worker entry `ent` (any context)."""
    slot = ent.slot
    if slot >= 0:
        wake_slot(slot, TASK_NORMAL)


# --- work items -----------------------------------------------------------------------------------

class WorkBase(records.Record):
    """A work item in the shared image: the function ``fn(work)`` and its state.

    `fn` may be any callable cloudpickle can carry; each worker runs its own copy (as
    after fork). The handle that created the item keeps its function alive and frees
    the item when it is garbage-collected (a pending or running item is left alone).
    """

    TABLE = "works"
    FIELD = "data"
    __slots__ = ("_fn",)
    _fn: Any  # the function as given: what it captures lives as long as this handle

    def __init__(self, fn: Callable[[Any], None]) -> None:
        ref = store_fn(fn)  # first: a function that cannot be carried takes nothing
        try:
            super().__init__()
        except CapacityError:
            callback_free(*ref)
            raise CapacityError(f"all {image.MAX_WORKS} work items of emu are in use: free "
                                "unused ones (drop their handles)") from None
        except BaseException:
            callback_free(*ref)
            raise
        setup_work(self, ref, fn)

    def _init_record(self, rec: Any) -> None:
        reset_work(rec)

    @property
    def func(self) -> Any:
        """This task's copy of the work function."""
        return callback_load(self._rec.ref, self._rec.ref_generation)[0]

    def __repr__(self) -> str:
        rec = self._rec
        return (f"<{type(self).__name__} #{self.index} pending={bool(rec.data & 1)} "
                f"running={bool(rec.running)}>")

    def _free(self) -> None:
        # No pool lock here: the garbage collector may run this while this very
        # process holds one. The FREE flag hands the item to its worker if it is busy.
        rec = self._rec
        if rec.generation != self.generation:
            return
        records.field_or(rec, "data", WORK_STRUCT_FREE)
        if not rec.running and not rec.queued and not rec.data & WORK_STRUCT_PENDING:
            free_work(rec, self.index, self.generation)


def free_work(rec: Any, index: int, generation: int) -> None:
    """Free item `rec` (index `index`, of `generation`) and its function, once: of its
    dropped handle and its worker, whoever claims it first."""
    if rec.generation != generation:
        return
    if records.field_or(rec, "data", WORK_STRUCT_CLAIMED) & WORK_STRUCT_CLAIMED:
        return
    if rec.ref:
        callback_free(rec.ref, rec.ref_generation)
    _free_work_timer(rec)
    records.free_record("works", index, generation)


def reset_work(rec: Any) -> None:
    rec.next = rec.pool = rec.wq = rec.barriers = rec.timer = -1


def store_fn(fn: Any) -> tuple[int, int]:
    if not callable(fn):
        raise checks.not_a("fn", "callable", fn)
    return callback_store(fn, None, "fn", "data")


def setup_work(work: WorkBase, ref: tuple[int, int], fn: Any) -> None:
    rec = work._rec
    rec.ref, rec.ref_generation = ref
    work._fn = fn


def init_work(work: WorkBase, fn: Callable[[Any], None], name: str) -> None:
    """INIT_WORK(): give `work` (idle) the function `fn`."""
    live_work(work, name)
    ref = store_fn(fn)
    rec = work._rec
    if rec.data & WORK_STRUCT_PENDING or rec.running:
        bug.warn(f"{name}: re-initialising a pending or running work item", depth=3)
    old = (rec.ref, rec.ref_generation)
    setup_work(work, ref, fn)
    if old[0]:
        callback_free(*old)


def live_work(work: object, name: str = "work", cls: type = WorkBase) -> Any:
    """The record of work item `work`; TypeError naming `name`, StaleObjectError once freed."""
    if not isinstance(work, cls):
        raise checks.not_a(name, f"an emu.{cls.__name__}", work) from None
    assert isinstance(work, WorkBase)
    work.addr()
    return work._rec


def describe(rec: Any) -> str:
    """How reports name a work item: its function (%ps)."""
    try:
        return qualname(callback_load(rec.ref, rec.ref_generation)[0])
    except (StaleObjectError, Exception):
        return "?"


def start_instance(rec: Any, ent: Any, worker_index: int, wq: int) -> None:
    """A worker takes popped item `rec`: it is no longer pending, this instance runs.
    Under the pool lock."""
    rec.queued = 0
    rec.start_seq = rec.queue_seq
    rec.running = worker_index + 1
    ent.current_wq = wq
    # Last: whoever finds PENDING clear (cancel_work_sync() grabbing it without the
    # pool lock) must find the instance running.
    _native.and32(ctypes.addressof(rec) + _DATA_OFF, ~WORK_STRUCT_PENDING)


def finish_instance(rec: Any, ent: Any, generation: int) -> list[tuple[int, int]]:
    """The worker is done with `rec`'s instance: returns the barriers' completions to
    complete once the pool lock is dropped. Under the pool lock."""
    rec.running = 0
    ent.current = 0
    ent.current_wq = -1
    rec.done_seq = max(rec.start_seq, rec.stolen_seq)
    comps = release_barriers(rec) if rec.barriers != -1 else []
    if rec.data & WORK_STRUCT_FREE and not rec.queued and not rec.data & WORK_STRUCT_PENDING:
        free_work(rec, _index_of(rec), generation)
    return comps


def _index_of(rec: Any) -> int:
    w = works()
    return (ctypes.addressof(rec) - ctypes.addressof(w)) // ctypes.sizeof(rec)


def release_barriers(rec: Any) -> list[tuple[int, int]]:
    """Unlink the flush barriers of `rec` that its done_seq satisfies; returns their
    completions (index, generation). Under the pool lock."""
    w = works()
    out: list[tuple[int, int]] = []
    prev, cur = -1, rec.barriers
    while cur != -1:
        b = w[cur]
        nxt = b.next
        if b.target <= rec.done_seq:
            if prev == -1:
                rec.barriers = nxt
            else:
                w[prev].next = nxt
            b.next = -1
            out.append((b.comp, b.comp_generation))
        else:
            prev = cur
        cur = nxt
    return out


def complete_barriers(comps: list[tuple[int, int]]) -> None:
    for index, generation in comps:
        complete(Completion._from_index(index, generation))


def steal_queued(pool: Any, rec: Any, index: int) -> list[tuple[int, int]]:
    """Take pending item `rec` off the list it is on (cancel): that instance counts as
    done for flushers. Under the pool lock; the caller fixes max_active accounting."""
    if rec.queued == 1:
        list_remove(pool, index)
    rec.queued = 0
    if rec.running:
        rec.stolen_seq = rec.queue_seq
        return []
    rec.done_seq = rec.queue_seq
    return release_barriers(rec)


def add_barrier(rec: Any, target: int, comp: Completion) -> int:
    """Link a barrier waiting for `rec`.done_seq >= `target`; returns its index.
    Under the pool lock."""
    index, generation = records.alloc_record("works")
    b = works()[index]
    reset_work(b)
    b.data = WORK_STRUCT_BARRIER
    b.target = target
    b.comp, b.comp_generation = comp.index, comp.generation
    b.next = rec.barriers
    rec.barriers = index
    return index


def flush_target(rec: Any) -> int:
    """The instance a flush of `rec` waits for (0: none). Under the pool lock."""
    if rec.queued:
        target = int(rec.queue_seq)
    elif rec.running:
        target = int(rec.start_seq)
    else:
        return 0
    return target if target > rec.done_seq else 0


def start_flush(rec: Any, comp: Completion) -> int | None:
    """Attach a barrier to the last queued instance of `rec` (or the running one);
    returns the barrier's index, None if there is nothing to wait for."""
    while True:
        pool_id = rec.pool
        if pool_id < 0:
            return None
        pool = pool_by_id(pool_id)
        pool_lock(pool)
        try:
            if rec.pool != pool_id:
                continue  # queued elsewhere meanwhile: look again
            target = flush_target(rec)
            if not target:
                return None
            return add_barrier(rec, target, comp)
        finally:
            pool_unlock(pool)


def wait_barriers(comp: Completion, barriers: list[int]) -> None:
    """Wait (uninterruptibly, D) until every barrier completed `comp`, then free them."""
    w = works()
    for _ in barriers:
        wait_for_completion(comp)
    for index in barriers:
        records.free_record("works", index, w[index].generation)


def check_self_flush(rec: Any, what: str) -> bool:
    """True (with lockdep's report) if the current task runs `rec` itself: waiting for
    it would wait forever (the kernel hangs, in D, after lockdep's report)."""
    if not is_running_here(rec):
        return False
    me = current()
    name = describe(rec)
    bug.warn("\n".join([
        "WARNING: possible recursive locking detected",
        f"{me.comm}/{me.pid} is trying to acquire lock:",
        f"  ((work_completion)({name})){{+.+.}}, at: {what}",
        "but task is already holding lock:",
        f"  ((work_completion)({name})){{+.+.}}, at: process_one_work",
        f"emu: {what}() of the work item that runs it would wait forever: it returns",
    ]), depth=3)
    return True


def flush_one(rec: Any, what: str) -> bool:
    """flush_work()'s common part: True if it waited for an instance of `rec`."""
    preempt.might_sleep(depth=3)
    if check_self_flush(rec, what):
        return False
    comp = Completion()
    barrier = start_flush(rec, comp)
    if barrier is None:
        return False
    wait_barriers(comp, [barrier])
    return True


#: The record whose function this task runs (current_work()), None elsewhere.
_running_here: Any = None
_running_handle: Any = None


def is_running_here(rec: Any) -> bool:
    """True if the current task runs the function of work record `rec` right now."""
    return _running_here is not None and ctypes.addressof(_running_here) == ctypes.addressof(rec)


def running_handle() -> Any:
    """current_work(): the handle of the item the current task runs, else None."""
    return _running_handle


def run_work(rec: Any, handle: Any) -> None:
    """process_one_work()'s call: `fn(handle)` in process context, an exception being
    an Oops that the worker survives, and the context checked afterwards."""
    global _running_here, _running_handle
    fn = callback_load(rec.ref, rec.ref_generation)[0]
    _running_here, _running_handle = rec, handle
    trace_point(WORK_START, handle.index)
    try:
        fn(handle)
    except bug.TaskKilled:
        pass  # BUG() in the function, already reported
    except BaseException as exc:  # kthread_exit() or SystemExit too: the worker lives on
        bug.oops(exc, f"{type(exc).__name__} in work item {qualname(fn)}: {exc}")
    finally:
        trace_point(WORK_END, handle.index)
        _running_here = _running_handle = None
    _check_leak(fn)


def _check_leak(fn: Any) -> None:
    """The kernel's check after each item: no preemption count or IRQs-off left over."""
    count, off = irqflags.preempt_count(), irqflags.irqs_disabled()
    if not count and not off:
        return
    me = current()
    log_store(3, f"BUG: workqueue leaked atomic, lock or RCU: {me.comm}[{me.pid}]\n"
                 f"     preempt=0x{count:08x} lock=0->0 RCU=0->0 workfn={qualname(fn)}")
    bug._count("bugs")
    if count:
        irqflags.__preempt_count_sub(count)
    if off:
        irqflags.local_irq_enable()


def _after_fork_in_child() -> None:
    global _running_here, _running_handle
    _running_here = _running_handle = None


os.register_at_fork(after_in_child=_after_fork_in_child)


# --- the timer of a delayed work ---------------------------------------------------------------
#
# A delayed work owns one timer_list (delayed_work.timer), allocated with the item and
# freed with it, a TIMER_IRQSAFE timer whose callback finds its item in the attribute
# ``timer.dwork`` (carried with the timer: the kernel's from_timer()). The work record
# names the timer (index, generation), so any task can arm or delete it.

def init_work_timer(work: WorkBase, fn: Callable[[TimerList], None]) -> None:
    """Give new delayed work `work` its timer, calling ``fn(timer)``; ``timer.dwork``
    is the item. If that fails (CapacityError if every timer of emu is in use), the
    item is freed too and the error raised."""
    try:
        _init_work_timer(work, fn)
    except BaseException:
        work._owner = 0
        free_work(work._rec, work.index, work.generation)
        raise


def _init_work_timer(work: WorkBase, fn: Callable[[TimerList], None]) -> None:
    try:
        timer = TimerList()
    except CapacityError:
        raise CapacityError(f"all {image.this().img.hdr.max_timers} timers of emu are in use "
                            "(a delayed work needs one): free unused ones, or boot with a "
                            "larger max_timers=") from None
    timer._owner = 0  # freed with its work item (free_work()), not by this handle
    timer.dwork = work
    try:
        timer_setup(timer, fn, TIMER_IRQSAFE)
    except BaseException:
        timer._free()
        raise
    rec = work._rec
    rec.timer, rec.timer_generation = timer.index, timer.generation


def work_timer(work: WorkBase) -> TimerList:
    """A handle (in this task) on the timer of delayed work `work`."""
    rec = work._rec
    return TimerList._from_index(rec.timer, rec.timer_generation)


def _free_work_timer(rec: Any) -> None:
    if rec.timer >= 0:
        TimerList._from_index(rec.timer, rec.timer_generation)._free()
        rec.timer = -1


def arm_work_timer(work: WorkBase, expires: int) -> None:
    """add_timer() of the timer of delayed work `work`, due after jiffies `expires`:
    its callback runs in softirq context (interrupts off) on this CPU. The caller owns
    PENDING and set WORK_STRUCT_TIMER."""
    mod_timer(work_timer(work), expires)


def disarm_work_timer(work: WorkBase, sync: bool = False) -> bool:
    """timer_delete() of the timer of delayed work `work`: True if it was armed (it
    will not fire now: WORK_STRUCT_TIMER is cleared and its PENDING is the caller's),
    False if it was not armed or its callback has started (which then does its job).
    `sync`: timer_delete_sync(), which also waits for a running callback (process
    context, or a busy-wait in atomic context, as for any TIMER_IRQSAFE timer)."""
    timer = work_timer(work)
    if not (timer_delete_sync(timer) if sync else timer_delete(timer)):
        return False
    records.field_and(work._rec, "data", ~WORK_STRUCT_TIMER)
    return True


# --- kthread workers ---------------------------------------------------------------------------

class KthreadWork(WorkBase):
    """struct kthread_work: ``fn(work)`` run by the kthread worker it is queued on."""

    __slots__ = ()


class KthreadWorker(records.Record):
    """struct kthread_worker: one kthread running its queued items in order.

    Made by kthread_create_worker() and friends; freed by kthread_destroy_worker().
    """

    TABLE = "kthread_workers"
    __slots__ = ()

    def _init_record(self, rec: Any) -> None:
        init_pool(rec, KTHREAD_WORKER_BASE + self.index, -1, POOL_KTHREAD_WORKER)

    def _free(self) -> None:
        if self._rec.generation == self.generation and self._rec.workers[0].slot >= 0:
            return  # its thread still runs: kthread_destroy_worker() frees it
        super()._free()

    @property
    def task(self) -> Task | None:
        """worker->task: the worker's kthread, None once it stopped."""
        ent = self._rec.workers[0]
        if ent.slot < 0:
            return None
        slot = image.this().img.tasks[ent.slot]
        if slot.generation != ent.generation or not slot.in_use:
            return None  # stopped by kthread_stop() before it ever ran
        return task_from_slot(ent.slot, ent.generation)

    def __repr__(self) -> str:
        t = self.task
        return f"<KthreadWorker #{self.index} task={t.comm if t else None}>"


def _live_worker(worker: object, name: str = "worker") -> Any:
    if not isinstance(worker, KthreadWorker):
        raise checks.not_a(name, "an emu.KthreadWorker", worker) from None
    worker.addr()
    return worker._rec


def kthread_worker_fn(worker: KthreadWorker) -> int:
    """The worker's threadfn: run queued items in order until kthread_stop(); items
    still queued then are not run. Idle, it sleeps interruptibly (S)."""
    rec = worker._rec
    ent = rec.workers[0]
    while True:
        set_current_state(TASK_INTERRUPTIBLE)
        if kthread_should_stop():
            set_current_state(TASK_RUNNING)
            pool_lock(rec)
            ent.slot = -1  # worker->task = NULL
            pool_unlock(rec)
            return 0
        pool_lock(rec)
        index = rec.head
        if index != -1:
            list_remove(rec, index)
            work = works()[index]
            start_instance(work, ent, 0, -1)
            ent.current = index + 1
        pool_unlock(rec)
        if index == -1:
            schedule()
            continue
        set_current_state(TASK_RUNNING)
        generation = work.generation
        cls = KthreadDelayedWork if work.timer >= 0 else KthreadWork
        run_work(work, work_handle(cls, index, generation))
        pool_lock(rec)
        comps = finish_instance(work, ent, generation)
        pool_unlock(rec)
        complete_barriers(comps)


def _worker_flags(flags: object) -> None:
    checks.check_int(flags, "flags", "unsigned int")


def _create_worker(cpu: int | None, flags: int, name: str) -> KthreadWorker:
    _worker_flags(flags)
    try:
        worker = KthreadWorker()
    except CapacityError:
        raise CapacityError(f"all {image.MAX_KTHREAD_WORKERS} kthread workers of emu are in "
                            "use: kthread_destroy_worker() unused ones") from None
    try:
        if cpu is None:
            t = kthread_create(kthread_worker_fn, worker, "%s", name)
        else:
            t = kthread_create_on_cpu(kthread_worker_fn, worker, cpu, name)
    except BaseException:
        worker._free()
        raise
    ent = worker._rec.workers[0]
    ent.generation = t.generation
    ent.flags = WORKER_ALIVE
    ent.slot = t.slot
    return worker


def _name(namefmt: object, args: tuple[Any, ...]) -> str:
    if not isinstance(namefmt, str):
        raise checks.not_a("namefmt", "a str", namefmt)
    try:
        return namefmt % args
    except (TypeError, ValueError) as exc:
        raise ValueError(f"namefmt {namefmt!r} does not fit its arguments {args!r}: "
                         f"{exc}") from None


def kthread_create_worker(flags: int, namefmt: str, *args: Any) -> KthreadWorker:
    """A kthread worker whose thread is named ``namefmt % args``, created but not
    started (v6.14+: kthread_run_worker() or the first kthread_queue_work() starts it).
    Process context only."""
    return _create_worker(None, flags, _name(namefmt, args))


def kthread_run_worker(flags: int, namefmt: str, *args: Any) -> KthreadWorker:
    """kthread_create_worker() and start its thread."""
    worker = kthread_create_worker(flags, namefmt, *args)
    wake_up_process(worker.task)  # type: ignore[arg-type]
    return worker


def kthread_create_worker_on_cpu(cpu: int, flags: int, namefmt: str) -> KthreadWorker:
    """A kthread worker bound to `cpu`, its thread named ``namefmt % cpu`` (e.g.
    "my_worker/%u"), created but not started. Process context only."""
    check_cpu(cpu)
    if not isinstance(namefmt, str):
        raise checks.not_a("namefmt", "a str", namefmt)
    return _create_worker(cpu, flags, namefmt)


def kthread_run_worker_on_cpu(cpu: int, flags: int, namefmt: str) -> KthreadWorker:
    """kthread_create_worker_on_cpu() and start its thread."""
    worker = kthread_create_worker_on_cpu(cpu, flags, namefmt)
    wake_up_process(worker.task)  # type: ignore[arg-type]
    return worker


def kthread_init_work(work: KthreadWork, fn: Callable[[KthreadWork], None]) -> None:
    """(Re)initialise idle `work` with `fn`, called as ``fn(work)``."""
    init_work(work, fn, "kthread_init_work")


def kthread_queue_work(worker: KthreadWorker, work: KthreadWork) -> bool:
    """Queue `work` at the tail of `worker`'s list: True; False if it is already
    pending or being cancelled. An item that is running is not pending: queueing it
    again makes it run once more afterwards. Wakes the worker (starting a created
    one). Any context, hard interrupts included.

    An item must be used with one worker only (a WARN, as the kernel's WARN_ON_ONCE).
    """
    pool = _live_worker(worker)
    rec = live_work(work, "work", KthreadWork)
    pool_lock(pool)
    try:
        if rec.queued or rec.canceling or rec.data & WORK_STRUCT_TIMER:
            return False
        _kthread_check_worker(pool, rec, "kthread_queue_work")
        wake = _kthread_insert(pool, rec, work.index)
    finally:
        pool_unlock(pool)
    if wake:  # after the unlock: woken, it takes the lock at once
        wake_worker(pool.workers[0])
    return True


def _kthread_check_worker(pool: Any, rec: Any, what: str) -> None:
    if rec.pool not in (-1, pool.id):
        bug.warn(f"{what}(): {describe(rec)} was used with another worker", depth=4)
    rec.pool = pool.id


def _kthread_insert(pool: Any, rec: Any, index: int) -> bool:
    """kthread_insert_work(): append, PENDING; True if the worker is to be woken (it
    runs nothing). Under the worker's lock."""
    list_append(pool, index)
    rec.queued = 1
    rec.queue_seq += 1
    records.field_or(rec, "data", WORK_STRUCT_PENDING)
    return not pool.workers[0].current


# --- kthread delayed work -----------------------------------------------------------------------
#
# An armed delayed work has WORK_STRUCT_TIMER set (the kernel links it on the worker's
# delayed_work_list): it is pending, and whoever clears the bit under the worker's lock
# owns that instance: the timer's callback (it queues the work), or a cancel or mod
# that deleted the timer first.

class KthreadDelayedWork(KthreadWork):
    """struct kthread_delayed_work: a kthread work and the timer that queues it."""

    __slots__ = ()

    def __init__(self, fn: Callable[[KthreadDelayedWork], None]) -> None:
        super().__init__(fn)
        init_work_timer(self, kthread_delayed_work_timer_fn)

    @property
    def work(self) -> KthreadDelayedWork:
        """&dwork->work: the item itself (kthread_flush_work() takes it)."""
        return self

    @property
    def timer(self) -> TimerList:
        """&dwork->timer: the item's timer (TIMER_IRQSAFE)."""
        return work_timer(self)


def kthread_delayed_work_timer_fn(timer: TimerList) -> None:
    """The timer's callback (softirq, interrupts off): move the work to its worker's
    list, unless a cancel runs (then it is no longer pending, and not queued)."""
    dwork: KthreadDelayedWork = timer.dwork
    rec = dwork._rec
    pool = pool_by_id(rec.pool) if rec.pool >= 0 else None
    if pool is None or not pool.in_use or pool.workers[0].slot < 0:
        # The kernel's WARN_ON_ONCE(!worker), or a use-after-free of a destroyed worker.
        bug.warn(f"kthread_delayed_work_timer_fn(): {describe(rec)} has no running worker: "
                 "dropped (cancel delayed work before kthread_destroy_worker())", depth=2)
        records.field_and(rec, "data", ~(WORK_STRUCT_TIMER | WORK_STRUCT_PENDING))
        return
    wake = False
    pool_lock(pool)
    try:
        if records.field_and(rec, "data", ~WORK_STRUCT_TIMER) & WORK_STRUCT_TIMER:
            if rec.canceling:
                records.field_and(rec, "data", ~WORK_STRUCT_PENDING)
            else:
                wake = _kthread_insert(pool, rec, dwork.index)
    finally:
        pool_unlock(pool)
    if wake:
        wake_worker(pool.workers[0])


def _kthread_queue_delayed(pool: Any, dwork: KthreadDelayedWork, rec: Any,
                           delay: int) -> bool:
    """__kthread_queue_delayed_work() under the worker's lock: now, or arm the timer;
    True if the worker is to be woken."""
    if delay == 0:
        return _kthread_insert(pool, rec, dwork.index)
    records.field_or(rec, "data", WORK_STRUCT_TIMER | WORK_STRUCT_PENDING)
    try:
        arm_work_timer(dwork, jiffies() + delay)
    except BaseException:
        records.field_and(rec, "data", ~(WORK_STRUCT_TIMER | WORK_STRUCT_PENDING))
        raise
    return False


def _delayed_args(worker: object, dwork: object, delay: object) -> tuple[Any, Any]:
    pool = _live_worker(worker)
    rec = live_work(dwork, "dwork", KthreadDelayedWork)
    checks.check_int(delay, "delay", "unsigned long")
    return pool, rec


def kthread_queue_delayed_work(worker: KthreadWorker, dwork: KthreadDelayedWork,
                               delay: int) -> bool:
    """Queue `dwork` on `worker` after `delay` jiffies (0: now): a TIMER_IRQSAFE timer
    on this CPU moves it to the worker's list when jiffies passes now + `delay`. False
    if it is already pending (its timer armed, or queued) or being cancelled. Any
    context."""
    pool, rec = _delayed_args(worker, dwork, delay)
    pool_lock(pool)
    try:
        if rec.queued or rec.canceling or rec.data & WORK_STRUCT_TIMER:
            return False
        _kthread_check_worker(pool, rec, "kthread_queue_delayed_work")
        wake = _kthread_queue_delayed(pool, dwork, rec, delay)
    finally:
        pool_unlock(pool)
    if wake:
        wake_worker(pool.workers[0])
    return True


def _kthread_cancel_timer(pool: Any, dwork: KthreadWork) -> None:
    """kthread_cancel_delayed_work_timer(): timer_delete_sync() of `dwork`'s timer with
    the worker's lock dropped (its callback takes it), queueing blocked meanwhile.
    Called and returns with the lock held; the work stays pending if the timer was
    armed (WORK_STRUCT_TIMER still set: the caller takes it)."""
    rec = dwork._rec
    rec.canceling += 1
    pool_unlock(pool)
    try:
        timer_delete_sync(work_timer(dwork))
    finally:
        pool_lock(pool)
        rec.canceling -= 1


def _kthread_cancel(pool: Any, rec: Any, index: int) -> tuple[bool, list[tuple[int, int]]]:
    """__kthread_cancel_work(): take the pending instance of `rec` (its deleted timer, or
    off the worker's list): (True if there was one, barriers to complete). Under the
    worker's lock."""
    if rec.data & WORK_STRUCT_TIMER:
        records.field_and(rec, "data", ~(WORK_STRUCT_TIMER | WORK_STRUCT_PENDING))
        return True, []
    if rec.queued:
        comps = steal_queued(pool, rec, index)
        records.field_and(rec, "data", ~WORK_STRUCT_PENDING)
        return True, comps
    return False, []


def kthread_mod_delayed_work(worker: KthreadWorker, dwork: KthreadDelayedWork,
                             delay: int) -> bool:
    """Queue `dwork` after `delay` jiffies whatever its state: False if it was idle
    (queued now like kthread_queue_delayed_work()), True if it was pending (its timer
    or queued instance replaced), True too if a cancel is running (the cancel wins, it
    is not queued). A running instance is unaffected. Any context (it waits for the
    timer's callback if that is running on another CPU)."""
    pool, rec = _delayed_args(worker, dwork, delay)
    comps: list[tuple[int, int]] = []
    wake = False
    pool_lock(pool)
    try:
        if rec.pool >= 0:  # never queued: nothing to cancel
            _kthread_check_worker(pool, rec, "kthread_mod_delayed_work")
            _kthread_cancel_timer(pool, dwork)
            if rec.canceling:
                return True  # the other operation wins; the number queued is unchanged
        rec.pool = pool.id
        pending, comps = _kthread_cancel(pool, rec, dwork.index)
        wake = _kthread_queue_delayed(pool, dwork, rec, delay)
        return pending
    finally:
        pool_unlock(pool)
        complete_barriers(comps)
        if wake:
            wake_worker(pool.workers[0])


def kthread_cancel_delayed_work_sync(dwork: KthreadDelayedWork) -> bool:
    """kthread_cancel_work_sync() of a delayed work: its timer is deleted too, and a
    running timer callback waited for. True if it was pending (timer armed or
    queued): that instance never runs. Process context only."""
    return _kthread_cancel_work_sync(live_work(dwork, "dwork", KthreadDelayedWork), dwork,
                                     True)


def kthread_flush_work(work: KthreadWork) -> None:
    """Wait (uninterruptibly) until the last queued instance of `work` finished;
    returns at once if it is idle. Process context only."""
    flush_one(live_work(work, "work", KthreadWork), "kthread_flush_work")


def kthread_flush_worker(worker: KthreadWorker) -> None:
    """Wait until every item queued on `worker` before the call has finished
    (a running one included). Process context only."""
    pool = _live_worker(worker)
    preempt.might_sleep(depth=2)
    comp = Completion()
    barriers: list[int] = []
    w = works()
    pool_lock(pool)
    try:
        indices = list_items(pool)
        if pool.workers[0].current:
            indices.append(pool.workers[0].current - 1)
        for index in indices:
            if is_running_here(w[index]):
                continue  # the flushing item itself (a flush from a work item)
            target = flush_target(w[index])
            if target:
                barriers.append(add_barrier(w[index], target, comp))
    finally:
        pool_unlock(pool)
    wait_barriers(comp, barriers)


def kthread_cancel_work_sync(work: KthreadWork) -> bool:
    """Take `work` off its worker's list (True if it was pending, so it never ran),
    then wait for a running instance to finish, queue attempts failing meanwhile.
    On return it is neither pending nor running. Process context only."""
    return _kthread_cancel_work_sync(live_work(work, "work", KthreadWork), work, False)


def _kthread_cancel_work_sync(rec: Any, work: KthreadWork, is_dwork: bool) -> bool:
    """__kthread_cancel_work_sync()."""
    preempt.might_sleep(depth=3)
    if rec.pool < 0:
        return False
    pool = pool_by_id(rec.pool)
    pool_lock(pool)
    try:
        if is_dwork:
            _kthread_cancel_timer(pool, work)
        was_pending, complete_later = _kthread_cancel(pool, rec, work.index)
        running = bool(rec.running)
        if running:
            rec.canceling += 1
    finally:
        pool_unlock(pool)
    complete_barriers(complete_later)
    if running:
        if not check_self_flush(rec, "kthread_cancel_work_sync"):
            comp = Completion()
            barrier = start_flush(rec, comp)
            if barrier is not None:
                wait_barriers(comp, [barrier])
        pool_lock(pool)
        rec.canceling -= 1
        pool_unlock(pool)
    return was_pending


def kthread_destroy_worker(worker: KthreadWorker) -> None:
    """Flush `worker`, stop its thread and free it. A worker without a thread is a WARN.
    Items still queued afterwards (queued meanwhile) are a WARN, and so are delayed
    works whose timer is still armed (cancel them first: when one fires it is reported
    and dropped). Process context only."""
    pool = _live_worker(worker)
    t = worker.task
    if t is None:
        bug.warn("kthread_destroy_worker() of a worker without a task", depth=2)
        return
    kthread_flush_worker(worker)
    kthread_stop(t)
    if pool.head != -1:
        bug.warn("kthread_destroy_worker(): work items still queued", depth=2)
        return
    if any(w.in_use and w.pool == pool.id and w.data & WORK_STRUCT_TIMER for w in works()):
        # WARN_ON(!list_empty(&worker->delayed_work_list)); the kernel frees it anyway.
        bug.warn("kthread_destroy_worker(): delayed work still armed", depth=2)
    worker._owner = os.getpid()
    worker._free()
    worker._owner = 0


__all__ = [
    "KthreadDelayedWork", "kthread_queue_delayed_work", "kthread_mod_delayed_work",
    "kthread_cancel_delayed_work_sync",
    "KthreadWork", "KthreadWorker", "kthread_create_worker", "kthread_run_worker",
    "kthread_create_worker_on_cpu", "kthread_run_worker_on_cpu", "kthread_init_work",
    "kthread_queue_work", "kthread_flush_work", "kthread_flush_worker",
    "kthread_cancel_work_sync", "kthread_destroy_worker",
]
