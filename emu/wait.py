"""Wait queues (kernel/sched/wait.c, include/linux/wait.h): the one parking lot of emu.

A wait queue head is a lock and a list of task slots in the shared image; native/'s
WaitCore does the queueing, the sleeping and the waking. Completions are its first
user (a completion is a queue head plus its ``done`` counter, as completion.c on
swait), and every other wait in emu where a task waits for another task's event is a
``wait_event()`` on a queue head.

Queue discipline (the kernel's): a non-exclusive waiter is queued at the head, an
exclusive one at the tail; a wake-up walks from the head, wakes every non-exclusive
waiter whose sleep state it may end, and the first ``nr`` exclusive ones, in FIFO
order. A woken waiter is dequeued; one its wake-up may not end (``wake_up_interruptible()``
on a ``wait_event()`` sleeper) stays queued and uses up nothing.

Context rules: ``wake_up*()`` and ``waitqueue_active()`` may be called from any
context and never sleep. The ``wait_event*()`` forms sleep: process context only (a
call from atomic or interrupt context is reported, even when the condition is true).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import _emu_native as _native

from . import bug, checks, image, preempt, records, task
from .constants import (
    ERESTARTSYS,
    MAX_SCHEDULE_TIMEOUT,
    TASK_IDLE,
    TASK_INTERRUPTIBLE,
    TASK_KILLABLE,
    TASK_NORMAL,
    TASK_UNINTERRUPTIBLE,
)
from .errors import StaleObjectError
from .task import current

WQ_FLAG_EXCLUSIVE = _native.WQ_FLAG_EXCLUSIVE

Condition = Callable[[], object]


class QueueRecord(records.Record):
    """A record of the image's queue-head table: a lock and a FIFO of task slots.

    The base of :class:`WaitQueueHead` and of ``emu.Completion``. Freed when the handle
    that created it is garbage-collected in the creating process; other handles on it
    then raise :class:`emu.StaleObjectError`.
    """

    TABLE = "completions"
    __slots__ = ("_core",)

    def _init_record(self, rec: Any) -> None:
        rec.head = rec.tail = -1
        # For WCHAN and hung-task reports: where the user's code made it.
        rec.site = bug.caller_site().encode("utf-8", "replace")[-image.SITE_LEN:]

    def _attach(self) -> None:
        super()._attach()
        self._core: Any = self._img.core

    def _free(self) -> None:
        rec = self._rec
        if rec.generation == self.generation and rec.head != -1:
            bug.warn(f"{self._what()} freed while tasks wait on it", depth=3)
            return
        super()._free()

    def _what(self) -> str:
        return f"{type(self).__name__.lower()} #{self.index}"

    @property
    def rec(self) -> Any:
        """The record; raises StaleObjectError once it was freed."""
        rec = self._rec
        if rec.generation != self.generation:  # freeing bumps the generation
            self._stale()
        return rec

    @property
    def live_index(self) -> int:
        """The index in the table; raises StaleObjectError once freed."""
        if self._rec.generation != self.generation:
            self._stale()
        return self.index

    def _stale(self) -> None:
        raise StaleObjectError(
            f"{self._what()} was freed: its creating handle was garbage-collected; keep it "
            "alive while other tasks use it"
        )


class WaitQueueHead(QueueRecord):
    """``wait_queue_head_t`` in shared memory, usable from every task.

    Created initialised (no waiters). The handle may be inherited by kthreads or
    pickled to other tasks, and captured by callbacks.
    """

    __slots__ = ()

    def _what(self) -> str:
        return f"wait queue #{self.index}"

    def __repr__(self) -> str:
        return f"<WaitQueueHead #{self.index}>"


def DECLARE_WAIT_QUEUE_HEAD() -> WaitQueueHead:
    """A new initialised wait queue head."""
    return WaitQueueHead()


def init_waitqueue_head(wq_head: WaitQueueHead) -> None:
    """(Re)initialise `wq_head` to empty; tasks still queued are lost (a WARN)."""
    _check(wq_head)
    lost = wq_head._core.reset(wq_head.index, wq_head.generation, True)
    if lost is None:
        wq_head._stale()
    if lost:
        bug.warn(f"init_waitqueue_head() with {lost} waiter(s) queued: they are lost", depth=2)


def _check(wq_head: object) -> None:
    if not isinstance(wq_head, WaitQueueHead):
        raise checks.not_a("wq_head", "an emu.WaitQueueHead", wq_head) from None


def remove_waiter(q: QueueRecord, slot: int) -> bool:
    """Unlink task `slot` from queue `q` wherever it is; False if it was not queued."""
    return bool(q._core.remove_waiter(q.index, slot))


# --- waking ---------------------------------------------------------------------------------

def __wake_up(wq_head: WaitQueueHead, mode: int, nr: int) -> int:
    """Wake the waiters `mode` may wake: every non-exclusive one and `nr` exclusive
    ones (0: all). Returns the number of exclusive waiters woken. Any context."""
    if type(wq_head) is not WaitQueueHead:
        _check(wq_head)
    try:
        n = wq_head._core.wake_up(wq_head.index, wq_head.generation, mode, nr)
    except AttributeError:
        _check(wq_head)
        raise
    if n is None:
        wq_head._stale()
    return int(n)


def wake_up(wq_head: WaitQueueHead) -> None:
    """Wake all non-exclusive waiters and the longest-waiting exclusive one. Any context."""
    __wake_up(wq_head, TASK_NORMAL, 1)


def wake_up_nr(wq_head: WaitQueueHead, nr: int) -> None:
    """Wake all non-exclusive waiters and the `nr` longest-waiting exclusive ones
    (``nr == 0``: all of them, as the kernel's loop never reaches 0). Any context."""
    checks.check_int(nr, "nr", "int")
    if nr < 0:
        raise ValueError(f"nr must not be negative, got {nr}")
    __wake_up(wq_head, TASK_NORMAL, nr)


def wake_up_all(wq_head: WaitQueueHead) -> None:
    """Wake every waiter, exclusive or not, in queue order. Any context."""
    __wake_up(wq_head, TASK_NORMAL, 0)


def wake_up_interruptible(wq_head: WaitQueueHead) -> None:
    """wake_up() of TASK_INTERRUPTIBLE sleepers only: ``wait_event()``,
    ``wait_event_killable()`` sleepers stay asleep and queued. Any context."""
    __wake_up(wq_head, TASK_INTERRUPTIBLE, 1)


def wake_up_interruptible_nr(wq_head: WaitQueueHead, nr: int) -> None:
    """wake_up_nr() of TASK_INTERRUPTIBLE sleepers only. Any context."""
    checks.check_int(nr, "nr", "int")
    __wake_up(wq_head, TASK_INTERRUPTIBLE, nr)


def wake_up_interruptible_all(wq_head: WaitQueueHead) -> None:
    """wake_up_all() of TASK_INTERRUPTIBLE sleepers only. Any context."""
    __wake_up(wq_head, TASK_INTERRUPTIBLE, 0)


def waitqueue_active(wq_head: WaitQueueHead) -> bool:
    """True if a task is queued (lockless, as the kernel's: a waker that tests it
    before waking must order its condition store before the test). Any context."""
    try:
        return bool(wq_head.rec.head != -1)
    except AttributeError:
        _check(wq_head)
        raise


# --- waiting: one path, native common case, Python slow path --------------------------------

def ___wait_event(wq_head: WaitQueueHead, condition: Condition, timeout: int, state: int,
                  exclusive: bool) -> int:
    """The loop of every wait_event*() form (include/linux/wait.h's ___wait_event()).

    Returns `timeout` (1 if 0) when `condition` is true at entry, else the jiffies left
    (at least 1) once it became true, 0 if the time ran out with it false, -ERESTARTSYS
    if a signal `state` admits ended the wait (a true condition wins over both).
    """
    if type(wq_head) is not WaitQueueHead:
        _check(wq_head)
    hook = task.sched_hook
    if hook is not None:  # in a kworker
        return _wait_event_hooked(wq_head, condition, timeout, state, exclusive, hook)
    return _wait_event(wq_head, condition, timeout, state, exclusive)


def _wait_event_hooked(wq_head: WaitQueueHead, condition: Condition, timeout: int, state: int,
                       exclusive: bool, hook: Callable[[bool], None]) -> int:
    """___wait_event() in a kworker: the workqueue hears when it blocks and runs again
    (wq_worker_sleeping()), so that a sleeping work item does not hold up its pool."""
    if condition():
        return _wait_event(wq_head, condition, timeout, state, exclusive)
    hook(True)
    try:
        return _wait_event(wq_head, condition, timeout, state, exclusive)
    finally:
        hook(False)


def _wait_event(wq_head: WaitQueueHead, condition: Condition, timeout: int, state: int,
                exclusive: bool) -> int:
    try:
        left = wq_head._core.wait_event(wq_head.index, wq_head.generation, condition, timeout,
                                        state, exclusive)
    except AttributeError:
        _check(wq_head)
        raise
    if left is None:
        return _wait_event_slow(wq_head, condition, timeout, state, exclusive)
    return int(left)


def _wait_event_slow(wq_head: WaitQueueHead, condition: Condition, timeout: int, state: int,
                     exclusive: bool) -> int:
    """___wait_event() with the checks and reports (bad arguments, stale handle, atomic
    or IRQs-off context); queueing and sleeping are WaitCore's as on the fast path."""
    if not callable(condition):
        raise checks.not_a("condition", "callable", condition)
    check_timeout(timeout)
    preempt.might_sleep(depth=4)
    index = wq_head.live_index
    return int(wq_head._core.wait_event_slow(index, current().slot, condition, timeout, state,
                                             exclusive))


def check_timeout(timeout: int) -> None:
    """TypeError unless `timeout` is an int, ValueError unless 0..MAX_SCHEDULE_TIMEOUT."""
    if not isinstance(timeout, int) or isinstance(timeout, bool):
        raise TypeError(f"timeout must be an int number of jiffies, not {type(timeout).__name__}")
    if not 0 <= timeout <= MAX_SCHEDULE_TIMEOUT:
        raise ValueError(
            f"timeout must be between 0 and MAX_SCHEDULE_TIMEOUT jiffies, got {timeout}"
        )


def _status(ret: int) -> int:
    return -ERESTARTSYS if ret == -ERESTARTSYS else 0


def wait_event(wq_head: WaitQueueHead, condition: Condition) -> None:
    """Sleep uninterruptibly (D) until `condition()` is true; it is evaluated before
    sleeping and after every wake-up of this task on `wq_head`."""
    ___wait_event(wq_head, condition, MAX_SCHEDULE_TIMEOUT, TASK_UNINTERRUPTIBLE, False)


def wait_event_timeout(wq_head: WaitQueueHead, condition: Condition, timeout: int) -> int:
    """wait_event() for at most `timeout` jiffies: 0 if `condition` is still false after
    the timeout, 1 if it became true as the time ran out, else the jiffies left."""
    return ___wait_event(wq_head, condition, timeout, TASK_UNINTERRUPTIBLE, False)


def wait_event_interruptible(wq_head: WaitQueueHead, condition: Condition) -> int:
    """wait_event() in S: 0 once `condition` is true, -ERESTARTSYS if a signal ended it."""
    return _status(___wait_event(wq_head, condition, MAX_SCHEDULE_TIMEOUT,
                                 TASK_INTERRUPTIBLE, False))


def wait_event_interruptible_timeout(wq_head: WaitQueueHead, condition: Condition,
                                     timeout: int) -> int:
    """wait_event_timeout() in S: -ERESTARTSYS, 0 on time-out, or the jiffies left (>= 1)."""
    return ___wait_event(wq_head, condition, timeout, TASK_INTERRUPTIBLE, False)


def wait_event_interruptible_exclusive(wq_head: WaitQueueHead, condition: Condition) -> int:
    """wait_event_interruptible() as an exclusive waiter (queued at the tail, woken one
    per wake_up() in FIFO order): 0 or -ERESTARTSYS."""
    return _status(___wait_event(wq_head, condition, MAX_SCHEDULE_TIMEOUT,
                                 TASK_INTERRUPTIBLE, True))


def wait_event_killable(wq_head: WaitQueueHead, condition: Condition) -> int:
    """wait_event() in D that SIGKILL ends: 0 or -ERESTARTSYS."""
    return _status(___wait_event(wq_head, condition, MAX_SCHEDULE_TIMEOUT, TASK_KILLABLE, False))


def wait_event_killable_timeout(wq_head: WaitQueueHead, condition: Condition,
                                timeout: int) -> int:
    """wait_event_timeout() that SIGKILL ends: -ERESTARTSYS, 0 on time-out, or jiffies left."""
    return ___wait_event(wq_head, condition, timeout, TASK_KILLABLE, False)


def wait_event_idle(wq_head: WaitQueueHead, condition: Condition) -> None:
    """wait_event() in I (not counted as load, never a hung task)."""
    ___wait_event(wq_head, condition, MAX_SCHEDULE_TIMEOUT, TASK_IDLE, False)


def wait_event_idle_timeout(wq_head: WaitQueueHead, condition: Condition, timeout: int) -> int:
    """wait_event_timeout() in I."""
    return ___wait_event(wq_head, condition, timeout, TASK_IDLE, False)


__all__ = [
    "WaitQueueHead", "DECLARE_WAIT_QUEUE_HEAD", "init_waitqueue_head",
    "wait_event", "wait_event_timeout", "wait_event_interruptible",
    "wait_event_interruptible_timeout", "wait_event_interruptible_exclusive",
    "wait_event_killable", "wait_event_killable_timeout", "wait_event_idle",
    "wait_event_idle_timeout", "wake_up", "wake_up_nr", "wake_up_all",
    "wake_up_interruptible", "wake_up_interruptible_nr", "wake_up_interruptible_all",
    "waitqueue_active", "WQ_FLAG_EXCLUSIVE",
]


# --- waiting on a variable (kernel/sched/wait_bit.c) ----------------------------------------
#
# A task that waits for another task to change a word of the image (a flag, a count)
# sleeps on one of a few queue heads hashed by the word's address, as the kernel's
# wait_var_event()/wake_up_var() do; the changer wakes that head after the change.

#: Queue heads of the hashed table, the first records of the table, made at boot.
VAR_WAIT_TABLE_SIZE = 16


def var_wait_table_init() -> list[WaitQueueHead]:
    """Make the hashed table's heads (boot, before any other queue head); the booting
    process keeps the handles for the kernel's lifetime."""
    heads = [WaitQueueHead() for _ in range(VAR_WAIT_TABLE_SIZE)]
    if [h.index for h in heads] != list(range(VAR_WAIT_TABLE_SIZE)):
        raise RuntimeError("emu internal error: the var-wait table must come first")
    return heads


def var_waitqueue(var: int) -> WaitQueueHead:
    """__var_waitqueue(): the wait queue head that the variable at `var` hashes to."""
    img = image.this()
    heads: list[WaitQueueHead] | None = img.var_wait
    if heads is None:
        table = getattr(img.img, QueueRecord.TABLE)
        heads = img.var_wait = [WaitQueueHead._from_index(i, table[i].generation)
                                for i in range(VAR_WAIT_TABLE_SIZE)]
    return heads[(var * 0x9E3779B1 >> 7) % VAR_WAIT_TABLE_SIZE]


def wait_var_event(var: int, condition: Condition) -> None:
    """Sleep in D until `condition()` is true, woken by wake_up_var(`var`) (an address
    in the image). Other variables hashed to the same head wake it spuriously: the
    condition is re-evaluated, as for every wait_event()."""
    ___wait_event(var_waitqueue(var), condition, MAX_SCHEDULE_TIMEOUT,
                  TASK_UNINTERRUPTIBLE, False)


def wait_var_event_timeout(var: int, condition: Condition, timeout: int) -> int:
    """wait_var_event() for at most `timeout` jiffies; wait_event_timeout()'s result."""
    return ___wait_event(var_waitqueue(var), condition, timeout, TASK_UNINTERRUPTIBLE, False)


def wake_up_var(var: int) -> None:
    """Wake the tasks waiting for the variable at `var` (after changing it, with a full
    barrier: emu's atomics are). Any context; costs a look at the head when none waits."""
    wq = var_waitqueue(var)
    if wq._rec.head != -1:
        wake_up_all(wq)
