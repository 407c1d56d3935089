"""Perfetto traces: the spool of trace.py written as a Perfetto protobuf trace, read
back, and `emu trace report`.

The trace is what a kernel's ftrace would give Perfetto: per emulated CPU an
FtraceEventBundle of sched_switch, sched_waking, sched_wakeup_new, sched_process_exit,
irq_handler_entry/exit, softirq_entry/exit (timer_expire_entry/exit and
workqueue_execute_start/end when timers and workqueues trace), with real pids and comms,
plus a process tree naming every task; completion waits are slices and completes and
printk lines instants on each task's own track (TrackEvent); each CPU's events lost to a
full ring are its FtraceCpuStats.overrun.

emu knows when a task goes to sleep and when it runs again, not how the host shares an
emulated CPU between tasks that are runnable together. So a CPU track shows a task from
the first event it made on that CPU (it was running then) until it sleeps or another
task makes an event there; a task woken but not yet seen running is Runnable; when the
running task sleeps and others are runnable on that CPU, the track shows the one that
ran most recently (the host runs one of them; which, emu cannot know).

Needs the `perfetto` package (`pip install "emu-kernel[trace]"`).
"""

from __future__ import annotations

import json
import os
import struct
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from . import trace
from .constants import PF_IDLE, TASK_PARKED, TASK_UNINTERRUPTIBLE
from .errors import EmuError

try:
    from perfetto.protos.perfetto.trace import perfetto_trace_pb2 as pb
    from perfetto.trace_builder.proto_builder import StreamingTraceProtoBuilder
except ImportError:  # the optional `trace` extra
    pb = None
    StreamingTraceProtoBuilder = None

#: The kernel's task-state report bits in sched_switch's prev_state ("RSDTtXZPI").
STATE_R, STATE_S, STATE_D, STATE_X, STATE_P, STATE_I = 0, 1, 2, 0x10, 0x40, 0x80
TASK_NOLOAD = 0x0400
PRIO = 120
#: emu trace report: tasks of one name beyond this many share a row.
GROUP_OVER = 4
_EVENT = struct.Struct("<qQqiiHHi")
_SEQ_ID = 1  # the trusted packet sequence of the TrackEvents
SOFTIRQ_NAMES = ["HI", "TIMER", "NET_TX", "NET_RX", "BLOCK", "IRQ_POLL", "TASKLET", "SCHED",
                 "HRTIMER", "RCU"]


class TraceError(EmuError):
    """A trace file that cannot be written or read."""


def _need_perfetto() -> None:
    if pb is None:
        raise TraceError("writing and reading traces needs the perfetto package: "
                         'pip install "emu-kernel[trace]"')


@dataclass
class Event:
    ts: int
    type: int
    cpu: int
    pid: int
    arg0: int
    arg1: int


@dataclass
class Spool:
    """What a spool holds, decoded."""

    meta: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    dropped: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    tasks: dict[int, tuple[str, int, int, int]] = field(default_factory=dict)
    irqs: dict[int, str] = field(default_factory=dict)
    log: list[tuple[int, int, int, str]] = field(default_factory=list)


def read_spool(f: IO[bytes]) -> Spool:
    """Decode a spool (see trace.py); events that are not the ones expected at their
    place in the ring (overwritten while drained) count as dropped."""
    sp = Spool()
    data = f.read()
    pos = 0
    while pos + trace.FRAME.size <= len(data):
        kind, cpu, first, length = trace.FRAME.unpack_from(data, pos)
        pos += trace.FRAME.size
        body = data[pos:pos + length]
        pos += length
        if kind == trace.EVENTS:
            for i, (ts, seq, a1, pid, a0, typ, ecpu, _) in enumerate(_EVENT.iter_unpack(body)):
                if seq != first + i + 1 or ecpu != cpu:
                    sp.dropped[cpu] += 1
                    continue
                sp.events.append(Event(ts, typ, cpu, pid, a0, a1))
        elif kind == trace.DROPPED:
            sp.dropped[cpu] += first
        elif kind == trace.META:
            sp.meta = json.loads(body)
        elif kind == trace.TASKS:
            for pid, comm, tcpu, flags, ppid in json.loads(body):
                sp.tasks[pid] = (comm, tcpu, flags, ppid)
        elif kind == trace.IRQS:
            sp.irqs.update({int(irq): name for irq, name in json.loads(body)})
        elif kind == trace.LOG:
            sp.log.extend((ts, pid, level, text) for ts, pid, level, text in json.loads(body))
    sp.events.sort(key=lambda e: e.ts)
    _names_from_events(sp)
    return sp


def _names_from_events(sp: Spool) -> None:
    """Name the tasks the drainer never saw in the task table from their COMM events."""
    parts: dict[int, dict[int, bytes]] = defaultdict(dict)
    for e in sp.events:
        if e.type == trace.COMM and e.arg0 in (0, 8):
            parts[e.pid][e.arg0] = e.arg1.to_bytes(8, "little", signed=True)
    for pid, chunks in parts.items():
        if pid not in sp.tasks and len(chunks) == 2:
            comm = (chunks[0] + chunks[8]).split(b"\0", 1)[0].decode("utf-8", "replace")
            cpu = next((e.cpu for e in sp.events if e.pid == pid), 0)
            sp.tasks[pid] = (comm, cpu, 0, 0)


def _report_state(state: int) -> int:
    """sched_switch's prev_state of a task that sleeps in emu state `state`."""
    if state & TASK_PARKED:
        return STATE_P
    if state & TASK_UNINTERRUPTIBLE:
        return STATE_I if state & TASK_NOLOAD else STATE_D
    return STATE_S if state else STATE_R


class _Converter:
    """Turns the events of a spool into per-CPU ftrace events and track events."""

    def __init__(self, sp: Spool) -> None:
        self.sp = sp
        self.ncpus = int(sp.meta.get("ncpus", 1 + max((e.cpu for e in sp.events), default=0)))
        idle = {pid for pid, (comm, _, flags, _) in sp.tasks.items()
                if flags & PF_IDLE or comm.startswith("swapper/")}
        self.idle = idle
        self.bundles: list[list[Any]] = [[] for _ in range(self.ncpus)]
        self.curr = [0] * self.ncpus  # pid shown running on each CPU (0: swapper)
        self.runnable: list[dict[int, int]] = [{} for _ in range(self.ncpus)]  # pid -> last ran
        self.tracks: list[Any] = []
        self.exited: set[int] = set()  # their last events (exit_notify()) show no running

    def comm(self, pid: int, cpu: int = 0) -> str:
        if pid == 0:
            return f"swapper/{cpu}"
        return self.sp.tasks.get(pid, (str(pid), 0, 0, 0))[0]

    def pid(self, pid: int) -> int:
        return 0 if pid in self.idle else pid

    def ftrace(self, cpu: int, ts: int, pid: int) -> Any:
        ev = pb.FtraceEvent(timestamp=ts, pid=pid)
        self.bundles[cpu].append(ev)
        return ev

    def switch(self, cpu: int, ts: int, nxt: int, prev_state: int | None = None) -> None:
        prev = self.curr[cpu]
        if prev == nxt:
            return
        if prev_state is None:
            prev_state = STATE_R
        ev = self.ftrace(cpu, ts, prev)
        s = ev.sched_switch
        s.prev_comm, s.prev_pid, s.prev_prio, s.prev_state = (
            self.comm(prev, cpu), prev, PRIO, prev_state)
        s.next_comm, s.next_pid, s.next_prio = self.comm(nxt, cpu), nxt, PRIO
        self.curr[cpu] = nxt

    def running(self, cpu: int, ts: int, pid: int) -> None:
        """`pid` made an event on `cpu`: it runs there (the one shown before is preempted)."""
        if pid == 0 or pid in self.exited or pid not in self.sp.tasks:
            return  # the idle task, an exited task, or the supervisor (not a task)
        self.runnable[cpu][pid] = ts
        self.switch(cpu, ts, pid)

    def sleeps(self, cpu: int, ts: int, pid: int, prev_state: int) -> None:
        self.running(cpu, ts, pid)
        self.runnable[cpu].pop(pid, None)
        others = self.runnable[cpu]
        nxt = max(others, key=others.__getitem__) if others else 0
        self.switch(cpu, ts, nxt, prev_state)

    def convert(self) -> None:
        for e in self.sp.events:
            self.event(e)

    def event(self, e: Event) -> None:
        cpu, ts, pid = e.cpu, e.ts, self.pid(e.pid)
        if cpu >= self.ncpus:
            return
        t = e.type
        if t == trace.SWITCH_OUT:
            if pid:
                self.sleeps(cpu, ts, pid, _report_state(e.arg0))
        elif t == trace.SWITCH_IN:
            self.running(cpu, ts, pid)
        elif t == trace.WAKING:
            self.running(cpu, ts, pid)
            wakee = self.pid(e.arg0)
            if wakee and 0 <= e.arg1 < self.ncpus:
                w = self.ftrace(cpu, ts, pid).sched_waking
                w.comm, w.pid, w.prio, w.success, w.target_cpu = (
                    self.comm(wakee), wakee, PRIO, 1, e.arg1)
                self.runnable[e.arg1].setdefault(wakee, 0)
        elif t == trace.WAKEUP_NEW:
            self.running(cpu, ts, pid)
            new = self.pid(e.arg0)
            if new and 0 <= e.arg1 < self.ncpus:
                w = self.ftrace(cpu, ts, pid).sched_wakeup_new
                w.comm, w.pid, w.prio, w.success, w.target_cpu = (
                    self.comm(new), new, PRIO, 1, e.arg1)
                self.runnable[e.arg1].setdefault(new, 0)
        elif t == trace.PROCESS_EXIT:
            self.running(cpu, ts, pid)
            x = self.ftrace(cpu, ts, pid).sched_process_exit
            x.comm, x.pid, x.tgid, x.prio = self.comm(pid), pid, pid, PRIO
            self.sleeps(cpu, ts, pid, STATE_X)
            self.exited.add(pid)
        else:
            self.other(e, cpu, ts, pid)

    def other(self, e: Event, cpu: int, ts: int, pid: int) -> None:
        t = e.type
        self.running(cpu, ts, pid)
        if t == trace.IRQ_ENTRY:
            i = self.ftrace(cpu, ts, pid).irq_handler_entry
            i.irq, i.name = e.arg0, self.sp.irqs.get(e.arg0, str(e.arg0))
        elif t == trace.IRQ_EXIT:
            x = self.ftrace(cpu, ts, pid).irq_handler_exit
            x.irq, x.ret = e.arg0, 1 if e.arg1 else 0
        elif t == trace.SOFTIRQ_ENTRY:
            self.ftrace(cpu, ts, pid).softirq_entry.vec = e.arg0
        elif t == trace.SOFTIRQ_EXIT:
            self.ftrace(cpu, ts, pid).softirq_exit.vec = e.arg0
        elif t == trace.TIMER_ENTRY:
            self.ftrace(cpu, ts, pid).timer_expire_entry.timer = e.arg0
        elif t == trace.TIMER_EXIT:
            self.ftrace(cpu, ts, pid).timer_expire_exit.timer = e.arg0
        elif t == trace.WORK_START:
            self.ftrace(cpu, ts, pid).workqueue_execute_start.work = e.arg0
        elif t == trace.WORK_END:
            self.ftrace(cpu, ts, pid).workqueue_execute_end.work = e.arg0
        elif t == trace.WAIT_BEGIN:
            self.track_event(ts, pid, pb.TrackEvent.TYPE_SLICE_BEGIN,
                             f"wait_for_completion completion#{e.arg0}")
        elif t == trace.WAIT_END:
            self.track_event(ts, pid, pb.TrackEvent.TYPE_SLICE_END, "")
        elif t == trace.COMM:
            pass
        elif t == trace.COMPLETE:
            name = "complete_all" if e.arg1 else "complete"
            self.track_event(ts, pid, pb.TrackEvent.TYPE_INSTANT, f"{name} completion#{e.arg0}")

    def track_event(self, ts: int, pid: int, kind: int, name: str) -> None:
        self.tracks.append((ts, pid, kind, name))


def write_trace(spool: IO[bytes], path: str) -> tuple[int, int]:
    """Write the Perfetto trace of a spool to `path`; returns (events, dropped)."""
    _need_perfetto()
    sp = read_spool(spool)
    conv = _Converter(sp)
    conv.convert()
    boot_ns = int(sp.meta.get("boot_ns", 0))
    for ts, pid, _level, text in sp.log:
        conv.track_event(boot_ns + ts, conv.pid(pid), pb.TrackEvent.TYPE_INSTANT,
                         f"printk: {text}")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            builder = StreamingTraceProtoBuilder(f)
            _write_packets(builder, sp, conv)
        os.replace(tmp, path)
    except OSError as exc:
        raise TraceError(f"cannot write trace {path!r}: {exc.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(sp.events), sum(sp.dropped.values())


def _write_packets(builder: Any, sp: Spool, conv: _Converter) -> None:
    pkt = pb.TracePacket()
    tree = pkt.process_tree
    for pid, (comm, _, flags, ppid) in sorted(sp.tasks.items()):
        if flags & PF_IDLE:
            continue
        tree.processes.add(pid=pid, ppid=ppid, cmdline=[comm])
        tree.threads.add(tid=pid, tgid=pid, name=comm)
    builder.write_packet(pkt)
    for cpu, events in enumerate(conv.bundles):
        for start in range(0, len(events), 2000):
            pkt = pb.TracePacket()
            bundle = pkt.ftrace_events
            bundle.cpu = cpu
            bundle.event.extend(events[start:start + 2000])
            builder.write_packet(pkt)
    pkt = pb.TracePacket()
    stats = pkt.ftrace_stats
    stats.phase = pb.FtraceStats.END_OF_TRACE
    for cpu in range(conv.ncpus):
        stats.cpu_stats.add(cpu=cpu, overrun=sp.dropped.get(cpu, 0))
    builder.write_packet(pkt)
    first = True
    for pid in sorted({pid for _, pid, _, _ in conv.tracks}):
        pkt = pb.TracePacket(trusted_packet_sequence_id=_SEQ_ID)
        if first:
            pkt.sequence_flags = pb.TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
            first = False
        td = pkt.track_descriptor
        td.uuid = _track_uuid(pid)
        td.thread.pid, td.thread.tid = pid, pid
        td.thread.thread_name = conv.comm(pid)
        builder.write_packet(pkt)
    for ts, pid, kind, name in sorted(conv.tracks, key=lambda t: t[0]):
        pkt = pb.TracePacket(timestamp=ts, trusted_packet_sequence_id=_SEQ_ID)
        te = pkt.track_event
        te.type = kind
        te.track_uuid = _track_uuid(pid)
        if name:
            te.name = name
        builder.write_packet(pkt)


def _track_uuid(pid: int) -> int:
    return 0x454D5500000000 + pid


# --- reading a trace back --------------------------------------------------------------


def read_trace(path: str) -> Any:
    """The Trace message of a trace file."""
    _need_perfetto()
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TraceError(f"cannot read trace {path!r}: {exc.strerror}") from None
    t = pb.Trace()
    try:
        t.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError
        raise TraceError(f"{path!r} is not a Perfetto trace: {exc}") from None
    return t


def ftrace_events(t: Any) -> Iterator[tuple[int, Any]]:
    """(cpu, FtraceEvent) of every bundle, in time order."""
    out = [(cpu_ev.timestamp, cpu, cpu_ev) for pkt in t.packet if pkt.HasField("ftrace_events")
           for cpu in [pkt.ftrace_events.cpu] for cpu_ev in pkt.ftrace_events.event]
    out.sort(key=lambda x: x[0])
    for _, cpu, ev in out:
        yield cpu, ev


def dropped_events(t: Any) -> int:
    return sum(s.overrun for pkt in t.packet if pkt.HasField("ftrace_stats")
               for s in pkt.ftrace_stats.cpu_stats)


def _pct(values: list[int], q: float) -> int:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.3f}"


def report(path: str) -> str:
    """`emu trace report`: per task run and sleep time and wake-up latency, IRQ handler
    latency per line, the longest uninterruptible sleeps; from the file alone."""
    t = read_trace(path)
    comm: dict[int, str] = {}
    run: dict[int, int] = defaultdict(int)
    sleep: dict[int, int] = defaultdict(int)
    wake_lat: dict[int, list[int]] = defaultdict(list)
    since: dict[int, tuple[int, int]] = {}  # pid -> (switched in at, cpu)
    slept: dict[int, tuple[int, int]] = {}  # pid -> (went to sleep at, prev_state)
    woken: dict[int, int] = {}  # pid -> waking ts
    dsleeps: list[tuple[int, int, int]] = []  # (duration, pid, start)
    irq_open: dict[tuple[int, int], int] = {}
    irq_lat: dict[int, list[int]] = defaultdict(list)
    irq_name: dict[int, str] = {}
    first_ts = last_ts = None
    for cpu, ev in ftrace_events(t):
        ts = ev.timestamp
        first_ts = ts if first_ts is None else first_ts
        last_ts = ts
        kind = ev.WhichOneof("event")
        if kind == "sched_switch":
            s = ev.sched_switch
            comm[s.prev_pid], comm[s.next_pid] = s.prev_comm, s.next_comm
            if s.prev_pid in since:
                run[s.prev_pid] += ts - since.pop(s.prev_pid)[0]
            if s.prev_pid and s.prev_state not in (STATE_R, STATE_X):
                slept[s.prev_pid] = (ts, s.prev_state)
            if s.next_pid:
                since[s.next_pid] = (ts, cpu)
                if s.next_pid in woken:
                    wake_lat[s.next_pid].append(ts - woken.pop(s.next_pid))
                _end_sleep(s.next_pid, ts, slept, sleep, dsleeps)
        elif kind == "sched_waking":
            w = ev.sched_waking
            comm[w.pid] = w.comm
            if w.pid in slept:
                woken.setdefault(w.pid, ts)
                _end_sleep(w.pid, ts, slept, sleep, dsleeps)
        elif kind == "irq_handler_entry":
            irq_open[(cpu, ev.irq_handler_entry.irq)] = ts
            irq_name[ev.irq_handler_entry.irq] = ev.irq_handler_entry.name
        elif kind == "irq_handler_exit":
            start = irq_open.pop((cpu, ev.irq_handler_exit.irq), None)
            if start is not None:
                irq_lat[ev.irq_handler_exit.irq].append(ts - start)
    if last_ts is not None:
        for pid, (start, _) in since.items():
            run[pid] += last_ts - start
    t0 = first_ts or 0
    return _format_report(path, t, comm, run, sleep, wake_lat, irq_lat, irq_name,
                          [(d, pid, start - t0) for d, pid, start in dsleeps],
                          (last_ts - t0) if last_ts else 0)


def _end_sleep(pid: int, ts: int, slept: dict[int, tuple[int, int]], sleep: dict[int, int],
               dsleeps: list[tuple[int, int, int]]) -> None:
    """A sleep ends at its wake-up (or at the switch in, when the waking was lost)."""
    started = slept.pop(pid, None)
    if started is None:
        return
    sleep[pid] += ts - started[0]
    if started[1] == STATE_D:
        dsleeps.append((ts - started[0], pid, started[0]))


def _format_report(path: str, t: Any, comm: dict[int, str], run: dict[int, int],
                   sleep: dict[int, int], wake_lat: dict[int, list[int]],
                   irq_lat: dict[int, list[int]], irq_name: dict[int, str],
                   dsleeps: list[tuple[int, int, int]], span: int) -> str:
    lines = [f"trace {path}: {_ms(span)} ms, {dropped_events(t)} events dropped", "",
             f"{'PID':>7} {'COMMAND':<20} {'RUN ms':>10} {'SLEEP ms':>10} {'WAKEUPS':>8} "
             f"{'LAT p50 us':>10} {'p99 us':>8} {'max us':>8}"]
    rows: dict[str, list[int]] = defaultdict(list)  # row label -> its pids
    by_comm: dict[str, list[int]] = defaultdict(list)
    for pid in sorted(set(run) | set(sleep) | set(wake_lat)):
        if pid and (run.get(pid) or sleep.get(pid) or wake_lat.get(pid)):
            by_comm[comm.get(pid) or "?"].append(pid)
    for name, pids in by_comm.items():
        if len(pids) > GROUP_OVER:  # many short-lived tasks of one name: one row, as perf sched
            rows[f"{'-':>7} {name + f' ({len(pids)})':<20}"] = pids
        else:
            for pid in pids:
                rows[f"{pid:>7} {name:<20}"] = [pid]
    for label, pids in sorted(rows.items(), key=lambda r: r[1][0]):
        lat = sorted(x for pid in pids for x in wake_lat.get(pid, []))
        stats = (f"{_pct(lat, .5) / 1e3:10.1f} {_pct(lat, .99) / 1e3:8.1f} {max(lat) / 1e3:8.1f}"
                 if lat else f"{'-':>10} {'-':>8} {'-':>8}")
        lines.append(f"{label} {_ms(sum(run.get(p, 0) for p in pids)):>10} "
                     f"{_ms(sum(sleep.get(p, 0) for p in pids)):>10} {len(lat):>8} {stats}")
    lines += ["", f"{'IRQ':>4} {'NAME':<24} {'COUNT':>8} {'p50 us':>8} {'p99 us':>8} "
              f"{'max us':>8}"]
    for irq in sorted(irq_lat):
        lat = irq_lat[irq]
        lines.append(f"{irq:>4} {irq_name.get(irq, '?'):<24} {len(lat):>8} "
                     f"{_pct(lat, .5) / 1e3:8.1f} {_pct(lat, .99) / 1e3:8.1f} "
                     f"{max(lat) / 1e3:8.1f}")
    lines += ["", "longest uninterruptible (D) sleeps:"]
    for dur, pid, start in sorted(dsleeps, reverse=True)[:10]:
        lines.append(f"  {_ms(dur):>10} ms  {comm.get(pid, '?')}/{pid} at +{start / 1e9:.6f} s")
    return "\n".join(lines)


def events_of(path: str) -> Iterable[tuple[int, str, Any]]:
    """(cpu, event name, event) of every ftrace event of a trace file, in time order."""
    for cpu, ev in ftrace_events(read_trace(path)):
        name = ev.WhichOneof("event")
        yield cpu, name, getattr(ev, name)
