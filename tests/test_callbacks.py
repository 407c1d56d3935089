"""The shared heap (emu/heap.py): first-fit blocks with boundary tags, freed blocks
merging with their neighbours."""

from __future__ import annotations

import ctypes
import random

import pytest

from emu import heap, image


def check_heap():
    """The blocks tile the heap, no two free blocks touch, the free list holds exactly the
    free blocks, and `used` counts the allocated ones."""
    hdr = image.this().img.hdr.heap
    blocks = list(heap.heap_blocks())
    assert blocks[0][0] == hdr.start and sum(size for _, size, _ in blocks) == hdr.end - hdr.start
    for (_, _, used1), (_, _, used2) in zip(blocks, blocks[1:], strict=False):
        assert used1 or used2, "two free blocks next to each other"
    assert sorted(heap.heap_free_list()) == [off for off, _, used in blocks if not used]
    assert hdr.used == sum(size for _, size, used in blocks if used)
    return blocks


@pytest.mark.emu_boot(heap_size=64 * 1024)
def test_heap_allocates_first_fit_and_coalesces_what_is_freed(kernel):
    rng = random.Random(1)
    live = {}  # offset -> the bytes written there
    for step in range(3000):
        if live and (rng.random() < 0.45 or len(live) > 60):
            off = rng.choice(list(live))
            data = live.pop(off)
            assert ctypes.string_at(heap.heap_addr(off), len(data)) == data, "overwritten"
            assert heap.heap_free(off)
            assert not heap.heap_free(off), "a second free is refused"
        else:
            size = rng.choice([1, 15, 16, 17, 100, 1000, rng.randrange(1, 8000)])
            off = heap.heap_alloc(size)
            if off is None:
                assert all(size + image.HEAP_BLOCK_HDR > s for _, s, u in heap.heap_blocks()
                           if not u), "no room reported while a free block fits"
                continue
            assert heap.heap_addr(off) % heap.HEAP_ALIGN == 0
            data = rng.randbytes(size)
            ctypes.memmove(heap.heap_addr(off), data, size)
            live[off] = data
        if step % 50 == 0:
            check_heap()
    for off in live:
        assert heap.heap_free(off)
    blocks = check_heap()
    assert len(blocks) == 1 and heap.heap_used() == 0, "freeing everything leaves one block"
    assert heap.heap_alloc(64 * 1024) is None
    assert heap.heap_alloc(blocks[0][1] - image.HEAP_BLOCK_HDR) is not None
