"""Nothing hangs when the kernel dies: the booting process is told at once
(KernelDeadError, kernel.alive False), shutdown after the death is quick and clean, and
the death of any one process of a torture run ends the run the way it should, leaving
nothing behind (the kill matrix; the long version is stress/test_kill_matrix.py).

The `kernel` fixture checks, after each test, that no task process and no /dev/shm
entry of the kernel is left.
"""

from __future__ import annotations

import os
import random
import signal

import psutil
import pytest
from killing import KINDS, expected, kill_run

import _emu_native as _native
import emu
from emu import image, supervisor
from emu.image import own_ipc_names
from emu.irq import irq_task
from emu.kernel import SIG_KERNEL_DEAD
from emu.kthread import KTHREAD_EXITED
from emu.supervisor import died_outside_emu

from util import wait_until

pytestmark = pytest.mark.timeout(30)


def _never_stops(started: emu.Completion | None) -> int:
    if started is not None:
        emu.complete(started)
    while True:
        emu.schedule_timeout_uninterruptible(emu.MAX_SCHEDULE_TIMEOUT)


def _kill_supervisor_once_asleep(booting: emu.Task) -> int:
    """A kthread that SIGKILLs the supervisor (and so itself) once the booting process
    sleeps in D."""
    while emu.task_state_to_char(booting) != "D":
        emu.usleep_range(500, 1000)
    os.kill(image.this().img.hdr.supervisor_pid, signal.SIGKILL)
    return 0


def _blocked_in(call: str) -> None:
    """Start the killer, then block in `call` until it kills the supervisor."""
    if call == "kthread_stop":
        started = emu.Completion()
        t = emu.kthread_run(_never_stops, started, "stubborn")
        emu.wait_for_completion(started)  # running: the stop will wait for it
    emu.kthread_run(_kill_supervisor_once_asleep, emu.current(), "killer")
    if call == "kthread_stop":
        emu.kthread_stop(t)
    elif call == "wait_for_completion":
        emu.wait_for_completion(emu.Completion())  # nobody completes it
    else:
        emu.msleep(60_000)


@pytest.mark.parametrize("call", ["kthread_stop", "wait_for_completion", "msleep"])
def test_supervisor_death_ends_a_blocked_call_with_kernel_dead_error(kernel, call):
    assert kernel.alive and kernel.death_cause == ""
    with pytest.raises(emu.KernelDeadError, match=(
            rf"kernel died: the supervisor \(pid {kernel.supervisor_pid}\) was killed by "
            r"SIGKILL; .* boot a new kernel")):
        _blocked_in(call)
    assert not kernel.alive
    sup = kernel.supervisor_pid
    assert kernel.death_cause == f"the supervisor (pid {sup}) was killed by SIGKILL"
    with pytest.raises(emu.KernelDeadError):
        kernel.check_alive()


def test_after_the_death_every_call_that_would_block_raises(kernel):
    c = emu.Completion()
    with pytest.raises(emu.KernelDeadError):  # the news interrupts whatever runs
        os.kill(kernel.supervisor_pid, signal.SIGKILL)
        wait_until(lambda: False, timeout=10, what="the news of the death")
    with pytest.raises(emu.KernelDeadError):
        emu.wait_for_completion_timeout(c, emu.msecs_to_jiffies(60_000))
    with pytest.raises(emu.KernelDeadError):
        emu.schedule_timeout_interruptible(emu.MAX_SCHEDULE_TIMEOUT)
    with pytest.raises(emu.KernelDeadError):
        emu.msleep(1)
    with pytest.raises(emu.KernelDeadError):
        emu.kthread_run(lambda _: 0, None, "too late")
    # What does not block still works on the image, which stays mapped until shutdown.
    emu.complete(c)
    assert emu.wait_for_completion_timeout(c, 1) == 1
    assert not kernel.alive


@pytest.mark.parametrize("irqsave", [True, False])
def test_the_news_waits_for_the_next_sleep_out_of_a_critical_section(kernel, irqsave):
    """Raised inside a section that holds a lock (with interrupts off, or in atomic
    context), KernelDeadError would leave the lock held: the next sleep raises it."""
    lock = emu.Spinlock()
    flags = emu.spin_lock_irqsave(lock) if irqsave else emu.spin_lock(lock)
    os.kill(kernel.supervisor_pid, signal.SIGKILL)
    wait_until(lambda: kernel.death_cause, timeout=10, what="the death signal")
    if irqsave:
        emu.spin_unlock_irqrestore(lock, flags)
    else:
        emu.spin_unlock(lock)
    assert not emu.irqs_disabled() and emu.preempt_count() == 0
    assert emu.spin_trylock(lock)
    emu.spin_unlock(lock)
    with pytest.raises(emu.KernelDeadError):
        emu.msleep(1)


def test_shutdown_after_the_death_is_quick_clean_and_says_so(capfd):
    k = emu.boot(cpus=2)
    pids = [emu.kthread_run(_never_stops, None, "stubborn%d", i).pid for i in range(3)]
    with pytest.raises(emu.KernelDeadError):
        os.kill(k.supervisor_pid, signal.SIGKILL)
        wait_until(lambda: False, timeout=10, what="the news of the death")
    k.shutdown()  # no grace period for tasks that are dead already (pytest-timeout bounds it)
    err = capfd.readouterr().err
    assert err == f"emu: the kernel died ({k.death_cause}); cleaned up\n"
    assert not [p for p in psutil.Process().children() if p.pid in pids + [k.supervisor_pid]]
    assert own_ipc_names(os.getpid()) == set()
    with emu.boot() as again:  # a new kernel boots and lives
        assert again.alive


def test_normal_shutdown_is_not_a_death(capfd):
    with emu.boot() as k:
        emu.kthread_run(lambda _: 0, None, "brief")
    assert not k.alive and k.death_cause == ""
    assert capfd.readouterr().err == ""
    k.check_alive()  # shut down, not dead: nothing to raise


@pytest.mark.emu_boot(cpus=2)
@pytest.mark.emu_expect(oopses=1)
def test_killing_an_idle_task_panics_the_kernel(kernel):
    from emu.idle import start_irq_layer

    start_irq_layer()  # the idle tasks
    idle = kernel._img.img.tasks[kernel._img.img.percpu[0].idle_slot]
    with pytest.raises(emu.KernelDeadError,
                       match="the kernel panicked: Attempted to kill the idle task!"):
        os.kill(idle.pid, signal.SIGKILL)
        wait_until(lambda: False, timeout=10, what="the panic")
    assert "Kernel panic - not syncing: Attempted to kill the idle task!" in kernel.dmesg()[-1]


def kill_myself(irq: int, dev: object) -> int:
    """A hard-IRQ handler that SIGKILLs the task it interrupted."""
    os.kill(os.getpid(), signal.SIGKILL)
    return emu.IRQ_HANDLED


def _spin(started: emu.Completion) -> int:
    emu.complete(started)
    while True:
        pass


@pytest.mark.emu_boot(cpus=2)
@pytest.mark.emu_expect(oopses=1)
def test_a_task_killed_in_interrupt_context_panics_the_kernel(kernel):
    started = emu.Completion()
    emu.kthread_run_on_cpu(_spin, started, 1, "spinner/%u")
    emu.wait_for_completion(started)
    assert emu.request_irq(5, kill_myself, 0, "deadly", None) == 0
    assert emu.irq_set_affinity(5, 1) == 0
    with pytest.raises(emu.KernelDeadError,
                       match="the kernel panicked: Fatal exception in interrupt"):
        emu.irq_inject_interrupt(5)
        wait_until(lambda: False, timeout=10, what="the panic")


def slow_thread_fn(irq: int, dev: emu.Completion) -> int:
    """A threaded handler that never returns (until its thread is killed)."""
    emu.complete(dev)
    while True:
        emu.msleep(1000)


@pytest.mark.emu_boot(cpus=2)
@pytest.mark.emu_expect(oopses=1)
def test_a_killed_irq_thread_is_not_waited_for(kernel):
    inside = emu.Completion()
    assert emu.request_threaded_irq(6, None, slow_thread_fn, emu.IRQF_ONESHOT, "slow",
                                    inside) == 0
    thread = irq_task(6)
    emu.irq_inject_interrupt(6)
    emu.wait_for_completion(inside)  # the thread runs its handler, the line is masked
    os.kill(thread.pid, signal.SIGKILL)
    wait_until(lambda: emu.task_state_to_char(thread) == "X", what="the Oops")
    assert (f'exiting task "{thread.comm}" ({thread.pid}) is an active IRQ thread (irq 6)'
            in "\n".join(kernel.dmesg()))
    emu.irq_inject_interrupt(6)  # the line works again, and does not wake the dead thread
    emu.synchronize_irq(6)
    assert emu.free_irq(6, inside) == "slow"
    assert kernel.alive


def _never_parks(started: emu.Completion) -> int:
    emu.complete(started)
    while not emu.kthread_should_stop():
        emu.schedule_timeout_interruptible(emu.MAX_SCHEDULE_TIMEOUT)
    return 0


def _kill_once_asleep(data: tuple[emu.Task, emu.Task]) -> int:
    """A kthread that SIGKILLs `victim` once `sleeper` sleeps in D."""
    sleeper, victim = data
    while emu.task_state_to_char(sleeper) != "D":
        emu.usleep_range(500, 1000)
    os.kill(victim.pid, signal.SIGKILL)
    return 0


@pytest.mark.emu_expect(oopses=1)
def test_kthread_park_of_a_thread_killed_meanwhile_returns(kernel):
    """The parking thread died (an Oops): kthread_park() does not wait for it forever."""
    started = emu.Completion()
    t = emu.kthread_run(_never_parks, started, "unparkable")
    emu.wait_for_completion(started)  # in threadfn: a park no longer happens by itself
    killer = emu.kthread_run(_kill_once_asleep, (emu.current(), t), "killer")
    emu.kthread_park(t)
    assert emu.task_state_to_char(t) == "X"
    assert emu.kthread_stop(t) == 0
    assert emu.kthread_stop(killer) == 0


def test_a_kernel_that_died_before_any_signal_is_noticed_by_alive(kernel):
    """kernel.alive looks for itself: it does not depend on the signal's handler."""
    old = signal.signal(SIG_KERNEL_DEAD, signal.SIG_IGN)
    try:
        os.kill(kernel.supervisor_pid, signal.SIGKILL)
        wait_until(lambda: _native.pid_is_dead(kernel.supervisor_pid), what="the death")
        assert not kernel.alive
        assert "was killed by SIGKILL" in kernel.death_cause
        with pytest.raises(emu.KernelDeadError):
            emu.msleep(1)
    finally:
        signal.signal(SIG_KERNEL_DEAD, old)


# --- the supervisor's death watch ---------------------------------------------------------------

class _SlotBeingReused:
    """A task slot whose task exited through emu while its creator frees and reuses it:
    each field read by the supervisor lets the creator take one more step."""

    STEPS = ({"in_use": 1, "kflags": KTHREAD_EXITED, "generation": 7},  # exited
             {"in_use": 0},  # kthread_stop() freed it; alloc_slot() then:
             {"kflags": 0},  # resets the other fields,
             {"generation": 8},  # bumps the generation,
             {"in_use": 1})  # and takes it

    def __init__(self, start: int) -> None:
        self.step = 0
        self.fields: dict[str, int] = {}
        for _ in range(start + 1):
            self._advance()

    def _advance(self) -> None:
        if self.step < len(self.STEPS):
            self.fields.update(self.STEPS[self.step])
            self.step += 1

    def __getattr__(self, name: str) -> int:
        value = self.fields[name]
        self._advance()
        return value


@pytest.mark.parametrize("start", range(len(_SlotBeingReused.STEPS)))
def test_a_slot_reused_while_the_supervisor_looks_is_not_a_death(start):
    """However the creator's steps interleave with its reads, the supervisor never takes
    the new task's reset flags for a death of the old one (that posted the exit of a
    live task, whose slot was then used twice)."""
    assert not died_outside_emu(_SlotBeingReused(start), 7)


def test_an_exited_kthread_not_yet_stopped_does_not_keep_the_supervisor_busy(kernel):
    """Its process is a zombie until kthread_stop(): the supervisor must not watch it
    again and again (its pidfd is always readable, and the death watch would spin)."""
    t = emu.kthread_run(lambda _: 0, None, "returned")
    wait_until(lambda: emu.task_state_to_char(t) == "X", what="the thread to exit")
    supervisor = psutil.Process(kernel.supervisor_pid)
    before = sum(supervisor.cpu_times()[:2])
    emu.msleep(1000)
    assert sum(supervisor.cpu_times()[:2]) - before < 0.3  # spinning takes the whole second
    assert emu.kthread_stop(t) == 0


def test_a_supervisor_that_crashes_takes_the_kernel_down_and_says_why(monkeypatch, capfd):
    def broken(self: supervisor.Supervisor) -> None:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(supervisor.Supervisor, "watch_new_tasks", broken)  # before the fork
    # The death may interrupt the booting process as soon as boot() has returned, even
    # before its result is stored: the whole sequence is inside the expectation.
    expect = pytest.raises(emu.KernelDeadError,
                           match="the supervisor crashed: RuntimeError: broken on purpose")
    try:
        with expect:
            emu.boot()
            emu.msleep(10_000)
        assert "emu: the supervisor crashed" in capfd.readouterr().err
    finally:
        booted = emu.kernel._booted
        if booted is not None:
            booted.shutdown()


# --- the kill matrix: one run per kind of process, at a random moment -------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_killing_any_process_of_a_torture_run_ends_it_cleanly(kind):
    moment = random.Random(kind).uniform(0.0, 1.8)  # into the loop; the same every run
    out = kill_run(kind, moment, seed=7, duration=2.0, end_bound=60)
    assert out.victim, f"no {kind} process to kill: {out.output}"
    assert expected(out) == "", (out, out.output)
