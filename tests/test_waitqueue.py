"""Wait queues (spec §13): wait_event*() return values and condition evaluation, the
wake-up discipline (non-exclusive all, exclusive FIFO one by one, the mode filter),
contexts, misuse, and the waits that moved off polling onto the wait queue.

Waiters are real kthreads. A wake-up sets TASK_RUNNING in the waker, so a task that
still shows D/S right after a wake_up*() returned was not woken by it.
"""

from __future__ import annotations

import signal

import pytest

import emu

from util import stop_after_exit, wait_state, wait_until

LONG = 600_000  # jiffies: never runs out during a test


def read(a: emu.Atomic) -> int:
    return emu.atomic_read(a)


def flag_set(flag: emu.Atomic):
    return lambda: emu.atomic_read(flag) > 0


def start_waiter(name, fn, *args):
    """A kthread running fn(*args); its return value is its result."""
    return emu.kthread_run(lambda _: fn(*args), None, name)


# --- condition and return values ------------------------------------------------------------

def test_true_condition_returns_at_once_with_the_timeout(kernel):
    wq = emu.WaitQueueHead()
    assert emu.wait_event_timeout(wq, lambda: True, 7) == 7
    assert emu.wait_event_timeout(wq, lambda: True, 0) == 1
    assert emu.wait_event_interruptible(wq, lambda: 1) == 0
    assert emu.wait_event(wq, lambda: True) is None
    assert not emu.waitqueue_active(wq)


def test_zero_timeout_with_false_condition_returns_0_without_sleeping(kernel):
    wq = emu.WaitQueueHead()
    calls = []
    assert emu.wait_event_timeout(wq, lambda: calls.append(1), 0) == 0
    assert calls == [1]  # tested once, never queued
    assert not emu.waitqueue_active(wq)


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_timeout_runs_out_with_condition_false_returns_0(kernel):
    wq = emu.WaitQueueHead()
    start = emu.jiffies()
    assert emu.wait_event_timeout(wq, lambda: False, 5) == 0
    assert emu.jiffies() - start >= 5


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_condition_true_exactly_at_timeout_returns_1(kernel):
    # False until 5 jiffies have passed: only the time-out's re-test sees it true.
    wq = emu.WaitQueueHead()
    end = emu.jiffies() + 5
    assert emu.wait_event_timeout(wq, lambda: emu.jiffies() >= end, 5) == 1


def test_woken_with_condition_true_returns_the_jiffies_left(kernel):
    wq, flag = emu.WaitQueueHead(), emu.Atomic()
    res = emu.Atomic(-99)

    def waiter():
        emu.atomic_set(res, emu.wait_event_timeout(wq, flag_set(flag), LONG))
        return 0

    t = start_waiter("wq-left", waiter)
    wait_state(t, "D")
    emu.atomic_set(flag, 1)
    emu.wake_up(wq)
    wait_until(lambda: read(res) != -99, 5, "the waiter to return")
    assert 1 <= read(res) <= LONG
    assert stop_after_exit(t) == 0


def test_a_false_condition_sleeps_again_after_a_wake_up(kernel):
    wq, flag, done = emu.WaitQueueHead(), emu.Atomic(), emu.Atomic()
    calls = emu.Atomic()

    def cond():
        emu.atomic_inc(calls)
        return emu.atomic_read(flag) > 0

    def waiter():
        emu.wait_event(wq, cond)
        emu.atomic_set(done, 1)
        return 0

    t = start_waiter("wq-again", waiter)
    wait_state(t, "D")
    before = read(calls)
    emu.wake_up(wq)
    wait_until(lambda: read(calls) > before and emu.task_state_to_char(t) == "D", 5,
               "the waiter to re-test and sleep again")
    assert read(done) == 0 and emu.waitqueue_active(wq)
    emu.atomic_set(flag, 1)
    emu.wake_up(wq)
    wait_until(lambda: read(done) == 1, 5, "the waiter to leave")
    assert stop_after_exit(t) == 0
    assert not emu.waitqueue_active(wq)


@pytest.mark.parametrize("form, letter, sig, want", [
    ("interruptible", "S", signal.SIGUSR1, -emu.ERESTARTSYS),
    ("killable", "D", signal.SIGKILL, -emu.ERESTARTSYS),
    ("interruptible_timeout", "S", signal.SIGUSR1, -emu.ERESTARTSYS),
])
def test_a_signal_ends_the_wait_with_erestartsys(kernel, form, letter, sig, want):
    wq = emu.WaitQueueHead()
    calls = {"interruptible": lambda: emu.wait_event_interruptible(wq, lambda: False),
             "killable": lambda: emu.wait_event_killable(wq, lambda: False),
             "interruptible_timeout":
                 lambda: emu.wait_event_interruptible_timeout(wq, lambda: False, LONG)}
    call = calls[form]

    def waiter():
        emu.allow_signal(sig)
        return call()

    t = start_waiter("wq-sig", waiter)
    wait_state(t, letter)
    assert emu.send_sig(sig, t, 0) == 0
    assert stop_after_exit(t) == want
    assert not emu.waitqueue_active(wq)


def test_killable_wait_ignores_other_signals(kernel):
    wq, flag = emu.WaitQueueHead(), emu.Atomic()

    def waiter():
        emu.allow_signal(signal.SIGUSR1)
        return emu.wait_event_killable(wq, flag_set(flag))

    t = start_waiter("wq-kill", waiter)
    wait_state(t, "D")
    emu.send_sig(signal.SIGUSR1, t, 0)
    assert emu.task_state_to_char(t) == "D"
    emu.atomic_set(flag, 1)
    emu.wake_up(wq)
    assert stop_after_exit(t) == 0


def test_a_true_condition_wins_over_a_pending_signal(kernel):
    wq = emu.WaitQueueHead()

    def waiter():
        emu.allow_signal(signal.SIGUSR1)
        emu.send_sig(signal.SIGUSR1, emu.current(), 0)
        # First test false (sleeps would follow), the re-test after queueing true.
        calls = iter([False, True])
        return emu.wait_event_interruptible(wq, lambda: next(calls))

    assert stop_after_exit(start_waiter("wq-win", waiter)) == 0


# --- the wake-up discipline -----------------------------------------------------------------

def _queue_exclusive(wq, flag, seq, n, tag=""):
    """n exclusive waiters queued in a known order; each records its wake-up rank."""
    ranks = [emu.Atomic() for _ in range(n)]
    tasks = []
    for i in range(n):
        def waiter(i=i):
            emu.wait_event_interruptible_exclusive(wq, flag_set(flag))
            emu.atomic_set(ranks[i], emu.atomic_inc_return(seq))
            return 0
        t = start_waiter(f"excl{tag}{i}", waiter)
        wait_state(t, "S")  # queued before the next one
        tasks.append(t)
    return tasks, ranks


def test_exclusive_waiters_are_woken_one_by_one_in_fifo_order(kernel):
    wq, flag, seq = emu.WaitQueueHead(), emu.Atomic(), emu.Atomic()
    tasks, ranks = _queue_exclusive(wq, flag, seq, 3)
    emu.atomic_set(flag, 1)
    for n in range(1, 4):
        emu.wake_up(wq)
        wait_until(lambda n=n: read(seq) == n, 5, f"wake-up {n}")
        assert sum(emu.task_state_to_char(t) == "S" for t in tasks) == 3 - n
    assert [read(r) for r in ranks] == [1, 2, 3]
    for t in tasks:
        assert stop_after_exit(t) == 0


def test_wake_up_wakes_every_non_exclusive_waiter_and_one_exclusive(kernel):
    wq, flag, seq = emu.WaitQueueHead(), emu.Atomic(), emu.Atomic()
    excl, _ = _queue_exclusive(wq, flag, seq, 2)
    plain = [start_waiter(f"plain{i}", lambda: emu.wait_event_interruptible(wq, flag_set(flag)))
             for i in range(2)]
    for t in plain:
        wait_state(t, "S")
    emu.atomic_set(flag, 1)
    emu.wake_up(wq)
    for t in plain:
        assert emu.task_state_to_char(t) != "S"
    assert [emu.task_state_to_char(t) == "S" for t in excl] == [False, True]
    emu.wake_up_all(wq)
    for t in plain + excl:
        assert stop_after_exit(t) == 0


def test_wake_up_nr_wakes_nr_exclusive_waiters(kernel):
    wq, flag, seq = emu.WaitQueueHead(), emu.Atomic(), emu.Atomic()
    excl, ranks = _queue_exclusive(wq, flag, seq, 3)
    emu.atomic_set(flag, 1)
    emu.wake_up_nr(wq, 2)
    assert [emu.task_state_to_char(t) == "S" for t in excl] == [False, False, True]
    emu.wake_up_nr(wq, 0)  # 0: no limit
    for t in excl:
        assert stop_after_exit(t) == 0
    assert sorted(read(r) for r in ranks) == [1, 2, 3]


def test_wake_up_interruptible_skips_uninterruptible_sleepers(kernel):
    wq, flag = emu.WaitQueueHead(), emu.Atomic()
    d = start_waiter("wq-d", lambda: emu.wait_event(wq, flag_set(flag)) or 0)
    wait_state(d, "D")
    excl, _ = _queue_exclusive(wq, flag, emu.Atomic(), 1)
    emu.atomic_set(flag, 1)
    emu.wake_up_interruptible(wq)
    assert emu.task_state_to_char(d) == "D"  # skipped, still queued
    assert emu.task_state_to_char(excl[0]) != "S"  # the count went to the S sleeper
    assert emu.waitqueue_active(wq)
    emu.wake_up(wq)
    for t in [d, *excl]:
        assert stop_after_exit(t) == 0


def test_wake_up_from_an_interrupt_handler(kernel):
    wq, flag = emu.WaitQueueHead(), emu.Atomic()

    def handler(irq, dev):
        emu.atomic_set(flag, 1)
        emu.wake_up_all(wq)
        return emu.IRQ_HANDLED

    t = start_waiter("wq-irq", lambda: emu.wait_event(wq, flag_set(flag)) or 0)
    wait_state(t, "D")
    assert emu.request_irq(3, handler, 0, "wq", None) == 0
    emu.irq_inject_interrupt(3)
    assert stop_after_exit(t) == 0
    emu.free_irq(3, None)


def test_the_queue_is_usable_from_every_task_and_picklable(kernel):
    import pickle

    wq = emu.WaitQueueHead()
    assert pickle.loads(pickle.dumps(wq)) == wq
    flag = emu.Atomic()
    waker = emu.kthread_run(lambda _: (emu.atomic_set(flag, 1), emu.wake_up(wq))[1] or 0, None,
                            "waker")
    emu.wait_event(wq, flag_set(flag))
    assert stop_after_exit(waker) == 0


# --- misuse and context ---------------------------------------------------------------------

@pytest.mark.emu_expect(bugs=1)
def test_wait_event_in_atomic_context_is_reported_even_if_true(kernel):
    wq = emu.WaitQueueHead()
    emu.preempt_disable()
    try:
        assert emu.wait_event_timeout(wq, lambda: True, 3) == 3
    finally:
        emu.preempt_enable()
    assert any("sleeping function called from invalid context" in line
               for line in kernel.dmesg())


def test_bad_arguments_name_the_argument(kernel):
    with pytest.raises(TypeError, match="wq_head must be an emu.WaitQueueHead, not Completion"):
        emu.wait_event(emu.Completion(), lambda: True)
    with pytest.raises(TypeError, match="wq_head must be an emu.WaitQueueHead, not NoneType"):
        emu.wake_up(None)
    wq = emu.WaitQueueHead()
    with pytest.raises(TypeError, match="condition must be callable"):
        emu.wait_event(wq, True)
    with pytest.raises(ValueError, match="timeout must be between"):
        emu.wait_event_timeout(wq, lambda: False, -1)
    with pytest.raises(ValueError, match="nr must not be negative"):
        emu.wake_up_nr(wq, -1)


def test_a_freed_queue_is_stale(kernel):
    import gc

    wq = emu.WaitQueueHead()
    other = emu.WaitQueueHead._from_index(wq.index, wq.generation)
    del wq
    gc.collect()
    with pytest.raises(emu.StaleObjectError, match="wait queue"):
        emu.wake_up(other)


# --- waits that no longer poll ----------------------------------------------------------------

def _spin_until(go):
    while not emu.atomic_read(go):
        pass


@pytest.mark.emu_boot(cpus=2)
def test_tasklet_kill_sleeps_while_the_tasklet_runs(kernel):
    entered, go = emu.Atomic(), emu.Atomic()

    def cb(t):
        emu.atomic_inc(entered)
        _spin_until(go)

    tl = emu.Tasklet(cb)
    runner = emu.kthread_run_on_cpu(lambda _: emu.tasklet_schedule(tl) or 0, None, 1, "tl/%u")
    wait_until(lambda: read(entered) == 1, 5, "the tasklet to run")
    killer = emu.kthread_run_on_cpu(lambda _: emu.tasklet_kill(tl) or 0, None, 0, "killer/%u")
    wait_state(killer, "D")  # asleep on the wait queue, not polling (it would show R)
    emu.atomic_set(go, 1)
    assert stop_after_exit(killer) == 0
    assert stop_after_exit(runner) == 0


@pytest.mark.emu_boot(cpus=2)
def test_synchronize_irq_sleeps_while_the_threaded_handler_runs(kernel):
    entered, go = emu.Atomic(), emu.Atomic()

    def thread_fn(irq, dev):
        emu.atomic_inc(entered)
        _spin_until(go)
        return emu.IRQ_HANDLED

    assert emu.request_threaded_irq(4, None, thread_fn, emu.IRQF_ONESHOT, "sync", None) == 0
    emu.irq_inject_interrupt(4)
    wait_until(lambda: read(entered) == 1, 5, "the threaded handler to run")
    syncer = emu.kthread_run(lambda _: emu.synchronize_irq(4) or 0, None, "syncer")
    wait_state(syncer, "D")
    emu.atomic_set(go, 1)
    assert stop_after_exit(syncer) == 0
    emu.free_irq(4, None)


def test_a_work_item_asleep_in_wait_event_does_not_hold_up_its_pool(kernel):
    """A waits in wait_event() for what B, queued after it on the same CPU, makes true:
    the pool must hear that A sleeps and start B (as for a completion wait)."""
    wq, flag, b_ran, a_done = emu.WaitQueueHead(), emu.Atomic(), emu.Completion(), \
        emu.Completion()

    def a(work):
        emu.wait_event(wq, lambda: emu.atomic_read(flag))
        emu.complete(a_done)

    def b(work):
        emu.atomic_set(flag, 1)
        emu.wake_up(wq)
        emu.complete(b_ran)

    wa, wb = emu.Work(a), emu.Work(b)
    emu.queue_work_on(0, emu.system_wq, wa)
    emu.queue_work_on(0, emu.system_wq, wb)
    assert emu.wait_for_completion_timeout(b_ran, 10 * kernel.hz), "B never ran: A held the pool"
    emu.wait_for_completion(a_done)
