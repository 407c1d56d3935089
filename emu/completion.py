"""Completions (kernel/sched/completion.c, kernel/sched/swait.c).

A completion is a counter ``done`` and a wait queue head (wait.py, the one wait-queue
implementation) of exclusive waiters, in the shared image, changed together under the
queue's lock. complete() pops the longest
waiter and posts its semaphore: exact FIFO, one waiter per complete(). Every wait
variant is a thin wrapper naming its task state and timeout around one path, ``_wait``:
native/'s WaitCore does the common case start to end (checks, queue, sleep, re-check,
jiffies), and hands everything it does not handle, untouched, to ``_wait_slow``, which
checks and reports in Python and then sleeps through the same WaitCore loop. No Python
code runs while the lock is held, so interrupt delivery, which runs Python handlers,
cannot interleave with it: the lock is taken "irqsave" by construction.

Context rules: complete*(), try_wait_for_completion(), completion_done() and the init
functions may be called from any context and never sleep. The waits sleep: process
context only (a wait from atomic or interrupt context is reported, even when it would
not block).
"""

from __future__ import annotations

from typing import Any

from . import bug, checks, image, preempt, records, task
from .constants import (
    ERESTARTSYS,
    MAX_SCHEDULE_TIMEOUT,
    TASK_IDLE,
    TASK_INTERRUPTIBLE,
    TASK_KILLABLE,
    TASK_UNINTERRUPTIBLE,
)
from .task import Task, current, task_from_slot
from .wait import QueueRecord, check_timeout


class Completion(QueueRecord):
    """``struct completion`` in shared memory, usable from every task: a wait queue
    head (wait.py) plus its counter ``done``.

    Created initialised (``done == 0``, no waiters). The handle may be inherited by
    kthreads or pickled to other tasks. The completion is freed when the handle that
    created it is garbage-collected in the creating process; using another handle on it
    afterwards raises :class:`emu.StaleObjectError` (the kernel's use-after-free).
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<Completion #{self.index} done={self._rec.done}>"

    def _what(self) -> str:
        return f"completion #{self.index}"

    @property
    def done(self) -> int:
        """The counter: completions posted and not yet consumed (UINT_MAX after complete_all)."""
        return int(self.rec.done)



def DECLARE_COMPLETION() -> Completion:
    """A new initialised completion."""
    return Completion()


_from_index = Completion._from_index


# --- the wait queue and the common case of every call live in native/'s WaitCore -----------
#
# Each call below hands (index, generation) to WaitCore, which checks that the handle is
# live and does the whole operation; it returns None, having changed nothing, when the
# handle is stale or (waits) when Python must check and report something first. A handle
# that is not a Completion fails at ``x._core``, before anything changed: the handler
# turns that AttributeError into the TypeError naming `x` (free on the success path).

def _check(x: object) -> None:
    """Raise the TypeError naming `x` unless it is a Completion (using it failed)."""
    if not isinstance(x, Completion):
        raise checks.not_a("x", "an emu.Completion", x) from None


def waiters(x: Completion) -> list[Task]:
    """The tasks queued on `x`, in the order complete() will wake them (drgn's
    completion_for_each_task()). A snapshot taken under the completion's lock; any
    context, never sleeps."""
    try:
        rec = x.rec
    except AttributeError:
        _check(x)
        raise
    img = image.this().img
    lock = image.field_addr(rec, "lock")
    slots: list[tuple[int, int]] = []
    records.raw_spin_lock(lock, "completion")
    try:
        slot = rec.head
        while slot >= 0 and len(slots) < len(img.tasks):
            slots.append((slot, img.tasks[slot].generation))
            slot = img.tasks[slot].wq_next
    finally:
        records.raw_spin_unlock(lock)
    return [task_from_slot(slot, gen) for slot, gen in slots]


# --- signalling ----------------------------------------------------------------------------

def complete(x: Completion) -> None:
    """Post one completion and wake the longest-waiting task, if any.

    ``done`` is incremented unless it is UINT_MAX (after complete_all()). Any context.
    """
    try:
        live = x._core.complete(x.index, x.generation, False)
    except AttributeError:
        _check(x)
        raise
    if live is None:
        x._stale()


def complete_all(x: Completion) -> None:
    """Let every current and future waiter through until reinit_completion().

    Sets ``done`` to UINT_MAX and wakes all queued waiters, in FIFO order, at once:
    the order in which they then run is the scheduler's, as in the kernel. A second
    complete_all() without reinit_completion() is reported with a WARN (the kernel
    documents it as a bug but does not check). Any context.
    """
    try:
        twice = x._core.complete(x.index, x.generation, True)
    except AttributeError:
        _check(x)
        raise
    if twice is None:
        x._stale()
    if twice:
        bug.warn("complete_all() called twice without reinit_completion()", depth=2)


def init_completion(x: Completion) -> None:
    """Reset ``done`` to 0 and the wait queue to empty.

    Waiters still queued are lost (never woken by complete()): that is reported with a
    WARN, as the kernel documentation calls it a bug.
    """
    try:
        lost = x._core.reset(x.index, x.generation, True)
    except AttributeError:
        _check(x)
        raise
    if lost is None:
        x._stale()
    if lost:
        bug.warn(f"init_completion() with {lost} waiter(s) queued: they are lost", depth=2)


def reinit_completion(x: Completion) -> None:
    """Reset ``done`` to 0, keeping the wait queue (for reuse after complete_all()).

    The caller must ensure no task is waiting: a reinit with waiters queued is reported
    with a WARN.
    """
    try:
        waiting = x._core.reset(x.index, x.generation, False)
    except AttributeError:
        _check(x)
        raise
    if waiting is None:
        x._stale()
    if waiting:
        bug.warn("reinit_completion() while tasks wait on the completion", depth=2)


# --- waiting: one path, native common case, Python slow path -------------------------------

def _wait(x: Completion, timeout: int, state: int) -> int:
    """__wait_for_common(): the jiffies left (at least 1) on success, 0 on time-out,
    -ERESTARTSYS when a signal ended the wait; `timeout` if done at entry.

    WaitCore.wait_for() does the common case (a live handle, a task in process context)
    entirely in native code; everything else goes through _wait_slow().
    """
    if task.sched_hook is not None:  # in a kworker
        return _wait_hooked(x, timeout, state, task.sched_hook)
    try:
        left = x._core.wait_for(x.index, x.generation, timeout, state)
    except AttributeError:
        _check(x)
        raise
    return _wait_slow(x, timeout, state) if left is None else left


def _wait_hooked(x: Completion, timeout: int, state: int, hook: Any) -> int:
    """_wait() in a kworker: the workqueue hears when it blocks and runs again."""
    _check(x)
    if x._rec.done:
        left = x._core.wait_for(x.index, x.generation, timeout, state)
        if left is not None:
            return int(left)
    hook(True)
    try:
        left = x._core.wait_for(x.index, x.generation, timeout, state)
        return _wait_slow(x, timeout, state) if left is None else left
    finally:
        hook(False)


def _wait_slow(x: Completion, timeout: int, state: int) -> int:
    """_wait() with the checks and reports: bad timeout, stale handle, not a task,
    atomic or IRQs-off context. Queueing and sleeping are WaitCore's, as in _wait()."""
    check_timeout(timeout)
    preempt.might_sleep(depth=4)
    index = x.live_index
    if preempt.in_atomic() and not x._rec.done:
        preempt.schedule_debug()
    left: int = x._core.wait(index, current().slot, timeout, state)
    if preempt.irqs_disabled():
        preempt.local_irq_enable()  # raw_spin_unlock_irq(): interrupts are on afterwards
    return left


def wait_for_completion(x: Completion) -> None:
    """Wait uninterruptibly (D) until `x` is completed. Not interrupted by signals."""
    _wait(x, MAX_SCHEDULE_TIMEOUT, TASK_UNINTERRUPTIBLE)


def wait_for_completion_io(x: Completion) -> None:
    """wait_for_completion(), accounted as I/O wait."""
    _wait(x, MAX_SCHEDULE_TIMEOUT, TASK_UNINTERRUPTIBLE)


def wait_for_completion_timeout(x: Completion, timeout: int) -> int:
    """Wait uninterruptibly for at most `timeout` jiffies.

    Returns 0 on time-out, else the jiffies left (at least 1); `timeout` itself if `x`
    was already completed at entry.
    """
    return _wait(x, timeout, TASK_UNINTERRUPTIBLE)


def wait_for_completion_io_timeout(x: Completion, timeout: int) -> int:
    """wait_for_completion_timeout(), accounted as I/O wait."""
    return _wait(x, timeout, TASK_UNINTERRUPTIBLE)


def wait_for_completion_interruptible(x: Completion) -> int:
    """Wait in S; returns 0 when completed, -ERESTARTSYS if a signal interrupted it."""
    t = _wait(x, MAX_SCHEDULE_TIMEOUT, TASK_INTERRUPTIBLE)
    return -ERESTARTSYS if t == -ERESTARTSYS else 0


def wait_for_completion_interruptible_timeout(x: Completion, timeout: int) -> int:
    """Wait in S for at most `timeout` jiffies: -ERESTARTSYS, 0 on time-out, or jiffies left."""
    return _wait(x, timeout, TASK_INTERRUPTIBLE)


def wait_for_completion_killable(x: Completion) -> int:
    """Wait in D (killable); returns 0 when completed, -ERESTARTSYS on SIGKILL."""
    t = _wait(x, MAX_SCHEDULE_TIMEOUT, TASK_KILLABLE)
    return -ERESTARTSYS if t == -ERESTARTSYS else 0


def wait_for_completion_killable_timeout(x: Completion, timeout: int) -> int:
    """Killable wait for at most `timeout` jiffies: -ERESTARTSYS, 0 on time-out, or jiffies left."""
    return _wait(x, timeout, TASK_KILLABLE)


def wait_for_completion_state(x: Completion, state: int) -> int:
    """Wait in `state` (e.g. TASK_IDLE): 0 when completed, -ERESTARTSYS if a signal ended it."""
    checks.check_int(state, "state", "unsigned int")
    if not state & (TASK_INTERRUPTIBLE | TASK_UNINTERRUPTIBLE):
        raise ValueError(f"state must be a sleeping TASK_* state, got {state!r}")
    t = _wait(x, MAX_SCHEDULE_TIMEOUT, state)
    return -ERESTARTSYS if t == -ERESTARTSYS else 0


def try_wait_for_completion(x: Completion) -> bool:
    """Consume one completion without sleeping: True if one was available. Any context."""
    try:
        ok = x._core.try_wait(x.index, x.generation)
    except AttributeError:
        _check(x)
        raise
    if ok is None:
        x._stale()
    return bool(ok)


def completion_done(x: Completion) -> bool:
    """True if a wait would not block (``done != 0``). Any context."""
    try:
        return bool(x.rec.done)
    except AttributeError:
        _check(x)
        raise


__all__ = [
    "Completion", "DECLARE_COMPLETION", "init_completion", "reinit_completion",
    "complete", "complete_all", "wait_for_completion", "wait_for_completion_io",
    "wait_for_completion_timeout", "wait_for_completion_io_timeout",
    "wait_for_completion_interruptible", "wait_for_completion_interruptible_timeout",
    "wait_for_completion_killable", "wait_for_completion_killable_timeout",
    "wait_for_completion_state", "try_wait_for_completion", "completion_done",
    "TASK_IDLE",
]
