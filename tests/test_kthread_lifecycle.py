"""kthread life cycle as the host OS shows it (spec §2.1, §2.4): a kthread has its name
when kthread_create() returns, and its exit is told from a death outside emu."""

from __future__ import annotations

import os
from types import SimpleNamespace

import psutil
import pytest

import emu
from emu import supervisor

from util import wait_state

#: Creations checked one after another: the name used to be set late, a race.
CREATIONS = 50


def idle_until_stopped(data):
    while not emu.kthread_should_stop():
        emu.schedule_timeout_interruptible(emu.MAX_SCHEDULE_TIMEOUT)
    return 0


def os_comm(pid: int) -> bytes:
    with open(f"/proc/{pid}/comm", "rb") as f:
        return f.read().rstrip(b"\n")


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


# --- the death watch -------------------------------------------------------------------------

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
    watch = supervisor.Supervisor.__new__(supervisor.Supervisor)
    watch.hdr = kernel._img.img.hdr
    watch.ask_to_reap = lambda: None
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
