"""spinlock_t in the shared image, over native/'s owner-aware lock
(include/linux/spinlock.h, kernel/locking/spinlock_debug.c).

The emulator's own raw lock is records.raw_spin_lock().
"""

from __future__ import annotations

import os
import time

import _emu_native as _native

from . import bug, checks, image, preempt, records
from .records import SPINS

_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


#: Seconds a lock may spin before a soft-lockup report (the kernel: 2 * watchdog_thresh).
SOFTLOCKUP_THRESH_DEFAULT = 20


class Spinlock(records.Record):
    """spinlock_t in shared memory: a lock that records its holder.

    Holding it is atomic context (preemption disabled). A holder that dies is detected
    and the lock taken over (reported with a WARN). Taking a lock this task already
    holds — e.g. from an interrupt handler that interrupted the holder, the classic bug
    the _irq variants exist for — is reported as the kernel's "spinlock recursion" BUG
    and ends the task instead of hanging; spinning longer than the soft-lockup threshold
    is reported as a soft lockup.
    """

    TABLE = "spinlocks"
    FIELD = "lock"
    __slots__ = ()

    def __repr__(self) -> str:
        owner = _native.lock_owner(self._addr)
        held = f"held by pid {owner}" if owner else "unlocked"
        return f"<Spinlock #{self.index} {held}>"


def DEFINE_SPINLOCK() -> Spinlock:
    """A new unlocked spinlock."""
    return Spinlock()


def spin_lock_init(lock: Spinlock) -> None:
    """Reset `lock` to unlocked."""
    _native.store32(_check_lock(lock), 0)


def _check_lock(lock: Spinlock) -> int:
    if not isinstance(lock, Spinlock):
        raise TypeError(f"lock must be an emu.Spinlock, not {type(lock).__name__}")
    return lock.addr()


def _lockup_ns() -> int:
    return int(image.this().img.hdr.softlockup_thresh_secs) * 1_000_000_000


def _acquire(lock: Spinlock) -> None:
    addr = _check_lock(lock)
    if _native.lock_owner(addr) == _pid:
        _spin_bug(lock, "recursion")
    start = time.monotonic_ns()
    dead = _native.lock(addr, _pid, SPINS, _lockup_ns())
    while dead == -1:
        _soft_lockup(lock, start)
        dead = _native.lock(addr, _pid, SPINS, _lockup_ns())
    if dead > 0:
        bug.warn(f"emu: spinlock taken over from dead task (pid {dead})", depth=3)
    _note_holder(lock)


def _note_holder(lock: Spinlock) -> None:
    lock._rec.owner_cpu = preempt.this_cpu()
    lock._rec.held_since_ns = time.monotonic_ns()


def _release(lock: Spinlock) -> None:
    addr = _check_lock(lock)
    if not _native.unlock(addr, _pid):
        _spin_bug(lock, "bad magic" if _native.lock_owner(addr) else "already unlocked")


def _spin_bug(lock: Spinlock, what: str) -> None:
    """spin_bug() (kernel/locking/spinlock_debug.c), then end the task instead of hanging."""
    owner = _native.lock_owner(lock._addr)
    pid, comm = preempt.current_pid_comm()
    bug.bug_splat(f"BUG: spinlock {what} on CPU#{preempt.this_cpu()}, {comm}/{pid}",
                  [f" lock: spinlock#{lock.index}, .magic: dead4ead, .owner: pid {owner}, "
                   f".owner_cpu: {lock._rec.owner_cpu}"], depth=3)
    if what == "recursion":
        bug.BUG(depth=3)


def _soft_lockup(lock: Spinlock, start: int) -> None:
    pid, comm = preempt.current_pid_comm()
    secs = (time.monotonic_ns() - start) // 1_000_000_000
    bug.bug_splat(
        f"watchdog: BUG: soft lockup - CPU#{preempt.this_cpu()} stuck for {secs}s! [{comm}:{pid}]",
        [f" waiting for spinlock#{lock.index} held by pid {_native.lock_owner(lock._addr)}"],
        depth=4, kind="soft_lockup",
    )


def spin_lock(lock: Spinlock) -> None:
    """Take `lock`, spinning; disables preemption until spin_unlock()."""
    _check_lock(lock)  # before touching the context
    preempt.preempt_disable()
    _acquire(lock)


def spin_unlock(lock: Spinlock) -> None:
    """Release `lock`, held by this task, and enable preemption. Any context."""
    _release(lock)
    preempt.preempt_enable()


def spin_trylock(lock: Spinlock) -> int:
    """Take `lock` if it is free: 1 if taken (then atomic context), 0 otherwise."""
    addr = _check_lock(lock)  # before touching the context
    preempt.preempt_disable()
    if _native.trylock(addr, _pid):
        _note_holder(lock)
        return 1
    preempt.preempt_enable()
    return 0


def spin_lock_irq(lock: Spinlock) -> None:
    """Disable interrupts, then spin_lock()."""
    _check_lock(lock)  # before touching the context
    preempt.local_irq_disable()
    spin_lock(lock)


def spin_unlock_irq(lock: Spinlock) -> None:
    """spin_unlock(), then enable interrupts unconditionally."""
    spin_unlock(lock)
    preempt.local_irq_enable()


def spin_lock_irqsave(lock: Spinlock) -> int:
    """Save and disable interrupts, then spin_lock(); returns the flags for the restore."""
    _check_lock(lock)  # before touching the context
    flags = preempt.local_irq_save()
    spin_lock(lock)
    return flags


def spin_unlock_irqrestore(lock: Spinlock, flags: int) -> None:
    """spin_unlock(), then restore the interrupt state saved by spin_lock_irqsave()."""
    if type(flags) is not int or not 0 <= flags <= checks.ULONG_MAX:
        checks.check_int(flags, "flags", "unsigned long")  # before the lock is released
    spin_unlock(lock)
    preempt.local_irq_restore(flags)


def spin_lock_bh(lock: Spinlock) -> None:
    """Disable bottom halves (softirqs, tasklets), then spin_lock()."""
    _check_lock(lock)  # before touching the context
    preempt.local_bh_disable()
    spin_lock(lock)


def spin_unlock_bh(lock: Spinlock) -> None:
    """spin_unlock(), then enable bottom halves (pending softirqs run). Any context."""
    spin_unlock(lock)
    preempt.local_bh_enable()


def spin_is_locked(lock: Spinlock) -> bool:
    """True if some task holds `lock`. Any context; never sleeps."""
    return _native.lock_owner(_check_lock(lock)) != 0
