"""Locks and atomics in the shared image, over native/'s owner-aware lock.

The raw locks here protect the emulator's own shared structures (task table,
completions, the log). Each records its holder's pid, so a holder that dies is
detected by the next acquirer, which takes the lock over; the recovery is reported
to the kernel log once the lock is released again.
"""

from __future__ import annotations

import os

from . import _native

#: Busy-wait iterations before sleeping on the futex (the "spin briefly" part).
SPINS = 200

_pid = os.getpid()
_recovered: list[tuple[str, int]] = []


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()
    _recovered.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def raw_spin_lock(addr: int, what: str = "raw") -> None:
    """Take the raw lock at `addr`, taking it over if its holder died.

    A takeover is reported (a WARN naming `what` and the dead pid) when the lock is
    released.
    """
    dead = _native.lock(addr, _pid, SPINS, -1)
    if dead > 0:
        _recovered.append((what, dead))


def raw_spin_trylock(addr: int) -> bool:
    """Take the lock at `addr` if it is free; never waits."""
    return bool(_native.trylock(addr, _pid))


def raw_spin_unlock(addr: int) -> None:
    """Release the lock at `addr`, which this process must hold."""
    if not _native.unlock(addr, _pid):
        raise RuntimeError(
            f"emu internal error: unlock of a raw lock held by pid {_native.lock_owner(addr)}"
        )
    if _recovered:
        _report_recovered()


def _report_recovered() -> None:
    from . import bug

    events = _recovered[:]
    _recovered.clear()
    for what, dead in events:
        bug.warn(f"emu: {what} lock taken over from dead task (pid {dead})", depth=3)
