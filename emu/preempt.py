"""Execution contexts: preempt_count, IRQ and BH disabling, might_sleep (include/linux/preempt.h).

The context word itself (preempt_count, interrupts on/off, mirrored into the task slot)
is irqflags.py, below the locks; this module adds what checks and reports on it: the
preempt_count underflow WARN, bottom halves, might_sleep() and "scheduling while atomic".
Its names are the ones the rest of emu uses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from . import bug, irqflags
from .irqflags import (
    HARDIRQ_MASK,
    HARDIRQ_OFFSET,
    NMI_MASK,
    NMI_OFFSET,
    PREEMPT_MASK,
    PREEMPT_OFFSET,
    SOFTIRQ_DISABLE_OFFSET,
    SOFTIRQ_MASK,
    SOFTIRQ_OFFSET,
    IrqSaved,
    attach,
    current_pid_comm,
    in_atomic,
    in_hardirq,
    in_interrupt,
    in_irq,
    in_nmi,
    in_serving_softirq,
    in_softirq,
    in_task,
    irq_enable_hooks,
    irq_enter,
    irq_exit,
    irqs_disabled,
    irqs_off_raw,
    local_irq_disable,
    local_irq_enable,
    local_irq_restore,
    local_irq_save,
    preempt_count,
    preemptible,
    softirq_enter,
    this_cpu,
)
from .irqflags import __preempt_count_add as preempt_count_add

__all__ = [
    "HARDIRQ_MASK", "HARDIRQ_OFFSET", "NMI_MASK", "NMI_OFFSET", "PREEMPT_MASK",
    "PREEMPT_OFFSET", "SOFTIRQ_DISABLE_OFFSET", "SOFTIRQ_MASK", "SOFTIRQ_OFFSET",
    "IrqSaved", "attach", "bh_enable_hooks", "current_pid_comm", "in_atomic", "in_hardirq",
    "in_interrupt",
    "in_irq", "in_nmi", "in_serving_softirq", "in_softirq", "in_task", "irq_enable_hooks",
    "irq_enter", "irq_exit", "irqs_disabled", "irqs_off_raw", "local_bh_disable",
    "local_bh_enable", "local_irq_disable", "local_irq_enable", "local_irq_restore",
    "local_irq_save", "might_sleep", "preempt_count", "preempt_count_add",
    "preempt_count_sub", "preempt_disable", "preempt_enable", "preemptible", "reset",
    "schedule_debug", "softirq_enter", "this_cpu",
]

_last_resched_splat = 0
#: Called by local_bh_enable() (pending softirqs run there).
bh_enable_hooks: list[Callable[[], None]] = []


def preempt_count_sub(n: int) -> None:
    """Subtract `n` from preempt_count; an underflow is a WARN and stops at 0."""
    count = irqflags._count
    if count < n:
        bug.warn(f"preempt_count underflow: {count:#x} - {n:#x}", depth=2)
        n = count
    irqflags.__preempt_count_sub(n)


def preempt_disable() -> None:
    """Make this task atomic until the matching preempt_enable() (nests). Any context."""
    preempt_count_add(PREEMPT_OFFSET)


def preempt_enable() -> None:
    """Undo one preempt_disable(); an unbalanced one is a WARN. Any context."""
    preempt_count_sub(PREEMPT_OFFSET)


def local_bh_disable() -> None:
    """Keep softirqs and tasklets off this CPU until local_bh_enable()."""
    preempt_count_add(SOFTIRQ_DISABLE_OFFSET)


def local_bh_enable() -> None:
    """Allow softirqs again and run the pending ones (outside interrupt context)."""
    preempt_count_sub(SOFTIRQ_DISABLE_OFFSET)
    for hook in bh_enable_hooks:
        hook()


def might_sleep(depth: int = 1) -> None:
    """__might_sleep(): report a sleeping call from atomic or IRQs-off context.

    The reported FILE:LINE is the caller's (the sleeping primitive), as in the kernel.
    Reports are rate-limited to one per second per task, like __might_resched().
    """
    global _last_resched_splat
    count, irqs_off = irqflags._count, irqflags._irqs_off
    if count == 0 and not irqs_off:
        return
    now = time.monotonic_ns()
    if _last_resched_splat and now - _last_resched_splat < 1_000_000_000:
        return
    _last_resched_splat = now
    pid, name = current_pid_comm()
    frame = bug._caller(depth)
    bug.bug_splat(
        f"BUG: sleeping function called from invalid context at {bug._where(frame)}",
        [
            f"in_atomic(): {int(count != 0)}, irqs_disabled(): {int(irqs_off)}, "
            f"non_block: 0, pid: {pid}, name: {name}",
            f"preempt_count: {count:x}, expected: 0",
        ],
        depth=depth + 1,
    )


def schedule_debug() -> None:
    """__schedule_bug(): "scheduling while atomic" when a task really blocks in atomic context."""
    count = irqflags._count
    if count == 0:
        return
    pid, comm = current_pid_comm()
    bug.bug_splat(
        f"BUG: scheduling while atomic: {comm}/{pid}/0x{count + PREEMPT_OFFSET:08x}", [],
        depth=2,
    )
    if in_interrupt():
        # Blocking here would stall the interrupted task for good: end the handler,
        # which is reported as an Oops in interrupt context.
        raise bug.TaskKilled()


def reset() -> None:
    """A fresh task context: preemptible, interrupts on, not attached to a slot."""
    global _last_resched_splat
    irqflags.reset()
    _last_resched_splat = 0


def _after_fork_in_child() -> None:
    global _last_resched_splat
    _last_resched_splat = 0


os.register_at_fork(after_in_child=_after_fork_in_child)
