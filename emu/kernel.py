"""Booting and shutting down a kernel; the kernel handle.

``emu.boot()`` creates the shared image, makes the booting process a task (user
context), and forks the supervisor. Leaving the ``with`` block (or ``shutdown()``)
stops every remaining kthread, kills what does not stop, and leaves nothing behind.

The kernel dies with its supervisor (killed, or by a panic, which kills every task).
The booting process learns it at once: the supervisor alone holds the write end of
the death pipe, whose read end delivers SIG_KERNEL_DEAD to the booting process when
the supervisor writes a panic message or goes away. From then on `Kernel.alive` is
False and every emu call that would block raises KernelDeadError.
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import os
import signal as _os_signal
import sys
import tempfile
import time
from typing import Any

import _emu_native as _native

from . import (
    bug,
    completion,
    heap,
    image,
    irq,
    irqchip,
    kthread,
    preempt,
    records,
    sched,
    supervisor,
    task,
    tracefile,
    wait,
)
from . import trace as _trace
from .constants import PF_IDLE, PF_KTHREAD, PF_WQ_WORKER, TASK_RUNNING
from .errors import AlreadyBootedError, EmuError, KernelDeadError, StaleObjectError
from .kthread import KTHREAD_EXITED
from .printk import (
    CONSOLE_LOGLEVEL_DEFAULT,
    RATELIMIT_BURST_DEFAULT,
    RATELIMIT_INTERVAL_SECS_DEFAULT,
    dmesg,
    first_reports,
    log_store,
)
from .spinlock import SOFTLOCKUP_THRESH_DEFAULT

F_SETSIG = getattr(fcntl, "F_SETSIG", 10)
HZ_DEFAULT = 250
#: How long shutdown waits for kthreads to honour kthread_should_stop().
SHUTDOWN_GRACE_SECS = 2.0
#: The most emulated CPUs a kernel may have (CONFIG_NR_CPUS): boot(cpus=...) takes up to
#: this many, and a machine with more real CPUs boots on the first NR_CPUS of them.
NR_CPUS = image.NR_CPUS
#: Sent to the booting process when the kernel dies (the supervisor panicked or is gone).
SIG_KERNEL_DEAD = _os_signal.SIGRTMIN + 4

#: The kernel this process booted and has not shut down (for SIG_KERNEL_DEAD's handler).
_booted: Kernel | None = None


def _check_int(value: Any, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _cpu_map(cpus: Any) -> list[int]:
    """The real CPU of each emulated CPU for boot(cpus=...)."""
    allowed = sorted(os.sched_getaffinity(0))
    if cpus is None:
        if len(allowed) > NR_CPUS:
            print(f"emu: {len(allowed)} CPUs available, booting on the first {NR_CPUS} "
                  f"(emu.NR_CPUS)", file=sys.stderr)
        return allowed[:NR_CPUS]
    if isinstance(cpus, int) and not isinstance(cpus, bool):
        _check_int(cpus, "cpus", 1, NR_CPUS)
        return [allowed[i % len(allowed)] for i in range(cpus)]
    try:
        wanted = list(cpus)
    except TypeError:
        raise TypeError(
            f"cpus must be a CPU count or a list of real CPU ids, not {type(cpus).__name__}"
        ) from None
    if not 1 <= len(wanted) <= NR_CPUS:
        raise ValueError(f"cpus must name 1 to {NR_CPUS} CPUs (emu.NR_CPUS), got {len(wanted)}")
    allowed_set = set(allowed)
    for c in wanted:
        if not isinstance(c, int) or isinstance(c, bool):
            raise TypeError(f"cpus must hold int CPU ids, got {c!r}")
        if c not in allowed_set:
            raise ValueError(f"cpus: CPU {c} is not one this process may run on ({allowed})")
    return wanted


class Kernel:
    """The handle of a booted kernel (what ``emu.boot()`` returns)."""

    def __init__(self, img: image.SharedImage, supervisor_pid: int, death_rfd: int) -> None:
        self._img = img
        #: pid of the supervisor process (interrupt sources, khungtaskd, death watch)
        self.supervisor_pid = supervisor_pid
        self._down = False
        self._death_rfd = death_rfd  # read end of the death pipe (see the module's doc)
        self._cause = ""  # why the kernel died; empty while it lives
        #: kthreads ("comm/pid") that shutdown() killed because they did not stop when
        #: asked (they ignore kthread_should_stop()); Linux would never finish unloading.
        self.killed_kthreads: list[str] = []
        self._var_wait: list[wait.WaitQueueHead] = []  # wait_var_event()'s heads, kept alive
        self._trace: tuple[str, Any] | None = None  # (path, spool file) while tracing

    # configuration and counters
    @property
    def ncpus(self) -> int:
        """The number of emulated CPUs (0 to ncpus - 1), as booted."""
        return int(self._img.img.hdr.ncpus)

    @property
    def hz(self) -> int:
        """Jiffies per second (HZ), as booted (``emu.boot(hz=...)``, default 250)."""
        return int(self._img.img.hdr.hz)

    @property
    def cpu_map(self) -> list[int]:
        """Real CPU of each emulated CPU."""
        return list(self._img.cpu_map)

    @property
    def warnings(self) -> int:
        """WARNs reported so far (every one, also those the rate limit kept out of the log)."""
        return int(self._img.img.hdr.warnings)

    @property
    def bugs(self) -> int:
        """BUGs reported so far: ``BUG()``, "BUG: ..." splats (sleeping in atomic context,
        spinlock misuse) and soft lockups; every one, also those the rate limit kept out
        of the log."""
        return int(self._img.img.hdr.bugs)

    @property
    def oopses(self) -> int:
        """Oopses so far: exceptions escaping a threadfn or handler, ``BUG()``, tasks
        that died outside emu; every one, also those the rate limit kept out of the log."""
        return int(self._img.img.hdr.oopses)

    @property
    def first_reports(self) -> dict[str, list[str]]:
        """The first report of each kind made so far, as ``dmesg()`` lines, by kind:
        "warning", "bug", "oops", "hung_task", "soft_lockup". Kept apart from the log,
        so they survive the ring's wrapping and the rate limit: the report that explains
        a flood of others. A report longer than 4 KiB is cut. Any context; never sleeps."""
        return first_reports(self._img)

    @property
    def first_oops(self) -> list[str] | None:
        """The first Oops as ``dmesg()`` lines (see first_reports), None if none yet."""
        return self.first_reports.get("oops")

    @property
    def tainted(self) -> int:
        """The taint mask (/proc/sys/kernel/tainted): 0 when clean."""
        return int(self._img.img.hdr.taint)

    @property
    def hung_tasks(self) -> list[tuple[str, int, int]]:
        """Hung-task reports printed so far: (comm, pid, seconds blocked), oldest first.

        Kept in the image apart from the log, so they outlive the ring's wrapping; the
        first image.HUNG_REPORTS_MAX are listed. Any context; never sleeps.
        """
        hdr = self._img.img.hdr
        n = min(records.field_load(hdr, "hung_reports_n"), image.HUNG_REPORTS_MAX)
        return [(r.comm.decode("utf-8", "replace"), int(r.pid), int(r.secs))
                for r in hdr.hung_reports[:n]]

    def dmesg(self) -> list[str]:
        """The kernel log, one line per entry, ``[seconds.micros] text``."""
        return dmesg(self._img)

    def tasks(self) -> list[task.Task]:
        """Every task: the booting process and each kthread (not the idle tasks)."""
        return [t for t in task.live_tasks() if not t.flags & PF_IDLE]

    def proc_interrupts(self) -> str:
        """Interrupt counts per CPU, laid out like /proc/interrupts: how many times each
        line's handlers were entered on each CPU. Edges are not interrupts: an edge that
        arrives while the line is already pending on its CPU (raised, not yet taken)
        merges with it, as on real hardware, so a device that raised 2,000 edges in a
        burst may show fewer: an ``MRG:`` line at the end counts, per IRQ, the edges that
        merged so. A re-arrival while the handlers run on another CPU, or while the line
        is disabled, is replayed once however many edges came."""
        return irq.proc_interrupts()

    def add_irq_source(self, irq_nr: int, *, delay: float = 0.0, rate_hz: float = 0.0,
                       burst: int = 1, count: int = 1) -> int:
        """Emulate a device: the supervisor raises `irq_nr` `burst` times after `delay`
        seconds, then every 1/`rate_hz` seconds, `count` times in all (-1: until removed).
        Returns the source's id for remove_irq_source().

        Each raise is an edge. Edges that arrive while the line is still pending merge
        into one interrupt, as on real hardware, and are counted in proc_interrupts()'s
        ``MRG:`` lines: a burst, or a
        rate faster than the handler, gives fewer interrupts than edges. Periods the
        supervisor misses while it is late are skipped, not made up."""
        return supervisor.add_irq_source(irq_nr, delay, rate_hz, burst, count)

    def remove_irq_source(self, source: int) -> None:
        """Stop an emulated device."""
        supervisor.remove_irq_source(source)

    def ps(self) -> str:
        """A ps-style table of the tasks: ``PID CPU S WCHAN COMMAND``, WCHAN naming what
        a sleeping task waits on (``completion#ID (file.py:LINE)``, ``msleep``, ...)."""
        return "\n".join(task.ps_lines())

    def waiters(self, c: completion.Completion) -> list[task.Task]:
        """The tasks queued on completion `c`, in the order they will be woken."""
        return completion.waiters(c)

    def trace_start(self, path: str | os.PathLike[str]) -> None:
        """Start tracing to Perfetto trace file `path` (written by trace_stop() or at
        shutdown). From the booting process; raises EmuError if already tracing."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        if self._trace is not None:
            raise EmuError(f"already tracing to {self._trace[0]!r}: call trace_stop() first")
        if not self._img.is_boot_process:
            raise EmuError("only the process that booted the kernel may start tracing")
        tracefile._need_perfetto()
        where = os.path.dirname(os.path.abspath(path)) or "."
        if not os.access(where, os.W_OK | os.X_OK):
            raise EmuError(f"cannot write trace {os.fspath(path)!r}: directory {where!r} "
                           "is missing or not writable")
        spool = tempfile.TemporaryFile(prefix="emu-trace-")
        # The supervisor appends to it too (trace.py): every write goes to the end.
        fcntl.fcntl(spool.fileno(), fcntl.F_SETFL,
                    fcntl.fcntl(spool.fileno(), fcntl.F_GETFL) | os.O_APPEND)
        _trace.start(self._img, spool.fileno())
        self._trace = (os.fspath(path), spool)

    def trace_stop(self) -> tuple[int, int]:
        """Stop tracing and write the trace file; returns (events, dropped events).
        (0, 0) if not tracing."""
        if self._trace is None:
            return 0, 0
        path, spool = self._trace
        self._trace = None
        with spool:
            _trace.stop(self._img)
            spool.seek(0)
            return tracefile.write_trace(spool, path)

    @property
    def tracing(self) -> bool:
        """Whether a trace is being recorded (trace_start() or boot(trace=...))."""
        return self._trace is not None

    @property
    def alive(self) -> bool:
        """False once the kernel was shut down or died (its supervisor panicked or is gone)."""
        if self._down or self._cause:
            return False
        cause = self._death_cause()
        if cause:
            self._died(cause)
        return not cause

    @property
    def death_cause(self) -> str:
        """Why the kernel died (e.g. "the supervisor (pid 7) was killed by SIGKILL"),
        "" while it lives."""
        return self._cause

    def check_alive(self) -> None:
        """Raise KernelDeadError if the kernel died (it is unusable then)."""
        if not self.alive and self._cause:
            raise KernelDeadError(_dead_message(self._cause))

    def _death_cause(self) -> str:
        """Why the kernel died, or "" while it lives. Takes no lock: signal-handler safe."""
        if not self._img.is_boot_process or self._death_rfd < 0:
            if not _native.pid_is_dead(self.supervisor_pid):
                return ""
            return _exit_cause("the supervisor", self.supervisor_pid)
        try:
            said = os.read(self._death_rfd, 512)  # a panic message, or b"" at EOF
        except BlockingIOError:
            return ""  # nothing said, and the supervisor holds its end: it lives
        if said:
            return said.decode("utf-8", "replace").strip()
        # EOF: the supervisor is exiting (it may not be a zombie yet).
        return _exit_cause("the supervisor", self.supervisor_pid, wait=0.5)

    def _died(self, cause: str) -> None:
        """Mark the kernel dead: from now on every sleep raises KernelDeadError."""
        if not self._cause:
            self._cause = cause
            core = self._img.core
            if core is not None:
                core.set_dead(KernelDeadError, _dead_message(cause))

    # life cycle
    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop every remaining kthread and free everything. Idempotent.

        kthreads get the stop request of kthread_stop(); those still running after
        SHUTDOWN_GRACE_SECS are killed, named on stderr and in `killed_kthreads`.
        """
        if self._down:
            return
        if not self._img.is_boot_process:
            raise EmuError("only the process that booted the kernel may shut it down")
        self._down = True  # from here on SIG_KERNEL_DEAD interrupts nothing
        atexit.unregister(self.shutdown)
        try:
            cause = self._cause or self._death_cause()  # a death no signal reported yet
            if cause:  # every task died with the kernel: nothing to wait for
                self._died(cause)
                print(f"emu: the kernel died ({cause}); cleaned up", file=sys.stderr)
            else:
                self._stop_kthreads()
        finally:
            try:
                self.trace_stop()
            finally:
                self._teardown()

    def _stop_kthreads(self) -> None:
        for t in self.stop_kthreads([t for t in task.live_tasks() if t.flags & PF_KTHREAD]):
            self.killed_kthreads.append(f"{t.comm}/{t.pid}")
            log_store(3, f"emu: kthread {t.comm}/{t.pid} did not stop at shutdown: killed")

    def running_kthreads(self) -> list[task.Task]:
        """The kthreads whose threadfn has not returned yet (created and not yet woken
        ones included), in task-table order; not the kernel's own (idle tasks and
        kworkers), which live as long as the kernel."""
        return [t for t in task.live_tasks()
                if t.flags & PF_KTHREAD and not t.flags & (PF_IDLE | PF_WQ_WORKER)
                and _still_running(t)]

    def stop_kthreads(self, kthreads: list[task.Task],
                      grace: float = SHUTDOWN_GRACE_SECS) -> list[task.Task]:
        """Ask each of `kthreads` to stop, as kthread_stop() does (kthread_should_stop()
        becomes true and the thread is woken, or it exits with -EINTR if it never ran),
        without waiting for each; then wait up to `grace` seconds for them to return.
        Returns those still running: they ignore kthread_should_stop(). Process context.
        """
        for t in kthreads:
            try:
                kthread.request_stop(t)
            except StaleObjectError:
                pass  # its creator, a kthread, stopped and released it meanwhile
        deadline = time.monotonic() + grace
        for t in kthreads:  # exit_notify() wakes the kflags word when it exits or dies
            left = max(0, int((deadline - time.monotonic()) * self.hz) + 1)
            wait.wait_var_event_timeout(image.field_addr(t._rec, "kflags"),
                                        functools.partial(_stopped, t), left)
        return [t for t in kthreads if _still_running(t)]

    def _teardown(self) -> None:
        global _booted
        img = self._img
        _disarm_death_pipe(self._death_rfd)  # the supervisor's end is no news now
        self._death_rfd = -1
        img.img.hdr.shutting_down = 1
        try:
            os.killpg(self.supervisor_pid, _os_signal.SIGKILL)
        except ProcessLookupError:
            pass
        # Our own children too: one forked after the kernel died never joined the group.
        # One snapshot: SIG_REAP's handler may remove entries while we loop.
        children = list(kthread._children)
        for pid in children:
            try:
                os.kill(pid, _os_signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in [self.supervisor_pid, *children]:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        kthread._children.clear()
        if _booted is self:
            _booted = None
        for fd in [img.boot_wfd, *img.watch_rfds]:
            if fd >= 0:
                os.close(fd)
        img.boot_wfd = -1
        img.watch_rfds = []
        task.set_current(None)
        task._handles.clear()
        image.attach(None)
        img.close()


def _stopped(t: task.Task) -> bool:
    return not _still_running(t)


def _still_running(t: task.Task) -> bool:
    """`t` was neither released nor has it exited (or died). A kthread whose creator
    (another kthread) has not yet published its pid (0) is still starting."""
    rec = t._rec
    pid = rec.pid
    return bool(rec.in_use and rec.generation == t.generation
                and not rec.kflags & KTHREAD_EXITED and (pid <= 0 or not _native.pid_is_dead(pid)))


def boot(
    cpus: Any = None,
    hz: int = HZ_DEFAULT,
    hung_task_timeout_secs: int = 120,
    *,
    max_tasks: int = 256,
    max_completions: int = 16384,
    max_atomics: int = 16384,
    max_spinlocks: int = 4096,
    max_timers: int = 1024,
    softlockup_thresh_secs: int = SOFTLOCKUP_THRESH_DEFAULT,
    nr_irqs: int = 32,
    log_records: int = 4096,
    console_loglevel: int = CONSOLE_LOGLEVEL_DEFAULT,
    hung_task_check_interval_secs: int = 0,
    hung_task_warnings: int = 10,
    hung_task_panic: int = 0,
    heap_size: int = heap.HEAP_SIZE_DEFAULT,
    printk_ratelimit: int = RATELIMIT_INTERVAL_SECS_DEFAULT,
    printk_ratelimit_burst: int = RATELIMIT_BURST_DEFAULT,
    trace: str | os.PathLike[str] | None = None,
    trace_buf_events: int | None = None,
) -> Kernel:
    """Boot a kernel in this process; use as ``with emu.boot(...) as kernel:``.

    `cpus` is a CPU count or a list of real CPU ids (default: the CPUs this process may
    run on). The booting process becomes a task in user context. The keyword arguments
    are capacity limits and the hung-task sysctls; hung_task_timeout_secs=0 disables
    the detector and hung_task_warnings=-1 reports without limit. printk_ratelimit and
    printk_ratelimit_burst are the sysctls of the same names: at most that many
    identical reports (same kind and place) are logged every that many seconds, then
    "<function>: N callbacks suppressed"; printk_ratelimit=0 logs every report.
    `trace`: a Perfetto trace file to record into from boot on (see
    Kernel.trace_start()); each emulated CPU has a ring of `trace_buf_events` events (a
    power of two; by default 131072 events shared out among the CPUs, at least 1024
    each: 65536 on 2 CPUs).
    """
    if image._this is not None:
        raise AlreadyBootedError(
            "a kernel is already running in this process: shut it down (leave its `with` "
            "block or call kernel.shutdown()) before booting another"
        )
    cpu_map = _cpu_map(cpus)
    _check_int(hz, "hz", 1, 10000)
    _check_int(hung_task_timeout_secs, "hung_task_timeout_secs", 0, 1 << 30)
    _check_int(max_tasks, "max_tasks", 2, 1 << 16)
    _check_int(max_completions, "max_completions", 16, 1 << 22)
    _check_int(max_atomics, "max_atomics", 1, 1 << 22)
    _check_int(max_spinlocks, "max_spinlocks", 1, 1 << 22)
    _check_int(max_timers, "max_timers", 1, 1 << 22)
    _check_int(softlockup_thresh_secs, "softlockup_thresh_secs", 1, 1 << 20)
    _check_int(nr_irqs, "nr_irqs", 1, image.NR_IRQS_MAX)
    _check_int(log_records, "log_records", 16, 1 << 22)
    _check_int(console_loglevel, "console_loglevel", 0, 8)
    _check_int(hung_task_check_interval_secs, "hung_task_check_interval_secs", 0, 1 << 30)
    _check_int(hung_task_warnings, "hung_task_warnings", -1, 1 << 30)
    _check_int(hung_task_panic, "hung_task_panic", 0, 1)
    _check_int(heap_size, "heap_size", 4096, (1 << 31) - 1)
    _check_int(printk_ratelimit, "printk_ratelimit", 0, 1 << 20)
    _check_int(printk_ratelimit_burst, "printk_ratelimit_burst", 1, 1 << 30)
    if trace_buf_events is None:
        trace_buf_events = _trace.default_buf_events(len(cpu_map))
    _check_int(trace_buf_events, "trace_buf_events", 16, 1 << 24)
    if trace_buf_events & (trace_buf_events - 1):
        raise ValueError(f"trace_buf_events must be a power of two, got {trace_buf_events}")

    image.reclaim_orphans()
    extra_queues = 2 * max_tasks + wait.VAR_WAIT_TABLE_SIZE  # kthread's; wait_var_event()'s
    img = image.SharedImage(max_tasks, max_completions + extra_queues, log_records,
                            max_atomics, max_spinlocks, nr_irqs, heap_size, max_timers,
                            len(cpu_map), trace_buf_events)
    heap.heap_init(img, heap_size)
    hdr = img.img.hdr
    hdr.magic = image.IMAGE_MAGIC
    hdr.boot_ns = time.monotonic_ns()
    hdr.hz = hz
    img.jiffy_ns = 1_000_000_000 // hz
    img.core.set_timebase(img.jiffy_ns, sched.FOREVER_NS)
    img.core.set_dead_owner_hook(bug.report_dead_owner)
    hdr.ncpus = len(cpu_map)
    hdr.max_tasks = max_tasks
    hdr.max_completions = max_completions + extra_queues
    hdr.log_records = log_records
    hdr.console_loglevel = console_loglevel
    hdr.boot_pid = os.getpid()
    hdr.hung_task_timeout_secs = hung_task_timeout_secs
    hdr.hung_task_check_interval_secs = hung_task_check_interval_secs
    hdr.hung_task_warnings = hung_task_warnings
    hdr.hung_task_panic = hung_task_panic
    hdr.softlockup_thresh_secs = softlockup_thresh_secs
    hdr.nr_irqs = nr_irqs
    hdr.ratelimit_interval_ns = printk_ratelimit * 1_000_000_000
    hdr.ratelimit_burst = printk_ratelimit_burst
    for name in image.PERCPU_NONE:
        image.percpu_fill(img.img, name, -1)
    for name in ("timer_next_ns", "idle_clock_ns"):
        image.percpu_fill(img.img, name, sched.FOREVER_NS)
    hdr.clock_programmed_ns = sched.FOREVER_NS
    img.cpu_map = cpu_map
    image.attach(img)
    try:
        var_wait = wait.var_wait_table_init()
        _make_boot_task(img)
        sup_pid, death_rfd = _start_supervisor(img)
    except BaseException:
        task.set_current(None)
        image.attach(None)
        img.close()
        raise
    hdr.supervisor_pid = sup_pid
    kernel = Kernel(img, sup_pid, death_rfd)
    kernel._var_wait = var_wait
    atexit.register(kernel.shutdown)
    _watch_death(kernel)
    if trace is not None:
        try:
            kernel.trace_start(trace)
        except BaseException:
            kernel.shutdown()
            raise
    return kernel


def _dead_message(cause: str) -> str:
    return (f"the emu kernel died: {cause}; every kthread died with it. Leave the "
            "`with emu.boot()` block (or call kernel.shutdown()) and boot a new kernel")


def _exit_cause(who: str, pid: int, wait: float = 0.0) -> str:
    """How child process `pid` ended (waiting up to `wait` seconds for it to finish
    exiting), without reaping it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return f"{who} (pid {pid}) is gone"
        if info is not None or time.monotonic() >= deadline:
            break
        time.sleep(0.001)
    if info is None:
        return f"{who} (pid {pid}) is gone"
    if info.si_code == os.CLD_EXITED:
        return f"{who} (pid {pid}) exited with status {info.si_status}"
    try:
        name = _os_signal.Signals(info.si_status).name
    except ValueError:
        name = f"signal {info.si_status}"
    return f"{who} (pid {pid}) was killed by {name}"


def _kernel_died(signum: int, frame: Any) -> None:
    """SIG_KERNEL_DEAD: the supervisor wrote a panic message to the death pipe or died.

    Marks the kernel dead and raises KernelDeadError to interrupt what the booting
    process does (a sleep, a polling wait, any code), like KeyboardInterrupt. Not inside
    emu's own critical sections (raw locks are held with interrupts off, handlers run in
    interrupt context, spinlocks in atomic context): raising there would leave them half
    done; the next sleep raises instead.
    """
    kernel = _booted
    if kernel is None or kernel._down or kernel._cause:
        return
    cause = kernel._death_cause()
    if not cause:
        return  # a stale signal: this kernel lives
    kernel._died(cause)
    if preempt.preemptible():
        raise KernelDeadError(_dead_message(cause))


def _watch_death(kernel: Kernel) -> None:
    """Arm the death pipe: SIG_KERNEL_DEAD to this process when the supervisor writes to
    it or dies (see the module's doc)."""
    global _booted
    _booted = kernel
    _os_signal.signal(SIG_KERNEL_DEAD, _kernel_died)
    fd = kernel._death_rfd
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(fd, F_SETSIG, SIG_KERNEL_DEAD)
    fcntl.fcntl(fd, fcntl.F_SETFL,
                fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC | os.O_NONBLOCK)
    _ = kernel.alive  # a death before the pipe was armed sent no signal


def _disarm_death_pipe(fd: int) -> None:
    """No SIG_KERNEL_DEAD any more (kthreads share this open pipe: clear O_ASYNC), and close."""
    if fd < 0:
        return
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_ASYNC)
    os.close(fd)


def _make_boot_task(img: image.SharedImage) -> None:
    preempt.reset()
    try:
        with open("/proc/self/comm") as f:
            name = f.read().strip()
    except OSError:
        name = "python"
    real = os.sched_getaffinity(0)
    cpu = next((i for i, c in enumerate(img.cpu_map) if c in real), 0)
    me = task.alloc_slot(name, 0, cpu, TASK_RUNNING)
    me._rec.pid = os.getpid()
    me._rec.ppid = os.getppid()
    task.set_current(me)
    irqchip.install_doorbell()
    sched.install_show_stack()
    kthread.install_reaper()


def _start_supervisor(img: image.SharedImage) -> tuple[int, int]:
    """Fork the supervisor; returns its pid and the read end of the death pipe."""
    boot_r, boot_w = os.pipe()
    sup_r, sup_w = os.pipe()
    ready_r, ready_w = os.pipe()
    death_r, death_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(boot_w)
        os.close(ready_r)
        os.close(death_r)
        os.setpgid(0, 0)
        img.is_boot_process = False
        supervisor.main(img, ready_w, death_w)  # never returns
    os.close(sup_w)
    os.close(ready_w)
    os.close(death_w)
    try:
        ok = os.read(ready_r, 1)
    finally:
        os.close(ready_r)
    if ok != b"1":
        for fd in (boot_w, boot_r, sup_r, death_r):
            os.close(fd)
        os.waitpid(pid, 0)
        raise EmuError("the emu supervisor failed to start")
    for fd in (boot_r, sup_r):
        fcntl.fcntl(fd, fcntl.F_SETOWN, -pid)
        fcntl.fcntl(fd, F_SETSIG, _os_signal.SIGKILL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
    img.boot_wfd = boot_w
    img.watch_rfds = [boot_r, sup_r]
    return pid, death_r
