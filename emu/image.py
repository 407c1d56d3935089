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
from collections.abc import Sequence
from ctypes import c_char, c_int32, c_int64, c_uint8, c_uint32, c_uint64
from typing import Any

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
LOG_TEXT_LEN = 240


class LockWord(ctypes.Structure):
    """native/'s owner-aware lock: holder pid (0 = free) and sleeper count."""

    _fields_ = [("owner", c_int32), ("waiters", c_int32)]


class PoolHdr(ctypes.Structure):
    """Allocation state of one table of records (completions, atomics, ...)."""

    _fields_ = [
        ("lock", LockWord),
        ("free", c_int32),  # first free record index + 1, 0 = none
        ("high", c_int32),  # records ever handed out
    ]


class HeapHdr(ctypes.Structure):
    """The shared byte heap (heap.py): where its blocks lie and which are free."""

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

    _fields_ = [
        ("size", c_int64),  # bytes, header included; bit 0 set while allocated
        ("prev_size", c_int64),  # size of the block just before, 0 for the first
        ("next_free", c_int64),  # free list links (offsets), -1 = none
        ("prev_free", c_int64),
    ]


#: Bytes before a heap block's payload (its size and prev_size).
HEAP_BLOCK_HDR = HeapBlock.next_free.offset


class CallbackHdr(ctypes.Structure):
    """The head of a callback carried in the heap (callback.py); the pickle follows."""

    _fields_ = [
        ("seq", c_int32),  # which callback this is; 0 once freed
        ("pad", c_int32),
        ("length", c_int64),  # bytes of pickle
    ]


#: Hung-task reports kept in the header for kernel.hung_tasks (the first ones made).
HUNG_REPORTS_MAX = 64


class HungReport(ctypes.Structure):
    """One hung-task report (comm, pid, seconds blocked), kept apart from the log ring."""

    _fields_ = [
        ("pid", c_int32),
        ("secs", c_int32),
        ("comm", c_char * TASK_COMM_LEN),
    ]


class Header(ctypes.Structure):
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
    ]


class CompletionRec(ctypes.Structure):
    """struct completion: the counter and a FIFO wait queue of task slots."""

    _fields_ = [
        ("lock", LockWord),  # wait.lock, taken irqsave
        ("in_use", c_int32),
        ("generation", c_int32),  # bumped on allocation and on free
        ("free_next", c_int32),
        ("done", c_uint32),
        ("head", c_int32),  # first waiting task slot, -1 if none
        ("tail", c_int32),
    ]


class AtomicRec(ctypes.Structure):
    """atomic_t / atomic64_t: one 64-bit word (atomic_t uses its low 32 bits)."""

    _fields_ = [
        ("in_use", c_int32),
        ("generation", c_int32),
        ("free_next", c_int32),
        ("pad", c_int32),
        ("value", c_int64),
    ]


class SpinlockRec(ctypes.Structure):
    """spinlock_t: native/'s owner-aware lock plus who holds it, for lockup reports."""

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


@functools.cache
def irq_desc_type(ncpus: int) -> type[ctypes.Structure]:
    """struct irq_desc of a kernel with `ncpus` CPUs (its per-CPU counts are sized so)."""

    class IrqDesc(ctypes.Structure):
        """struct irq_desc: state, statistics and actions of one IRQ line."""

        _fields_ = [
            ("lock", LockWord),
            ("depth", c_int32),  # disable_irq() nesting
            ("status", c_int32),  # IRQS_* (irq.py)
            ("affinity", c_int32),  # target CPU
            ("threads_active", c_int32),
            ("irq_count", c_int32),  # note_interrupt(): interrupts in this window
            ("irqs_unhandled", c_int32),
            ("actions", IrqAction * MAX_IRQ_ACTIONS),
            ("kstat", c_int64 * ncpus),  # /proc/interrupts counts per CPU
        ]

    return IrqDesc


class PerCpu(ctypes.Structure):
    """Per-CPU interrupt controller and softirq state.

    Idle tasks are shared: one per real CPU serves every emulated CPU mapped onto it,
    and the first one also those whose real CPU has none yet (idle.py). A doorbell that
    finds no running task on a CPU queues the CPU on the list of the idle task serving
    it (kept in the PerCpu of that task's home CPU) and signals that task.
    """

    _fields_ = [
        ("lock", LockWord),  # tasklet lists
        ("irq_pending", c_int64),  # bit n: IRQ n raised for this CPU, not yet handled
        ("softirq_pending", c_int32),
        ("idle_slot", c_int32),  # the idle task serving this CPU, -1 until it exists
        ("tasklet_head", c_int32 * 2),  # [TASKLET_SOFTIRQ, HI_SOFTIRQ] FIFO lists
        ("tasklet_tail", c_int32 * 2),
        ("idle_home", c_int32),  # the CPU whose idle_list this CPU joins (idle task's own)
        ("idle_list", c_int32),  # home CPU only: CPUs to serve, a stack linked by idle_next
        ("idle_next", c_int32),  # next CPU on the idle list, -1 = last
        ("idle_queued", c_int32),  # on the idle list now
        ("idle_state", c_int32),  # home CPUs (idle.py): 0 no idle task, 1 starting, 2 running
    ]

#: PerCpu fields that start at -1 (the others at 0).
PERCPU_NONE = ("idle_slot", "tasklet_head", "tasklet_tail", "idle_home", "idle_list",
               "idle_next")


class TaskletRec(ctypes.Structure):
    """struct tasklet_struct."""

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


class IrqSource(ctypes.Structure):
    """A device the supervisor emulates: raises `irq` after a delay, then periodically."""

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
        ("wq_on", c_int32),  # completion index + 1 we are queued on, 0 = none
        ("exited", c_int32),  # completion index of kthread->exited
        ("parked", c_int32),  # completion index of kthread->parked
        ("nvcsw", c_int64),  # voluntary context switches (sleeps)
        ("start_ns", c_int64),
        ("comm", c_char * TASK_COMM_LEN),
        ("full_name", c_char * KTHREAD_NAME_LEN),
    ]


class LogRec(ctypes.Structure):
    """One printk record of the dmesg ring."""

    _fields_ = [
        ("seq", c_uint64),
        ("ts_ns", c_int64),
        ("level", c_int32),
        ("pid", c_int32),
        ("length", c_int32),
        ("cont", c_int32),  # continues the previous record of the same line
        ("text", c_char * LOG_TEXT_LEN),
    ]


def image_type(max_tasks: int, max_completions: int, log_records: int,
               max_atomics: int, max_spinlocks: int, nr_irqs: int = NR_IRQS_MAX,
               max_tasklets: int = 256, heap_size: int = 0,
               ncpus: int = 1) -> type[ctypes.Structure]:
    """The ctypes type of a whole image with the given capacities."""

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
            ("irq_sources", IrqSource * MAX_IRQ_SOURCES),
            ("log", LogRec * log_records),
            ("heap", c_uint8 * heap_size),  # last: its pages are touched only when used
        ]

    return Image


def percpu_fill(img: Any, name: str, values: Sequence[int] | int) -> None:
    """Set int32 field `name` (each word of it, for an array) of every CPU's PerCpu
    record of image `img` to `values` (one per CPU, or one for all), at C speed: a boot
    with a thousand CPUs must not loop over them in Python."""
    percpu = img.percpu
    n = len(percpu)
    words = array.array("i", [values] * n if isinstance(values, int) else values)
    field = getattr(PerCpu, name)
    stride = ctypes.sizeof(PerCpu) // 4
    words_of_all = (ctypes.c_int32 * (stride * n)).from_address(ctypes.addressof(percpu))
    with memoryview(words_of_all) as view, view.cast("B") as raw, raw.cast("i") as ints:
        for word in range(field.offset // 4, (field.offset + field.size) // 4):
            ints[word:stride * n:stride] = words


def percpu_addr(img: Any, cpu: int, name: str) -> int:
    """Absolute address of field `name` of `cpu`'s PerCpu record in image `img`."""
    return ctypes.addressof(img.percpu) + cpu * ctypes.sizeof(PerCpu) + getattr(PerCpu, name).offset


def field_addr(obj: ctypes.Structure, name: str) -> int:
    """Absolute address of field `name` of a ctypes structure living in the image."""
    return ctypes.addressof(obj) + getattr(type(obj), name).offset


class SharedImage:
    """The mapped image plus the per-slot semaphores, created by boot and inherited by fork."""

    def __init__(self, max_tasks: int, max_completions: int, log_records: int,
                 max_atomics: int = 1024, max_spinlocks: int = 1024,
                 nr_irqs: int = NR_IRQS_MAX, heap_size: int = 1 << 20, ncpus: int = 1) -> None:
        prefix = f"/{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        itype = image_type(max_tasks, max_completions, log_records, max_atomics, max_spinlocks,
                           nr_irqs, heap_size=heap_size, ncpus=ncpus)
        self.size = ctypes.sizeof(itype)
        shm = posix_ipc.SharedMemory(prefix, posix_ipc.O_CREX, mode=0o600, size=self.size)
        try:
            self.mm = mmap.mmap(shm.fd, self.size)
        finally:
            shm.close_fd()
            shm.unlink()
        self.img: Any = itype.from_buffer(self.mm)
        self.base = ctypes.addressof(self.img)
        self.sems: list[posix_ipc.Semaphore] = []
        #: native WaitCore: sleep/wake and completion queues
        self.core: Any = _native.WaitCore(self._core_layout(), os.getpid())
        #: nanoseconds per jiffy (set at boot with HZ)
        self.jiffy_ns = 0
        #: this process's caches over this kernel's records (never shared across kernels)
        self.callback_cache: dict[tuple[int, int], Any] = {}  # callback.py: ref -> its copy
        self.irq_views: Any = None  # irq.py's per-kernel ctypes views
        self.irq_core: Any = None  # native IrqCore, made by irq.py after boot
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
        return {"tasks": record_table(self.img.tasks),
                "completions": record_table(self.img.completions)}

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
        self.core = self.irq_core = None
        for sem in self.sems:
            sem.close()
        self.sems = []
        if self.mm is not None:
            self.img = None
            try:
                self.mm.close()
            except BufferError:
                pass  # views into the image still exist; the mapping goes with them
            self.mm = None  # type: ignore[assignment]


def record_fields(rtype: Any) -> dict[str, tuple[int, int]]:
    """Every field of a ctypes record as native/ looks it up: name -> (offset, size)."""
    return {name: (getattr(rtype, name).offset, getattr(rtype, name).size)
            for name, *_ in rtype._fields_}


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
