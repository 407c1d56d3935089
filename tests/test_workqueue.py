"""Workqueues (spec §12): kworker pools, queue/flush/cancel return values, concurrency
management, ordered and unbound workqueues, max_active, draining, misuse reports, and a
hypothesis state machine against a sequential model.

Work functions are closures over emu objects; each kworker runs its own copy of a
function, the Completions and Atomics it captures stay shared. Tests learn that an item
runs from a completion it posts, and keep it running by making it wait on a gate.
"""

from __future__ import annotations

import gc
import os
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import emu
from emu.examples import wq_irq

from util import gated, stop_after_exit, wait_state, wait_until

IRQ = 5


def counting(runs):
    return lambda work: emu.atomic_inc(runs)


def kworkers(kernel, prefix):
    return [t for t in kernel.tasks() if t.comm.startswith(prefix)]


# --- queueing, context, return values ---------------------------------------------------------

def test_queue_work_runs_the_item_in_a_kworker_of_that_cpu_in_process_context(kernel):
    facts = [emu.Atomic(-1) for _ in range(4)]
    done = emu.Completion()

    def fn(work):
        me = emu.current()
        emu.atomic_set(facts[0], me.cpu)
        emu.atomic_set(facts[1], int(me.comm.startswith(f"kworker/{me.cpu}:")))
        emu.atomic_set(facts[2], int(emu.in_task() and not emu.in_atomic() and me.mm is None))
        emu.atomic_set(facts[3], int(emu.current_work() == work))
        emu.complete(done)

    work = emu.Work(fn)
    assert emu.current_work() is None
    assert emu.queue_work_on(1, emu.system_wq, work) is True
    emu.wait_for_completion(done)
    assert [emu.atomic_read(f) for f in facts] == [1, 1, 1, 1]


def test_queue_work_returns_false_while_pending_and_true_while_running(kernel):
    started, gate, runs = emu.Completion(), emu.Completion(), emu.Atomic()
    blocker = emu.Work(gated(started, gate))
    wq = emu.alloc_ordered_workqueue("ordered", 0)
    work = emu.Work(counting(runs))
    emu.queue_work(wq, blocker)
    emu.wait_for_completion(started)
    assert emu.queue_work(wq, work) is True
    assert emu.work_pending(work)
    assert emu.queue_work(wq, work) is False  # coalesces: it runs once
    emu.complete(gate)
    emu.flush_workqueue(wq)
    assert emu.atomic_read(runs) == 1 and not emu.work_pending(work)
    # a running item is not pending: queueing it again runs it once more afterwards
    item = emu.Work(gated(started, gate, runs))
    emu.queue_work(wq, item)
    emu.wait_for_completion(started)
    assert not emu.work_pending(item)
    assert emu.queue_work(wq, item) is True
    emu.complete_all(gate)
    emu.flush_workqueue(wq)
    assert emu.atomic_read(runs) == 3
    emu.destroy_workqueue(wq)


def test_schedule_work_uses_the_system_workqueue(kernel):
    done = emu.Completion()
    work = emu.Work(lambda w: emu.complete(done))
    assert emu.schedule_work(work)
    emu.wait_for_completion(done)
    assert emu.system_wq.name == "events"
    assert emu.system_unbound_wq.name == "events_unbound"


def test_highpri_items_run_in_the_highpri_pool_started_on_first_use(kernel):
    emu.Work(lambda w: None)  # starts the normal pools only
    assert kworkers(kernel, "kworker/0:0H") == []
    comm = emu.Atomic()
    done = emu.Completion()

    def fn(work):
        emu.atomic_set(comm, int(emu.current().comm.startswith("kworker/1:")
                                 and emu.current().comm.endswith("H")))
        emu.complete(done)

    assert emu.queue_work_on(1, emu.system_highpri_wq, emu.Work(fn))
    emu.wait_for_completion(done)
    assert emu.atomic_read(comm) == 1
    wq = emu.alloc_workqueue("hi", emu.WQ_HIGHPRI, 0)
    emu.flush_workqueue(wq)
    emu.destroy_workqueue(wq)


def test_queue_from_an_interrupt_handler_defers_to_a_kworker_of_its_cpu(kernel):
    ran, cpu, results = emu.Completion(), emu.Atomic(-1), emu.Atomic(-1)

    def bottom_half(work):
        emu.atomic_set(cpu, emu.current().cpu if emu.in_task() else -2)
        emu.complete(ran)

    work = emu.Work(bottom_half)

    def top_half(irq, dev):
        emu.atomic_set(results, int(emu.schedule_work(work)))
        return emu.IRQ_HANDLED

    assert emu.request_irq(IRQ, top_half, 0, "wq-irq", None) == 0
    emu.irq_set_affinity(IRQ, 1)
    emu.irq_inject_interrupt(IRQ)
    emu.wait_for_completion(ran)
    assert emu.atomic_read(results) == 1
    assert emu.atomic_read(cpu) == 1  # queue_work() from the handler: the local CPU
    emu.free_irq(IRQ, None)


# --- flush and cancel ---------------------------------------------------------------------------

def test_flush_work_returns_whether_it_waited(kernel):
    started, gate, runs = emu.Completion(), emu.Completion(), emu.Atomic()
    work = emu.Work(gated(started, gate, runs))
    assert emu.flush_work(work) is False  # never queued
    emu.schedule_work(work)
    emu.wait_for_completion(started)
    result = emu.Atomic(-1)

    def flusher(_):
        emu.atomic_set(result, int(emu.flush_work(work)))
        return 0

    t = emu.kthread_run(flusher, None, "flusher")
    wait_state(t, "D")
    assert emu.atomic_read(result) == -1
    emu.complete(gate)
    wait_until(lambda: emu.atomic_read(result) != -1, what="flush_work() to return")
    assert emu.atomic_read(result) == 1 and emu.atomic_read(runs) == 1
    assert emu.flush_work(work) is False  # idle again
    emu.kthread_stop(t)


def test_cancel_work_sync_of_a_pending_item_returns_true_and_it_never_runs(kernel):
    wq = emu.alloc_ordered_workqueue("ordered", 0)
    started, gate = emu.Completion(), emu.Completion()
    blocker, runs = emu.Work(gated(started, gate)), emu.Atomic()
    victim = emu.Work(counting(runs))
    emu.queue_work(wq, blocker)
    emu.wait_for_completion(started)
    emu.queue_work(wq, victim)
    assert emu.cancel_work_sync(victim) is True
    assert not emu.work_pending(victim)
    assert emu.cancel_work_sync(victim) is False
    emu.complete(gate)
    emu.flush_workqueue(wq)
    assert emu.atomic_read(runs) == 0
    emu.destroy_workqueue(wq)


def test_cancel_work_sync_of_a_running_item_waits_and_refuses_queueing(kernel):
    started, gate, runs = emu.Completion(), emu.Completion(), emu.Atomic()
    work = emu.Work(gated(started, gate, runs))
    emu.schedule_work(work)
    emu.wait_for_completion(started)
    result = emu.Atomic(-1)

    def canceller(_):
        emu.atomic_set(result, int(emu.cancel_work_sync(work)))
        return 0

    t = emu.kthread_run(canceller, None, "canceller")
    wait_state(t, "D")
    assert emu.schedule_work(work) is False  # cancel in progress: refused
    emu.complete_all(gate)
    wait_until(lambda: emu.atomic_read(result) != -1, what="cancel_work_sync() to return")
    assert emu.atomic_read(result) == 0 and emu.atomic_read(runs) == 1
    assert not emu.work_pending(work)
    emu.kthread_stop(t)


def test_cancel_work_sync_stops_a_self_requeueing_item(kernel):
    runs = emu.Atomic()

    def again(work):
        emu.atomic_inc(runs)
        emu.schedule_work(work)

    work = emu.Work(again)
    emu.schedule_work(work)
    wait_until(lambda: emu.atomic_read(runs) >= 20, what="the item to run 20 times")
    emu.cancel_work_sync(work)
    n = emu.atomic_read(runs)
    assert not emu.work_pending(work)
    emu.msleep(20)  # a stopped item stays stopped: nothing ran meanwhile
    assert emu.atomic_read(runs) == n


def test_an_item_never_runs_on_two_workers_at_once(kernel):
    """Queued on CPU 1 while it runs on CPU 0, an item goes to the pool where it runs
    and starts only after the running instance returned (non-reentrancy)."""
    warm = emu.Work(lambda w: None)
    emu.queue_work_on(1, emu.system_wq, warm)  # CPU 1's pool has idle workers now
    emu.flush_work(warm)
    inside, overlap, calls = emu.Atomic(), emu.Atomic(), emu.Atomic()
    first, second, gate = emu.Completion(), emu.Completion(), emu.Completion()

    def item(work):
        if emu.atomic_inc_return(inside) > 1:
            emu.atomic_inc(overlap)
        if emu.atomic_inc_return(calls) == 1:
            emu.complete(first)
            emu.wait_for_completion(gate)
        else:
            emu.complete(second)
        emu.atomic_dec(inside)

    work = emu.Work(item)
    emu.queue_work_on(0, emu.system_wq, work)
    emu.wait_for_completion(first)
    assert emu.queue_work_on(1, emu.system_wq, work) is True
    assert emu.wait_for_completion_timeout(second, emu.msecs_to_jiffies(200)) == 0
    emu.complete(gate)
    emu.wait_for_completion(second)
    emu.flush_work(work)
    assert emu.atomic_read(calls) == 2 and emu.atomic_read(overlap) == 0


def test_flush_workqueue_waits_for_what_was_queued_before_not_for_chained_requeues(kernel):
    wq = emu.alloc_workqueue("flushme", 0, 0)
    runs, chained = emu.Atomic(), emu.Atomic()
    items = [emu.Work(lambda w: (emu.msleep(2), emu.atomic_inc(runs))) for _ in range(6)]

    def chain(work):
        emu.atomic_inc(chained)
        emu.msleep(1)
        emu.queue_work(wq, work)

    looper = emu.Work(chain)
    for i, work in enumerate(items):
        emu.queue_work_on(i % 2, wq, work)
    emu.queue_work(wq, looper)
    emu.flush_workqueue(wq)  # returns although the looper keeps re-queueing itself
    assert emu.atomic_read(runs) == 6
    assert emu.cancel_work_sync(looper) in (True, False)
    emu.destroy_workqueue(wq)


# --- pools and concurrency management ----------------------------------------------------------

def test_a_sleeping_item_does_not_hold_up_the_next_one_on_its_cpu(kernel):
    """A waits for a completion that B, queued after it on the same CPU, posts: the pool
    must start B while A sleeps (concurrency management), growing a worker."""
    a_waits, b_ran = emu.Completion(), emu.Completion()
    a_done = emu.Completion()

    def a(work):
        emu.wait_for_completion(a_waits)
        emu.complete(a_done)

    def b(work):
        emu.complete(a_waits)
        emu.complete(b_ran)

    wa, wb = emu.Work(a), emu.Work(b)
    emu.queue_work_on(0, emu.system_wq, wa)
    emu.queue_work_on(0, emu.system_wq, wb)
    emu.wait_for_completion(b_ran)
    emu.wait_for_completion(a_done)
    assert len(kworkers(kernel, "kworker/0:")) >= 2


def test_max_active_one_runs_one_item_at_a_time_even_when_it_sleeps(kernel):
    wq = emu.alloc_workqueue("one", 0, 1)
    inside, overlap, runs = emu.Atomic(), emu.Atomic(), emu.Atomic()

    def item(work):
        if emu.atomic_inc_return(inside) > 1:
            emu.atomic_inc(overlap)
        emu.msleep(3)
        emu.atomic_dec(inside)
        emu.atomic_inc(runs)

    items = [emu.Work(item) for _ in range(4)]
    for work in items:
        emu.queue_work_on(0, wq, work)
    emu.flush_workqueue(wq)
    assert emu.atomic_read(runs) == 4 and emu.atomic_read(overlap) == 0
    emu.destroy_workqueue(wq)


def test_unbound_items_run_at_once_in_unbound_kworkers(kernel):
    """A and B wait for each other: they finish only if both run at the same time."""
    wq = emu.alloc_workqueue("unbound", emu.WQ_UNBOUND, 0)
    ca, cb, names = emu.Completion(), emu.Completion(), emu.Atomic()

    def a(work):
        emu.complete(cb)
        emu.wait_for_completion(ca)
        emu.atomic_add(int(emu.current().comm.startswith("kworker/u")), names)

    def b(work):
        emu.complete(ca)
        emu.wait_for_completion(cb)
        emu.atomic_add(int(emu.current().comm.startswith("kworker/u")), names)

    wa, wb = emu.Work(a), emu.Work(b)
    emu.queue_work(wq, wa)
    emu.queue_work(wq, wb)
    emu.flush_workqueue(wq)
    assert emu.atomic_read(names) == 2
    emu.destroy_workqueue(wq)


def test_an_ordered_workqueue_runs_items_one_at_a_time_in_queueing_order(kernel):
    wq = emu.alloc_ordered_workqueue("ordered-%d", 0, 1)
    assert wq.name == "ordered-1"
    seq, inside, overlap = emu.Atomic(), emu.Atomic(), emu.Atomic()
    stamps = [emu.Atomic() for _ in range(10)]

    def make(i):
        def item(work):
            if emu.atomic_inc_return(inside) > 1:
                emu.atomic_inc(overlap)
            emu.atomic_set(stamps[i], emu.atomic_inc_return(seq))
            if i % 3 == 0:
                emu.msleep(1)  # a sleeping item does not let the next one start
            emu.atomic_dec(inside)
        return item

    items = [emu.Work(make(i)) for i in range(10)]
    for i, work in enumerate(items):
        emu.queue_work_on(i % 2, wq, work)
    emu.flush_workqueue(wq)
    assert [emu.atomic_read(s) for s in stamps] == list(range(1, 11))
    assert emu.atomic_read(overlap) == 0
    emu.destroy_workqueue(wq)


def test_idle_kworkers_sleep_in_task_idle(kernel):
    done = emu.Completion()
    emu.schedule_work(emu.Work(lambda w: emu.complete(done)))
    emu.wait_for_completion(done)
    for t in kworkers(kernel, "kworker/"):
        wait_state(t, "I")


# --- destroy, drain, misuse --------------------------------------------------------------------

def test_destroy_workqueue_drains_chained_items(kernel):
    wq = emu.alloc_workqueue("drainme", 0, 0)
    runs = emu.Atomic()

    def chain(work):
        if emu.atomic_inc_return(runs) < 10:
            emu.queue_work(wq, work)  # its own items may still queue while draining

    work = emu.Work(chain)
    emu.queue_work(wq, work)
    emu.destroy_workqueue(wq)
    assert emu.atomic_read(runs) == 10
    with pytest.raises(emu.StaleObjectError, match="destroyed"):
        emu.queue_work(wq, work)


@pytest.mark.emu_expect(warnings=1)
def test_queueing_on_a_workqueue_being_destroyed_from_elsewhere_is_refused(kernel):
    wq = emu.alloc_workqueue("dying", 0, 0)
    started, gate = emu.Completion(), emu.Completion()
    busy = emu.Work(gated(started, gate))
    emu.queue_work(wq, busy)
    emu.wait_for_completion(started)
    result = emu.Atomic(-1)

    def destroyer(_):
        emu.destroy_workqueue(wq)
        emu.atomic_set(result, 1)
        return 0

    t = emu.kthread_run(destroyer, None, "destroyer")
    wait_state(t, "D")  # draining: waits for the busy item
    runs = emu.Atomic()
    late = emu.Work(counting(runs))
    assert emu.queue_work(wq, late) is True  # the kernel says it queued it ...
    assert "workqueue: cannot queue" in "\n".join(kernel.dmesg())
    assert emu.work_pending(late)  # ... but dropped it, PENDING stuck
    assert emu.queue_work(wq, late) is False
    emu.complete(gate)
    wait_until(lambda: emu.atomic_read(result) == 1, what="destroy_workqueue() to return")
    assert emu.atomic_read(runs) == 0
    emu.kthread_stop(t)


@pytest.mark.emu_expect(warnings=2)
def test_flushing_or_cancelling_an_item_from_itself_is_reported_instead_of_hanging(kernel):
    done = emu.Atomic()

    def self_flush(work):
        emu.atomic_add(1 + int(emu.flush_work(work)), done)

    def self_cancel(work):
        emu.atomic_add(10 + 10 * int(emu.cancel_work_sync(work)), done)

    emu.schedule_work(emu.Work(self_flush))
    emu.schedule_work(emu.Work(self_cancel))
    wait_until(lambda: emu.atomic_read(done) == 11, what="both items to return")
    assert "possible recursive locking detected" in "\n".join(kernel.dmesg())


@pytest.mark.emu_expect(oopses=1)
def test_an_exception_in_an_item_is_an_oops_and_the_kworker_goes_on(kernel):
    ok = emu.Completion()

    def boom(work):
        raise RuntimeError("boom")

    bad = emu.Work(boom)
    emu.queue_work_on(0, emu.system_wq, bad)
    emu.flush_work(bad)
    good = emu.Work(lambda w: emu.complete(ok))
    emu.queue_work_on(0, emu.system_wq, good)
    emu.wait_for_completion(ok)
    assert "RuntimeError in work item" in "\n".join(kernel.dmesg())


@pytest.mark.emu_expect(oopses=1)
def test_kthread_exit_in_an_item_is_an_oops_and_the_kworker_goes_on(kernel):
    ok = emu.Completion()
    bad = emu.Work(lambda w: emu.kthread_exit(3))
    emu.queue_work_on(0, emu.system_wq, bad)
    emu.flush_work(bad)
    good = emu.Work(lambda w: emu.complete(ok))
    emu.queue_work_on(0, emu.system_wq, good)
    emu.wait_for_completion(ok)
    assert "KthreadExit in work item" in "\n".join(kernel.dmesg())


@pytest.mark.emu_expect(bugs=1)
def test_an_item_leaving_preemption_disabled_is_reported(kernel):
    leaky = emu.Work(lambda w: emu.preempt_disable())
    emu.schedule_work(leaky)
    emu.flush_work(leaky)
    assert "BUG: workqueue leaked atomic, lock or RCU" in "\n".join(kernel.dmesg())


def test_alloc_workqueue_clamps_max_active_and_truncates_the_name(kernel):
    wq = emu.alloc_workqueue("x" * 40, 0, 5000)
    log = "\n".join(kernel.dmesg())
    assert "max_active 5000 requested for" in log and "clamping between 1 and 2048" in log
    assert "name exceeds WQ_NAME_LEN. Truncating to: " + "x" * 31 in log
    assert wq.name == "x" * 31
    emu.destroy_workqueue(wq)


def test_bad_arguments_name_the_argument(kernel):
    work = emu.Work(lambda w: None)
    with pytest.raises(TypeError, match="wq must be an emu.Workqueue"):
        emu.queue_work(None, work)
    with pytest.raises(TypeError, match="work must be an emu.Work"):
        emu.queue_work(emu.system_wq, emu.KthreadWork(lambda w: None))
    with pytest.raises(ValueError, match="cpu 7 does not exist"):
        emu.queue_work_on(7, emu.system_wq, work)
    with pytest.raises(TypeError, match="fn must be callable"):
        emu.Work(3)
    with pytest.raises(TypeError, match="fmt must be a str"):
        emu.alloc_workqueue(None, 0, 0)
    with pytest.raises(TypeError, match="max_active must be an int"):
        emu.alloc_workqueue("x", 0, "1")


# --- a state machine against a sequential model -------------------------------------------------

N_ITEMS = 4
LOG = 256


class OrderedWorkqueueMachine(RuleBasedStateMachine):
    """An ordered workqueue held by a blocker item while the rules queue, cancel and test
    items: what each call returns is then exact. `release` lets everything run and
    checks that each item ran once per successful queue, in queueing order."""

    def __init__(self):
        super().__init__()
        self.kernel = emu.boot(cpus=2)
        self.wq = emu.alloc_ordered_workqueue("model", 0)
        self.seq = emu.Atomic()
        self.log = [emu.Atomic() for _ in range(LOG)]
        self.items = [emu.Work(self._fn(i)) for i in range(N_ITEMS)]
        self.started, self.gate = emu.Completion(), emu.Completion()
        self.blocker = emu.Work(gated(self.started, self.gate))
        self.pending = [False] * N_ITEMS
        self.order: list[int] = []
        self.ran: list[int] = []
        self._block()

    def _fn(self, i):
        seq, log = self.seq, self.log

        def fn(work):
            pos = emu.atomic_inc_return(seq)
            if pos <= LOG:
                emu.atomic_set(log[pos - 1], i + 1)
        return fn

    def _block(self):
        assert emu.queue_work(self.wq, self.blocker)
        emu.wait_for_completion(self.started)

    @rule(i=st.integers(0, N_ITEMS - 1))
    def queue(self, i):
        assert emu.queue_work(self.wq, self.items[i]) is (not self.pending[i])
        if not self.pending[i]:
            self.pending[i] = True
            self.order.append(i)

    @rule(i=st.integers(0, N_ITEMS - 1))
    def cancel_sync(self, i):
        assert emu.cancel_work_sync(self.items[i]) is self.pending[i]
        if self.pending[i]:
            self.pending[i] = False
            self.order.remove(i)

    @rule(i=st.integers(0, N_ITEMS - 1))
    def cancel(self, i):
        assert emu.cancel_work(self.items[i]) is self.pending[i]
        if self.pending[i]:
            self.pending[i] = False
            self.order.remove(i)

    @precondition(lambda self: len(self.ran) + N_ITEMS < LOG)
    @rule()
    def release(self):
        emu.complete(self.gate)
        emu.flush_workqueue(self.wq)
        self.ran += self.order
        self.order = []
        self.pending = [False] * N_ITEMS
        n = emu.atomic_read(self.seq)
        assert [emu.atomic_read(a) - 1 for a in self.log[:n]] == self.ran
        self._block()

    @invariant()
    def pending_matches(self):
        assert [emu.work_pending(w) for w in self.items] == self.pending

    def teardown(self):
        emu.complete(self.gate)
        emu.flush_workqueue(self.wq)
        emu.destroy_workqueue(self.wq)
        k = self.kernel
        assert k.warnings == 0 and k.bugs == 0 and k.oopses == 0, "\n".join(k.dmesg())
        k.shutdown()
        assert os.getpid() == os.getpid()


TestOrderedWorkqueueModel = OrderedWorkqueueMachine.TestCase
TestOrderedWorkqueueModel.settings = settings(
    max_examples=15, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])


# --- the example module ---------------------------------------------------------------------------

def test_example_wq_irq_defers_from_the_interrupt_handler(kernel):
    assert wq_irq.bottomhalf_init((6, 7)) == 0
    emu.irq_inject_interrupt(6)  # button 0: LED on, and a bottom half
    wait_until(lambda: "Bottom half workqueue ends" in "\n".join(kernel.dmesg()),
               what="the bottom half to run")
    dev = wq_irq._dev
    assert dev is not None
    for n in range(2, 22):  # button 1, pressed 20 times, faster than the bottom half runs
        emu.irq_inject_interrupt(7)
        wait_until(lambda n=n: emu.atomic_read(dev.presses) == n, what=f"press {n}")
    dev = wq_irq.bottomhalf_exit()
    assert emu.atomic_read(dev.led) == 0  # the last press was button 1's
    runs = emu.atomic_read(dev.runs)
    assert 2 <= runs <= 21  # presses while the bottom half was pending coalesced
    assert not emu.work_pending(dev.work)


# --- delayed work (the timer side waits for emu's timers) -----------------------------------------

def test_delayed_work_with_no_delay_is_queued_at_once(kernel):
    runs = emu.Atomic()
    dwork = emu.DelayedWork(counting(runs))
    assert emu.queue_delayed_work(emu.system_wq, dwork, 0) is True
    assert emu.flush_delayed_work(dwork) in (True, False)  # it may have run already
    assert emu.atomic_read(runs) == 1
    assert emu.mod_delayed_work(emu.system_wq, dwork, 0) is False  # idle: queued now
    emu.flush_work(dwork.work)
    assert emu.atomic_read(runs) == 2
    assert emu.cancel_delayed_work_sync(dwork) is False
    assert emu.schedule_delayed_work(dwork, 0) is True
    emu.flush_delayed_work(dwork)
    assert emu.cancel_delayed_work(dwork) is False
    assert emu.atomic_read(runs) == 3


def test_delayed_work_queued_while_pending_returns_false_and_mod_replaces_it(kernel):
    wq = emu.alloc_ordered_workqueue("dw", 0)
    started, gate, runs = emu.Completion(), emu.Completion(), emu.Atomic()
    emu.queue_work(wq, emu.Work(gated(started, gate)))
    emu.wait_for_completion(started)
    dwork = emu.DelayedWork(counting(runs))
    assert emu.queue_delayed_work(wq, dwork, 0) is True
    assert emu.queue_delayed_work(wq, dwork, 0) is False
    assert emu.mod_delayed_work(wq, dwork, 0) is True  # it was pending: replaced
    assert emu.cancel_delayed_work(dwork) is True
    emu.complete(gate)
    emu.flush_workqueue(wq)
    assert emu.atomic_read(runs) == 0
    emu.destroy_workqueue(wq)


def test_delayed_work_runs_after_its_delay(kernel):
    done = emu.Completion()
    dwork = emu.DelayedWork(lambda w: emu.complete(done))
    start = emu.jiffies()
    assert emu.schedule_delayed_work(dwork, emu.msecs_to_jiffies(20)) is True
    assert emu.schedule_delayed_work(dwork, 1) is False  # its timer is armed: pending
    emu.wait_for_completion(done)
    assert emu.jiffies() - start >= emu.msecs_to_jiffies(20)


def stamping(when, done):
    """A work function that records the jiffies it runs at, then says it ran."""
    def fn(work):
        emu.atomic64_set(when, emu.jiffies())
        emu.complete(done)
    return fn


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_a_delayed_work_never_runs_before_its_delay_in_jiffies(kernel):
    for delay in (1, 2, 5, 13):
        when, done = emu.Atomic64(), emu.Completion()
        dwork = emu.DelayedWork(stamping(when, done))
        start = emu.jiffies()
        assert emu.queue_delayed_work(emu.system_wq, dwork, delay) is True
        assert emu.work_pending(dwork)
        emu.wait_for_completion(done)
        # Its timer expires at (jiffies at the call) + delay, and runs once jiffies
        # passed that: time_after(jiffies, expires).
        assert emu.atomic64_read(when) >= start + delay + 1
        assert not emu.work_pending(dwork)


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_the_timer_of_a_delayed_work_runs_in_softirq_with_interrupts_off(kernel):
    facts = emu.Atomic(-1)
    done = emu.Completion()

    def spy(timer):
        emu.atomic_set(facts, int(emu.in_serving_softirq() and emu.irqs_disabled()))
        emu.workqueue.delayed_work_timer_fn(timer)

    dwork = emu.DelayedWork(lambda w: emu.complete(done))
    assert dwork.timer.flags & emu.TIMER_IRQSAFE
    timer = dwork.timer
    timer.dwork = dwork  # what the callback finds its item by (carried with the timer)
    emu.timer_setup(timer, spy, emu.TIMER_IRQSAFE)
    emu.schedule_delayed_work(dwork, 1)
    emu.wait_for_completion(done)
    assert emu.atomic_read(facts) == 1


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_mod_delayed_work_rearms_a_pending_timer_and_queues_an_idle_item(kernel):
    when, done = emu.Atomic64(), emu.Completion()
    dwork = emu.DelayedWork(stamping(when, done))
    assert emu.mod_delayed_work(emu.system_wq, dwork, 3600 * 1000) is False  # was idle
    start = emu.jiffies()
    assert emu.mod_delayed_work(emu.system_wq, dwork, 5) is True  # pending: re-armed
    emu.wait_for_completion(done)  # in 5 jiffies, not in an hour
    assert emu.atomic64_read(when) >= start + 5 + 1
    assert emu.mod_delayed_work(emu.system_wq, dwork, 0) is False  # idle: queued now
    emu.wait_for_completion(done)
    # A later mod pushes it back: it has not run when a sentinel due before it has.
    runs, sentinel_done = emu.Atomic(), emu.Completion()
    dwork2 = emu.DelayedWork(counting(runs))
    sentinel = emu.DelayedWork(lambda w: emu.complete(sentinel_done))
    # (200 ms, not a jiffy or two: a loaded host may not run the next line for that long)
    assert emu.schedule_delayed_work(dwork2, 200) is True
    assert emu.mod_delayed_work(emu.system_wq, dwork2, 3600 * 1000) is True
    emu.schedule_delayed_work(sentinel, 400)
    emu.wait_for_completion(sentinel_done)
    assert emu.atomic_read(runs) == 0
    assert emu.cancel_delayed_work_sync(dwork2) is True


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_cancel_delayed_work_sync_of_an_armed_timer_returns_true_and_it_never_runs(kernel):
    runs, sentinel_done = emu.Atomic(), emu.Completion()
    dwork = emu.DelayedWork(counting(runs))
    sentinel = emu.DelayedWork(lambda w: emu.complete(sentinel_done))
    assert emu.schedule_delayed_work(dwork, 200) is True  # 200 ms: see above
    assert emu.cancel_delayed_work_sync(dwork) is True
    assert not emu.work_pending(dwork)
    assert not emu.timer_pending(dwork.timer)
    assert emu.cancel_delayed_work_sync(dwork) is False  # idle now
    emu.schedule_delayed_work(sentinel, 400)  # due well after dwork would have been
    emu.wait_for_completion(sentinel_done)
    assert emu.atomic_read(runs) == 0
    assert emu.schedule_delayed_work(dwork, 1) is True  # usable again
    emu.flush_delayed_work(dwork)
    assert emu.atomic_read(runs) == 1
    # cancel_delayed_work() (no wait) of an armed timer: True as well.
    assert emu.schedule_delayed_work(dwork, 3600 * 1000) is True
    assert emu.cancel_delayed_work(dwork) is True
    assert emu.cancel_delayed_work(dwork) is False


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_flush_delayed_work_runs_an_armed_item_at_once(kernel):
    runs = emu.Atomic()
    dwork = emu.DelayedWork(counting(runs))
    assert emu.flush_delayed_work(dwork) is False  # idle: nothing to wait for
    assert emu.schedule_delayed_work(dwork, 3600 * 1000) is True  # an hour
    assert emu.flush_work(dwork) is False  # only its timer is armed: not waited for
    assert emu.flush_delayed_work(dwork) is True
    assert emu.atomic_read(runs) == 1
    assert not emu.work_pending(dwork) and not emu.timer_pending(dwork.timer)


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_a_delayed_work_that_rearms_itself_runs_until_it_stops(kernel):
    runs, done = emu.Atomic(), emu.Completion()

    def again(work):
        if emu.atomic_inc_return(runs) < 5:
            assert emu.schedule_delayed_work(work, 1) is True
        else:
            emu.complete(done)

    dwork = emu.DelayedWork(again)
    emu.schedule_delayed_work(dwork, 1)
    emu.wait_for_completion(done)
    assert emu.atomic_read(runs) == 5
    assert emu.cancel_delayed_work_sync(dwork) is False


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_cancel_delayed_work_sync_stops_a_self_rearming_item(kernel):
    runs, started = emu.Atomic(), emu.Completion()

    def forever(work):
        emu.atomic_inc(runs)
        emu.complete(started)
        emu.schedule_delayed_work(work, 1)

    dwork = emu.DelayedWork(forever)
    emu.schedule_delayed_work(dwork, 1)
    emu.wait_for_completion(started)
    emu.cancel_delayed_work_sync(dwork)
    seen = emu.atomic_read(runs)
    assert not emu.work_pending(dwork) and not emu.timer_pending(dwork.timer)
    sentinel_done = emu.Completion()
    emu.schedule_delayed_work(emu.DelayedWork(lambda w: emu.complete(sentinel_done)), 10)
    emu.wait_for_completion(sentinel_done)
    assert emu.atomic_read(runs) == seen


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_cancel_racing_the_timer_runs_each_queued_instance_exactly_once_or_never(kernel):
    """cancel_delayed_work_sync() True: that instance never runs; False: it has run
    (on return the item is neither pending nor running), whatever the timer did."""
    runs = emu.Atomic()
    dwork = emu.DelayedWork(counting(runs))
    cancelled = 0
    for i in range(150):
        assert emu.queue_delayed_work_on(i % 2, emu.system_wq, dwork, 1) is True
        for _ in range(i * 37 % 3000):  # land the cancel anywhere around the expiry
            pass
        cancelled += emu.cancel_delayed_work_sync(dwork)
        assert emu.atomic_read(runs) + cancelled == i + 1
    assert not emu.work_pending(dwork)


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_flush_delayed_work_racing_the_timer_always_waits_for_the_run(kernel):
    """Whether the timer is armed, firing (its callback queueing the item) or done,
    flush_delayed_work() returns only once that instance has run."""
    runs = emu.Atomic()
    dwork = emu.DelayedWork(counting(runs))
    for i in range(150):
        assert emu.queue_delayed_work_on(i % 2, emu.system_wq, dwork, 1) is True
        for _ in range(i * 37 % 3000):
            pass
        emu.flush_delayed_work(dwork)
        assert emu.atomic_read(runs) == i + 1 and not emu.work_pending(dwork)


def slow_timer_fn(firing, real_fn):
    """A delayed work's timer callback that says it fired, then takes 50 ms (busy, as
    softirq code may not sleep) before it does its job: a window for a racing call."""
    def fn(timer):
        emu.atomic_set(firing, 1)
        deadline = time.monotonic() + 0.05
        while time.monotonic() < deadline:
            pass
        real_fn(timer)
        emu.atomic_set(firing, 2)
    return fn


def race_with_firing_timer(arm, firing, race):
    """Arm a timer from a kthread on CPU 1 that stays there, running (so the timer fires
    on CPU 1 in it or its idle task), and call `race()` from a kthread on CPU 0 once the
    callback has started. Returns (what `race()` returned, as an int; True if the call
    started while the callback still ran: a racer kept off its CPU for the callback's
    50 ms comes late, and then only the exactly-once accounting holds)."""
    result, in_window, done = emu.Atomic(-1), emu.Atomic(), emu.Completion()

    def armer(_):
        arm()
        while emu.atomic_read(firing) != 2:  # bounded by the test's timeout
            pass
        return 0

    def racer(_):
        while emu.atomic_read(firing) == 0:
            pass
        emu.atomic_set(in_window, int(emu.atomic_read(firing) == 1))
        emu.atomic_set(result, int(race()))
        emu.complete(done)
        return 0

    threads = [emu.kthread_run_on_cpu(racer, None, 0, "racer"),
               emu.kthread_run_on_cpu(armer, None, 1, "armer")]
    emu.wait_for_completion(done)
    for t in threads:
        stop_after_exit(t)
    return emu.atomic_read(result), bool(emu.atomic_read(in_window))


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_flush_delayed_work_waits_for_a_timer_callback_that_is_running(kernel):
    runs, firing = emu.Atomic(), emu.Atomic()
    dwork = emu.DelayedWork(counting(runs))
    timer = dwork.timer
    timer.dwork = dwork
    emu.timer_setup(timer, slow_timer_fn(firing, emu.workqueue.delayed_work_timer_fn),
                    emu.TIMER_IRQSAFE)
    flushed, in_window = race_with_firing_timer(
        lambda: emu.queue_delayed_work(emu.system_wq, dwork, 1), firing,
        lambda: emu.flush_delayed_work(dwork))
    assert emu.atomic_read(runs) == 1  # the flush returned after the run, in any case
    if in_window:
        assert flushed == 1  # it waited for the callback, then for the run it queued


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_cancel_delayed_work_sync_while_the_timer_fires_takes_the_queued_instance(kernel):
    """try_to_grab_pending(): the timer cannot be deleted any more, so it waits for the
    callback to queue the item, then steals it: True, and it never runs."""
    runs, firing = emu.Atomic(), emu.Atomic()
    dwork = emu.DelayedWork(counting(runs))
    timer = dwork.timer
    timer.dwork = dwork
    emu.timer_setup(timer, slow_timer_fn(firing, emu.workqueue.delayed_work_timer_fn),
                    emu.TIMER_IRQSAFE)
    cancelled, in_window = race_with_firing_timer(
        lambda: emu.queue_delayed_work(emu.system_wq, dwork, 1), firing,
        lambda: emu.cancel_delayed_work_sync(dwork))
    emu.flush_workqueue(emu.system_wq)
    assert emu.atomic_read(runs) + cancelled == 1 and not emu.work_pending(dwork)
    if in_window:
        assert cancelled == 1
    # The pool of CPU 1 may be growing (the armer kept its only worker off the CPU).
    wait_until(lambda: all(emu.task_state_to_char(t) == "I"
                           for t in kworkers(kernel, "kworker/")), what="idle kworkers")


def test_a_delayed_work_with_a_cpu_is_queued_on_that_cpu(kernel):
    cpus = emu.Atomic(-1)
    done = emu.Completion()

    def fn(work):
        emu.atomic_set(cpus, emu.current().cpu)
        emu.complete(done)

    dwork = emu.DelayedWork(fn)
    target = kernel.ncpus - 1
    assert emu.queue_delayed_work_on(target, emu.system_wq, dwork, 1) is True
    emu.wait_for_completion(done)
    assert emu.atomic_read(cpus) == target


def test_delayed_works_own_a_timer_freed_with_them(kernel):
    timers = emu.image.this().img.timers
    dwork = emu.DelayedWork(lambda w: None)
    index = dwork.timer.index
    assert timers[index].in_use
    emu.schedule_delayed_work(dwork, 3600 * 250)
    del dwork  # armed: its timer still queues it, so nothing is freed yet
    gc.collect()
    assert timers[index].in_use and timers[index].pending
    dwork = emu.DelayedWork(lambda w: None)
    other = dwork.timer.index
    assert other != index
    del dwork
    gc.collect()
    assert not timers[other].in_use  # an idle one goes at once, with its timer


@pytest.mark.emu_expect(warnings=1)
def test_a_delayed_work_fired_after_destroy_workqueue_is_reported_and_dropped(kernel):
    wq = emu.alloc_workqueue("gone", 0, 0)
    runs = emu.Atomic()
    dwork = emu.DelayedWork(counting(runs))
    emu.queue_delayed_work(wq, dwork, 1)
    emu.destroy_workqueue(wq)  # the kernel: later a use-after-free
    wait_until(lambda: any("fired after its workqueue was destroyed" in line
                           for line in kernel.dmesg()), what="the report")
    assert emu.atomic_read(runs) == 0 and not emu.work_pending(dwork)


def test_a_work_handle_dropped_while_queued_still_runs_and_is_freed_then(kernel):
    wq = emu.alloc_ordered_workqueue("drop", 0)
    started, gate, runs = emu.Completion(), emu.Completion(), emu.Atomic()
    emu.queue_work(wq, emu.Work(gated(started, gate)))
    emu.wait_for_completion(started)
    work = emu.Work(counting(runs))
    index = work.index
    works = emu.image.this().img.works
    emu.queue_work(wq, work)
    del work  # the kernel would call this a use-after-free; emu keeps the item
    gc.collect()
    assert works[index].in_use
    emu.complete(gate)
    emu.flush_workqueue(wq)
    assert emu.atomic_read(runs) == 1
    assert not works[index].in_use  # its worker freed it
    idle = emu.Work(counting(runs))
    index = idle.index
    del idle
    gc.collect()
    assert not works[index].in_use  # an idle item goes at once
    emu.destroy_workqueue(wq)
