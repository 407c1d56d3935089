"""The classic kthread module: init starts a kthread that logs once a second until
kthread_should_stop(); exit stops it. (emu's kthread_run() raises instead of returning
an ERR_PTR, so the init has no error path.) Run it with ``emu run -m emu.examples.hello_kthread``
(``period_ms=200`` ticks faster).

The C original::

    static struct task_struct *task;

    static int hello_fn(void *data)
    {
            int n = 0;
            while (!kthread_should_stop()) {
                    pr_info("hello: tick %d on CPU %d\\n", n++, smp_processor_id());
                    msleep_interruptible(period_ms);
            }
            return n;
    }

    static int __init hello_init(void)
    {
            task = kthread_run(hello_fn, NULL, "hello/%d", 0);
            if (IS_ERR(task))
                    return PTR_ERR(task);
            pr_info("hello: module loaded, started [%s] pid %d\n", task->comm, task->pid);
            return 0;
    }

    static void __exit hello_exit(void)
    {
            pr_info("hello: module unloaded, kthread returned %d\\n", kthread_stop(task));
    }

    module_init(hello_init);
    module_exit(hello_exit);
"""

from __future__ import annotations

from typing import Any

import emu

period_ms = emu.module_param("period_ms", 1000, "milliseconds between ticks")

_task: emu.Task | None = None


def hello_fn(data: Any) -> int:
    n = 0
    while not emu.kthread_should_stop():
        emu.pr_info("hello: tick %d on CPU %d", n, emu.current().cpu)
        n += 1
        emu.msleep_interruptible(data["period_ms"])
    emu.pr_info("hello: stopping after %d ticks", n)
    return n


@emu.module_init
def hello_init() -> int:
    """module_init: start the kthread; 0 on success, as init functions return."""
    global _task
    _task = emu.kthread_run(hello_fn, {"period_ms": period_ms}, "hello/%d", 0)
    emu.pr_info("hello: module loaded, started [%s] pid %d", _task.comm, _task.pid)
    return 0


@emu.module_exit
def hello_exit() -> None:
    """module_exit: stop the kthread and log its result (the tick count)."""
    global _task
    assert _task is not None, "hello_exit() without hello_init()"
    emu.pr_info("hello: module unloaded, kthread returned %d", emu.kthread_stop(_task))
    _task = None
