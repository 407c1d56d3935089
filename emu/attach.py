"""Looking at a running kernel from another process: ``emu kernels``, ``ps``, ``dmesg``, ``top``.

A kernel has no socket and no file: its image is a POSIX shared-memory segment whose
name was unlinked at boot, which every task keeps open. The booting process's descriptor
shows as ``/proc/PID/fd/N -> /dev/shm/emu-PID-<token> (deleted)``, so a kernel is found
by scanning /proc and attached by opening that link (the host allows it to processes
of the same user only) and mapping it read-only: an inspector cannot change the kernel,
takes none of its locks, and leaves nothing behind when either side ends, even by
SIGKILL. Another user's kernel is refused.

Reads are lock-free: a row of ``ps`` may be a moment old, and a log record overwritten
while it is read is skipped (checked by its sequence number).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import re
import time
from dataclasses import dataclass
from typing import Any, cast

import _emu_native as _native

from . import image, task
from .constants import PF_IDLE, TASK_RUNNING
from .errors import EmuError

_SHM_LINK = re.compile(r"^/dev/shm/emu-(\d+)-[0-9a-f]{16} \(deleted\)$")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class AttachError(EmuError):
    """No kernel to attach to, or one this user may not inspect."""


@dataclass(frozen=True)
class KernelRef:
    """A running kernel: its booting process and the link to its image."""

    pid: int
    link: str  # /proc/PID/fd/N


def _image_link(pid: int) -> str | None:
    """The /proc/PID/fd/N link to the image of a running kernel booted by `pid`, or None.

    A process may still hold images of kernels it shut down (a mapping that Python code
    still views keeps its descriptor): those say so in their header and are skipped.
    """
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        m = _SHM_LINK.match(target)
        if m and int(m.group(1)) == pid and _running(f"{fd_dir}/{fd}"):
            return f"{fd_dir}/{fd}"
    return None


def _running(link: str) -> bool:
    """The image behind `link` is of a booted kernel that is not shutting down and
    whose supervisor lives. Reads the header only; maps nothing."""
    try:
        fd = os.open(link, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        data = os.pread(fd, ctypes.sizeof(image.Header), 0)
    finally:
        os.close(fd)
    if len(data) < ctypes.sizeof(image.Header):
        return False
    hdr = image.Header.from_buffer_copy(data)
    return bool(hdr.magic == image.IMAGE_MAGIC and not hdr.shutting_down
                and hdr.supervisor_pid > 0 and not _native.pid_is_dead(hdr.supervisor_pid))


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def find_kernels() -> list[KernelRef]:
    """Every running kernel booted by a process of this user, by booting pid."""
    me = os.getuid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or _owner(int(entry)) != me:
            continue
        link = _image_link(int(entry))
        if link is not None:
            found.append(KernelRef(int(entry), link))
    return sorted(found, key=lambda k: k.pid)


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def find_kernel(pid: int | None = None) -> KernelRef:
    """The kernel booted by `pid`, or the only running one when `pid` is None.

    Raises AttachError when there is none, several (name one with --kernel), or when
    `pid`'s kernel belongs to another user.
    """
    if pid is None:
        kernels = find_kernels()
        if not kernels:
            raise AttachError("no emu kernel of yours is running")
        if len(kernels) > 1:
            pids = ", ".join(str(k.pid) for k in kernels)
            raise AttachError(f"{len(kernels)} emu kernels are running (booted by pids "
                              f"{pids}): choose one with --kernel PID")
        return kernels[0]
    owner = _owner(pid)
    if owner is None:
        raise AttachError(f"--kernel {pid}: no process {pid} is running")
    if owner != os.getuid():
        raise AttachError(f"--kernel {pid}: that kernel belongs to {_user_name(owner)}, "
                          "not to you: refused")
    link = _image_link(pid)
    if link is None:
        raise AttachError(f"--kernel {pid}: process {pid} runs no emu kernel "
                          "(give the pid of the process that booted it: see `emu kernels`)")
    return KernelRef(pid, link)


class Attached:
    """A kernel's image mapped read-only in this process (see the module's doc).

    `img` is the ctypes image, laid out as in the kernel's own processes. Use as a
    context manager, or call close().
    """

    def __init__(self, ref: KernelRef) -> None:
        self.pid = ref.pid
        self._addr = 0
        self._size = 0
        try:
            fd = os.open(ref.link, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise AttachError(f"kernel {ref.pid}: cannot open its image: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid():
                raise AttachError(f"kernel {ref.pid} belongs to {_user_name(st.st_uid)}, "
                                  "not to you: refused")
            self._map(fd, st.st_size)
        finally:
            os.close(fd)
        hdr = image.Header.from_address(self._addr)
        itype = image.image_type(hdr.max_tasks, hdr.max_completions, hdr.log_records,
                                 hdr.max_atomics, hdr.max_spinlocks, hdr.nr_irqs,
                                 heap_size=hdr.heap.size, max_timers=hdr.max_timers,
                                 ncpus=hdr.ncpus, trace_buf_events=hdr.trace_buf_events)
        if hdr.magic != image.IMAGE_MAGIC or ctypes.sizeof(itype) != self._size:
            self.close()
            raise AttachError(f"kernel {ref.pid} is still booting, or runs another version "
                              "of emu: try again")
        self.img = cast(image.ImageView, itype.from_address(self._addr))

    def _map(self, fd: int, size: int) -> None:
        addr = _libc.mmap(None, size, 0x1, 0x01, fd, 0)  # PROT_READ, MAP_SHARED
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise AttachError(f"kernel image: mmap failed: {os.strerror(err)}")
        self._addr, self._size = addr, size

    def close(self) -> None:
        """Unmap the image (idempotent)."""
        if self._addr:
            self.img = None  # type: ignore[assignment]
            _libc.munmap(self._addr, self._size)
            self._addr = 0

    def __enter__(self) -> Attached:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- what the tools show ---------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """The kernel still runs (its booting process lives and it is not shutting down)."""
        return not self.img.hdr.shutting_down and not _native.pid_is_dead(self.pid)

    @property
    def uptime(self) -> float:
        """Seconds since boot."""
        return (time.monotonic_ns() - self.img.hdr.boot_ns) / 1e9

    def task_recs(self) -> list[Any]:
        """The task records in use (not the idle tasks)."""
        img = self.img
        recs = [img.tasks[i] for i in range(min(img.hdr.task_high, len(img.tasks)))]
        return [r for r in recs if r.in_use and not r.flags & PF_IDLE]

    def ps(self) -> list[str]:
        """The task table as ``kernel.ps()`` shows it."""
        return task.ps_table(self.img)

    def boot_comm(self) -> str:
        """The name of the booting task."""
        for rec in self.task_recs():
            if rec.pid == self.pid:
                return str(rec.full_name.decode("utf-8", "replace"))
        return "?"

    def irq_counts(self) -> list[int]:
        """Interrupts handled so far, per CPU (the sum of /proc/interrupts' columns)."""
        img = self.img
        ncpus = img.hdr.ncpus
        return [sum(int(d.kstat[c]) for d in img.irqs) for c in range(ncpus)]

    def softirq_counts(self) -> list[int]:
        """Softirq vectors run so far, per CPU."""
        return [int(self.img.percpu[c].softirq_count) for c in range(self.img.hdr.ncpus)]

    def running_on(self) -> dict[int, list[str]]:
        """Emulated CPU -> names of its tasks in state R."""
        out: dict[int, list[str]] = {}
        for rec in self.task_recs():
            if rec.state == TASK_RUNNING:
                out.setdefault(int(rec.cpu), []).append(rec.comm.decode("utf-8", "replace"))
        return out


def _stamp(ns: int) -> str:
    return f"[{ns // 1_000_000_000:5d}.{(ns // 1000) % 1_000_000:06d}] "


class LogReader:
    """Follows a kernel's log ring, lock-free: each read() returns the lines logged
    since the last one, ``[seconds.micros] text``.

    A line whose continuation (pr_cont) may still come is held back for one read
    (flush() returns it). Records overwritten before they were read are counted in
    `lost`.
    """

    def __init__(self, img: image.ImageView, from_start: bool = True) -> None:
        self.img = img
        hdr = img.hdr
        self.seq = int(hdr.log_first_seq if from_start else hdr.log_next_seq)
        self.lost = 0
        self._held: str | None = None

    def _records(self) -> list[tuple[bool, str]]:
        hdr, log = self.img.hdr, self.img.log
        n = hdr.log_records
        end = int(hdr.log_next_seq)
        if end - self.seq > n:
            self.lost += end - n - self.seq
            self.seq = end - n
        out = []
        for seq in range(self.seq, end):
            rec = log[seq % n]
            cont, ts = bool(rec.cont), int(rec.ts_ns)
            text = bytes(rec.text[: rec.length]).decode("utf-8", "replace")
            if rec.seq != seq:  # overwritten while we read
                self.lost += 1
                continue
            out.append((cont, text if cont else _stamp(ts) + text))
        self.seq = end
        return out

    def read(self) -> list[str]:
        """The complete lines logged since the last read."""
        lines: list[str] = []
        for cont, text in self._records():
            if cont and self._held is not None:
                self._held += text
                continue
            if self._held is not None:
                lines.append(self._held)
            self._held = text
        return lines

    def flush(self) -> list[str]:
        """The line held back for a continuation, if any."""
        held, self._held = self._held, None
        return [held] if held is not None else []

    def poll(self) -> list[str]:
        """read(), then the held line too if no continuation came (call it periodically)."""
        had = self._held
        lines = self.read()
        if self._held is not None and self._held == had:
            lines += self.flush()
        return lines
