"""Completions: counting, complete_all, FIFO wake-up, timed, interruptible and killable
waits, task states, use from every task, concurrency and misuse reports (spec §1, §3.5, §6).

Every waiter is a real kthread process. Tests learn that a waiter sleeps from its
emulated state (``wait_state``), and that a wake-up did or did not happen from the
state right after the waking call returned: wake-ups set TASK_RUNNING synchronously in
the waker, so a task that still shows D/S/I just after complete()/send_sig() was not
woken by it.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import traceback

import pytest

import emu

from util import stop_after_exit, wait_state, wait_until

#: A timeout (in jiffies) that never runs out during a test.
LONG = 600_000

# name: (call(c, timeout), takes a timeout, ps letter while blocked)
WAITS = {
    "plain": (lambda c, t: emu.wait_for_completion(c), False, "D"),
    "io": (lambda c, t: emu.wait_for_completion_io(c), False, "D"),
    "timeout": (emu.wait_for_completion_timeout, True, "D"),
    "io_timeout": (emu.wait_for_completion_io_timeout, True, "D"),
    "interruptible": (lambda c, t: emu.wait_for_completion_interruptible(c), False, "S"),
    "interruptible_timeout": (emu.wait_for_completion_interruptible_timeout, True, "S"),
    "killable": (lambda c, t: emu.wait_for_completion_killable(c), False, "D"),
    "killable_timeout": (emu.wait_for_completion_killable_timeout, True, "D"),
    "state_uninterruptible":
        (lambda c, t: emu.wait_for_completion_state(c, emu.TASK_UNINTERRUPTIBLE), False, "D"),
    "state_interruptible":
        (lambda c, t: emu.wait_for_completion_state(c, emu.TASK_INTERRUPTIBLE), False, "S"),
    "state_killable":
        (lambda c, t: emu.wait_for_completion_state(c, emu.TASK_KILLABLE), False, "D"),
    "state_idle": (lambda c, t: emu.wait_for_completion_state(c, emu.TASK_IDLE), False, "I"),
}
VOID = {"plain", "io"}
TIMED = [k for k, (_, timed, _) in WAITS.items() if timed]
UNINTERRUPTIBLE = ["plain", "io", "timeout", "io_timeout", "state_uninterruptible", "state_idle"]
INTERRUPTIBLE = ["interruptible", "interruptible_timeout", "state_interruptible"]
KILLABLE = ["killable", "killable_timeout", "state_killable"]

OK = 1  # wait_code() of a wait that completed
BAD = -999  # wait_code() of a return value no variant may give


def letter(kind: str) -> str:
    return WAITS[kind][2]


def wait_code(kind: str, c: emu.Completion, timeout: int = LONG) -> int:
    """Run wait variant `kind`: OK if it completed, 0 if it timed out, -ERESTARTSYS if a
    signal ended it, BAD for a value outside the variant's contract."""
    call, timed, _ = WAITS[kind]
    r = call(c, timeout)
    if kind in VOID:
        return OK if r is None else BAD
    if not isinstance(r, int) or isinstance(r, bool):
        return BAD
    if r == -emu.ERESTARTSYS:
        return r
    if timed:
        return OK if 1 <= r <= timeout else 0 if r == 0 else BAD
    return OK if r == 0 else BAD


def waiter(kind: str, c: emu.Completion, allow: tuple[int, ...] = (), timeout: int = LONG):
    """threadfn: allow `allow` signals, wait with variant `kind`, return wait_code()."""
    def fn(_):
        for sig in allow:
            emu.allow_signal(sig)
        return wait_code(kind, c, timeout)
    return fn


def start_waiter(kind: str, c: emu.Completion, name: str, allow: tuple[int, ...] = ()) -> emu.Task:
    """Start a waiter kthread and return once it is asleep on `c` (so it is queued)."""
    t = emu.kthread_run(waiter(kind, c, allow), None, name)
    wait_state(t, letter(kind))
    return t


def letters(tasks: list[emu.Task]) -> list[str]:
    return [emu.task_state_to_char(t) for t in tasks]


def settle(t: emu.Task, sleeping: str) -> str:
    """After a wake-up of `t`: wait until it is asleep again or gone; returns the letter."""
    wait_until(lambda: emu.task_state_to_char(t) in (sleeping, "X"),
               what=f"{t.comm} to sleep again or exit")
    return emu.task_state_to_char(t)


def log_text(kernel) -> str:
    return "\n".join(kernel.dmesg())


def run_in_kthread(body, name: str = "probe", timeout: float = 5.0):
    """Run body() in a kthread and return its (picklable) result.

    For checks that would block the test process forever if emu were broken: a wait
    that should not sleep but does is then a bounded failure here, not a hung test
    run. An exception in body() is re-raised here as an AssertionError.
    """
    rx, tx = multiprocessing.Pipe(duplex=False)

    def fn(_):
        try:
            tx.send(("ok", body()))
        except BaseException:
            tx.send(("exc", traceback.format_exc()))
        return 0

    t = emu.kthread_run(fn, None, name)
    assert rx.poll(timeout), f"{name}: body() did not finish within {timeout}s"
    kind, value = rx.recv()
    assert stop_after_exit(t) == 0
    if kind == "exc":
        raise AssertionError(f"in kthread {name}:\n{value}")
    return value


def assert_no_waiter_queued(c: emu.Completion) -> None:
    """With done == 0: the next complete() goes to a new waiter, so no stale entry (a task
    that timed out, was interrupted or died) is left in the queue ahead of it."""
    assert c.done == 0
    probe = start_waiter("plain", c, "probe")
    emu.complete(c)
    assert emu.task_state_to_char(probe) in ("R", "X"), "complete() went to a stale waiter"
    assert stop_after_exit(probe) == OK
    assert c.done == 0


# --- 1. counting ---------------------------------------------------------------------------

def test_completes_post_counts_that_try_wait_consumes_one_at_a_time(kernel):
    c = emu.Completion()
    assert c.done == 0 and emu.completion_done(c) is False
    assert emu.try_wait_for_completion(c) is False
    for n in range(1, 4):
        emu.complete(c)
        assert c.done == n
    assert emu.completion_done(c) is True
    assert c.done == 3, "completion_done() must not consume"
    for n in (2, 1, 0):
        assert emu.try_wait_for_completion(c) is True
        assert c.done == n
    assert emu.try_wait_for_completion(c) is False
    assert c.done == 0 and emu.completion_done(c) is False


def test_failed_try_wait_does_not_queue_the_caller(kernel):
    """try_wait_for_completion() with done == 0 returns at once and leaves no waiter behind:
    the next complete() stays posted instead of going to a phantom waiter."""
    c = emu.Completion()
    assert emu.try_wait_for_completion(c) is False
    assert emu.task_state_to_char(emu.current()) == "R"
    emu.complete(c)
    assert c.done == 1


def test_posted_counts_let_exactly_that_many_new_waiters_through(kernel):
    c = emu.Completion()
    for _ in range(3):
        emu.complete(c)
    ts = [emu.kthread_run(waiter("plain", c), None, "pre%d", i) for i in range(4)]
    wait_until(lambda: sorted(letters(ts)) == ["D", "X", "X", "X"],
               what="three waiters to pass and one to block")
    assert c.done == 0
    emu.complete(c)
    assert [stop_after_exit(t) for t in ts] == [OK] * 4
    assert c.done == 0


def test_n_completes_release_exactly_n_sleeping_waiters(kernel):
    c = emu.Completion()
    ts = [start_waiter("plain", c, f"sleep{i}") for i in range(4)]
    emu.complete(c)
    emu.complete(c)
    wait_until(lambda: letters(ts).count("X") == 2, what="two waiters to finish")
    assert letters(ts) == ["X", "X", "D", "D"]
    assert c.done == 0
    emu.complete(c)
    emu.complete(c)
    assert [stop_after_exit(t) for t in ts] == [OK] * 4
    assert c.done == 0


def test_non_sleeping_helpers_work_in_atomic_context_without_reports(kernel):
    """complete*(), try_wait and completion_done never sleep: no might_sleep report with
    preemption and IRQs disabled (the fixture fails the test on any BUG)."""
    c = emu.Completion()
    emu.preempt_disable()
    emu.local_irq_disable()
    try:
        assert emu.try_wait_for_completion(c) is False
        emu.complete(c)
        assert emu.completion_done(c) is True
        assert emu.try_wait_for_completion(c) is True
        emu.complete_all(c)
        assert emu.try_wait_for_completion(c) is True
        emu.reinit_completion(c)
        emu.init_completion(c)
        assert emu.irqs_disabled(), "the irqsave helpers must restore the IRQ state"
    finally:
        emu.local_irq_enable()
        emu.preempt_enable()
    assert c.done == 0 and kernel.bugs == 0


# --- 2. complete_all -------------------------------------------------------------------------

def test_complete_all_sets_uint_max_and_wakes_every_waiter(kernel):
    c = emu.Completion()
    kinds = ["plain", "interruptible", "killable_timeout", "state_idle"]
    ts = [start_waiter(k, c, f"all{i}") for i, k in enumerate(kinds)]
    emu.complete_all(c)
    assert c.done == emu.UINT_MAX
    assert "D" not in letters(ts) and "S" not in letters(ts) and "I" not in letters(ts)
    assert [stop_after_exit(t) for t in ts] == [OK] * len(ts)
    assert c.done == emu.UINT_MAX, "waiters woken by complete_all() must not decrement"


def test_after_complete_all_every_wait_passes_at_once_without_consuming(kernel):
    c = emu.Completion()
    emu.complete_all(c)

    def every_variant():
        assert emu.wait_for_completion(c) is None
        assert emu.wait_for_completion_io(c) is None
        assert emu.wait_for_completion_timeout(c, 5) == 5
        assert emu.wait_for_completion_io_timeout(c, emu.MAX_SCHEDULE_TIMEOUT) \
            == emu.MAX_SCHEDULE_TIMEOUT
        assert emu.wait_for_completion_interruptible(c) == 0
        assert emu.wait_for_completion_interruptible_timeout(c, 7) == 7
        assert emu.wait_for_completion_killable(c) == 0
        assert emu.wait_for_completion_killable_timeout(c, 0) == 1
        for state in (emu.TASK_UNINTERRUPTIBLE, emu.TASK_INTERRUPTIBLE, emu.TASK_KILLABLE,
                      emu.TASK_IDLE):
            assert emu.wait_for_completion_state(c, state) == 0
        for _ in range(3):
            assert emu.try_wait_for_completion(c) is True
            assert emu.completion_done(c) is True
        return c.done

    assert run_in_kthread(every_variant) == emu.UINT_MAX
    assert emu.wait_for_completion_timeout(c, 5) == 5  # the booting task too
    assert c.done == emu.UINT_MAX
    ts = [emu.kthread_run(waiter(k, c), None, "late%d", i) for i, k in enumerate(WAITS)]
    assert [stop_after_exit(t) for t in ts] == [OK] * len(WAITS)
    assert c.done == emu.UINT_MAX


def test_complete_after_complete_all_keeps_uint_max(kernel):
    c = emu.Completion()
    emu.complete_all(c)
    for _ in range(3):
        emu.complete(c)
        assert c.done == emu.UINT_MAX


def test_reinit_completion_ends_complete_all(kernel):
    c = emu.Completion()
    emu.complete_all(c)
    emu.reinit_completion(c)
    assert c.done == 0 and emu.completion_done(c) is False
    assert emu.try_wait_for_completion(c) is False
    assert emu.wait_for_completion_timeout(c, 0) == 0
    t = start_waiter("plain", c, "afterreinit")
    emu.complete(c)
    assert stop_after_exit(t) == OK
    assert c.done == 0
    emu.complete(c)
    assert c.done == 1, "complete() counts again after reinit_completion()"


@pytest.mark.emu_expect(warnings=1)
def test_complete_all_twice_without_reinit_warns(kernel):
    c = emu.Completion()
    emu.complete_all(c)
    assert kernel.warnings == 0
    emu.complete_all(c)
    assert kernel.warnings == 1 and c.done == emu.UINT_MAX
    assert "complete_all() called twice" in log_text(kernel)
    emu.reinit_completion(c)
    emu.complete_all(c)  # proper reuse: no second report
    assert kernel.warnings == 1


# --- 3. FIFO -----------------------------------------------------------------------------------

def test_complete_wakes_exactly_the_longest_waiter(kernel):
    c = emu.Completion()
    kinds = ["plain", "interruptible", "timeout", "killable", "state_idle"]
    ts = [start_waiter(k, c, f"fifo{i}") for i, k in enumerate(kinds)]
    for i, t in enumerate(ts):
        emu.complete(c)
        # Only the head was woken, synchronously inside complete().
        assert emu.task_state_to_char(t) in ("R", "X")
        assert letters(ts[i + 1:]) == [letter(k) for k in kinds[i + 1:]]
        assert stop_after_exit(t) == OK
        assert c.done == 0


def set_fifo(pid: int, prio: int) -> None:
    """Give `pid` the real-time policy SCHED_FIFO (skip the test where that is not allowed)."""
    try:
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(prio))
    except PermissionError:
        pytest.skip("SCHED_FIFO is not permitted here")


def test_complete_all_wakes_waiters_in_fifo_order(kernel):
    """Wake order made visible with real-time scheduling: the waiters and the waker share
    one CPU under SCHED_FIFO, the waker at a higher priority, so complete_all() finishes
    before any waiter runs and the woken waiters then run one at a time, in the order
    they were woken. Each returns its position in that run order."""
    c = emu.Completion()
    seq = multiprocessing.Array("i", 1, lock=False)
    cpu = kernel.ncpus - 1

    def fn(kind):
        def run(_):
            r = wait_code(kind, c)
            pos = seq[0]
            seq[0] = pos + 1
            return pos if r == OK else BAD
        return run

    kinds = ["plain", "interruptible", "killable", "timeout", "state_idle"]
    ts = []
    for kind in kinds:
        t = emu.kthread_run_on_cpu(fn(kind), None, cpu, "order/%u")
        set_fifo(t.pid, 10)
        wait_state(t, letter(kind))
        ts.append(t)
    waker = emu.kthread_create_on_cpu(lambda _: emu.complete_all(c) or 0, None, cpu, "waker/%u")
    set_fifo(waker.pid, 20)
    emu.wake_up_process(waker)
    assert stop_after_exit(waker) == 0
    assert [stop_after_exit(t) for t in ts] == list(range(len(kinds)))


def test_interrupted_waiter_leaves_the_queue_and_the_rest_keep_their_order(kernel):
    c = emu.Completion()
    a = start_waiter("plain", c, "qa")
    b = start_waiter("interruptible", c, "qb", allow=(signal.SIGUSR1,))
    d = start_waiter("plain", c, "qd")
    assert emu.send_sig(signal.SIGUSR1, b, 0) == 0
    assert stop_after_exit(b) == -emu.ERESTARTSYS
    assert c.done == 0
    emu.complete(c)
    assert emu.task_state_to_char(a) in ("R", "X") and emu.task_state_to_char(d) == "D"
    emu.complete(c)
    assert stop_after_exit(a) == OK and stop_after_exit(d) == OK
    assert c.done == 0


def test_spurious_wakeup_keeps_the_waiters_queue_position(kernel):
    c = emu.Completion()
    a = start_waiter("plain", c, "spura")
    b = start_waiter("plain", c, "spurb")
    assert emu.wake_up_process(a) == 1
    assert settle(a, "D") == "D", "a spurious wake-up must not end the wait"
    emu.complete(c)
    assert emu.task_state_to_char(a) in ("R", "X") and emu.task_state_to_char(b) == "D"
    assert stop_after_exit(a) == OK
    emu.complete(c)
    assert stop_after_exit(b) == OK


# --- 4. timed waits --------------------------------------------------------------------------

@pytest.mark.emu_boot(hz=1000)
@pytest.mark.parametrize("kind", TIMED)
def test_timed_wait_times_out_with_0_and_leaves_no_trace(kernel, kind):
    c = emu.Completion()
    call = WAITS[kind][0]
    j0 = emu.jiffies()
    assert call(c, 20) == 0
    assert emu.jiffies() - j0 >= 20, "returned before the timeout ran out"
    assert_no_waiter_queued(c)


@pytest.mark.parametrize("kind", TIMED)
def test_timed_wait_already_done_returns_the_callers_timeout(kernel, kind):
    c = emu.Completion()
    call = WAITS[kind][0]
    for _ in range(4):
        emu.complete(c)

    def body():
        results = [call(c, 100), call(c, emu.MAX_SCHEDULE_TIMEOUT), call(c, 0)]
        left = c.done
        results += [call(c, 1), c.done, call(c, 0), c.done]
        return results, left

    # timeout 0 with nothing done is an immediate time-out (0); every success consumes one
    assert run_in_kthread(body) == ([100, emu.MAX_SCHEDULE_TIMEOUT, 1, 1, 0, 0, 0], 1)


@pytest.mark.emu_boot(hz=1000)
@pytest.mark.parametrize("kind", TIMED)
def test_timed_wait_completed_while_asleep_returns_the_jiffies_left(kernel, kind):
    c = emu.Completion()
    me = emu.current()
    T = 5000

    def completer(_):
        wait_state(me, letter(kind))
        emu.msleep(30)
        emu.complete(c)
        return 0

    helper = emu.kthread_run(completer, None, "completer")
    j0 = emu.jiffies()
    left = WAITS[kind][0](c, T)
    j1 = emu.jiffies()
    assert max(1, T - (j1 - j0)) <= left < T
    assert j1 - j0 >= 30
    assert c.done == 0
    assert stop_after_exit(helper) == 0


def test_wait_with_timeout_above_max_schedule_timeout_does_not_sleep_forever(kernel):
    """In the kernel an unsigned timeout above LONG_MAX is negative in schedule_timeout():
    "wrong timeout value", an immediate time-out (0). A ValueError naming the timeout is
    the other acceptable answer; sleeping for ~2**63 jiffies is not."""
    c = emu.Completion()

    def fn(_):
        try:
            return emu.wait_for_completion_timeout(c, emu.MAX_SCHEDULE_TIMEOUT + 1)
        except ValueError as exc:
            return 2 if "timeout" in str(exc) else BAD

    t = emu.kthread_run(fn, None, "hugetimeout")
    try:
        wait_until(lambda: emu.task_state_to_char(t) == "X", timeout=3.0,
                   what="the wait with timeout MAX_SCHEDULE_TIMEOUT + 1 to return")
    finally:
        emu.complete(c)  # releases the waiter if it did sleep
    assert stop_after_exit(t) in (0, 2)


# --- 5. interruptible, killable, uninterruptible -----------------------------------------

@pytest.mark.parametrize("kind", INTERRUPTIBLE)
def test_allowed_signal_ends_an_interruptible_wait_with_erestartsys(kernel, kind):
    c = emu.Completion()
    t = start_waiter(kind, c, "sigwait", allow=(signal.SIGUSR1,))
    assert emu.send_sig(signal.SIGUSR1, t, 0) == 0
    assert stop_after_exit(t) == -emu.ERESTARTSYS
    assert_no_waiter_queued(c)


@pytest.mark.parametrize("kind", INTERRUPTIBLE)
def test_signal_not_allowed_by_the_kthread_is_dropped_and_the_wait_goes_on(kernel, kind):
    c = emu.Completion()
    t = start_waiter(kind, c, "nosig")
    assert emu.send_sig(signal.SIGUSR1, t, 0) == 0
    assert emu.task_state_to_char(t) == "S", "a dropped signal must not wake the waiter"
    assert not emu.signal_pending(t)
    assert emu.wake_up_process(t) == 1  # make it re-check its wake condition
    assert settle(t, "S") == "S"
    emu.complete(c)
    assert stop_after_exit(t) == OK
    assert c.done == 0


def test_completion_beats_a_signal_pending_at_entry(kernel):
    """With a signal pending, a wait succeeds while done > 0 and is interrupted at once
    (without queueing, without consuming the signal) when done == 0."""
    c = emu.Completion()
    for _ in range(4):
        emu.complete(c)

    def body():
        me = emu.current()
        emu.allow_signal(signal.SIGUSR1)
        assert emu.send_sig(signal.SIGUSR1, me, 0) == 0
        assert emu.signal_pending(me)
        assert emu.wait_for_completion_interruptible(c) == 0
        assert emu.wait_for_completion_interruptible_timeout(c, 100) == 100
        assert emu.wait_for_completion_state(c, emu.TASK_INTERRUPTIBLE) == 0
        assert emu.wait_for_completion_interruptible_timeout(c, 0) == 1
        assert c.done == 0
        assert emu.wait_for_completion_interruptible(c) == -emu.ERESTARTSYS
        assert emu.wait_for_completion_interruptible_timeout(c, LONG) == -emu.ERESTARTSYS
        assert emu.wait_for_completion_state(c, emu.TASK_INTERRUPTIBLE) == -emu.ERESTARTSYS
        assert emu.signal_pending(me), "the wait must not consume the signal"
        return 0

    assert run_in_kthread(body) == 0
    assert_no_waiter_queued(c)


@pytest.mark.emu_boot(hz=1000)
def test_a_pending_signal_interrupts_only_the_states_it_may(kernel):
    """signal_pending_state(): a non-fatal signal interrupts only TASK_INTERRUPTIBLE waits,
    SIGKILL also killable ones, nothing interrupts uninterruptible or idle waits (they
    time out), and a posted completion beats even SIGKILL."""
    c = emu.Completion()

    def body():
        me = emu.current()
        emu.allow_signal(signal.SIGUSR1)
        emu.allow_signal(signal.SIGKILL)
        emu.send_sig(signal.SIGUSR1, me, 0)
        assert emu.wait_for_completion_killable_timeout(c, 5) == 0
        assert emu.wait_for_completion_timeout(c, 5) == 0
        assert emu.wait_for_completion_interruptible_timeout(c, 5) == -emu.ERESTARTSYS
        emu.send_sig(signal.SIGKILL, me, 0)
        assert emu.fatal_signal_pending(me)
        assert emu.wait_for_completion_killable(c) == -emu.ERESTARTSYS
        assert emu.wait_for_completion_killable_timeout(c, LONG) == -emu.ERESTARTSYS
        assert emu.wait_for_completion_state(c, emu.TASK_KILLABLE) == -emu.ERESTARTSYS
        assert emu.wait_for_completion_timeout(c, 5) == 0
        assert emu.wait_for_completion_io_timeout(c, 5) == 0
        emu.complete(c)
        assert emu.wait_for_completion_killable(c) == 0, "completion beats SIGKILL"
        return c.done

    assert run_in_kthread(body) == 0
    assert_no_waiter_queued(c)


@pytest.mark.parametrize("kind", KILLABLE)
def test_killable_wait_ends_only_on_sigkill(kernel, kind):
    c = emu.Completion()
    t = start_waiter(kind, c, "killable", allow=(signal.SIGUSR1, signal.SIGKILL))
    assert emu.send_sig(signal.SIGUSR1, t, 0) == 0
    assert emu.signal_pending(t) and not emu.fatal_signal_pending(t)
    assert emu.task_state_to_char(t) == "D", "SIGUSR1 must not wake a killable sleeper"
    emu.wake_up_process(t)
    assert settle(t, "D") == "D", "a pending SIGUSR1 must not end a killable wait"
    assert emu.send_sig(signal.SIGKILL, t, 0) == 0
    assert stop_after_exit(t) == -emu.ERESTARTSYS
    assert_no_waiter_queued(c)


@pytest.mark.parametrize("kind", UNINTERRUPTIBLE)
def test_uninterruptible_wait_ignores_every_signal_including_sigkill(kernel, kind):
    c = emu.Completion()
    sigs = (signal.SIGUSR1, signal.SIGTERM, signal.SIGKILL)
    t = start_waiter(kind, c, "unint", allow=sigs)
    for sig in sigs:
        assert emu.send_sig(sig, t, 0) == 0
        assert emu.task_state_to_char(t) == letter(kind)
    assert emu.fatal_signal_pending(t)
    emu.wake_up_process(t)
    assert settle(t, letter(kind)) == letter(kind)
    emu.complete(c)
    assert stop_after_exit(t) == OK
    assert c.done == 0


@pytest.mark.parametrize("kind", INTERRUPTIBLE)
def test_kthread_stop_ends_an_interruptible_wait(kernel, kind):
    """kthread_stop() sets the persistent TIF_NOTIFY_SIGNAL: no allow_signal() needed, and
    every later interruptible wait of the thread ends at once as well."""
    c = emu.Completion()

    def fn(_):
        first = wait_code(kind, c)
        second = wait_code(kind, c)
        return first if first == second else BAD

    t = emu.kthread_run(fn, None, "stopme")
    wait_state(t, "S")
    # Stopped from a helper, so a broken stop fails here after a bounded wait instead of
    # blocking the test process in kthread_stop() for good.
    stopper = emu.kthread_run(lambda t: emu.kthread_stop(t), t, "stopper")
    wait_state(t, "X")
    assert stop_after_exit(stopper) == -emu.ERESTARTSYS
    assert_no_waiter_queued(c)


@pytest.mark.parametrize("kind", ["plain", "killable", "killable_timeout", "state_idle"])
def test_kthread_stop_does_not_end_an_uninterruptible_or_killable_wait(kernel, kind):
    c = emu.Completion()
    target = start_waiter(kind, c, "target")
    stopper = emu.kthread_run(lambda t: emu.kthread_stop(t) + 1000, target, "stopper")
    wait_state(stopper, "D")  # inside kthread_stop(): the target was woken and flagged
    assert emu.signal_pending(target), "kthread_stop sets TIF_NOTIFY_SIGNAL"
    assert settle(target, letter(kind)) == letter(kind)
    assert emu.task_state_to_char(stopper) == "D"
    emu.complete(c)
    assert stop_after_exit(stopper) == 1000 + OK
    assert c.done == 0


# --- 6. task states ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(WAITS))
def test_waiting_task_shows_the_waits_state_letter(kernel, kind):
    c = emu.Completion()
    t = start_waiter(kind, c, "st_" + kind[:12])
    assert emu.task_state_to_char(t) == letter(kind)
    row = next(line for line in kernel.ps().splitlines() if f"[{t.full_name}]" in line)
    assert row.split()[:3] == [str(t.pid), str(t.cpu), letter(kind)]
    emu.complete(c)
    assert stop_after_exit(t) == OK
    assert emu.task_state_to_char(emu.current()) == "R"


# --- 7. usable from every task ---------------------------------------------------------------

def test_plain_forked_child_is_not_a_task_and_cannot_consume(kernel):
    """A process forked outside kthread_run() inherits the kernel but is no task: waits
    raise instead of sleeping (or consuming) as its parent's task."""
    c = emu.Completion()
    emu.complete(c)
    rx, tx = multiprocessing.Pipe(duplex=False)
    pid = os.fork()
    if pid == 0:
        try:
            try:
                emu.wait_for_completion_timeout(c, 1)
                tx.send("returned")
            except emu.EmuError as e:
                tx.send(str(e))
        finally:
            os._exit(0)
    try:
        assert rx.poll(10), "the forked child did not answer"
        assert "not an emu task" in rx.recv()
    finally:
        os.waitpid(pid, 0)
    assert c.done == 1, "the child consumed the completion as its parent's task"


def test_completion_created_after_fork_reaches_a_kthread_by_pickling(kernel):
    rx, tx = multiprocessing.Pipe(duplex=False)

    def fn(_):
        to_test, to_kthread = rx.recv()
        emu.complete(to_test)
        emu.wait_for_completion(to_kthread)
        return to_kthread.done + 10

    t = emu.kthread_run(fn, None, "pickled")
    to_test, to_kthread = emu.Completion(), emu.Completion()  # created after the fork
    tx.send((to_test, to_kthread))
    assert emu.wait_for_completion_timeout(to_test, 5 * kernel.hz) > 0
    wait_state(t, "D")
    emu.complete(to_kthread)
    assert stop_after_exit(t) == 10
    assert to_test.done == 0 and to_kthread.done == 0


def test_completion_created_in_a_kthread_works_in_the_test_and_dies_with_its_creator(kernel):
    rx, tx = multiprocessing.Pipe(duplex=False)

    def fn(_):
        mine, yours = emu.Completion(), emu.Completion()
        tx.send(pickle.dumps((mine, yours)))
        emu.complete(yours)
        emu.wait_for_completion(mine)
        return 3

    t = emu.kthread_run(fn, None, "creator")
    assert rx.poll(5)
    mine, yours = pickle.loads(rx.recv())
    assert emu.wait_for_completion_timeout(yours, 5 * kernel.hz) > 0
    wait_state(t, "D")
    assert mine.done == 0
    emu.complete(mine)
    assert stop_after_exit(t) == 3
    # The creating handles were garbage-collected when fn returned: both are freed.
    with pytest.raises(emu.StaleObjectError):
        _ = mine.done
    with pytest.raises(emu.StaleObjectError):
        emu.complete(yours)


# --- 8. concurrency ----------------------------------------------------------------------------

def test_concurrent_completes_from_many_kthreads_onto_many_waiters(kernel):
    c = emu.Completion()
    n, per = 4, 50
    go = emu.Completion()

    def complete_many(_):
        emu.wait_for_completion(go)
        for _ in range(per):
            emu.complete(c)
        return per

    def wait_many(_):
        emu.wait_for_completion(go)
        for _ in range(per):
            emu.wait_for_completion(c)
        return per

    cpus = [i % kernel.ncpus for i in range(n)]
    ts = [emu.kthread_run_on_cpu(wait_many, None, cpu, "cwait/%u") for cpu in cpus]
    ts += [emu.kthread_run_on_cpu(complete_many, None, cpu, "cpost/%u") for cpu in cpus]
    for t in ts:
        wait_state(t, "D")
    emu.complete_all(go)
    assert [stop_after_exit(t, timeout=30) for t in ts] == [per] * (2 * n)
    assert c.done == 0
    assert {t.cpu for t in ts} == set(range(kernel.ncpus))


def test_complete_all_racing_with_new_waiters_lets_every_one_through(kernel):
    c = emu.Completion()
    go = emu.Completion()
    kinds = list(WAITS)

    def racer(kind):
        def fn(_):
            emu.wait_for_completion(go)
            return sum(wait_code(kind, c) for _ in range(5))
        return fn

    def complete_all_now(_):
        emu.wait_for_completion(go)
        emu.complete_all(c)
        return 0

    ts = [emu.kthread_run(racer(k), None, "race%d", i) for i, k in enumerate(kinds)]
    allr = emu.kthread_run(complete_all_now, None, "allr")
    for t in ts + [allr]:
        wait_state(t, "D")
    emu.complete_all(go)
    assert [stop_after_exit(t) for t in ts] == [5 * OK] * len(ts)
    assert stop_after_exit(allr) == 0
    assert c.done == emu.UINT_MAX


@pytest.mark.emu_boot(hz=1000)
def test_waiters_timing_out_while_completes_arrive_conserve_the_count(kernel):
    """Every complete() is consumed by exactly one successful wait or is still in done,
    even when waiters time out at the moment it arrives."""
    c = emu.Completion()
    go = emu.Completion()
    posts, per_waiter = 2 * 30, 40
    kinds = ["timeout", "interruptible_timeout", "killable_timeout", "io_timeout"]

    def timed_waiter(kind):
        def fn(_):
            emu.wait_for_completion(go)
            return sum(wait_code(kind, c, timeout=1) == OK for _ in range(per_waiter))
        return fn

    def poster(_):
        emu.wait_for_completion(go)
        for _ in range(posts // 2):
            emu.complete(c)
            emu.usleep_range(300, 600)
        return 0

    ws = [emu.kthread_run(timed_waiter(k), None, "tw%d", i) for i, k in enumerate(kinds)]
    ps = [emu.kthread_run(poster, None, "tp%d", i) for i in range(2)]
    for t in ws + ps:
        wait_state(t, "D")
    emu.complete_all(go)
    assert [stop_after_exit(t, timeout=30) for t in ps] == [0, 0]
    got = [stop_after_exit(t, timeout=30) for t in ws]
    assert sum(got) + c.done == posts
    assert sum(got) <= posts < len(kinds) * per_waiter  # so some waits surely timed out


# --- 9. misuse reports -------------------------------------------------------------------------

@pytest.mark.emu_expect(warnings=1)
def test_init_completion_with_a_waiter_queued_warns_and_loses_it(kernel):
    c = emu.Completion()
    lost = start_waiter("interruptible", c, "lost", allow=(signal.SIGUSR1,))
    emu.init_completion(c)
    assert kernel.warnings == 1 and "init_completion()" in log_text(kernel)
    assert c.done == 0
    emu.complete(c)
    assert emu.task_state_to_char(lost) == "S", "a lost waiter is not woken by complete()"
    assert c.done == 1
    assert emu.try_wait_for_completion(c) is True
    assert_no_waiter_queued(c)  # complete() goes to a new waiter, not to the lost one
    assert emu.task_state_to_char(lost) == "S"
    emu.send_sig(signal.SIGUSR1, lost, 0)  # the only way out for the lost waiter
    assert stop_after_exit(lost) == -emu.ERESTARTSYS
    assert c.done == 0


@pytest.mark.emu_expect(warnings=1)
def test_reinit_completion_with_waiters_queued_warns(kernel):
    c = emu.Completion()
    t = start_waiter("plain", c, "reinitq")
    emu.reinit_completion(c)
    assert kernel.warnings == 1 and "reinit_completion()" in log_text(kernel)
    emu.complete(c)  # the waiter is still queued: reinit keeps the queue
    assert stop_after_exit(t) == OK
    assert c.done == 0


@pytest.mark.emu_expect(bugs=1)
def test_wait_with_preemption_disabled_reports_bug_even_when_done(kernel):
    c = emu.Completion()
    emu.complete(c)
    emu.preempt_disable()
    try:
        line = sys._getframe().f_lineno + 1
        assert emu.wait_for_completion_timeout(c, 0) == 1
    finally:
        emu.preempt_enable()
    assert c.done == 0
    assert kernel.bugs == 1
    log = log_text(kernel)
    where = re.escape(f"{os.path.basename(__file__)}:{line}")
    assert re.search(rf"BUG: sleeping function called from invalid context at \S*{where}\n", log), \
        "the report must name the sleeping call's caller"
    assert "in_atomic(): 1, irqs_disabled(): 0" in log


@pytest.mark.emu_expect(bugs=1)
def test_wait_with_irqs_disabled_reports_bug_and_reenables_irqs(kernel):
    c = emu.Completion()
    emu.complete(c)

    def fn(_):
        emu.local_irq_disable()
        r = emu.wait_for_completion_timeout(c, 0)
        return r * 10 + int(emu.irqs_disabled())

    t = emu.kthread_run(fn, None, "irqsoff")
    assert stop_after_exit(t) == 10, "expected result 1 and IRQs enabled again on return"
    assert c.done == 0
    log = log_text(kernel)
    assert "BUG: sleeping function called from invalid context" in log
    assert "irqs_disabled(): 1" in log


def test_might_sleep_report_is_not_suppressed_by_a_previous_kernel(tmp_path):
    """Each boot is a new kernel: a report in kernel 1 must not silence kernel 2's.
    Run in a fresh interpreter so no other test's report interferes."""
    script = textwrap.dedent("""
        import emu
        bugs = []
        for _ in range(2):
            with emu.boot(console_loglevel=0) as k:
                c = emu.Completion()
                emu.complete(c)
                emu.preempt_disable()
                emu.wait_for_completion_timeout(c, 0)
                emu.preempt_enable()
                bugs.append(k.bugs)
                del c  # freed in its own kernel
        print(bugs)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(emu.__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=30, check=True, cwd=tmp_path).stdout
    assert out.strip() == "[1, 1]"


def test_a_handle_outliving_its_kernel_does_not_free_a_completion_of_the_next_kernel():
    """A handle kept beyond shutdown (e.g. by a failed test's traceback) and collected
    while a later kernel runs must not touch that kernel's completions."""
    k1 = emu.boot()
    try:
        old = emu.Completion()
    finally:
        k1.shutdown()
    k2 = emu.boot()
    try:
        new = emu.Completion()
        del old
        gc.collect()
        emu.complete(new)
        assert new.done == 1
    finally:
        k2.shutdown()


# --- 10. a waiter killed for real --------------------------------------------------------------

@pytest.mark.emu_expect(oopses=1)
def test_kthread_killed_by_real_sigkill_is_removed_from_the_queue(kernel):
    c = emu.Completion()
    victim = start_waiter("plain", c, "victim")
    behind = start_waiter("plain", c, "behind")
    os.kill(victim.pid, signal.SIGKILL)
    wait_state(victim, "X")
    assert "died outside emu" in log_text(kernel)
    emu.complete(c)
    # Had the dead task stayed at the head, complete() would have gone to it.
    assert stop_after_exit(behind) == OK
    assert c.done == 0
    emu.complete(c)
    assert c.done == 1
    assert emu.kthread_stop(victim) == 0


# --- 11. argument validation and lifetime --------------------------------------------------

@pytest.mark.parametrize("kind", TIMED)
@pytest.mark.parametrize("bad, exc", [(-1, ValueError), (-emu.MAX_SCHEDULE_TIMEOUT, ValueError),
                                      (1.5, TypeError), ("10", TypeError), (None, TypeError),
                                      (True, TypeError)])
def test_bad_timeout_raises_naming_the_timeout(kernel, kind, bad, exc):
    c = emu.Completion()
    emu.complete(c)
    with pytest.raises(exc, match="timeout"):
        WAITS[kind][0](c, bad)
    assert c.done == 1, "a rejected call must not consume"


@pytest.mark.parametrize("state, exc", [(emu.TASK_RUNNING, ValueError),
                                        (emu.TASK_PARKED, ValueError),
                                        ("D", TypeError), (None, TypeError)])
def test_bad_wait_state_raises_naming_the_state(kernel, state, exc):
    c = emu.Completion()
    emu.complete(c)
    with pytest.raises(exc, match="state"):
        emu.wait_for_completion_state(c, state)
    assert c.done == 1


def test_freed_completion_raises_stale_object_error(kernel):
    c = emu.Completion()
    other = pickle.loads(pickle.dumps(c))
    for _ in range(20):  # a wait that wrongly goes through still cannot block
        emu.complete(other)
    assert c.done == 20 and other.done == 20
    index = c.index
    del c
    gc.collect()
    calls = [
        lambda: other.done,
        lambda: emu.complete(other),
        lambda: emu.complete_all(other),
        lambda: emu.init_completion(other),
        lambda: emu.reinit_completion(other),
        lambda: emu.try_wait_for_completion(other),
        lambda: emu.completion_done(other),
        lambda: emu.wait_for_completion(other),
        lambda: emu.wait_for_completion_timeout(other, 1),
        lambda: emu.wait_for_completion_interruptible(other),
        lambda: emu.wait_for_completion_killable(other),
        lambda: emu.wait_for_completion_state(other, emu.TASK_IDLE),
    ]
    for call in calls:
        with pytest.raises(emu.StaleObjectError):
            call()
    # The slot is reused by a new completion; the old handle stays stale.
    fresh = emu.Completion()
    assert fresh.index == index and fresh.done == 0
    with pytest.raises(emu.StaleObjectError):
        emu.complete(other)
    assert fresh.done == 0
