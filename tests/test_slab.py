"""kmalloc/kzalloc/kcalloc/kfree: shared memory every task sees (mm/slab_common.c)."""

from __future__ import annotations

import ctypes
import pickle
import struct

import pytest

import emu
from emu import heap

from util import stop_after_exit, wait_until


class MyDev(ctypes.Structure):
    _fields_ = [
        ("irq", ctypes.c_int),
        ("count", ctypes.c_uint64),
        ("ratio", ctypes.c_double),
        ("name", ctypes.c_char * 16),
    ]


def test_kmalloc_buffer_speaks_the_buffer_protocol(kernel):
    buf = emu.kmalloc(64, emu.GFP_KERNEL)
    assert isinstance(buf, emu.Kbuf) and len(buf) == 64
    view = memoryview(buf)
    assert (view.nbytes, view.readonly, view.format) == (64, False, "B")
    struct.pack_into("<IQ", buf, 0, 0xDEADBEEF, 2**40)
    assert struct.unpack_from("<IQ", buf, 0) == (0xDEADBEEF, 2**40)
    assert buf[0:4] == b"\xef\xbe\xad\xde" and buf[0] == 0xEF
    buf[63] = 7
    assert view[63] == 7
    dev = MyDev.from_buffer(buf)
    dev.irq = 5
    assert struct.unpack_from("i", buf, 0) == (5,)
    emu.kfree(buf)


def test_kzalloc_and_kcalloc_are_zeroed(kernel):
    dirty = emu.kmalloc(256, emu.GFP_KERNEL)
    memoryview(dirty)[:] = b"\xff" * 256
    emu.kfree(dirty)  # the next allocations reuse these bytes
    z = emu.kzalloc(256, emu.GFP_KERNEL)
    c = emu.kcalloc(16, 16, emu.GFP_KERNEL)
    assert bytes(z) == bytes(256) and bytes(c) == bytes(256)
    emu.kfree(z)
    emu.kfree(c)


def test_numpy_sees_the_same_bytes(kernel):
    np = pytest.importorskip("numpy")
    buf = emu.kzalloc(8 * 4, emu.GFP_KERNEL)
    arr = np.frombuffer(buf, dtype=np.int64)
    arr[2] = 42
    assert struct.unpack_from("q", buf, 16) == (42,)
    del arr
    emu.kfree(buf)


@pytest.mark.emu_boot(cpus=2)
def test_a_kmalloced_struct_written_by_one_kthread_is_read_by_another(kernel):
    dev = emu.kzalloc_struct(MyDev, emu.GFP_KERNEL)
    assert isinstance(dev, MyDev) and dev.count == 0
    written = emu.Completion()

    def writer(d):
        d.irq, d.count, d.ratio, d.name = 11, 2**40 + 3, 0.25, b"mydev0"
        emu.complete(written)
        return 0

    def reader(d):
        emu.wait_for_completion(written)
        ok = (d.irq, d.count, d.ratio, d.name) == (11, 2**40 + 3, 0.25, b"mydev0")
        d.count += 1
        return 1 if ok else 0

    r = emu.kthread_run_on_cpu(reader, dev, 1, "reader")
    w = emu.kthread_run_on_cpu(writer, dev, 0, "writer")
    assert stop_after_exit(w) == 0
    assert stop_after_exit(r) == 1
    assert dev.count == 2**40 + 4  # the reader's write reached this task too
    emu.kfree(dev)


def test_a_struct_carried_by_value_to_a_handler_stays_shared(kernel):
    # IRQ handlers and their dev are pickled into the tasks that run them: a plain
    # ctypes structure would arrive as a copy of its bytes, a kmalloc'd one as itself.
    dev = emu.kzalloc_struct(MyDev, emu.GFP_KERNEL)
    raw = emu.kzalloc(4, emu.GFP_KERNEL)

    def handler(irq, d):
        d.count += 1
        raw[0] += 1
        return emu.IRQ_HANDLED

    assert emu.request_irq(4, handler, 0, "mydev", dev) == 0
    for n in (1, 2, 3):
        emu.irq_inject_interrupt(4)
        wait_until(lambda n=n: dev.count == n, what=f"interrupt {n} seen through dev")
    assert raw[0] == 3
    emu.free_irq(4, dev)
    emu.kfree(dev)
    emu.kfree(raw)


def test_as_struct_views_the_buffer_and_checks_its_class(kernel):
    buf = emu.kzalloc(ctypes.sizeof(MyDev) + 8, emu.GFP_KERNEL)
    dev = buf.as_struct(MyDev)
    dev.irq = 3
    assert buf[0] == 3 and isinstance(dev, MyDev)
    with pytest.raises(TypeError, match="cls must be a ctypes.Structure"):
        buf.as_struct(int)
    small = emu.kmalloc(4, emu.GFP_KERNEL)
    with pytest.raises(ValueError, match=r"cls MyDev needs \d+ bytes; the buffer has 4"):
        small.as_struct(MyDev)
    emu.kfree(small)
    emu.kfree(dev)  # kfree() takes the structure as it takes the buffer
    with pytest.raises(emu.StaleObjectError):
        memoryview(buf)


def test_use_after_free_raises_stale_object_error(kernel):
    buf = emu.kmalloc(64, emu.GFP_KERNEL)
    emu.kfree(buf)
    for use in (memoryview, lambda b: b[0], lambda b: b.__setitem__(0, 1),
                bytes, lambda b: MyDev.from_buffer(b), lambda b: b.as_struct(MyDev),
                emu.ksize):
        with pytest.raises(emu.StaleObjectError, match="was freed with kfree"):
            use(buf)
    # Python's argument parsing turns the error of a "w*" buffer into a TypeError
    with pytest.raises((emu.StaleObjectError, TypeError)):
        struct.pack_into("i", buf, 0, 1)
    # a new allocation in the same place does not revive the old handle
    again = emu.kmalloc(64, emu.GFP_KERNEL)
    assert again.offset == buf.offset
    with pytest.raises(emu.StaleObjectError):
        memoryview(buf)
    emu.kfree(again)


@pytest.mark.emu_boot(cpus=2)
def test_use_after_free_in_another_task(kernel):
    buf = emu.kmalloc(8, emu.GFP_KERNEL)
    used, freed = emu.Completion(), emu.Completion()

    def user(b):
        memoryview(b)[0] = 1  # fine while allocated
        emu.complete(used)
        emu.wait_for_completion(freed)
        try:
            memoryview(b)
        except emu.StaleObjectError:
            return 1
        return 0

    t = emu.kthread_run(user, buf, "user")
    emu.wait_for_completion(used)
    assert buf[0] == 1
    emu.kfree(buf)
    emu.complete(freed)
    assert stop_after_exit(t) == 1


@pytest.mark.emu_expect(bugs=1)
def test_double_kfree_is_a_kasan_report(kernel):
    buf = emu.kmalloc(16, emu.GFP_KERNEL)
    emu.kfree(buf)
    used = heap.heap_used()
    emu.kfree(buf)
    assert heap.heap_used() == used
    log = "\n".join(kernel.dmesg())
    assert "BUG: KASAN: double-free in test_double_kfree_is_a_kasan_report" in log
    assert "emu.kfree(buf)" in log  # the call trace shows the caller's line


def test_kfree_none_is_a_no_op_and_other_objects_are_refused(kernel):
    emu.kfree(None)
    with pytest.raises(TypeError, match="objp must be a buffer from emu.kmalloc.*not bytes"):
        emu.kfree(b"abc")
    with pytest.raises(TypeError, match="objp must be .*not MyDev"):
        emu.kfree(MyDev())  # a structure in private memory


def test_bad_arguments_name_the_argument(kernel):
    with pytest.raises(ValueError, match="size must be in the range of unsigned long"):
        emu.kmalloc(-1, emu.GFP_KERNEL)
    with pytest.raises(TypeError, match=r"size must be an int \(unsigned long\), not str"):
        emu.kzalloc("8", emu.GFP_KERNEL)
    with pytest.raises(TypeError, match="flags must be an int .*not NoneType"):
        emu.kmalloc(8, None)
    with pytest.raises(ValueError, match="n must be in the range"):
        emu.kcalloc(-2, 8, emu.GFP_KERNEL)
    with pytest.raises(TypeError, match="size must be an int"):
        emu.kcalloc(2, 8.0, emu.GFP_KERNEL)
    with pytest.raises(TypeError, match="cls must be a ctypes.Structure"):
        emu.kzalloc_struct(dict, emu.GFP_KERNEL)


@pytest.mark.emu_boot(heap_size=1 << 20)
def test_out_of_memory_returns_none(kernel):
    assert emu.kmalloc(2 << 20, emu.GFP_KERNEL) is None
    assert emu.kcalloc(2**40, 2**40, emu.GFP_KERNEL) is None  # n * size overflows size_t
    assert emu.kmalloc_array(2**63, 4, emu.GFP_ATOMIC) is None
    bufs = []
    while (b := emu.kmalloc(64 << 10, emu.GFP_KERNEL)) is not None:
        bufs.append(b)
    assert 8 <= len(bufs) < 16
    for b in bufs:
        emu.kfree(b)
    assert emu.kmalloc(512 << 10, emu.GFP_KERNEL) is not None  # freed blocks merged


def test_nothing_leaks(kernel):
    before = heap.heap_used()
    bufs = [emu.kmalloc(n, emu.GFP_KERNEL) for n in (0, 1, 15, 16, 17, 4096, 100_000)]
    assert [len(b) for b in bufs] == [0, 1, 15, 16, 17, 4096, 100_000]
    assert heap.heap_used() > before
    for b in bufs[::2] + bufs[1::2]:
        emu.kfree(b)
    assert heap.heap_used() == before


@pytest.mark.emu_expect(bugs=1)
def test_gfp_kernel_under_a_spinlock_is_a_sleeping_bug(kernel):
    lock = emu.Spinlock()
    emu.spin_lock(lock)
    atomic = emu.kmalloc(8, emu.GFP_ATOMIC)  # allowed
    assert "sleeping function" not in "\n".join(kernel.dmesg())
    sleeping = emu.kmalloc(8, emu.GFP_KERNEL)  # reported, still allocated
    emu.spin_unlock(lock)
    log = "\n".join(kernel.dmesg())
    assert "BUG: sleeping function called from invalid context at emu/slab.py" in log
    assert "in_atomic(): 1" in log
    emu.kfree(atomic)
    emu.kfree(sleeping)


def test_gfp_atomic_from_an_interrupt_handler(kernel):
    got = emu.Atomic()

    def handler(irq, dev):
        b = emu.kzalloc(16, emu.GFP_ATOMIC)
        b[0] = 9
        emu.atomic_set(got, b[0])
        emu.kfree(b)
        return emu.IRQ_HANDLED

    assert emu.request_irq(3, handler, 0, "alloc", None) == 0
    emu.irq_inject_interrupt(3)
    wait_until(lambda: emu.atomic_read(got) == 9, what="the handler's allocation")
    emu.free_irq(3, None)


def test_handles_compare_by_allocation(kernel):
    a = emu.kmalloc(8, emu.GFP_KERNEL)
    b = pickle.loads(pickle.dumps(a))
    assert a == b and hash(a) == hash(b) and a is not b
    b[0] = 4
    assert a[0] == 4
    assert "8 bytes" in repr(a)
    emu.kfree(b)
    assert "freed" in repr(a)
    with pytest.raises(TypeError, match="use emu.kmalloc"):
        emu.Kbuf(1, 8, 8, 1)  # a buffer at an arbitrary address would crash, not fail
