"""kmalloc() and friends (mm/slab_common.c, include/linux/slab.h): memory every task sees.

A kmalloc'd buffer is a block of the shared heap (heap.py) that starts with a small
header (image.KmallocHdr) holding the allocation's *tag*, a random non-zero 64-bit
number; the caller's bytes follow. The handle, a :class:`Kbuf`, is a buffer-protocol
object (native/slab.c) over those bytes: ``memoryview(buf)``, ``struct.pack_into(fmt,
buf, off, ...)``, ``MyStruct.from_buffer(buf)`` and numpy's ``frombuffer`` all work on the
shared memory itself, in every task the handle reaches (inherited over fork or carried
with a callback). kfree() sets the tag to 0, so every handle on the block goes stale at
once: taking a new view of it raises StaleObjectError, and a second kfree() is the
report the kernel's KASAN makes ("BUG: KASAN: double-free"). A view taken before
kfree() is a raw pointer, as in C: using it afterwards is not detected.

Only kfree() frees: as in the kernel, a buffer whose handles are all dropped leaks
until the kernel shuts down.
"""

from __future__ import annotations

import ctypes
import random
from typing import Any, TypeVar

import _emu_native as _native

from . import bug, checks, heap, image, preempt
from .constants import UINT_MAX
from .errors import StaleObjectError

# GFP flags (include/linux/gfp_types.h, v6.3+ values).
__GFP_HIGH = 0x20
__GFP_IO = 0x40
__GFP_FS = 0x80
__GFP_ZERO = 0x100
__GFP_DIRECT_RECLAIM = 0x400
__GFP_KSWAPD_RECLAIM = 0x800
__GFP_NOWARN = 0x2000
__GFP_RECLAIM = __GFP_DIRECT_RECLAIM | __GFP_KSWAPD_RECLAIM
#: May not sleep; any context (interrupt handlers, under spinlocks).
GFP_ATOMIC = __GFP_HIGH | __GFP_KSWAPD_RECLAIM
#: May sleep: process context only, never with a spinlock held or interrupts off.
GFP_KERNEL = __GFP_RECLAIM | __GFP_IO | __GFP_FS
#: May not sleep, without dipping into reserves.
GFP_NOWAIT = __GFP_KSWAPD_RECLAIM

_HDR = ctypes.sizeof(image.KmallocHdr)
_TAG = image.offsetof(image.KmallocHdr, "tag")
_SIZE_T = "unsigned long"  # size_t on the 64-bit machines emu runs on

S = TypeVar("S", bound=ctypes.Structure)


class Kbuf(_native.SharedBuffer):
    """A kmalloc'd buffer: ``len(buf)`` bytes of shared memory, the same in every task.

    Supports the buffer protocol (``memoryview(buf)``, ``struct.pack_into``,
    ``ctypes.Structure.from_buffer``), indexing (``buf[i]`` is an int, ``buf[i:j]``
    bytes) and :meth:`as_struct`. Any new view of a freed buffer raises
    StaleObjectError. Pass it to kthreads and callbacks like any emu object; it is
    freed only by :func:`kfree`.
    """

    __slots__ = ("offset", "size", "tag", "_keep")
    offset: int  # of the caller's bytes in the heap
    size: int
    tag: int
    _keep: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> Kbuf:
        raise TypeError("emu.Kbuf cannot be created directly: use emu.kmalloc()")

    @classmethod
    def _at(cls, offset: int, size: int, tag: int) -> Kbuf:
        """The handle on the payload at heap `offset` (its header just before it)."""
        img = image.this()
        addr = heap.heap_addr(offset)
        obj = _native.SharedBuffer.__new__(cls, addr, size, addr - _HDR + _TAG, tag)
        obj.offset, obj.size, obj.tag = offset, size, tag
        obj._keep = img.img  # keeps the image mapped while this handle exists
        return obj

    def __reduce__(self) -> tuple[object, ...]:
        return (Kbuf._at, (self.offset, self.size, self.tag))

    def _stale(self) -> None:
        raise StaleObjectError(
            f"kmalloc'd buffer of {self.size} bytes (heap offset {self.offset:#x}) was "
            "freed with kfree(): use after free"
        )

    def _check(self) -> None:
        if not self._live():
            self._stale()

    def __len__(self) -> int:
        return int(self.size)

    def __getitem__(self, index: int | slice) -> Any:
        value = memoryview(self)[index]
        return bytes(value) if isinstance(value, memoryview) else value

    def __setitem__(self, index: int | slice, value: Any) -> None:
        memoryview(self)[index] = value

    def __eq__(self, other: object) -> bool:
        """Handles are equal when they name the same allocation (in any task)."""
        return isinstance(other, Kbuf) and (other.offset, other.tag) == (self.offset, self.tag)

    def __hash__(self) -> int:
        return hash((Kbuf, self.offset, self.tag))

    def __repr__(self) -> str:
        state = "" if self._live() else ", freed"
        return f"<Kbuf {self.size} bytes at heap+{self.offset:#x}{state}>"

    def as_struct(self, cls: type[S]) -> S:
        """The buffer seen as ctypes structure `cls` (a Structure or Union subclass), as a
        driver casts kmalloc'd memory to ``struct my_dev *``.

        The result is an instance of `cls` whose fields are the shared bytes; it stays
        shared when carried to other tasks, and ``kfree(dev)`` frees the buffer.
        TypeError if `cls` is not a ctypes structure type, ValueError if it is larger
        than the buffer; StaleObjectError if the buffer was freed.
        """
        if not isinstance(cls, type) or not issubclass(cls, (ctypes.Structure, ctypes.Union)):
            raise checks.not_a("cls", "a ctypes.Structure or ctypes.Union subclass", cls)
        self._check()
        if ctypes.sizeof(cls) > self.size:
            raise ValueError(f"cls {cls.__name__} needs {ctypes.sizeof(cls)} bytes; the "
                             f"buffer has {self.size}")
        obj = _shared_type(cls).from_buffer(self)
        setattr(obj, "_emu_kbuf", self)  # noqa: B010  (a name ctypes does not know)
        return obj


_shared_types: dict[type, type] = {}


def _shared_type(cls: type[S]) -> type[S]:
    """A subclass of `cls` (same layout) whose instances pickle as a reference to their
    kmalloc'd buffer instead of a copy of their bytes, as ctypes would."""
    shared: type[S] | None = _shared_types.get(cls)
    if shared is None:
        shared = type(cls.__name__, (cls,), {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__reduce__": _reduce_struct,
            "_emu_struct": cls,
        })
        _shared_types[cls] = shared
    return shared


def _reduce_struct(self: Any) -> tuple[object, ...]:
    return (_struct_at, (self._emu_kbuf, self._emu_struct))


def _struct_at(kbuf: Kbuf, cls: type[S]) -> S:
    return kbuf.as_struct(cls)


def _kbuf_of(objp: object) -> Kbuf | None:
    if objp is None or isinstance(objp, Kbuf):
        return objp
    kbuf = getattr(objp, "_emu_kbuf", None) if isinstance(objp, ctypes.Structure | ctypes.Union) \
        else None
    if not isinstance(kbuf, Kbuf):
        raise checks.not_a("objp", "a buffer from emu.kmalloc() (or a structure made with "
                           "its as_struct()) or None", objp)
    return kbuf


def _check_flags(flags: Any) -> int:
    if type(flags) is not int or not 0 <= flags <= UINT_MAX:
        checks.check_int(flags, "flags", "unsigned int")
    return int(flags)


def _alloc(size: int, flags: int) -> Kbuf | None:
    if flags & __GFP_DIRECT_RECLAIM:
        preempt.might_sleep(depth=2)  # located in kmalloc()
    offset = heap.heap_alloc(_HDR + size)
    if offset is None:
        return None
    addr = heap.heap_addr(offset)
    hdr = image.KmallocHdr.from_address(addr)
    hdr.size = size
    if flags & __GFP_ZERO:
        ctypes.memset(addr + _HDR, 0, size)
    tag = random.getrandbits(63) | 1
    _native.store64(addr + _TAG, tag)  # published last: the handle is valid from here
    return Kbuf._at(offset + _HDR, size, tag)


def kmalloc(size: int, flags: int = GFP_KERNEL) -> Kbuf | None:
    """Allocate `size` bytes of shared memory (not cleared); returns a :class:`Kbuf`, or
    None when the heap (``emu.boot(heap_size=...)``) has no room, as kmalloc() returns
    NULL.

    `flags`: ``GFP_KERNEL`` may sleep, so from interrupt or atomic context (a spinlock
    held, interrupts off) it is the kernel's "BUG: sleeping function called from
    invalid context" report (the allocation is still made); ``GFP_ATOMIC`` and
    ``GFP_NOWAIT`` never sleep and are allowed anywhere. ``kmalloc(0)`` returns an
    empty buffer. TypeError/ValueError if `size` is not a size_t or `flags` not an
    unsigned int.
    """
    checks.check_int(size, "size", _SIZE_T)
    return _alloc(size, _check_flags(flags))


def kzalloc(size: int, flags: int = GFP_KERNEL) -> Kbuf | None:
    """kmalloc() of `size` bytes cleared to zero (``flags | __GFP_ZERO``)."""
    checks.check_int(size, "size", _SIZE_T)
    return _alloc(size, _check_flags(flags) | __GFP_ZERO)


def kmalloc_array(n: int, size: int, flags: int = GFP_KERNEL) -> Kbuf | None:
    """kmalloc() of `n` elements of `size` bytes; None if n * size overflows size_t."""
    checks.check_int(n, "n", _SIZE_T)
    checks.check_int(size, "size", _SIZE_T)
    flags = _check_flags(flags)
    if n * size > checks.C_RANGES[_SIZE_T][1]:
        return None
    return _alloc(n * size, flags)


def kcalloc(n: int, size: int, flags: int = GFP_KERNEL) -> Kbuf | None:
    """kmalloc_array() cleared to zero; None if n * size overflows size_t."""
    checks.check_int(n, "n", _SIZE_T)
    checks.check_int(size, "size", _SIZE_T)
    flags = _check_flags(flags)
    if n * size > checks.C_RANGES[_SIZE_T][1]:
        return None
    return _alloc(n * size, flags | __GFP_ZERO)


def kzalloc_struct(cls: type[S], flags: int = GFP_KERNEL) -> S | None:
    """``kzalloc(sizeof(*dev), flags)`` as structure `cls`: a zeroed instance of the
    ctypes Structure (or Union) subclass `cls` in shared memory, or None if the heap has
    no room. Free it with ``kfree(dev)``."""
    if not isinstance(cls, type) or not issubclass(cls, (ctypes.Structure, ctypes.Union)):
        raise checks.not_a("cls", "a ctypes.Structure or ctypes.Union subclass", cls)
    buf = _alloc(ctypes.sizeof(cls), _check_flags(flags) | __GFP_ZERO)
    return None if buf is None else buf.as_struct(cls)


def kfree(objp: Kbuf | ctypes.Structure | ctypes.Union | None) -> None:
    """Free a buffer from kmalloc() (or the structure :meth:`Kbuf.as_struct` made of it);
    ``kfree(None)`` does nothing. Any context; never sleeps.

    Every handle on the buffer, in every task, goes stale at once. Freeing it again is
    reported as the kernel's KASAN does ("BUG: KASAN: double-free"), and counted in
    ``kernel.bugs``; nothing is freed then.
    """
    kbuf = _kbuf_of(objp)
    if kbuf is None:
        return
    tag_addr = heap.heap_addr(kbuf.offset) - _HDR + _TAG
    if _native.cmpxchg64(tag_addr, kbuf.tag, 0) != kbuf.tag:
        _double_free(kbuf)
        return
    heap.heap_free(kbuf.offset - _HDR)


def ksize(objp: Kbuf | ctypes.Structure | ctypes.Union) -> int:
    """The usable size of a kmalloc'd buffer (what was asked for)."""
    kbuf = _kbuf_of(objp)
    if kbuf is None:
        raise checks.not_a("objp", "a buffer from emu.kmalloc()", objp)
    kbuf._check()
    return int(kbuf.size)


def _double_free(kbuf: Kbuf) -> None:
    """kasan_report_invalid_free(): a BUG report; the caller carries on, as with KASAN."""
    pid, comm = preempt.current_pid_comm()
    frame = bug._caller(2)
    bug.bug_splat(
        "=" * 66 + f"\nBUG: KASAN: double-free in {frame.f_code.co_name}",
        [f"Free of heap+{kbuf.offset:#x} by task {comm}/{pid}",
         f"The buggy address belongs to an object of {kbuf.size} bytes that was already "
         "freed with kfree()"],
        depth=3,
    )
