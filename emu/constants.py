"""Numeric constants with the Linux kernel's values (include/linux/sched.h, errno.h).

The numbers native/ uses in its own logic are defined there and taken from it here, so
that each is defined once; Python code imports them all from this module.
"""

from __future__ import annotations

import errno as _errno

import _emu_native as _native

# Task state bits (include/linux/sched.h, v6.1+).
TASK_RUNNING = _native.TASK_RUNNING
TASK_INTERRUPTIBLE = _native.TASK_INTERRUPTIBLE
TASK_UNINTERRUPTIBLE = _native.TASK_UNINTERRUPTIBLE
__TASK_STOPPED = 0x0004
__TASK_TRACED = 0x0008
EXIT_DEAD = 0x0010
EXIT_ZOMBIE = 0x0020
TASK_PARKED = 0x0040
TASK_DEAD = 0x0080
TASK_WAKEKILL = _native.TASK_WAKEKILL
TASK_WAKING = 0x0200
TASK_NOLOAD = 0x0400
TASK_NEW = 0x0800
TASK_RTLOCK_WAIT = 0x1000
TASK_FREEZABLE = 0x2000
TASK_FROZEN = 0x8000
TASK_STATE_MAX = 0x10000

TASK_KILLABLE = TASK_WAKEKILL | TASK_UNINTERRUPTIBLE
TASK_STOPPED = TASK_WAKEKILL | __TASK_STOPPED
TASK_TRACED = __TASK_TRACED
TASK_IDLE = TASK_UNINTERRUPTIBLE | TASK_NOLOAD
TASK_NORMAL = _native.TASK_NORMAL
TASK_REPORT = 0x7F
TASK_REPORT_IDLE = TASK_REPORT + 1

#: States that set_current_state() must not be given (set_special_state() only).
TASK_SPECIAL_STATES = __TASK_STOPPED | __TASK_TRACED | TASK_PARKED | TASK_DEAD

# Task flags (include/linux/sched.h).
PF_IDLE = _native.PF_IDLE
PF_EXITING = 0x00000004
PF_WQ_WORKER = 0x00000020  # a kworker: the workqueue's, not a module's
PF_KTHREAD = 0x00200000
PF_NO_SETAFFINITY = 0x04000000

#: The interrupt-enable bit of the flags local_irq_save() returns (x86 EFLAGS.IF).
X86_EFLAGS_IF = 0x200

TASK_COMM_LEN = 16
KTHREAD_NAME_LEN = 64

# Error numbers; ERESTARTSYS is kernel-internal (include/linux/errno.h).
EINTR = _errno.EINTR
ESRCH = _errno.ESRCH
ENOMEM = _errno.ENOMEM
EBUSY = _errno.EBUSY
EINVAL = _errno.EINVAL
ENOSYS = _errno.ENOSYS
ERESTARTSYS = _native.ERESTARTSYS

LONG_MAX = (1 << 63) - 1
MAX_SCHEDULE_TIMEOUT = LONG_MAX
UINT_MAX = 0xFFFFFFFF
INT_MIN = -(1 << 31)
INT_MAX = (1 << 31) - 1

# Taint flags (include/linux/panic.h); bug.py prints their letters.
TAINT_WARN = 9
TAINT_DIE = 7
