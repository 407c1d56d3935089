"""A periodic timer module: init arms a timer whose callback logs a tick and re-arms it
every period; exit stops it with timer_shutdown_sync(), which also keeps a callback
running at that moment from arming it again.

The C original (the timer example of the Linux Kernel Module Programming Guide, as
ported to timer_setup() and, since v6.2, timer_shutdown_sync())::

    static struct timer_list my_timer;
    static unsigned int ticks;

    static void my_timer_fn(struct timer_list *t)
    {
            pr_info("periodic: tick %u on CPU %d, jiffies %lu\\n", ticks++,
                    smp_processor_id(), jiffies);
            mod_timer(t, jiffies + msecs_to_jiffies(period_ms));
    }

    static int __init periodic_init(void)
    {
            timer_setup(&my_timer, my_timer_fn, 0);
            mod_timer(&my_timer, jiffies + msecs_to_jiffies(period_ms));
            return 0;
    }

    static void __exit periodic_exit(void)
    {
            timer_shutdown_sync(&my_timer);
            pr_info("periodic: stopped after %u ticks\\n", ticks);
    }

`ticks` is shared by every task that runs the callback, so here it is an ``emu.Atomic``
carried as a timer attribute.
"""

from __future__ import annotations

import emu

_timer: emu.TimerList | None = None


def periodic_fn(t: emu.TimerList) -> None:
    n = emu.atomic_inc_return(t.ticks) - 1
    emu.pr_info("periodic: tick %d on CPU %d, jiffies %d", n, emu.this_cpu(), emu.jiffies())
    emu.mod_timer(t, emu.jiffies() + emu.msecs_to_jiffies(t.period_ms))


def periodic_init(period_ms: int = 1000) -> int:
    """module_init: arm the timer; 0 on success, as init functions return."""
    global _timer
    _timer = emu.TimerList(periodic_fn)
    _timer.ticks = emu.Atomic()
    _timer.period_ms = period_ms
    emu.mod_timer(_timer, emu.jiffies() + emu.msecs_to_jiffies(period_ms))
    emu.pr_info("periodic: module loaded, a tick every %d ms", period_ms)
    return 0


def periodic_exit() -> int:
    """module_exit: stop the timer for good; returns the number of ticks."""
    global _timer
    assert _timer is not None, "periodic_exit() without periodic_init()"
    emu.timer_shutdown_sync(_timer)
    ticks = emu.atomic_read(_timer.ticks)
    emu.pr_info("periodic: stopped after %d ticks", ticks)
    _timer = None
    return ticks
