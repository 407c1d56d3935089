"""Torture tests in the spirit of locktorture/rcutorture: load every CPU with kthreads and
interrupts hammering the primitives, check invariants while it runs, report statistics
at intervals and end with a verdict.

Types:

* ``completion``: waiters of every variant against completers in kthreads and in an IRQ
  handler, with random timeouts and injected signals. Checks: completions are
  conserved (every complete() is consumed at most once and none is lost: posted ==
  consumed + done), return values fit the variant, no timed wait outlives its timeout,
  no waiter sleeps while completions are available (lost wake-up), FIFO order of
  wake-ups (a probe at every stat interval).
* ``kthread``: create/run/stop/park/unpark/bind churn. Checks: results (-EINTR only
  when threadfn never ran), states, placement (the OS affinity of every thread).
* ``workqueue``: per CPU a kthread queueing (at once, or after 0-3 jiffies with
  queue_delayed_work() and mod_delayed_work()), flushing and cancelling its own delayed
  work items on the system, an unbound and a max_active=2 workqueue (items that sleep
  or not), and keeping its own ordered workqueue full; an interrupt handler queues
  items too. Checks: each item runs exactly once per successful queueing (a
  mod_delayed_work() that replaced a pending instance adds none) after every flush and
  cancel of it and at the end, cancel_delayed_work_sync() really stops it (neither
  pending nor running afterwards, its timer included), ordered workqueues run items one
  at a time in queueing order.
* ``irq``: interrupt storms on every CPU whose handlers share data with kthreads under
  spin_lock_irqsave and schedule tasklets, plus a threaded handler (an ``irq/N``
  thread) doing the same. Checks: no update is lost, no handler or tasklet runs
  re-entrantly.
* ``timer``: per CPU a kthread arming, re-arming, deleting and sync-deleting timers
  with random expiries, some of which re-arm themselves from their callback. Checks:
  no callback runs before jiffies passed its ``expires``, in softirq context, on the
  arming CPU; none runs after timer_delete_sync() returned (until re-armed); every
  arming runs exactly once unless mod_timer() replaced it or a delete removed it.

Each check that fails logs ``<type>-torture: FAILURE: <invariant>: <details>`` to the
kernel log; any WARN, BUG, Oops or hung task also fails the run, and so does the death
of the kernel (its supervisor killed, a panic), which ends it at once.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import random
import signal as _os_signal
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import posix_ipc

from . import image
from . import irq as _irq
from .atomic import (
    Atomic,
    Atomic64,
    atomic64_add,
    atomic64_read,
    atomic64_set,
    atomic_dec,
    atomic_inc_return,
    atomic_read,
    atomic_set,
)
from .completion import (
    Completion,
    complete,
    complete_all,
    try_wait_for_completion,
    wait_for_completion,
    wait_for_completion_interruptible_timeout,
    wait_for_completion_killable_timeout,
    wait_for_completion_state,
    wait_for_completion_timeout,
)
from .constants import EINTR, ERESTARTSYS, TASK_IDLE
from .errors import KernelDeadError
from .image import MAX_IRQ_SOURCES, NR_IRQS_MAX
from .kernel import Kernel, boot
from .kthread import (
    kthread_bind,
    kthread_create,
    kthread_park,
    kthread_parkme,
    kthread_run,
    kthread_run_on_cpu,
    kthread_should_park,
    kthread_should_stop,
    kthread_stop,
    kthread_unpark,
    real_cpu,
)
from .preempt import in_serving_softirq, this_cpu
from .printk import pr_err
from .sched import (
    jiffies,
    jiffies_to_msecs,
    msecs_to_jiffies,
    schedule_timeout_interruptible,
    usleep_range,
)
from .signal import allow_signal, flush_signals, send_sig
from .softirq import Tasklet, tasklet_kill, tasklet_schedule
from .spinlock import (
    SOFTLOCKUP_THRESH_DEFAULT,
    Spinlock,
    spin_lock,
    spin_lock_irqsave,
    spin_unlock,
    spin_unlock_irqrestore,
)
from .task import Task, current, task_state_to_char
from .timer import (
    TimerList,
    del_timer,
    del_timer_sync,
    mod_timer,
    timer_pending,
    timer_shutdown_sync,
)
from .wait import wait_var_event_timeout
from .workqueue import (
    WQ_UNBOUND,
    DelayedWork,
    Work,
    Workqueue,
    alloc_ordered_workqueue,
    alloc_workqueue,
    cancel_delayed_work_sync,
    destroy_workqueue,
    flush_delayed_work,
    mod_delayed_work,
    queue_delayed_work,
    queue_work,
    queue_work_on,
    schedule_work,
    system_wq,
    work_pending,
)

TYPES = ("completion", "kthread", "irq", "timer", "workqueue")
SIGNAL = int(_os_signal.SIGUSR1)


def fail(kind: str, invariant: str, details: str) -> None:
    """Report a broken invariant (any task, any context)."""
    pr_err("%s-torture: FAILURE: %s: %s", kind, invariant, details)


class Counters:
    """Per-CPU operation counters in shared memory, one row per torture type."""

    def __init__(self, ncpus: int) -> None:
        self.ops = [Atomic64() for _ in range(ncpus)]
        self.failures = Atomic64()

    def add(self, cpu: int, n: int = 1) -> None:
        atomic64_add(n, self.ops[cpu])

    def per_cpu(self) -> list[int]:
        return [atomic64_read(a) for a in self.ops]


# --- completion torture ---------------------------------------------------------------------

@dataclass
class CompletionState:
    c: Completion
    posted: Atomic64
    consumed: Atomic64
    stop: Atomic
    counters: Counters
    broken: bool = False  # a deliberately broken complete(), to prove the checks work
    #: how long past its timeout a timed wait may return (the host's scheduling delay)
    slack_ms: int = 1000


VARIANTS = ("plain", "timeout", "interruptible", "killable", "try")


def _completion_waiter(data: tuple[CompletionState, int]) -> int:
    st, seed = data
    rng = random.Random(seed)
    allow_signal(SIGNAL)
    cpu = current().cpu
    while not _stopped(st.stop):
        variant = rng.choice(VARIANTS)
        timeout = rng.randint(0, msecs_to_jiffies(20))
        start = time.monotonic()
        if variant == "plain":
            wait_for_completion(st.c)
            ok, ret = True, 0
        elif variant == "timeout":
            ret = wait_for_completion_timeout(st.c, timeout)
            ok = _check_timed(st, "timeout", ret, timeout, start, allow_signal_ret=False)
        elif variant == "interruptible":
            ret = wait_for_completion_interruptible_timeout(st.c, timeout)
            ok = _check_timed(st, "interruptible", ret, timeout, start, allow_signal_ret=True)
        elif variant == "killable":
            ret = wait_for_completion_killable_timeout(st.c, timeout)
            ok = _check_timed(st, "killable", ret, timeout, start, allow_signal_ret=False)
        else:
            ok, ret = try_wait_for_completion(st.c), 0
        if ok:
            atomic64_add(1, st.consumed)
        if ret == -ERESTARTSYS:
            flush_signals(current())
        st.counters.add(cpu)
    return 0


def _stopped(flag: Atomic) -> bool:
    return bool(atomic_read(flag))


def _check_timed(st: CompletionState, variant: str, ret: int, timeout: int, start: float,
                 allow_signal_ret: bool) -> bool:
    """Check a timed wait's result; True if it consumed a completion."""
    elapsed_ms = (time.monotonic() - start) * 1000
    if ret == -ERESTARTSYS and allow_signal_ret:
        return False
    if ret == 0:
        if elapsed_ms + 1 < jiffies_to_msecs(timeout):
            _count_failure(st, "return value", f"{variant} wait returned 0 after "
                           f"{elapsed_ms:.1f} ms, before its {timeout}-jiffy timeout")
        return False
    if not 1 <= ret <= max(timeout, 1):
        _count_failure(st, "return value", f"{variant} wait({timeout}) returned {ret}")
        return False
    if elapsed_ms > jiffies_to_msecs(timeout) + st.slack_ms:
        _count_failure(st, "stuck past timeout", f"{variant} wait({timeout} jiffies) "
                       f"took {elapsed_ms:.0f} ms")
    return True


def _count_failure(st: CompletionState, invariant: str, details: str) -> None:
    atomic64_add(1, st.counters.failures)
    fail("completion", invariant, details)


def _completion_completer(data: tuple[CompletionState, int]) -> int:
    st, seed = data
    rng = random.Random(seed)
    cpu = current().cpu
    while not _stopped(st.stop):
        atomic64_add(1, st.posted)
        if st.broken and rng.random() < 0.05:
            st.c.rec.done += 1  # the bug: count it, but skip the wake-up
        else:
            complete(st.c)
        st.counters.add(cpu)
        if rng.random() < 0.3:
            usleep_range(50, 100)
    return 0


def completion_irq_handler(irq_nr: int, dev: tuple[Completion, Atomic64, Atomic]) -> int:
    """IRQ-side completer: it runs in whichever task the interrupt hits."""
    c, posted, stop = dev
    if not _stopped(stop):
        atomic64_add(1, posted)
        complete(c)
    return _irq.IRQ_HANDLED


# --- kthread torture -----------------------------------------------------------------------

def _trivial(value: int) -> int:
    return value


def _parkable(ran: Atomic) -> int:
    atomic_set(ran, 1)
    while not kthread_should_stop():
        if kthread_should_park():
            kthread_parkme()
        schedule_timeout_interruptible(msecs_to_jiffies(100))
    return 7


def _kthread_churner(data: tuple[Counters, Atomic, int, int]) -> int:
    counters, stop, seed, ncpus = data
    rng = random.Random(seed)
    cpu = current().cpu

    def check(ok: bool, invariant: str, details: str) -> None:
        if not ok:
            atomic64_add(1, counters.failures)
            fail("kthread", invariant, details)

    parker_ran = Atomic()
    parker = kthread_run(_parkable, parker_ran, "torture-park/%d", cpu)
    while not _stopped(stop):
        op = rng.choice(("run", "stop-early", "bind", "park"))
        value = rng.randint(-1000, 1000)
        if op == "run":
            t = kthread_run(_trivial, value, "torture-run/%d", cpu)
            while task_state_to_char(t) != "X":
                usleep_range(100, 200)
            check(kthread_stop(t) == value, "result", f"kthread_stop() != threadfn's {value}")
        elif op == "stop-early":
            t = kthread_create(_trivial, value, "torture-new/%d", cpu)
            check(task_state_to_char(t) == "D", "state", "a created kthread is not in D")
            check(kthread_stop(t) == -EINTR, "result",
                  "stop before the first wake-up did not return -EINTR")
        elif op == "bind":
            target = rng.randrange(ncpus)
            t = kthread_create(_trivial, value, "torture-bind/%d", cpu)
            kthread_bind(t, target)
            check(t.cpu == target and os.sched_getaffinity(t.pid) == {real_cpu(target)},
                  "placement", f"bound to {target} but affinity {os.sched_getaffinity(t.pid)}")
            check(kthread_stop(t) == -EINTR, "result", "bound, never woken: not -EINTR")
        else:
            check(kthread_park(parker) == 0, "park", "kthread_park() != 0")
            check(task_state_to_char(parker) == "P", "state", "parked thread not in P")
            kthread_unpark(parker)
        counters.add(cpu)
    result = kthread_stop(parker)
    # -EINTR if the stop came before its first run (a short run on a busy machine)
    expected = 7 if atomic_read(parker_ran) else -EINTR
    check(result == expected, "result", f"parkable thread's result {result} != {expected}")
    return 0


# --- irq torture ---------------------------------------------------------------------------

@dataclass
class IrqState:
    lock: Spinlock
    shared: Atomic64  # updated non-atomically (read, then set) under `lock`
    handled: Atomic64
    worker_ops: Atomic64
    tasklet_inside: Atomic
    tasklet_runs: Atomic64
    failures: Atomic64
    threaded: Atomic64  # updates by the threaded handler
    tasklet: Tasklet | None = None


def torture_tasklet(t: Tasklet) -> None:
    st: IrqState = t.data
    if atomic_inc_return(st.tasklet_inside) != 1:
        atomic64_add(1, st.failures)
        fail("irq", "tasklet re-entered", "a tasklet ran concurrently with itself")
    atomic64_add(1, st.tasklet_runs)
    atomic_dec(st.tasklet_inside)


def irq_torture_handler(irq_nr: int, dev: tuple[IrqState, Atomic]) -> int:
    """Hard-IRQ side of the irq torture."""
    st, inside = dev  # `inside` belongs to this line: other lines may run meanwhile
    if atomic_inc_return(inside) != 1:
        atomic64_add(1, st.failures)
        fail("irq", "handler re-entered", f"irq {irq_nr} ran re-entrantly")
    spin_lock(st.lock)
    _rmw(st.shared)
    spin_unlock(st.lock)
    atomic64_add(1, st.handled)
    if st.tasklet is not None:
        tasklet_schedule(st.tasklet)
    atomic_dec(inside)
    return _irq.IRQ_HANDLED


def _rmw(v: Atomic64) -> None:
    """A deliberately non-atomic read-modify-write: only the lock makes it safe."""
    atomic64_set(v, atomic64_read(v) + 1)


def irq_torture_thread(irq_nr: int, st: IrqState) -> int:
    """Threaded side of the irq torture: runs in the line's irq/N kthread."""
    flags = spin_lock_irqsave(st.lock)
    _rmw(st.shared)
    spin_unlock_irqrestore(st.lock, flags)
    atomic64_add(1, st.threaded)
    return _irq.IRQ_HANDLED


def _irq_worker(data: tuple[IrqState, Atomic, Counters]) -> int:
    st, stop, counters = data
    cpu = current().cpu
    while not _stopped(stop):
        flags = spin_lock_irqsave(st.lock)
        _rmw(st.shared)
        spin_unlock_irqrestore(st.lock, flags)
        atomic64_add(1, st.worker_ops)
        counters.add(cpu)
    return 0


# --- timer torture -------------------------------------------------------------------------

#: Timers each timer-torture kthread churns.
TIMERS_PER_CPU = 4


@dataclass
class TimerState:
    armed: Atomic64  # armings that made a timer pending (churner and callbacks)
    ran: Atomic64  # callbacks run
    replaced: Atomic64  # armings dropped by a mod_timer() of a pending timer
    deleted: Atomic64  # armings removed by a delete that returned 1
    dead: list[Atomic]  # per timer: 1 from timer_delete_sync() until the next arming
    cpu: list[int]  # per timer: the CPU that arms it
    late_max: Atomic64  # the latest run, in jiffies past expires
    counters: Counters
    stop: Atomic  # the run is ending: callbacks no longer re-arm their timers


def torture_timer_fn(t: TimerList) -> None:
    """The callback: check when, where and whether it may run; some re-arm themselves."""
    st: TimerState = t.st
    now, expires = jiffies(), t._expires_fired  # t.expires changes if re-armed meanwhile
    atomic64_add(1, st.ran)
    if not now > expires:
        _timer_failure(st, "early", f"timer {t.i} ran at jiffies {now}, expires {expires}")
    if atomic_read(st.dead[t.i]):
        _timer_failure(st, "ran after timer_delete_sync", f"timer {t.i} ran at jiffies {now}")
    if not in_serving_softirq() or this_cpu() != st.cpu[t.i]:
        _timer_failure(st, "context", f"timer {t.i} ran on CPU {this_cpu()} outside softirq "
                                      f"(armed on CPU {st.cpu[t.i]})")
    if now - expires - 1 > atomic64_read(st.late_max):
        atomic64_set(st.late_max, now - expires - 1)
    if t.periodic and not atomic_read(st.stop) and random.random() < 0.8:
        if mod_timer(t, now + random.randint(1, 3)):
            atomic64_add(1, st.replaced)  # its churner armed it meanwhile (another task)
        atomic64_add(1, st.armed)
    st.counters.add(st.cpu[t.i])


def _timer_failure(st: TimerState, invariant: str, details: str) -> None:
    atomic64_add(1, st.counters.failures)
    fail("timer", invariant, details)


def _timer_churner(data: tuple[TimerState, list[TimerList], Atomic, int]) -> int:
    st, timers, stop, seed = data
    rng = random.Random(seed)
    cpu = current().cpu
    while not _stopped(stop):
        t = rng.choice(timers)
        op = rng.random()
        if op < 0.6:
            atomic_set(st.dead[t.i], 0)
            if mod_timer(t, jiffies() + rng.randint(0, 8)):
                atomic64_add(1, st.replaced)
            atomic64_add(1, st.armed)
        elif op < 0.8:
            atomic64_add(del_timer(t), st.deleted)
        else:
            atomic64_add(del_timer_sync(t), st.deleted)
            atomic_set(st.dead[t.i], 1)
            if timer_pending(t):
                _timer_failure(st, "pending after timer_delete_sync", f"timer {t.i}")
        st.counters.add(cpu)
        if rng.random() < 0.3:
            usleep_range(200, 1000)
    for t in timers:
        # A callback that read `stop` before it was set may re-arm: this deletes that.
        atomic64_add(del_timer_sync(t), st.deleted)
        atomic64_add(timer_shutdown_sync(t), st.deleted)
        atomic_set(st.dead[t.i], 1)
        if mod_timer(t, jiffies() + 1) or timer_pending(t):
            _timer_failure(st, "armed after timer_shutdown_sync", f"timer {t.i}")
    return 0


def _start_timer(run: Run, rng: random.Random) -> None:
    k = run.kernel
    counters = run.counters["timer"] = Counters(k.ncpus)
    n = k.ncpus * TIMERS_PER_CPU
    st = TimerState(Atomic64(), Atomic64(), Atomic64(), Atomic64(), [Atomic() for _ in range(n)],
                    [i // TIMERS_PER_CPU for i in range(n)], Atomic64(), counters, run.stop)
    timers = []
    for i in range(n):
        t = TimerList(torture_timer_fn)
        t.st, t.i, t.periodic = st, i, i % TIMERS_PER_CPU == 0
        timers.append(t)
    churners = []
    for cpu in range(k.ncpus):
        mine = timers[cpu * TIMERS_PER_CPU:(cpu + 1) * TIMERS_PER_CPU]
        churners.append(kthread_run_on_cpu(_gated(run, _timer_churner),
                                           (st, mine, run.stop, rng.randrange(1 << 30)),
                                           cpu, "ttimer/%u"))
    run.threads += churners

    def finish() -> list[str]:
        _wait_exited(churners)
        if any(task_state_to_char(t) != "X" for t in churners):
            return ["timer: a churner did not finish its timers within 10 s"]
        armed, ran, replaced, deleted = (atomic64_read(v) for v in
                                         (st.armed, st.ran, st.replaced, st.deleted))
        run.notes.append(f"timer: {ran} callbacks run, latest {atomic64_read(st.late_max)} "
                         "jiffies after due")
        if armed != ran + replaced + deleted:
            return [f"timer: armings not accounted for: armed {armed} != ran {ran} + "
                    f"replaced {replaced} + deleted {deleted}"]
        del timers[:]
        return []


# --- workqueue torture ---------------------------------------------------------------------

WQ_ITEMS = 6  # items each queuer owns on the shared workqueues
WQ_ORDERED_ITEMS = 8  # items in each queuer's ordered ring
WQ_LINE = 3  # the IRQ line whose handler queues work items


@dataclass
class WqItem:
    """One work item and its books: successful queueings, cancelled ones, runs."""

    work: DelayedWork
    queued: Atomic64
    cancelled: Atomic64
    runs: Atomic64
    inside: Atomic


def _wq_item_fn(runs: Atomic64, inside: Atomic, nap: bool) -> Callable[[Work], None]:
    def fn(work: Work) -> None:
        if atomic_inc_return(inside) > 1:
            fail("workqueue", "non-reentrancy", "an item ran on two workers at once")
        if nap:
            usleep_range(50, 300)  # sleeps: the pool's next item must not wait for it
        atomic_dec(inside)
        atomic64_add(1, runs)  # last: a flush that returned sees every run counted
    return fn


def _wq_item(nap: bool) -> WqItem:
    runs, inside = Atomic64(), Atomic()
    return WqItem(DelayedWork(_wq_item_fn(runs, inside, nap)), Atomic64(), Atomic64(), runs,
                  inside)


def _wq_check_once(item: WqItem, what: str, counters: Counters) -> None:
    """At rest (flushed or cancelled, nobody else queues it): runs == queued - cancelled."""
    q, c, r = (atomic64_read(v) for v in (item.queued, item.cancelled, item.runs))
    if r != q - c or atomic_read(item.inside) or work_pending(item.work):
        atomic64_add(1, counters.failures)
        fail("workqueue", "exactly once", f"after {what}: {r} runs for {q} queued, {c} "
             f"cancelled (running: {atomic_read(item.inside)}, pending: "
             f"{work_pending(item.work)})")


@dataclass
class WqOrdered:
    """A queuer's ordered workqueue and its ring of items, each stamped with a ticket."""

    wq: Workqueue
    works: list[Work]
    tickets: list[Atomic64]  # the ticket of each item's queued instance
    ran: list[Atomic64]  # the ticket each item last ran with
    last: Atomic64  # the last ticket run
    inside: Atomic


def _wq_ordered_fn(o_ticket: Atomic64, o_ran: Atomic64, last: Atomic64, inside: Atomic,
                   failures: Atomic64) -> Callable[[Work], None]:
    def fn(work: Work) -> None:
        if atomic_inc_return(inside) > 1:
            atomic64_add(1, failures)
            fail("workqueue", "ordered", "two items of an ordered workqueue ran at once")
        ticket = atomic64_read(o_ticket)
        if ticket != atomic64_read(last) + 1:
            atomic64_add(1, failures)
            fail("workqueue", "ordered", f"ticket {ticket} ran after {atomic64_read(last)}")
        atomic64_set(last, ticket)
        atomic64_set(o_ran, ticket)
        atomic_dec(inside)
    return fn


def _wq_ordered(cpu: int, failures: Atomic64) -> WqOrdered:
    o = WqOrdered(alloc_ordered_workqueue("torture-ordered/%d", 0, cpu), [],
                  [Atomic64() for _ in range(WQ_ORDERED_ITEMS)],
                  [Atomic64() for _ in range(WQ_ORDERED_ITEMS)], Atomic64(), Atomic())
    o.works = [Work(_wq_ordered_fn(o.tickets[i], o.ran[i], o.last, o.inside, failures))
               for i in range(WQ_ORDERED_ITEMS)]
    return o


@dataclass
class WqState:
    wqs: list[Workqueue]
    counters: Counters
    stop: Atomic
    items: list[list[WqItem]] = field(default_factory=list)  # per CPU
    ordered: list[WqOrdered] = field(default_factory=list)  # per CPU
    irq_items: list[WqItem] = field(default_factory=list)


def _wq_queue(item: WqItem, ok: bool) -> None:
    if ok:
        atomic64_add(1, item.queued)


def _wq_ordered_step(o: WqOrdered, ticket: int, counters: Counters) -> bool:
    """Queue ticket `ticket` on its ring slot if that slot's last ticket ran; True if so."""
    i = ticket % WQ_ORDERED_ITEMS
    if atomic64_read(o.ran[i]) != atomic64_read(o.tickets[i]):
        return False  # still queued: the ring is full
    atomic64_set(o.tickets[i], ticket)
    if not queue_work(o.wq, o.works[i]):
        atomic64_add(1, counters.failures)
        fail("workqueue", "return value", "queue_work() of an idle item returned false")
    return True


def _wq_queuer(data: tuple[WqState, int, int]) -> int:
    st, cpu, seed = data
    rng = random.Random(seed)
    items, o, counters = st.items[cpu], st.ordered[cpu], st.counters
    ncpus = len(st.items)
    ticket = 1
    while not _stopped(st.stop):
        n = rng.randrange(len(items))
        item = items[n]
        op = rng.random()
        wq = st.wqs[n % len(st.wqs)]  # one workqueue per item: on two, it may overlap
        if op < 0.3:
            target = rng.randrange(ncpus)
            _wq_queue(item, queue_work_on(target, wq, item.work) if op < 0.2
                      else queue_work(wq, item.work))
        elif op < 0.45:
            _wq_queue(item, queue_delayed_work(wq, item.work, rng.randrange(4)))
        elif op < 0.55:
            # True: a pending instance (timer or queued) was replaced, none added.
            _wq_queue(item, not mod_delayed_work(wq, item.work, rng.randrange(4)))
        elif op < 0.7:
            flush_delayed_work(item.work)
            _wq_check_once(item, "flush_delayed_work()", counters)
        elif op < 0.85:
            if cancel_delayed_work_sync(item.work):
                atomic64_add(1, item.cancelled)
            _wq_check_once(item, "cancel_delayed_work_sync()", counters)
        elif _wq_ordered_step(o, ticket, counters):
            ticket += 1
        counters.add(cpu)
    return 0


def wq_torture_handler(irq_nr: int, dev: tuple[list[WqItem], Atomic]) -> int:
    items, turn = dev
    item = items[atomic_inc_return(turn) % len(items)]
    _wq_queue(item, schedule_work(item.work))
    return _irq.IRQ_HANDLED


def _start_workqueue(run: Run, rng: random.Random) -> None:
    k, opts = run.kernel, run.opts
    counters = run.counters["workqueue"] = Counters(k.ncpus)
    wqs = [system_wq, alloc_workqueue("torture-unbound", WQ_UNBOUND, 0),
           alloc_workqueue("torture-2", 0, 2)]
    st = WqState(wqs, counters, run.stop)
    for cpu in range(k.ncpus):
        st.items.append([_wq_item(nap=i % 2 == 0) for i in range(WQ_ITEMS)])
        st.ordered.append(_wq_ordered(cpu, counters.failures))
    st.irq_items = [_wq_item(nap=False) for _ in range(2)]
    for cpu in range(k.ncpus):
        run.threads.append(kthread_run_on_cpu(_gated(run, _wq_queuer),
                                              (st, cpu, rng.randrange(1 << 30)), cpu, "wqq/%u"))
    dev = (st.irq_items, Atomic())
    sources: list[int] = []
    if opts.irq_rate > 0:
        _irq.request_irq(WQ_LINE, wq_torture_handler, 0, "torture-wq", dev)
        _irq.irq_set_affinity(WQ_LINE, k.ncpus - 1)
        run.on_go.append(lambda: sources.append(
            k.add_irq_source(WQ_LINE, rate_hz=opts.irq_rate, count=-1)))

    def finish() -> list[str]:
        for source in sources:
            k.remove_irq_source(source)
        if opts.irq_rate > 0:
            _irq.free_irq(WQ_LINE, dev)
        _wait_exited([t for t in run.threads if t.comm.startswith("wqq")])
        problems = []
        for item in [*(i for per_cpu in st.items for i in per_cpu), *st.irq_items]:
            flush_delayed_work(item.work)
            q, c, r = (atomic64_read(v) for v in (item.queued, item.cancelled, item.runs))
            if r != q - c:
                problems.append(f"workqueue: exactly once: {r} runs for {q} queued, "
                                f"{c} cancelled")
        for o in st.ordered:
            destroy_workqueue(o.wq)
        for wq in wqs[1:]:
            destroy_workqueue(wq)
        return problems

    run.finish.append(finish)


# --- the run ---------------------------------------------------------------------------------

@dataclass
class Options:
    types: tuple[str, ...] = TYPES
    cpus: Any = None
    threads_per_cpu: int = 2
    duration: float = 10.0
    irq_rate: float = 500.0
    signal_rate: float = 100.0
    seed: int = 1
    stat_interval: float = 5.0
    json_file: str | None = None
    broken: bool = False
    trace: str | None = None  # a Perfetto trace file of the run


@dataclass
class Run:
    kernel: Kernel
    opts: Options
    stop: Atomic
    #: completed (all) once every torture thread exists: creating hundreds of threads
    #: is slow while those already created hammer the CPUs
    go: Completion = field(default_factory=Completion)
    #: called right after `go` (the emulated devices start there)
    on_go: list[Callable[[], None]] = field(default_factory=list)
    counters: dict[str, Counters] = field(default_factory=dict)
    threads: list[Task] = field(default_factory=list)
    finish: list[Callable[[], list[str]]] = field(default_factory=list)
    cstate: CompletionState | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # printed with the summary
    started: float = 0.0  # when the torture loop began (0: not yet)
    elapsed: float = 0.0  # how long it ran, once it ended
    interrupted: bool = False  # by Ctrl-C


def _oversubscription(k: Kernel) -> int:
    """Emulated CPUs per real CPU (rounded up): the host time-slices that many busy CPUs'
    tasks on one real CPU, so a woken task may wait that many times longer to run."""
    return -(-k.ncpus // len(set(k.cpu_map)))


def _gated(run: Run, threadfn: Callable[[Any], int]) -> Callable[[Any], int]:
    """`threadfn`, starting only once the run's `go` was completed."""
    go = run.go

    def gated(data: Any) -> int:
        wait_for_completion_state(go, TASK_IDLE)  # idle: however long start-up takes
        return threadfn(data)

    return gated


def _start_completion(run: Run, rng: random.Random) -> None:
    k, opts = run.kernel, run.opts
    counters = run.counters["completion"] = Counters(k.ncpus)
    st = run.cstate = CompletionState(Completion(), Atomic64(), Atomic64(), run.stop, counters,
                                      broken=opts.broken, slack_ms=1000 * _oversubscription(k))
    for cpu in range(k.ncpus):
        for _ in range(opts.threads_per_cpu):
            run.threads.append(kthread_run_on_cpu(
                _gated(run, _completion_waiter), (st, rng.randrange(1 << 30)), cpu, "cwait/%u"))
        run.threads.append(kthread_run_on_cpu(
            _gated(run, _completion_completer), (st, rng.randrange(1 << 30)), cpu, "cpost/%u"))
    if opts.irq_rate > 0:
        line = 1
        _irq.request_irq(line, completion_irq_handler, 0, "torture-complete",
                         (st.c, st.posted, run.stop))
        sources: list[int] = []

        def start_device() -> None:
            sources.append(k.add_irq_source(line, rate_hz=opts.irq_rate, count=-1))

        run.on_go.append(start_device)

        def stop_irq() -> list[str]:
            for source in sources:
                k.remove_irq_source(source)
            _irq.free_irq(line, (st.c, st.posted, run.stop))
            return []

        run.finish.append(stop_irq)
    run.finish.append(lambda: _drain_completion(run))


def _pause(seconds: float) -> None:
    """time.sleep() for the torture's polling loops, which are no emu calls: raises
    KernelDeadError once the kernel died (its news may have come while it could not)."""
    image.this().core.raise_if_dead()
    time.sleep(seconds)


def _wait_exited(threads: list[Task], timeout: float = 10.0) -> None:
    """Sleep until each of `threads` exited (exit_notify() wakes its kflags word), for
    at most `timeout` seconds in all."""
    deadline = time.monotonic() + timeout
    for t in threads:
        left = msecs_to_jiffies(max(0, int((deadline - time.monotonic()) * 1000)))
        wait_var_event_timeout(image.field_addr(t._rec, "kflags"),
                               functools.partial(_exited, t), left)


def _exited(t: Task) -> bool:
    return task_state_to_char(t) == "X"


def _drain_completion(run: Run) -> list[str]:
    """Release the waiters and check conservation: posted == consumed + done."""
    st = run.cstate
    assert st is not None
    # Completers first: one stopped between counting a post and complete() would look
    # like a lost completion.
    _wait_exited([t for t in run.threads if t.comm.startswith("cpost")])
    waiters = [t for t in run.threads if t.comm.startswith("cwait")]
    deadline = time.monotonic() + 10
    while any(task_state_to_char(t) != "X" for t in waiters) and time.monotonic() < deadline:
        atomic64_add(1, st.posted)
        complete(st.c)
        _pause(0.001)
    posted, consumed, done = atomic64_read(st.posted), atomic64_read(st.consumed), st.c.done
    problems = []
    diff = posted - consumed - done
    if diff:
        what = f"{diff} lost" if diff > 0 else f"{-diff} consumed twice"
        problems.append(f"completion: conservation: posted {posted} != consumed {consumed} "
                        f"+ done {done} ({what})")
    return problems


def _check_lost_wakeup(run: Run) -> None:
    """While done > 0, complete() has popped and woken the queue's head: a head that
    stays asleep, without waking even once, while done stays > 0 was never woken."""
    st = run.cstate
    if st is None:
        return
    rec = st.c.rec
    head = rec.head
    if head < 0 or not rec.done:
        return
    tasks = run.kernel._img.img.tasks
    switches = tasks[head].nvcsw
    for _ in range(4):
        _pause(0.05)
        if rec.head != head or not rec.done or tasks[head].nvcsw != switches:
            return  # progress: it was woken (or is no longer first)
    atomic64_add(1, st.counters.failures)
    fail("completion", "lost wake-up",
         f"the first waiter (slot {head}) stayed asleep 200 ms while done={rec.done}")


def _fifo_waiter(c: Completion) -> int:
    wait_for_completion(c)
    return 0


def _fifo_probe(run: Run) -> None:
    """Three waiters queued in a known order must be woken in that order."""
    c = Completion()
    ts = []
    for i in range(3):
        t = kthread_run(_fifo_waiter, c, "fifo/%d", i)
        deadline = time.monotonic() + 5
        while not t._rec.wq_on and time.monotonic() < deadline:
            _pause(0.0005)
        ts.append(t)
    for i, t in enumerate(ts):
        complete(c)
        _wait_exited([t], 5)
        later = [u for u in ts[i + 1:] if task_state_to_char(u) == "X"]
        if task_state_to_char(t) != "X" or later:
            fail("completion", "FIFO", f"complete() #{i + 1} did not wake waiter #{i + 1} first")
            if run.cstate:
                atomic64_add(1, run.cstate.counters.failures)
    for t in ts:
        kthread_stop(t)


def _start_kthread(run: Run, rng: random.Random) -> None:
    k = run.kernel
    counters = run.counters["kthread"] = Counters(k.ncpus)
    for cpu in range(k.ncpus):
        data = (counters, run.stop, rng.randrange(1 << 30), k.ncpus)
        run.threads.append(kthread_run_on_cpu(_gated(run, _kthread_churner), data, cpu,
                                              "kchurn/%u"))


def _start_irq(run: Run, rng: random.Random) -> None:
    k, opts = run.kernel, run.opts
    counters = run.counters["irq"] = Counters(k.ncpus)
    st = IrqState(Spinlock(), Atomic64(), Atomic64(), Atomic64(), Atomic(), Atomic64(),
                  counters.failures, Atomic64())
    st.tasklet = Tasklet(torture_tasklet, st)
    sources: list[int] = []
    _irq.request_threaded_irq(THREADED_LINE, None, irq_torture_thread, _irq.IRQF_ONESHOT,
                              "torture-thread", st)
    lines = _irq_lines(k.ncpus)
    devs = [(st, Atomic()) for _ in range(lines)]
    for cpu in range(lines):  # one device per CPU, as far as there are lines
        line = IRQ_LINE_BASE + cpu
        _irq.request_irq(line, irq_torture_handler, 0, "torture-irq", devs[cpu])
        _irq.irq_set_affinity(line, cpu)  # its real CPU's idle task starts here
    for cpu in range(k.ncpus):  # the last tasks a run starts (tests/killing.py)
        run.threads.append(kthread_run_on_cpu(_gated(run, _irq_worker), (st, run.stop, counters),
                                              cpu, "irqwork/%u"))

    def start_devices() -> None:
        for line in [THREADED_LINE, *range(IRQ_LINE_BASE, IRQ_LINE_BASE + lines)]:
            sources.append(k.add_irq_source(line, rate_hz=opts.irq_rate, count=-1))

    if opts.irq_rate > 0:
        run.on_go.append(start_devices)

    def finish() -> list[str]:
        # Quiesce before comparing: no device, no handler, no worker may still be
        # between its locked update and its count.
        for source in sources:
            k.remove_irq_source(source)
        for cpu in range(lines):
            _irq.free_irq(IRQ_LINE_BASE + cpu, devs[cpu])
        _irq.free_irq(THREADED_LINE, st)
        assert st.tasklet is not None
        tasklet_kill(st.tasklet)
        _wait_exited([t for t in run.threads if t.comm.startswith("irqwork")])
        shared = atomic64_read(st.shared)
        parts = [atomic64_read(v) for v in (st.worker_ops, st.handled, st.threaded)]
        if shared != sum(parts):
            return [f"irq: lost update: shared counter {shared} != worker updates "
                    f"{parts[0]} + handler updates {parts[1]} + threaded handler "
                    f"updates {parts[2]}"]
        return []

    run.finish.append(finish)


STARTERS = {"completion": _start_completion, "kthread": _start_kthread, "irq": _start_irq,
            "timer": _start_timer,
            "workqueue": _start_workqueue}

#: IRQ lines: 1 is the completion torture's, THREADED_LINE the irq torture's threaded
#: one, and the irq torture's device of CPU i raises line IRQ_LINE_BASE + i.
THREADED_LINE = 2
IRQ_LINE_BASE = 8


def _irq_lines(ncpus: int) -> int:
    """How many CPUs get an irq-torture device: one each, as far as IRQ lines and
    emulated devices go (three devices are the completion torture's, THREADED_LINE's and
    the workqueue torture's)."""
    return min(ncpus, NR_IRQS_MAX - IRQ_LINE_BASE, MAX_IRQ_SOURCES - 3)


def _ncpus(cpus: Any) -> int:
    """The number of emulated CPUs boot(cpus=...) will make (boot() validates `cpus`)."""
    if cpus is None:
        return len(os.sched_getaffinity(0))
    if isinstance(cpus, int):
        return cpus
    return len(list(cpus))


def boot_capacities(opts: Options) -> dict[str, int]:
    """The boot() capacities a run with `opts` needs, for any CPU count.

    Tasks alive at once: the booting task, three FIFO probe waiters, and per CPU its
    idle task plus, by type, `threads_per_cpu` waiters and a completer (completion), a
    churner, its parker and the thread it churns (kthread), a worker (irq).
    """
    per_cpu = 1
    if "completion" in opts.types:
        per_cpu += opts.threads_per_cpu + 1
    if "kthread" in opts.types:
        per_cpu += 3
    if "irq" in opts.types:
        per_cpu += 1
    if "timer" in opts.types:
        per_cpu += 1
    ncpus = _ncpus(opts.cpus)
    tasks = 1 + 3 + ncpus * per_cpu
    if "workqueue" in opts.types:  # a queuer per CPU; kworkers: 2 pools per CPU, which
        tasks += ncpus * 8 + 32    # grow while items sleep, and the unbound pool
    return {"max_tasks": max(256, tasks + tasks // 4),
            "nr_irqs": max(32, IRQ_LINE_BASE + _irq_lines(ncpus))}


def boot_watchdogs(opts: Options) -> dict[str, int]:
    """The hung-task and soft-lockup thresholds of a run with `opts`: the run's length
    plus 20 s (at least 20 s; the booting process waits for the whole run and then for
    every thread to end, on a host that may be loaded) and the soft-lockup default, both
    times the emulated CPUs per real CPU. The host time-slices that many busy CPUs' tasks
    on one real CPU, so a task may wait that many times longer to run (a lock holder
    too)."""
    ncpus = _ncpus(opts.cpus)
    if opts.cpus is None or isinstance(opts.cpus, int):
        real = min(ncpus, len(os.sched_getaffinity(0)))
    else:
        real = len(set(opts.cpus))
    over = -(-ncpus // max(real, 1))
    return {"hung_task_timeout_secs": max(20, int(opts.duration) + 20) * over,
            "softlockup_thresh_secs": SOFTLOCKUP_THRESH_DEFAULT * over}


def _stat_line(kind: str, counters: Counters, elapsed: float) -> str:
    per_cpu = counters.per_cpu()
    total = sum(per_cpu)
    spread = " ".join(f"cpu{i}:{n}" for i, n in enumerate(per_cpu))
    return (f"{kind}-torture: t={elapsed:.1f}s ops {total} ({total / max(elapsed, 1e-9):.0f}/s) "
            f"[{spread}] failures {atomic64_read(counters.failures)}")


def _inject_signals(run: Run, rng: random.Random, budget: float) -> None:
    waiters = [t for t in run.threads if t.comm.startswith("cwait")]
    for _ in range(int(budget)):
        if waiters:
            send_sig(SIGNAL, rng.choice(waiters), 0)


def _run_loop(run: Run, rng: random.Random, out: Any) -> None:
    """Let the torture run for its duration, reporting at intervals, or until Ctrl-C."""
    opts = run.opts
    start = run.started = time.monotonic()
    next_stat = start + opts.stat_interval
    tty = hasattr(out, "isatty") and out.isatty()
    try:
        while (now := time.monotonic()) < start + opts.duration:
            _pause(0.05)
            if "completion" in opts.types:
                _inject_signals(run, rng, opts.signal_rate * 0.05)
            if tty:
                out.write(f"\r[{now - start:6.1f}/{opts.duration:.0f}s] running...")
                out.flush()
            if now >= next_stat:
                next_stat += opts.stat_interval
                if "completion" in opts.types:
                    _fifo_probe(run)
                    _check_lost_wakeup(run)
                for kind, counters in run.counters.items():
                    print(("\r" if tty else "") + _stat_line(kind, counters, now - start),
                          file=out, flush=True)
    except KeyboardInterrupt:
        run.interrupted = True
    run.elapsed = time.monotonic() - start


def _torture(run: Run, rng: random.Random, out: Any) -> None:
    """Start every type, run, then stop everything and check what can only be checked
    at rest (the problems found go to run.problems)."""
    for kind in run.opts.types:
        STARTERS[kind](run, rng)
    complete_all(run.go)
    for hook in run.on_go:
        hook()
    _run_loop(run, rng, out)
    if "completion" in run.opts.types:
        _check_lost_wakeup(run)
    atomic_set(run.stop, 1)
    for finish in run.finish:
        run.problems += finish()
    for t in run.threads:
        kthread_stop(t)


def _report(run: Run) -> dict[str, Any]:
    """The statistics and the verdict of a run that ended (its kernel still booted)."""
    kernel = run.kernel
    if not run.elapsed and run.started:  # the kernel died while it ran
        run.elapsed = time.monotonic() - run.started
    elapsed = max(run.elapsed, 1e-9)
    types = {}
    for kind, counters in run.counters.items():
        per_cpu = counters.per_cpu()
        types[kind] = {"ops": sum(per_cpu), "ops_per_s": sum(per_cpu) / elapsed,
                       "per_cpu": per_cpu, "failures": atomic64_read(counters.failures)}
    log = kernel.dmesg()
    problems = list(run.problems)
    if not kernel.alive:
        problems.append(f"kernel died: {kernel.death_cause}")
    problems += [line[15:] for line in log if "-torture: FAILURE:" in line]
    oopses = [line.split("] Oops: ", 1)[1].split(" [#", 1)[0]
              for line in log if "] Oops: " in line]
    hung = [line for line in log if "blocked for more than" in line]
    for name, count in (("WARN", kernel.warnings), ("BUG", kernel.bugs),
                        ("Oops", kernel.oopses), ("hung task", len(hung))):
        if count:
            first = f": {oopses[0]}" if name == "Oops" and oopses else ""
            problems.append(f"kernel: {count} {name} report(s){first}")
    result: dict[str, Any] = {
        "types": types, "duration": run.elapsed, "cpus": kernel.ncpus,
        "interrupted": run.interrupted, "kernel_died": kernel.death_cause or None,
        "problems": problems, "verdict": "FAILURE" if problems else "SUCCESS",
        "notes": run.notes,
        "started_at": run.started,  # time.monotonic(): to match with outside events
    }
    if problems:
        result["log_tail"] = log[-40:]
    return result


def run_torture(opts: Options, out: Any = sys.stdout) -> dict[str, Any]:
    """Run a torture test; returns the statistics (``verdict`` is SUCCESS or FAILURE).

    If the kernel dies meanwhile (KernelDeadError), the run ends at once with FAILURE
    and the problem ``kernel died: <cause>``.
    """
    rng = random.Random(opts.seed)
    result: dict[str, Any] = {"seed": opts.seed}
    with boot(cpus=opts.cpus, hz=1000, trace=opts.trace, **boot_watchdogs(opts),
              **boot_capacities(opts)) as kernel:
        run = Run(kernel, opts, Atomic())
        try:
            _torture(run, rng, out)
        except KernelDeadError:
            pass  # _report() names the cause
        try:
            result.update(_report(run))
        except KernelDeadError:  # it died just now: it interrupts only once
            result.update(_report(run))
        if opts.trace:
            events, dropped = kernel.trace_stop()
            result["trace"] = {"file": opts.trace, "events": events, "dropped": dropped,
                               "bytes": os.path.getsize(opts.trace)}
    if "completion" in opts.types and not run.interrupted and not result["kernel_died"]:
        rate = posix_ipc_baseline(result["cpus"], opts.threads_per_cpu,
                                  min(opts.duration, 3.0), opts.cpus)
        ours = result["types"]["completion"]["ops_per_s"]
        result["baseline_posix_ipc_ops_per_s"] = rate
        result["baseline"] = (f"baseline: raw posix_ipc loop of the same shape and CPUs: "
                              f"{rate:.0f} ops/s (completion-torture at {ours / rate:.0%} "
                              f"of it)")
    _summary(result, out)
    if "trace" in result:
        tr = result["trace"]
        print(f"trace: {tr['file']}: {tr['bytes']} bytes, {tr['events']} events, "
              f"{tr['dropped']} dropped", file=out)
    if opts.json_file:
        with open(opts.json_file, "w") as f:
            json.dump(result, f, indent=2)
    return result


def posix_ipc_baseline(ncpus: int, threads_per_cpu: int, seconds: float,
                       cpus: Any = None) -> float:
    """ops/s of the completion torture's shape done with one raw posix_ipc semaphore:
    per CPU `threads_per_cpu` waiters (timed acquires, random timeouts up to 20 ms) and
    one poster (release, pausing 50-100 us 30% of the time), pinned alike. Every
    acquire and release counts as an op, as every wait and complete does there."""
    real = sorted(os.sched_getaffinity(0))
    cpu_map = (cpus if isinstance(cpus, list) else
               [real[i % len(real)] for i in range(ncpus)])
    sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX, mode=0o600)
    sem.unlink()
    counts = mmap.mmap(-1, 8 * ncpus * (threads_per_cpu + 1))
    pids: list[int] = []
    deadline = time.monotonic() + seconds
    for cpu in range(ncpus):
        for role in ["wait"] * threads_per_cpu + ["post"]:
            index = len(pids)
            pid = os.fork()
            if pid == 0:
                os.sched_setaffinity(0, {cpu_map[cpu]})
                rng = random.Random(index)
                n = 0
                while time.monotonic() < deadline:
                    if role == "post":  # like the completers: pause 30% of the time
                        sem.release()
                        if rng.random() < 0.3:
                            time.sleep(rng.uniform(50e-6, 100e-6))
                    else:  # like the waiters: random timeouts up to 20 ms
                        try:
                            sem.acquire(rng.uniform(0, 0.02))
                        except posix_ipc.BusyError:
                            pass
                    n += 1
                struct.pack_into("q", counts, 8 * index, n)
                os._exit(0)
            pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    sem.close()
    total: int = sum(struct.unpack_from("q", counts, 8 * i)[0] for i in range(len(pids)))
    return total / seconds


def _summary(result: dict[str, Any], out: Any) -> None:
    print(f"--- torture summary: {result['duration']:.1f}s on {result['cpus']} CPU(s), "
          f"seed {result['seed']}{', interrupted' if result['interrupted'] else ''}", file=out)
    for kind, st in result["types"].items():
        print(f"{kind}-torture: ops {st['ops']} ({st['ops_per_s']:.0f}/s) per-cpu "
              f"{st['per_cpu']} failures {st['failures']}", file=out)
    if "baseline" in result:
        print(result["baseline"], file=out)
    for note in result.get("notes", []):
        print(note, file=out)
    for p in result["problems"]:
        print(f"  FAILURE: {p}", file=out)
    print(f"End of test: {result['verdict']}", file=out, flush=True)
