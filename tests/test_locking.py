"""Atomics and spinlocks in shared memory (spec §4.2)."""

from __future__ import annotations

import mmap
import os
import signal
import struct

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import emu

from util import stop_after_exit, wait_state

INT_MAX = 2**31 - 1


def test_atomic_ops_and_return_values(kernel):
    v = emu.Atomic(5)
    assert emu.atomic_read(v) == 5 and v.counter == 5
    emu.atomic_inc(v)
    emu.atomic_add(10, v)
    emu.atomic_sub(2, v)
    assert emu.atomic_read(v) == 14
    assert emu.atomic_inc_return(v) == 15 and emu.atomic_dec_return(v) == 14
    assert emu.atomic_add_return(6, v) == 20 and emu.atomic_sub_return(20, v) == 0
    assert emu.atomic_dec_and_test(v) is False and emu.atomic_inc_and_test(v) is True
    assert emu.atomic_xchg(v, 7) == 0
    assert emu.atomic_cmpxchg(v, 1, 9) == 7 and emu.atomic_read(v) == 7
    assert emu.atomic_cmpxchg(v, 7, 9) == 7 and emu.atomic_read(v) == 9
    emu.atomic_set(v, 1)
    assert emu.atomic_dec_and_test(v) is True


def test_atomic_wraps_like_a_c_int_and_atomic64_does_not(kernel):
    v, w = emu.Atomic(INT_MAX), emu.Atomic64(INT_MAX)
    assert emu.atomic_inc_return(v) == -(2**31)
    assert emu.atomic64_inc_return(w) == 2**31
    emu.atomic64_set(w, 2**63 - 1)
    assert emu.atomic64_inc_return(w) == -(2**63)


def test_atomic_type_is_checked(kernel):
    with pytest.raises(TypeError, match="v must be an emu.Atomic "):
        emu.atomic_read(emu.Atomic64())
    with pytest.raises(TypeError, match="v must be an emu.Atomic64"):
        emu.atomic64_read(emu.Atomic())
    with pytest.raises(TypeError, match="lock must be an emu.Spinlock"):
        emu.spin_lock(emu.Atomic())


def test_atomics_lose_no_update_across_cpus(kernel):
    v = emu.Atomic()
    n = 5000

    def inc(v):
        for _ in range(n):
            emu.atomic_inc(v)
        return 0

    ts = [emu.kthread_run_on_cpu(inc, v, i % kernel.ncpus, "inc/%u") for i in range(4)]
    for t in ts:
        stop_after_exit(t, timeout=30)
    assert emu.atomic_read(v) == 4 * n


def test_spinlock_mutual_exclusion_across_cpus(kernel):
    """Plain read-modify-write of shared memory under spin_lock loses nothing."""
    page = mmap.mmap(-1, 8)
    lock = emu.Spinlock()
    n = 2000

    def worker(d):
        for _ in range(n):
            emu.spin_lock(lock)
            assert emu.in_atomic()
            (x,) = struct.unpack_from("q", page, 0)
            struct.pack_into("q", page, 0, x + 1)
            emu.spin_unlock(lock)
        return 0

    ts = [emu.kthread_run_on_cpu(worker, None, i % kernel.ncpus, "lock/%u") for i in range(4)]
    for t in ts:
        stop_after_exit(t, timeout=30)
    assert struct.unpack_from("q", page, 0)[0] == 4 * n
    assert not emu.spin_is_locked(lock)


def test_spin_lock_variants_set_the_context(kernel):
    lock = emu.Spinlock()
    flags = emu.spin_lock_irqsave(lock)
    assert emu.irqs_disabled() and emu.in_atomic() and emu.spin_is_locked(lock)
    emu.spin_unlock_irqrestore(lock, flags)
    assert not emu.irqs_disabled() and emu.preemptible()
    emu.local_irq_disable()
    flags = emu.spin_lock_irqsave(lock)
    emu.spin_unlock_irqrestore(lock, flags)
    assert emu.irqs_disabled(), "irqrestore restores the saved (disabled) state"
    emu.local_irq_enable()
    emu.spin_lock_irq(lock)
    assert emu.irqs_disabled()
    emu.spin_unlock_irq(lock)
    assert not emu.irqs_disabled()
    emu.spin_lock_bh(lock)
    assert emu.in_softirq() and emu.in_interrupt() and emu.in_task()
    emu.spin_unlock_bh(lock)
    assert emu.preempt_count() == 0


def test_spin_trylock(kernel):
    lock = emu.Spinlock()
    held = emu.Completion()
    release = emu.Completion()

    def holder(d):
        emu.spin_lock(lock)
        emu.complete(held)
        while not emu.completion_done(release):
            pass
        emu.spin_unlock(lock)
        return 0

    t = emu.kthread_run(holder, None, "holder")
    emu.wait_for_completion(held)
    assert emu.spin_trylock(lock) == 0 and emu.preempt_count() == 0
    emu.complete(release)
    stop_after_exit(t)
    assert emu.spin_trylock(lock) == 1 and emu.in_atomic()
    emu.spin_unlock(lock)


@pytest.mark.emu_expect(bugs=2, oopses=1)
def test_spinlock_recursion_is_a_bug_not_a_hang(kernel):
    lock = emu.Spinlock()

    def twice(d):
        emu.spin_lock(lock)
        emu.spin_lock(lock)
        return 1

    assert stop_after_exit(emu.kthread_run(twice, None, "recurse")) == 0
    log = "\n".join(kernel.dmesg())
    assert "BUG: spinlock recursion on CPU#" in log and "recurse/" in log


@pytest.mark.emu_boot(softlockup_thresh_secs=1)
@pytest.mark.emu_expect(bugs=None)
def test_spinning_past_the_threshold_is_a_soft_lockup(kernel):
    lock = emu.Spinlock()
    release = emu.Completion()

    def holder(d):
        emu.spin_lock(lock)
        emu.wait_for_completion_timeout(release, emu.msecs_to_jiffies(1500))
        emu.spin_unlock(lock)
        return 0

    t = emu.kthread_run(holder, None, "holder")
    wait_state(t, "D")
    emu.spin_lock(lock)  # spins ~1.5 s: one soft-lockup report, then gets it
    emu.spin_unlock(lock)
    stop_after_exit(t)
    log = "\n".join(kernel.dmesg())
    assert "watchdog: BUG: soft lockup - CPU#" in log and "stuck for 1s!" in log
    assert kernel.bugs >= 2  # the holder also slept while atomic


@pytest.mark.emu_expect(oopses=1, warnings=1)
def test_spinlock_of_a_killed_holder_is_taken_over(kernel):
    lock = emu.Spinlock()
    held = emu.Completion()

    def holder(d):
        emu.spin_lock(lock)
        emu.complete(held)
        while True:
            pass

    t = emu.kthread_run(holder, None, "dies")
    emu.wait_for_completion(held)
    os.kill(t.pid, signal.SIGKILL)
    emu.spin_lock(lock)
    emu.spin_unlock(lock)
    emu.kthread_stop(t)
    assert "spinlock taken over from dead task" in "\n".join(kernel.dmesg())


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "sub", "xchg", "cmpxchg"]),
                              st.integers(-2**31, INT_MAX)), max_size=30))
def test_atomic_matches_a_c_int_model(kernel, ops):
    """Operands are ints (tests/test_bad_input.py: others are refused); results wrap."""
    def wrap(x):
        return ((x + 2**31) % 2**32) - 2**31

    v, model = emu.Atomic(), 0
    for op, i in ops:
        if op == "add":
            model = wrap(model + i)
            assert emu.atomic_add_return(i, v) == model
        elif op == "sub":
            model = wrap(model - i)
            assert emu.atomic_sub_return(i, v) == model
        elif op == "xchg":
            assert emu.atomic_xchg(v, i) == model
            model = wrap(i)
        else:
            found = emu.atomic_cmpxchg(v, model if i % 2 else wrap(model + 1), i)
            assert found == model
            if i % 2:
                model = wrap(i)
    assert emu.atomic_read(v) == model
