"""Inspecting a running kernel from another process: `emu kernels`, `emu ps` (WCHAN),
`emu dmesg [-w]`, `emu top`; kernel.ps() and kernel.waiters() in the booting process.

The kernels are booted by other processes than the inspecting one; every command names
its kernel with --kernel (other kernels may be running on the machine)."""

from __future__ import annotations

import collections
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from rich.console import Console

import _emu_native as _native
import emu
from emu import attach, top

from util import wait_until

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0

#: Booted in a subprocess: kthreads in known sleeps, an interrupt source, then commands on
#: stdin ("log TEXT", "quit"). Prints READY and the kthread pids once all are asleep.
BOOTER = r'''
import os, sys, time
import emu

def waiter(c):
    emu.wait_for_completion(c)
    return 0

def sleeper(_):
    while not emu.kthread_should_stop():
        emu.msleep_interruptible(100)
    return 0

def idler(_):
    while True:
        emu.set_current_state(emu.TASK_INTERRUPTIBLE)  # before the checks: no lost wake-up
        if emu.kthread_should_stop():
            break
        if emu.kthread_should_park():
            emu.set_current_state(emu.TASK_RUNNING)
            emu.kthread_parkme()
        else:
            emu.schedule_timeout(emu.MAX_SCHEDULE_TIMEOUT)
    emu.set_current_state(emu.TASK_RUNNING)
    return 0

with emu.boot(cpus=2) as kernel:
    c = emu.Completion()  # BOOTER-COMPLETION
    ts = [emu.kthread_run(waiter, c, "cwait"), emu.kthread_run(sleeper, None, "msl"),
          emu.kthread_run(idler, None, "idl"), emu.kthread_run(idler, None, "prk"),
          emu.kthread_create(idler, None, "fresh")]
    emu.kthread_park(ts[3])
    emu.request_irq(5, lambda irq, dev: emu.IRQ_HANDLED, 0, "tick", None)
    kernel.add_irq_source(5, rate_hz=200, count=-1)
    while len(kernel.waiters(c)) != 1 or emu.task_state_to_char(ts[2]) != "S":
        time.sleep(0.005)
    emu.pr_info("booter: ready")
    print("READY", " ".join(str(t.pid) for t in ts), flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "log":
            emu.pr_info("%s", arg)
        elif cmd == "quit":
            break
    emu.complete_all(c)
    emu.kthread_unpark(ts[3])
    for t in ts:
        emu.kthread_stop(t)
    emu.free_irq(5, None)
'''
BOOTER_LINE = next(i for i, line in enumerate(BOOTER.splitlines(), 1)
                   if "BOOTER-COMPLETION" in line)


class Booter:
    """A kernel booted by another process (see BOOTER)."""

    def __init__(self, user: list[str] | None = None) -> None:
        self.proc = subprocess.Popen([*(user or []), sys.executable, "-c", BOOTER], cwd="/",
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        try:
            ready_fds, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
            ready = self.proc.stdout.readline().split() if ready_fds else ["(nothing)"]
            assert ready[:1] == ["READY"], f"the booter said {ready}"
        except BaseException:
            self.kill()
            raise
        self.pid = self.proc.pid
        self.kthreads = [int(p) for p in ready[1:]]

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def quit(self) -> int:
        if self.proc.poll() is None:
            self.say("quit")
        return self.proc.wait(TIMEOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def booted():
    b = Booter()
    try:
        yield b
        assert b.quit() == 0
    finally:
        b.kill()


def emu_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "emu", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT)


def rows(ps_output: str) -> dict[str, list[str]]:
    """COMMAND -> [PID, CPU, S, WCHAN] of `emu ps` output."""
    out = {}
    for line in ps_output.splitlines()[1:]:
        m = re.match(r"^\s*(\d+)\s+(\d+) (\S) (.*?)\s+(\S+)$", line)
        assert m, line
        out[m.group(5)] = [m.group(1), m.group(2), m.group(3), m.group(4)]
    return out


# --- emu ps, emu kernels, emu dmesg --------------------------------------------------------------

def test_ps_from_another_process_shows_states_and_wchan(booted):
    res = emu_cmd("ps", "--kernel", str(booted.pid))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].split() == ["PID", "CPU", "S", "WCHAN", "COMMAND"]
    table = rows(res.stdout)
    cwait, msl, idl, prk, fresh = booted.kthreads
    assert table["[cwait]"][0] == str(cwait)
    state, wchan = table["[cwait]"][2:]
    assert state == "D"
    assert re.fullmatch(rf"completion#\d+ \(<string>:{BOOTER_LINE}\)", wchan), wchan
    assert table["[msl]"][0] == str(msl) and table["[msl]"][2] in "SR"
    if table["[msl]"][2] == "S":
        assert table["[msl]"][3] == "msleep"
    assert table["[idl]"][2:] == ["S", "schedule_timeout"]
    assert table["[prk]"][2:] == ["P", "kthread_parkme"]
    assert table["[fresh]"][2:] == ["D", "kthread"]
    assert [r for r in table if not r.startswith("[")] == ["python"]


def test_kernels_lists_the_kernel(booted):
    res = emu_cmd("kernels")
    assert res.returncode == 0, res.stderr
    mine = [line.split() for line in res.stdout.splitlines() if line.split()[0] == str(booted.pid)]
    assert len(mine) == 1
    pid, cpus, uptime, tasks, comm = mine[0]
    assert (cpus, tasks, comm) == ("2", "6", "python") and float(uptime.rstrip("s")) > 0


def test_dmesg_and_dmesg_follow(booted):
    res = emu_cmd("dmesg", "--kernel", str(booted.pid))
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"\[ *\d+\.\d{6}\] booter: ready", res.stdout.splitlines()[-1])
    follow = subprocess.Popen([sys.executable, "-m", "emu", "dmesg", "-w", "--kernel",
                               str(booted.pid)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        while "booter: ready" not in follow.stdout.readline():
            pass
        for i in range(3):
            booted.say(f"log followed {i}")
            assert follow.stdout.readline().rstrip().endswith(f"] followed {i}")
        assert follow.poll() is None
        assert booted.quit() == 0
        assert follow.wait(TIMEOUT) == 0  # it ends with the kernel
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()


def test_errors_name_the_kernel(booted):
    res = emu_cmd("ps", "--kernel", str(os.getpid()))
    assert res.returncode == 1
    assert res.stderr == (f"emu ps: --kernel {os.getpid()}: process {os.getpid()} runs no emu "
                          "kernel (give the pid of the process that booted it: see `emu "
                          "kernels`)\n")
    res = emu_cmd("dmesg", "--kernel", str(booted.kthreads[0]))
    assert res.returncode == 1 and "runs no emu kernel" in res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to boot a kernel as another user")
def test_another_users_kernel_is_refused():
    try:
        b = Booter(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
    except AssertionError as exc:  # e.g. the checkout is not readable by nobody
        pytest.skip(f"user nobody cannot run emu here: {exc}")
    try:
        res = emu_cmd("ps", "--kernel", str(b.pid))
        assert res.returncode == 1
        assert res.stderr == (f"emu ps: --kernel {b.pid}: that kernel belongs to nobody "
                              "(uid 65534), not to you: refused\n")
        assert b.pid not in [k.pid for k in attach.find_kernels()]
        assert b.quit() == 0
    finally:
        b.kill()


def test_nothing_left_after_sigkill_of_the_booting_process():
    b = Booter()
    try:
        assert b.pid in [k.pid for k in attach.find_kernels()]
        os.kill(b.pid, signal.SIGKILL)
        b.proc.wait()
        wait_until(lambda: all(_native.pid_is_dead(p) for p in b.kthreads), 10,
                   "every kthread to die with the kernel")
        wait_until(lambda: b.pid not in [k.pid for k in attach.find_kernels()], 10,
                   "the kernel to be gone from emu kernels")
        assert not [e for e in os.listdir("/dev/shm") if f"emu-{b.pid}-" in e]
        res = emu_cmd("ps", "--kernel", str(b.pid))
        assert res.returncode == 1 and "no process" in res.stderr
    finally:
        b.kill()


# --- emu top -------------------------------------------------------------------------------

def test_top_screen_under_a_pty(booted):
    child = pexpect.spawn(sys.executable, ["-m", "emu", "top", "--kernel", str(booted.pid)],
                          cwd=str(ROOT), dimensions=(40, 120), encoding="utf-8",
                          timeout=TIMEOUT, env={**os.environ, "TERM": "xterm"})
    try:
        child.expect(rf"emu top - kernel {booted.pid} \(python\), up \d+s, 2 CPUs, 6 tasks")
        child.expect("IRQs/s")
        child.expect("cwait")
        child.expect("kthread_parkme")
        child.expect("booter: ready")
        booted.say("log shown in top")
        child.expect("shown in top")  # a later refresh brings new log lines
        child.send("q")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


@pytest.mark.emu_boot(cpus=2)
def test_top_render_counts_rates_and_states(kernel):
    c = emu.Completion()
    t = emu.kthread_run(lambda c: emu.wait_for_completion(c) or 0, c, "topw")
    wait_until(lambda: kernel.waiters(c) == [t], what="topw to queue")
    emu.pr_info("top test line")
    with attach.Attached(attach.find_kernel(os.getpid())) as k:
        prev = top.Sample(0.0, [0] * kernel.ncpus, [0] * kernel.ncpus)
        now = top.Sample(2.0, [100 * (i + 1) for i in range(kernel.ncpus)],
                         [10] * kernel.ncpus)
        console = Console(record=True, width=120, height=40)
        reader = attach.LogReader(k.img)
        log = collections.deque(reader.read() + reader.flush(), 8)
        console.print(top.render(k, prev, now, log, 40))
        screen = console.export_text()
    assert re.search(rf"kernel {os.getpid()} .* 2 tasks: 1 R, 1 D", screen), screen
    assert re.search(r"^\s*0\s+50\s+5\s", screen, re.M) and re.search(r"^\s*1\s+100\s+5\s",
                                                                      screen, re.M), screen
    assert re.search(rf"{t.pid}\s+\d\s+D\s+completion#{c.index} \(tests/test_inspect.py:\d+\)\s+"
                     r"\[topw\]", screen), screen
    assert "top test line" in screen
    emu.complete(c)
    emu.kthread_stop(t)


# --- in the booting process ---------------------------------------------------------------------

def test_waiters_in_wake_up_order(kernel):
    c = emu.Completion()
    ts = []
    for i in range(3):
        ts.append(emu.kthread_run(lambda c: emu.wait_for_completion(c) or 0, c, f"w{i}"))
        wait_until(lambda: len(kernel.waiters(c)) == len(ts), what=f"w{i} to queue")
    assert kernel.waiters(c) == ts
    emu.complete(c)
    wait_until(lambda: kernel.waiters(c) == ts[1:], what="w0 to leave the queue")
    emu.complete_all(c)
    assert kernel.waiters(c) == []
    for t in ts:
        emu.kthread_stop(t)
    with pytest.raises(TypeError, match="x must be an emu.Completion, not int"):
        kernel.waiters(3)


def test_kernel_ps_wchan_of_a_completion_names_where_it_was_created(kernel):
    c = emu.Completion(); line = sys._getframe().f_lineno  # noqa: E702
    t = emu.kthread_run(lambda c: emu.wait_for_completion(c) or 0, c, "psw")
    wait_until(lambda: kernel.waiters(c) == [t], what="psw to queue")
    row = next(r for r in kernel.ps().splitlines() if r.endswith("[psw]"))
    assert row.split()[2:] == ["D", f"completion#{c.index}", f"(tests/test_inspect.py:{line})",
                               "[psw]"]
    emu.complete(c)
    emu.kthread_stop(t)


def test_attached_image_is_read_only(kernel):
    hz = kernel.hz
    with attach.Attached(attach.find_kernel(os.getpid())) as k:
        assert k.uptime >= 0 and k.ps() == kernel.ps().splitlines()
        proc = subprocess.run(  # a write through the mapping faults instead of changing it
            [sys.executable, "-c", "from emu import attach; import os, sys; "
             f"k = attach.Attached(attach.find_kernel({os.getpid()})); k.img.hdr.hz = 1"],
            cwd=ROOT, capture_output=True, timeout=TIMEOUT)
        assert proc.returncode == -signal.SIGSEGV
        assert kernel.hz == hz


def test_a_kernel_shut_down_is_not_found_though_its_mapping_lingers():
    k = emu.boot(cpus=1)
    try:
        assert attach.find_kernel(os.getpid()).pid == os.getpid()
        view = k._img.img.hdr  # a view keeps the mapping (and its descriptor) after shutdown
    finally:
        k.shutdown()
    assert any("/dev/shm/emu-" in os.readlink(f"/proc/self/fd/{fd}")
               for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))
    with pytest.raises(attach.AttachError, match="runs no emu kernel"):
        attach.find_kernel(os.getpid())
    assert os.getpid() not in [ref.pid for ref in attach.find_kernels()]
    del view
