"""emu: Linux-kernel-style concurrency for real, in Python.

Boot a kernel, start kthreads (each a real process pinned to a CPU), and synchronise
them with completions that follow the kernel's semantics::

    import emu

    with emu.boot() as kernel:
        done = emu.Completion()
        t = emu.kthread_run(lambda c: emu.complete(c) or 0, done, "worker/%d", 0)
        emu.wait_for_completion(done)
        emu.kthread_stop(t)

Every name here follows the kernel's API: names, argument order and return values
are the kernel's; errors are negative errno values, timeouts are jiffies, misuse is
reported in the kernel log the kernel's way. The documentation (a tutorial and the
API reference built from these docstrings) is in the repository's docs/, built by
tools/docs.
"""

from __future__ import annotations

import sys

try:  # the compiled part, a top-level module so that a source checkout finds it too
    import _emu_native
except ImportError as exc:
    raise ImportError(
        f"emu's compiled part (the C extension _emu_native) is not installed for this "
        f"Python ({sys.executable}): run `pip install .` in the emu source tree (it needs "
        f"a C compiler), then try again"
    ) from exc

from . import checks as _checks
from .atomic import (
    ATOMIC_INIT,
    Atomic,
    Atomic64,
    atomic64_add,
    atomic64_add_return,
    atomic64_cmpxchg,
    atomic64_dec,
    atomic64_dec_and_test,
    atomic64_dec_return,
    atomic64_inc,
    atomic64_inc_and_test,
    atomic64_inc_return,
    atomic64_read,
    atomic64_set,
    atomic64_sub,
    atomic64_sub_return,
    atomic64_xchg,
    atomic_add,
    atomic_add_return,
    atomic_cmpxchg,
    atomic_dec,
    atomic_dec_and_test,
    atomic_dec_return,
    atomic_inc,
    atomic_inc_and_test,
    atomic_inc_return,
    atomic_read,
    atomic_set,
    atomic_sub,
    atomic_sub_return,
    atomic_xchg,
)
from .bug import KernelBug
from .completion import (
    DECLARE_COMPLETION,
    Completion,
    complete,
    complete_all,
    completion_done,
    init_completion,
    reinit_completion,
    try_wait_for_completion,
    wait_for_completion,
    wait_for_completion_interruptible,
    wait_for_completion_interruptible_timeout,
    wait_for_completion_io,
    wait_for_completion_io_timeout,
    wait_for_completion_killable,
    wait_for_completion_killable_timeout,
    wait_for_completion_state,
    wait_for_completion_timeout,
)
from .constants import (
    EBUSY,
    EINTR,
    EINVAL,
    ENOMEM,
    ENOSYS,
    ERESTARTSYS,
    ESRCH,
    MAX_SCHEDULE_TIMEOUT,
    PF_EXITING,
    PF_KTHREAD,
    PF_NO_SETAFFINITY,
    PF_WQ_WORKER,
    TASK_COMM_LEN,
    TASK_DEAD,
    TASK_IDLE,
    TASK_INTERRUPTIBLE,
    TASK_KILLABLE,
    TASK_NOLOAD,
    TASK_NORMAL,
    TASK_PARKED,
    TASK_RUNNING,
    TASK_UNINTERRUPTIBLE,
    TASK_WAKEKILL,
    UINT_MAX,
)
from .errors import (
    AlreadyBootedError,
    CapacityError,
    EmuError,
    KernelDeadError,
    NotBootedError,
    StaleObjectError,
)
from .irq import (
    IRQ_HANDLED,
    IRQ_NONE,
    IRQ_WAKE_THREAD,
    IRQF_ONESHOT,
    IRQF_SHARED,
    disable_irq,
    disable_irq_nosync,
    enable_irq,
    free_irq,
    irq_inject_interrupt,
    irq_set_affinity,
    request_irq,
    request_threaded_irq,
    synchronize_irq,
)
from .kernel import HZ_DEFAULT as HZ
from .kernel import NR_CPUS, Kernel, boot
from .kfifo import (
    Kfifo,
    kfifo_alloc,
    kfifo_avail,
    kfifo_esize,
    kfifo_free,
    kfifo_get,
    kfifo_in,
    kfifo_in_spinlocked,
    kfifo_is_empty,
    kfifo_is_full,
    kfifo_len,
    kfifo_out,
    kfifo_out_spinlocked,
    kfifo_peek,
    kfifo_put,
    kfifo_reset,
    kfifo_reset_out,
    kfifo_size,
)
from .kthread import (
    kthread_bind,
    kthread_bind_mask,
    kthread_complete_and_exit,
    kthread_create,
    kthread_create_on_cpu,
    kthread_data,
    kthread_exit,
    kthread_func,
    kthread_park,
    kthread_parkme,
    kthread_run,
    kthread_run_on_cpu,
    kthread_should_park,
    kthread_should_stop,
    kthread_should_stop_or_park,
    kthread_stop,
    kthread_unpark,
)
from .kthread_worker import (
    KthreadDelayedWork,
    KthreadWork,
    KthreadWorker,
    kthread_cancel_delayed_work_sync,
    kthread_cancel_work_sync,
    kthread_create_worker,
    kthread_create_worker_on_cpu,
    kthread_destroy_worker,
    kthread_flush_work,
    kthread_flush_worker,
    kthread_init_work,
    kthread_mod_delayed_work,
    kthread_queue_delayed_work,
    kthread_queue_work,
    kthread_run_worker,
    kthread_run_worker_on_cpu,
)
from .module import module_exit, module_init, module_param
from .preempt import (
    in_atomic,
    in_hardirq,
    in_interrupt,
    in_irq,
    in_nmi,
    in_serving_softirq,
    in_softirq,
    in_task,
    irqs_disabled,
    local_bh_disable,
    local_bh_enable,
    local_irq_disable,
    local_irq_enable,
    local_irq_restore,
    local_irq_save,
    might_sleep,
    preempt_count,
    preempt_disable,
    preempt_enable,
    preemptible,
    this_cpu,
)
from .printk import (
    KERN_ALERT,
    KERN_CONT,
    KERN_CRIT,
    KERN_DEBUG,
    KERN_DEFAULT,
    KERN_EMERG,
    KERN_ERR,
    KERN_INFO,
    KERN_NOTICE,
    KERN_WARNING,
    pr_alert,
    pr_cont,
    pr_crit,
    pr_debug,
    pr_emerg,
    pr_err,
    pr_info,
    pr_notice,
    pr_warn,
    pr_warning,
    printk,
)
from .sched import (
    jiffies,
    jiffies_to_msecs,
    msecs_to_jiffies,
    msleep,
    msleep_interruptible,
    schedule,
    schedule_timeout,
    schedule_timeout_idle,
    schedule_timeout_interruptible,
    schedule_timeout_killable,
    schedule_timeout_uninterruptible,
    ssleep,
    usecs_to_jiffies,
    usleep_range,
)
from .signal import (
    allow_kernel_signal,
    allow_signal,
    disallow_signal,
    fatal_signal_pending,
    flush_signals,
    kernel_dequeue_signal,
    send_sig,
    signal_pending,
)
from .slab import (
    GFP_ATOMIC,
    GFP_KERNEL,
    GFP_NOWAIT,
    Kbuf,
    kcalloc,
    kfree,
    kmalloc,
    kmalloc_array,
    ksize,
    kzalloc,
    kzalloc_struct,
)
from .softirq import (
    Tasklet,
    tasklet_disable,
    tasklet_enable,
    tasklet_hi_schedule,
    tasklet_kill,
    tasklet_schedule,
    tasklet_setup,
)
from .spinlock import (
    DEFINE_SPINLOCK,
    Spinlock,
    spin_is_locked,
    spin_lock,
    spin_lock_bh,
    spin_lock_init,
    spin_lock_irq,
    spin_lock_irqsave,
    spin_trylock,
    spin_unlock,
    spin_unlock_bh,
    spin_unlock_irq,
    spin_unlock_irqrestore,
)
from .task import (
    Task,
    current,
    set_current_state,
    task_state_to_char,
    wake_up_process,
    wake_up_state,
)
from .timer import (
    DEFINE_TIMER,
    TIMER_DEFERRABLE,
    TIMER_IRQSAFE,
    TIMER_PINNED,
    TimerList,
    add_timer,
    del_timer,
    del_timer_sync,
    mod_timer,
    mod_timer_pending,
    timer_delete,
    timer_delete_sync,
    timer_pending,
    timer_setup,
    timer_shutdown,
    timer_shutdown_sync,
)
from .wait import (
    DECLARE_WAIT_QUEUE_HEAD,
    WaitQueueHead,
    init_waitqueue_head,
    wait_event,
    wait_event_idle,
    wait_event_idle_timeout,
    wait_event_interruptible,
    wait_event_interruptible_exclusive,
    wait_event_interruptible_timeout,
    wait_event_killable,
    wait_event_killable_timeout,
    wait_event_timeout,
    waitqueue_active,
    wake_up,
    wake_up_all,
    wake_up_interruptible,
    wake_up_interruptible_all,
    wake_up_interruptible_nr,
    wake_up_nr,
)
from .workqueue import (
    INIT_DELAYED_WORK,
    INIT_WORK,
    WORK_CPU_UNBOUND,
    WQ_CPU_INTENSIVE,
    WQ_DFL_ACTIVE,
    WQ_FREEZABLE,
    WQ_HIGHPRI,
    WQ_MAX_ACTIVE,
    WQ_MEM_RECLAIM,
    WQ_POWER_EFFICIENT,
    WQ_SYSFS,
    WQ_UNBOUND,
    DelayedWork,
    Work,
    Workqueue,
    alloc_ordered_workqueue,
    alloc_workqueue,
    cancel_delayed_work,
    cancel_delayed_work_sync,
    cancel_work,
    cancel_work_sync,
    current_work,
    destroy_workqueue,
    drain_workqueue,
    flush_delayed_work,
    flush_work,
    flush_workqueue,
    mod_delayed_work,
    mod_delayed_work_on,
    queue_delayed_work,
    queue_delayed_work_on,
    queue_work,
    queue_work_on,
    schedule_delayed_work,
    schedule_work,
    schedule_work_on,
    system_highpri_wq,
    system_long_wq,
    system_unbound_wq,
    system_wq,
    work_pending,
)


class ErrPtr:
    """An ERR_PTR(): a kernel function's error in place of an object."""

    __slots__ = ("errno",)

    def __init__(self, errno: int) -> None:
        self.errno = errno

    def __repr__(self) -> str:
        return f"ERR_PTR({self.errno})"


def ERR_PTR(errno: int) -> ErrPtr:
    """A kernel function's error `errno` (negative, e.g. -EINTR) in place of an object:
    IS_ERR() is true for it and PTR_ERR() gives `errno` back. Any context."""
    return ErrPtr(_checks.check_int(errno, "errno", "long"))


def IS_ERR(x: object) -> bool:
    """True if `x` is an ERR_PTR."""
    return isinstance(x, ErrPtr)


def PTR_ERR(x: ErrPtr) -> int:
    """The (negative) errno carried by an ERR_PTR."""
    if not isinstance(x, ErrPtr):
        raise _checks.not_a("x", "an emu.ErrPtr", x)
    return x.errno


__version__ = "0.1.0"


#: The public API: every name above, and nothing from the modules behind it.
__all__ = [
    "ATOMIC_INIT", "AlreadyBootedError", "Atomic", "Atomic64", "CapacityError",
    "Completion", "DECLARE_COMPLETION", "DECLARE_WAIT_QUEUE_HEAD", "DEFINE_SPINLOCK",
    "DEFINE_TIMER", "DelayedWork", "EBUSY", "EINTR", "EINVAL", "ENOMEM", "ENOSYS",
    "ERESTARTSYS", "ERR_PTR", "ESRCH", "EmuError", "ErrPtr", "GFP_ATOMIC", "GFP_KERNEL",
    "GFP_NOWAIT", "HZ", "INIT_DELAYED_WORK", "INIT_WORK", "IRQF_ONESHOT", "IRQF_SHARED",
    "IRQ_HANDLED", "IRQ_NONE", "IRQ_WAKE_THREAD", "IS_ERR", "KERN_ALERT", "KERN_CONT",
    "KERN_CRIT", "KERN_DEBUG", "KERN_DEFAULT", "KERN_EMERG", "KERN_ERR", "KERN_INFO",
    "KERN_NOTICE", "KERN_WARNING", "Kbuf", "Kernel", "KernelBug", "KernelDeadError",
    "Kfifo", "KthreadDelayedWork", "KthreadWork", "KthreadWorker", "MAX_SCHEDULE_TIMEOUT",
    "NR_CPUS", "NotBootedError", "PF_EXITING", "PF_KTHREAD", "PF_NO_SETAFFINITY",
    "PF_WQ_WORKER", "PTR_ERR", "Spinlock", "StaleObjectError", "TASK_COMM_LEN", "TASK_DEAD",
    "TASK_IDLE", "TASK_INTERRUPTIBLE", "TASK_KILLABLE", "TASK_NOLOAD", "TASK_NORMAL",
    "TASK_PARKED", "TASK_RUNNING", "TASK_UNINTERRUPTIBLE", "TASK_WAKEKILL",
    "TIMER_DEFERRABLE", "TIMER_IRQSAFE", "TIMER_PINNED", "Task", "Tasklet", "TimerList",
    "UINT_MAX", "WORK_CPU_UNBOUND", "WQ_CPU_INTENSIVE", "WQ_DFL_ACTIVE", "WQ_FREEZABLE",
    "WQ_HIGHPRI", "WQ_MAX_ACTIVE", "WQ_MEM_RECLAIM", "WQ_POWER_EFFICIENT", "WQ_SYSFS",
    "WQ_UNBOUND", "WaitQueueHead", "Work", "Workqueue", "add_timer",
    "alloc_ordered_workqueue", "alloc_workqueue", "allow_kernel_signal", "allow_signal",
    "atomic64_add", "atomic64_add_return", "atomic64_cmpxchg", "atomic64_dec",
    "atomic64_dec_and_test", "atomic64_dec_return", "atomic64_inc", "atomic64_inc_and_test",
    "atomic64_inc_return", "atomic64_read", "atomic64_set", "atomic64_sub",
    "atomic64_sub_return", "atomic64_xchg", "atomic_add", "atomic_add_return",
    "atomic_cmpxchg", "atomic_dec", "atomic_dec_and_test", "atomic_dec_return",
    "atomic_inc", "atomic_inc_and_test", "atomic_inc_return", "atomic_read", "atomic_set",
    "atomic_sub", "atomic_sub_return", "atomic_xchg", "boot", "cancel_delayed_work",
    "cancel_delayed_work_sync", "cancel_work", "cancel_work_sync", "complete",
    "complete_all", "completion_done", "current", "current_work", "del_timer",
    "del_timer_sync", "destroy_workqueue", "disable_irq", "disable_irq_nosync",
    "disallow_signal", "drain_workqueue", "enable_irq", "fatal_signal_pending",
    "flush_delayed_work", "flush_signals", "flush_work", "flush_workqueue", "free_irq",
    "in_atomic", "in_hardirq", "in_interrupt", "in_irq", "in_nmi", "in_serving_softirq",
    "in_softirq", "in_task", "init_completion", "init_waitqueue_head",
    "irq_inject_interrupt", "irq_set_affinity", "irqs_disabled", "jiffies",
    "jiffies_to_msecs", "kcalloc", "kernel_dequeue_signal", "kfifo_alloc", "kfifo_avail",
    "kfifo_esize", "kfifo_free", "kfifo_get", "kfifo_in", "kfifo_in_spinlocked",
    "kfifo_is_empty", "kfifo_is_full", "kfifo_len", "kfifo_out", "kfifo_out_spinlocked",
    "kfifo_peek", "kfifo_put", "kfifo_reset", "kfifo_reset_out", "kfifo_size", "kfree",
    "kmalloc", "kmalloc_array", "ksize", "kthread_bind", "kthread_bind_mask",
    "kthread_cancel_delayed_work_sync", "kthread_cancel_work_sync",
    "kthread_complete_and_exit", "kthread_create", "kthread_create_on_cpu",
    "kthread_create_worker", "kthread_create_worker_on_cpu", "kthread_data",
    "kthread_destroy_worker", "kthread_exit", "kthread_flush_work", "kthread_flush_worker",
    "kthread_func", "kthread_init_work", "kthread_mod_delayed_work", "kthread_park",
    "kthread_parkme", "kthread_queue_delayed_work", "kthread_queue_work", "kthread_run",
    "kthread_run_on_cpu", "kthread_run_worker", "kthread_run_worker_on_cpu",
    "kthread_should_park", "kthread_should_stop", "kthread_should_stop_or_park",
    "kthread_stop", "kthread_unpark", "kzalloc", "kzalloc_struct", "local_bh_disable",
    "local_bh_enable", "local_irq_disable", "local_irq_enable", "local_irq_restore",
    "local_irq_save", "might_sleep", "mod_delayed_work", "mod_delayed_work_on", "mod_timer",
    "mod_timer_pending", "module_exit", "module_init", "module_param", "msecs_to_jiffies",
    "msleep", "msleep_interruptible", "pr_alert", "pr_cont", "pr_crit", "pr_debug",
    "pr_emerg", "pr_err", "pr_info", "pr_notice", "pr_warn", "pr_warning", "preempt_count",
    "preempt_disable", "preempt_enable", "preemptible", "printk", "queue_delayed_work",
    "queue_delayed_work_on", "queue_work", "queue_work_on", "reinit_completion",
    "request_irq", "request_threaded_irq", "schedule", "schedule_delayed_work",
    "schedule_timeout", "schedule_timeout_idle", "schedule_timeout_interruptible",
    "schedule_timeout_killable", "schedule_timeout_uninterruptible", "schedule_work",
    "schedule_work_on", "send_sig", "set_current_state", "signal_pending", "spin_is_locked",
    "spin_lock", "spin_lock_bh", "spin_lock_init", "spin_lock_irq", "spin_lock_irqsave",
    "spin_trylock", "spin_unlock", "spin_unlock_bh", "spin_unlock_irq",
    "spin_unlock_irqrestore", "ssleep", "synchronize_irq", "system_highpri_wq",
    "system_long_wq", "system_unbound_wq", "system_wq", "task_state_to_char",
    "tasklet_disable", "tasklet_enable", "tasklet_hi_schedule", "tasklet_kill",
    "tasklet_schedule", "tasklet_setup", "this_cpu", "timer_delete", "timer_delete_sync",
    "timer_pending", "timer_setup", "timer_shutdown", "timer_shutdown_sync",
    "try_wait_for_completion", "usecs_to_jiffies", "usleep_range", "wait_event",
    "wait_event_idle", "wait_event_idle_timeout", "wait_event_interruptible",
    "wait_event_interruptible_exclusive", "wait_event_interruptible_timeout",
    "wait_event_killable", "wait_event_killable_timeout", "wait_event_timeout",
    "wait_for_completion", "wait_for_completion_interruptible",
    "wait_for_completion_interruptible_timeout", "wait_for_completion_io",
    "wait_for_completion_io_timeout", "wait_for_completion_killable",
    "wait_for_completion_killable_timeout", "wait_for_completion_state",
    "wait_for_completion_timeout", "waitqueue_active", "wake_up", "wake_up_all",
    "wake_up_interruptible", "wake_up_interruptible_all", "wake_up_interruptible_nr",
    "wake_up_nr", "wake_up_process", "wake_up_state", "work_pending", "__version__",
]
