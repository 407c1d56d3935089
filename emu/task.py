"""Tasks: the task table in the shared image, ``current``, task states, sleep and wake-up.

Every task (the booting program and each kthread) owns one slot of the task table and
one POSIX semaphore. The state protocol is the kernel's (implemented by native/'s WaitCore):

* the sleeper publishes its state with a full barrier (``set_current_state``), re-checks
  its wake condition, then blocks on its semaphore until its state is TASK_RUNNING;
* a waker moves the state from a sleeping one to TASK_RUNNING with compare-and-exchange
  and, only if it did, posts the sleeper's semaphore.

So a wake-up between "set state" and "sleep" is never lost (the sleeper finds
TASK_RUNNING), and a post that arrives after the sleeper already left is absorbed by
the next sleep, which re-checks its state in a loop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import posix_ipc

import _emu_native as _native

from . import checks, image, preempt, records
from .constants import (
    EXIT_DEAD,
    EXIT_ZOMBIE,
    INT_MAX,
    KTHREAD_NAME_LEN,
    PF_IDLE,
    PF_KTHREAD,
    TASK_COMM_LEN,
    TASK_DEAD,
    TASK_FROZEN,
    TASK_IDLE,
    TASK_NORMAL,
    TASK_PARKED,
    TASK_REPORT,
    TASK_REPORT_IDLE,
    TASK_RTLOCK_WAIT,
    TASK_RUNNING,
    TASK_UNINTERRUPTIBLE,
    UINT_MAX,
)
from .errors import CapacityError, EmuError, StaleObjectError


class _UserMM:
    """Stand-in for a user address space: ``current().mm is not None`` in user context."""

    def __repr__(self) -> str:
        return "<mm of the booting process>"


USER_MM = _UserMM()


class Task:
    """A handle on a task (``struct task_struct *``).

    Fields are read live from the shared task table, so every process sees the same
    values. A handle outlives its task: using it after the slot was released and reused
    raises :class:`emu.StaleObjectError` (the kernel's use-after-free).
    """

    __slots__ = ("slot", "generation", "_rec", "threadfn", "data", "__weakref__")

    def __init__(self, slot: int, generation: int) -> None:
        self.slot = slot
        self.generation = generation
        self._rec = image.this().img.tasks[slot]
        self.threadfn: Any = None
        self.data: Any = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (task_from_slot, (self.slot, self.generation))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Task)
            and other.slot == self.slot
            and other.generation == self.generation
        )

    def __hash__(self) -> int:
        return hash((self.slot, self.generation))

    def __repr__(self) -> str:
        state = task_state_to_char(self)
        return f"<Task {self.full_name!r} pid={self.pid} cpu={self.cpu} state={state}>"

    @property
    def rec(self) -> Any:
        """The task's slot; raises StaleObjectError once the task was released."""
        rec = self._rec
        if rec.generation != self.generation or not rec.in_use:
            raise StaleObjectError(
                f"task handle (slot {self.slot}) refers to a task that was already released; "
                "keep using a task only until kthread_stop() returned"
            )
        return rec

    @property
    def pid(self) -> int:
        """The task's process id (0 while a kthread's creator has not published it yet)."""
        return int(self._rec.pid)

    @property
    def comm(self) -> str:
        """The task's name as ps shows it (``task->comm``, at most 15 bytes)."""
        return self._rec.comm.decode("utf-8", "replace")

    @property
    def full_name(self) -> str:
        """The kthread's whole name (at most 63 bytes), of which `comm` is the start."""
        return self._rec.full_name.decode("utf-8", "replace")

    @property
    def cpu(self) -> int:
        """The emulated CPU the task is pinned to (``task_cpu()``)."""
        return int(self._rec.cpu)

    @property
    def state(self) -> int:
        """``__state``: an unsigned int (stored in an int32 field)."""
        return int(self._rec.state) & UINT_MAX

    @property
    def flags(self) -> int:
        """``task->flags``: PF_* bits (``emu.PF_KTHREAD``, ...)."""
        return int(self._rec.flags)

    @property
    def mm(self) -> Any:
        """None for a kthread (no user address space), a stand-in object for a user task."""
        return None if self._rec.flags & PF_KTHREAD else USER_MM

    @property
    def is_kthread(self) -> bool:
        """True for a kthread (PF_KTHREAD), False for the booting process."""
        return bool(self._rec.flags & PF_KTHREAD)


def check_task(task: object, name: str = "task") -> Task:
    """`task` if it is a Task handle; else the TypeError naming argument `name`."""
    if not isinstance(task, Task):
        raise checks.not_a(name, "an emu.Task", task) from None
    return task


def _check_state(state: Any, name: str) -> int:
    """A task state or mask (``unsigned int``) as native/ takes it: a signed 32-bit int."""
    value = checks.check_int(state, name, "unsigned int")
    return value - (1 << 32) if value > INT_MAX else value


# --- the task table ---------------------------------------------------------------------

_handles: dict[int, Task] = {}


def task_from_slot(slot: int, generation: int) -> Task:
    """The handle of slot `slot` in this process (one object per live task)."""
    t = _handles.get(slot)
    if t is None or t.generation != generation:
        t = Task(slot, generation)
        _handles[slot] = t
    return t


def alloc_slot(name: str, flags: int, cpu: int, state: int) -> Task:
    """Reserve a free task slot, initialised for a task called `name`.

    Raises CapacityError when the table is full.
    """
    img = image.this()
    hdr = img.img.hdr
    lock = image.field_addr(hdr, "task_lock")
    records.raw_spin_lock(lock)
    try:
        for i in range(hdr.max_tasks):
            rec = img.img.tasks[i]
            if not rec.in_use:
                break
        else:
            raise CapacityError(
                f"all {hdr.max_tasks} task slots are in use: stop finished kthreads with "
                "kthread_stop() or boot with a larger max_tasks="
            )
        gen = rec.generation + 1
        hdr.task_high = max(hdr.task_high, i + 1)
        _reset_slot(rec)
        rec.generation = gen
        rec.in_use = 1
    finally:
        records.raw_spin_unlock(lock)
    _drain(img.sems[i])
    rec.flags = flags
    rec.cpu = cpu
    rec.state = state
    rec.comm = _truncate(name, TASK_COMM_LEN - 1)
    rec.full_name = _truncate(name, KTHREAD_NAME_LEN - 1)
    rec.start_ns = time.monotonic_ns()
    _handles.pop(i, None)
    return task_from_slot(i, gen)


def _truncate(name: str, size: int) -> bytes:
    """`name` in UTF-8, cut to at most `size` bytes on a character boundary."""
    return name.encode("utf-8")[:size].decode("utf-8", "ignore").encode("utf-8")


def _reset_slot(rec: Any) -> None:
    for name, _ in type(rec)._fields_:
        if name not in ("generation", "in_use", "comm", "full_name"):
            setattr(rec, name, 0)
    rec.wq_next = -1
    rec.exited = -1
    rec.parked = -1


def _drain(sem: posix_ipc.Semaphore) -> None:
    """Absorb posts left on a reused slot's semaphore."""
    while True:
        try:
            sem.acquire(0)
        except posix_ipc.BusyError:
            return


def free_slot(task: Task) -> None:
    """Release a task's slot for reuse; handles on it become stale."""
    rec = task._rec
    if rec.generation == task.generation:
        rec.in_use = 0
    _handles.pop(task.slot, None)


def live_tasks() -> list[Task]:
    """Every task in the table, in slot order."""
    img = image.this()
    out = []
    for i in range(img.img.hdr.task_high):
        rec = img.img.tasks[i]
        if rec.in_use:
            out.append(task_from_slot(i, rec.generation))
    return out


# --- current ----------------------------------------------------------------------------

_current: Task | None = None
_state_addr = 0
_wchan_addr = 0


def set_current(task: Task | None) -> None:
    """Make `task` this process's ``current`` (boot and kthread start-up only)."""
    global _current, _state_addr, _wchan_addr
    _current = task
    core = image._this.core if image._this is not None else None
    if core is not None:
        core.set_current(-1 if task is None else task.slot)
    if task is None:
        _state_addr = _wchan_addr = 0
        preempt.attach(None)
        return
    _state_addr = image.field_addr(task._rec, "state")
    _wchan_addr = image.field_addr(task._rec, "wchan")
    preempt.attach(task._rec)


def current() -> Task:
    """The task this process runs (``current``): a kthread, or the booting program."""
    if _current is None:
        image.this()  # raises NotBootedError when nothing is booted
        raise EmuError(
            "this process is not an emu task: only the booting process and kthreads "
            "may call kernel APIs"
        )
    return _current


# --- states -------------------------------------------------------------------------------

def set_current_state(state: int) -> None:
    """Publish this task's state with a full barrier (smp_store_mb)."""
    if type(state) is not int or not 0 <= state <= UINT_MAX:
        _check_state(state, "state")
    current()
    _native.xchg32(_state_addr, state)


def __set_current_state(state: int) -> None:
    """Publish this task's state without a barrier (the caller serialises with a lock)."""
    current()
    _native.store32(_state_addr, state)


def current_state() -> int:
    """The current task's state (TASK_*). Any context."""
    return _native.load32(_state_addr)


def wake_up_state(task: Task, mask: int) -> int:
    """Wake `task` if its state has a bit of `mask`: 1 if it was woken, else 0.

    Safe from any context; never sleeps.
    """
    if type(mask) is not int or not 0 <= mask <= INT_MAX:
        mask = _check_state(mask, "mask")
    return wake_slot(_live_slot(task), mask)


def _live_slot(task: Task) -> int:
    """`task`'s slot; StaleObjectError once it was released, TypeError for a non-Task."""
    try:
        _ = task.rec
        return task.slot
    except AttributeError:  # only a Task has both
        check_task(task)
        raise


def wake_slot(slot: int, mask: int) -> int:
    """wake_up_state() by task-table slot (for wait queues, which hold slots)."""
    return int(image.this().core.wake(slot, mask))


def wake_up_process(task: Task) -> int:
    """Wake a task sleeping in TASK_NORMAL (interruptible, uninterruptible, killable, idle).

    Returns 1 if the task was changed to running, 0 if it was already running or in a
    state this does not wake (parked, dead). Any context.
    """
    return wake_slot(_live_slot(task), TASK_NORMAL)


#: The scheduler's notice to the workqueue that this task blocks (``sched_hook(True)``,
#: wq_worker_sleeping()) and runs again (``sched_hook(False)``, wq_worker_running()).
#: None but in a kworker process, where workqueue.py sets it.
sched_hook: Callable[[bool], None] | None = None


def sleep(deadline_ns: int | None, wchan: int = 0) -> bool:
    """Block until this task is woken (state TASK_RUNNING) or CLOCK_MONOTONIC passes `deadline_ns`.

    The caller has set a sleeping state. Returns True if woken, False on time-out (this
    task then put itself back to TASK_RUNNING). If the wait is abandoned by an exception
    (KeyboardInterrupt in the booting process) the state is reset before it propagates.
    `wchan` (WCHAN_*) names the sleep in ps unless an outer wchan_enter() named it.
    """
    assert _current is not None
    deadline = -1 if deadline_ns is None else deadline_ns
    prev = wchan_enter(wchan)
    hook = sched_hook
    try:
        if hook is None:
            return bool(image.this().core.sleep(_current.slot, deadline))
        hook(True)
        try:
            return bool(image.this().core.sleep(_current.slot, deadline))
        finally:
            hook(False)
    finally:
        wchan_exit(prev)


# --- WCHAN: what a sleeping task waits in ------------------------------------------------------
#
# A task queued on a completion shows it (the task record's wq_on, kept by the wait core);
# any other sleep publishes a small code in the task record, set by the outermost
# sleeping function (msleep() sleeps in schedule_timeout(), but ps says msleep).

WCHAN_NONE = 0
WCHAN_SCHEDULE = 1
WCHAN_SCHEDULE_TIMEOUT = 2
WCHAN_MSLEEP = 3
WCHAN_KTHREAD_PARKME = 4
WCHAN_USLEEP_RANGE = 5
WCHAN_KTHREAD = 6  # a created kthread waiting for its first wake-up
WCHAN_NAMES = ("-", "schedule", "schedule_timeout", "msleep", "kthread_parkme",
               "usleep_range", "kthread")


def wchan_enter(code: int) -> int:
    """Name the current task's sleeps `code` unless an outer caller named them already.

    Returns what to give wchan_exit(). Process context; never sleeps.
    """
    prev = _native.load32(_wchan_addr)
    if not prev:
        _native.store32(_wchan_addr, code)
    return prev


def wchan_exit(prev: int) -> None:
    """Undo the matching wchan_enter()."""
    if not prev:
        _native.store32(_wchan_addr, WCHAN_NONE)


# --- reporting ------------------------------------------------------------------------------

_STATE_LETTERS = "RSDTtXZPI"


def task_state_index(state: int) -> int:
    """__task_state_index(): index into "RSDTtXZPI" for a raw state value."""
    report = state & TASK_REPORT
    if state & TASK_IDLE == TASK_IDLE:
        report = TASK_REPORT_IDLE
    if state & (TASK_RTLOCK_WAIT | TASK_FROZEN):
        report = TASK_UNINTERRUPTIBLE
    return report.bit_length()


def task_state_to_char(task: Task) -> str:
    """The ps letter of `task`: one of R S D T t X Z P I."""
    state = check_task(task).state
    if state == TASK_DEAD:
        return "X"
    return _STATE_LETTERS[task_state_index(state)]


def state_char(state: int) -> str:
    """The ps letter of a raw TASK_* state value."""
    return "X" if state == TASK_DEAD else _STATE_LETTERS[task_state_index(state)]


def wchan_of(img: Any, rec: Any) -> str:
    """What task record `rec` of image `img` (the ctypes image) sleeps on, for ps's WCHAN:
    ``completion#ID (file.py:LINE)`` while queued on a completion, else the name of the
    sleeping function; "-" when running."""
    if rec.state == TASK_RUNNING:
        return "-"
    on = rec.wq_on
    if 0 < on <= len(img.completions):
        site = img.completions[on - 1].site.decode("utf-8", "replace")
        return f"completion#{on - 1} ({site})" if site else f"completion#{on - 1}"
    code = rec.wchan
    return WCHAN_NAMES[code] if 0 <= code < len(WCHAN_NAMES) else "-"


def ps_table(img: Any) -> list[str]:
    """A ps-style table of the ctypes image `img`: ``PID CPU S WCHAN COMMAND`` (kthread
    names in [brackets]); idle tasks are not listed, like pid 0. Reads without locks
    (a racing row may be a moment old), so an inspector's read-only mapping serves too."""
    rows = []
    for i in range(min(img.hdr.task_high, len(img.tasks))):
        rec = img.tasks[i]
        if not rec.in_use or rec.flags & PF_IDLE:
            continue
        name = rec.full_name.decode("utf-8", "replace")
        name = f"[{name}]" if rec.flags & PF_KTHREAD else name
        rows.append((rec.pid, rec.cpu, state_char(rec.state), wchan_of(img, rec), name))
    width = max([len("WCHAN"), *(len(r[3]) for r in rows)])
    lines = [f"{'PID':>7} {'CPU':>3} S {'WCHAN':<{width}} COMMAND"]
    lines += [f"{pid:>7} {cpu:>3} {s} {w:<{width}} {name}" for pid, cpu, s, w, name in rows]
    return lines


def ps_lines() -> list[str]:
    """A ps-style table of this kernel's tasks (see ps_table())."""
    return ps_table(image.this().img)


def _after_fork_in_child() -> None:
    # A forked process is not yet a task; kthread start-up calls set_current().
    global _current
    _current = None  # preempt detaches itself in its own fork hook


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = [
    "Task", "current", "set_current_state", "wake_up_process", "wake_up_state",
    "task_state_to_char", "EXIT_DEAD", "EXIT_ZOMBIE", "TASK_PARKED",
]
