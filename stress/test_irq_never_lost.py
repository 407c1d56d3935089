"""Soaks for "an interrupt is never lost": many fresh kernels, and one interrupt at a
time aimed at a CPU whose task keeps going to sleep, or keeps starting and exiting.

Each interrupt is raised only after the previous one was handled, so a lost one is
never rescued by a later doorbell: it shows as a handler that does not run within
`BOUND` seconds. `EMU_LOST_IRQ_BOOTS` and `EMU_LOST_IRQ_ROUNDS` set the sizes (the
churn starts ROUNDS / 100 kthreads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import emu

from benchlib import ROOT

BOOTS = int(os.environ.get("EMU_LOST_IRQ_BOOTS", "1000"))
ROUNDS = int(os.environ.get("EMU_LOST_IRQ_ROUNDS", "100000"))
KTHREADS = ROUNDS // 100
BOUND = 5.0
IRQ = 5

pytestmark = pytest.mark.timeout(600)


def h_count(irq, dev):
    emu.atomic_inc(dev)
    return emu.IRQ_HANDLED


def test_first_interrupt_of_fresh_kernels(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "first_irq_boots.py"), str(BOOTS), "--keep-going"],
        cwd=tmp_path, capture_output=True, text=True, timeout=580,
        env=dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    print(f"\n{result['boots']} boots in {result['seconds']} s, lost: {result['lost']}")
    assert result["lost"] == []


def one_at_a_time(count, rounds, until=lambda: False):
    """Raise IRQ `rounds` times (or until `until()`), each once the previous one was
    handled; returns how many were raised and how many were not handled within BOUND s."""
    lost = raised = 0
    while raised < rounds and not until():
        raised += 1
        before = emu.atomic_read(count)
        emu.irq_inject_interrupt(IRQ)
        deadline = time.monotonic() + BOUND
        while emu.atomic_read(count) == before:
            if time.monotonic() > deadline:
                lost += 1
                break
    return raised, lost


def sleeper(ticks):
    """Run and sleep by turns, a few microseconds each: often "about to sleep"."""
    while not emu.kthread_should_stop():
        emu.atomic_inc(ticks)
        emu.usleep_range(10, 20)
    return 0


def test_interrupts_at_a_task_that_keeps_going_to_sleep():
    with emu.boot(cpus=2) as kernel:
        count, ticks = emu.Atomic(), emu.Atomic()
        assert emu.request_irq(IRQ, h_count, 0, "sleeper", count) == 0
        assert emu.irq_set_affinity(IRQ, [1]) == 0
        t = emu.kthread_run_on_cpu(sleeper, ticks, 1, "sleeper/%u")
        start = time.monotonic()
        raised, lost = one_at_a_time(count, ROUNDS)
        print(f"\n{raised} interrupts in {time.monotonic() - start:.1f} s, "
              f"{emu.atomic_read(ticks)} sleeps of the target, lost {lost}")
        assert emu.kthread_stop(t) == 0
        assert emu.free_irq(IRQ, count) == "sleeper"
        assert lost == 0
        assert kernel.warnings == kernel.bugs == kernel.oopses == 0


def waiter(dev):
    """Sleep on a completion without a timeout, over and over."""
    c, wakes = dev
    while not emu.kthread_should_stop():
        emu.wait_for_completion_interruptible(c)
        emu.atomic_inc(wakes)
    return 0


def test_interrupts_at_a_task_just_woken_that_goes_back_to_sleep():
    """Each interrupt follows a wake-up of the task on CPU 1: the doorbell reaches it
    as it takes the wake-up's post and blocks again with no timeout to rescue it."""
    with emu.boot(cpus=2) as kernel:
        count, wakes, c = emu.Atomic(), emu.Atomic(), emu.Completion()
        assert emu.request_irq(IRQ, h_count, 0, "waiter", count) == 0
        assert emu.irq_set_affinity(IRQ, [1]) == 0
        t = emu.kthread_run_on_cpu(waiter, (c, wakes), 1, "waiter/%u")
        lost = 0
        start = time.monotonic()
        for _ in range(ROUNDS):
            before = emu.atomic_read(count)
            emu.complete(c)
            emu.irq_inject_interrupt(IRQ)
            deadline = time.monotonic() + BOUND
            while emu.atomic_read(count) == before:
                if time.monotonic() > deadline:
                    lost += 1
                    break
        print(f"\n{ROUNDS} interrupts in {time.monotonic() - start:.1f} s, "
              f"{emu.atomic_read(wakes)} wake-ups of the target, lost {lost}")
        assert emu.kthread_stop(t) == 0
        assert emu.free_irq(IRQ, count) == "waiter"
        assert lost == 0
        assert kernel.warnings == kernel.bugs == kernel.oopses == 0


def short_lived(ticks):
    emu.atomic_inc(ticks)
    return 0


def churn(ticks):
    """Start and stop short-lived kthreads on CPU 1 without pause."""
    n = 0
    while not emu.kthread_should_stop():
        t = emu.kthread_run_on_cpu(short_lived, ticks, 1, "short/%u")
        emu.kthread_stop(t)
        n += 1
    return n


def test_interrupts_at_a_cpu_where_kthreads_keep_starting_and_exiting():
    with emu.boot(cpus=2) as kernel:
        count, ticks = emu.Atomic(), emu.Atomic()
        assert emu.request_irq(IRQ, h_count, 0, "churn", count) == 0
        assert emu.irq_set_affinity(IRQ, [1]) == 0
        t = emu.kthread_run_on_cpu(churn, ticks, 0, "churn/%u")
        start = time.monotonic()
        raised, lost = one_at_a_time(count, 100 * ROUNDS,
                                     lambda: emu.atomic_read(ticks) >= KTHREADS)
        print(f"\n{raised} interrupts in {time.monotonic() - start:.1f} s, "
              f"{emu.atomic_read(ticks)} kthreads started on CPU 1, lost {lost}")
        assert emu.kthread_stop(t) > 0
        assert emu.free_irq(IRQ, count) == "churn"
        assert lost == 0
        assert kernel.warnings == kernel.bugs == kernel.oopses == 0
