"""Hard interrupts: request/free, delivery into running Python code, masking, replay,
threaded handlers, /proc/interrupts and emulated devices (spec §4, §10.2-10.4).

Hard-IRQ handlers run in whichever task the interrupt hits, each on its own copy of
what it captures, so results are recorded in emu.Atomic counters (shared) and checked
by the test; the handlers here are module-level functions taking a tuple of emu
handles as `dev` (closures and other callables: test_callbacks.py).
"""

from __future__ import annotations

import errno
import os
import re
import threading
import time

import psutil
import pytest

import emu
from emu import image
from emu.irq import irq_task
from emu.irqchip import SIG_IRQ

from util import start_lock_holder, stop_after_exit, wait_state, wait_until

IRQ = 5
#: Generous bound for anything that waits on another process (other jobs may load the box).
T = 20.0


# --- helpers --------------------------------------------------------------------------------------

def busy(ticks):
    """Run Python code on the CPU until stopped, counting loop iterations."""
    while not emu.kthread_should_stop():
        emu.atomic_inc(ticks)
    return 7


def start_busy(cpu=1):
    """A kthread running Python code on `cpu` (state R) until stopped; returns it, its ticks."""
    ticks = emu.Atomic()
    t = emu.kthread_run_on_cpu(busy, ticks, cpu, "busy/%u")
    wait_until(lambda: emu.atomic_read(ticks) > 0, T, "the busy kthread to run")
    return t, ticks


def wait_ticks(ticks, n=2):
    """Wait until the busy kthread ran `n` more iterations: it is back in its own code."""
    start = emu.atomic_read(ticks)
    wait_until(lambda: emu.atomic_read(ticks) >= start + n, T, "the busy kthread to go on")


def irq_counts(kernel, irq):
    """Per-CPU counts of `irq` in kernel.proc_interrupts(), or None if it has no line."""
    for line in kernel.proc_interrupts().splitlines()[1:]:
        head, sep, rest = line.partition(":")
        if sep and head.strip() == str(irq):
            return [int(x) for x in rest.split()[: kernel.ncpus]]
    return None


def irq_line(kernel, irq):
    for line in kernel.proc_interrupts().splitlines()[1:]:
        head, sep, _ = line.partition(":")
        if sep and head.strip() == str(irq):
            return line
    return None


def log_text(kernel):
    return "\n".join(kernel.dmesg())


def sig_pending(pid, sig):
    """True while real signal `sig` is queued for process `pid` and not yet delivered."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("SigPnd:", "ShdPnd:")):
                if int(line.split()[1], 16) >> (sig - 1) & 1:
                    return True
    return False


def read(a):
    return emu.atomic_read(a)


# --- handlers -------------------------------------------------------------------------------------

def h_count(irq, dev):
    emu.atomic_inc(dev)
    return emu.IRQ_HANDLED


def h_wake(irq, dev):
    emu.atomic_inc(dev)
    return emu.IRQ_WAKE_THREAD


def thread_nop(irq, dev):
    return emu.IRQ_HANDLED


def h_where(irq, dev):
    pid, bits, count = dev
    emu.atomic_set(pid, os.getpid())
    b = (
        emu.in_hardirq() << 0
        | emu.in_interrupt() << 1
        | emu.irqs_disabled() << 2
        | emu.in_task() << 3
        | emu.in_atomic() << 4
        | (emu.current().pid == os.getpid()) << 5
        | emu.in_irq() << 6
    )
    emu.atomic_set(bits, b)
    emu.atomic_inc(count)
    return emu.IRQ_HANDLED


def h_nest(irq, dev):
    count, inside, nested = dev
    if emu.atomic_inc_return(inside) != 1:
        emu.atomic_inc(nested)
    emu.atomic_inc(count)
    emu.atomic_dec(inside)
    return emu.IRQ_HANDLED


def h_rmw(irq, dev):
    """Plain read-modify-write of a counter shared with a kthread, under `lock`."""
    lock, counter, handled = dev
    emu.spin_lock(lock)
    v = emu.atomic_read(counter)
    emu.atomic_set(counter, v + 1)
    emu.spin_unlock(lock)
    emu.atomic_inc(handled)
    return emu.IRQ_HANDLED


def h_lock(irq, dev):
    lock, entered, done = dev
    emu.atomic_inc(entered)
    emu.spin_lock(lock)
    emu.spin_unlock(lock)
    emu.atomic_inc(done)
    return emu.IRQ_HANDLED


def h_slow(irq, dev):
    """The first run of each round spins until the test releases the round."""
    runs, inside, overlap, go, test_pid, in_test = dev
    if emu.atomic_inc_return(inside) != 1:
        emu.atomic_inc(overlap)
    if os.getpid() == test_pid:
        emu.atomic_inc(in_test)
    r = emu.atomic_inc_return(runs)
    if r % 2 == 1:
        while emu.atomic_read(go) < (r + 1) // 2:
            pass
    emu.atomic_dec(inside)
    return emu.IRQ_HANDLED


def h_raise_first(irq, dev):
    calls, ok = dev
    if emu.atomic_inc_return(calls) == 1:
        raise RuntimeError("device on fire")
    emu.atomic_inc(ok)
    return emu.IRQ_HANDLED


def h_wait(irq, dev):
    entered, after, c = dev
    emu.atomic_inc(entered)
    emu.wait_for_completion(c)
    emu.atomic_inc(after)
    return emu.IRQ_HANDLED


def h_msleep(irq, dev):
    entered, after = dev
    emu.atomic_inc(entered)
    emu.msleep(10)
    emu.atomic_inc(after)
    return emu.IRQ_HANDLED


# --- 1. request_irq / free_irq --------------------------------------------------------------------

@pytest.mark.emu_expect(warnings=1)
def test_request_irq_return_values_and_free_irq(kernel):
    a, b, c, d = emu.Atomic(), emu.Atomic(), emu.Atomic(), emu.Atomic()
    assert emu.request_threaded_irq(3, None, None, 0, "neither", a) == -errno.EINVAL
    assert emu.request_irq(3, h_count, emu.IRQF_SHARED, "nodev", None) == -errno.EINVAL
    assert emu.request_threaded_irq(3, None, thread_nop, 0, "nooneshot", a) == -errno.EINVAL
    assert ("genirq: Threaded irq requested with handler=NULL and !ONESHOT for nooneshot (irq 3)"
            in log_text(kernel))
    assert irq_counts(kernel, 3) is None, "a rejected request installs nothing"

    assert emu.request_irq(3, h_count, 0, "excl", a) == 0
    assert emu.request_irq(3, h_count, 0, "excl2", b) == -errno.EBUSY
    assert emu.request_irq(3, h_count, emu.IRQF_SHARED, "excl3", b) == -errno.EBUSY

    assert emu.request_irq(4, h_count, emu.IRQF_SHARED, "sh-a", b) == 0
    assert emu.request_irq(4, h_count, emu.IRQF_SHARED, "sh-b", c) == 0
    assert emu.request_irq(4, h_count, 0, "notshared", d) == -errno.EBUSY
    me = emu.current().cpu
    assert emu.irq_set_affinity(3, me) == 0 and emu.irq_set_affinity(4, me) == 0
    emu.irq_inject_interrupt(4)
    wait_until(lambda: read(b) == 1 and read(c) == 1, T, "both shared handlers")
    emu.irq_inject_interrupt(3)
    wait_until(lambda: read(a) == 1, T, "the exclusive handler")
    assert read(d) == 0, "handlers of rejected requests never run"
    assert irq_line(kernel, 4).endswith("sh-a, sh-b")

    assert emu.free_irq(3, a) == "excl"
    assert emu.free_irq(4, b) == "sh-a"
    emu.irq_inject_interrupt(4)
    wait_until(lambda: read(c) == 2, T, "the remaining shared handler")
    assert read(b) == 1, "a freed handler no longer runs"
    assert emu.free_irq(4, c) == "sh-b"
    assert kernel.warnings == 0

    assert emu.free_irq(3, a) is None
    assert "Trying to free already-free IRQ 3" in log_text(kernel)
    assert kernel.warnings == 1

    lock = threading.Lock()  # cannot be carried to the tasks that run the handler
    with pytest.raises(TypeError, match="handler"):
        emu.request_irq(6, lambda irq, dev: lock.locked() or emu.IRQ_HANDLED, 0, "lambda", a)
    for bad in (-1, 32, 10**6):
        with pytest.raises(ValueError, match="irq"):
            emu.request_irq(bad, h_count, 0, "bad", a)
    # the rejected lambda left line 6 free
    assert emu.request_irq(6, h_count, 0, "after", a) == 0
    assert emu.free_irq(6, a) == "after"


# --- 2. delivery into running Python code ---------------------------------------------------------

@pytest.mark.emu_boot(cpus=2)
def test_interrupt_runs_in_the_middle_of_a_busy_kthread(kernel):
    t, ticks = start_busy(1)
    pid, bits, count = dev = (emu.Atomic(), emu.Atomic(), emu.Atomic())
    assert emu.request_irq(IRQ, h_where, 0, "where", dev) == 0
    assert emu.irq_set_affinity(IRQ, 1) == 0
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(count) == 1, T, "the handler")
    assert read(pid) == t.pid != os.getpid(), "the handler ran inside the busy kthread"
    b = read(bits)
    assert b & 1 and b & 64, "in_hardirq()/in_irq()"
    assert b & 2, "in_interrupt()"
    assert b & 4, "irqs_disabled()"
    assert not b & 8, "in_task() is false"
    assert b & 16, "in_atomic()"
    assert b & 32, "current is the interrupted task"
    wait_ticks(ticks)  # the interrupted code goes on
    assert emu.task_state_to_char(t) == "R"
    assert irq_counts(kernel, IRQ) == [0, 1]
    assert emu.kthread_stop(t) == 7
    assert emu.free_irq(IRQ, dev) == "where"


# --- 3. local_irq_disable() holds interrupts ------------------------------------------------------

@pytest.mark.emu_boot(cpus=2)
def test_interrupts_wait_while_the_task_has_them_disabled(kernel):
    count, inside, nested = dev = (emu.Atomic(), emu.Atomic(), emu.Atomic())
    ready = [emu.Completion(), emu.Completion()]
    go = [emu.Atomic(), emu.Atomic()]
    spins = emu.Atomic()
    seen = [emu.Atomic(-1) for _ in range(4)]

    def fn(_):
        for rnd in range(2):
            emu.local_irq_disable()
            emu.complete(ready[rnd])
            while not emu.atomic_read(go[rnd]):
                emu.atomic_inc(spins)
            emu.atomic_set(seen[2 * rnd], emu.atomic_read(count))
            emu.local_irq_enable()
            emu.atomic_set(seen[2 * rnd + 1], emu.atomic_read(count))
        return 100 * emu.atomic_read(seen[0]) + emu.atomic_read(seen[1])

    assert emu.request_irq(IRQ, h_nest, 0, "held", dev) == 0
    assert emu.irq_set_affinity(IRQ, 1) == 0
    t = emu.kthread_run_on_cpu(fn, None, 1, "irqoff/%u")

    def arrive(n):
        for _ in range(n):
            emu.irq_inject_interrupt(IRQ)
        # the doorbell reached the task and it ran Python code afterwards
        wait_until(lambda: not sig_pending(t.pid, SIG_IRQ), T, "doorbell delivery")
        s = read(spins)
        wait_until(lambda: read(spins) >= s + 2, T, "the task to spin on")

    emu.wait_for_completion(ready[0])
    arrive(1)
    assert read(count) == 0
    emu.atomic_set(go[0], 1)
    emu.wait_for_completion(ready[1])
    assert read(seen[0]) == 0, "not handled while interrupts were off"
    assert read(seen[1]) == 1, "delivered synchronously by local_irq_enable()"

    arrive(50)  # many arrivals while disabled collapse
    assert read(count) == 1
    emu.atomic_set(go[1], 1)
    assert stop_after_exit(t, T) == 1
    assert read(seen[2]) == 1
    assert 2 <= read(seen[3]) <= 51
    assert read(nested) == 0, "the handler was never re-entered"
    assert emu.free_irq(IRQ, dev) == "held"


# --- 4. uninterruptible sleep vs interrupts -------------------------------------------------------

@pytest.mark.emu_boot(cpus=2)
def test_uninterruptible_wait_is_not_ended_by_interrupts_or_doorbells(kernel):
    count = emu.Atomic()
    assert emu.request_irq(IRQ, h_count, 0, "noise", count) == 0
    assert emu.irq_set_affinity(IRQ, 1) == 0
    c = emu.Completion()
    t = emu.kthread_run_on_cpu(lambda c: emu.wait_for_completion(c) or 8, c, 1, "dwait/%u")
    wait_state(t, "D", T)
    for i in range(200):
        os.kill(t.pid, SIG_IRQ)
        if i % 10 == 0:
            emu.irq_inject_interrupt(IRQ)
    # A doorbell also posts the target's semaphore (for a doorbell racing with the start
    # of a sleep): spurious posts must not end the sleep either.
    sem = image.this().sems[t.slot]
    for _ in range(5):
        sem.release()
    wait_until(lambda: not sig_pending(t.pid, SIG_IRQ), T, "doorbell delivery")
    wait_until(lambda: sem.value == 0, T, "the sleeper to absorb the posts")
    wait_until(lambda: read(count) >= 1, T, "the interrupts to be handled")
    assert emu.task_state_to_char(t) == "D"
    assert c.done == 0
    emu.complete(c)
    assert stop_after_exit(t, T) == 8
    assert emu.free_irq(IRQ, count) == "noise"


# --- 5. spin_lock_irqsave against the handler -----------------------------------------------------

@pytest.mark.emu_boot(cpus=2)
def test_irqsave_lock_shared_with_handler_loses_no_update(kernel):
    lock, counter, handled = dev = (emu.Spinlock(), emu.Atomic(), emu.Atomic())
    target, deadline_s = 3000, 12.0

    def worker(_):
        n = 0
        deadline = time.monotonic() + deadline_s
        while emu.atomic_read(handled) < target and time.monotonic() < deadline:
            flags = emu.spin_lock_irqsave(lock)
            v = emu.atomic_read(counter)
            v += 1
            emu.atomic_set(counter, v)
            emu.spin_unlock_irqrestore(lock, flags)
            n += 1
        return n

    assert emu.request_irq(IRQ, h_rmw, 0, "rmw", dev) == 0
    assert emu.irq_set_affinity(IRQ, 1) == 0
    t = emu.kthread_run_on_cpu(worker, None, 1, "rmw/%u")
    src = kernel.add_irq_source(IRQ, rate_hz=2000, count=-1)
    try:
        iterations = stop_after_exit(t, deadline_s + T)
    finally:
        kernel.remove_irq_source(src)
    emu.synchronize_irq(IRQ)
    assert emu.free_irq(IRQ, dev) == "rmw"
    # edges that arrive while one is pending merge: a loaded machine handles fewer
    assert read(handled) >= 500, f"only {read(handled)} interrupts handled"
    assert iterations > 0
    assert read(counter) == iterations + read(handled), "an update was lost"
    assert not emu.spin_is_locked(lock)


# --- 6. plain spin_lock against the handler: the classic deadlock ---------------------------------

@pytest.mark.emu_boot(cpus=2)
@pytest.mark.emu_expect(bugs=None, oopses=None)
def test_plain_spin_lock_taken_by_handler_is_reported_as_recursion(kernel):
    lock, entered, done = dev = (emu.Spinlock(), emu.Atomic(), emu.Atomic())
    go, spins = emu.Atomic(), emu.Atomic()
    held = emu.Completion()

    def holder(_):
        emu.spin_lock(lock)
        emu.complete(held)
        while not emu.atomic_read(go):
            emu.atomic_inc(spins)
        emu.spin_unlock(lock)
        while not emu.kthread_should_stop():
            pass
        return 5

    assert emu.request_irq(IRQ, h_lock, 0, "locker", dev) == 0
    assert emu.irq_set_affinity(IRQ, 1) == 0
    t = emu.kthread_run_on_cpu(holder, None, 1, "holder/%u")
    emu.wait_for_completion(held)
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: kernel.oopses >= 1 and "Oops: " in log_text(kernel), T, "the report")
    wait_ticks(spins)  # the handler ended and the holder went on
    log = log_text(kernel)
    assert re.search(rf"BUG: spinlock recursion on CPU#1, holder/1/{t.pid}", log)
    assert "kernel BUG at" in log and "Oops: " in log
    assert kernel.bugs >= 1 and kernel.oopses >= 1
    assert read(entered) == 1 and read(done) == 0, "BUG() ended the handler"
    assert emu.spin_is_locked(lock), "the interrupted holder still holds its lock"
    assert emu.task_state_to_char(t) == "R"
    emu.atomic_set(go, 1)
    wait_until(lambda: not emu.spin_is_locked(lock), T, "the holder to go on and unlock")
    # the kernel keeps working: the line and the task that took the BUG
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(done) == 1, T, "a later interrupt")
    assert emu.kthread_stop(t) == 5
    assert stop_after_exit(emu.kthread_run(lambda d: 3, None, "after"), T) == 3
    assert emu.free_irq(IRQ, dev) == "locker"


# --- 7. one line never runs re-entrantly or on two CPUs; arrivals replay once ---------------------

@pytest.mark.emu_boot(cpus=2)
def test_same_irq_is_never_reentered_and_replays_once(kernel):
    runs, inside, overlap, go, in_test = (emu.Atomic() for _ in range(5))
    dev = (runs, inside, overlap, go, os.getpid(), in_test)
    t, ticks = start_busy(1)
    assert emu.request_irq(IRQ, h_slow, 0, "slow", dev) == 0
    assert emu.irq_set_affinity(IRQ, 1) == 0

    # Round 1: arrivals on the same CPU while the handler runs (interrupts are off there).
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(runs) == 1, T, "the first run")
    for _ in range(3):
        emu.irq_inject_interrupt(IRQ)
    emu.atomic_set(go, 1)
    wait_until(lambda: read(runs) == 2, T, "the replay")
    emu.synchronize_irq(IRQ)
    wait_ticks(ticks)
    assert read(runs) == 2

    # Round 2: arrivals on another CPU (this task) while CPU 1 runs the handler.
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(runs) == 3, T, "the first run of round 2")
    assert emu.irq_set_affinity(IRQ, 0) == 0
    for _ in range(3):
        emu.irq_inject_interrupt(IRQ)  # handled (not) right here, on CPU 0
    assert read(runs) == 3 and read(in_test) == 0, "not run while in progress elsewhere"
    emu.atomic_set(go, 2)
    wait_until(lambda: read(runs) == 4, T, "the replay of round 2")
    emu.synchronize_irq(IRQ)
    wait_ticks(ticks)
    assert read(runs) == 4
    assert read(in_test) == 0, "the replay ran on the CPU that was handling the line"
    assert read(overlap) == 0, "never two runs at once"
    # three flow-handler entries on CPU 1; absorbed arrivals and replays are not counted
    assert irq_counts(kernel, IRQ) == [0, 3]
    assert emu.kthread_stop(t) == 7
    assert emu.free_irq(IRQ, dev) == "slow"


# --- 8. disable_irq / enable_irq / synchronize_irq ------------------------------------------------

@pytest.mark.emu_expect(warnings=1)
def test_disable_enable_irq_nest_and_replay_once(kernel):
    count = emu.Atomic()
    assert emu.request_irq(IRQ, h_count, 0, "dis", count) == 0
    assert emu.irq_set_affinity(IRQ, emu.current().cpu) == 0  # delivered in this task
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(count) == 1, T, "the first interrupt")

    emu.disable_irq(IRQ)
    emu.disable_irq(IRQ)
    for _ in range(3):
        emu.irq_inject_interrupt(IRQ)
    assert read(count) == 1, "held while disabled"
    emu.enable_irq(IRQ)
    assert read(count) == 1, "disables nest: still disabled"
    emu.enable_irq(IRQ)
    wait_until(lambda: read(count) == 2, T, "the replay")
    emu.synchronize_irq(IRQ)
    assert read(count) == 2, "replayed exactly once"

    emu.disable_irq_nosync(IRQ)
    emu.enable_irq(IRQ)
    emu.synchronize_irq(IRQ)
    assert read(count) == 2, "no arrival, nothing replayed"

    assert kernel.warnings == 0
    emu.enable_irq(IRQ)
    assert kernel.warnings == 1
    assert f"Unbalanced enable for IRQ {IRQ}" in log_text(kernel)
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(count) == 3, T, "an interrupt after the unbalanced enable")
    emu.disable_irq(IRQ)  # depth stayed 0: one disable masks the line again
    emu.irq_inject_interrupt(IRQ)
    assert read(count) == 3
    emu.enable_irq(IRQ)
    wait_until(lambda: read(count) == 4, T, "the replay")
    emu.synchronize_irq(IRQ)
    assert emu.free_irq(IRQ, count) == "dis"


# --- 9. threaded handlers -------------------------------------------------------------------------

def test_threaded_irq_runs_thread_fn_in_its_irq_thread(kernel):
    hard, runs, ctx, pid = emu.Atomic(), emu.Atomic(), emu.Atomic(), emu.Atomic()

    def thread_fn(irq, dev):
        b = (
            emu.in_task() << 0
            | (not emu.in_interrupt()) << 1
            | (not emu.irqs_disabled()) << 2
            | emu.preemptible() << 3
            | (emu.current().pid == os.getpid()) << 4
            | (dev is hard or dev == hard) << 5
        )
        emu.msleep(1)  # process context may sleep
        emu.atomic_set(ctx, b)
        emu.atomic_set(pid, os.getpid())
        emu.atomic_inc(runs)
        return emu.IRQ_HANDLED

    assert emu.request_threaded_irq(IRQ, h_wake, thread_fn, 0, "threaded-device", hard) == 0
    t = irq_task(IRQ)
    assert t is not None and t.is_kthread
    assert t.full_name == f"irq/{IRQ}-threaded-device"
    assert t.comm == t.full_name[:15] == f"irq/{IRQ}-threaded-"
    wait_state(t, "S", T)
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(runs) == 1, T, "thread_fn")
    assert read(hard) == 1
    assert read(pid) == t.pid
    assert read(ctx) == 0b111111
    wait_state(t, "S", T)
    assert sum(irq_counts(kernel, IRQ)) == 1, "thread_fn runs are not counted"
    thread_pid = t.pid
    assert emu.free_irq(IRQ, hard) == "threaded-device"
    wait_until(lambda: not psutil.pid_exists(thread_pid)
               or psutil.Process(thread_pid).status() == psutil.STATUS_ZOMBIE, T,
               "free_irq to stop the irq thread")


def test_wakeups_during_thread_fn_give_exactly_one_more_run(kernel):
    hard, runs = emu.Atomic(), emu.Atomic()
    release = emu.Completion()

    def thread_fn(irq, dev):
        if emu.atomic_inc_return(runs) == 1:
            emu.wait_for_completion(release)
        return emu.IRQ_HANDLED

    assert emu.request_threaded_irq(IRQ, h_wake, thread_fn, 0, "rerun", hard) == 0
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(runs) == 1, T, "the first run")
    wait_state(irq_task(IRQ), "D", T)  # blocked inside thread_fn
    for _ in range(3):
        emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(hard) == 4, T, "the primary handler (no ONESHOT: not masked)")
    assert read(runs) == 1
    emu.complete(release)
    wait_until(lambda: read(runs) == 2, T, "the second run")
    emu.synchronize_irq(IRQ)  # waits for the irq thread too
    wait_state(irq_task(IRQ), "S", T)
    assert read(runs) == 2
    assert emu.free_irq(IRQ, hard) == "rerun"


def test_oneshot_keeps_the_line_masked_until_thread_fn_returns(kernel):
    hard, runs = emu.Atomic(), emu.Atomic()
    release = emu.Completion()

    def thread_fn(irq, dev):
        if emu.atomic_inc_return(runs) == 1:
            emu.wait_for_completion(release)
        return emu.IRQ_HANDLED

    assert emu.request_threaded_irq(IRQ, h_wake, thread_fn, emu.IRQF_ONESHOT, "oneshot", hard) == 0
    assert emu.irq_set_affinity(IRQ, emu.current().cpu) == 0
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(runs) == 1, T, "the first run")
    for _ in range(3):
        emu.irq_inject_interrupt(IRQ)  # delivered in this task: the line is masked
    assert read(hard) == 1, "masked while thread_fn runs"
    assert sum(irq_counts(kernel, IRQ)) == 1
    emu.complete(release)
    wait_until(lambda: read(runs) == 2, T, "the replayed run")
    emu.synchronize_irq(IRQ)
    assert read(hard) == 2 and read(runs) == 2, "the held arrivals replay once"
    assert emu.free_irq(IRQ, hard) == "oneshot"


def test_handler_none_with_oneshot_uses_the_default_primary_handler(kernel):
    runs = emu.Atomic()

    def thread_fn(irq, dev):
        emu.atomic_inc(dev)
        return emu.IRQ_HANDLED

    assert emu.request_threaded_irq(IRQ, None, thread_fn, emu.IRQF_ONESHOT, "dflt", runs) == 0
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(runs) == 1, T, "thread_fn")
    emu.synchronize_irq(IRQ)
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(runs) == 2, T, "thread_fn again")
    assert sum(irq_counts(kernel, IRQ)) == 2
    assert emu.free_irq(IRQ, runs) == "dflt"


def test_wake_thread_without_thread_fn_is_logged_once(kernel):
    hard = emu.Atomic()
    assert emu.request_irq(IRQ, h_wake, 0, "nothread", hard) == 0
    for n in (1, 2, 3):
        emu.irq_inject_interrupt(IRQ)
        wait_until(lambda n=n: read(hard) == n, T, "the handler")
    msg = f"IRQ {IRQ} device nothread returned IRQ_WAKE_THREAD but no thread function available."
    assert sum(msg in line for line in kernel.dmesg()) == 1
    assert emu.free_irq(IRQ, hard) == "nothread"


# --- 10. handler failures -------------------------------------------------------------------------

@pytest.mark.emu_boot(cpus=2)
@pytest.mark.emu_expect(oopses=1)
def test_exception_in_handler_is_an_oops_and_the_task_carries_on(kernel):
    t, ticks = start_busy(1)
    calls, ok = dev = (emu.Atomic(), emu.Atomic())
    assert emu.request_irq(IRQ, h_raise_first, 0, "fire", dev) == 0
    assert emu.irq_set_affinity(IRQ, 1) == 0
    emu.irq_inject_interrupt(IRQ)
    oops = f"Oops: RuntimeError in interrupt handler of irq {IRQ}: device on fire"
    # the counter goes up before the report is logged: wait for the report's last line
    wait_until(lambda: oops in log_text(kernel) and "---[ end trace" in log_text(kernel), T,
               "the Oops")
    assert kernel.oopses == 1
    log = log_text(kernel)
    assert re.search(rf"CPU: 1 PID: {t.pid} Comm: busy/1 ", log)
    assert "Call Trace:" in log and "h_raise_first" in log
    wait_ticks(ticks)
    assert emu.task_state_to_char(t) == "R"
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(ok) == 1, T, "a later interrupt")
    assert read(calls) == 2
    assert emu.kthread_stop(t) == 7
    assert emu.free_irq(IRQ, dev) == "fire"


@pytest.mark.emu_boot(cpus=2)
@pytest.mark.emu_expect(bugs=None, oopses=None)
def test_sleeping_in_a_handler_is_reported_and_does_not_hang_the_cpu(kernel):
    t, ticks = start_busy(1)
    c = emu.Completion()
    w = (emu.Atomic(), emu.Atomic(), c)
    m = (emu.Atomic(), emu.Atomic())
    later = emu.Atomic()
    assert emu.request_irq(IRQ, h_wait, 0, "waits", w) == 0
    assert emu.request_irq(IRQ + 1, h_msleep, 0, "sleeps", m) == 0
    assert emu.request_irq(IRQ + 2, h_count, 0, "later", later) == 0
    for irq in (IRQ, IRQ + 1, IRQ + 2):
        assert emu.irq_set_affinity(irq, 1) == 0

    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: "BUG: scheduling while atomic" in log_text(kernel), T, "the report")
    log = log_text(kernel)
    assert "BUG: sleeping function called from invalid context at" in log
    assert re.search(rf"in_atomic\(\): 1, irqs_disabled\(\): 1, non_block: 0, pid: {t.pid}, "
                     r"name: busy/1", log)
    assert re.search(rf"BUG: scheduling while atomic: busy/1/{t.pid}/0x0001", log)
    wait_ticks(ticks)
    assert read(w[0]) == 1 and read(w[1]) == 0, "the handler was ended, not left sleeping"

    emu.irq_inject_interrupt(IRQ + 1)
    wait_until(lambda: log_text(kernel).count("BUG: scheduling while atomic") >= 2, T,
               "the msleep report")
    wait_ticks(ticks)
    assert read(m[0]) == 1 and read(m[1]) == 0

    emu.irq_inject_interrupt(IRQ + 2)
    wait_until(lambda: read(later) == 1, T, "a later interrupt")
    wait_ticks(ticks)
    assert emu.kthread_stop(t) == 7
    for irq, dev in ((IRQ, w), (IRQ + 1, m), (IRQ + 2, later)):
        assert emu.free_irq(irq, dev) is not None


@pytest.mark.emu_boot(cpus=2)
@pytest.mark.emu_expect(bugs=None, oopses=None)
def test_sleep_attempt_in_handler_leaves_the_interrupted_task_running(kernel):
    t, ticks = start_busy(1)
    m = (emu.Atomic(), emu.Atomic())
    assert emu.request_irq(IRQ, h_msleep, 0, "sleeps", m) == 0
    assert emu.irq_set_affinity(IRQ, 1) == 0
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(m[0]) == 1, T, "the handler")
    wait_ticks(ticks)
    state = emu.task_state_to_char(t)
    emu.kthread_stop(t)
    emu.free_irq(IRQ, m)
    assert state == "R"


def h_enables(irq, dev):
    emu.local_irq_enable()
    emu.atomic_inc(dev)
    return emu.IRQ_HANDLED


@pytest.mark.emu_expect(warnings=1)
def test_handler_that_enables_interrupts_is_warned_about_once(kernel):
    count = emu.Atomic()
    assert emu.request_irq(IRQ, h_enables, 0, "enabler", count) == 0
    assert emu.irq_set_affinity(IRQ, emu.current().cpu) == 0  # delivered in this task
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(count) == 1, T, "the handler")
    assert kernel.warnings == 1
    assert f"irq {IRQ} handler enabler enabled interrupts" in log_text(kernel)
    assert not emu.irqs_disabled() and emu.preemptible(), "this task's context is intact"
    for n in (2, 3):
        emu.irq_inject_interrupt(IRQ)
        wait_until(lambda n=n: read(count) == n, T, "the handler again")
    assert kernel.warnings == 1, "WARN_ONCE"
    assert emu.free_irq(IRQ, count) == "enabler"


# --- 11. /proc/interrupts -------------------------------------------------------------------------

@pytest.mark.emu_boot(cpus=2)
def test_proc_interrupts_layout(kernel):
    t, _ = start_busy(1)
    a, b, c = emu.Atomic(), emu.Atomic(), emu.Atomic()
    assert emu.request_irq(IRQ, h_count, emu.IRQF_SHARED, "dev-a", a) == 0
    assert emu.request_irq(IRQ, h_count, emu.IRQF_SHARED, "dev-b", b) == 0
    assert emu.request_irq(12, h_count, 0, "idle-line", c) == 0
    assert emu.irq_set_affinity(IRQ, 0) == 0
    for _ in range(2):
        emu.irq_inject_interrupt(IRQ)
        emu.synchronize_irq(IRQ)
    wait_until(lambda: read(a) == 2, T, "CPU 0 interrupts")
    assert emu.irq_set_affinity(IRQ, 1) == 0
    for n in (3, 4, 5):
        emu.irq_inject_interrupt(IRQ)
        wait_until(lambda n=n: read(a) == n, T, "CPU 1 interrupts")

    lines = kernel.proc_interrupts().splitlines()
    assert lines[0].split() == ["CPU0", "CPU1"]
    assert re.fullmatch(r"  5:          2          3  .*  dev-a, dev-b", irq_line(kernel, IRQ))
    assert re.fullmatch(r" 12:          0          0  .*  idle-line", irq_line(kernel, 12))
    assert irq_line(kernel, 13) is None, "lines without action or counts are not shown"

    assert emu.free_irq(IRQ, a) == "dev-a"
    assert emu.free_irq(IRQ, b) == "dev-b"
    assert emu.free_irq(12, c) == "idle-line"
    line = irq_line(kernel, IRQ)
    assert line is not None, "a freed line with counts stays"
    assert re.match(r"  5:          2          3 ", line)
    assert "dev-" not in line
    assert irq_line(kernel, 12) is None, "a freed line without counts goes"
    emu.kthread_stop(t)


@pytest.mark.emu_boot(cpus=2)
def test_proc_interrupts_header_lines_up_with_the_counts(kernel):
    a = emu.Atomic()
    assert emu.request_irq(IRQ, h_count, 0, "dev", a) == 0
    header, line = kernel.proc_interrupts().splitlines()[:2]
    assert header.startswith(" " * 11 + "CPU0       CPU1")  # prec + 8 spaces, CPU%-8d
    # each CPUn label ends where its right-aligned count field ends
    assert header.index("CPU0") + 4 == len("  5:") + 11
    assert line.startswith("  5:          0          0")
    assert emu.free_irq(IRQ, a) == "dev"


# --- 12. emulated devices (supervisor interrupt sources) ------------------------------------------

def test_irq_source_with_delay_fires_once(kernel):
    count = emu.Atomic()
    assert emu.request_irq(IRQ, h_count, 0, "oneshot-dev", count) == 0
    src = kernel.add_irq_source(IRQ, delay=0.05)
    wait_until(lambda: read(count) == 1, T, "the device interrupt")
    # a second source proves the supervisor went on firing devices: the first stayed quiet
    done = emu.Atomic()
    assert emu.request_irq(IRQ + 1, h_count, 0, "probe", done) == 0
    kernel.add_irq_source(IRQ + 1, delay=0.2)
    wait_until(lambda: read(done) == 1, T, "the probe interrupt")
    emu.synchronize_irq(IRQ)
    assert read(count) == 1
    kernel.remove_irq_source(src)  # harmless after it finished
    assert emu.free_irq(IRQ, count) == "oneshot-dev"
    assert emu.free_irq(IRQ + 1, done) == "probe"


def test_irq_source_rate_and_count_fires_count_times(kernel):
    count = emu.Atomic()
    assert emu.request_irq(IRQ, h_count, 0, "periodic", count) == 0
    src = kernel.add_irq_source(IRQ, rate_hz=500, count=20)
    rec = image.this().img.irq_sources[src]
    wait_until(lambda: not rec.in_use, T, "the device to finish")
    assert rec.fired == 20, "it stopped after count firings"
    wait_until(lambda: read(count) >= 1, T, "the device interrupts")
    emu.synchronize_irq(IRQ)
    handled = read(count)
    assert 1 <= handled <= 20
    # the supervisor went on firing devices (a probe): the finished one stayed quiet
    done = emu.Atomic()
    assert emu.request_irq(IRQ + 1, h_count, 0, "probe", done) == 0
    kernel.add_irq_source(IRQ + 1, delay=0.1)
    wait_until(lambda: read(done) == 1, T, "the probe interrupt")
    emu.synchronize_irq(IRQ)
    assert read(count) == handled
    assert emu.free_irq(IRQ, count) == "periodic"
    assert emu.free_irq(IRQ + 1, done) == "probe"


def test_irq_source_rate_delivers_each_period(kernel):
    count = emu.Atomic()
    assert emu.request_irq(IRQ, h_count, 0, "periodic", count) == 0
    kernel.add_irq_source(IRQ, rate_hz=500, count=20)
    # An edge that comes while the last one is still pending merges with it, as on real
    # hardware (a loaded machine may not run the target for 2 ms): none is lost.
    desc = image.this().img.irqs[IRQ]
    wait_until(lambda: read(count) + desc.merged == 20, T,
               "20 device interrupts, 2 ms apart, handled or merged")
    assert read(count) >= 1
    assert emu.free_irq(IRQ, count) == "periodic"


@pytest.mark.emu_boot(cpus=2)
def test_irq_source_burst_raises_at_least_once_and_at_most_burst_times(kernel):
    t, ticks = start_busy(1)
    count = emu.Atomic()
    assert emu.request_irq(IRQ, h_count, 0, "bursty", count) == 0
    assert emu.irq_set_affinity(IRQ, 1) == 0
    for _ in range(3):
        before = read(count)
        kernel.add_irq_source(IRQ, delay=0.01, burst=5)
        wait_until(lambda b=before: read(count) > b, T, "the burst")
        emu.synchronize_irq(IRQ)
        wait_ticks(ticks)
        assert 1 <= read(count) - before <= 5
    emu.kthread_stop(t)
    assert emu.free_irq(IRQ, count) == "bursty"


def test_remove_irq_source_stops_it(kernel):
    count = emu.Atomic()
    assert emu.request_irq(IRQ, h_count, 0, "endless", count) == 0
    src = kernel.add_irq_source(IRQ, rate_hz=200, count=-1)
    wait_until(lambda: read(count) >= 5, T, "the device to fire")
    kernel.remove_irq_source(src)
    # the supervisor went round its loop at least once after the removal: a probe fired
    done = emu.Atomic()
    assert emu.request_irq(IRQ + 1, h_count, 0, "probe", done) == 0
    kernel.add_irq_source(IRQ + 1, delay=0.05)
    wait_until(lambda: read(done) == 1, T, "the probe interrupt")
    emu.synchronize_irq(IRQ)
    stopped = read(count)
    kernel.add_irq_source(IRQ + 1, delay=0.1)  # ~20 periods of the removed device
    wait_until(lambda: read(done) == 2, T, "the second probe interrupt")
    emu.synchronize_irq(IRQ)
    assert read(count) == stopped
    assert emu.free_irq(IRQ, count) == "endless"
    assert emu.free_irq(IRQ + 1, done) == "probe"


# --- robustness -----------------------------------------------------------------------------------

@pytest.mark.emu_boot(cpus=2)
def test_interrupt_flood_does_not_break_the_interrupted_task(kernel):
    """A stream of doorbells faster than the handler: no nesting, no stack overflow."""
    t, ticks = start_busy(1)
    count, inside, nested = dev = (emu.Atomic(), emu.Atomic(), emu.Atomic())
    assert emu.request_irq(IRQ, h_nest, 0, "flood", dev) == 0
    assert emu.irq_set_affinity(IRQ, 1) == 0
    for _ in range(3000):
        emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: not sig_pending(t.pid, SIG_IRQ), T, "the flood to be delivered")
    wait_ticks(ticks)
    assert kernel.oopses == 0
    assert emu.task_state_to_char(t) == "R"
    assert read(count) >= 1 and read(nested) == 0
    assert emu.kthread_stop(t) == 7
    assert emu.free_irq(IRQ, dev) == "flood"


def h_exit_first(irq, dev):
    if emu.atomic_inc_return(dev) == 1:
        emu.kthread_exit(5)  # do_exit() in interrupt context
    return emu.IRQ_HANDLED


@pytest.mark.emu_boot(cpus=2)
@pytest.mark.emu_expect(oopses=1)
def test_kthread_exit_in_a_handler_is_an_oops_and_the_line_survives(kernel):
    """do_exit() in interrupt context (Linux panics); the interrupted task goes on."""
    t, _ = start_busy(1)
    count = emu.Atomic()
    assert emu.request_irq(IRQ, h_exit_first, 0, "exits", count) == 0
    assert emu.irq_set_affinity(IRQ, 1) == 0
    emu.irq_inject_interrupt(IRQ)
    wait_until(lambda: read(count) == 1, T, "the handler")
    assert emu.irq_set_affinity(IRQ, emu.current().cpu) == 0
    emu.irq_inject_interrupt(IRQ)  # delivered right here
    stopped = emu.kthread_stop(t)
    assert read(count) == 2, "the line still works"
    assert kernel.oopses == 1, "do_exit() in interrupt context is reported"
    assert f"in interrupt handler of irq {IRQ}" in log_text(kernel)
    assert stopped == 7, "the interrupted task was not the one that exited"
    assert emu.free_irq(IRQ, count) == "exits"


# --- 12. note_interrupt() and the descriptor lock -------------------------------------------------

def h_unhandled(irq, dev):
    emu.atomic_inc(dev)
    return emu.IRQ_NONE


def test_line_that_nobody_handles_is_shut_off_after_a_full_window(kernel):
    """note_interrupt(): 100,000 interrupts nobody handled disable the line, once."""
    import _emu_native as _native

    count = emu.Atomic()
    assert emu.request_irq(IRQ, h_unhandled, 0, "deaf", count) == 0
    assert emu.irq_set_affinity(IRQ, emu.current().cpu) == 0
    for _ in range(_native.SPURIOUS_WINDOW - 1):
        emu.irq_inject_interrupt(IRQ)  # handled right here, on our own CPU
    assert "nobody cared" not in log_text(kernel), "shut off before the window was full"
    emu.irq_inject_interrupt(IRQ)
    log = log_text(kernel)
    assert f'irq {IRQ}: nobody cared (try booting with the "irqpoll" option)' in log
    assert "[<0>] deaf" in log and f"Disabling IRQ #{IRQ}" in log
    emu.irq_inject_interrupt(IRQ)
    assert read(count) == _native.SPURIOUS_WINDOW, "the handler ran on a shut-off line"
    assert emu.free_irq(IRQ, count) == "deaf"


@pytest.mark.emu_expect(oopses=1, warnings=1)
def test_irq_descriptor_lock_of_a_killed_holder_is_taken_over_and_reported(kernel):
    """A task SIGKILLed holding a line's descriptor lock does not wedge the line."""
    import signal

    from emu.image import field_addr

    count = emu.Atomic()
    assert emu.request_irq(IRQ, h_count, 0, "counted", count) == 0
    assert emu.irq_set_affinity(IRQ, emu.current().cpu) == 0
    t = start_lock_holder(field_addr(image.this().img.irqs[IRQ], "lock"))
    os.kill(t.pid, signal.SIGKILL)
    emu.irq_inject_interrupt(IRQ)  # waits for the dead holder's lock, takes it over
    assert read(count) == 1
    assert emu.kthread_stop(t) == 0
    assert f"irq descriptor lock taken over from dead task (pid {t.pid})" in log_text(kernel)
    emu.irq_inject_interrupt(IRQ)
    assert read(count) == 2 and emu.free_irq(IRQ, count) == "counted"


@pytest.mark.emu_expect(oopses=1)
def test_a_failing_takeover_report_does_not_leave_the_line_in_progress(kernel):
    """If reporting the takeover raises, the interrupt is lost but the line is not wedged."""
    import signal

    from emu import bug
    from emu.image import field_addr

    class ReportFailed(Exception):
        pass

    def failing_report(what, pid):
        raise ReportFailed(what)

    count = emu.Atomic()
    assert emu.request_irq(IRQ, h_count, 0, "counted", count) == 0
    assert emu.irq_set_affinity(IRQ, emu.current().cpu) == 0
    t = start_lock_holder(field_addr(image.this().img.irqs[IRQ], "lock"))
    os.kill(t.pid, signal.SIGKILL)
    core = image.this().core
    core.set_dead_owner_hook(failing_report)
    try:
        with pytest.raises(ReportFailed, match="irq descriptor"):
            emu.irq_inject_interrupt(IRQ)
    finally:
        core.set_dead_owner_hook(bug.report_dead_owner)
    assert emu.kthread_stop(t) == 0
    emu.irq_inject_interrupt(IRQ)
    assert read(count) == 1, "the line stayed in progress after the failed report"
    assert emu.free_irq(IRQ, count) == "counted"
