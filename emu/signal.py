"""Emulated per-task signals (kernel/signal.c, include/linux/sched/signal.h).

These are bits in the task table plus a wake-up, never real OS signals. A kthread
takes no signals unless it called allow_signal(): others are dropped at send time and
the sender still gets 0, as in the kernel. The booting (user) task accepts every
signal; it is never killed by one, the signal just stays pending.
"""

from __future__ import annotations

import signal as _os_signal

from . import checks, image, records
from .constants import EINVAL, ESRCH, PF_EXITING, TASK_DEAD, TASK_INTERRUPTIBLE, TASK_WAKEKILL
from .task import Task, check_task, current, wake_up_state

SIGKILL = int(_os_signal.SIGKILL)
_NSIG = 64


def _bit(sig: int) -> int:
    return 1 << (sig - 1)


def _check_sig_type(sig: int, name: str = "sig") -> None:
    if not isinstance(sig, int) or isinstance(sig, bool):
        raise checks.not_a(name, "a signal number (int)", sig)


def _check_sig(sig: int, name: str = "sig") -> None:
    _check_sig_type(sig, name)
    if not 1 <= sig <= _NSIG:
        raise ValueError(f"{name} must be a signal number from 1 to {_NSIG}, got {sig}")


def _as_i64(bits: int) -> int:
    return bits - (1 << 64) if bits >= 1 << 63 else bits


def send_sig(sig: int, task: Task, priv: int) -> int:
    """Send `sig` to `task`: 0 on success (also when dropped), -EINVAL for a number
    that is not a signal, or -ESRCH if it is exiting.

    `priv` non-zero (an int or a bool) sends as the kernel (SEND_SIG_PRIV), which
    allow_kernel_signal() accepts. A queued signal wakes interruptible sleepers; SIGKILL
    also killable ones. Any context.
    """
    _check_sig_type(sig)
    check_task(task)
    if not isinstance(priv, int):
        raise checks.not_a("priv", "an int", priv)
    if not 1 <= sig <= _NSIG:
        return -EINVAL
    rec = task.rec
    if rec.flags & PF_EXITING or rec.state == TASK_DEAD:
        return -ESRCH
    if task.is_kthread:
        accepted = rec.sigallowed | (rec.sigkernel if priv else 0)
        if not accepted & _bit(sig):
            return 0
    records.field_or(rec, "sigpending", _as_i64(_bit(sig)))
    mask = TASK_INTERRUPTIBLE | (TASK_WAKEKILL if sig == SIGKILL else 0)
    wake_up_state(task, mask)
    return 0


def allow_signal(sig: int) -> None:
    """Let the current kthread receive `sig` (SIG_KTHREAD); it must consume it itself."""
    _check_sig(sig)
    rec = current().rec
    records.field_or(rec, "sigallowed", _as_i64(_bit(sig)))


def allow_kernel_signal(sig: int) -> None:
    """Let the current kthread receive `sig` only when the kernel sends it (priv != 0)."""
    _check_sig(sig)
    rec = current().rec
    records.field_or(rec, "sigkernel", _as_i64(_bit(sig)))


def disallow_signal(sig: int) -> None:
    """Ignore `sig` again and discard a pending instance of it."""
    _check_sig(sig)
    rec = current().rec
    keep = _as_i64(~_bit(sig) & ((1 << 64) - 1))
    records.field_and(rec, "sigallowed", keep)
    records.field_and(rec, "sigkernel", keep)
    records.field_and(rec, "sigpending", keep)


def signal_pending(task: Task) -> bool:
    """A signal is queued, or TIF_NOTIFY_SIGNAL is set (by kthread_stop)."""
    try:
        rec = task._rec
        return bool(rec.notify_signal or rec.sigpending)
    except AttributeError:  # only a task's slot has these fields
        check_task(task)
        raise


def fatal_signal_pending(task: Task) -> bool:
    """SIGKILL is queued for `task`."""
    try:
        return bool(task._rec.sigpending & _bit(SIGKILL))
    except AttributeError:
        check_task(task)
        raise


def signal_pending_state(state: int, task: Task) -> bool:
    """Would a pending signal end a sleep in `state`? (include/linux/sched/signal.h)"""
    return image.this().core.signal_pending_state(check_task(task).slot, state)


def flush_signals(task: Task) -> None:
    """Discard every pending signal of `task` (TIF_NOTIFY_SIGNAL stays)."""
    records.field_store(check_task(task).rec, "sigpending", 0)


def kernel_dequeue_signal() -> int:
    """Dequeue the lowest-numbered pending signal of the current task; 0 if none."""
    rec = current().rec
    while True:
        bits = records.field_load(rec, "sigpending") & ((1 << 64) - 1)
        if not bits:
            return 0
        low = bits & -bits
        old = _as_i64(bits)
        if records.field_cmpxchg(rec, "sigpending", old, _as_i64(bits & ~low)) == old:
            return low.bit_length()
