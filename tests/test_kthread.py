"""kthreads: creation, naming, placement, stop, park, exit, Oops (spec §2)."""

from __future__ import annotations

import os
import signal

import hypothesis.strategies as st
import psutil
import pytest
from hypothesis import HealthCheck, given, settings

import emu

from util import stop_after_exit, wait_state, wait_until


def idle_until_stopped(data):
    while not emu.kthread_should_stop():
        emu.schedule_timeout_interruptible(emu.MAX_SCHEDULE_TIMEOUT)
    return 0


def test_created_kthread_sleeps_in_D_and_has_not_run(kernel):
    ran = emu.Completion()
    t = emu.kthread_create(lambda c: emu.complete(c) or 7, ran, "created")
    assert emu.task_state_to_char(t) == "D"
    assert not emu.completion_done(ran)
    assert emu.wake_up_process(t) == 1
    emu.wait_for_completion(ran)
    assert emu.kthread_stop(t) == 7


def test_kthread_stop_returns_threadfn_value(kernel):
    t = emu.kthread_run(lambda d: d * 2, 21, "answer")
    assert stop_after_exit(t) == 42


def test_stop_racing_the_first_wakeup_is_EINTR_or_the_result(kernel):
    """kthread_stop() right after kthread_run(): -EINTR if the stop won, as in the kernel."""
    results = {emu.kthread_stop(emu.kthread_run(lambda d: 1, None, "race%d", i)) for i in range(5)}
    assert results <= {1, -emu.EINTR}


def test_kthread_stop_before_first_wakeup_is_EINTR_and_threadfn_never_runs(kernel):
    ran = emu.Completion()
    t = emu.kthread_create(lambda c: emu.complete(c) or 0, ran, "never")
    assert emu.kthread_stop(t) == -emu.EINTR
    assert not emu.completion_done(ran)


def test_kthread_stop_wakes_interruptible_sleeper(kernel):
    t = emu.kthread_run(idle_until_stopped, None, "idler")
    wait_state(t, "S")
    assert emu.kthread_stop(t) == 0


def test_stop_sets_persistent_notify_signal(kernel):
    """After kthread_stop, every interruptible sleep of the thread ends at once (v6.1+)."""
    started = emu.Completion()

    def fn(c):
        emu.complete(c)
        while not emu.kthread_should_stop():
            emu.schedule_timeout_interruptible(emu.MAX_SCHEDULE_TIMEOUT)
        results = [emu.msleep_interruptible(10_000) for _ in range(3)]
        assert emu.signal_pending(emu.current())
        emu.flush_signals(emu.current())
        assert emu.signal_pending(emu.current()), "flush_signals must not clear TIF_NOTIFY_SIGNAL"
        return 1 if all(r == 10_000 for r in results) else -1

    t = emu.kthread_run(fn, started, "notify")
    emu.wait_for_completion(started)
    assert emu.kthread_stop(t) == 1


def test_kthread_exit_and_complete_and_exit(kernel):
    t1 = emu.kthread_run(lambda d: emu.kthread_exit(5), None, "exit5")
    assert stop_after_exit(t1) == 5
    c = emu.Completion()
    t2 = emu.kthread_run(lambda c: emu.kthread_complete_and_exit(c, -3), c, "cae")
    emu.wait_for_completion(c)
    assert emu.kthread_stop(t2) == -3


def test_result_is_truncated_to_int(kernel):
    t = emu.kthread_run(lambda d: (1 << 32) + 9, None, "wide")
    assert stop_after_exit(t) == 9


def test_stop_of_a_thread_that_exited_by_itself_returns_its_result(kernel):
    t = emu.kthread_run(lambda d: 11, None, "selfexit")
    wait_state(t, "X")
    wait_until(lambda: not psutil.pid_exists(t.pid) or
               psutil.Process(t.pid).status() == psutil.STATUS_ZOMBIE, what="process exit")
    assert emu.kthread_stop(t) == 11


def test_names_comm_and_full_name(kernel):
    t = emu.kthread_create(idle_until_stopped, None, "averyveryverylongname/%d-%s", 3, "x")
    assert t.full_name == "averyveryverylongname/3-x"
    assert t.comm == "averyveryveryl"[:15] or len(t.comm) == 15
    assert t.comm == t.full_name[:15]
    assert t.mm is None and t.flags & emu.PF_KTHREAD
    assert emu.kthread_stop(t) == -emu.EINTR


def test_real_process_name_is_set(kernel):
    t = emu.kthread_run(idle_until_stopped, None, "procname")
    wait_state(t, "S")
    with open(f"/proc/{t.pid}/comm") as f:
        assert f.read().strip() == "procname"
    emu.kthread_stop(t)


def test_per_cpu_name_and_binding(kernel):
    cpu = kernel.ncpus - 1
    t = emu.kthread_run_on_cpu(idle_until_stopped, None, cpu, "ksoftirqd/%u")
    assert t.full_name == f"ksoftirqd/{cpu}"
    assert t.cpu == cpu and t.flags & emu.PF_NO_SETAFFINITY
    wait_state(t, "S")
    p = psutil.Process(t.pid)
    assert p.cpu_affinity() == [kernel.cpu_map[cpu]]
    assert p.cpu_num() == kernel.cpu_map[cpu]
    emu.kthread_stop(t)


def test_every_kthread_is_pinned_to_one_cpu(kernel):
    ts = [emu.kthread_run(idle_until_stopped, None, "pin/%d", i) for i in range(2 * kernel.ncpus)]
    for t in ts:
        wait_state(t, "S")
        p = psutil.Process(t.pid)
        assert p.cpu_affinity() == [kernel.cpu_map[t.cpu]]
        assert p.cpu_num() == kernel.cpu_map[t.cpu]
    assert {t.cpu for t in ts} == set(range(kernel.ncpus))
    for t in ts:
        emu.kthread_stop(t)


def test_kthread_bind_before_start(kernel):
    t = emu.kthread_create(idle_until_stopped, None, "bindme")
    emu.kthread_bind(t, 0)
    assert t.cpu == 0 and psutil.Process(t.pid).cpu_affinity() == [kernel.cpu_map[0]]
    emu.wake_up_process(t)
    wait_state(t, "S")
    assert psutil.Process(t.pid).cpu_num() == kernel.cpu_map[0]
    emu.kthread_stop(t)


@pytest.mark.emu_expect(warnings=1)
def test_kthread_bind_after_start_warns_and_does_not_bind(kernel):
    t = emu.kthread_run(idle_until_stopped, None, "late")
    wait_state(t, "S")
    before = t.cpu
    emu.kthread_bind(t, (before + 1) % kernel.ncpus)
    assert t.cpu == before
    assert any("WARNING:" in line for line in kernel.dmesg())
    emu.kthread_stop(t)


def test_bad_arguments_raise_naming_the_argument(kernel):
    with pytest.raises(TypeError, match="threadfn"):
        emu.kthread_create(42, None, "x")
    with pytest.raises(ValueError, match="cpu"):
        emu.kthread_create_on_cpu(idle_until_stopped, None, kernel.ncpus, "x/%u")
    with pytest.raises(TypeError, match="namefmt"):
        emu.kthread_run(idle_until_stopped, None, None)
    with pytest.raises(ValueError, match="namefmt"):
        emu.kthread_run(idle_until_stopped, None, "x/%d")


def test_park_unpark(kernel):
    def fn(data):
        while not emu.kthread_should_stop():
            if emu.kthread_should_park():
                emu.kthread_parkme()
            emu.schedule_timeout_interruptible(emu.MAX_SCHEDULE_TIMEOUT)
        return 0

    t = emu.kthread_run(fn, None, "parker")
    assert emu.kthread_park(t) == 0
    assert emu.task_state_to_char(t) == "P"
    assert emu.wake_up_process(t) == 0, "wake_up_process does not wake a parked task"
    emu.kthread_unpark(t)
    wait_state(t, "S")
    assert emu.kthread_park(t) == 0
    assert emu.kthread_stop(t) == 0  # stop unparks


def test_park_of_never_started_thread_parks_without_running_threadfn(kernel):
    ran = emu.Completion()
    t = emu.kthread_create(lambda c: emu.complete(c) or 0, ran, "coldpark")
    assert emu.kthread_park(t) == 0
    assert emu.task_state_to_char(t) == "P"
    assert not emu.completion_done(ran)
    emu.kthread_unpark(t)
    emu.wait_for_completion(ran)
    assert emu.kthread_stop(t) == 0


@pytest.mark.emu_expect(warnings=1)
def test_park_twice_is_EBUSY(kernel):
    def fn(data):
        while not emu.kthread_should_stop():
            if emu.kthread_should_park():
                emu.kthread_parkme()
            emu.schedule_timeout_interruptible(emu.MAX_SCHEDULE_TIMEOUT)
        return 0

    t = emu.kthread_run(fn, None, "park2")
    assert emu.kthread_park(t) == 0
    assert emu.kthread_park(t) == -emu.EBUSY
    emu.kthread_stop(t)


@pytest.mark.emu_expect(oopses=1)
def test_exception_in_threadfn_is_an_oops(kernel):
    t = emu.kthread_run(lambda d: 1 // 0, None, "oopser")
    assert stop_after_exit(t) == 0  # as Linux since 5.17
    log = "\n".join(kernel.dmesg())
    assert "Oops: ZeroDivisionError: " in log
    assert "Comm: oopser" in log and "Call Trace:" in log and "in <lambda>" in log
    assert "emu/kthread.py" not in log, "the trace starts at threadfn, without emu's frames"
    assert kernel.oopses == 1 and kernel.tainted
    # the kernel carries on
    assert stop_after_exit(emu.kthread_run(lambda d: 3, None, "after")) == 3


@pytest.mark.emu_expect(warnings=1)
def test_kthread_stop_twice_warns_instead_of_hanging(kernel):
    t = emu.kthread_run(lambda d: 1, None, "twice")
    assert stop_after_exit(t) == 1
    assert emu.kthread_stop(t) == -emu.ESRCH


@pytest.mark.emu_expect(warnings=1)
def test_should_stop_from_user_task_warns(kernel):
    assert emu.kthread_should_stop() is False


def test_kthread_data_and_func(kernel):
    data = {"k": 1}
    t = emu.kthread_create(idle_until_stopped, data, "datafn")
    assert emu.kthread_data(t) is data
    assert emu.kthread_func(t) is idle_until_stopped
    assert emu.kthread_func(emu.current()) is None
    emu.kthread_stop(t)


def test_kthread_creates_kthread(kernel):
    def child(data):
        return 5

    def parent(data):
        return stop_after_exit(emu.kthread_run(child, None, "grandchild")) + 1

    assert stop_after_exit(emu.kthread_run(parent, None, "parent")) == 6


def test_real_sigterm_does_not_end_an_uninterruptible_wait(kernel):
    c = emu.Completion()
    t = emu.kthread_run(lambda c: emu.wait_for_completion(c) or 8, c, "sigterm")
    wait_state(t, "D")
    for _ in range(10):
        os.kill(t.pid, signal.SIGTERM)
        os.kill(t.pid, signal.SIGINT)
    assert emu.task_state_to_char(t) == "D"
    emu.complete(c)
    assert emu.kthread_stop(t) == 8


def test_no_zombies_accumulate(kernel):
    for i in range(10):
        emu.kthread_stop(emu.kthread_run(lambda d: 0, None, "z%d", i))
    kids = psutil.Process().children()
    assert [p for p in kids if p.status() == psutil.STATUS_ZOMBIE] == []


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0%"),
                    min_size=1, max_size=40),
       n=st.integers(-10**6, 10**6))
def test_names_follow_the_format(kernel, name, n):
    t = emu.kthread_create(idle_until_stopped, None, name + "/%d", n)
    full = f"{name}/{n}"
    assert full.startswith(t.full_name) and len(t.full_name.encode()) <= 63
    assert len(full.encode()) <= 63 or len(t.full_name.encode()) > 59
    assert t.full_name.startswith(t.comm) and len(t.comm.encode()) <= 15
    assert len(full.encode()) <= 15 or len(t.comm.encode()) > 11
    assert emu.kthread_stop(t) == -emu.EINTR
