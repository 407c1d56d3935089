"""Many-core machines (issue #13): up to emu.NR_CPUS emulated CPUs, on any machine, at
almost no cost per CPU that nothing runs on.

Big machines are simulated on this small one: boot(cpus=N) spreads N emulated CPUs
round robin over the real ones, and tests/fake_cpus.py makes a subprocess see a
machine with N CPUs (os.sched_getaffinity), its pinning mapped onto the real ones.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import emu
from emu import image
from emu.constants import PF_IDLE
from emu.task import live_tasks

from util import wait_until

pytest_plugins = ["pytester"]

HERE = Path(__file__).parent
IRQ = 5
T = 20  # seconds: a generous bound for anything that waits on another process


def record_cpu(irq, dev):
    """Hard-IRQ handler: the CPU and task it ran on, a tasklet scheduled there."""
    cpu, pid, done, tasklet = dev
    emu.atomic_set(cpu, emu.current().cpu)
    emu.atomic_set(pid, os.getpid())
    emu.tasklet_schedule(tasklet)
    emu.complete(done)
    return emu.IRQ_HANDLED


def tasklet_cpu(t):
    cpu, done = t.data
    emu.atomic_set(cpu, emu.current().cpu)
    emu.complete(done)


def on_cpu(data):
    """A kthread: report the CPU it runs on and its real affinity, then sleep until stopped."""
    cpu, real, started = data
    emu.atomic_set(cpu, emu.current().cpu)
    (mine,) = os.sched_getaffinity(0)
    emu.atomic_set(real, mine)
    emu.complete(started)
    while not emu.kthread_should_stop():
        emu.schedule_timeout_interruptible(emu.MAX_SCHEDULE_TIMEOUT)
    return 0


def spin(ticks):
    while not emu.kthread_should_stop():
        emu.atomic_inc(ticks)
    return 0


def irq_counts(kernel, irq):
    for line in kernel.proc_interrupts().splitlines()[1:]:
        head, _, rest = line.partition(":")
        if head.strip() == str(irq):
            return [int(x) for x in rest.split()[: kernel.ncpus]]
    return None


def idle_tasks():
    return [t for t in live_tasks() if t.flags & PF_IDLE]


def test_nr_cpus_is_at_least_1024():
    assert emu.NR_CPUS >= 1024


@pytest.mark.parametrize("cpus", [lambda: emu.NR_CPUS + 1,
                                  lambda: [sorted(os.sched_getaffinity(0))[0]] * (emu.NR_CPUS + 1)],
                         ids=["count", "list"])
def test_more_than_nr_cpus_is_refused_naming_the_argument(cpus):
    with pytest.raises(ValueError, match=f"cpus .*{emu.NR_CPUS}"):
        emu.boot(cpus=cpus())


@pytest.mark.parametrize("ncpus", [
    pytest.param(256, marks=pytest.mark.emu_boot(cpus=256)),
    pytest.param(1024, marks=pytest.mark.emu_boot(cpus=1024)),
])
def test_big_machine_runs_kthreads_and_takes_interrupts_on_high_cpus(kernel, ncpus):
    assert kernel.ncpus == ncpus
    real = sorted(os.sched_getaffinity(0))
    assert kernel.cpu_map == [real[i % len(real)] for i in range(ncpus)]
    high = [ncpus - 1, ncpus - 2, ncpus // 2 + 3, 64]
    threads = []
    for c in high:
        data = (emu.Atomic(-1), emu.Atomic(-1), emu.Completion())
        threads.append((c, data, emu.kthread_run_on_cpu(on_cpu, data, c, "high/%u")))
    for c, (cpu, real_cpu, started), _ in threads:
        emu.wait_for_completion(started)
        assert emu.atomic_read(cpu) == c
        assert emu.atomic_read(real_cpu) == kernel.cpu_map[c]

    hit_cpu, hit_pid, done = emu.Atomic(-1), emu.Atomic(0), emu.Completion()
    t_cpu, t_done = emu.Atomic(-1), emu.Completion()
    tasklet = emu.Tasklet(tasklet_cpu, (t_cpu, t_done))
    assert emu.request_irq(IRQ, record_cpu, 0, "high", (hit_cpu, hit_pid, done, tasklet)) == 0
    pids = {t.pid for *_, t in threads} | {os.getpid()}
    for c in high:  # their kthreads sleep: an idle task takes the interrupt, as CPU c
        assert emu.irq_set_affinity(IRQ, c) == 0
        emu.irq_inject_interrupt(IRQ)
        assert emu.wait_for_completion_timeout(done, T * kernel.hz), f"no interrupt on CPU {c}"
        assert emu.wait_for_completion_timeout(t_done, T * kernel.hz), f"no tasklet on CPU {c}"
        assert emu.atomic_read(hit_cpu) == c, "the handler ran as another CPU"
        assert emu.atomic_read(t_cpu) == c, "the tasklet ran on another CPU"
        assert emu.atomic_read(hit_pid) not in pids
        emu.synchronize_irq(IRQ)
        emu.tasklet_kill(tasklet)  # not running any more: the next CPU runs it at once
    counts = irq_counts(kernel, IRQ)
    assert [c for c, n in enumerate(counts) if n] == sorted(high)
    assert all(counts[c] == 1 for c in high)

    # A CPU with a running task: that task takes it.
    ticks = emu.Atomic()
    busy = emu.kthread_run_on_cpu(spin, ticks, ncpus - 3, "busy/%u")
    wait_until(lambda: emu.atomic_read(ticks) > 0, T, "the busy kthread to run")
    assert emu.irq_set_affinity(IRQ, range(ncpus - 3, ncpus)) == 0  # a mask: its lowest CPU
    emu.irq_inject_interrupt(IRQ)
    assert emu.wait_for_completion_timeout(done, T * kernel.hz)
    assert (emu.atomic_read(hit_cpu), emu.atomic_read(hit_pid)) == (ncpus - 3, busy.pid)

    # Idle tasks: at most one per real CPU, whatever the number of emulated CPUs.
    assert 1 <= len(idle_tasks()) <= len(real)
    emu.kthread_stop(busy)
    for *_, t in threads:
        assert emu.kthread_stop(t) == 0
    assert emu.free_irq(IRQ, (hit_cpu, hit_pid, done, tasklet)) == "high"
    emu.tasklet_kill(tasklet)


def idle_until_stopped(_):
    while not emu.kthread_should_stop():
        emu.schedule_timeout_interruptible(emu.MAX_SCHEDULE_TIMEOUT)
    return 0


@pytest.mark.emu_boot(cpus=1024)
def test_kthread_bind_mask_takes_masks_of_high_cpus(kernel):
    t = emu.kthread_create(idle_until_stopped, None, "masked")
    emu.kthread_bind_mask(t, range(700, 1024))
    assert t.cpu == 700
    assert os.sched_getaffinity(t.pid) == {kernel.cpu_map[700]}
    assert emu.kthread_stop(t) == -errno.EINTR  # never woken
    x = emu.kthread_create(idle_until_stopped, None, "x")
    with pytest.raises(ValueError, match="cpus 1024 does not exist"):
        emu.kthread_bind_mask(x, [5, 1024])
    assert emu.kthread_stop(x) == -errno.EINTR


def test_unused_cpus_cost_no_process_and_little_memory():
    sizes = {}
    for ncpus in (2, 1024):
        with emu.boot(cpus=ncpus) as kernel:
            sizes[ncpus] = kernel._img.size
            done = emu.Completion()
            assert emu.request_irq(IRQ, lambda irq, d: emu.complete(d) or 1, 0, "x", done) == 0
            assert emu.irq_set_affinity(IRQ, ncpus - 1) == 0
            emu.irq_inject_interrupt(IRQ)
            assert emu.wait_for_completion_timeout(done, T * kernel.hz)
            assert len(idle_tasks()) <= len(set(kernel.cpu_map))
            assert len(kernel.tasks()) == 1  # the booting process
            emu.free_irq(IRQ, done)
    per_cpu = (sizes[1024] - sizes[2]) / 1022
    assert per_cpu <= 64 * 1024, f"{per_cpu:.0f} bytes of image per emulated CPU"


def test_interrupt_right_after_the_first_request_irq_reaches_a_high_cpu():
    """The first request_irq() starts the first idle task, irq_set_affinity() the one of
    the target's real CPU: an interrupt raised at once is not lost meanwhile."""
    for _ in range(10):
        with emu.boot(cpus=1024) as kernel:
            done = emu.Completion()
            assert emu.request_irq(IRQ, lambda irq, d: emu.complete(d) or 1, 0, "x", done) == 0
            assert emu.irq_set_affinity(IRQ, 1023) == 0
            emu.irq_inject_interrupt(IRQ)
            assert emu.wait_for_completion_timeout(done, T * kernel.hz), "interrupt lost"
            emu.free_irq(IRQ, done)


def fake_cpus(n, *args, timeout=120):
    return subprocess.run([sys.executable, str(HERE / "fake_cpus.py"), str(n), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)


def test_a_machine_with_more_cpus_than_nr_cpus_boots_on_the_first_nr_cpus():
    out = fake_cpus(emu.NR_CPUS + 476, "boot")
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        f"emu: {emu.NR_CPUS + 476} CPUs available, booting on the first {emu.NR_CPUS} "
        "(emu.NR_CPUS)"]
    result = json.loads(out.stdout)
    assert result["ncpus"] == emu.NR_CPUS
    assert result["handled_on"] == emu.NR_CPUS - 1
    assert result["idle_tasks"] <= 2  # CPU 0's real CPU's, and the target's


@pytest.mark.timeout(300)
def test_a_512_cpu_machine_runs_the_torture_by_default():
    out = fake_cpus(512, "torture", "--type", "irq", "--duration", "1", timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1.0s on 512 CPU(s)" in out.stdout or "on 512 CPU(s)" in out.stdout
    assert out.stdout.rstrip().endswith("End of test: SUCCESS")
    assert out.stderr == ""


def test_image_per_cpu_parts_are_sized_by_the_kernels_cpus():
    with emu.boot(cpus=3) as kernel:
        img = kernel._img.img
        assert len(img.percpu) == 3
        assert len(img.irqs[0].kstat) == 3
        assert image.NR_CPUS == emu.NR_CPUS


# --- pytest-xdist: each worker boots its own kernels ------------------------------------------

XDIST_TESTS = '''
import os, time
from pathlib import Path
import pytest
import emu

BARRIER = Path(os.environ["EMU_XDIST_BARRIER"])


def count(irq, hits):
    emu.atomic_inc(hits)
    return emu.IRQ_HANDLED


def meet(name):
    """Both workers' tests reach this point before either goes on (bounded)."""
    (BARRIER / name).touch()
    deadline = time.monotonic() + 60
    while len(list(BARRIER.iterdir())) < 2:
        assert time.monotonic() < deadline, "the other worker never came"
        time.sleep(0.01)


@pytest.mark.emu_boot(cpus=4)
@pytest.mark.parametrize("n", [0, 1])
def test_side_by_side(kernel, n):
    hits = emu.Atomic()
    assert emu.request_irq(5, count, 0, f"worker{n}", hits) == 0
    assert emu.irq_set_affinity(5, 3) == 0
    threads = [emu.kthread_run_on_cpu(lambda d: 0 if emu.msleep(50) is None else 1, None,
                                      c, "side/%u") for c in range(4)]
    meet(os.environ["PYTEST_XDIST_WORKER"])
    kernel.add_irq_source(5, rate_hz=200, count=20)
    deadline = time.monotonic() + 30
    while emu.atomic_read(hits) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [emu.kthread_stop(t) for t in threads] == [0, 0, 0, 0]
    assert {t.pid for t in kernel.tasks()} == {os.getpid()}
    assert emu.free_irq(5, hits) == f"worker{n}"
    assert 1 <= emu.atomic_read(hits) <= 20
'''


def test_the_kernel_fixture_boots_one_kernel_per_xdist_worker(pytester, tmp_path, monkeypatch):
    """Two xdist workers boot kernels at the same time (the tests meet at a barrier),
    each with kthreads and interrupts: neither sees the other's tasks, and the fixture
    finds no leftover process or IPC object in either."""
    pytest.importorskip("xdist")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    monkeypatch.setenv("EMU_XDIST_BARRIER", str(barrier))
    pytester.makepyfile(XDIST_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-n", "2",
                                           "--dist", "load", timeout=120)
    result.assert_outcomes(passed=2)
    assert sorted(p.name for p in barrier.iterdir()) == ["gw0", "gw1"]


@pytest.mark.emu_boot(cpus=4, max_tasks=3)
def test_no_task_slot_for_an_idle_task_leaves_the_first_one_serving(kernel):
    """irq_set_affinity() does not fail for want of a slot for its CPU's idle task: the
    first idle task serves that CPU (real CPU 1's CPUs are 1 and 3 here)."""
    if len(set(kernel.cpu_map)) < 2:
        pytest.skip("needs two real CPUs")
    hit_cpu, done = emu.Atomic(-1), emu.Completion()
    blocker = emu.kthread_create(idle_until_stopped, None, "slot-taker")  # slots: boot, it,
    assert emu.request_irq(IRQ, lambda irq, d: emu.atomic_set(d[0], emu.current().cpu)
                           or emu.complete(d[1]) or 1, 0, "x", (hit_cpu, done)) == 0  # idle
    assert emu.irq_set_affinity(IRQ, 3) == 0
    assert len(idle_tasks()) == 1
    emu.irq_inject_interrupt(IRQ)
    assert emu.wait_for_completion_timeout(done, T * kernel.hz)
    assert emu.atomic_read(hit_cpu) == 3
    emu.free_irq(IRQ, (hit_cpu, done))
    assert emu.kthread_stop(blocker) == -errno.EINTR
