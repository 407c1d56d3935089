"""A module with four kthreads, ``my_kthread_0`` .. ``my_kthread_3``: each says it is
still running every 5 seconds and returns after 25 seconds; the module's exit stops the
ones still running. Run it with ``emu run -m emu.examples.multi_kthread`` (``period=1
lifetime=3`` for a shorter run).

A port of the usual C example::

    #define NR_THREADS 4
    static struct task_struct *threads[NR_THREADS];

    static int thread_fn(void *data)
    {
            int n = (long)data, secs = 0;

            while (!kthread_should_stop() && secs < 25) {
                    pr_info("Thread %d is still running...! %d secs.\\n", n, secs);
                    ssleep(5);
                    secs += 5;
            }
            pr_info("Thread %d stopped.\\n", n);
            threads_done[n] = 1;
            return 0;
    }

    static int __init my_init(void)
    {
            for (long i = 0; i < NR_THREADS; i++) {
                    threads[i] = kthread_run(thread_fn, (void *)i, "my_kthread_%ld", i);
                    get_task_struct(threads[i]);
            }
            return 0;
    }

    static void __exit my_exit(void)
    {
            for (int i = 0; i < NR_THREADS; i++) {
                    if (!threads_done[i])
                            kthread_stop(threads[i]);
                    put_task_struct(threads[i]);
            }
    }

``ssleep()`` is uninterruptible, so a stop waits for the thread's current sleep to end,
as in the kernel. In emu a kthread's slot is released by ``kthread_stop()``, which
returns at once for a thread that already returned: the exit stops every thread and
says which ones were still running.
"""

from __future__ import annotations

import emu

NR_THREADS = 4
period = emu.module_param("period", 5, "seconds between messages")
lifetime = emu.module_param("lifetime", 25, "seconds before a thread returns")

_threads: list[emu.Task] = []
_done: list[emu.Atomic] = []


def thread_fn(n: int) -> int:
    secs = 0
    while not emu.kthread_should_stop() and secs < lifetime:
        emu.pr_info("Thread %d is still running...! %d secs.", n, secs)
        emu.ssleep(period)
        secs += period
    emu.pr_info("Thread %d stopped.", n)
    emu.atomic_set(_done[n], 1)
    return 0


@emu.module_init
def my_init() -> int:
    _done.extend(emu.Atomic(0) for _ in range(NR_THREADS))
    for n in range(NR_THREADS):
        _threads.append(emu.kthread_run(thread_fn, n, "my_kthread_%d", n))
    return 0


@emu.module_exit
def my_exit() -> None:
    for n, task in enumerate(_threads):
        running = not emu.atomic_read(_done[n])
        emu.kthread_stop(task)
        if running:
            emu.pr_info("my_kthread_%d stopped by module exit", n)
    _threads.clear()
    _done.clear()
