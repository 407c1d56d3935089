"""Sleeping, waking and time: schedule*, msleep*, jiffies, wake_up_process (spec §3)."""

from __future__ import annotations

import signal
import time

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import emu

from util import stop_after_exit, wait_state

FAST = pytest.mark.emu_boot(hz=1000)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(ms=st.integers(0, 10**9))
def test_msecs_jiffies_round_trip_rounds_up(kernel, ms):
    j = emu.msecs_to_jiffies(ms)
    assert j == -(-ms * kernel.hz // 1000)
    assert emu.jiffies_to_msecs(j) >= ms
    assert emu.jiffies_to_msecs(j) - ms < 1000 // kernel.hz
    assert emu.usecs_to_jiffies(ms * 1000) == j


def test_conversions_reject_bad_input(kernel):
    with pytest.raises(ValueError, match="m must not be negative"):
        emu.msecs_to_jiffies(-1)
    with pytest.raises(TypeError, match="msecs"):
        emu.msleep(1.5)
    with pytest.raises(ValueError, match="msecs"):
        emu.msleep(-3)
    with pytest.raises(ValueError, match="max_us"):
        emu.usleep_range(10, 5)


def test_jiffies_advance_at_hz(kernel):
    j0 = emu.jiffies()
    t0 = time.monotonic()
    emu.msleep(40)
    elapsed = time.monotonic() - t0
    assert emu.jiffies() - j0 >= emu.msecs_to_jiffies(40)
    assert elapsed >= 0.040


@FAST
def test_schedule_timeout_returns_0_when_the_time_runs_out(kernel):
    emu.set_current_state(emu.TASK_UNINTERRUPTIBLE)
    assert emu.schedule_timeout(20) == 0
    assert emu.current().state == emu.TASK_RUNNING


@FAST
def test_schedule_timeout_in_running_state_does_not_sleep(kernel):
    emu.set_current_state(emu.TASK_RUNNING)
    left = emu.schedule_timeout(5000)
    assert 4990 <= left <= 5000


def test_schedule_timeout_max_returns_max_after_wakeup(kernel):
    me = emu.current()
    t = emu.kthread_run(lambda task: (wait_state(task, "D"), emu.wake_up_process(task))[1],
                        me, "waker")
    emu.set_current_state(emu.TASK_UNINTERRUPTIBLE)
    assert emu.schedule_timeout(emu.MAX_SCHEDULE_TIMEOUT) == emu.MAX_SCHEDULE_TIMEOUT
    assert stop_after_exit(t) == 1


def test_wakeup_before_schedule_is_not_lost(kernel):
    """set state; (waker runs here); schedule() returns at once: no lost wake-up."""
    me = emu.current()
    emu.set_current_state(emu.TASK_UNINTERRUPTIBLE)
    t = emu.kthread_run(lambda task: emu.wake_up_process(task), me, "early")
    wait_state(t, "X")
    assert me.state == emu.TASK_RUNNING
    emu.schedule()
    assert stop_after_exit(t) == 1


def test_wake_up_process_return_values(kernel):
    t = emu.kthread_run(lambda d: emu.schedule_timeout_interruptible(emu.MAX_SCHEDULE_TIMEOUT)
                        and 0, None, "sleeper")
    wait_state(t, "S")
    assert emu.wake_up_process(t) == 1
    wait_state(t, "X")
    assert emu.wake_up_process(t) == 0
    assert emu.wake_up_process(emu.current()) == 0
    emu.kthread_stop(t)


@FAST
def test_schedule_timeout_returns_remaining_jiffies_when_woken(kernel):
    def fn(d):
        return emu.schedule_timeout_uninterruptible(10_000)

    t = emu.kthread_run(fn, None, "remaining")
    wait_state(t, "D")
    emu.wake_up_process(t)
    left = stop_after_exit(t)
    assert 9000 < left <= 10_000


@pytest.mark.parametrize("sleep, letter", [
    (emu.schedule_timeout_interruptible, "S"),
    (emu.schedule_timeout_uninterruptible, "D"),
    (emu.schedule_timeout_killable, "D"),
    (emu.schedule_timeout_idle, "I"),
])
def test_sleep_states_show_in_ps(kernel, sleep, letter):
    t = emu.kthread_run(lambda d: sleep(emu.MAX_SCHEDULE_TIMEOUT) and 0, None, "st")
    wait_state(t, letter)
    row = [line for line in kernel.ps().splitlines() if "[st]" in line][0]
    assert row.split()[2] == letter
    emu.wake_up_process(t)
    stop_after_exit(t)


def test_uninterruptible_sleep_ignores_signals_but_not_wake_up_process(kernel):
    def fn(d):
        emu.allow_signal(signal.SIGKILL)
        emu.allow_signal(signal.SIGUSR1)
        return emu.schedule_timeout_uninterruptible(emu.msecs_to_jiffies(300))

    t = emu.kthread_run(fn, None, "unint")
    wait_state(t, "D")
    assert emu.send_sig(signal.SIGUSR1, t, 0) == 0
    assert emu.send_sig(signal.SIGKILL, t, 0) == 0
    assert emu.task_state_to_char(t) == "D"
    # a bare schedule_timeout returns on kthread_stop()'s explicit wake-up (spec 2.5)
    assert 0 < emu.kthread_stop(t) <= emu.msecs_to_jiffies(300)


@FAST
def test_killable_sleep_ends_only_on_sigkill(kernel):
    def fn(d):
        emu.allow_signal(signal.SIGKILL)
        emu.allow_signal(signal.SIGUSR1)
        return emu.schedule_timeout_killable(60_000)

    t = emu.kthread_run(fn, None, "killable")
    wait_state(t, "D")
    emu.send_sig(signal.SIGUSR1, t, 0)
    assert emu.task_state_to_char(t) == "D"
    emu.send_sig(signal.SIGKILL, t, 0)
    assert 0 < stop_after_exit(t) <= 60_000


def test_signals_to_kthreads_are_dropped_unless_allowed(kernel):
    t = emu.kthread_run(lambda d: emu.msleep_interruptible(60_000), None, "deaf")
    wait_state(t, "S")
    assert emu.send_sig(signal.SIGUSR1, t, 0) == 0
    assert not emu.signal_pending(t)
    assert emu.task_state_to_char(t) == "S"
    emu.kthread_stop(t)  # TIF_NOTIFY_SIGNAL ends the interruptible sleep


def test_msleep_interruptible_returns_remaining_ms_on_signal(kernel):
    def fn(d):
        emu.allow_signal(signal.SIGUSR1)
        left = emu.msleep_interruptible(60_000)
        assert emu.signal_pending(emu.current())
        assert emu.kernel_dequeue_signal() == signal.SIGUSR1
        assert not emu.signal_pending(emu.current())
        return left

    t = emu.kthread_run(fn, None, "msi")
    wait_state(t, "S")
    assert emu.send_sig(signal.SIGUSR1, t, 0) == 0
    left = stop_after_exit(t)  # exits within seconds: the signal ended the sleep
    assert 0 < left <= 60_000 and left % (1000 // kernel.hz) == 0


def test_msleep_interruptible_with_signal_pending_at_entry(kernel):
    def fn(d):
        emu.allow_signal(signal.SIGUSR1)
        emu.send_sig(signal.SIGUSR1, emu.current(), 0)
        return emu.msleep_interruptible(10)

    assert stop_after_exit(emu.kthread_run(fn, None, "pending")) == emu.jiffies_to_msecs(
        emu.msecs_to_jiffies(10))


def test_msleep_sleeps_at_least_the_time(kernel):
    for ms in (0, 1, 5, 13):
        t0 = time.monotonic()
        emu.msleep(ms)
        assert time.monotonic() - t0 >= emu.jiffies_to_msecs(emu.msecs_to_jiffies(ms)) / 1000


def test_usleep_range_never_returns_early(kernel):
    t0 = time.monotonic_ns()
    emu.usleep_range(2000, 3000)
    assert time.monotonic_ns() - t0 >= 2_000_000


def test_negative_schedule_timeout_is_reported_and_returns_0(kernel):
    emu.set_current_state(emu.TASK_INTERRUPTIBLE)
    assert emu.schedule_timeout(-5) == 0
    assert emu.current().state == emu.TASK_RUNNING
    assert any("schedule_timeout: wrong timeout value fffffffffffffffb" in line
               for line in kernel.dmesg())


def test_send_sig_rejects_bad_signal_numbers(kernel):
    assert emu.send_sig(0, emu.current(), 0) == -emu.EINVAL
    assert emu.send_sig(65, emu.current(), 0) == -emu.EINVAL
    with pytest.raises(ValueError, match="sig"):
        emu.allow_signal(0)


def test_allow_kernel_signal_accepts_only_priv_sends(kernel):
    def fn(d):
        emu.allow_kernel_signal(signal.SIGUSR2)
        return emu.msleep_interruptible(60_000)

    t = emu.kthread_run(fn, None, "kernsig")
    wait_state(t, "S")
    emu.send_sig(signal.SIGUSR2, t, 0)
    assert not emu.signal_pending(t)
    emu.send_sig(signal.SIGUSR2, t, 1)
    assert 0 < stop_after_exit(t) <= 60_000  # it exits: the kernel's send ended the sleep


def test_disallow_signal_discards_pending(kernel):
    def fn(d):
        emu.allow_signal(signal.SIGUSR1)
        emu.send_sig(signal.SIGUSR1, emu.current(), 0)
        assert emu.signal_pending(emu.current())
        emu.disallow_signal(signal.SIGUSR1)
        return int(emu.signal_pending(emu.current()))

    assert stop_after_exit(emu.kthread_run(fn, None, "disallow")) == 0


@pytest.mark.emu_expect(bugs=1)
def test_sleeping_in_atomic_context_is_reported(kernel):
    emu.preempt_disable()
    try:
        emu.msleep(1)
    finally:
        emu.preempt_enable()
    log = "\n".join(kernel.dmesg())
    me = emu.current()
    assert f"BUG: scheduling while atomic: {me.comm}/{me.pid}/0x00000002" in log
