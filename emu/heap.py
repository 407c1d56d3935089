"""The shared heap: variable-size blocks of the kernel image that every task sees.

One region of the image (its size is the ``heap_size`` boot parameter) is cut into
blocks laid back to back. Each block starts with its size, which has bit 0 set while
the block is allocated, and the size of the block before it, so that a freed block
merges with both neighbours at once (boundary tags). Free blocks are linked in a
list that allocation searches first-fit, splitting off what it does not need.

One raw lock protects the whole heap. It is taken irqsave, so an interrupt handler may
allocate too, and a holder that died is taken over (and reported). Blocks are named
by their payload's offset in the region, the same in every task; heap_addr() turns
one into an address. Callbacks are carried here (callback.py).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

from . import image, records
from .image import HEAP_BLOCK_HDR, HeapBlock

#: emu.boot(heap_size=...): pages of the heap are touched only once used, and this fits
#: well within a container's usual 64 MB /dev/shm.
HEAP_SIZE_DEFAULT = 16 << 20
#: Block sizes and payload offsets are multiples of this.
HEAP_ALIGN = 16
#: The smallest block: a free block must hold its header and its two list links.
MIN_BLOCK = ctypes.sizeof(HeapBlock)
ALLOCATED = 1
NIL = -1


def _hdr() -> image.HeapHdr:
    return image.this().img.hdr.heap


def _base() -> int:
    return image.field_addr(image.this().img, "heap")


def _block(base: int, off: int) -> HeapBlock:
    return HeapBlock.from_address(base + off)


def heap_init(img: image.SharedImage, size: int) -> None:
    """At boot: make the image's heap region of `size` bytes one free block."""
    hdr = img.img.hdr.heap
    base = image.field_addr(img.img, "heap")
    start = -base % HEAP_ALIGN
    end = start + (size - start) // HEAP_ALIGN * HEAP_ALIGN
    hdr.size, hdr.start, hdr.end, hdr.used = size, start, end, 0
    hdr.free_head = NIL
    if end - start >= MIN_BLOCK:
        first = _block(base, start)
        first.size, first.prev_size = end - start, 0
        first.next_free = first.prev_free = NIL
        hdr.free_head = start


def heap_addr(offset: int) -> int:
    """The address of the payload at `offset` (valid in every task of the kernel)."""
    return _base() + offset


def heap_alloc(size: int) -> int | None:
    """Allocate `size` bytes; returns the payload's offset, or None if no free block is
    large enough. The payload is not cleared. Any context."""
    need = max(MIN_BLOCK, -(-(size + HEAP_BLOCK_HDR) // HEAP_ALIGN) * HEAP_ALIGN)
    hdr, base = _hdr(), _base()
    lock = image.field_addr(hdr, "lock")
    records.raw_spin_lock(lock, "heap")
    try:
        off = hdr.free_head
        while off != NIL:
            block = _block(base, off)
            if block.size >= need:
                break
            off = block.next_free
        else:
            return None
        rest = block.size - need
        if rest >= MIN_BLOCK:  # split: the tail stays free, in the block's place in the list
            tail = _block(base, off + need)
            tail.size, tail.prev_size = rest, need
            tail.next_free, tail.prev_free = block.next_free, block.prev_free
            _relink(hdr, base, off + need, tail)
            _set_prev_size(hdr, base, off + need + rest, rest)
        else:
            _unlink(hdr, base, block)
            need = block.size
        block.size = need | ALLOCATED
        hdr.used += need
        return int(off + HEAP_BLOCK_HDR)
    finally:
        records.raw_spin_unlock(lock)


def heap_free(offset: int) -> bool:
    """Free the block whose payload is at `offset`; False if that is not an allocated
    block (freed already, as far as its boundary tags tell). Any context."""
    hdr, base = _hdr(), _base()
    off = offset - HEAP_BLOCK_HDR
    if off < hdr.start or off >= hdr.end or off % HEAP_ALIGN != hdr.start % HEAP_ALIGN:
        return False
    lock = image.field_addr(hdr, "lock")
    records.raw_spin_lock(lock, "heap")
    try:
        block = _block(base, off)
        if not _is_allocated_block(hdr, base, off, block):
            return False
        size = block.size & ~ALLOCATED
        block.size = size
        hdr.used -= size
        if off + size < hdr.end:
            after = _block(base, off + size)
            if not after.size & ALLOCATED:
                _unlink(hdr, base, after)
                size += after.size
        if block.prev_size:
            before = _block(base, off - block.prev_size)
            if not before.size & ALLOCATED:
                _unlink(hdr, base, before)
                off -= block.prev_size
                size += before.size
                block = before
        block.size = size
        _set_prev_size(hdr, base, off + size, size)
        block.prev_free, block.next_free = NIL, hdr.free_head
        if hdr.free_head != NIL:
            _block(base, hdr.free_head).prev_free = off
        hdr.free_head = off
        return True
    finally:
        records.raw_spin_unlock(lock)


def heap_used() -> int:
    """Bytes in allocated blocks, their headers included."""
    return int(_hdr().used)


def heap_size() -> int:
    """The heap_size the kernel was booted with."""
    return int(_hdr().size)


def _is_allocated_block(hdr: image.HeapHdr, base: int, off: int, block: HeapBlock) -> bool:
    """Whether `block` is marked allocated and its neighbours' tags agree with its own."""
    size = block.size & ~ALLOCATED
    if not block.size & ALLOCATED or size < MIN_BLOCK or off + size > hdr.end:
        return False
    if off + size < hdr.end and _block(base, off + size).prev_size != size:
        return False
    if off == hdr.start:
        return block.prev_size == 0
    return 0 < block.prev_size <= off - hdr.start and (
        _block(base, off - block.prev_size).size & ~ALLOCATED == block.prev_size)


def _unlink(hdr: image.HeapHdr, base: int, block: HeapBlock) -> None:
    if block.prev_free == NIL:
        hdr.free_head = block.next_free
    else:
        _block(base, block.prev_free).next_free = block.next_free
    if block.next_free != NIL:
        _block(base, block.next_free).prev_free = block.prev_free


def _relink(hdr: image.HeapHdr, base: int, off: int, block: HeapBlock) -> None:
    """Point `block`'s list neighbours at `off`, where it now lies."""
    if block.prev_free == NIL:
        hdr.free_head = off
    else:
        _block(base, block.prev_free).next_free = off
    if block.next_free != NIL:
        _block(base, block.next_free).prev_free = off


def _set_prev_size(hdr: image.HeapHdr, base: int, off: int, size: int) -> None:
    if off < hdr.end:
        _block(base, off).prev_size = size


def heap_blocks() -> Iterator[tuple[int, int, bool]]:
    """Every block in address order, as (offset, size, allocated) (for checks and tools;
    unlocked: call it while nothing allocates)."""
    hdr, base = _hdr(), _base()
    off = hdr.start
    while off < hdr.end:
        block = _block(base, off)
        size = block.size & ~ALLOCATED
        yield int(off), int(size), bool(block.size & ALLOCATED)
        off += size


def heap_free_list() -> list[int]:
    """Offsets of the free blocks, in list order (unlocked, like heap_blocks())."""
    hdr, base = _hdr(), _base()
    out = []
    off = hdr.free_head
    while off != NIL:
        out.append(int(off))
        off = _block(base, off).next_free
    return out
