"""`emu run`: a module loaded as insmod would, its log streamed as it is written, unloaded
after --duration, Ctrl-C or SIGTERM; exit status and insmod's messages (API.md)."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import _emu_native as _native
import emu
from emu import tracefile

ROOT = Path(__file__).resolve().parent.parent
#: Bound of every wait for a line (the machine may be loaded).
LINE_TIMEOUT = 20.0


class Run:
    """`python -m emu ARGS` as a subprocess whose stdout is read line by line as it comes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emu", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, pattern: str, timeout: float = LINE_TIMEOUT) -> re.Match[str]:
        """The next line matching `pattern` (earlier lines are kept in `seen`)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s; "
                                     f"got {self.seen}") from None
            if line is None:
                raise AssertionError(f"output ended without {pattern!r}; got {self.seen}; "
                                     f"stderr: {self.stderr()}")
            self.seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def finish(self, timeout: float = LINE_TIMEOUT) -> tuple[int, list[str], str]:
        """Wait for the exit: (status, the remaining stdout lines, stderr)."""
        status = self.proc.wait(timeout)
        rest = []
        while (line := self.lines.get(timeout=timeout)) is not None:
            rest.append(line)
        self.seen += rest
        return status, rest, self.stderr()

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run(*args: str) -> tuple[int, list[str], str]:
    r = Run(*args)
    try:
        return r.finish(60)
    finally:
        r.kill()


def module_file(tmp_path: Path, body: str, name: str = "mod.py") -> str:
    path = tmp_path / name
    path.write_text("import emu\n" + textwrap.dedent(body))
    return str(path)


def assert_gone(pid: int) -> None:
    deadline = time.monotonic() + 5
    while not _native.pid_is_dead(pid):
        assert time.monotonic() < deadline, f"kthread {pid} outlived `emu run`"
        time.sleep(0.01)


# --- streaming and unloading -------------------------------------------------------------------

def test_log_streams_while_running_and_sigterm_unloads():
    r = Run("run", "-m", "emu.examples.hello_kthread", "period_ms=50", "--cpus", "1")
    try:
        pid = int(r.expect(r"^\[ *\d+\.\d{6}\] hello: module loaded, started \[hello/0\] "
                           r"pid (\d+)$").group(1))
        r.expect(r"hello: tick 2 on CPU 0$")
        assert r.proc.poll() is None, "the lines came only at the end"
        r.proc.send_signal(signal.SIGTERM)
        status, rest, err = r.finish()
    finally:
        r.kill()
    assert status == 0, err
    assert re.search(r"hello: module unloaded, kthread returned \d+$", rest[-1]), rest
    assert any("hello: stopping after" in line for line in rest)
    assert err == ""
    assert_gone(pid)


def test_ctrl_c_unloads():
    r = Run("run", "-m", "emu.examples.hello_kthread", "period_ms=50")
    try:
        r.expect(r"hello: tick 1 ")
        r.proc.send_signal(signal.SIGINT)
        status, rest, err = r.finish()
    finally:
        r.kill()
    assert status == 0, err
    assert "module unloaded" in rest[-1]


def test_duration_unloads_by_itself():
    status, lines, err = run("run", "-m", "emu.examples.hello_kthread", "--duration", "0.3",
                             "period_ms=100")
    assert status == 0, err
    assert "module loaded" in lines[0] and "module unloaded" in lines[-1]


def test_demo_runs_the_hello_module():
    status, lines, err = run("demo", "--seconds", "0.3", "--period-ms", "100")
    assert status == 0, err
    assert "module loaded" in lines[0] and "module unloaded" in lines[-1]


# --- module files and parameters -----------------------------------------------------------------

def test_file_module_with_typed_parameters(tmp_path):
    path = module_file(tmp_path, """
        count = emu.module_param("count", 4, "how many")
        verbose = emu.module_param("verbose", False)
        label = emu.module_param("label", "x")
        ratio = emu.module_param("ratio", 0.5)

        @emu.module_init
        def init():
            emu.pr_info("init %r %r %r %r", count, verbose, label, ratio)

        @emu.module_exit
        def bye():
            emu.pr_info("exit")
    """)
    status, lines, err = run("run", path, "count=0x10", "verbose=y", "label=a=b", "ratio=2",
                             "--duration", "0.01")
    assert status == 0, err
    assert [line.split("] ", 1)[1] for line in lines] == ["init 16 True 'a=b' 2.0", "exit"]


def test_parameters_default_outside_emu_run():
    from emu.examples import hello_kthread

    assert hello_kthread.period_ms == 1000


def test_init_refusal_is_insmods_error(tmp_path):
    path = module_file(tmp_path, """
        import errno
        @emu.module_init
        def init():
            emu.pr_err("bad: no device")
            return -errno.ENODEV

        @emu.module_exit
        def bye():
            emu.pr_info("exit must not run")
    """, "bad.py")
    status, lines, err = run("run", path, "--duration", "5")
    assert status == 1
    assert err == "insmod: ERROR: could not insert module bad.py: No such device\n"
    assert [line.split("] ", 1)[1] for line in lines] == ["bad: no device"]


def test_unknown_parameter_refuses_loading(tmp_path):
    path = module_file(tmp_path, """
        n = emu.module_param("n", 1)
        @emu.module_init
        def init():
            emu.pr_info("init must not run")
    """)
    status, lines, err = run("run", path, "nope=3", "--duration", "5")
    assert status == 1
    assert "mod: Unknown parameter `nope'" in lines[0] and len(lines) == 1
    assert err == ("insmod: ERROR: could not insert module mod.py: Unknown symbol in module, "
                   "or unknown parameter (see dmesg)\n")


def test_invalid_parameter_value_refuses_loading(tmp_path):
    path = module_file(tmp_path, """
        n = emu.module_param("n", 1)
        @emu.module_init
        def init():
            emu.pr_info("init must not run")
    """)
    status, lines, err = run("run", path, "n=abc", "--duration", "5")
    assert status == 1
    assert lines[0].endswith("mod: `abc' invalid for parameter `n'") and len(lines) == 1
    assert err == "insmod: ERROR: could not insert module mod.py: Invalid parameters\n"


def test_a_warn_makes_the_exit_status_1(tmp_path):
    path = module_file(tmp_path, """
        c = None
        @emu.module_init
        def init():
            global c
            c = emu.Completion()
            emu.complete_all(c)
            emu.complete_all(c)
    """)
    status, lines, err = run("run", path, "--duration", "0.01")
    assert status == 1, err
    assert any("WARNING" in line for line in lines), lines


def test_missing_module_and_bad_parameter_word(tmp_path):
    status, _, err = run("run", str(tmp_path / "none.py"), "--duration", "1")
    assert status == 1 and "insmod: ERROR: could not load module" in err
    status, _, err = run("run", "-m", "emu.examples.nothing_here", "--duration", "1")
    assert status == 1 and "no module named emu.examples.nothing_here" in err
    status, _, err = run("run", "-m", "emu.examples.hello_kthread", "oops")
    assert status == 2 and "module parameters are name=value, got 'oops'" in err


def test_run_with_trace_writes_a_trace_of_the_module(tmp_path):
    """`emu run --trace FILE` streams the log as without it and writes a trace whose
    tasks include the module's kthread, created (sched_wakeup_new) and exiting."""
    pytest.importorskip("perfetto")
    path = str(tmp_path / "run.pftrace")
    status, lines, err = run("run", "-m", "emu.examples.hello_kthread", "period_ms=50",
                             "--duration", "0.5", "--trace", path)
    assert status == 0, err
    assert any("hello: tick 0" in line for line in lines), lines
    names = {name: ev for _, name, ev in tracefile.events_of(path)}
    assert names["sched_wakeup_new"].comm.startswith("hello")
    assert names["sched_process_exit"].comm.startswith("hello")


# --- the four-kthread module -------------------------------------------------------------------

def test_four_kthreads_log_every_period_and_stop_by_themselves():
    r = Run("run", "-m", "emu.examples.multi_kthread", "period=1", "lifetime=2")
    try:
        for k in (0, 1):
            for _ in range(4):
                r.expect(rf"Thread \d is still running\.\.\.! {k} secs\.$")
        for _ in range(4):
            r.expect(r"Thread \d stopped\.$")
        r.proc.send_signal(signal.SIGTERM)
        status, rest, err = r.finish()
    finally:
        r.kill()
    assert status == 0, err
    assert not any("by module exit" in line for line in rest), rest
    running = [line for line in r.seen if "still running" in line]
    assert sorted(line[-20:] for line in running) == sorted(
        f"is still running...! {k} secs."[-20:] for k in (0, 1) for _ in range(4))
    stopped = sorted(line.split("] ")[1] for line in r.seen if line.endswith("stopped."))
    assert stopped == [f"Thread {n} stopped." for n in range(4)]


def test_four_kthreads_exit_stops_the_running_ones():
    r = Run("run", "-m", "emu.examples.multi_kthread", "period=1", "lifetime=60")
    try:
        for _ in range(4):
            r.expect(r"still running\.\.\.! 0 secs\.$")
        r.proc.send_signal(signal.SIGTERM)
        status, rest, err = r.finish()
    finally:
        r.kill()
    assert status == 0, err
    exits = sorted(line.split("] ")[1] for line in rest if "by module exit" in line)
    assert exits == [f"my_kthread_{n} stopped by module exit" for n in range(4)]


# --- in-process pieces ---------------------------------------------------------------------------

def test_module_param_checks_its_arguments():
    with pytest.raises(ValueError, match="name must be a parameter name"):
        emu.module_param("a b", 1)
    with pytest.raises(TypeError, match="default must be a bool, int, float or str"):
        emu.module_param("a", [1])
    with pytest.raises(TypeError, match="fn must be a function"):
        emu.module_init(3)

