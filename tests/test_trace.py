"""Tracing to Perfetto: traces parsed back with the perfetto protos show what the test
made happen, in order."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import emu
from emu import image, records, tracefile

from util import wait_until

pytest.importorskip("perfetto")


def _events(path: str) -> list[tuple[int, str, object]]:
    return list(tracefile.events_of(path))


def _b(arg: tuple[emu.Completion, emu.Completion]) -> int:
    a, c = arg
    emu.wait_for_completion(a)
    emu.complete(c)
    return 0


def _ps_line(kernel: emu.kernel.Kernel, pid: int) -> str:
    return next(line for line in kernel.ps().splitlines() if line.split()[0] == str(pid))


@pytest.mark.emu_boot(cpus=2)
def test_a_woke_b_after_c_completed(kernel, tmp_path):
    """C (this task) completes `a`, which wakes B (sched_waking B by C), B runs and
    completes `c`; the trace shows: B goes to sleep (D) on `a`, C's complete, the waking
    of B by C, B switched in, B's complete of `c`, in that order."""
    path = str(tmp_path / "t.pftrace")
    a, c = emu.Completion(), emu.Completion()
    kernel.trace_start(path)
    b = emu.kthread_run(_b, (a, c), "tb")
    wait_until(lambda: _ps_line(kernel, b.pid).split()[2] == "D" and "completion" in
               _ps_line(kernel, b.pid), what="B asleep on a")
    emu.complete(a)
    emu.wait_for_completion(c)
    emu.kthread_stop(b)
    events, dropped = kernel.trace_stop()
    assert events > 0 and dropped == 0
    me = os.getpid()
    seq = []
    for _cpu, name, ev in _events(path):
        if name == "sched_switch" and ev.prev_pid == b.pid and ev.prev_state == 2:
            seq.append("B sleeps D")
        elif name == "sched_waking" and ev.pid == b.pid:
            seq.append("B woken")
        elif name == "sched_switch" and ev.next_pid == b.pid:
            seq.append("B runs")
        elif name == "sched_wakeup_new" and ev.pid == b.pid:
            seq.append("B created")
        elif name == "sched_process_exit" and ev.pid == b.pid:
            seq.append("B exits")
    assert seq[0] == "B created"
    i = seq.index("B sleeps D")
    assert seq[i + 1:i + 3] == ["B woken", "B runs"], seq
    assert seq[-1] == "B exits"
    track = [(p.timestamp, p.track_event.name) for p in tracefile.read_trace(path).packet
             if p.HasField("track_event") and p.track_event.name]
    names = [n for _, n in sorted(track)]
    assert f"complete completion#{a.index}" in names
    assert names.index(f"complete completion#{a.index}") < names.index(
        f"complete completion#{c.index}")
    assert me in _waking_pids(path, b.pid)  # the waker (common pid) is this task


def _waking_pids(path: str, wakee: int) -> list[int]:
    return [ev.pid for cpu, ev in tracefile.ftrace_events(tracefile.read_trace(path))
            if ev.WhichOneof("event") == "sched_waking" and ev.sched_waking.pid == wakee]


def _count(irq: int, dev: emu.Atomic) -> int:
    emu.atomic_inc(dev)
    return emu.IRQ_HANDLED


@pytest.mark.emu_boot(cpus=2)
def test_irq_entry_exit_pairs(kernel, tmp_path):
    """Every irq_handler_entry is followed on its CPU by its irq_handler_exit, with the
    line's name, and as many as the line was raised."""
    path = str(tmp_path / "irq.pftrace")
    hits = emu.Atomic()
    assert emu.request_irq(5, _count, 0, "tracedev", hits) == 0
    assert emu.irq_set_affinity(5, emu.current().cpu) == 0
    kernel.trace_start(path)
    for n in range(1, 21):
        emu.irq_inject_interrupt(5)
        wait_until(lambda n=n: emu.atomic_read(hits) == n, what="the handler ran")
    kernel.trace_stop()
    emu.free_irq(5, hits)
    open_on: dict[int, int] = {}
    pairs = 0
    for cpu, name, ev in _events(path):
        if name == "irq_handler_entry":
            assert ev.irq == 5 and ev.name == "tracedev"
            assert cpu not in open_on
            open_on[cpu] = ev.irq
        elif name == "irq_handler_exit":
            assert open_on.pop(cpu) == ev.irq == 5
            assert ev.ret == 1
            pairs += 1
    assert not open_on
    assert pairs == 20


@pytest.mark.emu_boot(cpus=1, trace_buf_events=64)
def test_full_ring_drops_oldest_and_counts(kernel, tmp_path):
    """With the drainer held off (its lock taken), a 64-event ring overwrites its oldest
    events: the trace keeps the newest, and its overrun says how many were lost."""
    path = str(tmp_path / "o.pftrace")
    img = image.this()
    lock = image.field_addr(img.img.hdr, "trace_lock")
    kernel.trace_start(path)
    records.raw_spin_lock(lock)  # the supervisor cannot drain meanwhile
    try:
        done = emu.Completion()
        for _ in range(200):
            emu.complete(done)  # one event each
        ring = img.img.trace_rings[0]
        recorded = ring.head - ring.tail
    finally:
        records.raw_spin_unlock(lock)
    events, dropped = kernel.trace_stop()
    assert recorded >= 200
    assert dropped == recorded - 64 and events == 64
    t = tracefile.read_trace(path)
    assert tracefile.dropped_events(t) == dropped
    assert f"{dropped} events dropped" in tracefile.report(path)


def test_tracing_off_writes_nothing(tmp_path):
    """Without trace=, no file appears, the rings stay untouched and no spool is open."""
    path = tmp_path / "never.pftrace"
    with emu.boot(cpus=1) as kernel:
        assert not kernel.tracing
        for _ in range(20):
            emu.msleep(0)
        img = image.this()
        assert img.img.trace_rings[0].head == 0
        assert img.img.hdr.trace_spool_fd == -1
        assert kernel.trace_stop() == (0, 0)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_boot_trace_and_report_cli(tmp_path):
    """boot(trace=...) writes the file at shutdown; `emu trace report` reads it back."""
    path = str(tmp_path / "b.pftrace")
    with emu.boot(cpus=1, trace=path) as kernel:
        assert kernel.tracing
        emu.msleep(1)
        emu.pr_info("traced line")
    t = tracefile.read_trace(path)
    assert any(p.track_event.name == "printk: traced line" for p in t.packet
               if p.HasField("track_event"))
    out = subprocess.run([sys.executable, "-m", "emu", "trace", "report", path],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "events dropped" in out.stdout and "RUN ms" in out.stdout
    bad = tmp_path / "bad.pftrace"
    bad.write_bytes(b"\xff\xff\xff")
    out = subprocess.run([sys.executable, "-m", "emu", "trace", "report", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "not a Perfetto trace" in out.stderr


def test_trace_start_rejects_bad_path():
    with emu.boot(cpus=1) as kernel:
        with pytest.raises(TypeError, match="path must be"):
            kernel.trace_start(None)  # type: ignore[arg-type]
        with pytest.raises(emu.EmuError, match="no/such/dir.*missing or not writable"):
            kernel.trace_start("/no/such/dir/t.pftrace")
        assert not kernel.tracing


def _tick(timer: emu.TimerList) -> None:
    emu.complete(timer.done)


def test_timer_callbacks_and_work_items_are_traced(kernel, tmp_path):
    """timer_expire_entry/exit around a timer callback, workqueue_execute_start/end
    around a work item, each pair on one CPU with the same id."""
    path = str(tmp_path / "deferred.pftrace")
    fired, ran = emu.Completion(), emu.Completion()
    timer = emu.TimerList()
    emu.timer_setup(timer, _tick, 0)
    timer.done = fired
    work = emu.Work(lambda w: emu.complete(ran))
    kernel.trace_start(path)
    emu.mod_timer(timer, emu.jiffies() + 1)
    emu.wait_for_completion(fired)
    emu.queue_work(emu.system_wq, work)
    emu.wait_for_completion(ran)
    emu.flush_work(work)
    kernel.trace_stop()
    emu.timer_shutdown_sync(timer)
    names = [(cpu, name, ev) for cpu, name, ev in _events(path)
             if name.startswith(("timer_expire", "workqueue_execute"))]
    kinds = [name for _, name, _ in names]
    assert kinds == ["timer_expire_entry", "timer_expire_exit", "workqueue_execute_start",
                     "workqueue_execute_end"], kinds
    assert names[0][0] == names[1][0] and names[0][2].timer == names[1][2].timer
    assert names[2][0] == names[3][0] and names[2][2].work == names[3][2].work
