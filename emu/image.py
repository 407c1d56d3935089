"""The shared kernel image: one POSIX shared-memory segment, laid out here and only here.

Every structure that lives in shared memory is declared in this module; other modules
reach fields through these ctypes classes and never compute offsets themselves.

The segment is created exclusively under an unguessable name with mode 0600, mapped,
and its name unlinked at once: every task inherits the mapping over fork, so no
/dev/shm entry exists after boot and none can be left behind by a crash. The per-task
POSIX semaphores (the tasks' sleep/wake primitive) are handled the same way.
"""

from __future__ import annotations

import array
import ctypes
import functools
import mmap
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from ctypes import c_char, c_int32, c_int64, c_uint8, c_uint32, c_uint64
from typing import Any, Protocol, TypeVar, cast, overload

import posix_ipc

import _emu_native as _native

from .constants import KTHREAD_NAME_LEN, TASK_COMM_LEN
from .errors import NotBootedError

IMAGE_MAGIC = 0x454D55494D414745  # "EMUIMAGE"
#: The most emulated CPUs a kernel may have (CONFIG_NR_CPUS). The per-CPU parts of the
#: image are sized by the CPUs a kernel has, not by this.
NR_CPUS = 1024
#: IRQ lines are bits of a CPU's 64-bit pending mask.
NR_IRQS_MAX = _native.NR_IRQS_MAX
#: Actions (request_irq() users) one IRQ line can have (IRQF_SHARED).
MAX_IRQ_ACTIONS = 4
IRQ_NAME_LEN = 32
MAX_IRQ_SOURCES = 32
#: Every IPC name starts with this and the creating pid: /emu-<pid>-<token>[-<slot>]
NAME_PREFIX = "emu-"
_NAME_RE = re.compile(r"^(?:sem\.)?emu-(\d+)-[0-9a-f]{16}(?:-\d+)?$")
SHM_DIR = "/dev/shm"


def reclaim_orphans() -> list[str]:
    """Unlink IPC objects left by emu kernels whose booting process is dead.

    Names are unlinked right after creation, so only a boot killed in that instant
    leaves one behind; the next boot removes it. Returns the names removed.
    """
    removed: list[str] = []
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for entry in entries:
        m = _NAME_RE.match(entry)
        if m and _native.pid_is_dead(int(m.group(1))):
            try:
                os.unlink(os.path.join(SHM_DIR, entry))
                removed.append(entry)
            except OSError:
                pass
    return removed


def own_ipc_names(pid: int) -> set[str]:
    """The /dev/shm entries of kernels booted by process `pid` (should always be empty)."""
    try:
        return {e for e in os.listdir(SHM_DIR) if e.startswith((f"emu-{pid}-", f"sem.emu-{pid}-"))}
    except OSError:
        return set()


#: A record (or number) type of the image.
R = TypeVar("R")


class Table(Protocol[R]):
    """A table of records in the image (a ctypes array), as the type checker sees it."""

    @overload
    def __getitem__(self, index: int, /) -> R: ...
    @overload
    def __getitem__(self, index: slice, /) -> list[R]: ...
    def __setitem__(self, index: int, value: R, /) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[R]: ...


def offsetof(rtype: type[ctypes.Structure], name: str) -> int:
    """offsetof(): where field `name` lies in a record of type `rtype`."""
    return int(getattr(rtype, name).offset)


LOG_TEXT_LEN = 240
#: Bytes of a completion's creation site ("file.py:LINE", for WCHAN and hung-task
#: reports; a longer path keeps its end).
SITE_LEN = 48


class LockWord(ctypes.Structure):
    """native/'s owner-aware lock: holder pid (0 = free) and sleeper count."""

    owner: int
    waiters: int

    _fields_ = [("owner", c_int32), ("waiters", c_int32)]


class PoolHdr(ctypes.Structure):
    """Allocation state of one table of records (completions, atomics, ...)."""

    lock: LockWord
    free: int
    high: int

    _fields_ = [
        ("lock", LockWord),
        ("free", c_int32),  # first free record index + 1, 0 = none
        ("high", c_int32),  # records ever handed out
    ]


class HeapHdr(ctypes.Structure):
    """The shared byte heap (heap.py): where its blocks lie and which are free."""

    lock: LockWord
    size: int
    start: int
    end: int
    free_head: int
    used: int

    _fields_ = [
        ("lock", LockWord),
        ("size", c_int64),  # the heap_size boot parameter
        ("start", c_int64),  # offset of the first block (aligned), end of the last
        ("end", c_int64),
        ("free_head", c_int64),  # offset of the first free block, -1 = none
        ("used", c_int64),  # bytes in allocated blocks, headers included
    ]


class HeapBlock(ctypes.Structure):
    """A block of the heap. Allocated blocks use the first two fields, their payload
    follows at offset HEAP_BLOCK_HDR; a free block links itself in its payload."""

    size: int
    prev_size: int
    next_free: int
    prev_free: int

    _fields_ = [
        ("size", c_int64),  # bytes, header included; bit 0 set while allocated
        ("prev_size", c_int64),  # size of the block just before, 0 for the first
        ("next_free", c_int64),  # free list links (offsets), -1 = none
        ("prev_free", c_int64),
    ]


#: Bytes before a heap block's payload (its size and prev_size).
HEAP_BLOCK_HDR = offsetof(HeapBlock, "next_free")


class CallbackHdr(ctypes.Structure):
    """The head of a callback carried in the heap (callback.py); the pickle follows."""

    seq: int
    pad: int
    length: int

    _fields_ = [
        ("seq", c_int32),  # which callback this is; 0 once freed
        ("pad", c_int32),
        ("length", c_int64),  # bytes of pickle
    ]


class KmallocHdr(ctypes.Structure):
    """The head of a kmalloc'd heap block (slab.py); the caller's bytes follow."""

    links: Table[int]
    tag: int
    size: int

    _fields_ = [
        ("links", c_int64 * 2),  # the heap's free-list links overwrite these once freed
        ("tag", c_int64),  # which allocation this is (random, never 0); 0 once kfree'd
        ("size", c_int64),  # bytes the caller asked for
    ]


class KfifoHdr(ctypes.Structure):
    """struct __kfifo without its data pointer (kfifo.py): the elements follow it in the
    same kmalloc'd block. in/out count elements and wrap as unsigned ints."""
    in_: int
    out: int
    mask: int
    esize: int

    _fields_ = [
        ("in_", c_uint32),  # written only by the writer
        ("out", c_uint32),  # written only by the reader
        ("mask", c_uint32),  # elements - 1 (a power of two minus one)
        ("esize", c_uint32),  # bytes per element
    ]


#: Hung-task reports kept in the header for kernel.hung_tasks (the first ones made).
HUNG_REPORTS_MAX = 64


class HungReport(ctypes.Structure):
    """One hung-task report (comm, pid, seconds blocked), kept apart from the log ring."""

    pid: int
    secs: int
    comm: bytes

    _fields_ = [
        ("pid", c_int32),
        ("secs", c_int32),
        ("comm", c_char * TASK_COMM_LEN),
    ]


#: Report kinds whose first report is kept apart from the log ring (kernel.first_reports).
REPORT_KINDS = ("warning", "bug", "oops", "hung_task", "soft_lockup")
#: Bytes of text kept of each first report (the rest is cut).
FIRST_REPORT_LEN = 4096
#: Rate-limit states of identical reports (printk_ratelimit), one per report site.
RATELIMIT_SLOTS = 64
#: Bytes of a call trace a task hands to khungtaskd (the rest is cut).
STACK_TEXT_LEN = 8192


class FirstReport(ctypes.Structure):
    """The first report of one kind, kept apart from the log ring (which wraps)."""

    state: int
    length: int
    text: bytes

    _fields_ = [
        ("state", c_int32),  # 0 empty, 1 being written, 2 kept
        ("length", c_int32),
        ("text", c_char * FIRST_REPORT_LEN),
    ]


class RatelimitState(ctypes.Structure):
    """struct ratelimit_state of one report site (lib/ratelimit.c)."""

    key: int
    begin_ns: int
    printed: int
    missed: int

    _fields_ = [
        ("key", c_uint64),  # hash of the report site, 0 = unused
        ("begin_ns", c_int64),  # start of the current interval
        ("printed", c_int32),
        ("missed", c_int32),
    ]


class Header(ctypes.Structure):
    magic: int
    boot_ns: int
    hz: int
    ncpus: int
    max_tasks: int
    max_completions: int
    log_records: int
    console_loglevel: int
    boot_pid: int
    supervisor_pid: int
    shutting_down: int
    taint: int
    warnings: int
    bugs: int
    oopses: int
    hung_task_timeout_secs: int
    hung_task_check_interval_secs: int
    hung_task_warnings: int
    hung_task_panic: int
    hung_task_detect_count: int
    cpu_rotor: int
    task_high: int
    softlockup_thresh_secs: int
    task_lock: LockWord
    completions_pool: PoolHdr
    atomics_pool: PoolHdr
    spinlocks_pool: PoolHdr
    tasklets_pool: PoolHdr
    heap: HeapHdr
    callback_seq: int
    nr_irqs: int
    irq_ready: int
    log_lock: LockWord
    log_next_seq: int
    log_first_seq: int
    hung_reports_n: int
    hung_reports_pad: int
    hung_reports: Table[HungReport]
    max_atomics: int
    max_spinlocks: int
    console_lock: LockWord
    ratelimit_interval_ns: int
    ratelimit_burst: int
    stack_pid: int
    stack_state: int
    stack_len: int
    stack_pad: int
    stack_text: bytes
    ratelimits: Table[RatelimitState]
    first_reports: Table[FirstReport]
    works_pool: PoolHdr
    workqueues_pool: PoolHdr
    kthread_workers_pool: PoolHdr
    wq_ready: int
    wq_highpri: int
    timers_pool: PoolHdr
    timer_lock: LockWord
    clock_programmed_ns: int
    max_timers: int
    max_timers_pad: int
    trace_on: int
    trace_buf_events: int
    trace_lock: LockWord
    trace_spool_fd: int
    trace_spool_pad: int
    trace_log_seq: int

    _fields_ = [
        ("magic", c_uint64),
        ("boot_ns", c_int64),  # CLOCK_MONOTONIC at boot; jiffies count from here
        ("hz", c_int32),
        ("ncpus", c_int32),
        ("max_tasks", c_int32),
        ("max_completions", c_int32),
        ("log_records", c_int32),
        ("console_loglevel", c_int32),
        ("boot_pid", c_int32),
        ("supervisor_pid", c_int32),
        ("shutting_down", c_int32),
        ("taint", c_int32),
        ("warnings", c_int32),
        ("bugs", c_int32),
        ("oopses", c_int32),
        ("hung_task_timeout_secs", c_int32),
        ("hung_task_check_interval_secs", c_int32),
        ("hung_task_warnings", c_int32),
        ("hung_task_panic", c_int32),
        ("hung_task_detect_count", c_int32),
        ("cpu_rotor", c_int32),
        ("task_high", c_int32),  # task slots ever used: scans stop here
        ("softlockup_thresh_secs", c_int32),
        ("task_lock", LockWord),  # task-slot allocation
        ("completions_pool", PoolHdr),
        ("atomics_pool", PoolHdr),
        ("spinlocks_pool", PoolHdr),
        ("tasklets_pool", PoolHdr),
        ("timers_pool", PoolHdr),
        ("timer_lock", LockWord),  # every CPU's timer base (timer.py)
        ("clock_programmed_ns", c_int64),  # the supervisor's next timer wake-up (timer.py)
        ("heap", HeapHdr),
        ("callback_seq", c_int32),  # last callback stored (callback.py)
        ("nr_irqs", c_int32),
        ("irq_ready", c_int32),  # idle tasks: 0 none, 1 being created, 2 running
        ("log_lock", LockWord),
        ("log_next_seq", c_uint64),
        ("log_first_seq", c_uint64),
        ("hung_reports_n", c_int32),  # reports printed; the first HUNG_REPORTS_MAX are kept
        ("hung_reports_pad", c_int32),
        ("hung_reports", HungReport * HUNG_REPORTS_MAX),
        # capacities an attaching inspector (attach.py) needs to rebuild image_type()
        ("max_atomics", c_int32),
        ("max_spinlocks", c_int32),
        ("max_timers", c_int32),
        ("max_timers_pad", c_int32),
        ("console_lock", LockWord),  # one report at a time on stderr, in log order
        ("ratelimit_interval_ns", c_int64),  # printk_ratelimit (0: no limit)
        ("ratelimit_burst", c_int32),  # printk_ratelimit_burst
        ("stack_pid", c_int32),  # the task khungtaskd asked for its call trace
        ("stack_state", c_int64),  # request sequence << 2 | phase (bug.request_stack())
        ("stack_len", c_int32),
        ("stack_pad", c_int32),
        ("stack_text", c_char * STACK_TEXT_LEN),
        ("ratelimits", RatelimitState * RATELIMIT_SLOTS),
        ("first_reports", FirstReport * len(REPORT_KINDS)),
        ("works_pool", PoolHdr),  # workqueue.py, kthread_worker.py
        ("workqueues_pool", PoolHdr),
        ("kthread_workers_pool", PoolHdr),
        ("wq_ready", c_int32),  # worker pools: 0 not started, 1 starting, 2 running
        ("wq_highpri", c_int32),  # the highpri pools' first workers: the same
        # tracing (trace.py): the one flag every trace point tests, the ring size
        ("trace_on", c_int32),
        ("trace_buf_events", c_int32),  # events per CPU ring, a power of two
        ("trace_lock", LockWord),  # held by whoever drains the rings
        ("trace_spool_fd", c_int32),  # the booting process's spool file, -1 = none
        ("trace_spool_pad", c_int32),
        ("trace_log_seq", c_uint64),  # next printk record the trace takes
    ]


class CompletionRec(ctypes.Structure):
    """struct completion: the counter and a FIFO wait queue of task slots."""

    lock: LockWord
    in_use: int
    generation: int
    free_next: int
    done: int
    head: int
    tail: int
    site: bytes

    _fields_ = [
        ("lock", LockWord),  # wait.lock, taken irqsave
        ("in_use", c_int32),
        ("generation", c_int32),  # bumped on allocation and on free
        ("free_next", c_int32),
        ("done", c_uint32),
        ("head", c_int32),  # first waiting task slot, -1 if none
        ("tail", c_int32),
        ("site", c_char * SITE_LEN),  # where it was created, "file.py:LINE"
    ]


class AtomicRec(ctypes.Structure):
    """atomic_t / atomic64_t: one 64-bit word (atomic_t uses its low 32 bits)."""

    in_use: int
    generation: int
    free_next: int
    pad: int
    value: int

    _fields_ = [
        ("in_use", c_int32),
        ("generation", c_int32),
        ("free_next", c_int32),
        ("pad", c_int32),
        ("value", c_int64),
    ]


class SpinlockRec(ctypes.Structure):
    """spinlock_t: native/'s owner-aware lock plus who holds it, for lockup reports."""

    lock: LockWord
    in_use: int
    generation: int
    free_next: int
    owner_cpu: int
    held_since_ns: int

    _fields_ = [
        ("lock", LockWord),
        ("in_use", c_int32),
        ("generation", c_int32),
        ("free_next", c_int32),
        ("owner_cpu", c_int32),
        ("held_since_ns", c_int64),
    ]


class IrqAction(ctypes.Structure):
    """struct irqaction: one request_irq() on a line."""

    in_use: int
    flags: int
    ref: int
    ref_generation: int
    thread_slot: int
    thread_generation: int
    thread_flags: int
    warned: int
    name: bytes

    _fields_ = [
        ("in_use", c_int32),
        ("flags", c_int32),  # IRQF_*
        ("ref", c_int32),  # callback (handler, dev): heap offset and seq (callback.py)
        ("ref_generation", c_int32),
        ("thread_slot", c_int32),  # irq/N-name kthread, -1 if none
        ("thread_generation", c_int32),
        ("thread_flags", c_int32),  # IRQTF_RUNTHREAD
        ("warned", c_int32),  # IRQ_WAKE_THREAD-without-thread_fn message printed
        ("name", c_char * IRQ_NAME_LEN),
    ]


class IrqDesc(ctypes.Structure):
    """struct irq_desc: state, statistics and actions of one IRQ line."""

    lock: LockWord
    depth: int
    status: int
    affinity: int
    threads_active: int
    irq_count: int
    irqs_unhandled: int
    actions: Table[IrqAction]
    merged: int
    kstat: Table[int]  # the last field, sized by the kernel's CPUs: irq_desc_type()

    _fields_ = [
        ("lock", LockWord),
        ("depth", c_int32),  # disable_irq() nesting
        ("status", c_int32),  # IRQS_* (irq.py)
        ("affinity", c_int32),  # target CPU
        ("threads_active", c_int32),
        ("irq_count", c_int32),  # note_interrupt(): interrupts in this window
        ("irqs_unhandled", c_int32),
        ("actions", IrqAction * MAX_IRQ_ACTIONS),
        ("merged", c_int64),  # edges raised while the line was pending on its CPU
    ]


@functools.cache
def irq_desc_type(ncpus: int) -> type[IrqDesc]:
    """struct irq_desc of a kernel with `ncpus` CPUs: IrqDesc and its per-CPU counts."""

    class IrqDescN(IrqDesc):
        _fields_ = [("kstat", c_int64 * ncpus)]  # /proc/interrupts counts per CPU

    return IrqDescN


class PerCpu(ctypes.Structure):
    """Per-CPU interrupt controller and softirq state.

    Idle tasks are shared: one per real CPU serves every emulated CPU mapped onto it,
    and the first one also those whose real CPU has none yet (idle.py). A doorbell that
    finds no running task on a CPU queues the CPU on the list of the idle task serving
    it (kept in the PerCpu of that task's home CPU) and signals that task.
    """

    lock: LockWord
    irq_pending: int
    softirq_pending: int
    idle_slot: int
    tasklet_head: Table[int]
    tasklet_tail: Table[int]
    softirq_count: int
    timer_head: int
    timer_running: int
    timer_serving: int
    timer_pad: int
    timer_next_ns: int
    idle_clock_ns: int
    idle_home: int
    idle_list: int
    idle_next: int
    idle_queued: int
    idle_state: int

    _fields_ = [
        ("lock", LockWord),  # tasklet lists
        ("irq_pending", c_int64),  # bit n: IRQ n raised for this CPU, not yet handled
        ("softirq_pending", c_int32),
        ("idle_slot", c_int32),  # the idle task serving this CPU, -1 until it exists
        ("tasklet_head", c_int32 * 2),  # [TASKLET_SOFTIRQ, HI_SOFTIRQ] FIFO lists
        ("tasklet_tail", c_int32 * 2),
        ("softirq_count", c_int64),  # softirq vectors run (/proc/softirqs, for emu top)
        ("timer_head", c_int32),  # timer base: pending timers by expiry, -1 = none
        ("timer_running", c_int32),  # the timer whose callback runs here, -1 = none
        ("timer_serving", c_int32),  # a task runs this base's timers (timer.py)
        ("timer_pad", c_int32),
        ("timer_next_ns", c_int64),  # CLOCK_MONOTONIC when the first one is due
        ("idle_clock_ns", c_int64),  # when the idle task, asleep, wakes for the timers
        ("idle_home", c_int32),  # the CPU whose idle_list this CPU joins (idle task's own)
        ("idle_list", c_int32),  # home CPU only: CPUs to serve, a stack linked by idle_next
        ("idle_next", c_int32),  # next CPU on the idle list, -1 = last
        ("idle_queued", c_int32),  # on the idle list now
        ("idle_state", c_int32),  # home CPUs (idle.py): 0 no idle task, 1 starting, 2 running
    ]

#: PerCpu fields that start at -1 (the others at 0).
PERCPU_NONE = ("idle_slot", "tasklet_head", "tasklet_tail", "idle_home", "idle_list",
               "idle_next", "timer_head", "timer_running")


class TaskletRec(ctypes.Structure):
    """struct tasklet_struct."""

    in_use: int
    generation: int
    free_next: int
    state: int
    count: int
    next: int
    ref: int
    ref_generation: int

    _fields_ = [
        ("in_use", c_int32),
        ("generation", c_int32),
        ("free_next", c_int32),
        ("state", c_int32),  # TASKLET_STATE_SCHED | TASKLET_STATE_RUN
        ("count", c_int32),  # tasklet_disable() nesting
        ("next", c_int32),  # per-CPU list link
        ("ref", c_int32),  # callback (callback, data): heap offset (0 = none) and seq
        ("ref_generation", c_int32),
    ]


class TimerRec(ctypes.Structure):
    """struct timer_list (timer.py)."""

    in_use: int
    generation: int
    free_next: int
    flags: int
    pending: int
    cpu: int
    next: int
    shutdown: int
    ref: int
    ref_generation: int
    expires: int
    due_ns: int

    _fields_ = [
        ("in_use", c_int32),
        ("generation", c_int32),
        ("free_next", c_int32),
        ("flags", c_int32),  # TIMER_DEFERRABLE | TIMER_PINNED | TIMER_IRQSAFE
        ("pending", c_int32),  # linked in base `cpu`'s list
        ("cpu", c_int32),  # the base it is (or was last) queued on
        ("next", c_int32),  # that list's link, -1 = last
        ("shutdown", c_int32),  # timer_shutdown*(): `function` is NULL, arming is ignored
        ("ref", c_int32),  # callback (function, attributes): heap offset and seq
        ("ref_generation", c_int32),
        ("expires", c_uint64),  # jiffies
        ("due_ns", c_int64),  # CLOCK_MONOTONIC when jiffies passes expires
    ]


class IrqSource(ctypes.Structure):
    """A device the supervisor emulates: raises `irq` after a delay, then periodically."""

    in_use: int
    irq: int
    burst: int
    remaining: int
    next_ns: int
    period_ns: int
    fired: int

    _fields_ = [
        ("in_use", c_int32),
        ("irq", c_int32),
        ("burst", c_int32),  # interrupts raised each time it fires
        ("remaining", c_int32),  # firings left, -1 = unlimited
        ("next_ns", c_int64),  # CLOCK_MONOTONIC of the next firing
        ("period_ns", c_int64),  # 0 = fire once
        ("fired", c_int64),
    ]


class TaskSlot(ctypes.Structure):
    """task_struct + struct kthread, as far as other processes need to see them."""

    in_use: int
    generation: int
    pid: int
    ppid: int
    state: int
    flags: int
    kflags: int
    cpu: int
    recent_cpu: int
    preempt_count: int
    irqs_disabled: int
    result: int
    notify_signal: int
    sigpending: int
    sigallowed: int
    sigkernel: int
    wq_next: int
    wq_on: int
    exited: int
    parked: int
    nvcsw: int
    start_ns: int
    comm: bytes
    full_name: bytes
    wchan: int
    wchan_pad: int
    wq_flags: int
    wq_pad: int

    _fields_ = [
        ("in_use", c_int32),
        ("generation", c_int32),
        ("pid", c_int32),
        ("ppid", c_int32),
        ("state", c_int32),  # TASK_* (the emulated state, not the OS one)
        ("flags", c_int32),  # PF_*
        ("kflags", c_int32),  # KTHREAD_* bits, see kthread.py
        ("cpu", c_int32),
        ("recent_cpu", c_int32),  # the real CPU it last went to sleep on (for wake-ups)
        ("preempt_count", c_int32),
        ("irqs_disabled", c_int32),
        ("result", c_int32),  # kthread->result (an int, as in the kernel)
        ("notify_signal", c_int32),  # TIF_NOTIFY_SIGNAL, set by kthread_stop
        ("sigpending", c_int64),  # bit (sig - 1) per queued signal
        ("sigallowed", c_int64),  # SIG_KTHREAD dispositions
        ("sigkernel", c_int64),  # SIG_KTHREAD_KERNEL dispositions
        ("wq_next", c_int32),  # next slot in the wait queue we are on, -1 = last
        ("wq_on", c_int32),  # wait queue (completions table) index + 1 we are on, 0 = none
        ("wq_flags", c_int32),  # WQ_FLAG_EXCLUSIVE of our entry on that queue
        ("wq_pad", c_int32),
        ("exited", c_int32),  # completion index of kthread->exited
        ("parked", c_int32),  # completion index of kthread->parked
        ("nvcsw", c_int64),  # voluntary context switches (sleeps)
        ("start_ns", c_int64),
        ("comm", c_char * TASK_COMM_LEN),
        ("full_name", c_char * KTHREAD_NAME_LEN),
        ("wchan", c_int32),  # WCHAN_* (task.py): what a sleep outside a wait queue waits in
        ("wchan_pad", c_int32),
    ]


# --- deferred work: work items, worker pools, workqueues (kthread_worker.py, workqueue.py) ---

#: Work items (work_struct, kthread_work) and flush barriers, all kernels alike.
MAX_WORKS = 4096
MAX_WORKQUEUES = 256
MAX_KTHREAD_WORKERS = 64
#: The kworkers one pool grows to at most; a kthread worker uses one.
MAX_POOL_WORKERS = 32
#: Per-CPU pools (normal, then highpri) and the unbound pool.
NR_WQ_POOLS = 2 * NR_CPUS + 1
WQ_NAME_LEN = 32


class WorkRec(ctypes.Structure):
    """struct work_struct / kthread_work, or a flush barrier (wq_barrier) waiting on one.

    Everything but `data` and the pool bookkeeping is changed under the lock of the
    pool the item is queued on or runs on (`pool`)."""
    in_use: int
    generation: int
    free_next: int
    data: int
    ref: int
    ref_generation: int
    next: int
    pool: int
    wq: int
    queued: int
    running: int
    canceling: int
    barriers: int
    comp: int
    comp_generation: int
    cpu: int
    timer: int
    timer_generation: int
    wq_generation: int
    pad: int
    queue_seq: int
    start_seq: int
    done_seq: int
    stolen_seq: int
    target: int

    _fields_ = [
        ("in_use", c_int32),
        ("generation", c_int32),
        ("free_next", c_int32),
        ("data", c_int32),  # WORK_STRUCT_PENDING, ... (atomic)
        ("ref", c_int32),  # the work function: callback heap offset and seq (callback.py)
        ("ref_generation", c_int32),
        ("next", c_int32),  # worklist, inactive list or barrier list link, -1 = last
        ("pool", c_int32),  # pool id queued on or last run on, -1 = none yet
        ("wq", c_int32),  # workqueue index queued on / last, -1 = none
        ("queued", c_int32),  # 0 off-list, 1 on the pool's worklist, 2 on an inactive list
        ("running", c_int32),  # worker index + 1 while its function runs, else 0
        ("canceling", c_int32),  # cancel_*_sync() in progress: queueing fails
        ("barriers", c_int32),  # first flush barrier waiting on this item, -1 = none
        ("comp", c_int32),  # a barrier's: the flusher's completion (index, generation)
        ("comp_generation", c_int32),
        ("cpu", c_int32),  # a delayed work's: the CPU its timer queues it on
        ("timer", c_int32),  # a delayed work's: its timer_list (index, generation), -1 = none
        ("timer_generation", c_int32),
        ("wq_generation", c_int32),  # a delayed work's: the generation of its `wq`
        ("pad", c_int32),
        ("queue_seq", c_int64),  # successful queueings
        ("start_seq", c_int64),  # queue_seq of the instance that runs or ran last
        ("done_seq", c_int64),  # the last instance finished (or cancelled)
        ("stolen_seq", c_int64),  # an instance cancelled while an older one runs
        ("target", c_int64),  # a barrier's: the done_seq it waits for
    ]


class WorkerEnt(ctypes.Structure):
    """struct worker: one kworker of a pool (or a kthread worker's thread)."""

    slot: int
    generation: int
    flags: int
    current: int
    current_wq: int
    pad: int

    _fields_ = [
        ("slot", c_int32),  # task slot, -1 = free entry
        ("generation", c_int32),
        ("flags", c_int32),  # WORKER_* (kthread_worker.py)
        ("current", c_int32),  # work index + 1 being run, 0 = none
        ("current_wq", c_int32),  # its workqueue, -1 = none
        ("pad", c_int32),
    ]


class WorkerPoolRec(ctypes.Structure):
    """struct worker_pool (a per-CPU or unbound pool of kworkers) or struct kthread_worker."""

    lock: LockWord
    in_use: int
    generation: int
    free_next: int
    id: int
    cpu: int
    flags: int
    head: int
    tail: int
    nr_workers: int
    nr_idle: int
    nr_running: int
    manager: int
    idle_mask: int
    workers: Table[WorkerEnt]

    _fields_ = [
        ("lock", LockWord),  # taken irqsave
        ("in_use", c_int32),
        ("generation", c_int32),
        ("free_next", c_int32),
        ("id", c_int32),  # what WorkRec.pool holds for this pool
        ("cpu", c_int32),  # -1 = unbound
        ("flags", c_int32),  # POOL_* (kthread_worker.py)
        ("head", c_int32),  # worklist (work indices), -1 = empty
        ("tail", c_int32),
        ("nr_workers", c_int32),
        ("nr_idle", c_int32),
        ("nr_running", c_int32),  # concurrency management: workers running work, awake
        ("manager", c_int32),  # pid creating a worker, 0 = none
        ("idle_mask", c_int64),  # bit i: workers[i] is idle
        ("workers", WorkerEnt * MAX_POOL_WORKERS),
    ]


class PwqEnt(ctypes.Structure):
    """struct pool_workqueue: a workqueue's share of one pool (under the pool's lock)."""

    nr_active: int
    head: int
    tail: int
    pad: int

    _fields_ = [
        ("nr_active", c_int32),
        ("head", c_int32),  # inactive list (beyond max_active), -1 = empty
        ("tail", c_int32),
        ("pad", c_int32),
    ]


class WorkqueueRec(ctypes.Structure):
    """struct workqueue_struct."""

    in_use: int
    generation: int
    free_next: int
    flags: int
    max_active: int
    state: int
    warned: int
    pad: int
    name: bytes
    pwqs: Table[PwqEnt]

    _fields_ = [
        ("in_use", c_int32),
        ("generation", c_int32),
        ("free_next", c_int32),
        ("flags", c_int32),  # WQ_*
        ("max_active", c_int32),
        ("state", c_int32),  # __WQ_DRAINING, __WQ_DESTROYING (atomic)
        ("warned", c_int32),  # "cannot queue" printed (WARN_ONCE)
        ("pad", c_int32),
        ("name", c_char * WQ_NAME_LEN),
        ("pwqs", PwqEnt * NR_CPUS),  # per CPU; an unbound workqueue uses [0]
    ]


class LogRec(ctypes.Structure):
    """One printk record of the dmesg ring."""

    seq: int
    ts_ns: int
    level: int
    pid: int
    length: int
    cont: int
    text: bytes

    _fields_ = [
        ("seq", c_uint64),
        ("ts_ns", c_int64),
        ("level", c_int32),
        ("pid", c_int32),
        ("length", c_int32),
        ("cont", c_int32),  # continues the previous record of the same line
        ("text", c_char * LOG_TEXT_LEN),
    ]


class TraceRing(ctypes.Structure):
    """One CPU's trace ring: writers reserve event `head` (then head + 1) atomically; the
    drainer alone moves `tail` and counts what writers overwrote before it read it."""

    head: int
    tail: int
    dropped: int
    pad: int

    _fields_ = [
        ("head", c_uint64),  # events ever reserved on this CPU
        ("tail", c_uint64),  # events drained (or given up as dropped)
        ("dropped", c_uint64),  # overwritten before the drainer read them
        ("pad", c_uint64),
    ]


class TraceEvent(ctypes.Structure):
    """One trace event (trace.py names the types and their arguments). `seq` is the
    event's number + 1 once written, 0 while a writer fills it in."""

    ts_ns: int
    seq: int
    arg1: int
    pid: int
    arg0: int
    type: int
    cpu: int
    pad: int

    _fields_ = [
        ("ts_ns", c_int64),  # CLOCK_MONOTONIC
        ("seq", c_uint64),
        ("arg1", c_int64),
        ("pid", c_int32),  # the task that caused it
        ("arg0", c_int32),
        ("type", ctypes.c_uint16),
        ("cpu", ctypes.c_uint16),  # emulated CPU: also which ring holds it
        ("pad", c_int32),
    ]


def image_type(max_tasks: int, max_completions: int, log_records: int,
               max_atomics: int, max_spinlocks: int, nr_irqs: int = NR_IRQS_MAX,
               max_tasklets: int = 256, heap_size: int = 0, max_timers: int = 1024,
               ncpus: int = 1, trace_buf_events: int = 0) -> type[ctypes.Structure]:
    """The ctypes type of a whole image with the given capacities (`ncpus` CPUs, and a
    trace ring of `trace_buf_events` events for each)."""

    class Image(ctypes.Structure):
        _fields_ = [
            ("hdr", Header),
            ("tasks", TaskSlot * max_tasks),
            ("completions", CompletionRec * max_completions),
            ("atomics", AtomicRec * max_atomics),
            ("spinlocks", SpinlockRec * max_spinlocks),
            ("irqs", irq_desc_type(ncpus) * nr_irqs),
            ("percpu", PerCpu * ncpus),
            ("tasklets", TaskletRec * max_tasklets),
            ("timers", TimerRec * max_timers),
            ("irq_sources", IrqSource * MAX_IRQ_SOURCES),
            ("log", LogRec * log_records),
            ("works", WorkRec * MAX_WORKS),
            ("workqueues", WorkqueueRec * MAX_WORKQUEUES),
            ("worker_pools", WorkerPoolRec * NR_WQ_POOLS),
            ("kthread_workers", WorkerPoolRec * MAX_KTHREAD_WORKERS),
            ("trace_rings", TraceRing * ncpus),
            ("trace_events", TraceEvent * (ncpus * trace_buf_events)),
            ("heap", c_uint8 * heap_size),  # last: its pages are touched only when used
        ]

    return Image


class ImageView(Protocol):
    """A mapped image, typed (image_type() makes its class at boot, sized by capacities)."""

    hdr: Header
    tasks: Table[TaskSlot]
    completions: Table[CompletionRec]
    atomics: Table[AtomicRec]
    spinlocks: Table[SpinlockRec]
    irqs: Table[IrqDesc]
    percpu: Table[PerCpu]
    tasklets: Table[TaskletRec]
    irq_sources: Table[IrqSource]
    timers: Table[TimerRec]
    log: Table[LogRec]
    works: Table[WorkRec]
    workqueues: Table[WorkqueueRec]
    worker_pools: Table[WorkerPoolRec]
    kthread_workers: Table[WorkerPoolRec]
    trace_rings: Table[TraceRing]
    trace_events: Table[TraceEvent]
    heap: ctypes.Array[ctypes.c_uint8]


def percpu_fill(img: Any, name: str, values: Sequence[int] | int) -> None:
    """Set int32 or int64 field `name` (each word of it, for an array of int32) of every
    CPU's PerCpu record of image `img` to `values` (one per CPU, or one for all), at C
    speed: a boot with a thousand CPUs must not loop over them in Python."""
    percpu = img.percpu
    n = len(percpu)
    ctype = next(f[1] for f in PerCpu._fields_ if f[0] == name)
    fmt, size = ("q", 8) if ctype is c_int64 else ("i", 4)
    words = array.array(fmt, [values] * n if isinstance(values, int) else values)
    field = getattr(PerCpu, name)
    stride = ctypes.sizeof(PerCpu) // size
    words_of_all = (ctypes.c_int32 * (ctypes.sizeof(PerCpu) // 4 * n)).from_address(
        ctypes.addressof(percpu))
    with memoryview(words_of_all) as view, view.cast("B") as raw, \
            raw.cast("q" if size == 8 else "i") as ints:
        for word in range(field.offset // size, (field.offset + field.size) // size):
            ints[word:stride * n:stride] = words


def percpu_addr(img: Any, cpu: int, name: str) -> int:
    """Absolute address of field `name` of `cpu`'s PerCpu record in image `img`."""
    return ctypes.addressof(img.percpu) + cpu * ctypes.sizeof(PerCpu) + offsetof(PerCpu, name)


def field_addr(obj: ctypes.Structure | ImageView, name: str) -> int:
    """Absolute address of field `name` of a ctypes structure living in the image."""
    rec = cast(ctypes.Structure, obj)
    return ctypes.addressof(rec) + offsetof(type(rec), name)


class SharedImage:
    """The mapped image plus the per-slot semaphores, created by boot and inherited by fork."""

    def __init__(self, max_tasks: int, max_completions: int, log_records: int,
                 max_atomics: int = 1024, max_spinlocks: int = 1024,
                 nr_irqs: int = NR_IRQS_MAX, heap_size: int = 1 << 20,
                 max_timers: int = 1024, ncpus: int = 1, trace_buf_events: int = 4096) -> None:
        prefix = f"/{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        itype = image_type(max_tasks, max_completions, log_records, max_atomics, max_spinlocks,
                           nr_irqs, heap_size=heap_size, max_timers=max_timers, ncpus=ncpus,
                           trace_buf_events=trace_buf_events)
        self.size = ctypes.sizeof(itype)
        shm = posix_ipc.SharedMemory(prefix, posix_ipc.O_CREX, mode=0o600, size=self.size)
        try:
            self.mm = mmap.mmap(shm.fd, self.size)
        except BaseException:
            shm.close_fd()
            raise
        finally:
            shm.unlink()
        #: The segment stays open in every task: inspectors of the same user find it as
        #: /proc/PID/fd/N -> "/dev/shm/emu-PID-... (deleted)" (attach.py), and it goes
        #: away with the last task, so nothing can outlive the kernel.
        self.fd = shm.fd
        mapped = itype.from_buffer(self.mm)
        self.img = cast(ImageView, mapped)
        self.img.hdr.max_atomics = max_atomics
        self.img.hdr.max_spinlocks = max_spinlocks
        self.img.hdr.max_timers = max_timers
        self.img.hdr.ncpus = ncpus
        self.img.hdr.trace_buf_events = trace_buf_events
        self.img.hdr.trace_spool_fd = -1
        self.base = ctypes.addressof(mapped)
        self.sems: list[posix_ipc.Semaphore] = []
        #: native WaitCore: sleep/wake and completion queues
        self.core = _native.WaitCore(self._core_layout(), os.getpid())
        #: nanoseconds per jiffy (set at boot with HZ)
        self.jiffy_ns = 0
        #: this process's caches over this kernel's records (never shared across kernels)
        self.callback_cache: dict[tuple[int, int], Any] = {}  # callback.py: ref -> its copy
        self.irq_views: Any = None  # irq.py's per-kernel ctypes views
        self.wq_views: Any = None  # kthread_worker.py's
        self.irq_core: Any = None  # native IrqCore, made by irq.py after boot
        self.var_wait: Any = None  # wait.py's hashed queue heads, as handles
        self.timer_handles: dict[Any, Any] = {}  # timer.py: the handles its callbacks get
        #: emulated CPU i runs on real CPU cpu_map[i]
        self.cpu_map: list[int] = []
        #: True only in the process that booted this kernel
        self.is_boot_process = True
        #: pipe ends whose closing kills every task (see kernel.py); -1 when not held
        self.boot_wfd = -1
        self.watch_rfds: list[int] = []
        try:
            for i in range(max_tasks):
                self._add_sem(f"{prefix}-{i}", i)
        except BaseException:
            self.close()
            raise

    def _add_sem(self, name: str, slot: int) -> None:
        sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600, initial_value=0)
        try:
            self.sems.append(sem)
            self.core.attach_sem(slot, name)
        finally:
            sem.unlink()

    def _core_layout(self) -> dict[str, Any]:
        """Where WaitCore finds task and completion fields: each table by field name."""
        img = self.img
        return {"tasks": record_table(img.tasks),
                "completions": record_table(img.completions),
                "header": {"addr": ctypes.addressof(img.hdr), "size": ctypes.sizeof(Header),
                           "count": 1, "fields": record_fields(Header)},
                "trace_rings": record_table(img.trace_rings),
                "trace_events": record_table(img.trace_events)}

    def irq_layout(self) -> dict[str, Any]:
        """Where IrqCore finds descriptor, action, per-CPU, task and header fields (after
        boot set the header), for IrqCore(core, layout, signo)."""
        img, hdr = self.img, self.img.hdr
        return {
            "irqs": record_table(img.irqs, hdr.nr_irqs),
            "actions": {"size": ctypes.sizeof(IrqAction), "count": MAX_IRQ_ACTIONS,
                        "fields": record_fields(IrqAction)},
            "percpu": record_table(img.percpu, hdr.ncpus),
            "tasks": record_table(img.tasks),
            "header": {"addr": ctypes.addressof(hdr), "size": ctypes.sizeof(Header),
                       "count": 1, "fields": record_fields(Header)},
        }

    def after_fork_in_task(self) -> None:
        """In a new task process: drop what only the booting process may hold."""
        self.is_boot_process = False
        if self.boot_wfd >= 0:
            os.close(self.boot_wfd)
            self.boot_wfd = -1

    def close(self) -> None:
        """Unmap and close everything (idempotent)."""
        self.core = None  # type: ignore[assignment]
        self.irq_core = None
        for sem in self.sems:
            sem.close()
        self.sems = []
        if self.mm is not None:
            self.img = None  # type: ignore[assignment]
            try:
                self.mm.close()
            except BufferError:
                pass  # views into the image still exist; the mapping goes with them
            self.mm = None  # type: ignore[assignment]
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def record_fields(rtype: Any) -> dict[str, tuple[int, int]]:
    """Every field of a ctypes record (its base records' first) as native/ looks it up:
    name -> (offset, size)."""
    return {name: (getattr(rtype, name).offset, getattr(rtype, name).size)
            for cls in reversed(rtype.__mro__) for name, *_ in vars(cls).get("_fields_", ())}


def record_table(records: Any, count: int | None = None) -> dict[str, Any]:
    """A table of records in the image as native/ takes it (by field name, never by
    position): its address, record size, number of records (default: all) and fields."""
    return {"addr": ctypes.addressof(records), "size": ctypes.sizeof(records._type_),
            "count": len(records) if count is None else count,
            "fields": record_fields(records._type_)}


_this: SharedImage | None = None


def this() -> SharedImage:
    """The image of the kernel booted in (or inherited by) this process."""
    if _this is None:
        raise NotBootedError("no emu kernel is running in this process: call emu.boot() first")
    return _this


def attach(image: SharedImage | None) -> None:
    """Make `image` this process's kernel image (None detaches)."""
    global _this
    _this = image


def _after_fork_in_child() -> None:
    if _this is not None and _this.core is not None:
        _this.core.after_fork(os.getpid())


os.register_at_fork(after_in_child=_after_fork_in_child)
