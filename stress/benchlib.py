"""Measuring and printing helpers shared by the stress/ benchmarks.

Every benchmark runs emu and its peers side by side in one process tree, interleaved
round-robin over several repetitions (the order rotates every repetition), and
reports each figure as **median (min–max)** over the repetitions. Ratios against a
peer are *paired*: emu's figure of repetition i divided by the peer's figure of the
same repetition, so a slow phase of the machine hits both sides of the ratio.

This module imports only the standard library, psutil and posix_ipc (never emu): it
also hosts the target function of the multiprocessing 'spawn' peer, which a spawned
child has to import. Importing it makes emu importable from a source checkout
(``python3 stress/test_bench_*.py`` runs without an installed package).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import posix_ipc
import psutil

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("emu") is None:  # a source checkout run as a script
    sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024

#: Tables printed so far (conftest.py repeats them in pytest's terminal summary).
REPORTS: list[str] = []


# --- small process helpers --------------------------------------------------------------------

def trivial(i: int = 0) -> int:
    """The child body of the process-creation peers (also the 'spawn' target)."""
    return i


def pin(cpu: int | None) -> None:
    """Pin the calling process to one real CPU (no-op for None)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def real_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def wait_pid(pid: int, timeout: float = 60.0) -> int:
    """waitpid() with a deadline: SIGKILL the child and raise if it overstays."""
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish within {timeout}s (killed)")
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def wait_until(pred: Callable[[], object], timeout: float, what: str, poll: float = 0.0005,
               report: Callable[[], str] | None = None) -> None:
    """Poll `pred` until it is true; AssertionError after `timeout` seconds.

    `report` adds a description of the stuck state to the error message.
    """
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            extra = ":\n" + report() if report else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(poll)


def proc_state(pid: int) -> str:
    """The OS view of a process for hang reports: state letter and kernel wait channel."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read().strip() or "-"
    except OSError:
        return "gone"
    return f"{state} in {wchan}"


def hang_report(tasks: Sequence[Any]) -> str:
    """Each emu task's emulated and OS state, for the message of a benchmark that hung."""
    import emu  # not at the top: 'spawn' children import this module

    lines = []
    for t in tasks:
        try:
            lines.append(f"  {t.comm} pid {t.pid}: emu state {emu.task_state_to_char(t)}, "
                         f"OS state {proc_state(t.pid)}")
        except emu.StaleObjectError:
            lines.append(f"  slot {t.slot}: already released")
    return "\n".join(lines)


class SemSet:
    """Named posix_ipc semaphores for the peers, unlinked however the benchmark ends."""

    _seq = 0

    def __init__(self) -> None:
        self.sems: list[posix_ipc.Semaphore] = []

    def new(self) -> posix_ipc.Semaphore:
        SemSet._seq += 1
        name = f"/emu_bench_{os.getpid()}_{SemSet._seq}"
        sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=0)
        self.sems.append(sem)
        return sem

    def close(self) -> None:
        for sem in self.sems:
            with contextlib.suppress(posix_ipc.ExistentialError):
                sem.unlink()
            sem.close()
        self.sems = []

    def __enter__(self) -> SemSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def bare_main_module() -> Iterator[None]:
    """Hide the real __main__ from multiprocessing 'spawn' children.

    A spawned child re-imports the parent's main module: the pytest console script
    (pytest and all its plugins) or this benchmark script (emu). The peer programs'
    main module imports only posix_ipc and psutil, like benchlib, so a bare __main__
    keeps the spawn row comparable with shared/bench.
    """
    saved = sys.modules["__main__"]
    bare = types.ModuleType("__main__")
    bare.__spec__ = None
    sys.modules["__main__"] = bare
    try:
        yield
    finally:
        sys.modules["__main__"] = saved


def stop_mp_resource_tracker() -> None:
    """Stop the resource tracker that starting a 'spawn' child launches (else it outlives us)."""
    from multiprocessing import resource_tracker

    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is not None:
        with contextlib.suppress(Exception):
            stop()


# --- nothing left behind ------------------------------------------------------------------------

def _shm_entries() -> set[str]:
    """/dev/shm entries named after this process: emu's ("emu-PID-..."), the peers'
    ("emu_bench_PID_...") and multiprocessing's ("pym-PID-..."). Other processes on the
    machine (a concurrent test run) come and go and are none of our business."""
    pid = str(os.getpid())
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return set()
    return {n for n in names if f"-{pid}-" in n or f"_{pid}_" in n}


def _live_children() -> set[int]:
    out = set()
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
    return out


@contextlib.contextmanager
def nothing_left_behind(what: str) -> Iterator[None]:
    """Assert that the block leaves no live child process and no /dev/shm entry behind."""
    shm_before = _shm_entries()
    kids_before = _live_children()
    yield
    stop_mp_resource_tracker()
    deadline = time.monotonic() + 3.0
    left = _live_children() - kids_before
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        left = _live_children() - kids_before
    shm_left = _shm_entries() - shm_before
    problems = []
    if left:
        problems.append(f"processes still running: {sorted(left)}")
    if shm_left:
        problems.append(f"/dev/shm entries left: {sorted(shm_left)}")
    assert not problems, f"{what} left things behind: " + "; ".join(problems)


@contextlib.contextmanager
def kernel_report_on_failure(kernel: Any) -> Iterator[None]:
    """If the block fails, print the emulated task table and the kernel log tail to stderr."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            print("--- emu tasks at the failure ---\n" + kernel.ps(), file=sys.stderr)
            print("--- kernel log (tail) ---\n" + "\n".join(kernel.dmesg()[-40:]),
                  file=sys.stderr, flush=True)
        raise


def check_kernel_clean(kernel: Any) -> None:
    """Sanity: the benchmark made the emulated kernel report nothing."""
    counts = {"warnings": kernel.warnings, "bugs": kernel.bugs, "oopses": kernel.oopses}
    bad = {k: v for k, v in counts.items() if v}
    assert not bad, f"kernel reported {bad}:\n" + "\n".join(kernel.dmesg()[-40:])


# --- repetitions --------------------------------------------------------------------------------

def env_int(name: str, default: int) -> int:
    """An integer knob from the environment (EMU_BENCH_REPS=3 for a quick run)."""
    value = os.environ.get(name)
    return int(value) if value else default


def round_robin(configs: Sequence[tuple[str, Callable[[], dict[str, float]]]], reps: int,
                warmup: int = 1, log: bool = True) -> dict[str, list[dict[str, float]]]:
    """Run every config once per repetition, rotating the order; drop `warmup` repetitions.

    Each config is (name, run) where run() returns a dict of figures. Returns
    name -> one dict per measured repetition, in repetition order (so index i of two
    configs belongs to the same round, for paired ratios).
    """
    out: dict[str, list[dict[str, float]]] = {name: [] for name, _ in configs}
    n = len(configs)
    for rep in range(warmup + reps):
        start = rep % n
        t0 = time.monotonic()
        for name, run in list(configs[start:]) + list(configs[:start]):
            figures = run()
            if rep >= warmup:
                out[name].append(figures)
        if log:
            tag = "warm-up" if rep < warmup else f"rep {rep - warmup + 1}/{reps}"
            print(f"  [{tag}: {time.monotonic() - t0:.1f}s]", file=sys.stderr, flush=True)
    return out


def column(runs: list[dict[str, float]], key: str) -> list[float]:
    return [r[key] for r in runs]


def paired_ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=True) if y]


# --- formatting ---------------------------------------------------------------------------------

def _fmt_num(v: float, digits: int) -> str:
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def cell(values: Sequence[float], digits: int = 2) -> str:
    """'median (min–max)' of `values`."""
    if not values:
        return "—"
    med = statistics.median(values)
    if len(values) == 1:
        return _fmt_num(med, digits)
    return (f"{_fmt_num(med, digits)} ({_fmt_num(min(values), digits)}–"
            f"{_fmt_num(max(values), digits)})")


def ratio_cell(values: Sequence[float]) -> str:
    """Paired ratios as 'median× (min–max)'."""
    if not values:
        return "—"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.2f}×"
    return f"{med:.2f}× ({min(values):.2f}–{max(values):.2f})"


def verdict(value: float, limit: float, better: str = "lower") -> str:
    ok = value <= limit if better == "lower" else value >= limit
    return "met" if ok else "NOT met"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
          notes: Sequence[str] = ()) -> str:
    """A Markdown table under a heading, with notes below; printed and kept in REPORTS."""
    lines = [f"### {title}", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        lines.append("| " + " | ".join(row) + " |")
    if notes:
        lines.append("")
        lines.extend(notes)
    text = "\n".join(lines) + "\n"
    print("\n" + text, flush=True)
    REPORTS.append(text)
    return text


def machine_line() -> str:
    import platform

    return (f"machine: {len(real_cpus())} CPUs allowed, python {platform.python_version()}, "
            f"kernel {platform.release()}, load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def banner(name: str) -> float:
    print(f"\n## {name}\n{machine_line()}", flush=True)
    return time.monotonic()


def finish(name: str, t0: float) -> None:
    msg = f"{name}: wall time {time.monotonic() - t0:.1f}s"
    print(msg, flush=True)
    REPORTS.append(msg + "\n")
