"""kthread life cycle as the host OS shows it (spec §2.1): a kthread has its name when
kthread_create() returns."""

from __future__ import annotations

import os

import psutil
import pytest

import emu

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
