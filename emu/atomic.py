"""atomic_t and atomic64_t (include/linux/atomic.h): counters in the shared image,
lock-free from every task and context.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import _emu_native as _native

from . import checks, records


class Atomic(records.Record):
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
        """The value (``v->counter``), read atomically."""
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


def _atomic_ops(cls: type[Atomic]) -> dict[str, Any]:
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
        """Add 1 (wraps like the C type). Any context; never sleeps."""
        if type(v) is not cls:
            check(v)
        add_new(v.addr(), 1)

    def dec(v: Atomic) -> None:
        """Subtract 1 (wraps like the C type). Any context; never sleeps."""
        if type(v) is not cls:
            check(v)
        add_new(v.addr(), -1)

    def inc_return(v: Atomic) -> int:
        """Add 1; returns the new value. Any context; never sleeps."""
        if type(v) is not cls:
            check(v)
        return add_new(v.addr(), 1)

    def dec_return(v: Atomic) -> int:
        """Subtract 1; returns the new value. Any context; never sleeps."""
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
atomic_read: Callable[[Any], int] = _OPS32["atomic_read"]
atomic_set: Callable[[Any, int], None] = _OPS32["atomic_set"]
atomic_add: Callable[[int, Any], None] = _OPS32["atomic_add"]
atomic_sub: Callable[[int, Any], None] = _OPS32["atomic_sub"]
atomic_inc: Callable[[Any], None] = _OPS32["atomic_inc"]
atomic_dec: Callable[[Any], None] = _OPS32["atomic_dec"]
atomic_add_return: Callable[[int, Any], int] = _OPS32["atomic_add_return"]
atomic_sub_return: Callable[[int, Any], int] = _OPS32["atomic_sub_return"]
atomic_inc_return: Callable[[Any], int] = _OPS32["atomic_inc_return"]
atomic_dec_return: Callable[[Any], int] = _OPS32["atomic_dec_return"]
atomic_dec_and_test: Callable[[Any], bool] = _OPS32["atomic_dec_and_test"]
atomic_inc_and_test: Callable[[Any], bool] = _OPS32["atomic_inc_and_test"]
atomic_xchg: Callable[[Any, int], int] = _OPS32["atomic_xchg"]
atomic_cmpxchg: Callable[[Any, int, int], int] = _OPS32["atomic_cmpxchg"]
atomic64_read: Callable[[Any], int] = _OPS64["atomic64_read"]
atomic64_set: Callable[[Any, int], None] = _OPS64["atomic64_set"]
atomic64_add: Callable[[int, Any], None] = _OPS64["atomic64_add"]
atomic64_sub: Callable[[int, Any], None] = _OPS64["atomic64_sub"]
atomic64_inc: Callable[[Any], None] = _OPS64["atomic64_inc"]
atomic64_dec: Callable[[Any], None] = _OPS64["atomic64_dec"]
atomic64_add_return: Callable[[int, Any], int] = _OPS64["atomic64_add_return"]
atomic64_sub_return: Callable[[int, Any], int] = _OPS64["atomic64_sub_return"]
atomic64_inc_return: Callable[[Any], int] = _OPS64["atomic64_inc_return"]
atomic64_dec_return: Callable[[Any], int] = _OPS64["atomic64_dec_return"]
atomic64_dec_and_test: Callable[[Any], bool] = _OPS64["atomic64_dec_and_test"]
atomic64_inc_and_test: Callable[[Any], bool] = _OPS64["atomic64_inc_and_test"]
atomic64_xchg: Callable[[Any, int], int] = _OPS64["atomic64_xchg"]
atomic64_cmpxchg: Callable[[Any, int, int], int] = _OPS64["atomic64_cmpxchg"]


def ATOMIC_INIT(i: int) -> Atomic:
    """A new atomic_t holding `i`."""
    return Atomic(checks.check_int(i, "i", Atomic.CTYPE))
