"""The kernel's failure reports: WARN, BUG splats, Oops, taint (lib/bug.c, kernel/panic.c).

Every report goes to the kernel log in the kernel's format, with the Python stack as
the call trace, and is counted in the image header (``kernel.warnings``,
``kernel.bugs``, ``kernel.oopses``).
"""

from __future__ import annotations

import os
import sys
import traceback
from types import FrameType, TracebackType

from . import image, irqflags, records
from .constants import PF_KTHREAD, TAINT_DIE, TAINT_WARN
from .errors import EmuError
from .printk import log_store

# print_tainted(): one column per flag, in the kernel's order ("G" = not proprietary).
_TAINT_ORDER = "PFSRMBUDAWCIOELKXTNJ"
_TAINT_BITS = {"D": TAINT_DIE, "W": TAINT_WARN}

CUT_HERE = "------------[ cut here ]------------"
END_TRACE = "---[ end trace 0000000000000000 ]---"


class KernelBug(EmuError):
    """BUG() hit in the booting process (in a kthread, BUG() ends the kthread as an Oops)."""


class TaskKilled(BaseException):
    """Unwinds a kthread that was killed by BUG() or an Oops already reported."""


def add_taint(flag: int) -> None:
    """Set taint flag `flag` (TAINT_*) in the kernel's taint mask. Any context; never
    sleeps.
    """
    hdr = image.this().img.hdr
    records.field_or(hdr, "taint", 1 << flag)


def tainted_str(taint: int | None = None) -> str:
    """The "Tainted: ..." / "Not tainted" part of report headers."""
    if taint is None:
        taint = image.this().img.hdr.taint
    if not taint:
        return "Not tainted"
    cols = []
    for letter in _TAINT_ORDER:
        bit = _TAINT_BITS.get(letter)
        if letter == "P":
            cols.append("G")
        else:
            cols.append(letter if bit is not None and taint & (1 << bit) else " ")
    return "Tainted: " + "".join(cols).rstrip()


def _count(field: str) -> None:
    hdr = image.this().img.hdr
    records.field_add(hdr, field, 1)


def _who() -> tuple[int, int, str]:
    rec = irqflags.current_slot()
    if rec is None:
        return -1, os.getpid(), "?"
    return int(rec.cpu), int(rec.pid), rec.comm.decode("utf-8", "replace")


def header_line(cpu: int | None = None, pid: int | None = None, comm: str | None = None) -> str:
    """ "CPU: 1 PID: 123 Comm: foo Tainted: G        W emu" """
    c, p, n = _who()
    cpu = c if cpu is None else cpu
    pid = p if pid is None else pid
    comm = n if comm is None else comm
    return f"CPU: {cpu} PID: {pid} Comm: {comm} {tainted_str()} emu"


def stack_lines(frame: FrameType | None) -> list[str]:
    """The Python stack ending at `frame`, one line per kernel-style trace entry.

    In a kthread the trace starts at the kthread's entry point: the frames above it
    belong to its creator and were only inherited through fork.
    """
    entries: list[traceback.FrameSummary] = list(traceback.extract_stack(frame))
    starts = [i for i, e in enumerate(entries)
              if e.name == "_kthread" and e.filename.endswith(os.path.join("emu", "kthread.py"))]
    if starts:
        entries = entries[starts[-1]:]
    lines: list[str] = []
    for entry in traceback.format_list(entries):
        lines.extend(" " + part for part in entry.rstrip("\n").split("\n"))
    return lines


def _caller(depth: int) -> FrameType:
    return sys._getframe(depth + 1)


def warn(message: str | None = None, depth: int = 1) -> None:
    """WARN(): a "cut here" report located at the caller `depth` frames up; taints W."""
    frame = _caller(depth)
    cpu, pid, _ = _who()
    lines = [CUT_HERE]
    if message:
        lines.append(message)
    lines.append(
        f"WARNING: CPU: {cpu} PID: {pid} at {_where(frame)} {frame.f_code.co_name}"
    )
    add_taint(TAINT_WARN)
    lines += [header_line(), "Call Trace:"] + stack_lines(frame) + [END_TRACE]
    _count("warnings")
    log_store(4, "\n".join(lines))


def bug_splat(first: str, details: list[str], depth: int = 1) -> None:
    """A "BUG: ..." report that does not end the task (e.g. sleeping in atomic context)."""
    frame = _caller(depth)
    add_taint(TAINT_WARN)
    lines = [first] + details + [header_line(), "Call Trace:"] + stack_lines(frame)
    _count("bugs")
    log_store(3, "\n".join(lines))


def oops(exc: BaseException | None, title: str, cpu: int | None = None,
         pid: int | None = None, comm: str | None = None) -> None:
    """Report an Oops (with `exc`'s traceback when given) and taint the kernel with D."""
    n = image.this().img.hdr.oopses + 1
    add_taint(TAINT_DIE)
    lines = [f"Oops: {title} [#{n}] SMP emu", header_line(cpu, pid, comm), "Call Trace:"]
    if exc is not None:
        tb: TracebackType | None = exc.__traceback__
        for entry in traceback.format_exception(type(exc), exc, tb):
            lines.extend(" " + part for part in entry.rstrip("\n").split("\n"))
    lines.append(END_TRACE)
    _count("oopses")
    log_store(4 if exc is None else 1, "\n".join(lines))


def BUG(depth: int = 1) -> None:
    """BUG(): "kernel BUG at FILE:LINE!", an Oops, and the end of the calling task."""
    frame = _caller(depth)
    where = _where(frame)
    _count("bugs")
    log_store(1, f"kernel BUG at {where}!")
    try:
        raise KernelBug(f"kernel BUG at {where}!")
    except KernelBug as exc:
        exc.__traceback__ = None
        oops(None, "invalid opcode: 0000")
        log_store(1, "\n".join(stack_lines(frame)))
        rec = irqflags.current_slot()
        if rec is not None and rec.flags & PF_KTHREAD:
            raise TaskKilled() from exc
        raise


def report_dead_owner(what: str, pid: int, depth: int = 3) -> None:
    """Report a `what` lock taken over from dead task `pid` with a WARN located `depth`
    frames up (the hook of records' raw lock and of native/'s WaitCore)."""
    warn(f"emu: {what} lock taken over from dead task (pid {pid})", depth=depth)


records.set_dead_owner_hook(report_dead_owner)


def _where(frame: FrameType) -> str:
    path = frame.f_code.co_filename
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if path.startswith(pkg + os.sep):
        path = os.path.relpath(path, pkg)
    return f"{path}:{frame.f_lineno}"
