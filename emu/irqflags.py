"""This task's context word: preempt_count and interrupts on/off (include/linux/irqflags.h,
asm/preempt.h), below every lock.

Each task keeps its preempt_count and its interrupts-disabled flag in process memory
(the hot path) and mirrors them into its task-table slot, so other processes and tools
see them. Interrupts are masked by that flag, not by a syscall: delivery code checks it
and replays what arrived meanwhile when interrupts are enabled again (the User-Mode
Linux approach). The checking and reporting half (preempt_count underflow, might_sleep,
scheduling while atomic, bottom halves) is preempt.py, above bug.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import _emu_native as _native

from . import checks, image
from .constants import X86_EFLAGS_IF

PREEMPT_OFFSET = 0x1
SOFTIRQ_OFFSET = 0x100
SOFTIRQ_DISABLE_OFFSET = 0x200
HARDIRQ_OFFSET = 0x10000
NMI_OFFSET = 0x100000
PREEMPT_MASK = 0xFF
SOFTIRQ_MASK = 0xFF00
HARDIRQ_MASK = 0xF0000
NMI_MASK = 0xF00000

_count = 0
_irqs_off = False
_rec: Any = None  # this task's slot, where the state is mirrored
#: Called when interrupts become enabled again (IRQ replay hooks in later layers).
irq_enable_hooks: list[Callable[[], None]] = []


def attach(rec: Any) -> None:
    """Mirror this process's context state into task slot `rec` (None: not a task)."""
    global _rec
    _rec = rec
    _mirror()


def _mirror() -> None:
    if _rec is not None:
        _rec.preempt_count = _count
        _rec.irqs_disabled = int(_irqs_off)


def current_slot() -> Any:
    """This task's task-table slot (None in a process that is not a task)."""
    return _rec


def this_cpu() -> int:
    """smp_processor_id(): the emulated CPU this task runs on."""
    return -1 if _rec is None else int(_rec.cpu)


def current_pid_comm() -> tuple[int, str]:
    """The current task's pid and comm (this process's, "?", outside a task). Any context."""
    if _rec is None:
        return os.getpid(), "?"
    return int(_rec.pid), _rec.comm.decode("utf-8", "replace")


def preempt_count() -> int:
    """This task's preempt_count. Any context."""
    return _count


def __preempt_count_add(n: int) -> None:
    """Add `n` to preempt_count, unchecked (preempt.preempt_count_add())."""
    global _count
    _count += n
    _mirror()


def __preempt_count_sub(n: int) -> None:
    """Subtract `n` from preempt_count, unchecked (preempt.preempt_count_sub() checks)."""
    global _count
    _count -= n
    _mirror()


def in_nmi() -> bool:
    """True in NMI context. Any context."""
    return bool(_count & NMI_MASK)


def in_hardirq() -> bool:
    """True inside a hard interrupt handler."""
    return bool(_count & HARDIRQ_MASK)


in_irq = in_hardirq


def in_serving_softirq() -> bool:
    """True while a softirq or tasklet runs (not merely with BH disabled). Any context."""
    return bool(_count & SOFTIRQ_OFFSET)


def in_softirq() -> bool:
    """Serving a softirq or with bottom halves disabled."""
    return bool(_count & SOFTIRQ_MASK)


def in_interrupt() -> bool:
    """NMI, hardirq, or softirq count non-zero (also true with BH disabled)."""
    return bool(_count & (NMI_MASK | HARDIRQ_MASK | SOFTIRQ_MASK))


def in_task() -> bool:
    """Not NMI, not hardirq, not serving a softirq."""
    return not _count & (NMI_MASK | HARDIRQ_MASK | SOFTIRQ_OFFSET)


def in_atomic() -> bool:
    """True if preempt_count is non-zero: sleeping here is a bug. Any context."""
    return _count != 0


def irqs_disabled() -> bool:
    """True if interrupts are disabled on this CPU. Any context."""
    return _irqs_off


def preemptible() -> bool:
    """True if preempt_count is 0 and interrupts are on. Any context."""
    return _count == 0 and not _irqs_off


def local_irq_disable() -> None:
    """Disable interrupts on this CPU (does not nest)."""
    global _irqs_off
    _irqs_off = True
    _mirror()


def local_irq_enable() -> None:
    """Enable interrupts on this CPU and deliver those that arrived meanwhile."""
    global _irqs_off
    _irqs_off = False
    _mirror()
    for hook in irq_enable_hooks:
        hook()


def irqs_off_raw(off: bool) -> None:
    """Set the interrupts-disabled flag without replaying anything (interrupt entry)."""
    global _irqs_off
    _irqs_off = off
    _mirror()


def local_irq_save() -> int:
    """Disable interrupts; returns the flags to give to local_irq_restore()."""
    flags = 0 if _irqs_off else X86_EFLAGS_IF
    if not _irqs_off:
        local_irq_disable()
    return flags


def local_irq_restore(flags: int) -> None:
    """Restore the interrupt state saved by local_irq_save()."""
    if type(flags) is not int or not 0 <= flags <= checks.ULONG_MAX:
        checks.check_int(flags, "flags", "unsigned long")
    if flags & X86_EFLAGS_IF:
        local_irq_enable()
    else:
        local_irq_disable()


IrqSaved = tuple[int, bool, int]


def _task_state() -> int:
    return -1 if _rec is None else int(_rec.state)


def _enter(offset: int, irqs_off: bool) -> IrqSaved:
    global _count, _irqs_off
    saved = (_count, _irqs_off, _task_state())
    _count += offset
    _irqs_off = irqs_off
    _mirror()
    return saved


def irq_enter() -> IrqSaved:
    """Enter hardirq context (interrupts off); returns what irq_exit() restores."""
    return _enter(HARDIRQ_OFFSET, True)


def irq_exit(saved: IrqSaved) -> None:
    """Leave hardirq (or softirq) context, restoring the interrupted context exactly,
    even if the handler leaked preemption or interrupt state, or died. A task state the
    handler set (a sleeping call it was stopped in) is undone; a wake-up of the
    interrupted task (state now TASK_RUNNING) is kept."""
    global _count, _irqs_off
    _count, _irqs_off, state = saved
    _mirror()
    if _rec is not None and state >= 0:
        now = int(_rec.state)
        if now != state and now != 0:  # 0: TASK_RUNNING, a wake-up
            _native.cmpxchg32(image.field_addr(_rec, "state"), now, state)


def softirq_enter() -> IrqSaved:
    """Serve softirqs: BH disabled, in_serving_softirq(), interrupts on; irq_exit() undoes it."""
    return _enter(SOFTIRQ_OFFSET, False)


def reset() -> None:
    """A fresh task context: preemptible, interrupts on, not attached to a slot."""
    global _count, _irqs_off, _rec
    _count = 0
    _irqs_off = False
    _rec = None


_after_fork_in_child = reset


os.register_at_fork(after_in_child=_after_fork_in_child)
