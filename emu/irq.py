"""Hard interrupts (kernel/irq/manage.c, handle.c, chip.c, spurious.c, proc.c).

An interrupt is real: irq_inject_interrupt() marks the IRQ pending for its target CPU
in shared memory and rings that CPU's doorbell, a real-time signal to a task running
on that CPU (or to the CPU's idle task when none is), plus a post of its semaphore so
that a doorbell racing with the start of a sleep is not lost. The signal handler runs
the line's handlers in hardirq context in the middle of whatever Python code was
running there, then pending softirqs and tasklets, then returns to it.

A task that has interrupts disabled leaves them pending; they are delivered when it
enables interrupts again. A line is never handled re-entrantly: an arrival while its
handler runs on another CPU, or while it is disabled, is replayed once afterwards.

Hard-IRQ handlers run in whichever task the interrupt hits, so `handler` and `dev` are
carried there by value (callback.py): any callable and any object cloudpickle can
carry, each task running its own copy of what they capture (emu objects stay shared).
Threaded handlers (`thread_fn`) run in their own ``irq/N-name`` kthread, forked from
the requesting task, on the objects themselves as they were at the fork.
"""

from __future__ import annotations

import signal as _os_signal
import time
from collections.abc import Callable, Iterable
from typing import Any

import _emu_native as _native

from . import bug, checks, image, locking, preempt
from .callback import callback_free, callback_load, callback_store
from .constants import EBUSY, EINVAL, ENOMEM, PF_EXITING, PF_IDLE, TASK_INTERRUPTIBLE, TASK_RUNNING
from .printk import log_store
from .sched import schedule, schedule_timeout_idle
from .task import Task, set_current_state, task_from_slot, wake_up_process

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
        self.actions = [[d.actions[j] for j in range(image.MAX_IRQ_ACTIONS)]
                        for d in self.descs]
        self.softirq_pending = [image.field_addr(img.img.percpu[c], "softirq_pending")
                                for c in range(image.MAX_CPUS)]
        #: (irq, action index) -> (callback ref, handler, dev) as given to request_irq()
        #: in this process (or inherited by fork): free_irq() finds `dev` by identity,
        #: and what they capture stays alive until then.
        self.requested: dict[tuple[int, int], tuple[tuple[int, int], Any, Any]] = {}
        self.irq_pending = [image.field_addr(img.img.percpu[c], "irq_pending")
                            for c in range(image.MAX_CPUS)]


def _views() -> _Views:
    img = image.this()
    views = img.irq_views
    if views is None:
        views = img.irq_views = _Views(img)
    return views


def softirq_pending_addr(cpu: int) -> int:
    """Address of `cpu`'s softirq pending bits (cached per kernel)."""
    return int(_views().softirq_pending[cpu])


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
    locking.raw_spin_lock(addr, "irq descriptor")
    return addr


def irq_inject_interrupt(irq: int) -> None:
    """Raise IRQ `irq` now on its target CPU (irq_set_affinity()). Any context, any process."""
    try:
        ours = _core().raise_irq(irq)
    except ValueError:
        _check_irq(irq)  # the TypeError of a wrong type
        raise
    if ours:
        do_IRQ()  # our own CPU: take it now (or leave it pending if IRQs are off)


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
    if _native.load64(views.irq_pending[cpu]) or _native.load32(views.softirq_pending[cpu]):
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
    """
    if preempt.irqs_disabled() or preempt.in_hardirq():
        return
    cpu = preempt.this_cpu()
    if cpu < 0:
        return
    core = _core()
    views = _views()
    # Loop until nothing is pending: an interrupt raised meanwhile (on this CPU, or to
    # our task from elsewhere) only left its bit, even one whose doorbell came after the
    # last look but before interrupts were on again (that doorbell's do_IRQ() returned).
    while _native.load64(views.irq_pending[cpu]):
        preempt.irqs_off_raw(True)
        try:
            while pending := core.take_pending(cpu):
                while pending:
                    low = pending & -pending
                    pending ^= low
                    handle_irq(core, low.bit_length() - 1, cpu)
        finally:
            preempt.irqs_off_raw(False)
    if _native.load32(views.softirq_pending[cpu]):
        softirq.irq_exit_softirqs()


preempt.irq_enable_hooks.append(do_IRQ)


def handle_irq(core: Any, irq: int, cpu: int) -> None:
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
    desc, action = _views().descs[irq], _views().actions[irq][index]
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
        _native.or32(image.field_addr(desc, "status"), IRQS_ONESHOT)  # the line is running
    _native.or32(image.field_addr(action, "thread_flags"), IRQTF_RUNTHREAD)
    wake_up_process(thread)


def _report_nobody_cared(irq: int) -> None:
    """note_interrupt() shut the line off: nearly all of its last interrupts were unhandled."""
    names = [a.name.decode() for a in _views().actions[irq] if a.in_use]
    log_store(0, "\n".join([
        f'irq {irq}: nobody cared (try booting with the "irqpoll" option)',
        "handlers:", *[f"[<0>] {n}" for n in names], f"Disabling IRQ #{irq}",
    ]))


# --- threaded handlers ----------------------------------------------------------------------

def _irq_thread(data: tuple[int, int, Callable[[int, Any], int], Any]) -> int:
    """irq_thread(): run thread_fn each time the primary handler asks for it."""
    from .kthread import kthread_should_stop

    irq, index, thread_fn, dev = data
    desc = image.this().img.irqs[irq]
    action = desc.actions[index]
    flags = image.field_addr(action, "thread_flags")

    while not kthread_should_stop():
        set_current_state(TASK_INTERRUPTIBLE)
        if _native.and32(flags, ~IRQTF_RUNTHREAD) & IRQTF_RUNTHREAD:
            set_current_state(TASK_RUNNING)
            _native.add32(image.field_addr(desc, "threads_active"), 1)
            try:
                thread_fn(irq, dev)
            except Exception as exc:
                bug.oops(exc, f"{type(exc).__name__} in threaded handler of irq {irq}: {exc}")
            finally:
                _native.add32(image.field_addr(desc, "threads_active"), -1)
                _unmask_oneshot(irq, desc, action)
            continue
        schedule()
    set_current_state(TASK_RUNNING)
    return 0


def _unmask_oneshot(irq: int, desc: Any, action: Any) -> None:
    if not action.flags & IRQF_ONESHOT:
        return
    addr = _lock(desc)
    try:
        desc.status &= ~IRQS_ONESHOT
        replay = desc.status & IRQS_PENDING and desc.depth == 0
        if replay:
            desc.status &= ~IRQS_PENDING
    finally:
        locking.raw_spin_unlock(addr)
    if replay:
        irq_inject_interrupt(irq)


def irq_default_primary_handler(irq: int, dev: Any) -> int:
    """The primary handler installed when request_threaded_irq() gets handler=None."""
    return IRQ_WAKE_THREAD


# --- request / free ---------------------------------------------------------------------------

def request_irq(irq: int, handler: Callable[[int, Any], int], flags: int, name: str,
                dev: Any) -> int:
    """request_threaded_irq() without a threaded handler."""
    return request_threaded_irq(irq, handler, None, flags, name, dev)


def request_threaded_irq(irq: int, handler: Callable[[int, Any], int] | None,
                         thread_fn: Callable[[int, Any], int] | None, flags: int, name: str,
                         dev: Any) -> int:
    """Install a handler on line `irq`: 0 on success or a negative errno.

    -EINVAL: no handler at all, IRQF_SHARED without `dev`, or handler=None without
    IRQF_ONESHOT; -EBUSY: the line is taken and the flags do not allow sharing;
    -ENOMEM: no free action slot. From the moment it returns 0 the handler may run.
    With `thread_fn`, an ``irq/N-name`` kthread runs it whenever the primary handler
    returns IRQ_WAKE_THREAD. Process context only (it may sleep).

    `handler` may be any callable and `dev` any object cloudpickle can carry: each
    task that takes the interrupt runs its own copy of them, made at registration
    (emu objects they capture stay shared). TypeError, naming the object at fault,
    if they cannot be carried; emu.CapacityError if the heap (heap_size) is full.
    """
    desc = _desc(irq)
    if handler is not None and not callable(handler):
        raise checks.not_a("handler", "callable or None", handler)
    if thread_fn is not None and not callable(thread_fn):
        raise checks.not_a("thread_fn", "callable or None", thread_fn)
    checks.check_int(flags, "flags", "unsigned long")
    if not isinstance(name, str):
        raise checks.not_a("name", "a str", name)
    if handler is None and thread_fn is None:
        return -EINVAL
    if flags & IRQF_SHARED and dev is None:
        return -EINVAL
    if handler is None and not flags & IRQF_ONESHOT:
        log_store(3, f"genirq: Threaded irq requested with handler=NULL and !ONESHOT for "
                     f"{name} (irq {irq})")
        return -EINVAL
    preempt.might_sleep()
    start_irq_layer()
    ref = callback_store(handler or irq_default_primary_handler, dev, "handler", "dev")
    index = _claim_action(irq, desc, flags, name, ref)
    if index < 0:
        callback_free(*ref)
        return index
    _views().requested[irq, index] = (ref, handler, dev)
    if thread_fn is not None:
        from .kthread import kthread_run

        t = kthread_run(_irq_thread, (irq, index, thread_fn, dev), "irq/%d-%s", irq, name)
        action = desc.actions[index]
        action.thread_generation = t.generation
        action.thread_slot = t.slot
    desc.actions[index].in_use = ACTION_LIVE  # from now on the handler may run
    return 0


def _claim_action(irq: int, desc: Any, flags: int, name: str, ref: tuple[int, int]) -> int:
    addr = _lock(desc)
    try:
        used = [a for a in desc.actions if a.in_use]
        if used and not all(a.flags & flags & IRQF_SHARED for a in used):
            return -EBUSY
        if used and any((a.flags ^ flags) & IRQF_ONESHOT for a in used):
            return -EBUSY
        for index, action in enumerate(desc.actions):
            if not action.in_use:
                action.in_use = ACTION_RESERVED
                action.flags = flags
                action.ref, action.ref_generation = ref
                action.thread_slot = -1
                action.thread_flags = 0
                action.warned = 0
                action.name = name.encode("utf-8")[: image.IRQ_NAME_LEN - 1]
                if not used:
                    desc.status &= ~(IRQS_PENDING | IRQS_ONESHOT | IRQS_SPURIOUS_DISABLED)
                return index
        return -ENOMEM
    finally:
        locking.raw_spin_unlock(addr)


def free_irq(irq: int, dev: Any) -> str | None:
    """Remove the action of `dev` from line `irq`; returns its name, or None.

    `dev` names the action whose dev is that very object (in the task that requested
    it, or one forked from it since), else the first whose dev compares equal to it
    (emu handles, ints and strings do in every task). Waits for running hard and
    threaded handlers and stops the irq thread. From interrupt context, or for an
    action that does not exist, it WARNs and returns None.
    """
    desc = _desc(irq)
    if preempt.in_interrupt():
        bug.warn(f"Trying to free IRQ {irq} from IRQ context!", depth=2)
        return None
    preempt.might_sleep()
    index = _find_action(irq, desc, dev)
    if index < 0:
        bug.warn(f"Trying to free already-free IRQ {irq}", depth=2)
        return None
    action = desc.actions[index]
    addr = _lock(desc)
    try:
        action.in_use = 0
        name = action.name.decode("utf-8", "replace")
    finally:
        locking.raw_spin_unlock(addr)
    synchronize_irq(irq)
    if action.thread_slot >= 0:
        from .kthread import kthread_stop

        kthread_stop(task_from_slot(action.thread_slot, action.thread_generation))
        action.thread_slot = -1
    callback_free(action.ref, action.ref_generation)
    _views().requested.pop((irq, index), None)
    return name


def _find_action(irq: int, desc: Any, dev: Any) -> int:
    """The index of the action `dev` names (see free_irq()), or -1.

    The kernel compares dev_id pointers; here `dev` reaches other tasks as a copy, so
    identity only holds where the request was made, and equality stands in elsewhere.
    """
    requested = _views().requested
    live = []
    for index, action in enumerate(desc.actions):
        if action.in_use:
            ref = (action.ref, action.ref_generation)
            mine = requested.get((irq, index))
            if mine is not None and mine[0] == ref:
                if mine[2] is dev:
                    return index
                live.append((index, mine[2]))
            else:
                live.append((index, callback_load(*ref)[1]))
    for index, other in live:
        if _same(other, dev):
            return index
    return -1


def _same(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # an __eq__ that cannot answer (arrays, ...): not the same
        return False


# --- line control -----------------------------------------------------------------------------

def disable_irq_nosync(irq: int) -> None:
    """Disable line `irq` (nesting); arrivals are held and replayed once on enable. Any context."""
    desc = _desc(irq)
    addr = _lock(desc)
    desc.depth += 1
    locking.raw_spin_unlock(addr)


def disable_irq(irq: int) -> None:
    """disable_irq_nosync() and wait for running handlers (synchronize_irq()). Sleeps."""
    preempt.might_sleep()
    disable_irq_nosync(irq)
    synchronize_irq(irq)


def enable_irq(irq: int) -> None:
    """Undo one disable_irq(); at depth 0 a held arrival is replayed. Any context.

    Without a matching disable: WARN "Unbalanced enable for IRQ n".
    """
    desc = _desc(irq)
    addr = _lock(desc)
    try:
        if desc.depth == 0:
            unbalanced = True
        else:
            unbalanced = False
            desc.depth -= 1
            replay = desc.depth == 0 and desc.status & IRQS_PENDING
            if replay:
                desc.status &= ~IRQS_PENDING
    finally:
        locking.raw_spin_unlock(addr)
    if unbalanced:
        bug.warn(f"Unbalanced enable for IRQ {irq}", depth=2)
    elif replay:
        irq_inject_interrupt(irq)


def synchronize_irq(irq: int) -> None:
    """Wait until no hard or threaded handler of `irq` runs. Process context (sleeps)."""
    desc = _desc(irq)
    img = image.this()
    preempt.might_sleep()
    while desc.status & IRQS_INPROGRESS or desc.threads_active or any(
        a.in_use and a.thread_flags & IRQTF_RUNTHREAD for a in desc.actions
    ):
        img.core.raise_if_dead()
        time.sleep(0.0002)


def _cpu_list(cpus: Any) -> list[int]:
    """`cpus`, a CPU number or an iterable of them, as a list; else TypeError."""
    def is_int(c: object) -> bool:
        return isinstance(c, int) and not isinstance(c, bool)

    if is_int(cpus):
        return [cpus]
    if isinstance(cpus, Iterable) and not isinstance(cpus, (str, bytes)):
        wanted = list(cpus)
        if all(is_int(c) for c in wanted):
            return wanted
    raise checks.not_a("cpus", "a CPU number or an iterable of CPU numbers", cpus)


def irq_set_affinity(irq: int, cpus: Any) -> int:
    """Route `irq` to a CPU of `cpus` (a CPU number or an iterable of them): 0, or
    -EINVAL if one of them does not exist or there are none."""
    desc = _desc(irq)
    ncpus = image.this().img.hdr.ncpus
    wanted = sorted(_cpu_list(cpus))
    valid = [c for c in wanted if 0 <= c < ncpus]
    if not valid or len(valid) != len(wanted):
        return -EINVAL
    desc.affinity = valid[0]
    return 0


# --- the idle tasks ---------------------------------------------------------------------------

#: The idle task's sleep in jiffies (decades): it ends with an interrupt or a wake-up.
IDLE_SLEEP_JIFFIES = 1 << 40


def _idle(cpu: int) -> int:
    """A CPU's idle task: it takes the CPU's interrupts while no task runs there."""
    from .kthread import kthread_should_stop

    while not kthread_should_stop():
        schedule_timeout_idle(IDLE_SLEEP_JIFFIES)
    return 0


IRQ_LAYER_STARTING = 1
IRQ_LAYER_READY = 2


def start_irq_layer() -> None:
    """Create the per-CPU idle tasks on the first request_irq() (idempotent, any task)."""
    from .kthread import kthread_create_on_cpu

    img = image.this()
    hdr = img.img.hdr
    ready = image.field_addr(hdr, "irq_ready")
    if _native.cmpxchg32(ready, 0, IRQ_LAYER_STARTING) != 0:
        while _native.load32(ready) != IRQ_LAYER_READY:  # another task is creating them
            img.core.raise_if_dead()
            time.sleep(0.001)
        return
    for cpu in range(hdr.ncpus):
        t = kthread_create_on_cpu(_idle, cpu, cpu, "swapper/%u")
        _native.or32(image.field_addr(t._rec, "flags"), PF_IDLE)
        _native.store32(image.field_addr(img.img.percpu[cpu], "idle_slot"), t.slot)
        wake_up_process(t)
        resend_pending(cpu)  # raised while `cpu` had no target: nobody was rung
    _native.store32(ready, IRQ_LAYER_READY)


# --- /proc/interrupts ---------------------------------------------------------------------------

def proc_interrupts() -> str:
    """The interrupt counts laid out like /proc/interrupts (kernel/irq/proc.c)."""
    img = image.this()
    hdr = img.img.hdr
    ncpus = hdr.ncpus
    prec = max(3, len(str(hdr.nr_irqs)))
    lines = [" " * (prec + 8) + "".join(f"CPU{c:<8d}" for c in range(ncpus)).rstrip()]
    for irq in range(hdr.nr_irqs):
        desc = img.img.irqs[irq]
        names = [a.name.decode("utf-8", "replace") for a in desc.actions if a.in_use]
        counts = [desc.kstat[c] for c in range(ncpus)]
        if not names and not any(counts):
            continue
        line = f"{irq:>{prec}}:" + "".join(f" {n:10d}" for n in counts)
        line += f"  emu-irq  {irq:>3}-edge"
        if names:
            line += "      " + ", ".join(names)
        lines.append(line)
    return "\n".join(lines) + "\n"


def irq_task(irq: int) -> Task | None:
    """The irq/N-name thread of the first threaded action on `irq`, if any."""
    for action in _desc(irq).actions:
        if action.in_use and action.thread_slot >= 0:
            return task_from_slot(action.thread_slot, action.thread_generation)
    return None


from . import softirq  # noqa: E402  (softirq builds on the names above)
