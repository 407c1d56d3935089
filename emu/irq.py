"""Hard interrupts: requesting and freeing handlers, line control (kernel/irq/manage.c,
proc.c); delivery (do_IRQ(), the flow handler) is irqchip.py, below kthread.py.

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

import ctypes
from collections.abc import Callable, Iterable
from typing import Any

import _emu_native as _native

from . import bug, checks, image, preempt, records
from .callback import callback_free, callback_load, callback_store
from .constants import EBUSY, EINVAL, ENOMEM, TASK_INTERRUPTIBLE, TASK_RUNNING
from .idle import idle_for, start_irq_layer
from .irqchip import (
    ACTION_LIVE,
    ACTION_RESERVED,
    IRQ_HANDLED,
    IRQ_NONE,
    IRQ_WAKE_THREAD,
    IRQF_ONESHOT,
    IRQF_SHARED,
    IRQS_INPROGRESS,
    IRQTF_RUNTHREAD,
    _core,
    _desc,
    _lock,
    _views,
    irq_finalize_oneshot,
    irq_inject_interrupt,
)
from .kthread import kthread_run, kthread_should_stop, kthread_stop
from .printk import log_store
from .sched import schedule
from .task import Task, set_current_state, task_from_slot
from .wait import wait_var_event, wake_up_var

__all__ = [  # with what irqchip.py provides of the API
    "IRQ_HANDLED", "IRQ_NONE", "IRQ_WAKE_THREAD", "IRQF_ONESHOT", "IRQF_SHARED",
    "disable_irq", "disable_irq_nosync", "enable_irq", "free_irq",
    "irq_default_primary_handler", "irq_inject_interrupt", "irq_set_affinity", "irq_task",
    "proc_interrupts", "request_irq", "request_threaded_irq", "synchronize_irq",
]

# --- threaded handlers ----------------------------------------------------------------------

def _irq_thread(data: tuple[int, int, Callable[[int, Any], int], Any]) -> int:
    """irq_thread(): run thread_fn each time the primary handler asks for it."""
    irq, index, thread_fn, dev = data
    desc = image.this().img.irqs[irq]
    action = desc.actions[index]
    flags = image.field_addr(action, "thread_flags")

    while not kthread_should_stop():
        set_current_state(TASK_INTERRUPTIBLE)
        if _native.and32(flags, ~IRQTF_RUNTHREAD) & IRQTF_RUNTHREAD:
            set_current_state(TASK_RUNNING)
            records.field_add(desc, "threads_active", 1)
            try:
                thread_fn(irq, dev)
            except Exception as exc:
                bug.oops(exc, f"{type(exc).__name__} in threaded handler of irq {irq}: {exc}")
            finally:
                records.field_add(desc, "threads_active", -1)
                _unmask_oneshot(irq, desc, action)
                wake_up_var(ctypes.addressof(desc))  # synchronize_irq()
            continue
        schedule()
    set_current_state(TASK_RUNNING)
    return 0


def _unmask_oneshot(irq: int, desc: Any, action: Any) -> None:
    if action.flags & IRQF_ONESHOT:
        irq_finalize_oneshot(irq)


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
    idle_for(desc.affinity)
    ref = callback_store(handler or irq_default_primary_handler, dev, "handler", "dev")
    index = _claim_action(irq, desc, flags, name, ref)
    if index < 0:
        callback_free(*ref)
        return index
    _views().requested[irq, index] = (ref, handler, dev)
    if thread_fn is not None:
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
                    _core().startup(irq)
                return index
        return -ENOMEM
    finally:
        records.raw_spin_unlock(addr)


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
        name: str = action.name.decode("utf-8", "replace")
    finally:
        records.raw_spin_unlock(addr)
    synchronize_irq(irq)
    if action.thread_slot >= 0:
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
    _desc(irq)
    _core().disable(irq)


def disable_irq(irq: int) -> None:
    """disable_irq_nosync() and wait for running handlers (synchronize_irq()). Sleeps."""
    preempt.might_sleep()
    disable_irq_nosync(irq)
    synchronize_irq(irq)


def enable_irq(irq: int) -> None:
    """Undo one disable_irq(); at depth 0 a held arrival is replayed. Any context.

    Without a matching disable: WARN "Unbalanced enable for IRQ n".
    """
    _desc(irq)
    result = _core().enable(irq)
    if result < 0:
        bug.warn(f"Unbalanced enable for IRQ {irq}", depth=2)
    elif result:
        irq_inject_interrupt(irq)


def synchronize_irq(irq: int) -> None:
    """Wait until no hard or threaded handler of `irq` runs. Process context (sleeps)."""
    desc = _desc(irq)
    preempt.might_sleep()
    wait_var_event(ctypes.addressof(desc), lambda: not (
        desc.status & IRQS_INPROGRESS or desc.threads_active
        or any(a.in_use and a.thread_flags & IRQTF_RUNTHREAD for a in desc.actions)))


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
    """Route `irq` to a CPU of `cpus` (a CPU number or an iterable of them, up to
    emu.NR_CPUS): 0, or -EINVAL if one of them does not exist or there are none. The
    lowest is the effective target; in process context its real CPU gets an idle task
    if it has none yet (idle.idle_for())."""
    desc = _desc(irq)
    ncpus = image.this().img.hdr.ncpus
    wanted = _cpu_list(cpus)
    if not wanted or not all(0 <= c < ncpus for c in wanted):
        return -EINVAL
    target = min(wanted)
    idle_for(target)
    desc.affinity = target
    return 0


# --- /proc/interrupts ---------------------------------------------------------------------------

def proc_interrupts() -> str:
    """The interrupt counts laid out like /proc/interrupts (kernel/irq/proc.c): handler
    entries per line and CPU, then one ``MRG:`` line per IRQ that had edges merge with
    one already pending on its CPU (as on real hardware; see Kernel.proc_interrupts())."""
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
    lines += [f"MRG: {desc.merged:10d}  IRQ {irq}: edges merged with one already pending"
              for irq, desc in enumerate(img.img.irqs[: hdr.nr_irqs]) if desc.merged]
    return "\n".join(lines) + "\n"


def irq_task(irq: int) -> Task | None:
    """The irq/N-name thread of the first threaded action on `irq`, if any."""
    for action in _desc(irq).actions:
        if action.in_use and action.thread_slot >= 0:
            return task_from_slot(action.thread_slot, action.thread_generation)
    return None

