"""Sleeping: schedule(), schedule_timeout*(), msleep*(), jiffies (kernel/time/sleep_timeout.c).

Time is CLOCK_MONOTONIC since boot. A timed sleep of `t` jiffies lasts at least
t/HZ seconds (the kernel's timer may fire up to a jiffy early relative to the call);
the time left is returned in whole jiffies, rounded up.
"""

from __future__ import annotations

import signal as _os_signal
import time
from typing import Any

from . import bug, checks, image, preempt
from .constants import (
    MAX_SCHEDULE_TIMEOUT,
    TASK_IDLE,
    TASK_INTERRUPTIBLE,
    TASK_KILLABLE,
    TASK_RUNNING,
    TASK_UNINTERRUPTIBLE,
    UINT_MAX,
)
from .printk import log_store
from .signal import signal_pending, signal_pending_state
from .task import (
    WCHAN_MSLEEP,
    WCHAN_SCHEDULE,
    WCHAN_SCHEDULE_TIMEOUT,
    WCHAN_USLEEP_RANGE,
    current,
    current_state,
    set_current_state,
    sleep,
    wchan_enter,
    wchan_exit,
)

#: jiffies value at boot. Linux starts at -300 s to expose wrap bugs; emu starts at 0.
INITIAL_JIFFIES = 0
#: Sleeps at least this long (~146 years) get no timer at all.
FOREVER_NS = 1 << 62


def _hz() -> int:
    return int(image.this().img.hdr.hz)


def jiffies() -> int:
    """Ticks of 1/HZ s since boot."""
    hdr = image.this().img.hdr
    return (time.monotonic_ns() - hdr.boot_ns) * hdr.hz // 1_000_000_000 + INITIAL_JIFFIES


def _check_count(value: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")


def msecs_to_jiffies(m: int) -> int:
    """Milliseconds to jiffies, rounded up (include/linux/jiffies.h)."""
    _check_count(m, "m")
    return -((-m * _hz()) // 1000)


def usecs_to_jiffies(u: int) -> int:
    """Microseconds to jiffies, rounded up."""
    _check_count(u, "u")
    return -((-u * _hz()) // 1_000_000)


def jiffies_to_msecs(j: int) -> int:
    """Jiffies to milliseconds (exact when HZ divides 1000)."""
    _check_count(j, "j")
    hz = _hz()
    if 1000 % hz == 0:
        return j * (1000 // hz)
    if hz % 1000 == 0:
        return -(-j // (hz // 1000))
    return j * 1000 // hz


def schedule() -> None:
    """Sleep in the current state until woken; return at once if TASK_RUNNING.

    A pending signal that would interrupt the current state makes it return at once
    with the state reset to TASK_RUNNING (signal_pending_state()).
    """
    me = current()
    state = current_state()
    if state == TASK_RUNNING:
        return
    if signal_pending_state(state, me):
        set_current_state(TASK_RUNNING)
        return
    preempt.schedule_debug()
    sleep(None, WCHAN_SCHEDULE)


def schedule_timeout(timeout: int) -> int:
    """Sleep in the current state for at most `timeout` jiffies.

    Returns 0 if the time ran out, else the jiffies left (never negative); the state is
    TASK_RUNNING on return. MAX_SCHEDULE_TIMEOUT sleeps without a timer and returns
    MAX_SCHEDULE_TIMEOUT. A negative timeout is reported ("wrong timeout value") and
    returns 0 at once.
    """
    checks.check_int(timeout, "timeout", "long")
    me = current()
    if timeout == MAX_SCHEDULE_TIMEOUT:
        prev = wchan_enter(WCHAN_SCHEDULE_TIMEOUT)
        try:
            schedule()
        finally:
            wchan_exit(prev)
        return MAX_SCHEDULE_TIMEOUT
    if timeout < 0:
        log_store(3, "\n".join([f"schedule_timeout: wrong timeout value "
                                f"{timeout & 0xFFFFFFFFFFFFFFFF:x}",
                                *bug.stack_lines(bug._caller(1))]))
        set_current_state(TASK_RUNNING)
        return 0
    core = image.this().core
    length = core.timeout_ns(timeout)  # -1: too long for a timer
    deadline = None if length < 0 else time.monotonic_ns() + length
    state = current_state()
    if state != TASK_RUNNING:
        if signal_pending_state(state, me):
            set_current_state(TASK_RUNNING)
        else:
            preempt.schedule_debug()
            sleep(deadline, WCHAN_SCHEDULE_TIMEOUT)
    if deadline is None:
        return timeout
    return core.jiffies_left(deadline - time.monotonic_ns())


def _schedule_timeout_state(state: int, timeout: int) -> int:
    checks.check_int(timeout, "timeout", "long")  # before the state changes
    set_current_state(state)
    return schedule_timeout(timeout)


def schedule_timeout_interruptible(timeout: int) -> int:
    """schedule_timeout() in TASK_INTERRUPTIBLE: a signal ends it early."""
    return _schedule_timeout_state(TASK_INTERRUPTIBLE, timeout)


def schedule_timeout_killable(timeout: int) -> int:
    """schedule_timeout() in TASK_KILLABLE: only SIGKILL ends it early."""
    return _schedule_timeout_state(TASK_KILLABLE, timeout)


def schedule_timeout_uninterruptible(timeout: int) -> int:
    """schedule_timeout() in TASK_UNINTERRUPTIBLE: only an explicit wake-up ends it early."""
    return _schedule_timeout_state(TASK_UNINTERRUPTIBLE, timeout)


def schedule_timeout_idle(timeout: int) -> int:
    """schedule_timeout() in TASK_IDLE (uninterruptible, not a hung-task candidate)."""
    return _schedule_timeout_state(TASK_IDLE, timeout)


def _check_msecs(msecs: int) -> None:
    _check_count(msecs, "msecs")
    if msecs > UINT_MAX:
        raise ValueError(f"msecs must fit an unsigned int (<= {UINT_MAX}), got {msecs}")


def msleep(msecs: int) -> None:
    """Sleep uninterruptibly (D) for at least `msecs` ms, rounded up to whole jiffies."""
    _check_msecs(msecs)
    timeout = msecs_to_jiffies(msecs)
    prev = wchan_enter(WCHAN_MSLEEP)
    try:
        while timeout:
            timeout = schedule_timeout_uninterruptible(timeout)
    finally:
        wchan_exit(prev)


def msleep_interruptible(msecs: int) -> int:
    """Sleep in S for `msecs` ms unless a signal is pending.

    Returns the ms left, 0 if it slept fully.
    """
    _check_msecs(msecs)
    timeout = msecs_to_jiffies(msecs)
    me = current()
    prev = wchan_enter(WCHAN_MSLEEP)
    try:
        while timeout and not signal_pending(me):
            timeout = schedule_timeout_interruptible(timeout)
    finally:
        wchan_exit(prev)
    return jiffies_to_msecs(timeout)


def ssleep(seconds: int) -> None:
    """msleep(seconds * 1000)."""
    _check_count(seconds, "seconds")
    if seconds > UINT_MAX // 1000:
        raise ValueError(f"seconds must be at most UINT_MAX / 1000 = {UINT_MAX // 1000}, "
                         f"got {seconds}")
    msleep(seconds * 1000)


def usleep_range(min_us: int, max_us: int) -> None:
    """Sleep uninterruptibly for at least `min_us` µs (high resolution, never returns early)."""
    _check_count(min_us, "min_us")
    _check_count(max_us, "max_us")
    if max_us < min_us:
        raise ValueError(f"max_us ({max_us}) must not be less than min_us ({min_us})")
    current()
    deadline = time.monotonic_ns() + min_us * 1000
    preempt.might_sleep()
    while time.monotonic_ns() < deadline:
        set_current_state(TASK_UNINTERRUPTIBLE)
        sleep(deadline, WCHAN_USLEEP_RANGE)
    set_current_state(TASK_RUNNING)


# --- sched_show_task(): a task prints its own stack on request -------------------------------

#: Sent by khungtaskd (the supervisor) to a hung task: print your call trace.
SIG_SHOW_STACK = _os_signal.SIGRTMIN + 2


def _show_stack(signum: int, frame: Any) -> None:
    # Runs inside the task's sleep (the wait goes on afterwards), or between bytecodes.
    bug.show_stack_reply(frame)


def install_show_stack() -> None:
    """Let the supervisor ask this task for its stack (boot and kthread start-up)."""
    _os_signal.signal(SIG_SHOW_STACK, _show_stack)
