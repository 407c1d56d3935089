"""kthread workers (spec §2.7): one kthread running its queued items in order.

Work functions are closures over emu objects (Completion gates the test opens, Atomic
counters and order stamps): each worker runs its own copy of the function, the emu
objects it captures stay shared. Tests learn that an item runs from a completion it
posts, and keep it running as long as they need by making it wait on a gate.
"""

from __future__ import annotations

import os
import time

import pytest

import emu
from emu.examples import kthread_worker as spi

from util import gated, stop_after_exit, wait_state, wait_until

IRQ = 5


def stamp(seq, slot):
    """A work function recording when (in the order of all stamps) it ran."""
    def fn(work):
        emu.atomic_set(slot, emu.atomic_inc_return(seq))
    return fn


def test_created_worker_waits_and_run_worker_starts_it(kernel):
    w = emu.kthread_create_worker(0, "kw/%d", 7)
    assert w.task.comm == "kw/7"
    assert emu.task_state_to_char(w.task) == "D"  # created, not woken (v6.14+)
    r = emu.kthread_run_worker(0, "kw-run")
    wait_state(r.task, "S")  # idle: interruptible sleep, as kthread_worker_fn()
    emu.kthread_destroy_worker(w)
    emu.kthread_destroy_worker(r)


def test_queue_return_values_and_first_queue_starts_a_created_worker(kernel):
    w = emu.kthread_create_worker(0, "kw")
    started, gate, runs = emu.Completion(), emu.Completion(), emu.Atomic()
    work = emu.KthreadWork(gated(started, gate, runs))
    assert emu.kthread_queue_work(w, work) is True  # also wakes the created worker
    emu.wait_for_completion(started)
    # running is not pending: a second queue succeeds, a third coalesces with it
    assert emu.kthread_queue_work(w, work) is True
    assert emu.kthread_queue_work(w, work) is False
    emu.complete_all(gate)
    emu.kthread_flush_worker(w)
    assert emu.atomic_read(runs) == 2
    emu.kthread_destroy_worker(w)


def test_items_run_in_queueing_order_in_the_worker_in_process_context(kernel):
    w = emu.kthread_run_worker_on_cpu(1, 0, "kw/%u")
    assert w.task.comm == "kw/1" and w.task.cpu == 1
    seq = emu.Atomic()
    slots = [emu.Atomic() for _ in range(8)]
    ctx = emu.Atomic()

    def where(work):
        ok = emu.in_task() and not emu.in_atomic() and emu.current() == w.task
        emu.atomic_set(ctx, 1 if ok else -1)

    works = [emu.KthreadWork(stamp(seq, s)) for s in slots]
    for work in works:
        assert emu.kthread_queue_work(w, work)
    probe = emu.KthreadWork(where)
    emu.kthread_queue_work(w, probe)
    emu.kthread_flush_worker(w)
    assert [emu.atomic_read(s) for s in slots] == list(range(1, 9))
    assert emu.atomic_read(ctx) == 1
    emu.kthread_destroy_worker(w)


def test_flush_work_waits_for_the_running_instance_and_returns_at_once_when_idle(kernel):
    w = emu.kthread_run_worker(0, "kw")
    started, gate, runs = emu.Completion(), emu.Completion(), emu.Atomic()
    work = emu.KthreadWork(gated(started, gate, runs))
    emu.kthread_flush_work(work)  # never queued: returns at once
    emu.kthread_queue_work(w, work)
    emu.wait_for_completion(started)
    flusher_done = emu.Completion()

    def flusher(_):
        emu.kthread_flush_work(work)
        emu.atomic_set(seen, emu.atomic_read(runs))
        emu.complete(flusher_done)
        return 0

    seen = emu.Atomic(-1)
    t = emu.kthread_run(flusher, None, "flusher")
    wait_state(t, "D")  # the flush waits uninterruptibly
    assert not emu.completion_done(flusher_done)
    emu.complete(gate)
    emu.wait_for_completion(flusher_done)
    assert emu.atomic_read(seen) == 1  # it returned only after the item finished
    emu.kthread_stop(t)
    emu.kthread_destroy_worker(w)


def test_cancel_sync_of_a_pending_item_returns_true_and_it_never_runs(kernel):
    w = emu.kthread_run_worker(0, "kw")
    started, gate = emu.Completion(), emu.Completion()
    blocker = emu.KthreadWork(gated(started, gate))
    runs = emu.Atomic()
    victim = emu.KthreadWork(lambda work: emu.atomic_inc(runs))
    emu.kthread_queue_work(w, blocker)
    emu.wait_for_completion(started)
    assert emu.kthread_queue_work(w, victim)
    assert emu.kthread_cancel_work_sync(victim) is True
    assert emu.kthread_cancel_work_sync(victim) is False  # idle now
    emu.complete(gate)
    emu.kthread_flush_worker(w)
    assert emu.atomic_read(runs) == 0
    emu.kthread_destroy_worker(w)


def test_cancel_sync_of_a_running_item_waits_and_blocks_queueing_meanwhile(kernel):
    w = emu.kthread_run_worker(0, "kw")
    started, gate, runs = emu.Completion(), emu.Completion(), emu.Atomic()
    work = emu.KthreadWork(gated(started, gate, runs))
    emu.kthread_queue_work(w, work)
    emu.wait_for_completion(started)
    result = emu.Atomic(-1)

    def canceller(_):
        emu.atomic_set(result, int(emu.kthread_cancel_work_sync(work)))
        return 0

    t = emu.kthread_run(canceller, None, "canceller")
    wait_state(t, "D")
    assert emu.kthread_queue_work(w, work) is False  # being cancelled: refused
    emu.complete_all(gate)
    wait_until(lambda: emu.atomic_read(result) != -1, what="the cancel to return")
    assert emu.atomic_read(result) == 0  # it was running, not pending
    assert emu.atomic_read(runs) == 1
    emu.kthread_stop(t)
    assert emu.kthread_queue_work(w, work) is True  # queueable again
    emu.kthread_flush_worker(w)
    assert emu.atomic_read(runs) == 2
    emu.kthread_destroy_worker(w)


def test_queue_from_an_interrupt_handler(kernel):
    w = emu.kthread_run_worker(0, "kw")
    ran, ctx = emu.Completion(), emu.Atomic()
    work = emu.KthreadWork(lambda wk: (emu.atomic_set(ctx, int(emu.in_task())),
                                       emu.complete(ran)))
    results = emu.Atomic(-1)

    def handler(irq, dev):
        emu.atomic_set(results, int(emu.kthread_queue_work(w, work)))
        return emu.IRQ_HANDLED

    assert emu.request_irq(IRQ, handler, 0, "kw-irq", None) == 0
    emu.irq_inject_interrupt(IRQ)
    emu.wait_for_completion(ran)
    assert emu.atomic_read(results) == 1 and emu.atomic_read(ctx) == 1
    emu.free_irq(IRQ, None)
    emu.kthread_destroy_worker(w)


def test_destroy_flushes_then_stops_the_thread(kernel):
    w = emu.kthread_run_worker(0, "kw")
    t = w.task
    runs = emu.Atomic()
    works = [emu.KthreadWork(lambda wk: emu.atomic_inc(runs)) for _ in range(5)]
    for work in works:
        emu.kthread_queue_work(w, work)
    emu.kthread_destroy_worker(w)
    assert emu.atomic_read(runs) == 5
    assert t.pid not in {x.pid for x in kernel.tasks()}


@pytest.mark.emu_expect(warnings=1)
def test_destroy_of_a_worker_without_a_task_warns(kernel):
    w = emu.kthread_run_worker(0, "kw")
    wait_state(w.task, "S")
    emu.kthread_stop(w.task)
    assert w.task is None  # the worker cleared worker->task on its way out
    emu.kthread_destroy_worker(w)
    assert "kthread_destroy_worker() of a worker without a task" in "\n".join(kernel.dmesg())


@pytest.mark.emu_expect(warnings=1)
def test_an_item_used_with_two_workers_warns(kernel):
    a, b = emu.kthread_run_worker(0, "kw-a"), emu.kthread_run_worker(0, "kw-b")
    work = emu.KthreadWork(lambda wk: None)
    emu.kthread_queue_work(a, work)
    emu.kthread_flush_worker(a)
    emu.kthread_queue_work(b, work)
    emu.kthread_flush_worker(b)
    assert "was used with another worker" in "\n".join(kernel.dmesg())
    emu.kthread_destroy_worker(a)
    emu.kthread_destroy_worker(b)


@pytest.mark.emu_expect(warnings=1)
def test_flushing_an_item_from_itself_is_reported_instead_of_hanging(kernel):
    w = emu.kthread_run_worker(0, "kw")
    done = emu.Completion()

    def self_flush(work):
        emu.kthread_flush_work(work)
        emu.complete(done)

    work = emu.KthreadWork(self_flush)
    emu.kthread_queue_work(w, work)
    emu.wait_for_completion(done)
    assert "possible recursive locking detected" in "\n".join(kernel.dmesg())
    emu.kthread_destroy_worker(w)


@pytest.mark.emu_expect(oopses=1)
def test_an_exception_in_an_item_is_an_oops_and_the_worker_goes_on(kernel):
    w = emu.kthread_run_worker(0, "kw")
    ok = emu.Completion()

    def boom(work):
        raise RuntimeError("boom")

    bad, good = emu.KthreadWork(boom), emu.KthreadWork(lambda wk: emu.complete(ok))
    emu.kthread_queue_work(w, bad)
    emu.kthread_queue_work(w, good)
    emu.wait_for_completion(ok)
    assert "RuntimeError in work item" in "\n".join(kernel.dmesg())
    emu.kthread_destroy_worker(w)


def test_init_work_replaces_the_function(kernel):
    w = emu.kthread_run_worker(0, "kw")
    which = emu.Atomic()
    work = emu.KthreadWork(lambda wk: emu.atomic_set(which, 1))
    emu.kthread_init_work(work, lambda wk: emu.atomic_set(which, 2))
    emu.kthread_queue_work(w, work)
    emu.kthread_flush_work(work)
    assert emu.atomic_read(which) == 2
    emu.kthread_destroy_worker(w)


def test_bad_arguments_name_the_argument(kernel):
    w = emu.kthread_run_worker(0, "kw")
    work = emu.KthreadWork(lambda wk: None)
    with pytest.raises(TypeError, match="worker must be an emu.KthreadWorker"):
        emu.kthread_queue_work(None, work)
    with pytest.raises(TypeError, match="work must be an emu.KthreadWork"):
        emu.kthread_queue_work(w, None)
    with pytest.raises(TypeError, match="fn must be callable"):
        emu.KthreadWork(None)
    with pytest.raises(TypeError, match="namefmt must be a str"):
        emu.kthread_create_worker(0, None)
    with pytest.raises(ValueError, match="cpu 9 does not exist"):
        emu.kthread_create_worker_on_cpu(9, 0, "x/%u")
    with pytest.raises(TypeError, match=r"fn .* cannot be carried"):
        lock = __import__("threading").Lock()
        emu.KthreadWork(lambda wk: lock.acquire())
    emu.kthread_destroy_worker(w)
    assert os.getpid() == emu.current().pid


# --- the example module ---------------------------------------------------------------------------

def test_example_message_pump_transfers_every_message_in_order(kernel):
    ctlr = spi.spi_init_queue("spi0", cpu=1)
    assert ctlr.worker.task.comm == "spi0" and ctlr.worker.task.cpu == 1
    sent = 0
    for message in range(1, 201):
        while not spi.spi_async(ctlr, message):  # ring full: let the pump catch up
            emu.kthread_flush_work(ctlr.pump)
        sent += message
    pumps_before_flush = emu.atomic_read(ctlr.pumps)
    spi.spi_destroy_queue(ctlr)
    assert emu.atomic64_read(ctlr.total) == sent
    assert emu.atomic_read(ctlr.tail) == 200
    assert 1 <= pumps_before_flush <= emu.atomic_read(ctlr.pumps) <= 200


# --- delayed work (the timer side waits for emu's timers) -----------------------------------------

def test_kthread_delayed_work_with_no_delay_and_mod_and_cancel(kernel):
    w = emu.kthread_run_worker(0, "kw")
    started, gate, runs = emu.Completion(), emu.Completion(), emu.Atomic()
    emu.kthread_queue_work(w, emu.KthreadWork(gated(started, gate)))
    emu.wait_for_completion(started)  # the worker is held: what follows stays queued
    dwork = emu.KthreadDelayedWork(lambda wk: emu.atomic_inc(runs))
    assert emu.kthread_queue_delayed_work(w, dwork, 0) is True
    assert emu.kthread_queue_delayed_work(w, dwork, 0) is False  # pending
    assert emu.kthread_mod_delayed_work(w, dwork, 0) is True  # pending: replaced
    assert emu.kthread_cancel_delayed_work_sync(dwork) is True
    assert emu.kthread_mod_delayed_work(w, dwork, 0) is False  # idle: queued now
    emu.complete(gate)
    emu.kthread_flush_work(dwork.work)
    assert emu.atomic_read(runs) == 1
    emu.kthread_destroy_worker(w)


def test_kthread_delayed_work_runs_after_its_delay(kernel):
    w = emu.kthread_run_worker(0, "kw")
    done = emu.Completion()
    dwork = emu.KthreadDelayedWork(lambda wk: emu.complete(done))
    start = emu.jiffies()
    try:
        assert emu.kthread_queue_delayed_work(w, dwork, emu.msecs_to_jiffies(20)) is True
        emu.wait_for_completion(done)
        assert emu.jiffies() - start >= emu.msecs_to_jiffies(20)
    finally:
        emu.kthread_destroy_worker(w)


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_kthread_delayed_work_never_runs_before_its_delay_in_jiffies(kernel):
    w = emu.kthread_run_worker(0, "kw")
    try:
        for delay in (1, 3, 11):
            when, done = emu.Atomic64(), emu.Completion()

            def fn(work, when=when, done=done):
                emu.atomic64_set(when, emu.jiffies())
                emu.complete(done)

            dwork = emu.KthreadDelayedWork(fn)
            start = emu.jiffies()
            assert emu.kthread_queue_delayed_work(w, dwork, delay) is True
            assert emu.kthread_queue_delayed_work(w, dwork, delay) is False  # armed
            emu.wait_for_completion(done)
            assert emu.atomic64_read(when) >= start + delay + 1  # time_after(jiffies, expires)
    finally:
        emu.kthread_destroy_worker(w)


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_kthread_mod_delayed_work_rearms_and_cancel_sync_of_an_armed_timer(kernel):
    w = emu.kthread_run_worker(0, "kw")
    runs, done, sentinel_done = emu.Atomic(), emu.Completion(), emu.Completion()

    def fn(work):
        emu.atomic_inc(runs)
        emu.complete(done)

    dwork = emu.KthreadDelayedWork(fn)
    sentinel = emu.KthreadDelayedWork(lambda wk: emu.complete(sentinel_done))
    try:
        assert emu.kthread_mod_delayed_work(w, dwork, 3600 * 1000) is False  # was idle
        assert emu.kthread_mod_delayed_work(w, dwork, 2) is True  # armed: re-armed
        emu.wait_for_completion(done)  # in 2 jiffies, not in an hour
        assert emu.kthread_queue_delayed_work(w, dwork, 3600 * 1000) is True  # an hour
        assert emu.kthread_cancel_delayed_work_sync(dwork) is True
        assert emu.kthread_cancel_delayed_work_sync(dwork) is False
        assert not emu.timer_pending(dwork.timer)
        emu.kthread_queue_delayed_work(w, sentinel, 20)  # dwork has not run meanwhile
        emu.wait_for_completion(sentinel_done)
        assert emu.atomic_read(runs) == 1
    finally:
        emu.kthread_destroy_worker(w)


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_a_kthread_delayed_work_that_rearms_itself_and_its_cancel(kernel):
    w = emu.kthread_run_worker(0, "kw")
    runs, done = emu.Atomic(), emu.Completion()

    def again(work):
        n = emu.atomic_inc_return(runs)
        if n == 5:
            emu.complete(done)
        emu.kthread_queue_delayed_work(w, work, 1)  # for ever (False once cancelling)

    dwork = emu.KthreadDelayedWork(again)
    try:
        emu.kthread_queue_delayed_work(w, dwork, 1)
        emu.wait_for_completion(done)
        emu.kthread_cancel_delayed_work_sync(dwork)
        seen = emu.atomic_read(runs)
        assert seen >= 5 and not emu.timer_pending(dwork.timer)
        sentinel_done = emu.Completion()
        sentinel = emu.KthreadDelayedWork(lambda wk: emu.complete(sentinel_done))
        emu.kthread_queue_delayed_work(w, sentinel, 10)
        emu.wait_for_completion(sentinel_done)
        assert emu.atomic_read(runs) == seen
    finally:
        emu.kthread_destroy_worker(w)


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_kthread_cancel_racing_the_timer_runs_each_instance_exactly_once_or_never(kernel):
    w = emu.kthread_run_worker(0, "kw")
    runs = emu.Atomic()
    dwork = emu.KthreadDelayedWork(lambda wk: emu.atomic_inc(runs))
    cancelled = 0
    try:
        for i in range(150):
            assert emu.kthread_queue_delayed_work(w, dwork, 1) is True
            for _ in range(i * 37 % 3000):  # land the cancel anywhere around the expiry
                pass
            cancelled += emu.kthread_cancel_delayed_work_sync(dwork)
            assert emu.atomic_read(runs) + cancelled == i + 1
    finally:
        emu.kthread_destroy_worker(w)


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_kthread_mod_delayed_work_while_the_timer_fires_never_runs_it_early(kernel):
    """kthread_mod_delayed_work() waits for a running timer callback (timer_delete_sync),
    takes the instance it queued and re-arms: the old arming never queues the item."""
    w = emu.kthread_run_worker(0, "kw")
    runs, firing = emu.Atomic(), emu.Atomic()
    dwork = emu.KthreadDelayedWork(lambda wk: emu.atomic_inc(runs))

    def slow(timer):  # 50 ms (busy: softirq) between firing and queueing the item
        emu.atomic_set(firing, 1)
        deadline = time.monotonic() + 0.05
        while time.monotonic() < deadline:
            pass
        emu.kthread_worker.kthread_delayed_work_timer_fn(timer)
        emu.atomic_set(firing, 2)

    timer = dwork.timer
    timer.dwork = dwork
    emu.timer_setup(timer, slow, emu.TIMER_IRQSAFE)
    result, in_window, done = emu.Atomic(-1), emu.Atomic(), emu.Completion()

    def armer(_):  # stays running on CPU 1: the timer fires there
        emu.kthread_queue_delayed_work(w, dwork, 1)
        while emu.atomic_read(firing) != 2:
            pass
        return 0

    def racer(_):  # on CPU 0, once the callback started
        while emu.atomic_read(firing) == 0:
            pass
        emu.atomic_set(in_window, int(emu.atomic_read(firing) == 1))  # else: came late
        emu.atomic_set(result, int(emu.kthread_mod_delayed_work(w, dwork, 3600 * 1000)))
        emu.complete(done)
        return 0

    try:
        threads = [emu.kthread_run_on_cpu(racer, None, 0, "racer"),
                   emu.kthread_run_on_cpu(armer, None, 1, "armer")]
        emu.wait_for_completion(done)
        for t in threads:
            stop_after_exit(t)
        # As in the kernel: False if the callback ran while mod's timer_delete_sync()
        # waited (mod's `canceling` made it drop the instance), True if it had queued
        # the item before (mod took it off the list).
        assert emu.atomic_read(result) in (0, 1)
        emu.kthread_flush_worker(w)
        if emu.atomic_read(in_window):
            assert emu.atomic_read(runs) == 0  # re-armed for an hour: not run
        assert emu.kthread_cancel_delayed_work_sync(dwork) is True
    finally:
        emu.kthread_destroy_worker(w)


@pytest.mark.emu_expect(warnings=2)
def test_destroying_a_worker_with_an_armed_delayed_work_warns_and_its_timer_drops_it(kernel):
    w = emu.kthread_run_worker(0, "kw")
    runs = emu.Atomic()
    dwork = emu.KthreadDelayedWork(lambda wk: emu.atomic_inc(runs))
    # Armed for a second: still armed when the worker is destroyed, on a loaded host too.
    assert emu.kthread_queue_delayed_work(w, dwork, kernel.hz) is True
    emu.kthread_destroy_worker(w)  # WARN: the kernel's delayed_work_list is not empty
    wait_until(lambda: any("has no running worker" in line for line in kernel.dmesg()),
               10.0, what="the timer's report")
    assert emu.atomic_read(runs) == 0 and not emu.timer_pending(dwork.timer)
