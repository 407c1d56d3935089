"""emu: Linux-kernel-style concurrency for real, in Python.

Boot a kernel, start kthreads (each a real process pinned to a CPU), and synchronise
them with completions that follow the kernel's semantics::

    import emu

    with emu.boot() as kernel:
        done = emu.Completion()
        t = emu.kthread_run(lambda c: emu.complete(c) or 0, done, "worker/%d", 0)
        emu.wait_for_completion(done)
        emu.kthread_stop(t)

Every name here follows the kernel's API (see API.md); errors are negative errno
values, misuse is reported in the kernel log the kernel's way.
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
