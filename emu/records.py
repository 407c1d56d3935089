"""The emulator's own raw lock, the record pools, and the handle on a pooled record.

The raw lock protects the emulator's shared structures (task table, record pools, the
log, IRQ descriptors). It is always taken irqsave: an interrupt handler (a Python signal
handler, which may run between any two bytecodes) that needed the same lock would
otherwise deadlock on its own task. It records its holder's pid, so a holder that dies
is detected by the next acquirer, which takes the lock over; the takeover is reported,
through the hook that bug.py registers, once the lock is released again.

Records (completions, atomics, spinlocks, tasklets) live in fixed tables of the image,
each with a free list; a :class:`Record` is the handle on one of them.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any, TypeVar

import _emu_native as _native

from . import image, irqflags
from .errors import CapacityError, StaleObjectError

#: Busy-wait iterations before sleeping on the futex (the "spin briefly" part).
SPINS = _native.LOCK_SPINS

_pid = os.getpid()
_recovered: list[tuple[str, int]] = []
_irq_flags: list[int] = []  # saved interrupt states of the raw locks held, innermost last
#: report_dead_owner(what, pid, depth): set by bug.py, which sits above this module.
_dead_owner_hook: Callable[[str, int, int], None] | None = None


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()
    _recovered.clear()
    _irq_flags.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def set_dead_owner_hook(hook: Callable[[str, int, int], None]) -> None:
    """Make `hook(what, pid, depth)` the report of a raw lock taken over from dead `pid`.

    bug.py registers its WARN here when it is imported; until then takeovers are dropped.
    """
    global _dead_owner_hook
    _dead_owner_hook = hook


def raw_spin_lock(addr: int, what: str = "raw") -> None:
    """Take the raw lock at `addr`, taking it over if its holder died.

    Interrupts are disabled until the matching raw_spin_unlock(). A takeover is
    reported (a WARN naming `what` and the dead pid) when the lock is released.
    Callable from any context; spins, then sleeps on a futex, but never schedules.
    """
    _irq_flags.append(irqflags.local_irq_save())
    dead = _native.lock(addr, _pid, SPINS, -1)
    if dead > 0:
        _recovered.append((what, dead))


def raw_spin_unlock(addr: int) -> None:
    """Release the lock at `addr`, which this process must hold; restores interrupts."""
    if not _native.unlock(addr, _pid):
        raise RuntimeError(
            f"emu internal error: unlock of a raw lock held by pid {_native.lock_owner(addr)}"
        )
    irqflags.local_irq_restore(_irq_flags.pop())
    if _recovered:
        _report_recovered()


def _report_recovered() -> None:
    events = _recovered[:]
    _recovered.clear()
    if _dead_owner_hook is not None:
        for what, dead in events:
            _dead_owner_hook(what, dead, 4)


# --- record pools -------------------------------------------------------------------------


def alloc_record(table: str) -> tuple[int, int]:
    """Reserve a free record of `table` ("completions", "atomics", "spinlocks", ...).

    Returns (index, generation). The record is zeroed but for its bookkeeping fields.
    Raises CapacityError naming the boot parameter when the table is full.
    """
    img = image.this()
    pool = getattr(img.img.hdr, f"{table}_pool")
    records = getattr(img.img, table)
    lock = image.field_addr(pool, "lock")
    raw_spin_lock(lock, f"{table} table")
    try:
        if pool.free:
            index = pool.free - 1
            rec = records[index]
            pool.free = rec.free_next
        elif pool.high < len(records):
            index = pool.high
            pool.high += 1
            rec = records[index]
        else:
            raise CapacityError(
                f"all {len(records)} {table} are in use: free unused ones or boot with a "
                f"larger max_{table}="
            )
        generation = rec.generation + 1
        ctypes.memset(ctypes.addressof(rec), 0, ctypes.sizeof(rec))
        rec.generation = generation
        rec.in_use = 1
        return index, generation
    finally:
        raw_spin_unlock(lock)


def free_record(table: str, index: int, generation: int) -> bool:
    """Return record `index` of `table` to its pool; False if it was already freed.

    Freeing bumps the generation, so handles on the record become stale at once.
    """
    img = image.this()
    pool = getattr(img.img.hdr, f"{table}_pool")
    rec = getattr(img.img, table)[index]
    lock = image.field_addr(pool, "lock")
    raw_spin_lock(lock, f"{table} table")
    try:
        if rec.generation != generation or not rec.in_use:
            return False
        rec.in_use = 0
        rec.generation += 1
        rec.free_next = pool.free
        pool.free = index + 1
        return True
    finally:
        raw_spin_unlock(lock)


# --- the handle ------------------------------------------------------------------------------


RecordT = TypeVar("RecordT", bound="Record")


class Record:
    """A handle on a record of image table TABLE, freed with the handle that created it.

    The creating handle owns the record: when it is garbage-collected in the creating
    process (while its kernel still runs) the record is freed and every other handle
    on it (inherited by fork or pickled) becomes stale. FIELD names the record's
    shared word whose address :meth:`addr` returns ("" for none).
    """

    TABLE = ""
    FIELD = ""
    __slots__ = ("index", "generation", "_img", "_rec", "_addr", "_owner", "__weakref__")

    def __init__(self) -> None:
        self.index, self.generation = alloc_record(self.TABLE)
        self._init_record(getattr(image.this().img, self.TABLE)[self.index])
        self._attach()
        self._owner = _pid

    def _init_record(self, rec: Any) -> None:
        """Set up freshly allocated (zeroed) record `rec` before any handle uses it."""

    def _attach(self) -> None:
        self._img = image.this()  # the kernel this handle belongs to
        self._rec = getattr(self._img.img, self.TABLE)[self.index]
        self._addr = image.field_addr(self._rec, self.FIELD) if self.FIELD else 0
        self._owner = 0

    @classmethod
    def _from_index(cls: type[RecordT], index: int, generation: int) -> RecordT:
        obj = cls.__new__(cls)
        obj.index, obj.generation = index, generation
        obj._attach()
        return obj

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self)._from_index, (self.index, self.generation))

    def __eq__(self, other: object) -> bool:
        """Handles are equal when they name the same object (in any process)."""
        return (isinstance(other, Record) and type(other) is type(self)
                and other.index == self.index and other.generation == self.generation)

    def __hash__(self) -> int:
        return hash((type(self), self.index, self.generation))

    def __del__(self) -> None:
        # Only while its own kernel runs: a handle that outlived its kernel must not
        # free the record of the same index in the next one.
        if getattr(self, "_owner", 0) == _pid and image._this is getattr(self, "_img", None):
            self._free()

    def _free(self) -> None:
        """Return the record to its pool (the creating handle is going away)."""
        free_record(self.TABLE, self.index, self.generation)

    def _stale(self) -> None:
        raise StaleObjectError(
            f"{type(self).__name__} #{self.index} was freed: its creating handle was "
            "garbage-collected; keep it alive while other tasks use it"
        )

    def addr(self) -> int:
        """Address of the shared word; raises StaleObjectError once the object was freed."""
        if self._rec.generation != self.generation:
            self._stale()
        return self._addr


# --- atomic access to a field of a record ---------------------------------------------------
#
# The fields of the image's records that several processes change at once are changed
# with these, by name: the width (a 32- or 64-bit field) comes from the layout. Values
# are the field's C type (signed). All are full barriers, callable from any context.

_OPS = {
    4: (_native.load32, _native.store32, _native.add32, _native.or32, _native.and32,
        _native.xchg32, _native.cmpxchg32),
    8: (_native.load64, _native.store64, _native.add64, _native.or64, _native.and64,
        _native.xchg64, _native.cmpxchg64),
}


def _field(rec: Any, name: str) -> tuple[int, tuple[Any, ...]]:
    desc = getattr(type(rec), name)
    return ctypes.addressof(rec) + desc.offset, _OPS[desc.size]


def field_load(rec: Any, name: str) -> int:
    """The value of field `name` of record `rec` (READ_ONCE with a full barrier)."""
    addr, ops = _field(rec, name)
    return int(ops[0](addr))


def field_store(rec: Any, name: str, value: int) -> None:
    """Store `value` in field `name` of `rec` (WRITE_ONCE with a full barrier)."""
    addr, ops = _field(rec, name)
    ops[1](addr, value)


def field_add(rec: Any, name: str, delta: int) -> int:
    """Add `delta` to field `name` of `rec`; returns the new value."""
    addr, ops = _field(rec, name)
    return int(ops[2](addr, delta))


def field_or(rec: Any, name: str, bits: int) -> int:
    """Set `bits` in field `name` of `rec`; returns the old value."""
    addr, ops = _field(rec, name)
    return int(ops[3](addr, bits))


def field_and(rec: Any, name: str, bits: int) -> int:
    """Keep only `bits` in field `name` of `rec`; returns the old value."""
    addr, ops = _field(rec, name)
    return int(ops[4](addr, bits))


def field_xchg(rec: Any, name: str, value: int) -> int:
    """Store `value` in field `name` of `rec`; returns the old value."""
    addr, ops = _field(rec, name)
    return int(ops[5](addr, value))


def field_cmpxchg(rec: Any, name: str, old: int, new: int) -> int:
    """Store `new` in field `name` of `rec` if it holds `old`; returns the value found."""
    addr, ops = _field(rec, name)
    return int(ops[6](addr, old, new))
