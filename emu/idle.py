"""The idle tasks (kernel/sched/idle.c): they take a CPU's interrupts and softirqs while
no other task runs there. Created on the first request_irq() or tasklet, one per real
CPU, each serving every emulated CPU mapped onto its real CPU.
"""

from __future__ import annotations

import time

from . import image, records
from .constants import PF_IDLE
from .irqchip import become_idle, do_IRQ, resend_pending
from .kthread import kthread_create_on_cpu, kthread_should_stop
from .sched import schedule_timeout_idle
from .task import wake_up_process

#: The idle task's sleep in jiffies (decades): it ends with an interrupt or a wake-up.
IDLE_SLEEP_JIFFIES = 1 << 40


def _idle(home: int) -> int:
    """The idle task of a real CPU: it takes the interrupts and softirqs of each emulated
    CPU on it while no task runs there (irqchip.become_idle())."""
    become_idle(home)
    do_IRQ()  # CPUs that rang before it served the list
    while not kthread_should_stop():
        schedule_timeout_idle(IDLE_SLEEP_JIFFIES)
    return 0


IRQ_LAYER_STARTING = 1
IRQ_LAYER_READY = 2


def start_irq_layer() -> None:
    """Create the idle tasks on the first request_irq() or tasklet (idempotent, any task).

    One idle task per real CPU serves every emulated CPU mapped onto it: it is created
    on the first of them (its home, named swapper/<home>) and takes the interrupts and
    softirqs of each while no task runs there, as that CPU. So a thousand emulated CPUs
    on two real ones cost two processes.
    """
    img = image.this()
    hdr = img.img.hdr
    if records.field_cmpxchg(hdr, "irq_ready", 0, IRQ_LAYER_STARTING) != 0:
        # another task is creating them
        while records.field_load(hdr, "irq_ready") != IRQ_LAYER_READY:
            img.core.raise_if_dead()
            time.sleep(0.001)
        return
    homes = idle_homes(img.cpu_map)
    slots = {home: kthread_create_on_cpu(_idle, home, home, "swapper/%u")
             for home in sorted(set(homes))}
    for t in slots.values():
        records.field_or(t._rec, "flags", PF_IDLE)
    image.percpu_fill(img.img, "idle_slot", [slots[home].slot for home in homes])
    for t in slots.values():
        wake_up_process(t)
    for cpu in range(hdr.ncpus):
        resend_pending(cpu)  # raised while `cpu` had no target: nobody was rung
    records.field_store(hdr, "irq_ready", IRQ_LAYER_READY)


def idle_homes(cpu_map: list[int]) -> list[int]:
    """For each emulated CPU, the home of its idle task: the first emulated CPU on the
    same real CPU."""
    first: dict[int, int] = {}
    return [first.setdefault(real, cpu) for cpu, real in enumerate(cpu_map)]
