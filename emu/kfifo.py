"""kfifo, the kernel's FIFO ring (lib/kfifo.c, include/linux/kfifo.h), in shared memory.

A fifo is one kmalloc'd block (slab.py): the header image.KfifoHdr (``in``, ``out``,
``mask``, ``esize``), then ``mask + 1`` elements of ``esize`` bytes. ``in`` and ``out``
count elements and wrap as unsigned ints; the element at index i lies at slot
``i & mask``, which is why the size is a power of two. Only the writer moves ``in`` and
only the reader moves ``out``, so one reader and one writer need no lock: the writer
copies the elements in, then publishes ``in`` (the kernel's smp_wmb() before it; here a
release store in kfifo_put(), whose element step is native/slab.c's kfifo_put1(), and a
sequentially consistent one in kfifo_in()), and the reader reads ``in`` before it
copies them out, then publishes ``out`` the same way. Several readers or several
writers must serialise on a lock of their own: the ``_spinlocked`` variants take an emu
spinlock irqsave.

An element is a fixed-size record described by a :mod:`struct` format (``"B"`` bytes by
default, ``"i"`` ints, ``"2d"`` pairs of doubles...). kfifo_put()/kfifo_get() move one
element as a Python value; kfifo_in()/kfifo_out() move whole elements as raw bytes.

Context: every function here may be called from any context (interrupt handlers
included) and never sleeps, except kfifo_alloc() with a sleeping gfp mask
(GFP_KERNEL), which is process context only, as kmalloc(). Using a freed fifo raises
StaleObjectError.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any, NoReturn

import _emu_native as _native

from . import checks, image, slab, spinlock
from .constants import EINVAL, ENOMEM, UINT_MAX
from .errors import CapacityError, StaleObjectError

_HDR = ctypes.sizeof(image.KfifoHdr)
_IN = image.offsetof(image.KfifoHdr, "in_")
_OUT = image.offsetof(image.KfifoHdr, "out")
_U32 = 0xFFFFFFFF
_put1, _get1 = _native.kfifo_put1, _native.kfifo_get1


class Kfifo:
    """A kfifo in shared memory: ``emu.Kfifo(size, fmt="B")``.

    `size` elements, rounded up to a power of two as kfifo_alloc() does (at least 2);
    ``Kfifo()`` with no size is an unallocated fifo for :func:`kfifo_alloc`, as
    ``DECLARE_KFIFO_PTR``. `fmt` is the :mod:`struct` format of one element. The buffer
    is taken with GFP_KERNEL (process context). ValueError if `size` rounds to less
    than 2, emu.CapacityError if the heap has no room. The handle is shared like other
    emu objects; allocate before passing it to other tasks, and free it with
    :func:`kfifo_free` (then every handle on it raises StaleObjectError).
    """

    __slots__ = ("_buf", "_fmt", "_struct", "_esize", "_mask", "_hdr", "_in", "_out",
                 "_view", "_tag_addr", "_tag", "_freed")

    def __init__(self, size: int = 0, fmt: str = "B") -> None:
        self._init_fmt(fmt)
        self._set_buffer(None)
        self._freed = False
        if size != 0:
            err = kfifo_alloc(self, size, slab.GFP_KERNEL)
            if err == -EINVAL:
                raise ValueError(f"size must be at least 2 elements (rounded up to a power of "
                                 f"two); got {size}")
            if err == -ENOMEM:
                raise _no_room(size, self._esize)

    def _init_fmt(self, fmt: Any) -> None:
        if not isinstance(fmt, str):
            raise checks.not_a("fmt", "a struct format string (e.g. 'B', 'i', '2d')", fmt)
        try:
            self._struct = struct.Struct(fmt)
        except struct.error as exc:
            raise ValueError(f"fmt {fmt!r} is not a struct format: {exc}") from None
        if self._struct.size == 0:
            raise ValueError(f"fmt {fmt!r} describes an element of 0 bytes")
        self._fmt = fmt
        self._esize = self._struct.size

    def _set_buffer(self, buf: slab.Kbuf | None) -> None:
        """Point the handle at kmalloc'd block `buf` (None: unallocated)."""
        self._buf = buf
        if buf is None:
            self._mask = self._hdr = self._in = self._out = self._tag_addr = self._tag = 0
            self._view = memoryview(b"")
            return
        hdr = image.KfifoHdr.from_buffer(buf)
        self._mask = int(hdr.mask)
        base = ctypes.addressof(hdr)
        self._hdr, self._in, self._out = base, base + _IN, base + _OUT
        self._view = memoryview(buf)[_HDR:]
        self._tag_addr, self._tag = base - slab._HDR + slab._TAG, buf.tag

    @classmethod
    def _attach(cls, buf: slab.Kbuf | None, fmt: str, freed: bool) -> Kfifo:
        obj = cls.__new__(cls)
        obj._init_fmt(fmt)
        obj._freed = freed or (buf is not None and not buf._live())  # freed on the way
        obj._set_buffer(None if obj._freed else buf)
        return obj

    def __reduce__(self) -> tuple[object, ...]:
        return (Kfifo._attach, (self._buf, self._fmt, self._freed))

    def _stale(self) -> NoReturn:
        what = "was freed with kfifo_free()" if self._freed or self._buf else "was never allocated"
        raise StaleObjectError(f"this kfifo {what}: it has no buffer")

    def __repr__(self) -> str:
        if self._buf is None or not self._buf._live():
            return f"<Kfifo fmt={self._fmt!r} unallocated>"
        return (f"<Kfifo {kfifo_len(self)}/{self._mask + 1} elements of "
                f"fmt={self._fmt!r}>")


def _no_room(size: int, esize: int) -> CapacityError:
    return CapacityError(f"the shared heap has no room for a kfifo of {size} elements of "
                         f"{esize} bytes: boot with a larger heap_size=")


def _fifo(fifo: Any) -> Kfifo:
    """`fifo` if it is a live Kfifo; TypeError or StaleObjectError otherwise."""
    if type(fifo) is not Kfifo:
        if not isinstance(fifo, Kfifo):
            raise checks.not_a("fifo", "an emu.Kfifo", fifo)
    if not fifo._tag or _native.load64(fifo._tag_addr) != fifo._tag:
        fifo._stale()
    return fifo


def _round_up_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else n


def kfifo_alloc(fifo: Kfifo, size: int, gfp_mask: int) -> int:
    """Allocate the buffer of `fifo` for `size` elements, rounded up to a power of two.

    Returns 0, ``-EINVAL`` if the size rounds to less than 2, ``-ENOMEM`` if the heap has
    no room. GFP_KERNEL may sleep (process context only). The fifo starts empty.
    """
    if not isinstance(fifo, Kfifo):
        raise checks.not_a("fifo", "an emu.Kfifo", fifo)
    checks.check_int(size, "size", "unsigned int")
    size = _round_up_pow2(size)
    fifo._set_buffer(None)
    if size < 2 or size > UINT_MAX:
        return -EINVAL
    buf = slab.kmalloc(_HDR + size * fifo._esize, gfp_mask)
    if buf is None:
        return -ENOMEM
    hdr = image.KfifoHdr.from_buffer(buf)
    hdr.in_, hdr.out, hdr.mask, hdr.esize = 0, 0, size - 1, fifo._esize
    fifo._set_buffer(buf)
    fifo._freed = False
    return 0


def kfifo_free(fifo: Kfifo) -> None:
    """Free the buffer of `fifo`; every handle on it goes stale (StaleObjectError)."""
    f = _fifo(fifo)
    buf = f._buf
    f._set_buffer(None)
    f._freed = True
    slab.kfree(buf)


def kfifo_size(fifo: Kfifo) -> int:
    """The number of elements the fifo holds when full."""
    return _fifo(fifo)._mask + 1


def kfifo_esize(fifo: Kfifo) -> int:
    """The size of one element in bytes."""
    return _fifo(fifo)._esize


def kfifo_len(fifo: Kfifo) -> int:
    """The number of elements in the fifo."""
    f = _fifo(fifo)
    return (_native.load32(f._in) - _native.load32(f._out)) & _U32


def kfifo_avail(fifo: Kfifo) -> int:
    """The number of elements that can still be put in the fifo."""
    f = _fifo(fifo)
    return f._mask + 1 - ((_native.load32(f._in) - _native.load32(f._out)) & _U32)


def kfifo_is_empty(fifo: Kfifo) -> bool:
    """True if the fifo holds no element."""
    f = _fifo(fifo)
    return _native.load32(f._in) == _native.load32(f._out)


def kfifo_is_full(fifo: Kfifo) -> bool:
    """True if no element can be put in the fifo."""
    f = _fifo(fifo)
    return (_native.load32(f._in) - _native.load32(f._out)) & _U32 > f._mask


def kfifo_reset(fifo: Kfifo) -> None:
    """Empty the fifo. Only safe while no other task uses it (the kernel's rule too)."""
    f = _fifo(fifo)
    _native.store32(f._out, 0)
    _native.store32(f._in, 0)


def kfifo_reset_out(fifo: Kfifo) -> None:
    """Skip every element in the fifo. Safe for the reader to call alone."""
    f = _fifo(fifo)
    _native.store32(f._out, _native.load32(f._in))


def kfifo_put(fifo: Kfifo, val: Any) -> int:
    """Put one element `val` (a value for ``fmt``, e.g. an int for ``"i"``, a tuple for
    ``"2d"``) in the fifo; returns 1, or 0 if the fifo is full. Lock-free for one writer.
    ValueError if `val` does not fit the fifo's element format."""
    f = fifo if type(fifo) is Kfifo else _fifo(fifo)
    try:
        item = f._struct.pack(*val) if type(val) is tuple else f._struct.pack(val)
    except struct.error as exc:
        raise ValueError(f"val {val!r} does not fit the fifo's element format "
                         f"{f._fmt!r}: {exc}") from None
    done = _put1(f._hdr, f._tag_addr, f._tag, item)  # copies, then publishes in
    if done < 0:
        f._stale()
    return done


def kfifo_get(fifo: Kfifo) -> Any:
    """Take the oldest element out of the fifo and return it (a value, or a tuple for a
    format of several fields); None if the fifo is empty. Lock-free for one reader."""
    f = fifo if type(fifo) is Kfifo else _fifo(fifo)
    item = _get1(f._hdr, f._tag_addr, f._tag)  # copies, then publishes out
    if item is None:
        return None
    if isinstance(item, int):
        f._stale()
    vals = f._struct.unpack(item)
    return vals[0] if len(vals) == 1 else vals


def kfifo_peek(fifo: Kfifo) -> Any:
    """The oldest element without taking it out; None if the fifo is empty."""
    f = _fifo(fifo)
    o = _native.load32(f._out)
    if _native.load32(f._in) == o:
        return None
    vals = f._struct.unpack_from(f._view, (o & f._mask) * f._esize)
    return vals[0] if len(vals) == 1 else vals


def _src(buf: Any, n: Any, esize: int) -> tuple[memoryview, int]:
    try:
        src = memoryview(buf).cast("B")
    except TypeError:
        raise checks.not_a("buf", "a bytes-like object (bytes, bytearray, array.array, "
                           "memoryview, a kmalloc'd buffer)", buf) from None
    if n is None:
        return src, len(src) // esize
    checks.check_int(n, "n", "unsigned int")
    if n * esize > len(src):
        raise ValueError(f"n is {n} elements of {esize} bytes; buf has only {len(src)} bytes")
    return src, n


def kfifo_in(fifo: Kfifo, buf: Any, n: int | None = None) -> int:
    """Copy `n` elements (default: all whole elements of `buf`) from bytes-like `buf`
    into the fifo, as many as fit; returns the number copied. Lock-free for one writer."""
    f = _fifo(fifo)
    src, n = _src(buf, n, f._esize)
    i = _native.load32(f._in)
    n = min(n, f._mask + 1 - ((i - _native.load32(f._out)) & _U32))
    _copy_in(f, src, n, i)
    _native.store32(f._in, i + n)  # publishes the elements (smp_wmb() in the kernel)
    return n


def _copy_in(f: Kfifo, src: memoryview, n: int, i: int) -> None:
    size, esize = f._mask + 1, f._esize
    off = i & f._mask
    first = min(n, size - off)
    f._view[off * esize:(off + first) * esize] = src[:first * esize]
    if n > first:
        f._view[:(n - first) * esize] = src[first * esize:n * esize]


def _copy_out(f: Kfifo, dst: memoryview, n: int, o: int) -> None:
    size, esize = f._mask + 1, f._esize
    off = o & f._mask
    first = min(n, size - off)
    dst[:first * esize] = f._view[off * esize:(off + first) * esize]
    if n > first:
        dst[first * esize:n * esize] = f._view[:(n - first) * esize]


def kfifo_out(fifo: Kfifo, buf: Any, n: int | None = None) -> Any:
    """Take up to `n` elements out of the fifo. Lock-free for one reader.

    ``kfifo_out(fifo, n)`` returns them as bytes (``len // esize`` elements, b"" if the
    fifo is empty); ``kfifo_out(fifo, buf, n)`` copies them into the writable bytes-like
    `buf`, as the kernel does, and returns the number copied.
    """
    f = _fifo(fifo)
    if n is None:
        checks.check_int(buf, "n", "unsigned int")
        n, dst = buf, None
    else:
        dst = _dst(buf, n, f._esize)
    o = _native.load32(f._out)
    n = min(n, (_native.load32(f._in) - o) & _U32)
    out = bytearray(n * f._esize) if dst is None else dst
    _copy_out(f, memoryview(out), n, o)
    _native.store32(f._out, o + n)  # the slots may be reused from here
    return bytes(out) if dst is None else n


def _dst(buf: Any, n: Any, esize: int) -> memoryview:
    try:
        dst = memoryview(buf).cast("B")
    except TypeError:
        raise checks.not_a("buf", "a writable bytes-like object", buf) from None
    if dst.readonly:
        raise TypeError(f"buf must be a writable bytes-like object, not a read-only "
                        f"{type(buf).__name__}")
    checks.check_int(n, "n", "unsigned int")
    if n * esize > len(dst):
        raise ValueError(f"n is {n} elements of {esize} bytes; buf has only {len(dst)} bytes")
    return dst


def kfifo_in_spinlocked(fifo: Kfifo, buf: Any, *args: Any) -> int:
    """kfifo_in() under `lock` taken irqsave, for several writers (or a writer in an
    interrupt handler): ``kfifo_in_spinlocked(fifo, buf, lock)`` or
    ``kfifo_in_spinlocked(fifo, buf, n, lock)``. Returns the number of elements copied."""
    if len(args) not in (1, 2):
        raise TypeError(f"kfifo_in_spinlocked() takes (fifo, buf, [n,] lock), got "
                        f"{2 + len(args)} arguments")
    n, lock = (None, args[0]) if len(args) == 1 else args
    _fifo(fifo)
    flags = spinlock.spin_lock_irqsave(lock)
    try:
        return kfifo_in(fifo, buf, n)
    finally:
        spinlock.spin_unlock_irqrestore(lock, flags)


def kfifo_out_spinlocked(fifo: Kfifo, *args: Any) -> Any:
    """kfifo_out() under `lock` taken irqsave, for several readers:
    ``kfifo_out_spinlocked(fifo, n, lock)`` returns bytes,
    ``kfifo_out_spinlocked(fifo, buf, n, lock)`` the number of elements copied."""
    if len(args) not in (2, 3):
        raise TypeError(f"kfifo_out_spinlocked() takes (fifo, [buf,] n, lock), got "
                        f"{1 + len(args)} arguments")
    *rest, lock = args
    _fifo(fifo)
    flags = spinlock.spin_lock_irqsave(lock)
    try:
        return kfifo_out(fifo, *rest)
    finally:
        spinlock.spin_unlock_irqrestore(lock, flags)
