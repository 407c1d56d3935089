"""Softirqs and tasklets (kernel/softirq.c, include/linux/interrupt.h).

Pending softirqs run on the way out of a hard interrupt, or at local_bh_enable(), on
the same CPU, with bottom halves disabled (in_serving_softirq()). A tasklet scheduled
from process context runs at once in the scheduling task, standing in for the
kernel's ksoftirqd. Tasklets are queued on the scheduling CPU; one never runs
concurrently with itself; scheduling it while it runs makes it run once more.

Like hard-IRQ handlers, tasklet callbacks run in whichever task serves the CPU's
softirqs, so the callback and its `data` are carried there by value (callback.py):
any callable, each task running its own copy of what it captures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import _emu_native as _native

from . import bug, checks, image, preempt, records
from .callback import callback_free, callback_load, callback_store
from .idle import start_irq_layer
from .irqchip import irq_exit_hooks, ring_doorbell, softirq_pending_addr
from .trace import SOFTIRQ_ENTRY, SOFTIRQ_EXIT, trace_point
from .wait import wait_var_event, wake_up_var

HI_SOFTIRQ = 0
TIMER_SOFTIRQ = 1
TASKLET_SOFTIRQ = 6
#: softirq_vec: the action of each softirq number that has one (open_softirq()).
softirq_vec: dict[int, Callable[[int], None]] = {}
_LIST = {TASKLET_SOFTIRQ: 0, HI_SOFTIRQ: 1}  # PerCpu.tasklet_head index

TASKLET_STATE_SCHED = 0x1
TASKLET_STATE_RUN = 0x2
#: __do_softirq() restarts at most this many times, then leaves the rest for later.
MAX_SOFTIRQ_RESTART = 10


class Tasklet(records.Record):
    """struct tasklet_struct: `callback(tasklet)` run in softirq context after scheduling.

    `callback` may be any callable and `data` any object cloudpickle can carry; each
    task that runs the tasklet has its own copy of both (``tasklet.data`` is this
    task's copy). The handle that created the tasklet keeps them alive, and frees the
    tasklet when it is garbage-collected.
    """

    TABLE = "tasklets"
    FIELD = "state"
    __slots__ = ("_callback",)
    _callback: tuple[Any, Any]  # (callback, data) as given

    def __init__(self, callback: Callable[[Tasklet], None], data: Any = None) -> None:
        ref = _store(callback, data)  # first: a callback that cannot be carried takes nothing
        try:
            super().__init__()
        except BaseException:
            callback_free(*ref)
            raise
        _setup(self, ref, callback, data)
        # A CPU with no running task serves its softirqs in its idle task.
        start_irq_layer()

    @property
    def data(self) -> Any:
        """This task's copy of the `data` given at setup."""
        return callback_load(self._rec.ref, self._rec.ref_generation)[1]

    def __del__(self) -> None:
        rec = getattr(self, "_rec", None)
        if (rec is not None and self._owner and image._this is getattr(self, "_img", None)
                and rec.generation == self.generation and rec.ref):
            callback_free(rec.ref, rec.ref_generation)
            rec.ref = 0
        super().__del__()


def _check_tasklet(t: object) -> None:
    if not isinstance(t, Tasklet):
        raise checks.not_a("t", "an emu.Tasklet", t) from None


def _check_callback(callback: object) -> None:
    if not callable(callback):
        raise checks.not_a("callback", "callable", callback)


def tasklet_setup(t: Tasklet, callback: Callable[[Tasklet], None], data: Any = None) -> None:
    """(Re)initialise `t` with `callback`, called as ``callback(t)``.

    TypeError if `callback` or `data` cannot be carried to other tasks (see Tasklet).
    """
    _check_tasklet(t)
    ref = _store(callback, data)
    if t._rec.ref:
        callback_free(t._rec.ref, t._rec.ref_generation)
    _setup(t, ref, callback, data)


def _store(callback: Callable[[Tasklet], None], data: Any) -> tuple[int, int]:
    _check_callback(callback)
    return callback_store(callback, data, "callback", "data")


def _setup(t: Tasklet, ref: tuple[int, int], callback: Any, data: Any) -> None:
    rec = t._rec
    rec.ref, rec.ref_generation = ref
    t._callback = (callback, data)  # what they capture lives as long as this handle
    rec.state = 0
    rec.count = 0
    rec.next = -1


def _live(t: Tasklet) -> Any:
    """The record of tasklet `t`; TypeError if `t` is none, StaleObjectError once freed."""
    if type(t) is not Tasklet:
        _check_tasklet(t)
    t.addr()
    return t._rec


def _schedule(t: Tasklet, nr: int) -> None:
    if records.field_or(_live(t), "state", TASKLET_STATE_SCHED) & TASKLET_STATE_SCHED:
        return  # already scheduled and not yet started: it runs once
    cpu = max(preempt.this_cpu(), 0)
    _enqueue(cpu, nr, t.index)
    raise_softirq(cpu, nr)


def tasklet_schedule(t: Tasklet) -> None:
    """Run `t` soon on this CPU (TASKLET_SOFTIRQ). Any context."""
    _schedule(t, TASKLET_SOFTIRQ)


def tasklet_hi_schedule(t: Tasklet) -> None:
    """tasklet_schedule() on the high-priority list (HI_SOFTIRQ)."""
    _schedule(t, HI_SOFTIRQ)


def tasklet_disable(t: Tasklet) -> None:
    """Keep `t` from running (nesting) and wait until it is not running. Sleeps."""
    records.field_add(_live(t), "count", 1)
    tasklet_unlock_wait(t)


def tasklet_disable_nosync(t: Tasklet) -> None:
    """Keep `t` from running (nesting) without waiting for a running instance. Any context."""
    records.field_add(_live(t), "count", 1)


def tasklet_enable(t: Tasklet) -> None:
    """Undo one tasklet_disable(); a schedule that arrived meanwhile then runs."""
    if records.field_add(_live(t), "count", -1) < 0:
        records.field_store(_live(t), "count", 0)
        bug.warn("tasklet_enable() without tasklet_disable()", depth=2)
    kick_pending_cpus()


def tasklet_unlock_wait(t: Tasklet) -> None:
    """Wait until `t` is not running. Process context (sleeps)."""
    rec = _live(t)
    wait_var_event(image.field_addr(rec, "state"),
                   lambda: not records.field_load(rec, "state") & TASKLET_STATE_RUN)


def tasklet_kill(t: Tasklet) -> None:
    """Wait until `t` is neither scheduled nor running. Process context only."""
    _check_tasklet(t)
    if preempt.in_interrupt():
        bug.warn("Attempt to kill tasklet from interrupt", depth=2)
    preempt.might_sleep()
    rec = _live(t)
    kick_pending_cpus()  # where it is scheduled, it runs now
    wait_var_event(image.field_addr(rec, "state"), lambda: not records.field_load(
        rec, "state") & (TASKLET_STATE_SCHED | TASKLET_STATE_RUN))


# --- per-CPU lists and the softirq loop -------------------------------------------------------

def _percpu(cpu: int) -> Any:
    return image.this().img.percpu[cpu]


def _enqueue(cpu: int, nr: int, index: int) -> None:
    pc = _percpu(cpu)
    tasklets = image.this().img.tasklets
    which = _LIST[nr]
    addr = image.field_addr(pc, "lock")
    records.raw_spin_lock(addr, "tasklet list")
    try:
        tasklets[index].next = -1
        if pc.tasklet_tail[which] == -1:
            pc.tasklet_head[which] = index
        else:
            tasklets[pc.tasklet_tail[which]].next = index
        pc.tasklet_tail[which] = index
    finally:
        records.raw_spin_unlock(addr)


def _take_list(cpu: int, nr: int) -> list[int]:
    pc = _percpu(cpu)
    tasklets = image.this().img.tasklets
    which = _LIST[nr]
    addr = image.field_addr(pc, "lock")
    out = []
    records.raw_spin_lock(addr, "tasklet list")
    try:
        index = pc.tasklet_head[which]
        while index != -1:
            out.append(index)
            index = tasklets[index].next
        pc.tasklet_head[which] = pc.tasklet_tail[which] = -1
    finally:
        records.raw_spin_unlock(addr)
    return out


def raise_softirq(cpu: int, nr: int) -> None:
    """Mark softirq `nr` pending on `cpu`; outside interrupt context serve it at once."""
    _native.or32(softirq_pending_addr(cpu), 1 << nr)
    if cpu != preempt.this_cpu():
        ring_doorbell(cpu)
    elif not preempt.in_interrupt() and not preempt.irqs_disabled():
        do_softirq()  # ksoftirqd's job, done by the raising task itself


def do_softirq() -> None:
    """__do_softirq(): run this CPU's pending softirqs unless in interrupt context."""
    cpu = preempt.this_cpu()
    if cpu < 0 or preempt.in_interrupt():
        return
    addr = softirq_pending_addr(cpu)
    for _ in range(MAX_SOFTIRQ_RESTART):
        pending = _native.xchg32(addr, 0)
        if not pending:
            return
        records.field_add(image.this().img.percpu[cpu], "softirq_count", pending.bit_count())
        saved = preempt.softirq_enter()
        try:
            for nr in sorted(softirq_vec):
                if pending & (1 << nr):
                    trace_point(SOFTIRQ_ENTRY, nr)
                    softirq_vec[nr](cpu)
                    trace_point(SOFTIRQ_EXIT, nr)
        finally:
            preempt.irq_exit(saved)


def open_softirq(nr: int, action: Callable[[int], None]) -> None:
    """Make `action(cpu)` the handler of softirq `nr`, run in softirq context on the
    CPU it was raised on, in the order of the numbers (HI, TIMER, ..., TASKLET)."""
    softirq_vec[nr] = action


def irq_exit_softirqs() -> None:
    """The tail of irq_exit(): serve softirqs raised by the handlers just run."""
    if not preempt.in_interrupt():
        do_softirq()


def _tasklet_action(cpu: int, nr: int) -> None:
    """tasklet_action_common(): run each queued tasklet that is enabled and not running."""
    tasklets = image.this().img.tasklets
    for index in _take_list(cpu, nr):
        rec = tasklets[index]
        if rec.count or records.field_or(rec, "state", TASKLET_STATE_RUN) & TASKLET_STATE_RUN:
            _requeue(cpu, nr, index)  # disabled, or running on another CPU: later
            continue
        if rec.count:  # disabled between the test and taking RUN
            records.field_and(rec, "state", ~TASKLET_STATE_RUN)
            _requeue(cpu, nr, index)
            continue
        records.field_and(rec, "state", ~TASKLET_STATE_SCHED)
        try:
            callback, _data = callback_load(rec.ref, rec.ref_generation)
            callback(Tasklet._from_index(index, rec.generation))
        except bug.TaskKilled:
            pass  # BUG() in the callback, already reported
        except Exception as exc:
            bug.oops(exc, f"{type(exc).__name__} in tasklet: {exc}")
        finally:
            records.field_and(rec, "state", ~TASKLET_STATE_RUN)
            wake_up_var(image.field_addr(rec, "state"))  # tasklet_kill(), tasklet_unlock_wait()


def _requeue(cpu: int, nr: int, index: int) -> None:
    _enqueue(cpu, nr, index)
    _native.or32(softirq_pending_addr(cpu), 1 << nr)


def kick_pending_cpus() -> None:
    """Ring every CPU that has softirqs pending (after an enable, or while waiting)."""
    img = image.this()
    for cpu in range(img.img.hdr.ncpus):
        if _native.load32(softirq_pending_addr(cpu)):
            ring_doorbell(cpu)


def _tasklet_softirq(cpu: int) -> None:
    _tasklet_action(cpu, TASKLET_SOFTIRQ)


def _hi_softirq(cpu: int) -> None:
    _tasklet_action(cpu, HI_SOFTIRQ)


open_softirq(HI_SOFTIRQ, _hi_softirq)
open_softirq(TASKLET_SOFTIRQ, _tasklet_softirq)
preempt.bh_enable_hooks.append(irq_exit_softirqs)
irq_exit_hooks.append(irq_exit_softirqs)
