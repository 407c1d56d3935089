"""The idle tasks (kernel/sched/idle.c): they take a CPU's interrupts and softirqs while
no other task runs there, and they are the clock event devices (NO_HZ idle): an idle
task sleeps until the next timer of the CPUs it serves is due, then runs it.

An emulated CPU nothing runs on costs no process. Idle tasks are shared: at most one
per real CPU, serving each emulated CPU mapped onto that real CPU, as that CPU
(irqchip.py). The first request_irq(), tasklet or timer creates the first one, on CPU 0's real
CPU, and it serves every CPU at first; a real CPU gets its own when an interrupt is
routed to one of its CPUs (idle_for()). So a thousand emulated CPUs on two real ones
cost at most two processes, and a big machine only as many as it routes interrupts to.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from . import image, preempt, records
from .constants import PF_IDLE, TASK_IDLE, TASK_RUNNING
from .errors import CapacityError
from .irqchip import do_IRQ, resend_pending
from .kthread import kthread_create_on_cpu, kthread_should_stop
from .sched import schedule_timeout_idle
from .task import Task, current, set_current_state, sleep, wake_up_process
from .wait import wait_var_event, wake_up_var

#: The idle task's sleep in jiffies (decades): it ends with an interrupt or a wake-up.
IDLE_SLEEP_JIFFIES = 1 << 40

# hdr.irq_ready and a home CPU's PerCpu.idle_state
IRQ_LAYER_STARTING = 1
IRQ_LAYER_READY = 2


#: The CPUs' clock event, set by timer.py: (when a CPU's next timer is due in
#: CLOCK_MONOTONIC ns, for its idle task to sleep until then; run what is due on a CPU).
clock_event: tuple[Callable[[int], int | None], Callable[[int], None]] | None = None


def _idle(home: int) -> int:
    """An idle task: it takes the interrupts and softirqs of each CPU it serves while no
    task runs there (irqchip.do_IRQ()), and wakes for their next timer (tick_nohz_idle:
    the earliest timer is its wake-up time)."""
    do_IRQ()  # CPUs that rang before it could serve them
    me = current().slot
    while not kthread_should_stop():
        if clock_event is None:
            schedule_timeout_idle(IDLE_SLEEP_JIFFIES)
            continue
        next_event, expire = clock_event
        set_current_state(TASK_IDLE)  # before reading: an earlier arming then wakes us
        served = _served(me)
        due = [t for t in map(next_event, served) if t is not None]
        if not sleep(min(due) if due else None):
            for cpu in served:
                expire(cpu)
        set_current_state(TASK_RUNNING)
    return 0


def _served(slot: int) -> list[int]:
    """The CPUs whose interrupts, softirqs and timers the idle task in `slot` takes."""
    percpu = image.this().img.percpu
    return [c for c in range(len(percpu)) if percpu[c].idle_slot == slot]


def _create_idle(home: int) -> Task:
    t = kthread_create_on_cpu(_idle, home, home, "swapper/%u")
    records.field_or(t._rec, "flags", PF_IDLE)  # before any doorbell can find it
    return t


def _wait_ready(rec: ctypes.Structure, field: str) -> None:
    """Another task is creating an idle task: wait until it is there or failed."""
    wait_var_event(image.field_addr(rec, field),
                   lambda: records.field_load(rec, field) != IRQ_LAYER_STARTING)


def _set_state(rec: ctypes.Structure, field: str, state: int) -> None:
    records.field_store(rec, field, state)
    wake_up_var(image.field_addr(rec, field))  # _wait_ready()


def start_irq_layer() -> None:
    """Create the first idle task on the first request_irq() or tasklet (idempotent,
    any task): the idle task of CPU 0's real CPU, serving every CPU until their real CPU
    gets its own (idle_for())."""
    img = image.this()
    hdr = img.img.hdr
    if records.field_load(hdr, "irq_ready") == IRQ_LAYER_READY:
        return
    if records.field_cmpxchg(hdr, "irq_ready", 0, IRQ_LAYER_STARTING) != 0:
        _wait_ready(hdr, "irq_ready")
        return
    try:
        t = _create_idle(0)
    except BaseException:
        _set_state(hdr, "irq_ready", 0)  # the next request_irq() tries again
        raise
    image.percpu_fill(img.img, "idle_slot", t.slot)
    image.percpu_fill(img.img, "idle_home", 0)
    _set_state(img.img.percpu[0], "idle_state", IRQ_LAYER_READY)
    wake_up_process(t)
    for cpu in range(hdr.ncpus):
        resend_pending(cpu)  # raised while `cpu` had no target: nobody was rung
    _set_state(hdr, "irq_ready", IRQ_LAYER_READY)


def idle_home(cpu: int) -> int:
    """The home of the idle task of `cpu`'s real CPU: its first emulated CPU."""
    cpu_map = image.this().cpu_map
    return cpu_map.index(cpu_map[cpu])


def idle_for(cpu: int) -> None:
    """Give the real CPU of emulated CPU `cpu` its own idle task, if it has none yet.

    request_irq() and irq_set_affinity() call it for the CPU an interrupt is routed to.
    It creates a kthread, so only in preemptible process context, and only while a task
    slot is free; elsewhere (and until then) the first idle task serves `cpu`, from CPU
    0's real CPU.
    """
    if not preempt.preemptible():
        return
    start_irq_layer()
    img = image.this()
    home = idle_home(cpu)
    pc = img.img.percpu[home]
    if records.field_load(pc, "idle_state") == IRQ_LAYER_READY:
        return
    if records.field_cmpxchg(pc, "idle_state", 0, IRQ_LAYER_STARTING) != 0:
        _wait_ready(pc, "idle_state")
        return
    try:
        t = _create_idle(home)
    except CapacityError:  # no task slot left: the first idle task goes on serving it
        _set_state(pc, "idle_state", 0)
        return
    except BaseException:
        _set_state(pc, "idle_state", 0)
        raise
    # Its own slot first: IrqCore finds a CPU's idle task through the home's idle_slot.
    records.field_store(pc, "idle_slot", t.slot)
    cpu_map = img.cpu_map
    for c, real in enumerate(cpu_map):
        if real == cpu_map[home]:
            records.field_store(img.img.percpu[c], "idle_slot", t.slot)
            records.field_store(img.img.percpu[c], "idle_home", home)
    _set_state(pc, "idle_state", IRQ_LAYER_READY)
    wake_up_process(t)
