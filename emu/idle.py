"""The per-CPU idle tasks (kernel/sched/idle.c): each takes its CPU's interrupts and
softirqs while no other task runs there, and is its CPU's clock event device (NO_HZ
idle): it sleeps until the CPU's next timer is due, then runs it. Created on the first
request_irq(), tasklet or timer.
"""

from __future__ import annotations

from collections.abc import Callable

from . import image, records
from .constants import PF_IDLE, TASK_IDLE, TASK_RUNNING
from .irqchip import resend_pending
from .kthread import kthread_create_on_cpu, kthread_should_stop
from .sched import schedule_timeout_idle
from .task import set_current_state, sleep, wake_up_process
from .wait import wait_var_event, wake_up_var

#: The idle task's sleep in jiffies (decades): it ends with an interrupt or a wake-up.
IDLE_SLEEP_JIFFIES = 1 << 40


#: The CPU's clock event, set by timer.py: (when its next timer is due in CLOCK_MONOTONIC
#: ns, for the idle task to sleep until then; run what is due).
clock_event: tuple[Callable[[int], int | None], Callable[[int], None]] | None = None


def _idle(cpu: int) -> int:
    """A CPU's idle task: it takes the CPU's interrupts while no task runs there, and
    wakes for the CPU's next timer (tick_nohz_idle: the timer is its wake-up time)."""
    while not kthread_should_stop():
        if clock_event is None:
            schedule_timeout_idle(IDLE_SLEEP_JIFFIES)
            continue
        next_event, expire = clock_event
        set_current_state(TASK_IDLE)  # before reading: an earlier arming then wakes us
        if not sleep(next_event(cpu)):
            expire(cpu)
        set_current_state(TASK_RUNNING)
    return 0


IRQ_LAYER_STARTING = 1
IRQ_LAYER_READY = 2


def start_irq_layer() -> None:
    """Create the per-CPU idle tasks on the first request_irq() (idempotent, any task)."""
    img = image.this()
    hdr = img.img.hdr
    if records.field_cmpxchg(hdr, "irq_ready", 0, IRQ_LAYER_STARTING) != 0:
        # another task is creating them
        wait_var_event(image.field_addr(hdr, "irq_ready"),
                       lambda: records.field_load(hdr, "irq_ready") == IRQ_LAYER_READY)
        return
    for cpu in range(hdr.ncpus):
        t = kthread_create_on_cpu(_idle, cpu, cpu, "swapper/%u")
        records.field_or(t._rec, "flags", PF_IDLE)
        records.field_store(img.img.percpu[cpu], "idle_slot", t.slot)
        wake_up_process(t)
        resend_pending(cpu)  # raised while `cpu` had no target: nobody was rung
    records.field_store(hdr, "irq_ready", IRQ_LAYER_READY)
    wake_up_var(image.field_addr(hdr, "irq_ready"))
