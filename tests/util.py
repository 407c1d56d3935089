"""Helpers shared by the tests: bounded waits on observable conditions (never blind sleeps)."""

from __future__ import annotations

import time
from collections.abc import Callable

import emu


def wait_until(pred: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll `pred` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.001)


def wait_state(task: emu.Task, letter: str, timeout: float = 5.0) -> None:
    """Wait until `task` shows the ps state `letter` (it has gone to sleep, parked, ...)."""
    wait_until(lambda: emu.task_state_to_char(task) == letter, timeout,
               f"{task.comm} to reach state {letter} (it is {emu.task_state_to_char(task)})")


def stop_after_exit(task: emu.Task, timeout: float = 5.0) -> int:
    """kthread_stop() once `task` has returned from threadfn by itself.

    Stopping right after kthread_run() may win the race with the first wake-up and
    return -EINTR, exactly as in the kernel; tests of results wait for the exit first.
    """
    wait_state(task, "X", timeout)
    return emu.kthread_stop(task)


def start_lock_holder(lock_addr: int, name: str = "holder") -> emu.Task:
    """A kthread that takes the raw lock at `lock_addr` and then spins forever (until
    the test kills it); returns once the lock is held."""
    import os

    import _emu_native as _native

    held = emu.Completion()

    def hold(_: object) -> int:
        assert _native.lock(lock_addr, os.getpid(), 0, -1) == 0
        emu.complete(held)
        while True:
            pass

    t = emu.kthread_run(hold, None, name)
    emu.wait_for_completion(held)
    return t


def gated(started, gate, runs=None):
    """A work function that says it started, then waits for the test to open `gate`."""
    def fn(work):
        emu.complete(started)
        emu.wait_for_completion(gate)
        if runs is not None:
            emu.atomic_inc(runs)
    return fn
