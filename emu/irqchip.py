"""Interrupt delivery: pending bits, the doorbell, do_IRQ() and the flow handler
(kernel/irq/handle.c, chip.c, spurious.c; arch/x86/kernel/irq.c).

An interrupt is real: irq_inject_interrupt() marks the IRQ pending for its target CPU
in shared memory and rings that CPU's doorbell, a real-time signal to a task running
on that CPU (or to the CPU's idle task when none is), plus a post of its semaphore so
that a doorbell racing with the start of a sleep is not lost. The signal handler runs
the line's handlers in hardirq context in the middle of whatever Python code was
running there, then pending softirqs and tasklets (through irq_exit_hooks, which
softirq.py fills), then returns to it.

This is the part of the IRQ layer below kthread.py; requesting and freeing handlers,
their threads and line control are irq.py.
"""

from __future__ import annotations

import ctypes
import os
import signal as _os_signal
from collections.abc import Callable
from typing import Any

import _emu_native as _native

from . import bug, checks, image, irqflags, preempt, records
from .callback import callback_load
from .constants import PF_EXITING, PF_IDLE
from .printk import log_store
from .task import task_from_slot, wake_up_process
from .wait import var_waitqueue, wake_up_all

IRQ_NONE = 0
IRQ_HANDLED = 1
IRQ_WAKE_THREAD = 2

IRQF_SHARED = 0x00000080
IRQF_ONESHOT = 0x00002000

# desc->istate bits (kernel/irq/internals.h), as far as emu needs them: defined by
# native/'s IrqCore, which changes them on the interrupt path.
IRQS_INPROGRESS = _native.IRQS_INPROGRESS  # a CPU is running the handlers
IRQS_REPLAY = _native.IRQS_REPLAY  # arrived while another CPU ran them: run once more
IRQS_PENDING = _native.IRQS_PENDING  # arrived while disabled or masked: replay on enable
IRQS_ONESHOT = _native.IRQS_ONESHOT  # masked until the threaded handler returns
IRQS_SPURIOUS_DISABLED = _native.IRQS_SPURIOUS_DISABLED  # "nobody cared"

IRQTF_RUNTHREAD = 0x1

# IrqAction.warned: one-time messages already printed
WARNED_NO_THREAD = 0x1
WARNED_IRQS_ON = 0x2

ACTION_LIVE = _native.ACTION_LIVE  # IrqAction.in_use: handlers run
ACTION_RESERVED = 2  # claimed by a request_irq() that has not finished

#: The doorbell: interrupt delivery to a task process.
SIG_IRQ = _os_signal.SIGRTMIN + 1

#: Called by do_IRQ() after the hard interrupts when softirqs are pending (irq_exit()).
irq_exit_hooks: list[Callable[[], None]] = []

# --- delivery -------------------------------------------------------------------------------
#
# The pending bits, the doorbell and the descriptor's state changes on the interrupt path
# are native/'s IrqCore; this code runs the handlers and reports.

class _Views:
    """ctypes views and addresses the slower paths need, built once per kernel (a
    ctypes structure access builds new objects every time), and this process's
    requests."""

    def __init__(self, img: image.SharedImage) -> None:
        self.descs = [img.img.irqs[i] for i in range(img.img.hdr.nr_irqs)]
        #: where synchronize_irq() waits for each line (wait_var_event() on its descriptor)
        self.desc_waitqueues = [var_waitqueue(ctypes.addressof(d)) for d in self.descs]
        self.actions = [[d.actions[j] for j in range(image.MAX_IRQ_ACTIONS)]
                        for d in self.descs]
        #: (irq, action index) -> (callback ref, handler, dev) as given to request_irq()
        #: in this process (or inherited by fork): free_irq() finds `dev` by identity,
        #: and what they capture stays alive until then.
        self.requested: dict[tuple[int, int], tuple[tuple[int, int], Any, Any]] = {}
        # Per-CPU addresses: CPU c's is base + c * stride (no list: a kernel may have a
        # thousand CPUs, and every task that takes an interrupt builds these views).
        self.percpu_stride = ctypes.sizeof(image.PerCpu)
        self.irq_pending0 = image.percpu_addr(img.img, 0, "irq_pending")
        self.softirq_pending0 = image.percpu_addr(img.img, 0, "softirq_pending")


def _views() -> _Views:
    img = image.this()
    views: _Views | None = img.irq_views
    if views is None:
        views = img.irq_views = _Views(img)
    return views


def softirq_pending_addr(cpu: int) -> int:
    """Address of `cpu`'s softirq pending bits."""
    views = _views()
    return views.softirq_pending0 + cpu * views.percpu_stride


def _core() -> Any:
    """This process's IrqCore over the kernel's image, made on first use."""
    img = image.this()
    core = img.irq_core
    if core is None:
        core = img.irq_core = _native.IrqCore(img.core, img.irq_layout(), SIG_IRQ)
    return core


def _desc(irq: int) -> Any:
    descs = _views().descs
    if type(irq) is not int or not 0 <= irq < len(descs):
        _check_irq(irq)
    return descs[irq]


def _check_irq(irq: object) -> None:
    """TypeError unless `irq` is an int, ValueError unless it names a line."""
    if type(irq) is not int:
        raise checks.not_a("irq", "an int IRQ number", irq) from None
    nr_irqs = len(_views().descs)
    if not 0 <= irq < nr_irqs:
        raise ValueError(f"irq must be an IRQ number from 0 to {nr_irqs - 1}, got {irq}") from None


def _lock(desc: Any) -> int:
    addr = image.field_addr(desc, "lock")
    records.raw_spin_lock(addr, "irq descriptor")
    return addr


def irq_inject_interrupt(irq: int) -> None:
    """Raise IRQ `irq` now on its target CPU (irq_set_affinity()). Any context, any process.

    An edge raised while the line is still pending on that CPU merges with the pending
    one, as on real hardware; such edges are counted (kernel.proc_interrupts()).
    """
    try:
        raised = _core().raise_irq(irq)
    except ValueError:
        _check_irq(irq)  # the TypeError of a wrong type
        raise
    if raised & 2:
        records.field_add(image.this().img.irqs[irq], "merged", 1)
    if raised & 1:
        do_IRQ()  # our own CPU: take it now (or leave it pending if IRQs are off)


def irq_finalize_oneshot(irq: int) -> None:
    """Unmask a ONESHOT line whose thread returned (or died), and replay an arrival it
    held meanwhile unless the line is disabled. Any context, any process."""
    if _core().finalize_oneshot(irq):
        irq_inject_interrupt(irq)


def ring_doorbell(cpu: int) -> None:
    """Make `cpu` look at its pending interrupts and softirqs.

    The task running there, or else the CPU's idle task, gets the doorbell signal and a
    post of its semaphore (no state change: a sleeper re-checks and sleeps again, but
    a doorbell that raced with the start of its sleep is not lost). On our own CPU the
    interrupts are taken at once.
    """
    if _core().kick(cpu):
        do_IRQ()


def resend_pending(cpu: int) -> None:
    """Ring `cpu`'s doorbell again if it has interrupts or softirqs pending, whoever
    it reaches (the task running there, else the CPU's idle task; the caller too).

    For a moment when the CPU's doorbell target changes: a task that starts or ends
    for good on `cpu` may have taken doorbells while it could not run handlers (before
    set_current(), after its exit began), and a raiser that found no target at all
    rang nobody. Their interrupts stay pending and nothing else would ring again. A
    task that stops being a target makes that visible (TASK_DEAD) with a full barrier
    first: a raiser sets the pending bit, then looks for the target, so either it finds
    another task or this call sees the bit.
    """
    views = _views()
    offset = cpu * views.percpu_stride
    if (_native.load64(views.irq_pending0 + offset)
            or _native.load32(views.softirq_pending0 + offset)):
        _core().ring(cpu)


def _doorbell(signum: int, frame: Any) -> None:
    do_IRQ()


def install_doorbell() -> None:
    """Take interrupts in this task process (boot and kthread start-up), once it is its
    task (set_current()), and those its CPU has pending.

    A new kthread is a doorbell target as soon as it is in the task table (woken, it
    runs on its CPU; an idle task is its CPU's fallback at once). A doorbell that
    reached it before set_current() found no CPU to take interrupts on (do_IRQ()
    returned) and left them pending, as a new task in the kernel takes what is pending
    when it enables interrupts in schedule_tail(): ring for them again.
    """
    _os_signal.signal(SIG_IRQ, _doorbell)
    resend_pending(preempt.this_cpu())


def do_IRQ() -> None:
    """Handle every IRQ pending for this task's CPU, unless interrupts are disabled here.

    Like a CPU taking an interrupt, it runs with interrupts off until every pending
    line was handled; softirqs run afterwards with interrupts on. In a process that is
    not (or no longer) a task it does nothing: see install_doorbell(), resend_pending().
    An idle task at its top level serves the CPUs that rang it instead.
    """
    if preempt.irqs_disabled() or preempt.in_hardirq():
        return
    cpu = preempt.this_cpu()
    if cpu < 0:
        return
    idle = _idle
    if idle is None:
        idle = bool(irqflags.current_slot().flags & PF_IDLE)
    if idle and not preempt.preempt_count():
        _serve_idle_list()
    else:
        _do_IRQ_on(cpu)


def _do_IRQ_on(cpu: int) -> None:
    core = _core()
    views = _views()
    offset = cpu * views.percpu_stride
    # Loop until nothing is pending: an interrupt raised meanwhile (on this CPU, or to
    # our task from elsewhere) only left its bit, even one whose doorbell came after the
    # last look but before interrupts were on again (that doorbell's do_IRQ() returned).
    while _native.load64(views.irq_pending0 + offset):
        preempt.irqs_off_raw(True)
        try:
            while pending := core.take_pending(cpu):
                while pending:
                    low = pending & -pending
                    pending ^= low
                    handle_irq(core, views, low.bit_length() - 1, cpu)
        finally:
            preempt.irqs_off_raw(False)
    if _native.load32(views.softirq_pending0 + offset):
        for hook in irq_exit_hooks:
            hook()


#: Whether this task is an idle task (PF_IDLE, set by its creator before it starts),
#: kept here for do_IRQ(); None in a new kthread until it starts (task_started()).
_idle: bool | None = False
#: In an idle task (idle.py): its home CPU, whose idle list it serves; else -1.
_idle_home = -1


def task_started(rec: Any) -> None:
    """A new kthread starts (after its first wake-up): whether it is an idle task is
    settled."""
    global _idle
    _idle = bool(rec.flags & PF_IDLE)


def _after_fork_in_child() -> None:
    global _idle, _idle_home
    _idle, _idle_home = None, -1


os.register_at_fork(after_in_child=_after_fork_in_child)


def _serve_idle_list() -> None:
    """An idle task, at its top level (no interrupt or softirq of another CPU in
    progress): serve each CPU that rang it, as that CPU (smp_processor_id() is that CPU
    meanwhile: its own counts, pending bits and tasklet lists), until none is queued.
    Never its own CPU's interrupts unasked: a task running there takes them."""
    global _idle_home
    rec = irqflags.current_slot()
    if _idle_home < 0:
        _idle_home = int(rec.cpu)  # the first call is not nested: the CPU it is bound to
    take = _core().idle_take
    while cpus := take(_idle_home):
        saved = rec.cpu
        for cpu in cpus:
            if cpu == saved:
                _do_IRQ_on(cpu)
                continue
            # A plain store: no other process goes by an idle task's cpu (IrqCore never
            # takes it for a running task), only this one's smp_processor_id().
            rec.cpu = cpu
            try:
                _do_IRQ_on(cpu)
            finally:
                rec.cpu = saved


preempt.irq_enable_hooks.append(do_IRQ)


def handle_irq(core: Any, views: _Views, irq: int, cpu: int) -> None:
    """handle_edge_irq(): run the line's handlers on `cpu` unless it is disabled, masked
    or in progress elsewhere (then IrqCore marks it pending, or for one replay here)."""
    live = core.claim(irq, cpu)
    while live is not None:
        try:
            ret = _run_actions(irq, live)
        except BaseException:
            core.abort(irq)  # even a KeyboardInterrupt must not leave it "in progress"
            raise
        end = core.end(irq, ret)
        if end & _native.IRQ_END_NOBODY_CARED:
            _report_nobody_cared(irq)
        live = core.actions(irq) if end & _native.IRQ_END_REPLAY else None
    wq = views.desc_waitqueues[irq]
    if wq._rec.head != -1:  # synchronize_irq() waits for the end (wake_up_var())
        wake_up_all(wq)


def _run_actions(irq: int, live: tuple[tuple[int, int, int], ...]) -> int:
    """handle_irq_event(): every live action's handler in hardirq context; returns
    their IRQ_* results or-ed together."""
    saved = preempt.irq_enter()
    ret = IRQ_NONE
    try:
        for index, ref, generation in live:
            res = _call_handler(irq, ref, generation)
            ret |= res
            if res & IRQ_WAKE_THREAD:
                _wake_thread(irq, index)
            if not preempt.irqs_disabled():
                _handler_enabled_irqs(irq, index)
    finally:
        preempt.irq_exit(saved)
    return ret


def _call_handler(irq: int, ref: int, generation: int) -> int:
    try:
        handler, dev = callback_load(ref, generation)
        res = handler(irq, dev)
    except bug.TaskKilled:
        return IRQ_HANDLED  # BUG() in the handler, already reported
    except KeyboardInterrupt:
        raise  # Ctrl-C in the booting process: the user wants out
    except BaseException as exc:  # an Oops in interrupt context; the kernel goes on
        bug.oops(exc, f"{type(exc).__name__} in interrupt handler of irq {irq}: {exc}")
        return IRQ_HANDLED
    if not isinstance(res, int) or res & ~(IRQ_HANDLED | IRQ_WAKE_THREAD):
        log_store(3, f"irq event {irq}: bogus return value {res!r}")
        return IRQ_NONE
    return res


def _handler_enabled_irqs(irq: int, index: int) -> None:
    action = _views().actions[irq][index]
    if not action.warned & WARNED_IRQS_ON:  # WARN_ONCE
        action.warned |= WARNED_IRQS_ON
        bug.warn(f"irq {irq} handler {action.name.decode()} enabled interrupts", depth=3)
    preempt.irqs_off_raw(True)


def _wake_thread(irq: int, index: int) -> None:
    action = _views().actions[irq][index]
    if action.thread_slot < 0:
        if not action.warned & WARNED_NO_THREAD:
            action.warned |= WARNED_NO_THREAD
            log_store(4, f"IRQ {irq} device {action.name.decode()} returned IRQ_WAKE_THREAD "
                         "but no thread function available.")
        return
    thread = task_from_slot(action.thread_slot, action.thread_generation)
    if thread._rec.flags & PF_EXITING:
        return  # it died: pretend it handled the interrupt (__irq_wake_thread())
    if action.flags & IRQF_ONESHOT:
        _core().oneshot_mask(irq)  # masked until the thread returns
    records.field_or(action, "thread_flags", IRQTF_RUNTHREAD)
    wake_up_process(thread)


def _report_nobody_cared(irq: int) -> None:
    """note_interrupt() shut the line off: nearly all of its last interrupts were unhandled."""
    names = [a.name.decode() for a in _views().actions[irq] if a.in_use]
    log_store(0, "\n".join([
        f'irq {irq}: nobody cared (try booting with the "irqpoll" option)',
        "handlers:", *[f"[<0>] {n}" for n in names], f"Disabling IRQ #{irq}",
    ]))
