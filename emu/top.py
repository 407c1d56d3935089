"""``emu top``: a live full-screen view of a running kernel, refreshed every second.

Per emulated CPU: the tasks running there, interrupts and softirqs per second; the
tasks by state (R first, then D, S, ...) with what they wait on; the last lines of the
kernel log. Drawn with rich (the ``top`` extra: ``pip install "emu-kernel[top]"``);
q or Ctrl-C quits, and it ends by itself when the kernel does.
"""

from __future__ import annotations

import collections
import os
import select
import sys
import termios
import time
import tty
from dataclasses import dataclass
from typing import Any

from . import attach, task
from .constants import PF_KTHREAD

try:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text
except ImportError:  # optional: only `emu top` needs it
    Console = None  # type: ignore[assignment,misc]

#: Seconds between refreshes.
INTERVAL = 1.0
#: Kernel log lines kept for the view.
LOG_LINES = 8
_STATE_ORDER = "RDSIPTtXZ"


@dataclass
class Sample:
    """Counters at one moment, for rates."""

    when: float
    irqs: list[int]
    softirqs: list[int]


def sample(k: attach.Attached) -> Sample:
    return Sample(time.monotonic(), k.irq_counts(), k.softirq_counts())


def _rates(prev: Sample, now: Sample) -> tuple[list[float], list[float]]:
    dt = max(now.when - prev.when, 1e-6)
    irqs = [(b - a) / dt for a, b in zip(prev.irqs, now.irqs, strict=True)]
    soft = [(b - a) / dt for a, b in zip(prev.softirqs, now.softirqs, strict=True)]
    return irqs, soft


def render(k: attach.Attached, prev: Sample, now: Sample, log: collections.deque[str],
           height: int) -> Any:
    """The screen: header, CPU table, task table, log lines."""
    recs = k.task_recs()
    rows = [(task.state_char(r.state), r) for r in recs]
    counts = collections.Counter(s for s, _ in rows)
    states = ", ".join(f"{counts[s]} {s}" for s in _STATE_ORDER if counts[s])
    head = Text(f"emu top - kernel {k.pid} ({k.boot_comm()}), up {k.uptime:.0f}s, "
                f"{k.img.hdr.ncpus} CPUs, {len(recs)} tasks: {states}", style="bold")

    irqs, soft = _rates(prev, now)
    running = k.running_on()
    cpus = Table(box=None, pad_edge=False, expand=False)
    for col, justify in (("CPU", "right"), ("IRQs/s", "right"), ("softirqs/s", "right"),
                         ("RUNNING", "left")):
        cpus.add_column(col, justify=justify)  # type: ignore[arg-type]
    for c in range(k.img.hdr.ncpus):
        cpus.add_row(str(c), f"{irqs[c]:.0f}", f"{soft[c]:.0f}",
                     Text(" ".join(running.get(c, [])) or "(idle)"))

    tasks = Table(box=None, pad_edge=False)
    for col in ("PID", "CPU", "S", "WCHAN", "COMMAND"):
        tasks.add_column(col, justify="right" if col in ("PID", "CPU") else "left")
    room = max(3, height - k.img.hdr.ncpus - LOG_LINES - 8)
    rows.sort(key=lambda sr: (_STATE_ORDER.find(sr[0]), sr[1].pid))
    for s, r in rows[:room]:
        name = r.full_name.decode("utf-8", "replace")
        tasks.add_row(str(r.pid), str(r.cpu), s, Text(task.wchan_of(k.img, r)),
                      Text(f"[{name}]" if r.flags & PF_KTHREAD else name))
    if len(rows) > room:
        tasks.add_row("", "", "", "", f"... {len(rows) - room} more")
    return Group(head, Text(""), cpus, Text(""), tasks, Text(""),
                 Text("--- kernel log ---", style="bold"), Text("\n".join(log)))


def _key_pressed(fd: int | None, timeout: float) -> str:
    if fd is None:
        time.sleep(timeout)
        return ""
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 16).decode("utf-8", "replace") if ready else ""


def run(k: attach.Attached, interval: float = INTERVAL) -> int:
    """Show the live view until q, Ctrl-C or the kernel's end. Returns the exit status."""
    if Console is None:
        print("emu top: needs the rich package: pip install rich "
              "(or the extra: pip install \"emu-kernel[top]\")", file=sys.stderr)
        return 1
    console = Console()
    reader = attach.LogReader(k.img)
    log: collections.deque[str] = collections.deque(reader.read()[-LOG_LINES:], LOG_LINES)
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None
    prev = sample(k)
    try:
        if fd is not None:
            tty.setcbreak(fd)
        with Live(console=console, screen=True, auto_refresh=False) as live:
            now = prev
            while k.alive:
                log.extend(reader.poll())
                live.update(render(k, prev, now, log, console.size.height), refresh=True)
                if "q" in _key_pressed(fd, interval).lower():
                    return 0
                prev, now = now, sample(k)
    except KeyboardInterrupt:
        return 0
    finally:
        if fd is not None and saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    print(f"emu top: kernel {k.pid} ended")
    return 0
