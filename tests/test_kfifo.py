"""kfifo in shared memory (lib/kfifo.c, include/linux/kfifo.h)."""

from __future__ import annotations

import array
import collections
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import emu
from emu import heap, image

from util import stop_after_exit, wait_until


@pytest.mark.parametrize(("asked", "size"), [(2, 2), (3, 4), (5, 8), (8, 8), (1000, 1024)])
def test_size_is_rounded_up_to_a_power_of_two(kernel, asked, size):
    fifo = emu.Kfifo(asked)
    assert emu.kfifo_size(fifo) == size == emu.kfifo_avail(fifo)
    emu.kfifo_free(fifo)


def test_kfifo_alloc_return_values(kernel):
    fifo = emu.Kfifo()
    assert emu.kfifo_alloc(fifo, 0, emu.GFP_KERNEL) == -emu.EINVAL
    assert emu.kfifo_alloc(fifo, 1, emu.GFP_KERNEL) == -emu.EINVAL
    assert emu.kfifo_alloc(fifo, 2**31, emu.GFP_KERNEL) == -emu.ENOMEM  # 2 GiB > the heap
    assert emu.kfifo_alloc(fifo, 100, emu.GFP_KERNEL) == 0
    assert emu.kfifo_size(fifo) == 128 and emu.kfifo_esize(fifo) == 1
    emu.kfifo_free(fifo)
    with pytest.raises(ValueError, match="size must be at least 2"):
        emu.Kfifo(1)


@pytest.mark.emu_boot(heap_size=1 << 20)
def test_constructor_raises_capacity_error_when_the_heap_is_full(kernel):
    with pytest.raises(emu.CapacityError, match="heap_size="):
        emu.Kfifo(1 << 20)


def test_put_get_return_values_and_counts(kernel):
    fifo = emu.Kfifo(4, "i")
    assert emu.kfifo_is_empty(fifo) and not emu.kfifo_is_full(fifo)
    assert emu.kfifo_get(fifo) is None and emu.kfifo_peek(fifo) is None
    assert [emu.kfifo_put(fifo, v) for v in (-1, 2, 3, 4, 5)] == [1, 1, 1, 1, 0]
    assert emu.kfifo_is_full(fifo) and emu.kfifo_len(fifo) == 4 and emu.kfifo_avail(fifo) == 0
    assert emu.kfifo_peek(fifo) == -1
    assert [emu.kfifo_get(fifo) for _ in range(5)] == [-1, 2, 3, 4, None]
    emu.kfifo_free(fifo)


def test_in_and_out_copy_what_fits_and_return_counts(kernel):
    fifo = emu.Kfifo(8)
    assert emu.kfifo_in(fifo, b"abcdef") == 6
    assert emu.kfifo_in(fifo, b"ghijkl") == 2  # only 2 free
    assert emu.kfifo_in(fifo, b"xyz") == 0
    assert emu.kfifo_out(fifo, 3) == b"abc"
    dst = bytearray(10)
    assert emu.kfifo_out(fifo, dst, 10) == 5 and dst[:5] == b"defgh"
    assert emu.kfifo_out(fifo, 4) == b""
    assert emu.kfifo_in(fifo, b"0123456789", 3) == 3  # n elements of buf
    assert emu.kfifo_out(fifo, dst, 2) == 2 and dst[:2] == b"01"
    emu.kfifo_free(fifo)


def test_elements_of_a_struct_format(kernel):
    fifo = emu.Kfifo(4, "=id")
    assert emu.kfifo_esize(fifo) == 12
    assert emu.kfifo_put(fifo, (7, 0.5)) == 1
    assert emu.kfifo_in(fifo, struct.pack("=idid", 8, 1.5, 9, 2.5)) == 2
    assert emu.kfifo_in(fifo, b"\0" * 13) == 1  # whole elements only
    assert emu.kfifo_get(fifo) == (7, 0.5)
    assert list(struct.iter_unpack("=id", emu.kfifo_out(fifo, 2))) == [(8, 1.5), (9, 2.5)]
    ints = emu.Kfifo(16, "q")
    assert emu.kfifo_in(ints, array.array("q", range(10))) == 10
    assert array.array("q", emu.kfifo_out(ints, 16)).tolist() == list(range(10))
    emu.kfifo_free(fifo)
    emu.kfifo_free(ints)


def test_indices_wrap_as_unsigned_ints(kernel):
    fifo = emu.Kfifo(8, "I")
    hdr = image.KfifoHdr.from_buffer(fifo._buf)
    hdr.in_ = hdr.out = 2**32 - 3  # three elements before the counters wrap
    for round_ in range(3):
        assert emu.kfifo_in(fifo, array.array("I", range(round_, round_ + 6))) == 6
        assert emu.kfifo_len(fifo) == 6 and emu.kfifo_avail(fifo) == 2
        assert [emu.kfifo_get(fifo) for _ in range(6)] == list(range(round_, round_ + 6))
    assert hdr.in_ == hdr.out == 15
    emu.kfifo_free(fifo)


def test_reset_and_reset_out(kernel):
    fifo = emu.Kfifo(4)
    emu.kfifo_in(fifo, b"abc")
    emu.kfifo_reset_out(fifo)
    assert emu.kfifo_is_empty(fifo) and emu.kfifo_avail(fifo) == 4
    emu.kfifo_in(fifo, b"de")
    emu.kfifo_reset(fifo)
    assert emu.kfifo_len(fifo) == 0 and emu.kfifo_out(fifo, 4) == b""
    emu.kfifo_free(fifo)


N_ITEMS = 100_000
WAIT_MS = 30_000  # bound on a run that takes well under a second alone on 2 CPUs


@pytest.mark.emu_boot(cpus=2)
def test_one_reader_one_writer_need_no_lock(kernel):
    fifo = emu.Kfifo(256, "Q")
    done = emu.Completion()

    def producer(f):
        i = 0
        while i < N_ITEMS:
            i += emu.kfifo_put(f, i)
        return 0

    def consumer(f):
        wrong = 0
        for i in range(N_ITEMS):
            while (v := emu.kfifo_get(f)) is None:
                pass
            wrong += v != i
        emu.complete(done)
        return min(wrong, 1000)

    c = emu.kthread_run_on_cpu(consumer, fifo, 1, "consumer")
    p = emu.kthread_run_on_cpu(producer, fifo, 0, "producer")
    assert emu.wait_for_completion_timeout(done, emu.msecs_to_jiffies(WAIT_MS)), \
        f"the consumer got only part of the items: {emu.kfifo_len(fifo)} left in the fifo"
    assert stop_after_exit(p) == 0
    assert stop_after_exit(c) == 0  # every item, in order
    assert emu.kfifo_is_empty(fifo)
    emu.kfifo_free(fifo)


@pytest.mark.emu_boot(cpus=2)
def test_two_producers_two_consumers_with_spinlocked_variants(kernel):
    fifo = emu.Kfifo(512, "I")
    in_lock, out_lock = emu.Spinlock(), emu.Spinlock()
    taken = emu.Atomic()
    done = emu.Completion()
    seen = [emu.kzalloc(N_ITEMS, emu.GFP_KERNEL) for _ in range(2)]  # consumer c saw v
    half = N_ITEMS // 2

    def producer(k):
        items = array.array("I", range(k * half, (k + 1) * half)).tobytes()
        sent, batch = 0, 37 * 4
        while sent < len(items):
            chunk = items[sent:sent + batch]
            sent += 4 * emu.kfifo_in_spinlocked(fifo, chunk, in_lock)
        return 0

    def consumer(c):
        out = bytearray(4 * 53)
        last = [-1, -1]  # per producer: items come out in the order they went in
        disorder = 0
        while emu.atomic_read(taken) < N_ITEMS:
            n = emu.kfifo_out_spinlocked(fifo, out, 53, out_lock)
            for (v,) in struct.iter_unpack("I", out[:4 * n]):
                seen[c][v] += 1
                disorder += v <= last[v // half]
                last[v // half] = v
            if n and emu.atomic_add_return(n, taken) == N_ITEMS:
                emu.complete(done)
        return min(disorder, 1000)

    consumers = [emu.kthread_run_on_cpu(consumer, c, c, "consumer/%u") for c in (0, 1)]
    producers = [emu.kthread_run_on_cpu(producer, k, k, "producer/%u") for k in (0, 1)]
    assert emu.wait_for_completion_timeout(done, emu.msecs_to_jiffies(WAIT_MS)), \
        f"items lost: the consumers took {emu.atomic_read(taken)} of {N_ITEMS}"
    assert [stop_after_exit(t) for t in producers] == [0, 0]
    assert [stop_after_exit(t) for t in consumers] == [0, 0]
    counts = [a + b for a, b in zip(bytes(seen[0]), bytes(seen[1]), strict=True)]
    assert counts.count(1) == N_ITEMS  # none lost, none duplicated
    assert min(bytes(seen[0]).count(1), bytes(seen[1]).count(1)) > 0  # both consumed
    assert emu.kfifo_is_empty(fifo)
    for buf in seen:
        emu.kfree(buf)
    emu.kfifo_free(fifo)


def test_an_interrupt_handler_writes_a_task_reads(kernel):
    # The driver pattern: the handler is the only writer, a task the only reader.
    fifo = emu.Kfifo(64, "I")
    irqs = emu.Atomic()

    def handler(irq, f):
        emu.kfifo_put(f, emu.atomic_inc_return(irqs))
        return emu.IRQ_HANDLED

    assert emu.request_irq(6, handler, 0, "fifo-dev", fifo) == 0
    got = []
    for n in range(1, 41):
        emu.irq_inject_interrupt(6)
        wait_until(lambda: not emu.kfifo_is_empty(fifo), what=f"interrupt {n}'s element")
        got.append(emu.kfifo_get(fifo))
    assert got == list(range(1, 41))
    emu.free_irq(6, fifo)
    emu.kfifo_free(fifo)


def test_a_freed_fifo_is_stale_everywhere(kernel):
    fifo = emu.Kfifo(8)
    freed = emu.Completion()
    ready = emu.Completion()

    def user(f):
        emu.kfifo_put(f, 1)
        emu.complete(ready)
        emu.wait_for_completion(freed)
        try:
            emu.kfifo_get(f)
        except emu.StaleObjectError:
            return 1
        return 0

    t = emu.kthread_run(user, fifo, "user")
    emu.wait_for_completion(ready)
    assert emu.kfifo_len(fifo) == 1
    in_flight = pickle.dumps(fifo)  # on its way to a task while it is freed
    emu.kfifo_free(fifo)
    emu.complete(freed)
    assert stop_after_exit(t) == 1
    for use in (lambda f: emu.kfifo_put(f, 1), emu.kfifo_get, emu.kfifo_len, emu.kfifo_free,
                lambda f: emu.kfifo_in(f, b"a"), lambda f: emu.kfifo_out(f, 1)):
        with pytest.raises(emu.StaleObjectError, match="freed with kfifo_free"):
            use(fifo)
    with pytest.raises(emu.StaleObjectError, match="never allocated"):
        emu.kfifo_put(emu.Kfifo(), 1)
    for carried in (pickle.loads(in_flight), pickle.loads(pickle.dumps(fifo))):
        with pytest.raises(emu.StaleObjectError, match="freed with kfifo_free"):
            emu.kfifo_get(carried)
    assert emu.kfifo_alloc(fifo, 4, emu.GFP_KERNEL) == 0  # the handle can be used again
    assert emu.kfifo_put(fifo, 2) == 1 and emu.kfifo_get(fifo) == 2
    emu.kfifo_free(fifo)


def test_bad_arguments_name_the_argument(kernel):
    fifo = emu.Kfifo(8, "h")
    with pytest.raises(TypeError, match="fifo must be an emu.Kfifo, not NoneType"):
        emu.kfifo_put(None, 1)
    with pytest.raises(ValueError, match="val 'x' does not fit the fifo's element format 'h'"):
        emu.kfifo_put(fifo, "x")
    with pytest.raises(ValueError, match="val 70000 does not fit"):
        emu.kfifo_put(fifo, 70000)
    with pytest.raises(TypeError, match="buf must be a bytes-like object.*not list"):
        emu.kfifo_in(fifo, [1, 2])
    with pytest.raises(ValueError, match="n is 3 elements of 2 bytes; buf has only 4 bytes"):
        emu.kfifo_in(fifo, b"abcd", 3)
    with pytest.raises(TypeError, match="buf must be a writable bytes-like object"):
        emu.kfifo_out(fifo, b"abcd", 2)
    with pytest.raises(TypeError, match=r"n must be an int \(unsigned int\), not str"):
        emu.kfifo_out(fifo, "2")
    with pytest.raises(TypeError, match="fmt must be a struct format string"):
        emu.Kfifo(8, 4)
    with pytest.raises(ValueError, match="fmt 'zz' is not a struct format"):
        emu.Kfifo(8, "zz")
    with pytest.raises(ValueError, match="size must be in the range of unsigned int"):
        emu.kfifo_alloc(emu.Kfifo(), -1, emu.GFP_KERNEL)
    with pytest.raises(TypeError, match="lock must be an emu.Spinlock, not NoneType"):
        emu.kfifo_in_spinlocked(fifo, b"ab", None)
    with pytest.raises(TypeError, match=r"takes \(fifo, \[buf,\] n, lock\)"):
        emu.kfifo_out_spinlocked(fifo, emu.Spinlock())
    assert emu.kfifo_is_empty(fifo)  # nothing was put by the refused calls
    emu.kfifo_free(fifo)


def test_nothing_leaks(kernel):
    before = heap.heap_used()
    fifos = [emu.Kfifo(n, fmt) for n, fmt in ((2, "B"), (100, "i"), (4096, "=id"))]
    for f in fifos:
        emu.kfifo_in(f, bytes(10 * emu.kfifo_esize(f)))
    assert heap.heap_used() > before
    for f in fifos:
        emu.kfifo_free(f)
    assert heap.heap_used() == before


class KfifoModel(RuleBasedStateMachine):
    """A kfifo of 8 two-byte elements against a deque that holds at most 8."""

    def __init__(self) -> None:
        super().__init__()
        self.fifo = emu.Kfifo(8, "H")
        self.model: collections.deque[int] = collections.deque()

    def teardown(self) -> None:
        emu.kfifo_free(self.fifo)

    @rule(v=st.integers(0, 0xFFFF))
    def put(self, v: int) -> None:
        ok = len(self.model) < 8
        assert emu.kfifo_put(self.fifo, v) == int(ok)
        if ok:
            self.model.append(v)

    @rule()
    def get(self) -> None:
        want = self.model.popleft() if self.model else None
        assert emu.kfifo_get(self.fifo) == want

    @rule(vs=st.lists(st.integers(0, 0xFFFF), max_size=12))
    def put_many(self, vs: list[int]) -> None:
        n = min(len(vs), 8 - len(self.model))
        assert emu.kfifo_in(self.fifo, array.array("H", vs)) == n
        self.model.extend(vs[:n])

    @rule(n=st.integers(0, 12))
    def get_many(self, n: int) -> None:
        want = [self.model.popleft() for _ in range(min(n, len(self.model)))]
        assert array.array("H", emu.kfifo_out(self.fifo, n)).tolist() == want

    @rule()
    def peek(self) -> None:
        assert emu.kfifo_peek(self.fifo) == (self.model[0] if self.model else None)

    @invariant()
    def counts_agree(self) -> None:
        n = len(self.model)
        assert emu.kfifo_len(self.fifo) == n and emu.kfifo_avail(self.fifo) == 8 - n
        assert emu.kfifo_is_empty(self.fifo) == (n == 0)
        assert emu.kfifo_is_full(self.fifo) == (n == 8)


def test_kfifo_behaves_like_a_bounded_deque(kernel):
    run_state_machine_as_test(KfifoModel, settings=settings(max_examples=60, deadline=None))


def test_the_readme_producer_consumer_example_runs(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Sharing memory: kmalloc and kfifo", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.split() == ["1000", "499500"] and out.stderr == ""
