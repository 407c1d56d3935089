"""Locks and atomics in the shared image, over native/'s owner-aware lock.

The raw locks here protect the emulator's own shared structures (task table, record
pools, the log, IRQ descriptors). They are always taken irqsave: an interrupt
handler (a Python signal handler, which may run between any two bytecodes) that
needed the same lock would otherwise deadlock on its own task. Each records its
holder's pid, so a holder that dies is detected by the next acquirer, which takes
the lock over; the takeover is reported once the lock is released again.
"""

from __future__ import annotations

import os
import time
from typing import Any

import _emu_native as _native

from . import bug, checks, image, preempt
from .errors import StaleObjectError

#: Busy-wait iterations before sleeping on the futex (the "spin briefly" part).
SPINS = _native.LOCK_SPINS

_pid = os.getpid()
_recovered: list[tuple[str, int]] = []
_irq_flags: list[int] = []  # saved interrupt states of the raw locks held, innermost last


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()
    _recovered.clear()
    _irq_flags.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def raw_spin_lock(addr: int, what: str = "raw") -> None:
    """Take the raw lock at `addr`, taking it over if its holder died.

    Interrupts are disabled until the matching raw_spin_unlock(). A takeover is
    reported (a WARN naming `what` and the dead pid) when the lock is released.
    """
    _irq_flags.append(preempt.local_irq_save())
    dead = _native.lock(addr, _pid, SPINS, -1)
    if dead > 0:
        _recovered.append((what, dead))


def raw_spin_unlock(addr: int) -> None:
    """Release the lock at `addr`, which this process must hold."""
    if not _native.unlock(addr, _pid):
        raise RuntimeError(
            f"emu internal error: unlock of a raw lock held by pid {_native.lock_owner(addr)}"
        )
    preempt.local_irq_restore(_irq_flags.pop())
    if _recovered:
        _report_recovered()


def _report_recovered() -> None:
    events = _recovered[:]
    _recovered.clear()
    for what, dead in events:
        report_dead_owner(what, dead, depth=4)


def report_dead_owner(what: str, pid: int, depth: int = 3) -> None:
    """Report a `what` lock taken over from dead task `pid` (also native/'s hook)."""
    bug.warn(f"emu: {what} lock taken over from dead task (pid {pid})", depth=depth)


# --- atomic_t / atomic64_t ---------------------------------------------------------------


class _Shared:
    """A record in one of the image's tables, freed with the handle that created it."""

    TABLE = ""
    __slots__ = ("index", "generation", "_img", "_rec", "_addr", "_owner", "__weakref__")

    def __init__(self) -> None:


        self.index, self.generation = image.alloc_record(self.TABLE)
        self._attach()
        self._owner = _pid

    def _attach(self) -> None:


        self._img = image.this()  # the kernel this handle belongs to
        self._rec = getattr(self._img.img, self.TABLE)[self.index]
        self._addr = image.field_addr(self._rec, self.FIELD)  # type: ignore[attr-defined]
        self._owner = 0

    @classmethod
    def _from_index(cls, index: int, generation: int) -> _Shared:
        obj = cls.__new__(cls)
        obj.index, obj.generation = index, generation
        obj._attach()
        return obj

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self)._from_index, (self.index, self.generation))

    def __eq__(self, other: object) -> bool:
        """Handles are equal when they name the same object (in any process)."""
        return (isinstance(other, _Shared) and type(other) is type(self)
                and other.index == self.index and other.generation == self.generation)

    def __hash__(self) -> int:
        return hash((type(self), self.index, self.generation))

    def __del__(self) -> None:


        if getattr(self, "_owner", 0) == _pid and image._this is getattr(self, "_img", None):
            image.free_record(self.TABLE, self.index, self.generation)

    def addr(self) -> int:
        """Address of the shared word; raises StaleObjectError once the object was freed."""
        if self._rec.generation != self.generation:
            raise StaleObjectError(
                f"{type(self).__name__} #{self.index} was freed: its creating handle was "
                "garbage-collected; keep it alive while other tasks use it"
            )
        return self._addr


class Atomic(_Shared):
    """atomic_t: a 32-bit counter in shared memory, lock-free from every task and context.

    Arithmetic wraps like a C int (atomic_inc() of INT_MAX gives INT_MIN); a value given
    to the constructor or an atomic_*() function must fit an int (ValueError otherwise).
    Pass the handle to kthreads (inherited or pickled).
    """

    TABLE = "atomics"
    FIELD = "value"
    CTYPE = "int"  # what atomic_t holds: the C type of every value argument
    __slots__ = ()
    _load = staticmethod(_native.load32)
    _store = staticmethod(_native.store32)
    _add = staticmethod(_native.add32)
    _xchg = staticmethod(_native.xchg32)
    _cmpxchg = staticmethod(_native.cmpxchg32)

    def __init__(self, value: int = 0) -> None:
        checks.check_int(value, "value", self.CTYPE)
        super().__init__()
        self._store(self._addr, value)

    @property
    def counter(self) -> int:
        return int(self._load(self.addr()))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} #{self.index} = {self.counter}>"


class Atomic64(Atomic):
    """atomic64_t: a 64-bit counter in shared memory (values are s64)."""

    CTYPE = "s64"
    __slots__ = ()
    _load = staticmethod(_native.load64)
    _store = staticmethod(_native.store64)
    _add = staticmethod(_native.add64)
    _xchg = staticmethod(_native.xchg64)
    _cmpxchg = staticmethod(_native.cmpxchg64)


def _atomic_ops(cls: type[Atomic]) -> dict[str, object]:
    """The atomic_*() (or atomic64_*()) functions, each checking its arguments (a `cls`,
    values that fit cls.CTYPE) before it changes anything.

    Each tests its arguments inline (no call) and calls check() only when that test
    fails; the native operations are bound here once and return ints. Together that
    keeps the checked calls as fast as the unchecked ones were.
    """
    name = "atomic64_t" if cls is Atomic64 else "atomic_t"
    ctype = cls.CTYPE
    lo, hi = checks.C_RANGES[ctype]
    load, store, add_new, exchange, compare_exchange = (
        cls._load, cls._store, cls._add, cls._xchg, cls._cmpxchg)

    def check(v: Atomic, i: int = 0, arg: str = "i") -> None:
        """Raise the error for `v` or for value `i` (argument `arg`); return if both are
        valid after all (an int subclass, such as an IntEnum, in range)."""
        if type(v) is not cls:
            raise checks.not_a("v", f"an emu.{cls.__name__} ({name})", v)
        checks.check_int(i, arg, ctype)

    def read(v: Atomic) -> int:
        """The value."""
        if type(v) is not cls:
            check(v)
        return load(v.addr())

    def set(v: Atomic, i: int) -> None:
        """Store `i`."""
        if type(v) is not cls or type(i) is not int or not lo <= i <= hi:
            check(v, i)
        store(v.addr(), i)

    def add_return(i: int, v: Atomic) -> int:
        """Add `i`; returns the new value."""
        if type(v) is not cls or type(i) is not int or not lo <= i <= hi:
            check(v, i)
        return add_new(v.addr(), i)

    def add(i: int, v: Atomic) -> None:
        """Add `i`."""
        if type(v) is not cls or type(i) is not int or not lo <= i <= hi:
            check(v, i)
        add_new(v.addr(), i)

    def sub(i: int, v: Atomic) -> None:
        """Subtract `i`."""
        if type(v) is not cls or type(i) is not int or not lo <= i <= hi:
            check(v, i)
        add_new(v.addr(), -i)

    def sub_return(i: int, v: Atomic) -> int:
        """Subtract `i`; returns the new value."""
        if type(v) is not cls or type(i) is not int or not lo <= i <= hi:
            check(v, i)
        return add_new(v.addr(), -i)

    def inc(v: Atomic) -> None:
        if type(v) is not cls:
            check(v)
        add_new(v.addr(), 1)

    def dec(v: Atomic) -> None:
        if type(v) is not cls:
            check(v)
        add_new(v.addr(), -1)

    def inc_return(v: Atomic) -> int:
        if type(v) is not cls:
            check(v)
        return add_new(v.addr(), 1)

    def dec_return(v: Atomic) -> int:
        if type(v) is not cls:
            check(v)
        return add_new(v.addr(), -1)

    def dec_and_test(v: Atomic) -> bool:
        """Decrement; True if the result is 0."""
        if type(v) is not cls:
            check(v)
        return add_new(v.addr(), -1) == 0

    def inc_and_test(v: Atomic) -> bool:
        """Increment; True if the result is 0."""
        if type(v) is not cls:
            check(v)
        return add_new(v.addr(), 1) == 0

    def xchg(v: Atomic, new: int) -> int:
        """Store `new`; returns the old value."""
        if type(v) is not cls or type(new) is not int or not lo <= new <= hi:
            check(v, new, "new")
        return exchange(v.addr(), new)

    def cmpxchg(v: Atomic, old: int, new: int) -> int:
        """Store `new` if the value is `old`; returns the value found (== old on success)."""
        if type(v) is not cls or type(old) is not int or not lo <= old <= hi:
            check(v, old, "old")
        if type(new) is not int or not lo <= new <= hi:
            check(v, new, "new")
        return compare_exchange(v.addr(), old, new)

    ops = {
        "read": read, "set": set, "add": add, "sub": sub, "inc": inc, "dec": dec,
        "add_return": add_return, "sub_return": sub_return, "inc_return": inc_return,
        "dec_return": dec_return, "dec_and_test": dec_and_test, "inc_and_test": inc_and_test,
        "xchg": xchg, "cmpxchg": cmpxchg,
    }
    prefix = "atomic64_" if cls is Atomic64 else "atomic_"
    for op, fn in ops.items():
        fn.__name__ = fn.__qualname__ = prefix + op
    return {prefix + op: fn for op, fn in ops.items()}


_OPS32 = _atomic_ops(Atomic)
_OPS64 = _atomic_ops(Atomic64)
atomic_read: Any = _OPS32["atomic_read"]
atomic_set: Any = _OPS32["atomic_set"]
atomic_add: Any = _OPS32["atomic_add"]
atomic_sub: Any = _OPS32["atomic_sub"]
atomic_inc: Any = _OPS32["atomic_inc"]
atomic_dec: Any = _OPS32["atomic_dec"]
atomic_add_return: Any = _OPS32["atomic_add_return"]
atomic_sub_return: Any = _OPS32["atomic_sub_return"]
atomic_inc_return: Any = _OPS32["atomic_inc_return"]
atomic_dec_return: Any = _OPS32["atomic_dec_return"]
atomic_dec_and_test: Any = _OPS32["atomic_dec_and_test"]
atomic_inc_and_test: Any = _OPS32["atomic_inc_and_test"]
atomic_xchg: Any = _OPS32["atomic_xchg"]
atomic_cmpxchg: Any = _OPS32["atomic_cmpxchg"]
atomic64_read: Any = _OPS64["atomic64_read"]
atomic64_set: Any = _OPS64["atomic64_set"]
atomic64_add: Any = _OPS64["atomic64_add"]
atomic64_sub: Any = _OPS64["atomic64_sub"]
atomic64_inc: Any = _OPS64["atomic64_inc"]
atomic64_dec: Any = _OPS64["atomic64_dec"]
atomic64_add_return: Any = _OPS64["atomic64_add_return"]
atomic64_sub_return: Any = _OPS64["atomic64_sub_return"]
atomic64_inc_return: Any = _OPS64["atomic64_inc_return"]
atomic64_dec_return: Any = _OPS64["atomic64_dec_return"]
atomic64_dec_and_test: Any = _OPS64["atomic64_dec_and_test"]
atomic64_inc_and_test: Any = _OPS64["atomic64_inc_and_test"]
atomic64_xchg: Any = _OPS64["atomic64_xchg"]
atomic64_cmpxchg: Any = _OPS64["atomic64_cmpxchg"]


def ATOMIC_INIT(i: int) -> Atomic:
    """A new atomic_t holding `i`."""
    return Atomic(checks.check_int(i, "i", Atomic.CTYPE))


# --- spinlock_t -----------------------------------------------------------------------------

#: Seconds a lock may spin before a soft-lockup report (the kernel: 2 * watchdog_thresh).
SOFTLOCKUP_THRESH_DEFAULT = 20


class Spinlock(_Shared):
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
    pid, comm = preempt._who()
    bug.bug_splat(f"BUG: spinlock {what} on CPU#{preempt.this_cpu()}, {comm}/{pid}",
                  [f" lock: spinlock#{lock.index}, .magic: dead4ead, .owner: pid {owner}, "
                   f".owner_cpu: {lock._rec.owner_cpu}"], depth=3)
    if what == "recursion":
        bug.BUG(depth=3)


def _soft_lockup(lock: Spinlock, start: int) -> None:
    pid, comm = preempt._who()
    secs = (time.monotonic_ns() - start) // 1_000_000_000
    bug.bug_splat(
        f"watchdog: BUG: soft lockup - CPU#{preempt.this_cpu()} stuck for {secs}s! [{comm}:{pid}]",
        [f" waiting for spinlock#{lock.index} held by pid {_native.lock_owner(lock._addr)}"],
        depth=4,
    )


def spin_lock(lock: Spinlock) -> None:
    """Take `lock`, spinning; disables preemption until spin_unlock()."""
    _check_lock(lock)  # before touching the context
    preempt.preempt_disable()
    _acquire(lock)


def spin_unlock(lock: Spinlock) -> None:
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
    spin_unlock(lock)
    preempt.local_bh_enable()


def spin_is_locked(lock: Spinlock) -> bool:
    return _native.lock_owner(_check_lock(lock)) != 0
