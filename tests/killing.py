"""The kill matrix: SIGKILL one process of a torture run at a chosen moment, then check
how the run ended and that nothing of its kernel is left (processes, /dev/shm entries).

Used by tests/test_kernel_death.py (one case per kind of process) and by
stress/test_kill_matrix.py (many moments and seeds, printed as a table).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil

from emu.image import own_ipc_names

#: The kinds of process a torture run has, as the victims of the kill matrix.
KINDS = ("booting", "supervisor", "kthread", "idle", "irq-thread")
#: Long-lived torture kthreads (the churn's short-lived ones come and go too fast).
KTHREAD_PREFIXES = ("cwait/", "cpost/", "kchurn/", "irqwork/", "torture-park/")


@dataclass
class Outcome:
    """How one killed run ended."""

    kind: str
    moment: float | None  # seconds into the torture loop; None: at start-up
    victim: str = ""  # comm:pid, empty if nothing was killed (see `missed`)
    missed: str = ""  # why nothing was killed
    killed_at: float = 0.0  # time.monotonic() of the kill
    loop_end: float = 0.0  # time.monotonic() when the torture loop ended (0: unknown)
    status: int | None = None  # exit status (-9: killed by SIGKILL), None: it hung
    verdict: str = ""  # "SUCCESS"/"FAILURE" from the JSON report, "" if none
    problems: list[str] = field(default_factory=list)
    seconds_to_end: float = 0.0  # from the kill (or the moment) to the run's end
    leftovers: list[str] = field(default_factory=list)  # live processes of the kernel
    shm: list[str] = field(default_factory=list)  # its /dev/shm entries
    output: str = ""

    @property
    def hung(self) -> bool:
        return self.status is None


def _ppid(p: psutil.Process) -> int:
    try:
        return p.ppid()
    except psutil.Error:
        return 0


def _session(sid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of session `sid`: a torture run and every task of
    its kernel (each command runs in its own session)."""
    out = []
    for p in psutil.process_iter(["pid", "name", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(p.pid) == sid:
                out.append(p)
        except (OSError, psutil.Error):
            pass
    return out


def _candidates(kind: str, boot_pid: int) -> list[tuple[str, int]]:
    session = _session(boot_pid)
    names = {p.pid: p.info["name"] or "" for p in session}
    # A child just forked still has its parent's name: it is not what the name says yet.
    procs = [(names[p.pid], p.pid) for p in session
             if p.pid == boot_pid or names[p.pid] != names.get(_ppid(p))]
    if kind == "booting":
        return [(n, pid) for n, pid in procs if pid == boot_pid]
    if kind == "supervisor":
        return [(n, pid) for n, pid in procs if n == "emu-supervisor"]
    if kind == "idle":
        return [(n, pid) for n, pid in procs if n.startswith("swapper/")]
    if kind == "irq-thread":
        return [(n, pid) for n, pid in procs if n.startswith("irq/")]
    if kind == "irqwork":
        return [(n, pid) for n, pid in procs if n.startswith("irqwork/")]
    return [(n, pid) for n, pid in procs if n.startswith(KTHREAD_PREFIXES)]


def kill_run(kind: str, moment: float | None, seed: int = 1, duration: float = 2.0,
             cpus: int = 2, end_bound: float = 60.0) -> Outcome:
    """Run ``python -m emu torture`` and SIGKILL a process of `kind` (picked with
    `seed`) `moment` seconds into its torture loop, or as soon as one exists if `moment`
    is None; wait at most `end_bound` seconds for the run to end (killing it if it
    hangs), then look for what it left behind."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rng = random.Random(seed)
    out = Outcome(kind, moment)
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "run.json")
        proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-m", "emu", "torture",
             "--duration", str(duration), "--cpus", str(cpus), "--seed", str(seed),
             "--stat-interval", str(duration), "--json", report],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        try:
            _kill_one(proc, kind, moment, rng, out)
            mark = time.monotonic()
            try:
                out.output = proc.communicate(timeout=end_bound)[0]
                out.status = proc.returncode
            except subprocess.TimeoutExpired:  # hung: where? (faulthandler prints stacks)
                proc.send_signal(signal.SIGABRT)
                try:
                    out.output = proc.communicate(timeout=10)[0]
                except subprocess.TimeoutExpired:
                    pass
                out.status = None
            out.seconds_to_end = time.monotonic() - mark
        finally:
            _clean_up(proc, out)
        if os.path.exists(report):
            with open(report) as f:
                result = json.load(f)
            out.verdict, out.problems = result["verdict"], result["problems"]
            if result.get("started_at"):
                out.loop_end = result["started_at"] + result["duration"]
    return out


def _wait_for(proc: subprocess.Popen[str], kind: str) -> bool:
    deadline = time.monotonic() + 30
    while not _candidates(kind, proc.pid):
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _kill_one(proc: subprocess.Popen[str], kind: str, moment: float | None,
              rng: random.Random, out: Outcome) -> None:
    # The irq workers are the last tasks the torture starts: its loop begins.
    if not _wait_for(proc, kind if moment is None else "irqwork"):
        out.missed = "the run ended before the victim existed"
        return
    begin = time.monotonic()
    victims = sorted(_candidates(kind, proc.pid))
    if not victims:
        out.missed = "no victim of that kind"
        return
    name, pid = rng.choice(victims)
    if moment is not None:
        time.sleep(max(0.0, begin + moment - time.monotonic()))
    if proc.poll() is not None:
        out.missed = "the run ended first"
        return
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            raise psutil.NoSuchProcess(pid)
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, psutil.NoSuchProcess):
        out.missed = f"{name} had exited"
        return
    out.killed_at = time.monotonic()
    out.victim = f"{name}:{pid}"


def _clean_up(proc: subprocess.Popen[str], out: Outcome) -> None:
    """Record what the run left behind (a few seconds' grace), then kill it all."""
    deadline = time.monotonic() + 5
    while (left := _session(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    out.leftovers = [f"{p.info['name']}:{p.pid}" for p in left]
    out.shm = sorted(own_ipc_names(proc.pid))
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for entry in out.shm:
        try:
            os.unlink(os.path.join("/dev/shm", entry))
        except OSError:
            pass


def expected(out: Outcome) -> str:
    """What is wrong with `out` ("" if nothing): it must end in time, leave nothing,
    and end the way its kind of victim implies."""
    if out.hung:
        return "hung"
    if out.leftovers or out.shm:
        return f"left {out.leftovers + out.shm}"
    if not out.victim:  # nothing was killed: an ordinary run
        return "" if out.status == 0 else f"not killed, yet exit status {out.status}"
    if out.status == 0 and out.loop_end and out.killed_at > out.loop_end:
        return ""  # killed while the run stopped its tasks: the victim may have exited
    if out.kind == "booting":
        return "" if out.status == -signal.SIGKILL else f"exit status {out.status}"
    if out.status != 1 or out.verdict != "FAILURE" or "End of test: FAILURE" not in out.output:
        return f"exit status {out.status}, verdict {out.verdict or 'none'}"
    text = "\n".join(out.problems)
    if out.kind == "supervisor" and "kernel died: the supervisor" not in text:
        return "no 'kernel died: the supervisor' problem"
    if out.kind == "idle" and "Attempted to kill the idle task" not in text:
        return "no idle-task panic"
    pid = out.victim.rsplit(":", 1)[1]
    if out.kind in ("kthread", "irq-thread", "idle") and f":{pid} died outside emu" not in text:
        return "the Oops does not name the victim"
    return ""
