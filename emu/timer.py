"""Timers (kernel/time/timer.c): timer_list on TIMER_SOFTIRQ.

Each CPU has a timer base in the shared image: its pending timers ordered by the time
they are due, and the timer whose callback runs there. Arming queues a timer on the
arming CPU's base (or, while its callback runs on another CPU, on that one, so that it
never runs concurrently with itself). The supervisor is the clock event device: it
sleeps until the earliest base is due, then raises TIMER_SOFTIRQ on that CPU and rings
its doorbell like an interrupt, so the callbacks run in softirq context in whatever
task runs on that CPU, or in its idle task. A timer is due when ``jiffies`` passes
``expires`` (the kernel's level-0 wheel: ``time_after(jiffies, expires)`` holds in the
callback); one whose ``expires`` is not in the future runs at the next tick.

Callbacks are carried like other callbacks (callback.py): any callable, with the
attributes the caller set on the timer handle (``timer.data = ...``) carried along at
each arming, each task running its own copy.
"""

from __future__ import annotations

import os
import signal as _os_signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import _emu_native as _native

from . import bug, checks, idle, image, preempt, records
from .callback import callback_free, callback_load, callback_store, qualname
from .constants import TASK_UNINTERRUPTIBLE
from .idle import start_irq_layer
from .irqchip import resend_pending, ring_doorbell, softirq_pending_addr
from .sched import FOREVER_NS, jiffies
from .softirq import TIMER_SOFTIRQ, open_softirq
from .trace import TIMER_ENTRY, TIMER_EXIT, trace_point
from .wait import wait_var_event, wake_up_var

TIMER_DEFERRABLE = 0x00080000
TIMER_PINNED = 0x00100000
TIMER_IRQSAFE = 0x00200000
TIMER_INIT_FLAGS = TIMER_DEFERRABLE | TIMER_PINNED | TIMER_IRQSAFE
ULONG_MAX = (1 << 64) - 1
#: Wakes the supervisor (the backup clock event device) when a timer is due earlier
#: than it knows.
SIG_CLOCK = _os_signal.SIGUSR2
#: The supervisor rings a CPU whose timers are this late (its idle task did not run
#: them: the host kept it off the CPU), and again as long as they stay due.
BACKUP_NS = 10_000_000

TimerFn = Callable[["TimerList"], None]
_INTERNAL = ("_function", "_carried", "_ref", "_expires_fired")


class TimerList(records.Record):
    """``struct timer_list`` in shared memory: `callback(timer)` runs in softirq context
    on the CPU that armed it, never before jiffies passes ``timer.expires``.

    Attributes set on the handle (``timer.data = x``) travel with the timer at each
    arming. The handle that created the timer frees it when garbage-collected (a
    pending timer is deleted first, with a WARN: the kernel's ODEBUG report).
    """

    TABLE = "timers"
    __slots__ = ("_function", "_carried", "_ref", "_expires_fired", "__dict__")

    def __init__(self, callback: TimerFn | None = None, flags: int = 0) -> None:
        super().__init__()
        self._function: TimerFn | None = None
        self._carried: Any = None
        self._ref = (0, 0)
        self._expires_fired = 0
        self._rec.cpu = max(preempt.this_cpu(), 0)
        self._rec.next = -1
        if callback is not None:
            timer_setup(self, callback, flags)
        start_irq_layer()  # a CPU with no running task serves its timers in its idle task

    def _attach(self) -> None:
        super()._attach()
        self._function = None
        self._carried = None
        self._ref = (0, 0)
        self._expires_fired = 0  # `expires` of the run in progress (for the torture)

    @property
    def expires(self) -> int:
        """The jiffies value after which the callback runs (set by mod_timer())."""
        return int(self._rec.expires)

    @expires.setter
    def expires(self, value: int) -> None:
        self._rec.expires = _check_expires(value, "expires")

    @property
    def function(self) -> TimerFn | None:
        """This task's copy of the callback; None after timer_shutdown*()."""
        if self._rec.shutdown:
            return None
        return self._function

    @property
    def flags(self) -> int:
        """The TIMER_* flags given at setup."""
        return int(self._rec.flags)

    if TYPE_CHECKING:  # any attribute may be set on a timer, and travels with it
        def __getattr__(self, name: str) -> Any: ...
        def __setattr__(self, name: str, value: Any) -> None: ...

    def __repr__(self) -> str:
        rec = self._rec
        state = "pending" if rec.pending else "inactive"
        return f"<TimerList #{self.index} {state} expires={rec.expires} cpu={rec.cpu}>"

    def _free(self) -> None:
        rec = self._rec
        if rec.generation == self.generation:
            if rec.pending:
                bug.warn(f"ODEBUG: free active (active state 0) object type: timer_list "
                         f"hint: {qualname(self._function)}", depth=3)
                _delete(self, rec)
            if rec.ref:
                callback_free(rec.ref, rec.ref_generation)
                rec.ref = 0
        super()._free()


def _check_timer(timer: object) -> None:
    if not isinstance(timer, TimerList):
        raise checks.not_a("timer", "an emu.TimerList", timer) from None


def _live(timer: TimerList) -> Any:
    """The record of `timer`; TypeError if it is none, StaleObjectError once freed."""
    if type(timer) is not TimerList:
        _check_timer(timer)
    rec = timer._rec
    if rec.generation != timer.generation:
        timer._stale()
    return rec


def _check_expires(value: object, name: str) -> int:
    checks.check_int(value, name, "unsigned long")
    return value  # type: ignore[return-value]


def DEFINE_TIMER(callback: TimerFn, flags: int = 0) -> TimerList:
    """A new timer set up with `callback`."""
    return TimerList(callback, flags)


def timer_setup(timer: TimerList, callback: TimerFn, flags: int = 0) -> None:
    """Initialise `timer` to call `callback(timer)` when it expires; also undoes
    timer_shutdown*(). `flags`: TIMER_DEFERRABLE, TIMER_PINNED, TIMER_IRQSAFE (others
    are a WARN_ON_ONCE and masked off). TypeError if `callback` is not callable."""
    rec = _live(timer)
    if not callable(callback):
        raise checks.not_a("callback", "callable", callback)
    checks.check_int(flags, "flags", "unsigned int")
    if flags & ~TIMER_INIT_FLAGS:
        bug.warn(f"timer_setup(): invalid flags 0x{flags:08x}", depth=2)
        flags &= TIMER_INIT_FLAGS
    if rec.pending:
        bug.warn("ODEBUG: init active (active state 0) object type: timer_list", depth=2)
        _delete(timer, rec)
    timer._function = callback
    _carry(timer, rec, force=True)
    rec.flags = flags
    rec.shutdown = 0


# --- the bases --------------------------------------------------------------------------------

def _lock() -> int:
    addr = image.field_addr(image.this().img.hdr, "timer_lock")
    records.raw_spin_lock(addr, "timer base")
    return addr


def _percpu(cpu: int) -> Any:
    return image.this().img.percpu[cpu]


def _due_ns(expires: int) -> int:
    """CLOCK_MONOTONIC when jiffies passes `expires`; the next tick if that is not in
    the future (so a softirq never runs a timer armed during it)."""
    hdr = image.this().img.hdr
    tick = max(expires, jiffies()) + 1
    return int(hdr.boot_ns) + -(-tick * 1_000_000_000 // hdr.hz)


def _enqueue(cpu: int, index: int, rec: Any) -> bool:
    """Link `rec` into base `cpu` by due time (after those due at the same time); True
    if it became the first. Timer lock held."""
    timers = image.this().img.timers
    pc = _percpu(cpu)
    prev, cur = -1, pc.timer_head
    while cur != -1 and timers[cur].due_ns <= rec.due_ns:
        prev, cur = cur, timers[cur].next
    rec.next = cur
    if prev == -1:
        pc.timer_head = index
    else:
        timers[prev].next = index
    rec.cpu = cpu
    rec.pending = 1
    return prev == -1


def _detach(index: int, rec: Any) -> None:
    """Unlink pending `rec` from its base and update the base's next expiry. Timer lock held."""
    timers = image.this().img.timers
    pc = _percpu(rec.cpu)
    prev, cur = -1, pc.timer_head
    while cur != -1 and cur != index:
        prev, cur = cur, timers[cur].next
    if cur == index:
        if prev == -1:
            pc.timer_head = rec.next
            head = pc.timer_head
            pc.timer_next_ns = timers[head].due_ns if head != -1 else FOREVER_NS
        else:
            timers[prev].next = rec.next
    rec.next = -1
    rec.pending = 0


def _delete(timer: TimerList, rec: Any, shutdown: bool = False) -> int:
    """Detach `timer` from its base (and mark it shut down): 1 if it was pending."""
    addr = _lock()
    try:
        if shutdown:
            rec.shutdown = 1
        if not rec.pending:
            return 0
        _detach(timer.index, rec)
        return 1
    finally:
        records.raw_spin_unlock(addr)


def _program(cpu: int, due_ns: int) -> None:
    """Tell the clock event devices about base `cpu`, now due at `due_ns`: the CPU's idle
    task and the supervisor (the backup), each if it sleeps past that. Each publishes
    its wake-up time, then re-reads the bases: either it sees this base, or this reads
    the time it published."""
    img = image.this()
    pc = img.img.percpu[cpu]
    if due_ns < records.field_load(pc, "idle_clock_ns") and pc.idle_slot >= 0:
        img.core.wake(pc.idle_slot, TASK_UNINTERRUPTIBLE)  # it sleeps in TASK_IDLE
    hdr = img.img.hdr
    if due_ns + BACKUP_NS < records.field_load(hdr, "clock_programmed_ns"):
        try:
            os.kill(hdr.supervisor_pid, SIG_CLOCK)
        except ProcessLookupError:
            pass


# --- arming -----------------------------------------------------------------------------------

def _carry(timer: TimerList, rec: Any, force: bool = False) -> None:
    """Carry the callback and the handle's attributes to the tasks that will run it, if
    they changed since this handle last carried them (nothing changes on a TypeError).
    A handle that never carried anything and has no attributes (one inherited or
    pickled from another task) keeps what is carried."""
    attrs = {k: v for k, v in timer.__dict__.items() if k not in _INTERNAL}
    if not force:
        if timer._carried is None and not attrs:
            return
        if timer._carried is not None and timer._ref == (rec.ref, rec.ref_generation):
            try:
                if attrs == timer._carried:
                    return
            except Exception:
                pass  # attributes that do not compare: carry them again
    fn = timer._function
    if fn is None:
        if not rec.ref:
            return
        fn = timer._function = callback_load(rec.ref, rec.ref_generation)[0]
    ref = callback_store(fn, attrs, "callback", "timer attributes")
    addr = _lock()
    try:
        old = (rec.ref, rec.ref_generation)
        rec.ref, rec.ref_generation = ref
    finally:
        records.raw_spin_unlock(addr)
    if old[0]:
        callback_free(*old)
    timer._carried, timer._ref = attrs, ref


def __mod_timer(timer: TimerList, expires: int, pending_only: bool) -> int:
    rec = _live(timer)
    _check_expires(expires, "expires")
    if rec.shutdown:
        return 0
    _carry(timer, rec)
    cpu = max(preempt.this_cpu(), 0)
    due = _due_ns(expires)
    index = timer.index
    first = False
    addr = _lock()
    try:
        if rec.shutdown:
            return 0
        was = rec.pending
        if pending_only and not was:
            return 0
        if was:
            _detach(index, rec)
        if _percpu(rec.cpu).timer_running == index:
            cpu = rec.cpu  # its callback runs there: never run it concurrently with itself
        rec.expires = expires
        rec.due_ns = due
        if _enqueue(cpu, index, rec):
            first = True
            records.field_store(_percpu(cpu), "timer_next_ns", due)
    finally:
        records.raw_spin_unlock(addr)
    if first:
        _program(cpu, due)
    return int(was)


def mod_timer(timer: TimerList, expires: int) -> int:
    """Arm `timer` to run after jiffies passes `expires`, on this CPU, whether or not it
    was pending (an atomic delete + add). Returns 1 if it was pending, 0 if it was not
    (now started) or was shut down (then nothing happens). Any context."""
    return __mod_timer(timer, expires, False)


def mod_timer_pending(timer: TimerList, expires: int) -> int:
    """mod_timer() of a pending timer only: 1 if it was pending and is re-armed, else 0
    and nothing changes. Any context."""
    return __mod_timer(timer, expires, True)


def add_timer(timer: TimerList) -> None:
    """Start an inactive timer at ``timer.expires``. On a pending timer: WARN_ON_ONCE
    and ignored (the old expiry stays). Any context."""
    rec = _live(timer)
    if rec.pending:
        bug.warn("add_timer() on a pending timer", depth=2)
        return
    __mod_timer(timer, int(rec.expires), False)


def timer_pending(timer: TimerList) -> bool:
    """True if `timer` is armed and its callback not yet started (lockless). Any context."""
    return bool(_live(timer).pending)


# --- deleting -----------------------------------------------------------------------------------

def timer_delete(timer: TimerList) -> int:
    """Deactivate `timer`: 1 if it was pending, 0 if not (also while its callback runs).
    Does not wait for a running callback. Any context."""
    return _delete(timer, _live(timer))


del_timer = timer_delete


def timer_shutdown(timer: TimerList) -> int:
    """timer_delete(), and later arming is ignored until timer_setup(). Any context."""
    return _delete(timer, _live(timer), shutdown=True)


#: Timers whose callback this process is running now (innermost last).
_running_here: list[int] = []


def _try_to_del(timer: TimerList, rec: Any, shutdown: bool) -> tuple[int, int]:
    """try_to_del_timer_sync(): (1/0 was pending, -1 if its callback runs on CPU c: c)."""
    addr = _lock()
    try:
        if shutdown:
            rec.shutdown = 1
        cpu = rec.cpu
        if _percpu(cpu).timer_running == timer.index:
            return -1, cpu
        if not rec.pending:
            return 0, cpu
        _detach(timer.index, rec)
        return 1, cpu
    finally:
        records.raw_spin_unlock(addr)


def __timer_delete_sync(timer: TimerList, shutdown: bool) -> int:
    rec = _live(timer)
    if preempt.in_hardirq() and not rec.flags & TIMER_IRQSAFE:
        bug.warn("timer_delete_sync() in hardirq context on a timer without TIMER_IRQSAFE",
                 depth=3)
    while True:
        ret, cpu = _try_to_del(timer, rec, shutdown)
        if ret >= 0:
            return ret
        if timer.index in _running_here:
            # Its callback runs in this very process, below us: waiting would never end.
            bug.warn("possible recursive locking detected: timer_delete_sync() of a timer "
                     "from its own callback (or from an interrupt that interrupted it) "
                     "would never return", depth=3)
            return 0
        _wait_running(timer.index, cpu)


def _wait_running(index: int, cpu: int) -> None:
    """Wait until base `cpu` no longer runs timer `index`: sleep in process context,
    busy-wait (as the kernel always does) in atomic context."""
    pc = _percpu(cpu)
    if preempt.in_atomic() or preempt.irqs_disabled():
        while records.field_load(pc, "timer_running") == index:
            image.this().core.raise_if_dead()
            os.sched_yield()
        return
    wait_var_event(image.field_addr(pc, "timer_running"),
                   lambda: records.field_load(pc, "timer_running") != index)


def timer_delete_sync(timer: TimerList) -> int:
    """timer_delete(), then wait until the callback runs nowhere. Returns 1 if the timer
    was pending (a callback that re-armed its timer is deleted too), else 0. Not from
    the timer's own callback; from hardirq context only for TIMER_IRQSAFE timers (both
    reported). May sleep in process context."""
    return __timer_delete_sync(timer, False)


del_timer_sync = timer_delete_sync


def timer_shutdown_sync(timer: TimerList) -> int:
    """timer_delete_sync() that also keeps the timer from being armed again, even by its
    running callback, until timer_setup(). Returns 1 if it was pending, else 0."""
    return __timer_delete_sync(timer, True)


# --- expiry: TIMER_SOFTIRQ ------------------------------------------------------------------------

def _handle(index: int, rec: Any) -> tuple[TimerList, TimerFn] | None:
    """The handle the callback gets, with the carried attributes, and the callback;
    None if nothing is carried. Timer lock held (the reference cannot be freed)."""
    ref = (rec.ref, rec.ref_generation)
    if not ref[0]:
        return None
    key = (index, rec.generation)
    handles = image.this().timer_handles  # (index, generation) -> (ref, handle), this kernel's
    cached = handles.get(key)
    if cached is not None and cached[0] == ref:
        timer = cached[1]
        return timer, timer._function
    fn, attrs = callback_load(*ref)
    timer = TimerList._from_index(index, rec.generation)
    timer.__dict__.update(attrs)
    timer._function = fn
    timer._carried, timer._ref = attrs, ref
    handles[key] = (ref, timer)
    return timer, fn


def run_timer_softirq(cpu: int) -> None:
    """Run every timer of base `cpu` due when it starts, earliest first, one at a time.

    Several tasks may share an emulated CPU; one of them serves its base at a time, as
    one CPU runs one softirq at a time: another task that comes meanwhile raises
    TIMER_SOFTIRQ again for the next round of the softirq loop (__do_softirq()'s
    restarts are bounded, so no task serves timers for ever).
    """
    pc = _percpu(cpu)
    addr = _lock()
    try:
        if pc.timer_serving:
            _native.or32(softirq_pending_addr(cpu), 1 << TIMER_SOFTIRQ)
            return
        pc.timer_serving = 1
        try:
            _expire_timers(pc, addr)
        finally:
            pc.timer_serving = 0
        head = pc.timer_head
        timers = image.this().img.timers
        records.field_store(pc, "timer_next_ns", timers[head].due_ns if head != -1 else FOREVER_NS)
    finally:
        records.raw_spin_unlock(addr)
    if pc.timer_head != -1:
        _program(cpu, int(pc.timer_next_ns))


def _expire_timers(pc: Any, addr: int) -> None:
    """One pass over the base: the timers due now. Timer lock held (dropped around each
    callback)."""
    timers = image.this().img.timers
    now = time.monotonic_ns()
    while (index := pc.timer_head) != -1 and timers[index].due_ns <= now:
        rec = timers[index]
        _detach(index, rec)
        try:
            call = _handle(index, rec)
        except Exception as exc:  # the carried callback does not load here
            bug.oops(exc, f"{type(exc).__name__} loading timer callback: {exc}")
            continue
        if call is None:
            continue
        call[0]._expires_fired = int(rec.expires)
        pc.timer_running = index
        records.raw_spin_unlock(addr)
        try:
            call_timer_fn(*call, irqsafe=bool(rec.flags & TIMER_IRQSAFE))
        finally:
            records.raw_spin_lock(addr, "timer base")
            pc.timer_running = -1
            records.raw_spin_unlock(addr)
            wake_up_var(image.field_addr(pc, "timer_running"))  # timer_delete_sync()
            records.raw_spin_lock(addr, "timer base")


def call_timer_fn(timer: TimerList, fn: TimerFn, irqsafe: bool) -> None:
    """Run one callback; an exception is an Oops in softirq context, a changed preempt
    count is the kernel's "preempt leak" WARN (and is restored)."""
    count = preempt.preempt_count()
    flags = preempt.local_irq_save() if irqsafe else None
    _running_here.append(timer.index)
    trace_point(TIMER_ENTRY, timer.index)
    try:
        fn(timer)
    except bug.TaskKilled:
        pass  # BUG() in the callback (e.g. it slept), already reported
    except Exception as exc:
        bug.oops(exc, f"{type(exc).__name__} in timer callback {qualname(fn)}: {exc}")
    finally:
        trace_point(TIMER_EXIT, timer.index)
        _running_here.pop()
        if flags is not None:
            preempt.local_irq_restore(flags)
    if preempt.preempt_count() != count:
        leaked = preempt.preempt_count()
        bug.warn(f"timer: {qualname(fn)} preempt leak: {count:08x} -> {leaked:08x}", depth=2)
        _restore_count(count)


def _restore_count(count: int) -> None:
    now = preempt.preempt_count()
    if now > count:
        preempt.preempt_count_sub(now - count)


open_softirq(TIMER_SOFTIRQ, run_timer_softirq)


# --- the clock event devices --------------------------------------------------------------------
#
# Each CPU's idle task sleeps until the CPU's next timer is due (idle.py), then raises
# TIMER_SOFTIRQ there and rings the CPU's doorbell like a local timer interrupt: the task
# running on the CPU takes it, or the idle task itself. The supervisor is the backup for
# a CPU whose idle task the host did not run in time.

def _idle_next_event(cpu: int) -> int | None:
    """When the idle task of `cpu` must wake (None: no timer). Its state is already set:
    a change of the base after the publication below wakes it; one before is read here.
    Timers it raised and nobody served yet (the task running there has interrupts off)
    are left to whoever serves them, and to the supervisor: it does not spin on them."""
    pc = _percpu(cpu)
    while True:
        due = records.field_load(pc, "timer_next_ns")
        wake = due
        now = time.monotonic_ns()
        if due <= now and _native.load32(softirq_pending_addr(cpu)) & (1 << TIMER_SOFTIRQ):
            wake = now + BACKUP_NS
        records.field_store(pc, "idle_clock_ns", wake)
        if records.field_load(pc, "timer_next_ns") == due:
            return None if wake >= FOREVER_NS else wake


def _idle_expire(cpu: int) -> None:
    """The CPU's clock event fired: a local timer interrupt for its timer softirq."""
    records.field_store(_percpu(cpu), "idle_clock_ns", FOREVER_NS)
    if records.field_load(_percpu(cpu), "timer_next_ns") <= time.monotonic_ns():
        _native.or32(softirq_pending_addr(cpu), 1 << TIMER_SOFTIRQ)
        resend_pending(cpu)


idle.clock_event = (_idle_next_event, _idle_expire)


#: Passes of ClockEvent.fire() before it lets the supervisor do its other work.
FIRE_PASSES = 3


class ClockEvent:
    """The supervisor's side: raise TIMER_SOFTIRQ on each CPU whose base is due for
    BACKUP_NS and not served (its idle task did not run), and ring its doorbell."""

    def __init__(self, img: image.SharedImage) -> None:
        self.hdr = img.img.hdr
        self.percpu = [img.img.percpu[c] for c in range(self.hdr.ncpus)]
        self.pending = [softirq_pending_addr(c) for c in range(self.hdr.ncpus)]
        self.raised = [0] * self.hdr.ncpus  # when we last rang each CPU for its timers

    def fire(self) -> int:
        """Raise what is overdue; returns the ns until the supervisor must look again."""
        for _ in range(FIRE_PASSES):
            now = time.monotonic_ns()
            nearest = FOREVER_NS
            seen = [records.field_load(pc, "timer_next_ns") for pc in self.percpu]
            for cpu, due in enumerate(seen):
                if due >= FOREVER_NS:
                    continue
                late = max(due + BACKUP_NS, self.raised[cpu] + BACKUP_NS)
                if now < late:
                    nearest = min(nearest, late)
                    continue
                _native.or32(self.pending[cpu], 1 << TIMER_SOFTIRQ)
                self.raised[cpu] = now
                ring_doorbell(cpu)
                nearest = min(nearest, now + BACKUP_NS)
            records.field_store(self.hdr, "clock_programmed_ns", nearest)
            # A base changed before that store is seen now (look again); one changed
            # after it saw the store and woke us if it needs to (_program()).
            if [records.field_load(pc, "timer_next_ns") for pc in self.percpu] == seen:
                return nearest - time.monotonic_ns()
        return 1_000_000  # the bases keep changing: look again in a millisecond


__all__ = [
    "TimerList", "DEFINE_TIMER", "timer_setup", "mod_timer", "mod_timer_pending", "add_timer",
    "timer_pending", "timer_delete", "del_timer", "timer_delete_sync", "del_timer_sync",
    "timer_shutdown", "timer_shutdown_sync", "TIMER_DEFERRABLE", "TIMER_PINNED",
    "TIMER_IRQSAFE",
]
