"""Booting, the kernel handle, the log, capacity limits and hygiene (nothing left behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import hypothesis.strategies as st
import psutil
import pytest
from hypothesis import given, settings

import emu
from emu.image import own_ipc_names, reclaim_orphans

from util import start_lock_holder, stop_after_exit, wait_until


def emu_shm(pid: int | None = None) -> set[str]:
    """IPC objects of kernels booted by `pid` (this process by default)."""
    return own_ipc_names(os.getpid() if pid is None else pid)


def test_boot_makes_the_booting_process_a_user_task():
    with emu.boot(cpus=2) as kernel:
        me = emu.current()
        assert me.pid == os.getpid() and me.mm is not None
        assert not me.flags & emu.PF_KTHREAD
        assert kernel.ncpus == 2 and kernel.hz == 250 == emu.HZ
        assert emu.task_state_to_char(me) == "R"
        assert [t.pid for t in kernel.tasks()] == [os.getpid()]
    with pytest.raises(emu.NotBootedError, match="emu.boot"):
        emu.current()


def test_booting_twice_is_an_error(kernel):
    with pytest.raises(emu.AlreadyBootedError, match="shut it down"):
        emu.boot()


def test_api_outside_a_kernel_is_an_error():
    with pytest.raises(emu.NotBootedError):
        emu.Completion()
    with pytest.raises(emu.NotBootedError):
        emu.kthread_run(lambda d: 0, None, "x")
    with pytest.raises(emu.NotBootedError):
        emu.printk("x")


@pytest.mark.parametrize("kwargs, exc, word", [
    ({"cpus": 0}, ValueError, "cpus"),
    ({"cpus": [999]}, ValueError, "cpus"),
    ({"cpus": "all"}, TypeError, "cpus"),
    ({"hz": 0}, ValueError, "hz"),
    ({"hz": 2.5}, TypeError, "hz"),
    ({"max_tasks": 1}, ValueError, "max_tasks"),
    ({"hung_task_timeout_secs": -1}, ValueError, "hung_task_timeout_secs"),
])
def test_bad_boot_arguments_name_the_argument(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        emu.boot(**kwargs)


def test_boot_leaves_nothing_in_dev_shm():
    with emu.boot():
        assert emu_shm() == set()
    assert emu_shm() == set()


def test_more_emulated_cpus_than_real_ones_round_robin():
    real = sorted(os.sched_getaffinity(0))
    with emu.boot(cpus=len(real) * 2) as kernel:
        assert kernel.cpu_map == real * 2


def test_task_capacity_error_damages_nothing():
    with emu.boot(max_tasks=3) as kernel:
        t1 = emu.kthread_create(lambda d: 0, None, "a")
        t2 = emu.kthread_create(lambda d: 0, None, "b")
        with pytest.raises(emu.CapacityError, match="max_tasks"):
            emu.kthread_create(lambda d: 0, None, "c")
        assert emu.kthread_stop(t1) == -emu.EINTR
        t3 = emu.kthread_run(lambda d: 4, None, "d")  # the freed slot is reusable
        assert stop_after_exit(t3) == 4
        assert emu.kthread_stop(t2) == -emu.EINTR
        assert kernel.warnings == 0


def test_completion_capacity_error():
    with emu.boot(max_tasks=2, max_completions=16) as kernel:
        cs = [emu.Completion() for _ in range(16 + 2 * 2)]
        with pytest.raises(emu.CapacityError, match="max_completions"):
            emu.Completion()
        del cs[0]  # freed when its creating handle goes away
        emu.Completion()
        assert kernel.warnings == 0


def test_printk_levels_timestamps_and_console(kernel, capfd):
    emu.printk("plain %d", 1)
    emu.pr_info("info line")
    emu.pr_err("error line")
    emu.printk(emu.KERN_WARNING + "warn ")
    emu.pr_cont("continued")
    log = kernel.dmesg()
    texts = [line[15:] for line in log]
    assert texts == ["plain 1", "info line", "error line", "warn continued"]
    for line in log:
        assert line[0] == "[" and line[13:15] == "] " and line[6] == "."
    err = capfd.readouterr().err
    assert "error line" in err and "info line" not in err


def test_log_ring_keeps_the_newest_records():
    with emu.boot(log_records=16) as kernel:
        for i in range(40):
            emu.pr_info("line %d", i)
        log = kernel.dmesg()
        assert len(log) == 16 and log[-1].endswith("line 39") and log[0].endswith("line 24")


def test_ps_table(kernel):
    t = emu.kthread_create(lambda d: 0, None, "pstest")
    lines = kernel.ps().splitlines()
    assert lines[0].split() == ["PID", "CPU", "S", "WCHAN", "COMMAND"]
    row = [line for line in lines if "[pstest]" in line][0].split()
    assert row == [str(t.pid), str(t.cpu), "D", "kthread", "[pstest]"]
    assert any(line.split()[0] == str(os.getpid()) and "[" not in line for line in lines[1:])
    emu.kthread_stop(t)


def test_shutdown_stops_remaining_kthreads():
    with emu.boot() as kernel:
        def loop(d):
            while not emu.kthread_should_stop():
                emu.msleep_interruptible(10_000)
            return 0
        pids = [emu.kthread_run(loop, None, "left%d", i).pid for i in range(3)]
        pids.append(emu.kthread_create(loop, None, "never").pid)
        sup = kernel.supervisor_pid
    for pid in pids + [sup]:
        assert not psutil.pid_exists(pid)


SCRIPT = textwrap.dedent("""
    import os, sys, emu
    k = emu.boot()
    def loop(d):
        while not emu.kthread_should_stop():
            emu.msleep(50)
        return 0
    ts = [emu.kthread_run(loop, None, "orphan%d", i) for i in range(4)]
    c = emu.Completion()
    ts.append(emu.kthread_run(lambda c: emu.wait_for_completion(c), c, "blocked"))
    print(k.supervisor_pid, *[t.pid for t in ts], flush=True)
    sys.stdin.read()
""")


def _spawn_kernel(tmp_path):
    # Run outside the checkout, so that the installed emu is imported, not the source tree.
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the kernel subprocess failed:\n{err}")
    sup, *pids = map(int, line.split())
    return proc, sup, pids


def _all_gone(pids, timeout=2.0):
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.01)
    return alive


def test_sigkill_of_the_booting_process_kills_every_task_within_2s(tmp_path):
    proc, sup, pids = _spawn_kernel(tmp_path)
    proc.kill()
    proc.communicate()
    assert _all_gone(pids + [sup]) == set()
    assert emu_shm(proc.pid) == set()


def test_sigkill_of_the_supervisor_kills_every_task_within_2s(tmp_path):
    proc, sup, pids = _spawn_kernel(tmp_path)
    try:
        os.kill(sup, signal.SIGKILL)
        assert _all_gone(pids) == set()
    finally:
        proc.kill()
        proc.communicate()
    assert emu_shm(proc.pid) == set()


def test_next_boot_reclaims_ipc_objects_of_a_dead_booter(tmp_path):
    """A boot killed between creating and unlinking a name leaves it; the next boot removes it."""
    import posix_ipc

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, cwd=tmp_path)
    dead = int(child.stdout)
    name = f"/emu-{dead}-{'ab' * 8}-3"
    posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600).close()
    assert emu_shm(dead) == {f"sem.emu-{dead}-{'ab' * 8}-3"}
    with emu.boot():
        pass
    assert emu_shm(dead) == set()
    assert reclaim_orphans() == []


@pytest.mark.emu_expect(oopses=1)
def test_kthread_killed_by_a_real_sigkill_is_an_oops_and_stop_returns(kernel):
    c = emu.Completion()
    t = emu.kthread_run(lambda c: emu.wait_for_completion(c), c, "victim")
    wait_until(lambda: emu.task_state_to_char(t) == "D")
    os.kill(t.pid, signal.SIGKILL)
    assert emu.kthread_stop(t) == 0
    assert "victim" in "\n".join(kernel.dmesg())
    emu.complete(c)  # the queue no longer holds the dead task
    assert c.done == 1


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_cpu_sets_map_to_real_cpus_and_pin(data):
    real = sorted(os.sched_getaffinity(0))
    cpus = data.draw(st.one_of(
        st.integers(1, 2 * len(real)),
        st.lists(st.sampled_from(real), min_size=1, max_size=4, unique=True),
    ))
    with emu.boot(cpus=cpus) as kernel:
        expected = [real[i % len(real)] for i in range(cpus)] if isinstance(cpus, int) else cpus
        assert kernel.cpu_map == expected and kernel.ncpus == len(expected)
        cpu = data.draw(st.integers(0, kernel.ncpus - 1))
        t = emu.kthread_create_on_cpu(lambda d: 0, None, cpu, "c%u")
        assert psutil.Process(t.pid).cpu_affinity() == [kernel.cpu_map[cpu]]
        assert emu.kthread_stop(t) == -emu.EINTR
        assert kernel.warnings == 0


@pytest.mark.emu_expect(oopses=1, warnings=1)
def test_completion_lock_of_a_killed_holder_is_taken_over_and_reported(kernel):
    """A task SIGKILLed while holding a completion's lock does not wedge the completion."""
    from emu.image import field_addr

    c = emu.Completion()
    t = start_lock_holder(field_addr(c.rec, "lock"))
    os.kill(t.pid, signal.SIGKILL)
    emu.complete(c)  # waits for the dead holder's lock, takes it over
    assert c.done == 1 and emu.try_wait_for_completion(c)
    assert emu.kthread_stop(t) == 0
    log = "\n".join(kernel.dmesg())
    assert f"completion lock taken over from dead task (pid {t.pid})" in log
