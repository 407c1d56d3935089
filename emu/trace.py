"""Tracing: the per-CPU event rings of the shared image, their trace points and drainer.

The rings live in the image (image.TraceRing, image.TraceEvent): one per emulated CPU.
Events are written where they happen, at the cost of a few stores: sleeps, wake-ups,
completion waits and completes, IRQ handler entry and exit in C (native/trace.c);
softirqs, kthread creation and exit, timer and work execution in Python through
trace_point(), which costs one C call that returns at once while tracing is off.

While tracing is on, the supervisor drains the rings (drain()) about every
supervisor.POLL_INTERVAL into a spool file the booting process opened (an unlinked
temporary file the supervisor reaches through /proc/PID/fd/N), together with the task
names, the IRQ line names and the printk lines logged meanwhile. When tracing stops,
the booting process drains what is left and tracefile.py turns the spool into a Perfetto
trace. A full ring drops its oldest events; the drainer counts them (the trace's
"overrun" per CPU).

Spool format: frames of FRAME (kind, cpu, first, length) followed by `length` bytes:
EVENTS (raw TraceEvent records of ring `cpu`, numbered from `first`), DROPPED (`first`
events of ring `cpu` lost), and JSON frames META, TASKS, IRQS, LOG.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from typing import Any, cast

import _emu_native as _native

from . import image, records

SWITCH_OUT = _native.TRACE_SWITCH_OUT
SWITCH_IN = _native.TRACE_SWITCH_IN
WAKING = _native.TRACE_WAKING
IRQ_ENTRY = _native.TRACE_IRQ_ENTRY
IRQ_EXIT = _native.TRACE_IRQ_EXIT
COMPLETE = _native.TRACE_COMPLETE
WAIT_BEGIN = _native.TRACE_WAIT_BEGIN
WAIT_END = _native.TRACE_WAIT_END
SOFTIRQ_ENTRY = _native.TRACE_SOFTIRQ_ENTRY
SOFTIRQ_EXIT = _native.TRACE_SOFTIRQ_EXIT
WAKEUP_NEW = _native.TRACE_WAKEUP_NEW
PROCESS_EXIT = _native.TRACE_PROCESS_EXIT
#: Hooks for timer_list callbacks and work items (timer.py / workqueue.py, when present):
#: trace_point(TIMER_ENTRY, id) before the callback, trace_point(TIMER_EXIT, id) after.
TIMER_ENTRY = _native.TRACE_TIMER_ENTRY
TIMER_EXIT = _native.TRACE_TIMER_EXIT
WORK_START = _native.TRACE_WORK_START
WORK_END = _native.TRACE_WORK_END
COMM = _native.TRACE_COMM

#: Events of all CPU rings together unless boot() says otherwise (40 bytes each: 5 MiB,
#: whose pages cost memory only once tracing touches them), shared out among the CPUs.
TRACE_EVENTS_TOTAL = 131072
#: A CPU's ring holds at least this many events by default, however many CPUs there are.
TRACE_BUF_EVENTS_MIN = 1024


def default_buf_events(ncpus: int) -> int:
    """Events per CPU ring by default: TRACE_EVENTS_TOTAL shared by `ncpus` CPUs (65536
    each on 2 CPUs, 1024 on 1024: an emulated CPU costs no more than 40 KiB of rings)."""
    share = TRACE_EVENTS_TOTAL // max(ncpus, 1)
    return max(TRACE_BUF_EVENTS_MIN, 1 << (share.bit_length() - 1))
FRAME = struct.Struct("<iiqq")
EVENTS, DROPPED, META, TASKS, IRQS, LOG = range(1, 7)
#: The last events of a ring that may still be being written when the drainer looks;
#: it leaves unpublished ones there for the next drain.
_IN_FLIGHT = 64
EVENT_SIZE = ctypes.sizeof(image.TraceEvent)
_SEQ = image.offsetof(image.TraceEvent, "seq")


def trace_point(kind: int, arg0: int = 0, arg1: int = 0) -> None:
    """Record event `kind` (a type of this module) of the current task on its CPU, if
    tracing is on. Any context; never sleeps; does nothing outside a kernel."""
    img = image._this
    if img is not None and img.core is not None:
        img.core.trace(kind, arg0, arg1)


def trace_comm(comm: str) -> None:
    """Record the current task's name (a new kthread, as it starts): a task that ends
    before the drainer looks at the task table keeps its name in the trace."""
    data = comm.encode("utf-8")[:15].ljust(16, b"\0")
    for off in (0, 8):
        trace_point(COMM, off, int.from_bytes(data[off:off + 8], "little", signed=True))


def tracing_on(img: image.SharedImage) -> bool:
    return bool(img.img.hdr.trace_on)


def start(img: image.SharedImage, spool_fd: int) -> None:
    """Start recording into the rings; `spool_fd` (a file of the booting process) takes
    what drain() copies out. Older events in the rings are skipped."""
    hdr = img.img.hdr
    lock = image.field_addr(hdr, "trace_lock")
    records.raw_spin_lock(lock, "trace buffer")
    try:
        for ring in img.img.trace_rings:
            ring.tail = records.field_load(ring, "head")
            ring.dropped = 0
        hdr.trace_log_seq = hdr.log_next_seq
        meta = {"boot_ns": hdr.boot_ns, "ncpus": hdr.ncpus, "hz": hdr.hz,
                "boot_pid": hdr.boot_pid, "cpu_map": list(img.cpu_map),
                "buf_events": hdr.trace_buf_events}
        os.write(spool_fd, _json_frame(META, 0, meta))
        hdr.trace_spool_fd = spool_fd
        records.field_store(hdr, "trace_on", 1)
    finally:
        records.raw_spin_unlock(lock)


def stop(img: image.SharedImage) -> None:
    """Stop recording, drain what is left into the spool and detach it (the supervisor
    closes its copy at its next look)."""
    hdr = img.img.hdr
    records.field_store(hdr, "trace_on", 0)
    fd = hdr.trace_spool_fd
    if fd >= 0:
        drain(img, fd, {}, detach=True)


def drain(img: image.SharedImage, fd: int, seen: dict[str, Any], spool: int | None = None,
          detach: bool = False) -> None:
    """Copy every published event of every ring, the task and IRQ names that changed
    (`seen` remembers them for this drainer) and the new printk lines to file `fd`.
    `spool`: do nothing unless the image's spool is still that one. `detach`: then
    detach the spool (the last drain of a trace)."""
    hdr = img.img.hdr
    lock = image.field_addr(hdr, "trace_lock")
    records.raw_spin_lock(lock, "trace buffer")
    try:
        if spool is not None and hdr.trace_spool_fd != spool:
            return
        if detach:
            hdr.trace_spool_fd = -1
        frames = [_drain_ring(img, cpu) for cpu in range(len(img.img.trace_rings))]
        frames.append(_names(img, seen))
        frames.append(_log_lines(img))
        data = b"".join(frames)
        while data:
            data = data[os.write(fd, data):]
    finally:
        records.raw_spin_unlock(lock)


def _drain_ring(img: image.SharedImage, cpu: int) -> bytes:
    ring = img.img.trace_rings[cpu]
    n = img.img.hdr.trace_buf_events
    head = records.field_load(ring, "head")
    tail = ring.tail
    lost = max(0, head - tail - n)
    tail += lost
    base = ctypes.addressof(cast(ctypes.Array[image.TraceEvent], img.img.trace_events))
    base += cpu * n * EVENT_SIZE
    end = head
    for seq in range(max(tail, head - _IN_FLIGHT), head):
        if _native.load64(base + (seq % n) * EVENT_SIZE + _SEQ) != seq + 1:
            end = seq  # still being written: next time
            break
    chunk = _copy(base, n, tail, end)
    # Events a writer may have overwritten while we copied them are lost too.
    overrun = max(0, records.field_load(ring, "head") - n - tail)
    if overrun:
        overrun = min(overrun, end - tail)
        chunk = chunk[overrun * EVENT_SIZE:]
    lost += overrun
    first = tail + overrun
    ring.tail = end
    ring.dropped += lost
    out = b""
    if lost:
        out += FRAME.pack(DROPPED, cpu, lost, 0)
    if chunk:
        out += FRAME.pack(EVENTS, cpu, first, len(chunk)) + chunk
    return out


def _copy(base: int, n: int, first: int, end: int) -> bytes:
    """Events first..end-1 of a ring of n events at `base`, as raw bytes."""
    if end <= first:
        return b""
    lo, hi = first % n, (end - 1) % n + 1
    if lo < hi:
        return ctypes.string_at(base + lo * EVENT_SIZE, (hi - lo) * EVENT_SIZE)
    return (ctypes.string_at(base + lo * EVENT_SIZE, (n - lo) * EVENT_SIZE)
            + ctypes.string_at(base, hi * EVENT_SIZE))


def _names(img: image.SharedImage, seen: dict[str, Any]) -> bytes:
    """TASKS and IRQS frames for the tasks and IRQ lines whose names this drainer has
    not written yet: [pid, comm, cpu, flags, ppid] and [irq, name]."""
    tasks = img.img.tasks
    known: dict[int, tuple[str, int, int]] = seen.setdefault("tasks", {})
    new = []
    for slot in range(img.img.hdr.task_high):
        rec = tasks[slot]
        pid = rec.pid
        if not rec.in_use or pid <= 0:
            continue
        entry = (rec.comm.decode("utf-8", "replace"), rec.cpu, rec.flags)
        if known.get(pid) != entry:
            known[pid] = entry
            new.append([pid, *entry, rec.ppid])
    irqs: dict[int, str] = seen.setdefault("irqs", {})
    new_irqs = []
    for irq in range(img.img.hdr.nr_irqs):
        name = ",".join(a.name.decode("utf-8", "replace")
                        for a in img.img.irqs[irq].actions if a.in_use)
        if name and irqs.get(irq) != name:
            irqs[irq] = name
            new_irqs.append([irq, name])
    return ((_json_frame(TASKS, 0, new) if new else b"")
            + (_json_frame(IRQS, 0, new_irqs) if new_irqs else b""))


def _log_lines(img: image.SharedImage) -> bytes:
    """A LOG frame of the printk records logged since the last drain:
    [ts_ns since boot, pid, level, text]."""
    hdr = img.img.hdr
    seq = max(hdr.trace_log_seq, hdr.log_first_seq)
    end = hdr.log_next_seq
    if seq >= end:
        return b""
    n = hdr.log_records
    lines = []
    for s in range(seq, end):
        rec = img.img.log[s % n]
        lines.append([rec.ts_ns, rec.pid, rec.level,
                      rec.text[: rec.length].decode("utf-8", "replace")])
    hdr.trace_log_seq = end
    return _json_frame(LOG, 0, lines)


def _json_frame(kind: int, cpu: int, obj: Any) -> bytes:
    data = json.dumps(obj).encode()
    return FRAME.pack(kind, cpu, 0, len(data)) + data


class SpoolWriter:
    """The supervisor's side: follow the booting process's spool and drain into it."""

    def __init__(self, img: image.SharedImage) -> None:
        self.img = img
        self.fd = -1
        self.source: tuple[int, int] = (-1, -1)  # (fd number in the booting process, inode)
        self.seen: dict[str, Any] = {}

    def poll(self) -> None:
        """Drain if tracing is on (opening the spool the first time), or let go of the
        spool once the booting process detached it."""
        hdr = self.img.img.hdr
        want = hdr.trace_spool_fd
        if want < 0:
            self.close()
            return
        path = f"/proc/{hdr.boot_pid}/fd/{want}"
        try:
            source = (want, os.stat(path).st_ino)
            if self.fd < 0 or self.source != source:
                self.close()
                self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                self.source = (want, os.fstat(self.fd).st_ino)
                self.seen = {}
        except OSError:
            return  # detached meanwhile
        if hdr.trace_on:
            drain(self.img, self.fd, self.seen, spool=want)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
        self.source = (-1, -1)
