"""The per-CPU idle tasks (kernel/sched/idle.c): each takes its CPU's interrupts and
softirqs while no other task runs there. Created on the first request_irq() or tasklet.
"""

from __future__ import annotations

from . import image, records
from .constants import PF_IDLE
from .irqchip import resend_pending
from .kthread import kthread_create_on_cpu, kthread_should_stop
from .sched import schedule_timeout_idle
from .task import wake_up_process
from .wait import wait_var_event, wake_up_var

#: The idle task's sleep in jiffies (decades): it ends with an interrupt or a wake-up.
IDLE_SLEEP_JIFFIES = 1 << 40


def _idle(cpu: int) -> int:
    """A CPU's idle task: it takes the CPU's interrupts while no task runs there."""
    while not kthread_should_stop():
        schedule_timeout_idle(IDLE_SLEEP_JIFFIES)
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
