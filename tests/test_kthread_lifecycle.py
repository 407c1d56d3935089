"""kthread life cycle as the host OS shows it (spec §2.1, §2.4): a kthread has its name
when kthread_create() returns, its process is reaped as soon as it exits, and its exit is
told from a death outside emu."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from types import SimpleNamespace

import psutil
import pytest

import emu
from emu import supervisor

from util import stop_after_exit, wait_state, wait_until

#: Creations checked one after another: the name used to be set late, a race.
CREATIONS = 50


def idle_until_stopped(data):
    while not emu.kthread_should_stop():
        emu.schedule_timeout_interruptible(emu.MAX_SCHEDULE_TIMEOUT)
    return 0


def os_comm(pid: int) -> bytes:
    with open(f"/proc/{pid}/comm", "rb") as f:
        return f.read().rstrip(b"\n")


def reaped(pid: int) -> bool:
    """The process is gone from the process table: not running, not a zombie."""
    return not psutil.pid_exists(pid)


def wait_reaped(pid: int, what: str) -> None:
    # Polls the process table only: no emu call that could reap on the side.
    wait_until(lambda: reaped(pid), what=f"{what} (pid {pid}) to be reaped")


# --- the name ------------------------------------------------------------------------------

@pytest.mark.parametrize("create", [emu.kthread_create, emu.kthread_run],
                         ids=["kthread_create", "kthread_run"])
def test_the_os_shows_the_name_when_creation_returns(kernel, create):
    for i in range(CREATIONS):
        t = create(idle_until_stopped, None, "born/%d", i)
        assert psutil.Process(t.pid).name() == t.comm == f"born/{i}"
        assert emu.kthread_stop(t) in (0, -emu.EINTR)  # -EINTR: stopped before it ran


def test_the_os_comm_is_cut_on_a_utf8_boundary(kernel):
    t = emu.kthread_create(idle_until_stopped, None, "añandú-%s", "ñandú")  # 16 bytes
    assert t.full_name == "añandú-ñandú"
    assert os_comm(t.pid) == t.comm.encode() == "añandú-ñand".encode()  # not half a ú
    assert emu.kthread_stop(t) == -emu.EINTR


def test_the_creator_keeps_its_own_name(kernel):
    before = os_comm(os.getpid())
    t = emu.kthread_create(idle_until_stopped, None, "notmine")
    assert os_comm(os.getpid()) == before
    assert emu.current().comm == before.decode()
    assert emu.kthread_stop(t) == -emu.EINTR


# --- reaping -------------------------------------------------------------------------------

def test_an_exited_kthread_is_reaped_while_its_creator_does_nothing(kernel):
    t = emu.kthread_run(lambda d: 17, None, "shortlived")
    wait_reaped(t.pid, "a kthread whose threadfn returned")
    assert emu.task_state_to_char(t) == "X"  # the task stays until kthread_stop()
    assert emu.kthread_stop(t) == 17


def test_a_kthread_that_exits_with_kthread_exit_is_reaped_too(kernel):
    ts = [emu.kthread_run(lambda d: emu.kthread_exit(d), i, "exit%d", i) for i in range(5)]
    for t in ts:
        wait_reaped(t.pid, t.comm)
    assert [emu.kthread_stop(t) for t in ts] == list(range(5))


@pytest.mark.emu_expect(oopses=1)
def test_a_kthread_killed_outside_emu_is_reaped_too(kernel):
    t = emu.kthread_run(idle_until_stopped, None, "victim")
    wait_state(t, "S")
    os.kill(t.pid, signal.SIGKILL)
    wait_reaped(t.pid, "a kthread killed by SIGKILL")
    assert emu.kthread_stop(t) == 0  # as after an Oops


def test_a_kthread_created_by_a_kthread_is_reaped(kernel):
    child_pid = emu.Atomic(0)
    go = emu.Completion()

    def parent(data):
        child = emu.kthread_run(lambda d: 23, None, "grandchild")
        emu.atomic_set(child_pid, child.pid)
        emu.wait_for_completion(go)
        return emu.kthread_stop(child)

    t = emu.kthread_run(parent, None, "parent")
    wait_until(lambda: emu.atomic_read(child_pid), what="the child kthread")
    wait_reaped(emu.atomic_read(child_pid), "the kthread's child")
    emu.complete(go)
    assert stop_after_exit(t) == 23


def test_other_children_of_the_booting_process_are_left_alone(kernel):
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    try:
        wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE,
                   what="the subprocess to exit")
        t = emu.kthread_run(lambda d: 5, None, "sibling")
        wait_reaped(t.pid, "the kthread")
        assert psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
        assert emu.kthread_stop(t) == 5
        assert psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
    finally:
        assert proc.wait(timeout=5) == 7


# --- the death watch -------------------------------------------------------------------------

def death_watch(kernel, ask_to_reap):
    """A second death watch over the kernel's tasks, run step by step by the test."""
    watch = supervisor.Supervisor.__new__(supervisor.Supervisor)
    watch.img, watch.hdr = kernel._img, kernel._img.img.hdr
    watch.poller, watch.watched, watch.by_slot, watch.dead = select.poll(), {}, {}, {}
    watch.ask_to_reap = ask_to_reap
    return watch


def test_a_death_is_handled_once(kernel):
    """The slot of an exited kthread lives on until kthread_stop(): the death watch does
    not take it up again and again (and ask its creator to reap it each time)."""
    asked = []
    watch = death_watch(kernel, asked.append)
    t = emu.kthread_run(lambda d: 2, None, "once")
    wait_reaped(t.pid, "the kthread")
    for _ in range(3):
        watch.watch_new_tasks()
        for fd, _ in watch.poller.poll(0):
            watch.task_died(fd)
    assert asked == [os.getpid()]
    assert emu.kthread_stop(t) == 2


class SlotReusedMidway:
    """A task slot as the supervisor reads it, released by kthread_stop() and reused by
    the next kthread_create() right after its `reads`-th field read."""

    def __init__(self, rec, reads, reuse):
        self.rec, self.left, self.reuse = rec, reads, reuse

    def __getattr__(self, name):
        self.left -= 1
        if self.left == 0:
            self.reuse()
        return getattr(self.rec, name)


def test_the_death_watch_does_not_mistake_a_reused_slot_for_a_death(kernel, monkeypatch):
    """A kthread that exited through emu may be released and its slot reused while the
    supervisor looks at its death: the new task must not be reported nor ended."""
    notified = []
    monkeypatch.setattr(supervisor, "exit_notify", lambda rec, result: notified.append(rec))
    watch = death_watch(kernel, lambda ppid: None)
    for reads in range(1, 10):
        a = emu.kthread_run(lambda d: 1, None, "old")
        wait_state(a, "X")
        reused = []

        def reuse(a=a, reused=reused):
            assert emu.kthread_stop(a) == 1
            reused.append(emu.kthread_create(idle_until_stopped, None, "new"))
            assert reused[0].slot == a.slot

        rec = SlotReusedMidway(kernel._img.img.tasks[a.slot], reads, reuse)
        watch.img = SimpleNamespace(img=SimpleNamespace(tasks={a.slot: rec}))
        watch.reap(a.slot, a.generation, a.pid)
        assert (notified, kernel.oopses) == ([], 0), f"reused after read {reads}"
        if not reused:
            reuse()
        assert emu.kthread_stop(reused[0]) == -emu.EINTR
