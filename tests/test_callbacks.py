"""Any Python callable is a callback: IRQ handlers, threaded handlers and tasklets take
closures, lambdas, functools.partial, bound methods and callable instances.

A callback is carried by value to the tasks that run it. Most tests route the
interrupt to the other CPU, whose idle task (another process) takes it, and observe the
callback through the emu objects it captures, which stay shared; everything else it
captures is that task's own copy.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import random
import socket
import threading
import zlib

import pytest

import emu
from emu import heap, image
from emu.image import field_addr
from emu.irq import irq_task

from util import start_lock_holder, stop_after_exit, wait_until

pytestmark = pytest.mark.emu_boot(cpus=2)

IRQ = 5
#: Generous bound for anything that waits on another process (other jobs may load the box).
T = 20.0


# --- helpers --------------------------------------------------------------------------------------

def other_cpu():
    return 1 - emu.current().cpu


def comm(pid):
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def wait_done(done, what="the callback"):
    assert emu.wait_for_completion_timeout(done, emu.msecs_to_jiffies(int(T * 1000))), \
        f"{what} did not run within {T}s"


def wait_idle_task_started(cpu):
    """Wait until `cpu`'s idle task (made by the first request_irq()) sleeps in its loop.

    An interrupt raised while it is still starting up may be lost: a race of the idle
    tasks' start-up, not of callbacks, which these tests stay clear of.
    """
    img = image.this().img

    def asleep():
        slot = img.percpu[cpu].idle_slot
        return slot >= 0 and img.tasks[slot].state == emu.TASK_IDLE

    wait_until(asleep, T, f"the idle task of CPU {cpu} to start")


def fire_elsewhere(done, irq=IRQ):
    """Raise `irq` on the other CPU, whose idle task takes it; wait for `done` and for
    the handlers to return."""
    wait_idle_task_started(other_cpu())
    assert emu.irq_set_affinity(irq, other_cpu()) == 0
    emu.irq_inject_interrupt(irq)
    wait_done(done)
    emu.synchronize_irq(irq)


def assert_ran_in_idle_task(where):
    pid = emu.atomic_read(where)
    assert pid != os.getpid(), "ran in the registering task, not the one the interrupt hit"
    assert comm(pid) == f"swapper/{other_cpu()}"


def record(where, done, irq, dev):
    """A handler body: say which process ran it, then complete."""
    emu.atomic_set(where, os.getpid())
    emu.complete(done)
    return emu.IRQ_HANDLED


def tasklets_in_use():
    img = image.this().img
    return sum(img.tasklets[i].in_use for i in range(img.hdr.tasklets_pool.high))


class Driver:
    """A driver object whose bound method is the handler."""

    def __init__(self):
        self.where, self.done = emu.Atomic(), emu.Completion()
        self.irqs = 0

    def handle(self, irq, dev):
        self.irqs += 1
        return record(self.where, self.done, irq, dev)


# --- every kind of callable -----------------------------------------------------------------------

def test_closure_handler_runs_in_another_task_on_its_own_copy(kernel):
    where, runs, done = emu.Atomic(), emu.Atomic(), emu.Completion()
    seen = []

    def handler(irq, dev):
        seen.append(irq)
        emu.atomic_set(runs, len(seen))
        return record(where, done, irq, dev)

    assert emu.request_irq(IRQ, handler, 0, "closure", None) == 0
    fire_elsewhere(done)
    assert_ran_in_idle_task(where)
    fire_elsewhere(done)
    assert emu.atomic_read(runs) == 2, "that task keeps its copy from one interrupt to the next"
    assert seen == [], "the registering task's list is not the one the handler appends to"

    assert emu.irq_set_affinity(IRQ, emu.current().cpu) == 0
    emu.irq_inject_interrupt(IRQ)  # taken here, at once
    wait_done(done)
    assert emu.atomic_read(where) == os.getpid()
    assert emu.atomic_read(runs) == 1, "this task runs its own copy, made at registration"
    assert seen == []
    assert emu.free_irq(IRQ, None) == "closure"


def test_lambda_handler(kernel):
    where, done = emu.Atomic(), emu.Completion()
    handler = lambda irq, dev: record(where, done, irq, dev)  # noqa: E731
    assert emu.request_irq(IRQ, handler, 0, "lambda", None) == 0
    fire_elsewhere(done)
    assert_ran_in_idle_task(where)
    assert emu.free_irq(IRQ, None) == "lambda"


def test_functools_partial_handler(kernel):
    where, done = emu.Atomic(), emu.Completion()

    def body(where, done, irq, dev):  # local: carried by value, not by name
        return record(where, done, irq, dev)

    assert emu.request_irq(IRQ, functools.partial(body, where, done), 0, "partial", 7) == 0
    fire_elsewhere(done)
    assert_ran_in_idle_task(where)
    assert emu.free_irq(IRQ, 7) == "partial"


def test_bound_method_handler_with_its_object_as_dev(kernel):
    drv = Driver()
    assert emu.request_irq(IRQ, drv.handle, 0, "bound", drv) == 0
    fire_elsewhere(drv.done)
    assert_ran_in_idle_task(drv.where)
    assert drv.irqs == 0, "the handler counted in its own copy of the driver"
    assert emu.free_irq(IRQ, drv) == "bound", "dev is found by identity in the requester"


def test_callable_instance_handler(kernel):
    class Handler:  # local: the class is carried by value too
        def __init__(self):
            self.where, self.done = emu.Atomic(), emu.Completion()

        def __call__(self, irq, dev):
            return record(self.where, self.done, irq, dev)

    h = Handler()
    assert emu.request_irq(IRQ, h, 0, "instance", None) == 0
    fire_elsewhere(h.done)
    assert_ran_in_idle_task(h.where)
    assert emu.free_irq(IRQ, None) == "instance"


def test_threaded_handler_closures(kernel):
    primary_ran, where, done = emu.Atomic(), emu.Atomic(), emu.Completion()
    lock = threading.Lock()  # thread_fn reaches its kthread by fork: it may capture anything

    def primary(irq, dev):
        emu.atomic_set(primary_ran, os.getpid())
        return emu.IRQ_WAKE_THREAD

    def thread_fn(irq, dev):
        with lock:
            emu.atomic_set(where, os.getpid())
        emu.complete(done)
        return emu.IRQ_HANDLED

    assert emu.request_threaded_irq(IRQ, primary, thread_fn, emu.IRQF_ONESHOT, "thr", None) == 0
    fire_elsewhere(done)
    assert_ran_in_idle_task(primary_ran)
    assert emu.atomic_read(where) == irq_task(IRQ).pid
    assert emu.free_irq(IRQ, None) == "thr"


def test_tasklet_closure_runs_in_the_task_that_takes_the_interrupt(kernel):
    where, done = emu.Atomic(), emu.Completion()
    t = emu.Tasklet(lambda t: record(where, done, None, t.data), data=["payload"])
    assert t.data == ["payload"]

    def schedule(irq, dev):
        emu.tasklet_schedule(t)  # `t` is carried as a handle on the same tasklet
        return emu.IRQ_HANDLED

    assert emu.request_irq(IRQ, schedule, 0, "sched", None) == 0
    fire_elsewhere(done)
    assert_ran_in_idle_task(where)
    emu.tasklet_kill(t)
    assert emu.free_irq(IRQ, None) == "sched"

    drv = Driver()
    emu.tasklet_setup(t, functools.partial(drv.handle, IRQ))
    emu.tasklet_schedule(t)  # from process context: runs here, at once
    wait_done(drv.done)
    assert emu.atomic_read(drv.where) == os.getpid()


def test_a_callback_capturing_100_kb(kernel):
    blob = random.Random(1).randbytes(100 * 1024)  # 100 times the old limit
    crc, done = emu.Atomic64(), emu.Completion()

    def handler(irq, dev):
        emu.atomic64_set(crc, zlib.crc32(blob))
        emu.complete(done)
        return emu.IRQ_HANDLED

    before = heap.heap_used()
    assert emu.request_irq(IRQ, handler, 0, "big", None) == 0
    assert heap.heap_used() - before > len(blob)
    fire_elsewhere(done)
    assert emu.atomic64_read(crc) == zlib.crc32(blob)
    assert emu.free_irq(IRQ, None) == "big"
    assert heap.heap_used() == before


def test_what_a_callback_captures_lives_as_long_as_its_registration(kernel):
    done = emu.Completion()

    def counting(done):
        hits = emu.Atomic()  # referenced only by the handler's closure

        def callback(*args):  # an IRQ handler or a tasklet callback
            emu.atomic_inc(hits)  # StaleObjectError (an Oops) if `hits` was freed
            emu.complete(done)
            return emu.IRQ_HANDLED
        return callback

    assert emu.request_irq(IRQ, counting(done), 0, "alive", None) == 0
    t = emu.Tasklet(counting(done))
    gc.collect()
    fire_elsewhere(done)
    emu.tasklet_schedule(t)
    wait_done(done, "the tasklet")
    assert emu.free_irq(IRQ, None) == "alive"


# --- what cannot be carried -----------------------------------------------------------------------

def _lock():
    return threading.Lock()


def _socket():
    return socket.socket()


def _file():
    return open(__file__)  # noqa: SIM115


@pytest.mark.parametrize("make, kind", [(_lock, "lock"), (_socket, "socket"), (_file, "file")],
                         ids=["lock", "socket", "file"])
def test_a_callback_that_cannot_be_carried_raises_type_error_and_takes_nothing(kernel, make,
                                                                               kind):
    thing = make()
    try:
        where, done = emu.Atomic(), emu.Completion()

        def grab(irq, dev):
            return emu.IRQ_HANDLED if thing else emu.IRQ_NONE

        used, tasklets = heap.heap_used(), tasklets_in_use()
        with pytest.raises(TypeError) as exc:
            emu.request_irq(IRQ, grab, 0, "grab", None)
        msg = str(exc.value)
        assert msg.startswith("handler test_callbacks.")
        assert "grab" in msg and "it captures thing = " in msg and kind in msg, msg

        with pytest.raises(TypeError, match=r"^callback .*lambda.* it captures thing = "):
            emu.Tasklet(lambda t: thing)
        t = emu.Tasklet(functools.partial(record, where, done))
        with pytest.raises(TypeError, match=r"^callback functools\.partial\(.*keywords"):
            emu.tasklet_setup(t, functools.partial(record, where, done, dev=thing))
        with pytest.raises(TypeError, match=r"^dev of handler .*record.* dev\[1\] = "):
            emu.request_irq(IRQ, functools.partial(record, where, done), 0, "dev", (1, thing))
        del t
        gc.collect()
        assert heap.heap_used() == used, "a rejected callback left heap blocks allocated"
        assert tasklets_in_use() == tasklets, "a rejected tasklet left its record allocated"

        assert emu.request_irq(IRQ, functools.partial(record, where, done), 0, "ok", None) == 0
        fire_elsewhere(done)
        assert emu.free_irq(IRQ, None) == "ok", "the line was left free"
    finally:
        if kind != "lock":
            thing.close()


@pytest.mark.emu_boot(cpus=2, heap_size=64 * 1024)
def test_heap_exhaustion_raises_capacity_error_naming_heap_size(kernel):
    blob = bytes(100 * 1024)
    used = heap.heap_used()
    with pytest.raises(emu.CapacityError, match=r"heap_size=65536 .*larger heap_size="):
        emu.request_irq(IRQ, lambda irq, dev: len(blob), 0, "big", None)
    with pytest.raises(emu.CapacityError, match="heap_size"):
        emu.Tasklet(lambda t: blob)
    assert heap.heap_used() == used
    where, done = emu.Atomic(), emu.Completion()
    assert emu.request_irq(IRQ, functools.partial(record, where, done), 0, "small", None) == 0
    fire_elsewhere(done)
    assert emu.free_irq(IRQ, None) == "small"


# --- free_irq(irq, dev) ---------------------------------------------------------------------------

def test_free_irq_finds_dev_by_identity_then_by_equality(kernel):
    where, done = emu.Atomic(), emu.Completion()
    handler = functools.partial(record, where, done)
    used = heap.heap_used()

    token = object()  # a copy of it in another task is not equal to it
    assert emu.request_irq(IRQ, handler, 0, "object", token) == 0
    assert emu.request_irq(IRQ, handler, 0, "busy", token) == -emu.EBUSY
    assert emu.free_irq(IRQ, token) == "object"

    a, b = [1], [1]  # equal, not identical: the kernel tells dev_ids apart by pointer
    assert emu.request_irq(IRQ, handler, emu.IRQF_SHARED, "a", a) == 0
    assert emu.request_irq(IRQ, handler, emu.IRQF_SHARED, "b", b) == 0
    assert emu.free_irq(IRQ, b) == "b"
    assert emu.free_irq(IRQ, [1]) == "a", "an equal dev names the action too"
    assert heap.heap_used() == used

    go, handle = emu.Completion(), emu.Atomic()

    def free_from_elsewhere(_):
        emu.wait_for_completion(go)
        return 1 if emu.free_irq(IRQ, handle) == "handle" else 0

    t = emu.kthread_run(free_from_elsewhere, None, "freer")  # forked before the request
    assert emu.request_irq(IRQ, handler, 0, "handle", handle) == 0
    emu.complete(go)
    assert stop_after_exit(t, T) == 1, "emu handles compare equal across tasks"
    assert heap.heap_used() == used


# --- the heap -------------------------------------------------------------------------------------

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


@pytest.mark.emu_boot(cpus=2, heap_size=64 * 1024)
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


@pytest.mark.emu_expect(oopses=1, warnings=1)
def test_heap_lock_of_a_killed_holder_is_taken_over_and_reported(kernel):
    import signal

    t = start_lock_holder(field_addr(image.this().img.hdr.heap, "lock"))
    os.kill(t.pid, signal.SIGKILL)
    where, done = emu.Atomic(), emu.Completion()
    assert emu.request_irq(IRQ, lambda irq, dev: record(where, done, irq, dev), 0, "x", None) == 0
    assert emu.kthread_stop(t) == 0
    assert f"heap lock taken over from dead task (pid {t.pid})" in "\n".join(kernel.dmesg())
    fire_elsewhere(done)
    assert emu.free_irq(IRQ, None) == "x"
    assert heap.heap_used() == 0
