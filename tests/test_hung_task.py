"""The hung-task detector (khungtaskd, spec §5), run by the supervisor.

Boots with hung_task_timeout_secs=1, so a task blocked in plain uninterruptible sleep
is reported 1-2 s after it blocked (timeout, plus up to one check interval).
"""

from __future__ import annotations

import re
import time

import pytest

import emu
from emu import image

from util import stop_after_exit, wait_state, wait_until

T = 20.0
IRQ = 5
_STAMP = re.compile(r"^\[\s*(\d+)\.(\d+)\] ")


def log_text(kernel):
    return "\n".join(kernel.dmesg())


def stamp(line):
    m = _STAMP.match(line)
    return int(m.group(1)) + int(m.group(2)) / 1e6


def text(line):
    return _STAMP.sub("", line)


def detect_count():
    """kernel.hung_task_detect_count: hung tasks found so far, reported or not."""
    return int(image.this().img.hdr.hung_task_detect_count)


def h_count(irq, dev):
    emu.atomic_inc(dev)
    return emu.IRQ_HANDLED


@pytest.mark.emu_boot(hung_task_timeout_secs=1)
@pytest.mark.emu_expect(hung_tasks=1)
def test_blocked_task_is_reported_in_the_kernel_format(kernel):
    c = emu.Completion()

    def fn(c):
        emu.pr_info("hungwaiter: about to block")
        emu.wait_for_completion(c)
        return 4

    t = emu.kthread_run(fn, c, "hungwaiter")
    wait_state(t, "D", T)
    t0 = time.monotonic()
    wait_until(lambda: kernel.hung_tasks, T, "the hung-task report")
    elapsed = time.monotonic() - t0
    wait_until(lambda: "Call Trace:" in log_text(kernel).split("INFO: task", 1)[1], T,
               "the blocked task's stack")
    emu.complete(c)  # before the next scan, a second after the first report
    assert stop_after_exit(t, T) == 4

    (comm, pid, secs), = kernel.hung_tasks
    assert (comm, pid) == ("hungwaiter", t.pid) and secs >= 1
    lines = kernel.dmesg()
    i = next(n for n, line in enumerate(lines) if "INFO: task" in line)
    assert text(lines[i]) == f"INFO: task hungwaiter:{t.pid} blocked for more than {secs} seconds."
    following = [text(line) for line in lines[i + 1: i + 4]]
    echo = '"echo 0 > /proc/sys/kernel/hung_task_timeout_secs" disables this message.'
    assert echo in following
    task_line = following[following.index(echo) + 1]
    assert re.match(r"task:hungwaiter\s+state:D ", task_line), task_line
    assert f"pid:{t.pid}" in task_line
    # timing: at least the timeout after it blocked, and within timeout + interval (+ slack)
    blocked_at = stamp(next(line for line in lines if "about to block" in line))
    assert stamp(lines[i]) - blocked_at >= 1.0
    assert elapsed <= 3.5, f"reported {elapsed:.2f}s after blocking"
    trace = "\n".join(lines[i:])
    assert "wait_for_completion" in trace and "in fn" in trace, "the task's own Python stack"


@pytest.mark.emu_boot(hung_task_timeout_secs=1)
@pytest.mark.emu_expect(hung_tasks=1)
def test_killable_idle_interruptible_and_parked_tasks_are_never_reported(kernel):
    release = emu.Completion()

    def parkable(_):
        while not emu.kthread_should_stop():
            if emu.kthread_should_park():
                emu.kthread_parkme()
            emu.schedule_timeout_interruptible(emu.MAX_SCHEDULE_TIMEOUT)
        return 0

    killable = emu.kthread_run(lambda c: emu.wait_for_completion_killable(c) + 11,
                               release, "killable")
    idle = emu.kthread_run(lambda c: emu.wait_for_completion_state(c, emu.TASK_IDLE) + 12,
                           release, "idle")
    interruptible = emu.kthread_run(lambda c: emu.wait_for_completion_interruptible(c) + 13,
                                    release, "interruptible")
    parked = emu.kthread_run(parkable, None, "parked")
    wait_state(killable, "D", T)
    wait_state(idle, "I", T)
    wait_state(interruptible, "S", T)
    assert emu.kthread_park(parked) == 0
    assert emu.task_state_to_char(parked) == "P"

    # A control task that blocked after all of them: once it is reported, every scan
    # that could have reported the others has run.
    c = emu.Completion()
    control = emu.kthread_run(lambda c: emu.wait_for_completion(c) or 14, c, "control")
    wait_state(control, "D", T)
    start = time.monotonic()
    wait_until(lambda: kernel.hung_tasks, T, "the control task's report")
    emu.complete(c)
    assert [(comm, pid) for comm, pid, _ in kernel.hung_tasks] == [("control", control.pid)]
    assert time.monotonic() - start < 5  # still well inside one report period of the others
    for t in (killable, idle, interruptible):
        assert emu.task_state_to_char(t) in "DIS", "they were still blocked"
    assert emu.task_state_to_char(parked) == "P"

    emu.complete_all(release)
    assert stop_after_exit(killable, T) == 11
    assert stop_after_exit(idle, T) == 12
    assert stop_after_exit(interruptible, T) == 13
    assert stop_after_exit(control, T) == 14
    assert emu.kthread_stop(parked) == 0
    assert kernel.hung_tasks[0][0] == "control" and len(kernel.hung_tasks) == 1


@pytest.mark.emu_boot(hung_task_timeout_secs=1, hung_task_warnings=2)
@pytest.mark.emu_expect(hung_tasks=2)
def test_hung_task_warnings_budget_suppresses_later_reports(kernel):
    release = emu.Completion()
    ts = [emu.kthread_run(lambda c: emu.wait_for_completion(c) or 0, release, "stuck%d", i)
          for i in range(3)]
    for t in ts:
        wait_state(t, "D", T)
    wait_until(lambda: "Future hung task reports are suppressed" in log_text(kernel), T,
               "the suppression notice")
    # two full scans found all three (the budget does not stop detection, only reports)
    wait_until(lambda: detect_count() >= 6, T, "a later scan")
    emu.complete_all(release)
    for t in ts:
        assert stop_after_exit(t, T) == 0
    log = log_text(kernel)
    assert len(kernel.hung_tasks) == 2
    assert {comm for comm, _, _ in kernel.hung_tasks} <= {"stuck0", "stuck1", "stuck2"}
    assert log.count("Future hung task reports are suppressed, "
                     "see sysctl kernel.hung_task_warnings") == 1
    suppressed = next(i for i, line in enumerate(kernel.dmesg()) if "Future hung" in line)
    reports = [i for i, line in enumerate(kernel.dmesg()) if "INFO: task" in line]
    assert max(reports) < suppressed, "the notice follows the last report"


@pytest.mark.emu_boot(hung_task_timeout_secs=0)
def test_hung_task_timeout_zero_disables_the_detector(kernel):
    c = emu.Completion()
    t = emu.kthread_run(lambda c: emu.wait_for_completion(c) or 2, c, "blocked")
    wait_state(t, "D", T)
    # The supervisor's clock: two device interrupts 1.5 s later prove that it went on
    # running its loop (device, then khungtaskd's turn) well past any timeout.
    ticks = emu.Atomic()
    assert emu.request_irq(IRQ, h_count, 0, "clock", ticks) == 0
    src = kernel.add_irq_source(IRQ, delay=1.5, rate_hz=20, count=2)
    # Both fired (the source retires after its last) and were handled: two edges 50 ms
    # apart may merge into one interrupt on a loaded machine, as on real hardware.
    wait_until(lambda: not kernel._img.img.irq_sources[src].in_use
               and emu.atomic_read(ticks) >= 1, T, "the supervisor's clock")
    assert emu.task_state_to_char(t) == "D"
    assert kernel.hung_tasks == []
    assert "INFO: task" not in log_text(kernel)
    assert detect_count() == 0
    emu.complete(c)
    assert stop_after_exit(t, T) == 2
    assert emu.free_irq(IRQ, ticks) == "clock"


def test_hung_task_panic_reports_then_panics_the_kernel():
    """hung_task_panic=1: the report, then "Kernel panic - not syncing: hung_task: blocked
    tasks", and the kernel is dead (every task killed): the booting process is told at
    once (KernelDeadError naming the panic) and shutdown still cleans up."""
    import psutil

    k = emu.boot(hung_task_timeout_secs=1, hung_task_panic=1, console_loglevel=0)
    try:
        c = emu.Completion()
        t = emu.kthread_run(lambda c: emu.wait_for_completion(c) or 0, c, "panicky")
        with pytest.raises(emu.KernelDeadError, match="panicked: hung_task: blocked tasks"):
            emu.wait_for_completion(c)  # nobody completes it: the panic ends the wait
        assert not k.alive
        log = "\n".join(k.dmesg())
        assert "Kernel panic - not syncing: hung_task: blocked tasks" in log
        assert f"INFO: task panicky:{t.pid} blocked for more than" in log
        wait_until(lambda: not psutil.pid_exists(t.pid)
                   or psutil.Process(t.pid).status() == psutil.STATUS_ZOMBIE, timeout=5,
                   what="the panic to kill the tasks")
        import _emu_native as _native

        wait_until(lambda: _native.pid_is_dead(k.supervisor_pid), timeout=5,
                   what="the panic to kill the supervisor too")
        with pytest.raises(emu.KernelDeadError):
            k.check_alive()
    finally:
        k.shutdown()
