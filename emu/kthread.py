"""Kernel threads (kernel/kthread.c): one real OS process each, pinned to one CPU.

kthread_create() forks the creating task, so ``threadfn`` and ``data`` may be any
Python objects (closures and lambdas included). The child is a task in state D until
its first wake-up; then it runs ``threadfn(data)`` unless a stop was requested first
(result -EINTR), parking first if a park was requested. The thread's result travels
through its task slot to kthread_stop(), which consumes the exit event exactly once.
"""

from __future__ import annotations

import gc
import os
import signal as _os_signal
from collections.abc import Callable, Iterable
from typing import Any

import _emu_native as _native

from . import bug, checks, image, irqchip, preempt, records
from .completion import (
    Completion,
    _from_index,
    complete,
    wait_for_completion,
    wait_for_completion_timeout,
)
from .constants import (
    EBUSY,
    EINTR,
    EINVAL,
    ENOSYS,
    ESRCH,
    PF_EXITING,
    PF_KTHREAD,
    PF_NO_SETAFFINITY,
    PF_WQ_WORKER,
    TASK_DEAD,
    TASK_PARKED,
    TASK_RUNNING,
    TASK_UNINTERRUPTIBLE,
)
from .errors import EmuError
from .printk import log_store
from .sched import install_show_stack, schedule
from .task import (
    WCHAN_KTHREAD,
    WCHAN_KTHREAD_PARKME,
    WCHAN_NONE,
    Task,
    alloc_slot,
    check_task,
    current,
    free_slot,
    set_current,
    set_current_state,
    wake_up_process,
    wake_up_state,
    wchan_enter,
    wchan_exit,
)
from .trace import PROCESS_EXIT, WAKEUP_NEW, trace_comm, trace_point
from .wait import wait_var_event, wake_up_var

# struct kthread flags (kernel/kthread.c), plus emu's own life-cycle bits.
KTHREAD_IS_PER_CPU = 1 << 0
KTHREAD_SHOULD_STOP = 1 << 1
KTHREAD_SHOULD_PARK = 1 << 2
KTHREAD_STARTED = 1 << 8
KTHREAD_EXITED = 1 << 9
KTHREAD_PINNED = 1 << 10  # the new thread has pinned itself to task.cpu

#: Real signals a kthread ignores, as kthreadd's children do (SIGKILL and SIGSTOP cannot be).
_IGNORED_SIGNALS = (
    "SIGHUP", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGPIPE", "SIGALRM", "SIGTERM",
    "SIGCHLD", "SIGTSTP", "SIGTTIN", "SIGTTOU",
)

#: pid -> task slot of each kthread process this process forked and has not collected yet
#: (booting process only: a kthread ignores SIGCHLD, so the host kernel collects its own).
_children: dict[int, Any] = {}
#: Sent by the supervisor to the booting process when a kthread it created exited, so that
#: it collects the process at once, as the kernel reaps an exited kthread.
SIG_REAP = _os_signal.SIGRTMIN + 3


class KthreadExit(BaseException):
    """Raised by kthread_exit() to unwind the kthread with a result."""

    def __init__(self, result: int) -> None:
        super().__init__(result)
        self.result = result


# --- creation ----------------------------------------------------------------------------

def _format_name(namefmt: str, args: tuple[Any, ...]) -> str:
    if not isinstance(namefmt, str):
        raise TypeError(f"namefmt must be a str, not {type(namefmt).__name__}")
    try:
        name = namefmt % args
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"namefmt {namefmt!r} does not fit its arguments {args!r}: {exc}"
        ) from None
    if "\0" in name:
        raise ValueError(f"namefmt must not produce a NUL character: {name!r}")
    return name


def _check_threadfn(threadfn: Any) -> None:
    if not callable(threadfn):
        raise TypeError(f"threadfn must be callable, not {type(threadfn).__name__}")


def check_cpu(cpu: Any, name: str = "cpu") -> int:
    """Validate an emulated CPU number; returns it."""
    ncpus = image.this().img.hdr.ncpus
    if not isinstance(cpu, int) or isinstance(cpu, bool):
        raise TypeError(f"{name} must be an int CPU number, not {type(cpu).__name__}")
    if not 0 <= cpu < ncpus:
        raise ValueError(f"{name} {cpu} does not exist: this kernel has CPUs 0-{ncpus - 1}")
    return cpu


def _place() -> int:
    """CPU for an unbound kthread: round robin over the emulated CPUs."""
    hdr = image.this().img.hdr
    n = records.field_add(hdr, "cpu_rotor", 1) - 1
    return n % hdr.ncpus


def real_cpu(cpu: int) -> int:
    """The real CPU that emulated CPU `cpu` runs on."""
    cpu_map = image.this().cpu_map
    return cpu_map[cpu % len(cpu_map)]


def _create(threadfn: Callable[[Any], int], data: Any, name: str, cpu: int | None,
            pf_flags: int = 0) -> Task:
    img = image.this()
    current()
    preempt.might_sleep(depth=3)
    img.core.raise_if_dead()  # no new task for a dead kernel: it would join no group
    reap_children()
    bound = cpu is not None
    flags = PF_KTHREAD | (PF_NO_SETAFFINITY if bound else 0) | pf_flags
    task = alloc_slot(name, flags, _place() if cpu is None else cpu, TASK_UNINTERRUPTIBLE)
    rec = task._rec
    rec.wchan = WCHAN_KTHREAD  # until its first wake-up (see _kthread())
    try:
        exited, parked = Completion(), Completion()
    except BaseException:
        free_slot(task)
        raise
    exited._owner = parked._owner = 0  # owned by the task slot, freed with it
    exited._rec.site, parked._rec.site = b"kthread->exited", b"kthread->parked"
    rec.exited, rec.parked = exited.index, parked.index
    task.threadfn, task.data = threadfn, data
    rec.ppid = os.getpid()  # before the pid: whoever sees the pid sees the parent
    pid = _fork_named(task.comm)
    if pid == 0:
        _kthread(task)  # never returns
    if img.is_boot_process:
        _children[pid] = rec  # before the pid too: the supervisor may ask us to reap it
    rec.pid = pid
    trace_point(WAKEUP_NEW, pid, rec.cpu)
    if img.is_boot_process:
        try:
            os.setpgid(pid, img.img.hdr.supervisor_pid)
        except OSError:
            pass  # the child did it first, or it is gone
    if bound:
        _wait_bound(task, parked)
    return task


def _fork_named(comm: str) -> int:
    """os.fork() a child whose comm is `comm` from birth, as kthread_create() returns a
    task whose name is set. The creating thread wears the name during the fork only."""
    own = _native.get_comm()
    pid = -1
    try:
        _native.set_comm(comm)
        pid = os.fork()
    finally:
        if pid != 0:
            _native.set_comm(own)
    return pid


def _wait_bound(task: Task, pinned: Completion) -> None:
    """kthread_create_on_cpu() returns a bound thread: wait until it pinned itself.
    A child that died meanwhile is an error."""
    while not wait_for_completion_timeout(pinned, max(1, image.this().img.hdr.hz // 10)):
        if _native.pid_is_dead(task.pid):
            release_task(task)
            raise EmuError(f"kthread {task.full_name!r} died while starting up")


def kthread_create(threadfn: Callable[[Any], int], data: Any, namefmt: str, *args: Any) -> Task:
    """Create a kthread named ``namefmt % args``, left in state D until woken.

    Process context only (it sleeps). Returns the task; threadfn has not run yet.
    """
    _check_threadfn(threadfn)
    return _create(threadfn, data, _format_name(namefmt, args), None)


def kthread_run(threadfn: Callable[[Any], int], data: Any, namefmt: str, *args: Any) -> Task:
    """kthread_create() + wake_up_process(): the thread starts running threadfn(data).

    The kthread is a process forked from the caller: `data` and everything threadfn
    captures are its own copies from that moment, as after fork. What the tasks share
    are emu objects (Completion, Atomic, Spinlock, Kfifo, tasks, ...) and memory from
    emu.kmalloc() (and the structures made in it); a list or dict appended to in the
    kthread does not change in its creator.
    """
    _check_threadfn(threadfn)
    task = _create(threadfn, data, _format_name(namefmt, args), None)
    wake_up_process(task)
    return task


def _per_cpu_name(namefmt: str, cpu: int) -> str:
    try:
        return _format_name(namefmt, (cpu,))
    except ValueError:
        return _format_name(namefmt, ())


def create_kworker(threadfn: Callable[[Any], int], data: Any, name: str,
                   cpu: int | None) -> Task:
    """The workqueue's kthread_create[_on_cpu](): a kworker named `name`, bound to `cpu`
    unless it is None, marked PF_WQ_WORKER from birth (the kernel's own thread, never a
    test's leaked one). Process context."""
    if cpu is not None:
        check_cpu(cpu)
    return _create(threadfn, data, name, cpu, PF_WQ_WORKER)


def kthread_create_on_cpu(threadfn: Callable[[Any], int], data: Any, cpu: int,
                          namefmt: str) -> Task:
    """Create a kthread bound to `cpu`, named ``namefmt % cpu`` (e.g. "ksoftirqd/%u")."""
    _check_threadfn(threadfn)
    check_cpu(cpu)
    return _create(threadfn, data, _per_cpu_name(namefmt, cpu), cpu)


def kthread_run_on_cpu(threadfn: Callable[[Any], int], data: Any, cpu: int,
                       namefmt: str) -> Task:
    """kthread_create_on_cpu() + wake_up_process()."""
    task = kthread_create_on_cpu(threadfn, data, cpu, namefmt)
    wake_up_process(task)
    return task


# --- the thread itself ---------------------------------------------------------------------

def _pin_self(task: Task) -> None:
    """Pin this new kthread to its CPU. The creator does not do it: pinning a child that
    already runs costs it ~1 ms. Re-checked, since kthread_bind() may change the CPU
    meanwhile (it sets task.cpu, then the affinity)."""
    while True:
        cpu = task._rec.cpu
        os.sched_setaffinity(0, {real_cpu(cpu)})
        if task._rec.cpu == cpu:
            records.field_or(task._rec, "kflags", KTHREAD_PINNED)
            wake_up_var(image.field_addr(task._rec, "kflags"))  # kthread_bind()
            return


def _become_kthread(task: Task) -> None:
    # Objects inherited from the creator are never collected here: a collection would
    # walk, and so copy page by page, the creator's whole heap.
    gc.freeze()
    img = image.this()
    # Join the supervisor's process group before letting go of the boot pipe: if the
    # booting process died meanwhile, closing our copy of its end kills the group, us too.
    os.setpgid(0, img.img.hdr.supervisor_pid)
    img.after_fork_in_task()
    for name in _IGNORED_SIGNALS:
        _os_signal.signal(getattr(_os_signal, name), _os_signal.SIG_IGN)
    _children.clear()
    task._rec.pid = os.getpid()
    _pin_self(task)
    if task._rec.flags & PF_NO_SETAFFINITY:
        complete(_task_completion(task, "parked"))  # the creator waits for this
    set_current(task)
    trace_comm(task.comm)
    irqchip.install_doorbell()
    install_show_stack()


def _kthread(task: Task) -> None:
    """The body of every kthread process (kernel/kthread.c: kthread())."""
    result = 0
    try:
        _become_kthread(task)
        rec = task._rec
        schedule()  # created in TASK_UNINTERRUPTIBLE (WCHAN_KTHREAD): wait for the first wake-up
        wchan_exit(WCHAN_NONE)
        records.field_or(rec, "kflags", KTHREAD_STARTED)
        irqchip.task_started(rec)
        if rec.kflags & KTHREAD_SHOULD_STOP:
            result = -EINTR
        else:
            if rec.kflags & KTHREAD_SHOULD_PARK:
                _kthread_parkme(task)
            result = task.threadfn(task.data)
    except KthreadExit as exc:
        result = exc.result
    except bug.TaskKilled:
        result = 0
    except BaseException as exc:  # an Oops: logged, counted, the task dies, others go on
        try:
            bug.oops(exc, f"{type(exc).__name__}: {exc}")
        except BaseException:
            pass
        result = 0
    finally:
        _do_exit(task, result)


def _do_exit(task: Task, result: Any) -> None:
    """Publish the result, post kthread->exited once, and leave the process."""
    try:
        rec = task._rec
        if preempt.in_atomic() or preempt.irqs_disabled():
            if preempt.irqs_disabled():
                log_store(5, f"note: {task.comm}[{task.pid}] exited with irqs disabled")
            if preempt.in_atomic():
                log_store(5, f"note: {task.comm}[{task.pid}] exited with preempt_count "
                                    f"{preempt.preempt_count()}")
        trace_point(PROCESS_EXIT)
        set_current(None)  # from here on the slot is only touched by exit_notify()
        exit_notify(rec, _to_int(result))
    finally:
        os._exit(0)


def exit_notify(rec: Any, result: int) -> None:
    """The end of do_exit() for a kthread's slot: publish `result`, mark it dead and post
    kthread->exited once. Nothing may touch the slot afterwards: the stopper frees it.
    Used by the exiting thread itself, and by the supervisor for one that died."""
    rec.result = result
    records.field_or(rec, "flags", PF_EXITING)
    records.field_or(rec, "kflags", KTHREAD_EXITED)
    wake_up_var(image.field_addr(rec, "kflags"))  # kthread_bind(), shutdown
    exited = _from_index(rec.exited, image.this().img.completions[rec.exited].generation)
    records.field_store(rec, "state", TASK_DEAD)  # full barrier: not a target
    irqchip.resend_pending(rec.cpu)  # what it was rung for and did not handle: to another task
    complete(exited)


def _to_int(result: Any) -> int:
    """kthread->result is an int: wider values are truncated as C would; None counts as 0."""
    if result is None:
        return 0
    try:
        value = int(result)
    except (TypeError, ValueError):
        bug.warn(f"threadfn returned {type(result).__name__}, not an int: result 0", depth=3)
        return 0
    return ((value + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def kthread_exit(result: int) -> None:
    """End the current kthread with `result` (what kthread_stop() returns). Does not return."""
    checks.check_int(result, "result", "long")
    me = current()
    if not me.is_kthread:
        bug.warn("kthread_exit() called by a task that is not a kthread", depth=2)
        raise EmuError("kthread_exit() may only be called by a kthread")
    raise KthreadExit(result)


def kthread_complete_and_exit(comp: Completion | None, code: int) -> None:
    """complete(comp) if given, then kthread_exit(code)."""
    if comp is not None and not isinstance(comp, Completion):
        raise checks.not_a("comp", "an emu.Completion or None", comp)
    checks.check_int(code, "code", "long")
    if comp is not None:
        complete(comp)
    kthread_exit(code)


# --- stop ------------------------------------------------------------------------------------

def _stopped_twice(task: Task) -> bool:
    rec = task._rec
    return rec.generation != task.generation or not rec.in_use


def kthread_stop(k: Task) -> int:
    """Ask `k` to stop, wake it, and wait (uninterruptibly) until it exited.

    Returns threadfn's return value (or kthread_exit()'s argument), -EINTR if threadfn
    never ran, 0 if the thread died by an Oops. Sets the persistent TIF_NOTIFY_SIGNAL,
    so interruptible sleeps of `k` end. Process context only.

    Misuse that makes the kernel hang is reported instead: stopping the current task
    is a BUG; stopping a task twice (or after it was released) is a WARN and
    returns -ESRCH; stopping a task that is not a kthread is a WARN (to_kthread()) and
    returns -EINVAL.
    """
    check_task(k, "k")
    me = current()
    if _stopped_twice(k):
        bug.warn(f"kthread_stop() on a task that was already stopped (slot {k.slot})", depth=2)
        return -ESRCH
    if not k.is_kthread:
        bug.warn(f"kthread_stop() on {k.comm}/{k.pid}, which is not a kthread", depth=2)
        return -EINVAL
    if k == me:
        bug.BUG(depth=2)
    rec = k.rec
    if not request_stop(k):
        bug.warn(f"kthread_stop() called twice on {k.comm}/{k.pid}", depth=2)
        return -ESRCH
    wait_for_completion(_task_completion(k, "exited"))
    result = int(rec.result)
    release_task(k)
    return result


def request_stop(k: Task) -> bool:
    """The asking half of kthread_stop(): KTHREAD_SHOULD_STOP, unpark, the persistent
    TIF_NOTIFY_SIGNAL, and a wake-up. False if a stop had already been requested."""
    if records.field_or(k.rec, "kflags", KTHREAD_SHOULD_STOP) & KTHREAD_SHOULD_STOP:
        return False
    kthread_unpark(k)
    k._rec.notify_signal = 1
    wake_up_process(k)
    return True


def _task_completion(task: Task, which: str) -> Completion:
    index: int = getattr(task._rec, which)
    return _from_index(index, image.this().img.completions[index].generation)


def release_task(k: Task) -> None:
    """Free an exited kthread's slot and completions and reap its process if it is our child."""
    pid = k.pid
    for which in ("exited", "parked"):
        c = _task_completion(k, which)
        c._owner = 0
        c._free()
    free_slot(k)
    if pid in _children:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass  # reap_children() was faster
        _children.pop(pid, None)


_reaping = False  # reap_children() is running in this process
_reap_again = False  # SIG_REAP arrived meanwhile: look once more


def reap_children() -> None:
    """Collect the kthread processes this process forked that exited; never another child.

    SIG_REAP's handler may call it while it runs (between any two bytecodes, also
    while it copies _children): the inner call only asks the outer one to look again.
    """
    global _reaping, _reap_again
    if _reaping:
        _reap_again = True
        return
    _reaping = True
    try:
        _reap_again = True
        while _reap_again:
            _reap_again = False
            _reap_exited()
    finally:
        _reaping = False


def _reap_exited() -> None:
    for pid, rec in list(_children.items()):
        if not rec.kflags & KTHREAD_EXITED:
            continue  # running, or its slot was released: release_task() collects it
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _children.pop(pid, None)


def _reap_signal(signum: int, frame: Any) -> None:
    # May run inside release_task() or shutdown: their waitpid() then finds no child.
    reap_children()


def install_reaper() -> None:
    """Let the supervisor ask this process to reap its exited kthreads (boot; a kthread
    inherits the handler and has nothing to reap)."""
    _os_signal.signal(SIG_REAP, _reap_signal)


# --- predicates and data ---------------------------------------------------------------------

def _current_kthread(what: str) -> Task | None:
    me = current()
    if not me.is_kthread:
        bug.warn(f"{what}() called by a task that is not a kthread", depth=3)
        return None
    return me


def kthread_should_stop() -> bool:
    """True once kthread_stop() was called on the current kthread."""
    me = _current_kthread("kthread_should_stop")
    return bool(me and me._rec.kflags & KTHREAD_SHOULD_STOP)


def kthread_should_park() -> bool:
    """True while a kthread_park() of the current kthread is pending."""
    me = _current_kthread("kthread_should_park")
    return bool(me and me._rec.kflags & KTHREAD_SHOULD_PARK)


def kthread_should_stop_or_park() -> bool:
    """Either flag; False (without a warning) for a task that is not a kthread."""
    me = current()
    return bool(me.is_kthread and me._rec.kflags & (KTHREAD_SHOULD_STOP | KTHREAD_SHOULD_PARK))


def kthread_data(task: Task) -> Any:
    """The `data` given at creation (WARN and None if `task` is not a kthread)."""
    if not check_task(task).is_kthread:
        bug.warn("kthread_data() on a task that is not a kthread", depth=2)
        return None
    return task.data


def kthread_func(task: Task) -> Any:
    """The threadfn given at creation, or None if `task` is not a kthread."""
    return task.threadfn if check_task(task).is_kthread else None


# --- binding -------------------------------------------------------------------------------

def _bind(k: Task, cpu: int) -> None:
    rec = k.rec
    if rec.state != TASK_UNINTERRUPTIBLE:
        bug.warn(f"kthread_bind() on {k.comm}/{k.pid}, which is not inactive: not bound", depth=3)
        return
    rec.cpu = cpu  # before the affinity: a starting thread re-checks it after pinning
    os.sched_setaffinity(k.pid, {real_cpu(cpu)})
    records.field_or(rec, "flags", PF_NO_SETAFFINITY)
    # A starting thread may still be pinning itself (or die first: exit_notify() wakes us).
    wait_var_event(image.field_addr(rec, "kflags"),
                   lambda: rec.kflags & (KTHREAD_PINNED | KTHREAD_EXITED))
    if rec.kflags & KTHREAD_STARTED:
        bug.warn(f"kthread_bind() on {k.comm}/{k.pid} after it started", depth=3)


def kthread_bind(k: Task, cpu: int) -> None:
    """Pin a just-created kthread to `cpu` for good. Only before its first wake-up."""
    check_task(k, "k")
    check_cpu(cpu)
    _bind(k, cpu)


def kthread_bind_mask(k: Task, cpus: Iterable[int]) -> None:
    """kthread_bind() to a set of CPUs. emu pins a task to exactly one CPU: the lowest of
    `cpus`, or the task's current CPU when it is in the set."""
    check_task(k, "k")
    if not isinstance(cpus, Iterable) or isinstance(cpus, (str, bytes)):
        raise checks.not_a("cpus", "an iterable of CPU numbers", cpus)
    mask = sorted({check_cpu(c, "cpus") for c in cpus})
    if not mask:
        raise ValueError("cpus must name at least one CPU")
    _bind(k, k.cpu if k.cpu in mask else mask[0])


# --- parking ---------------------------------------------------------------------------------

def _kthread_parkme(me: Task) -> None:
    rec = me._rec
    prev = wchan_enter(WCHAN_KTHREAD_PARKME)
    while True:
        records.field_xchg(rec, "state", TASK_PARKED)  # set_special_state()
        if not rec.kflags & KTHREAD_SHOULD_PARK:
            break
        wake_up_var(image.field_addr(rec, "kflags"))  # kthread_park()'s wait_task_inactive()
        complete(_task_completion(me, "parked"))
        schedule()
    wchan_exit(prev)
    set_current_state(TASK_RUNNING)


def kthread_parkme() -> None:
    """Park the current kthread (state P) while a park request is pending."""
    me = _current_kthread("kthread_parkme")
    if me is not None:
        _kthread_parkme(me)


def kthread_park(k: Task) -> int:
    """Ask `k` to park and wait until it is parked.

    Returns 0; -ENOSYS (with a WARN) if `k` is exiting; -EBUSY (with a WARN) if a park
    is already pending. A never-started thread parks without running threadfn.
    Parking is cooperative: `k` must call kthread_parkme(). Process context only.
    A task that is not a kthread is a WARN (to_kthread()) and returns -EINVAL.
    """
    check_task(k, "k")
    if not k.is_kthread:
        bug.warn(f"kthread_park() on {k.comm}/{k.pid}, which is not a kthread", depth=2)
        return -EINVAL
    rec = k.rec
    if rec.flags & PF_EXITING:
        bug.warn(f"kthread_park() on exiting task {k.comm}/{k.pid}", depth=2)
        return -ENOSYS
    old = records.field_or(k.rec, "kflags", KTHREAD_SHOULD_PARK)
    if old & KTHREAD_SHOULD_PARK:
        bug.warn(f"kthread_park() on {k.comm}/{k.pid}, which is already asked to park", depth=2)
        return -EBUSY
    if k != current():
        wake_up_process(k)
        wait_for_completion(_task_completion(k, "parked"))
        # wait_task_inactive(): it completed, it may not be asleep yet
        wait_var_event(image.field_addr(rec, "kflags"), lambda: rec.state == TASK_PARKED
                       or rec.kflags & KTHREAD_EXITED)
    return 0


def kthread_unpark(k: Task) -> None:
    """Clear a pending park request and wake `k` from TASK_PARKED. Does not wait."""
    check_task(k, "k")
    old = records.field_and(k.rec, "kflags", ~KTHREAD_SHOULD_PARK)
    if old & KTHREAD_SHOULD_PARK:
        wake_up_state(k, TASK_PARKED)
