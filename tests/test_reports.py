"""Reports a person can read: one block per report, the user's frames only, a rate limit
on identical reports, the first report of each kind kept, hung tasks naming their wait."""

from __future__ import annotations

import re
import time

import pytest

import emu
from emu.bug import CUT_HERE, END_TRACE

from util import stop_after_exit, wait_state, wait_until

T = 20.0
_STAMP = re.compile(r"^(\[\s*\d+\.\d+\] )")


def split_stamps(lines):
    """[(stamp, text)] of log or console lines."""
    out = []
    for line in lines:
        m = _STAMP.match(line)
        assert m, f"a line without a timestamp: {line!r}"
        out.append((m.group(1), line[m.end():]))
    return out


def waiter_one(c):
    emu.wait_for_completion(c)
    return 1


def waiter_two(c):
    emu.wait_for_completion(c)
    return 2


def hung_block(entries, comm, pid, fn, other_fn, origin):
    """Check the hung-task report of `comm`:`pid` line by line: one unit (one stamp),
    its own trace under its own header, then what it waits on."""
    i = next(n for n, (_, text) in enumerate(entries)
             if text.startswith(f"INFO: task {comm}:{pid} blocked for more than"))
    stamp = entries[i][0]
    texts = [text for _, text in entries[i:]]
    assert re.match(r"      (Not tainted|Tainted: .*) emu$", texts[1]), texts[1]
    assert texts[2] == '"echo 0 > /proc/sys/kernel/hung_task_timeout_secs" disables this message.'
    assert texts[3].startswith(f"task:{comm:<15} state:D ")
    assert texts[4] == "Call Trace:"
    n = 5
    while texts[n].startswith(" "):
        n += 1
    trace = texts[5:n]
    assert trace and f"in {fn}" in trace[0], trace
    assert not any(other_fn in line or "/emu/" in line for line in trace), trace
    assert texts[n] == f"INFO: task {comm}:{pid} is blocked on completion#{origin[0]} " \
                       f"created at {origin[1]}."
    assert all(s == stamp for s, _ in entries[i:i + n + 1]), "one unit, one timestamp"
    return i, i + n + 1


def warn_block(entries, test_fn):
    i = next(n for n, (_, text) in enumerate(entries) if text == CUT_HERE)
    stamp = entries[i][0]
    texts = [text for _, text in entries[i:]]
    assert texts[1] == "complete_all() called twice without reinit_completion()"
    assert re.match(r"WARNING: CPU: \d+ PID: \d+ at tests/test_reports.py:\d+ " + test_fn,
                    texts[2]), texts[2]
    assert texts[3].startswith("CPU: ") and texts[4] == "Call Trace:"
    end = texts.index(END_TRACE)
    trace = texts[5:end]
    assert all(line.startswith(" ") for line in trace), trace
    assert f"in {test_fn}" in trace[0], "the trace starts at the test function"
    assert not any(w in line for line in trace for w in ("_pytest", "pluggy", "/emu/")), trace
    assert all(s == stamp for s, _ in entries[i:i + end + 1]), "one unit, one timestamp"
    return i, i + end + 1


def test_two_hung_tasks_and_a_warn_make_three_contiguous_reports(capfd):
    # Booted here, not by the kernel fixture: the supervisor, forked at boot, must write
    # to the stderr that capfd captures, which is in place only while the test runs.
    with emu.boot(hung_task_timeout_secs=1, console_loglevel=8) as kernel:
        c = emu.Completion()
        origin = f"tests/test_reports.py:{_line() - 1}"  # where c was made
        a = emu.kthread_run(waiter_one, c, "hung-one")
        b = emu.kthread_run(waiter_two, c, "hung-two")
        wait_state(a, "D", T)
        wait_state(b, "D", T)
        wait_until(lambda: kernel.hung_tasks, T, "the first hung-task report")
        w = emu.Completion()
        emu.complete_all(w)
        emu.complete_all(w)  # a WARN while khungtaskd reports the second task
        wait_until(lambda: len(kernel.hung_tasks) == 2, T, "the second hung-task report")
        emu.complete_all(c)
        assert stop_after_exit(a, T) == 1 and stop_after_exit(b, T) == 2
        assert (kernel.warnings, len(kernel.hung_tasks)) == (1, 2)
        log = kernel.dmesg()

    test_fn = "test_two_hung_tasks_and_a_warn_make_three_contiguous_reports"
    where = (c.index, origin)
    for lines in (log, capfd.readouterr().err.splitlines()):
        entries = split_stamps(lines)
        spans = sorted([hung_block(entries, "hung-one", a.pid, "waiter_one", "waiter_two", where),
                        hung_block(entries, "hung-two", b.pid, "waiter_two", "waiter_one", where),
                        warn_block(entries, test_fn)])
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start, "reports do not overlap"


def _line():
    """The caller's line number."""
    import sys

    return sys._getframe(1).f_lineno


def unlock_unlocked(lock):
    emu.preempt_disable()
    emu.spin_unlock(lock)  # a BUG splat: not locked; then preempt_enable()


@pytest.mark.emu_boot(printk_ratelimit=2)
@pytest.mark.emu_expect(bugs=1001)
def test_a_flood_of_identical_bugs_keeps_the_first_and_says_how_many_were_dropped(kernel):
    lock = emu.Spinlock()
    start = time.monotonic()
    for _ in range(1000):
        unlock_unlocked(lock)
    assert time.monotonic() - start < 2, "the flood fits in one interval (a precondition)"
    assert kernel.bugs == 1000, "every report is counted"
    log = kernel.dmesg()
    splats = [n for n, line in enumerate(log) if "BUG: spinlock already unlocked" in line]
    assert len(splats) == 10, "printk_ratelimit_burst: 10 per interval"
    first = kernel.first_reports["bug"]
    assert "BUG: spinlock already unlocked" in first[0]
    assert log[splats[0]:splats[0] + len(first)] == first, "the first is in dmesg, whole"
    assert not any("callbacks suppressed" in line for line in log)

    t0 = time.monotonic()
    wait_until(lambda: time.monotonic() - t0 > 2.05, T, "the end of the interval")
    unlock_unlocked(lock)  # the next one after the interval tells what was dropped
    log = kernel.dmesg()
    said = [line for line in log if "callbacks suppressed" in line]
    assert len(said) == 1 and said[0].endswith("] spin_unlock: 990 callbacks suppressed"), said
    assert "BUG: spinlock already unlocked" in log[log.index(said[0]) + 1]


@pytest.mark.emu_boot(log_records=16, printk_ratelimit=0)
@pytest.mark.emu_expect(bugs=50, warnings=1, oopses=1)
def test_the_first_report_of_each_kind_outlives_the_ring(kernel):
    lock = emu.Spinlock()
    for _ in range(50):
        unlock_unlocked(lock)
    c = emu.Completion()
    emu.complete_all(c)
    emu.complete_all(c)
    t = emu.kthread_run(lambda d: 1 // 0, None, "oopser")
    assert stop_after_exit(t, T) == 0
    for i in range(40):
        emu.pr_info("filler %d", i)
    log = kernel.dmesg()
    assert not any("BUG:" in line or "Oops" in line or "WARNING" in line for line in log)
    kept = kernel.first_reports
    assert set(kept) == {"bug", "warning", "oops"}
    assert "BUG: spinlock already unlocked" in kept["bug"][0]
    assert kept["warning"][0].endswith(CUT_HERE)
    assert kernel.first_oops == kept["oops"]
    assert "Oops: ZeroDivisionError" in kernel.first_oops[0]
    assert any("in <lambda>" in line for line in kernel.first_oops)
    assert not any("emu/kthread.py" in line for line in kernel.first_oops), "no emu frames"


def stuck_in_stop(victim):
    return emu.kthread_stop(victim)


@pytest.mark.emu_boot(hung_task_timeout_secs=1)
@pytest.mark.emu_expect(hung_tasks=1)
def test_a_task_blocked_in_kthread_stop_names_the_task_it_waits_for(kernel):
    release = emu.Completion()
    # killable: not a hung-task candidate itself, and kthread_stop() does not end the wait
    victim = emu.kthread_run(lambda c: emu.wait_for_completion_killable(c) + 3, release,
                             "victim")
    wait_state(victim, "D", T)
    stopper = emu.kthread_run(stuck_in_stop, victim, "stopper")
    wait_until(lambda: kernel.hung_tasks, T, "the stopper's report")
    emu.complete(release)
    assert stop_after_exit(stopper, T) == 3
    want = (f"INFO: task stopper:{stopper.pid} is blocked in kthread_stop(), waiting for "
            f"task victim:{victim.pid} to exit.")
    assert any(line.endswith(want) for line in kernel.dmesg()), want


def h_count(irq, dev):
    emu.atomic_inc(dev)
    return emu.IRQ_HANDLED


def test_proc_interrupts_counts_the_edges_that_merged_while_pending(kernel):
    """A burst of 200 edges from an emulated device: each is either taken (a handler
    run, counted per CPU) or merged with one already pending on the CPU (MRG:)."""
    irq, edges = 5, 200
    runs = emu.Atomic()
    assert emu.request_irq(irq, h_count, 0, "bursty", runs) == 0
    assert emu.irq_set_affinity(irq, 0) == 0
    src = kernel.add_irq_source(irq, burst=edges, count=1)
    wait_until(lambda: not kernel._img.img.irq_sources[src].in_use, T, "the burst")
    wait_until(lambda: not any(pc.irq_pending for pc in kernel._img.img.percpu), T,
               "the pending edges to be taken")
    emu.synchronize_irq(irq)
    text = kernel.proc_interrupts()
    merged = [line for line in text.splitlines() if line.startswith("MRG:")]
    counted = sum(int(n) for n in text.splitlines()[1].split(":")[1].split()[: kernel.ncpus])
    assert counted == emu.atomic_read(runs)
    assert merged, "a burst merges on the CPU it targets"
    assert merged == [f"MRG: {edges - counted:10d}  IRQ {irq}: edges merged with one "
                      "already pending"], text
    assert emu.free_irq(irq, runs) == "bursty"
