"""Softirqs and tasklets (spec §4.5).

Tasklet callbacks run in whichever task serves the CPU's softirqs, each on its own copy
of what it captures; the callbacks here are module-level functions taking the tasklet,
whose `data` is a tuple of emu handles (closures and other callables: test_callbacks.py).
"""

from __future__ import annotations

import os
import sys

import pytest

import emu

from util import stop_after_exit, wait_until

IRQ = 5
T = 20.0

CTX_ALL = 0b111111  # what cb_ctx records in softirq context


def read(a):
    return emu.atomic_read(a)


def log_text(kernel):
    return "\n".join(kernel.dmesg())


# --- callbacks and handlers -----------------------------------------------------------------------

def cb_count(t):
    emu.atomic_inc(t.data)


def cb_ctx(t):
    count, bits, pid = t.data[:3]
    b = (
        emu.in_serving_softirq() << 0
        | emu.in_softirq() << 1
        | (not emu.in_hardirq()) << 2
        | emu.in_interrupt() << 3
        | (not emu.in_task()) << 4
        | (not emu.irqs_disabled()) << 5
    )
    emu.atomic_set(bits, b)
    emu.atomic_set(pid, os.getpid())
    if len(t.data) > 3:
        emu.atomic_set(t.data[4], emu.atomic_read(t.data[3]))  # handler done when we ran?
    emu.atomic_inc(count)


def h_schedule(irq, dev):
    """Schedule the tasklet (twice: it must run once), then mark the handler done."""
    t, done = dev
    emu.tasklet_schedule(t)
    emu.tasklet_schedule(t)
    emu.atomic_inc(done)
    return emu.IRQ_HANDLED


def cb_exclusive(t):
    runs, inside, overlap = t.data
    if emu.atomic_inc_return(inside) != 1:
        emu.atomic_inc(overlap)
    for _ in range(2000):  # stay inside for a while: give the other CPU a chance to collide
        pass
    emu.atomic_inc(runs)
    emu.atomic_dec(inside)


def cb_seq(t):
    seq, mine = t.data
    emu.atomic_set(mine, emu.atomic_inc_return(seq))


def cb_raise_first(t):
    calls, ok = t.data
    if emu.atomic_inc_return(calls) == 1:
        raise ValueError("tasklet on fire")
    emu.atomic_inc(ok)


def cb_again(t):
    if emu.atomic_inc_return(t.data) == 1:
        emu.tasklet_schedule(t)  # rescheduled while running: runs once more


def cb_spin(t):
    entered, go, finished = t.data
    emu.atomic_inc(entered)
    while not emu.atomic_read(go):
        pass
    emu.atomic_inc(finished)


def h_release_from_kill(irq, dev):
    """Release cb_spin, but only once the test sleeps in tasklet_kill() (the only place
    it sleeps in D), wherever this interrupt lands (the test, or its CPU's idle task)."""
    go, caught, waiter = dev
    f = sys._getframe()
    while f is not None:
        if f.f_code.co_name == "tasklet_kill":
            break
        f = f.f_back
    if f is not None or emu.task_state_to_char(waiter) == "D":
        emu.atomic_set(caught, 1)
        emu.atomic_set(go, 1)
    return emu.IRQ_HANDLED


def busy(ticks):
    while not emu.kthread_should_stop():
        emu.atomic_inc(ticks)
    return 7


# --- tests ----------------------------------------------------------------------------------------

def test_tasklet_runs_after_schedule_from_process_context(kernel):
    count, bits, pid = data = (emu.Atomic(), emu.Atomic(), emu.Atomic())
    t = emu.Tasklet(cb_ctx, data)
    assert t.data == data
    emu.tasklet_schedule(t)
    wait_until(lambda: read(count) >= 1, T, "the tasklet")
    assert read(bits) == CTX_ALL, f"softirq context bits {read(bits):#b}"
    assert read(pid) == os.getpid(), "run by the scheduling task (ksoftirqd's stand-in)"
    assert emu.preemptible() and emu.in_task(), "the caller's context is restored"

    def fn(_):
        emu.tasklet_schedule(t)
        return 0

    stop_after_exit(emu.kthread_run(fn, None, "sched"), T)
    wait_until(lambda: read(count) >= 2, T, "the tasklet scheduled by a kthread")
    emu.tasklet_kill(t)


@pytest.mark.emu_boot(cpus=2)
def test_tasklet_scheduled_from_hardirq_runs_at_irq_exit(kernel):
    ticks = emu.Atomic()
    k = emu.kthread_run_on_cpu(busy, ticks, 1, "busy/%u")
    wait_until(lambda: read(ticks) > 0, T, "the busy kthread")
    hdone, seen = emu.Atomic(), emu.Atomic(-1)
    count, bits, pid = emu.Atomic(), emu.Atomic(), emu.Atomic()
    t = emu.Tasklet(cb_ctx, (count, bits, pid, hdone, seen))
    dev = (t, hdone)
    assert emu.request_irq(IRQ, h_schedule, 0, "sched", dev) == 0
    assert emu.irq_set_affinity(IRQ, 1) == 0
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(count) >= 1, T, "the tasklet")
    assert read(pid) == k.pid, "run on the interrupted CPU, by the task the interrupt hit"
    assert read(seen) == 1, "after the handler returned, not inside it"
    assert read(bits) == CTX_ALL, f"softirq context bits {read(bits):#b}"
    emu.synchronize_irq(IRQ)
    emu.tasklet_kill(t)
    assert read(count) == 1, "scheduled twice before it ran: ran once"
    assert emu.kthread_stop(k) == 7
    assert emu.free_irq(IRQ, dev) == "sched"


def test_tasklet_scheduled_twice_before_it_runs_runs_once(kernel):
    count = emu.Atomic()
    t = emu.Tasklet(cb_count, count)
    emu.local_irq_disable()
    emu.tasklet_schedule(t)
    emu.tasklet_schedule(t)
    assert read(count) == 0, "softirqs do not run with interrupts off"
    emu.local_irq_enable()
    wait_until(lambda: read(count) >= 1, T, "the tasklet")
    emu.tasklet_kill(t)
    assert read(count) == 1


def test_tasklet_rescheduled_while_running_runs_again(kernel):
    count = emu.Atomic()
    t = emu.Tasklet(cb_again, count)
    emu.tasklet_schedule(t)
    wait_until(lambda: read(count) == 2, T, "the second run")
    emu.tasklet_kill(t)
    assert read(count) == 2


@pytest.mark.emu_boot(cpus=2)
def test_tasklet_never_runs_concurrently_with_itself(kernel):
    runs, inside, overlap = data = (emu.Atomic(), emu.Atomic(), emu.Atomic())
    t = emu.Tasklet(cb_exclusive, data)
    scheduled, ready = emu.Atomic(), emu.Atomic()

    def scheduler(_):
        emu.atomic_inc(ready)
        while emu.atomic_read(ready) < 2:  # start together
            pass
        for _ in range(400):
            emu.tasklet_schedule(t)
        emu.atomic_inc(scheduled)
        # stay on the CPU: a tasklet left queued here is run at the next kick
        while not emu.kthread_should_stop():
            pass
        return 0

    ks = [emu.kthread_run_on_cpu(scheduler, None, cpu, "sched/%u") for cpu in (0, 1)]
    wait_until(lambda: read(scheduled) == 2, T, "both schedulers")
    emu.tasklet_kill(t)
    assert read(overlap) == 0, "the tasklet ran on two CPUs at once"
    assert read(inside) == 0
    assert read(runs) >= 1
    for k in ks:
        assert emu.kthread_stop(k) == 0


def test_tasklet_disable_holds_it_until_enable(kernel):
    count = emu.Atomic()
    t = emu.Tasklet(cb_count, count)
    emu.tasklet_disable(t)
    emu.tasklet_disable(t)
    emu.tasklet_schedule(t)
    assert read(count) == 0, "disabled: not run"
    emu.tasklet_enable(t)
    assert read(count) == 0, "disables nest"
    emu.tasklet_enable(t)
    wait_until(lambda: read(count) == 1, T, "the tasklet after the last enable")
    emu.tasklet_kill(t)
    assert read(count) == 1


@pytest.mark.emu_boot(cpus=2)
def test_tasklet_kill_waits_until_it_is_not_running(kernel):
    entered, go, finished = data = (emu.Atomic(), emu.Atomic(), emu.Atomic())
    t = emu.Tasklet(cb_spin, data)
    caught = emu.Atomic()
    dev = (go, caught, emu.current())
    assert emu.request_irq(IRQ, h_release_from_kill, 0, "release", dev) == 0
    assert emu.irq_set_affinity(IRQ, emu.current().cpu) == 0

    def fn(_):
        emu.tasklet_schedule(t)  # runs right here, spinning until released
        return 0

    k = emu.kthread_run_on_cpu(fn, None, 1, "runner/%u")
    wait_until(lambda: read(entered) == 1, T, "the tasklet to start")
    src = kernel.add_irq_source(IRQ, rate_hz=50, count=-1)
    try:
        emu.tasklet_kill(t)  # returns only after an interrupt released the tasklet meanwhile
        assert read(finished) == 1, "tasklet_kill() returned while the tasklet ran"
    finally:
        kernel.remove_irq_source(src)
        emu.atomic_set(go, 1)
    assert read(caught) == 1
    assert stop_after_exit(k, T) == 0
    emu.synchronize_irq(IRQ)
    assert emu.free_irq(IRQ, dev) == "release"


def test_hi_tasklets_run_and_run_before_normal_ones(kernel):
    seq = emu.Atomic()
    hi_at, lo_at = emu.Atomic(), emu.Atomic()
    hi = emu.Tasklet(cb_seq, (seq, hi_at))
    lo = emu.Tasklet(cb_seq, (seq, lo_at))
    emu.tasklet_hi_schedule(hi)
    wait_until(lambda: read(hi_at) == 1, T, "the HI tasklet")
    emu.local_bh_disable()
    emu.tasklet_schedule(lo)
    emu.tasklet_hi_schedule(hi)
    emu.local_bh_enable()
    wait_until(lambda: read(seq) == 3, T, "both tasklets")
    assert read(hi_at) == 2 and read(lo_at) == 3, "HI_SOFTIRQ is served before TASKLET_SOFTIRQ"
    emu.tasklet_kill(hi)
    emu.tasklet_kill(lo)


@pytest.mark.emu_expect(oopses=1)
def test_exception_in_tasklet_is_an_oops_and_the_kernel_goes_on(kernel):
    calls, ok = data = (emu.Atomic(), emu.Atomic())
    bad = emu.Tasklet(cb_raise_first, data)
    good_count = emu.Atomic()
    good = emu.Tasklet(cb_count, good_count)
    emu.local_bh_disable()
    emu.tasklet_schedule(bad)
    emu.tasklet_schedule(good)
    emu.local_bh_enable()
    wait_until(lambda: "Oops: ValueError in tasklet: tasklet on fire" in log_text(kernel), T,
               "the Oops")
    assert kernel.oopses == 1
    wait_until(lambda: read(good_count) == 1, T, "the tasklet queued after the failing one")
    assert emu.preemptible() and emu.in_task(), "the caller's context is restored"
    emu.tasklet_schedule(bad)
    wait_until(lambda: read(ok) == 1, T, "the failed tasklet, scheduled again")
    assert read(calls) == 2
    emu.tasklet_kill(bad)
    emu.tasklet_kill(good)


def test_local_bh_disable_defers_tasklets_until_enable(kernel):
    count, bits, pid = data = (emu.Atomic(), emu.Atomic(), emu.Atomic())
    t = emu.Tasklet(cb_ctx, data)
    emu.local_bh_disable()
    assert emu.in_softirq() and not emu.in_serving_softirq() and emu.in_task()
    emu.tasklet_schedule(t)
    assert read(count) == 0, "not run with bottom halves disabled"
    emu.local_bh_enable()
    wait_until(lambda: read(count) == 1, T, "the tasklet at local_bh_enable()")
    assert read(bits) == CTX_ALL
    emu.tasklet_kill(t)
    assert read(count) == 1


@pytest.mark.emu_boot(cpus=2)
def test_tasklet_held_on_an_idle_cpu_runs_after_enable(kernel):
    count = emu.Atomic()
    t = emu.Tasklet(cb_count, count)

    def fn(_):
        emu.tasklet_disable(t)
        emu.tasklet_schedule(t)  # queued on CPU 1 and held there
        return 0

    assert stop_after_exit(emu.kthread_run_on_cpu(fn, None, 1, "holder/%u"), T) == 0
    emu.tasklet_enable(t)
    wait_until(lambda: read(count) == 1, T, "the tasklet on the now idle CPU")
    emu.tasklet_kill(t)
    assert read(count) == 1
