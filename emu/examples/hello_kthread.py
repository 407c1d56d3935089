"""The classic kthread module: init starts a kthread that logs once a second until
kthread_should_stop(); exit stops it.

The C original::

    static int hello_fn(void *data)
    {
            int n = 0;
            while (!kthread_should_stop()) {
                    pr_info("hello: tick %d on CPU %d\\n", n++, smp_processor_id());
                    msleep_interruptible(1000);
            }
            return n;
    }
"""

from __future__ import annotations

from typing import Any

import emu

_task: emu.Task | None = None


def hello_fn(data: Any) -> int:
    n = 0
    while not emu.kthread_should_stop():
        emu.pr_info("hello: tick %d on CPU %d", n, emu.current().cpu)
        n += 1
        emu.msleep_interruptible(data["period_ms"])
    emu.pr_info("hello: stopping after %d ticks", n)
    return n


def hello_init(period_ms: int = 1000) -> int:
    """module_init: start the kthread; 0 on success, as init functions return."""
    global _task
    _task = emu.kthread_run(hello_fn, {"period_ms": period_ms}, "hello/%d", 0)
    emu.pr_info("hello: module loaded, started [%s] pid %d", _task.comm, _task.pid)
    return 0


def hello_exit() -> int:
    """module_exit: stop the kthread; returns its result (the tick count)."""
    global _task
    assert _task is not None, "hello_exit() without hello_init()"
    ticks = emu.kthread_stop(_task)
    emu.pr_info("hello: module unloaded, kthread returned %d", ticks)
    _task = None
    return ticks
