"""The kernel's failure reports: WARN, BUG splats, Oops, taint (lib/bug.c, kernel/panic.c).

Every report goes to the kernel log in the kernel's format as one unit (no other
task's lines come between its lines, in the log or on stderr), with the Python stack
as the call trace, and is counted in the image header (``kernel.warnings``,
``kernel.bugs``, ``kernel.oopses``). A call trace shows the user's frames only: it
starts at the kthread's threadfn (or at the test function under pytest, see
set_stack_base()) and leaves out emu's own frames, as the kernel's trace stops at its
entry point. Identical reports (same kind and site) are rate-limited like
printk_ratelimit(); the counters count every report, printed or not. The first
report of each kind is kept apart from the log ring (``kernel.first_reports``).
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
from types import CodeType, FrameType, TracebackType

from . import image, irqflags, records
from .constants import PF_KTHREAD, TAINT_DIE, TAINT_WARN
from .errors import EmuError
from .printk import log_store, ratelimit

# print_tainted(): one column per flag, in the kernel's order ("G" = not proprietary).
_TAINT_ORDER = "PFSRMBUDAWCIOELKXTNJ"
_TAINT_BITS = {"D": TAINT_DIE, "W": TAINT_WARN}

CUT_HERE = "------------[ cut here ]------------"
END_TRACE = "---[ end trace 0000000000000000 ]---"

_EMU_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_EXAMPLES_DIR = os.path.join(_EMU_DIR, "examples") + os.sep
#: Where a kthread's own stack starts: frames above it were inherited through fork.
_KTHREAD_ENTRY = (os.path.join(_EMU_DIR, "kthread.py"), "_kthread")
#: The outermost frame of call traces in this process (see set_stack_base()).
_stack_base: CodeType | None = None


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


def _count(field: str) -> int:
    hdr = image.this().img.hdr
    return records.field_add(hdr, field, 1)


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


# --- call traces ----------------------------------------------------------------------------


def set_stack_base(code: CodeType | None) -> None:
    """Start this process's call traces at the frame running `code` (the innermost one),
    as a kthread's start at its threadfn; None: at the outermost frame.

    The pytest plugin sets the running test function, so that reports do not carry
    pytest's frames above it.
    """
    global _stack_base
    _stack_base = code


def _is_emu_internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_EMU_DIR) and not path.startswith(_EXAMPLES_DIR)


def _is_entry(code: CodeType) -> bool:
    return code is _stack_base or (code.co_name == _KTHREAD_ENTRY[1]
                                   and code.co_filename == _KTHREAD_ENTRY[0])


def _user_frames(frames: list[tuple[FrameType, int]]) -> traceback.StackSummary:
    """The frames (outermost first) a call trace shows: from the innermost entry point
    (threadfn, the test function) on, emu's own frames left out."""
    start = max((i for i, (f, _) in enumerate(frames) if _is_entry(f.f_code)), default=0)
    kept = [(f, line) for f, line in frames[start:]
            if not _is_emu_internal(f.f_code.co_filename)]
    return traceback.StackSummary.extract(iter(kept), lookup_lines=True)


def _format(summary: traceback.StackSummary) -> list[str]:
    lines: list[str] = []
    for entry in summary.format():
        lines.extend(" " + part for part in entry.rstrip("\n").split("\n"))
    return lines


def stack_lines(frame: FrameType | None) -> list[str]:
    """The call trace of the stack ending at `frame`, one line per kernel-style trace
    entry: the user's frames only (see the module's doc)."""
    frames: list[tuple[FrameType, int]] = []
    while frame is not None:
        frames.append((frame, frame.f_lineno))
        frame = frame.f_back
    frames.reverse()
    return _format(_user_frames(frames))


def exception_lines(exc: BaseException) -> list[str]:
    """`exc`'s traceback as call-trace lines (the user's frames only), then its type and
    message, as Python prints them; causes and contexts first, as Python does."""
    chain: list[tuple[BaseException, str]] = []  # newest first, each with its link on
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if cur.__cause__ is not None:
            nxt, link = cur.__cause__, _CAUSE
        elif cur.__context__ is not None and not cur.__suppress_context__:
            nxt, link = cur.__context__, _CONTEXT
        else:
            nxt, link = None, ""
        if nxt is not None:
            chain.append((nxt, link))
        cur = nxt
    lines: list[str] = []
    for older, link in reversed(chain):
        lines += _one_exception(older) + [" " + link]
    return lines + _one_exception(exc)


_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


def _one_exception(e: BaseException) -> list[str]:
    frames: list[tuple[FrameType, int]] = []
    tb: TracebackType | None = e.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    text = "".join(traceback.format_exception_only(type(e), e)).rstrip("\n")
    return _format(_user_frames(frames)) + [" " + part for part in text.split("\n")]


def caller_site(depth: int = 1) -> str:
    """``file.py:LINE`` of the innermost frame outside emu, starting `depth` frames up
    (where the user created or called something); "?" if every frame is emu's."""
    frame: FrameType | None = sys._getframe(depth)
    while frame is not None and _is_emu_internal(frame.f_code.co_filename):
        frame = frame.f_back
    return "?" if frame is None else _where(frame)


def _caller(depth: int) -> FrameType:
    return sys._getframe(depth + 1)


def _site(kind: str, frame: FrameType | None, title: str = "") -> str:
    """What makes two reports identical for rate-limiting: kind, title without its
    numbers (pids, counts), and where."""
    where = _where(frame) if frame is not None else "?"
    return f"{kind}|{re.sub(r'[0-9]+', 'N', title)}|{where}"


def _func(frame: FrameType | None) -> str:
    return frame.f_code.co_name if frame is not None else "emu"


# --- reports --------------------------------------------------------------------------------


def warn(message: str | None = None, depth: int = 1) -> None:
    """WARN(): a "cut here" report located at the caller `depth` frames up; taints W.
    Any context; never sleeps."""
    frame = _caller(depth)
    add_taint(TAINT_WARN)
    _count("warnings")
    if not ratelimit(_site("warning", frame), _func(frame)):
        return
    cpu, pid, _ = _who()
    lines = [CUT_HERE]
    if message:
        lines.append(message)
    lines.append(
        f"WARNING: CPU: {cpu} PID: {pid} at {_where(frame)} {frame.f_code.co_name}"
    )
    lines += [header_line(), "Call Trace:"] + stack_lines(frame) + [END_TRACE]
    log_store(4, "\n".join(lines), keep=("warning",))


def bug_splat(first: str, details: list[str], depth: int = 1, kind: str = "bug") -> None:
    """A "BUG: ..." report that does not end the task (e.g. sleeping in atomic context),
    counted in ``kernel.bugs``. `kind`: "bug", or "soft_lockup" for the soft-lockup
    watchdog's report. Any context; never sleeps."""
    frame = _caller(depth)
    add_taint(TAINT_WARN)
    _count("bugs")
    if not ratelimit(_site(kind, frame, first), _func(frame)):
        return
    lines = [first] + details + [header_line(), "Call Trace:"] + stack_lines(frame)
    log_store(3, "\n".join(lines), keep=(kind,))


def _oops_lines(title: str, n: int, header: str, trace: list[str]) -> list[str]:
    return [f"Oops: {title} [#{n}] SMP emu", header, "Call Trace:", *trace, END_TRACE]


def oops(exc: BaseException | None, title: str, cpu: int | None = None,
         pid: int | None = None, comm: str | None = None) -> None:
    """Report an Oops (with `exc`'s traceback when given) and taint the kernel with D."""
    add_taint(TAINT_DIE)
    n = _count("oopses")
    frame = None
    if exc is not None:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        frame = tb.tb_frame if tb is not None else None
    if not ratelimit(_site("oops", frame, title), _func(frame)):
        return
    trace = exception_lines(exc) if exc is not None else []
    lines = _oops_lines(title, n, header_line(cpu, pid, comm), trace)
    log_store(4 if exc is None else 1, "\n".join(lines), keep=("oops",))


def BUG(depth: int = 1) -> None:
    """BUG(): "kernel BUG at FILE:LINE!", an Oops, and the end of the calling task
    (raises TaskKilled in a kthread, KernelBug in the booting process)."""
    frame = _caller(depth)
    where = _where(frame)
    add_taint(TAINT_DIE)
    _count("bugs")
    n = _count("oopses")
    if ratelimit(_site("bug", frame, "kernel BUG"), _func(frame)):
        lines = [CUT_HERE, f"kernel BUG at {where}!",
                 *_oops_lines("invalid opcode: 0000", n, header_line(), stack_lines(frame))]
        log_store(1, "\n".join(lines), keep=("bug", "oops"))
    try:
        raise KernelBug(f"kernel BUG at {where}!")
    except KernelBug as exc:
        exc.__traceback__ = None
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


# --- sched_show_task() for khungtaskd: a task hands its call trace over --------------------
#
# khungtaskd (the supervisor) cannot read another process's Python stack, so it asks the
# task with a signal, and the task's handler hands the trace over in the image header:
# hdr.stack_state is (request sequence << 2 | phase). Only the supervisor asks, one task
# at a time; a task answers only a request for itself that is still open.

_REQUESTED, _WRITING, _DONE = 1, 2, 3


def request_stack(pid: int, signo: int, timeout: float = 1.0) -> list[str] | None:
    """Ask task `pid` for its call trace (signal `signo`, whose handler calls
    show_stack_reply()); the trace lines, or None if it did not answer in `timeout`
    seconds (it is dead, or its handler cannot run). Process context (the supervisor)."""
    hdr = image.this().img.hdr
    seq = (records.field_load(hdr, "stack_state") >> 2) + 1
    asked = seq << 2 | _REQUESTED
    hdr.stack_pid = pid
    records.field_store(hdr, "stack_state", asked)
    try:
        os.kill(pid, signo)
    except ProcessLookupError:
        records.field_store(hdr, "stack_state", seq << 2)
        return None
    deadline = time.monotonic() + timeout
    while records.field_load(hdr, "stack_state") != seq << 2 | _DONE:
        now = time.monotonic()
        if now > deadline and (records.field_cmpxchg(hdr, "stack_state", asked, seq << 2)
                               == asked or now > deadline + 1.0):
            return None  # withdrawn before it began to answer, or it died answering
        time.sleep(0.001)
    text = hdr.stack_text[: hdr.stack_len].decode("utf-8", "replace")
    records.field_store(hdr, "stack_state", seq << 2)
    return text.split("\n") if text else []


def show_stack_reply(frame: FrameType | None) -> None:
    """Answer an open request_stack() for this task with the call trace ending at
    `frame` (the signal handler's interrupted frame); nothing if none is open."""
    if image._this is None:
        return  # a request that arrived after this process left the kernel
    hdr = image._this.img.hdr
    state = records.field_load(hdr, "stack_state")
    if state & 3 != _REQUESTED or hdr.stack_pid != os.getpid():
        return
    text = "\n".join(stack_lines(frame)).encode("utf-8", "replace")[: image.STACK_TEXT_LEN]
    if records.field_cmpxchg(hdr, "stack_state", state, state + 1) != state:
        return  # withdrawn meanwhile
    hdr.stack_text = text
    hdr.stack_len = len(text)
    records.field_store(hdr, "stack_state", state + 2)
