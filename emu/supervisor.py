"""The supervisor process: death watch of every task and the hung-task detector.

It is forked at boot and leads the process group that every kthread joins. Two pipes
tie the group's life to the booting process and to the supervisor: each has one
writer (the booting process, the supervisor) and every task holds the read ends with
O_ASYNC set to deliver SIGKILL to the group. When either writer dies, however it
dies, the kernel closes its end and kills every task at once. A third pipe, written
only by the supervisor, tells the booting process that the kernel died (kernel.py):
a panic writes its message there, then kills the group, the supervisor included.

A task that dies outside emu is an Oops, and the other tasks go on, except where the
kernel could not go on either: an idle task's death and a death in interrupt context
(a handler, a softirq) panic, as in Linux.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal as _os_signal
import time
import traceback
from typing import Any

import _emu_native as _native

from . import bug, image, records, trace
from .completion import _from_index, complete_all
from .constants import (
    PF_EXITING,
    PF_IDLE,
    PF_KTHREAD,
    TAINT_DIE,
    TASK_NOLOAD,
    TASK_UNINTERRUPTIBLE,
    TASK_WAKEKILL,
)
from .errors import CapacityError
from .irqchip import IRQTF_RUNTHREAD, irq_finalize_oneshot, irq_inject_interrupt
from .kthread import KTHREAD_EXITED, KTHREAD_PINNED, SIG_REAP, exit_notify
from .preempt import HARDIRQ_MASK, NMI_MASK, SOFTIRQ_OFFSET
from .printk import log_store
from .sched import SIG_SHOW_STACK
from .timer import SIG_CLOCK, ClockEvent
from .wait import remove_waiter, wake_up_var

#: How often the death watch looks for new tasks, in seconds.
POLL_INTERVAL = 0.05
#: Wakes the supervisor's loop (a new emulated device, a timer due earlier).
SIG_WAKE = SIG_CLOCK


def main(img: image.SharedImage, ready_wfd: int, death_wfd: int) -> None:
    """Run the supervisor loop until shutdown; never returns. `death_wfd`: the write end
    of the death pipe (only the supervisor holds it)."""
    status = 1
    try:
        _native.set_comm("emu-supervisor")
        _os_signal.signal(_os_signal.SIGINT, _os_signal.SIG_IGN)
        os.write(ready_wfd, b"1")
        os.close(ready_wfd)
        Supervisor(img, death_wfd).run()
        status = 0
    except BaseException as exc:  # a bug of emu's: the kernel dies, say why
        try:
            log_store(0, "".join(["emu: the supervisor crashed\n",
                                  *traceback.format_exception(type(exc), exc, exc.__traceback__)]))
            os.write(death_wfd, f"the supervisor crashed: {type(exc).__name__}: {exc}".encode())
        except BaseException:
            pass
    finally:
        os._exit(status)


def panic(death_wfd: int, reason: str) -> None:
    """panic(): log it, tell the booting process why the kernel dies, kill every task
    (the supervisor too). Never returns."""
    try:
        log_store(0, f"Kernel panic - not syncing: {reason}")
    finally:  # whatever happens, the booting process learns why, and everything dies
        try:
            os.write(death_wfd, f"the kernel panicked: {reason}".encode())
        finally:
            os.killpg(os.getpgrp(), _os_signal.SIGKILL)


class Supervisor:
    def __init__(self, img: image.SharedImage, death_wfd: int) -> None:
        self.img = img
        self.hdr = img.img.hdr
        self.death_wfd = death_wfd
        self.poller = select.poll()
        self.watched: dict[int, tuple[int, int, int]] = {}  # fd -> (slot, generation, pid)
        self.by_slot: dict[int, int] = {}  # slot -> fd
        self.dead: dict[int, int] = {}  # slot -> generation whose process was seen gone
        self.hung = HungTaskDetector(img, death_wfd)
        self.boot_pidfd = os.pidfd_open(self.hdr.boot_pid)  # see ask_to_reap()
        # SIG_WAKE (e.g. from add_irq_source()) makes poll() return: CPython writes a
        # byte to the wakeup fd for every signal that has a Python handler.
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _os_signal.set_wakeup_fd(wake_w)
        _os_signal.signal(SIG_WAKE, lambda signum, frame: None)
        self.poller.register(self.wake_r, select.POLLIN)
        self.clock = ClockEvent(img)  # the backup clock event device of the timers
        self.tracer = trace.SpoolWriter(img)

    def run(self) -> None:
        while not self.hdr.shutting_down:
            self.watch_new_tasks()
            timeout_ms = min(POLL_INTERVAL * 1000, fire_irq_sources(self.img) / 1e6,
                             self.clock.fire() / 1e6)
            for fd, _ in self.poller.poll(max(timeout_ms, 0)):
                if fd == self.wake_r:
                    os.read(self.wake_r, 512)
                else:
                    self.task_died(fd)
            self.hung.maybe_scan()
            self.tracer.poll()

    def watch_new_tasks(self) -> None:
        tasks = self.img.img.tasks
        for slot in range(self.hdr.task_high):
            rec = tasks[slot]
            fd = self.by_slot.get(slot)
            if fd is not None and (not rec.in_use or self.watched[fd][1] != rec.generation):
                self.unwatch(fd)
                fd = None
            if (fd is None and rec.in_use and rec.pid > 0 and slot != 0
                    and self.dead.get(slot) != rec.generation):
                self.watch(slot, rec)

    def watch(self, slot: int, rec: Any) -> None:
        # Read (generation, pid) as one snapshot: the task may exit and its slot be
        # reused (pid reset) at any moment; reap() then sees a stale generation.
        generation, pid = rec.generation, rec.pid
        if rec.generation != generation or pid <= 0:
            return
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.reap(slot, generation, pid)
            return
        self.watched[fd] = (slot, generation, pid)
        self.by_slot[slot] = fd
        self.poller.register(fd, select.POLLIN)

    def unwatch(self, fd: int) -> None:
        slot, _, _ = self.watched.pop(fd)
        self.by_slot.pop(slot, None)
        self.poller.unregister(fd)
        os.close(fd)

    def task_died(self, fd: int) -> None:
        slot, generation, pid = self.watched[fd]
        self.unwatch(fd)
        self.reap(slot, generation, pid)

    def reap(self, slot: int, generation: int, pid: int) -> None:
        """A task process is gone: if it did not exit through emu, report and clean up,
        or panic where the kernel could not go on (make_task_dead(), do_exit())."""
        self.dead[slot] = generation  # once: an exited task's slot lives on until released
        rec = self.img.img.tasks[slot]
        ppid = rec.ppid  # before the check: a released slot may be reused at any moment
        if not died_outside_emu(rec, generation):
            # It exited through emu (a spare request, if its slot was reused, is harmless).
            self.ask_to_reap(ppid)
            return
        comm = rec.comm.decode("utf-8", "replace")
        bug.oops(None, f"task {comm}:{pid} died outside emu (killed by a real signal?)",
                 cpu=rec.cpu, pid=pid, comm=comm)
        if rec.flags & PF_IDLE:
            panic(self.death_wfd, "Attempted to kill the idle task!")
        # Its interrupt's line stays in progress, its softirqs half run: no way back.
        if rec.preempt_count & (HARDIRQ_MASK | NMI_MASK | SOFTIRQ_OFFSET):
            panic(self.death_wfd, "Fatal exception in interrupt")
        if rec.wq_on:
            index = rec.wq_on - 1
            remove_waiter(_from_index(index, self.img.img.completions[index].generation), slot)
        exit_notify(rec, 0)  # kthread_stop() of a thread that died returns 0, as after an Oops
        # Nor may a kthread_park() wait for it: it will never park. (Before it pinned
        # itself, its creator may be waiting for that completion, and handles the death.)
        if rec.kflags & KTHREAD_PINNED:
            complete_all(_from_index(rec.parked, self.img.img.completions[rec.parked].generation))
        self.irq_thread_dtor(slot, generation, pid, comm)
        self.ask_to_reap(ppid)

    def ask_to_reap(self, ppid: int) -> None:
        """Have the booting process collect an exited kthread (KTHREAD_EXITED) it created;
        a kthread is not asked: it ignores SIGCHLD, so the host kernel reaps its children."""
        if ppid != self.hdr.boot_pid:
            return
        try:
            _os_signal.pidfd_send_signal(self.boot_pidfd, SIG_REAP)
        except OSError:
            pass  # gone (and the kernel with it), or its signal queue is full

    def irq_thread_dtor(self, slot: int, generation: int, pid: int, comm: str) -> None:
        """irq_thread_dtor(): if the dead task was an irq thread, its line must not wait
        for it: its wake-up request is dropped and, when no other thread serves the line,
        the count of running thread handlers is cleared and the line unmasked. New
        interrupts do not wake it (PF_EXITING, set by exit_notify())."""
        tasks = self.img.img.tasks
        for irq in range(self.hdr.nr_irqs):
            desc = self.img.img.irqs[irq]
            actions = list(desc.actions)
            mine = [a for a in actions
                    if a.thread_slot == slot and a.thread_generation == generation]
            if not mine:
                continue
            log_store(3, f'exiting task "{comm}" ({pid}) is an active IRQ thread (irq {irq})')
            records.field_and(mine[0], "thread_flags", ~IRQTF_RUNTHREAD)
            others = [a for a in actions if a.thread_slot >= 0 and a.thread_slot != slot
                      and tasks[a.thread_slot].generation == a.thread_generation
                      and not tasks[a.thread_slot].flags & PF_EXITING]
            if not others:  # only the dead thread can have been running a handler
                records.field_store(desc, "threads_active", 0)
                irq_finalize_oneshot(irq)
            wake_up_var(ctypes.addressof(desc))  # synchronize_irq()
            return


def died_outside_emu(rec: Any, generation: int) -> bool:
    """Whether task slot `rec` still holds generation `generation` and its task did not
    exit through emu. Its creator may free and reuse the slot meanwhile: freeing clears
    in_use; reuse resets the other fields (kflags too), bumps the generation, then sets
    in_use. Reading in the reverse order (kflags, in_use, generation) never takes the
    new task's reset flags for the old task's."""
    if rec.kflags & KTHREAD_EXITED:
        return False
    return bool(rec.in_use) and rec.generation == generation


def add_irq_source(irq_nr: int, delay: float, rate_hz: float, burst: int, count: int) -> int:
    """Register an emulated device (see Kernel.add_irq_source()); returns its id."""
    img = image.this()
    if not 0 <= irq_nr < img.img.hdr.nr_irqs:
        raise ValueError(f"irq must be from 0 to {img.img.hdr.nr_irqs - 1}, got {irq_nr}")
    if delay < 0 or rate_hz < 0:
        raise ValueError("delay and rate_hz must not be negative")
    if burst < 1:
        raise ValueError(f"burst must be at least 1, got {burst}")
    if count == 0 or count < -1:
        raise ValueError(f"count must be positive or -1 (unlimited), got {count}")
    if count != 1 and not rate_hz:
        raise ValueError("a source that fires more than once needs rate_hz")
    for index, src in enumerate(img.img.irq_sources):
        if not src.in_use:
            src.irq = irq_nr
            src.burst = burst
            src.remaining = count
            src.period_ns = int(1e9 / rate_hz) if rate_hz else 0
            src.fired = 0
            src.next_ns = time.monotonic_ns() + int(delay * 1e9)
            src.in_use = 1
            try:
                os.kill(img.img.hdr.supervisor_pid, SIG_WAKE)  # look at it now
            except ProcessLookupError:
                pass
            return index
    raise CapacityError(f"all {len(img.img.irq_sources)} interrupt sources are in use")


def remove_irq_source(index: int) -> None:
    """Stop emulated device `index`."""
    image.this().img.irq_sources[index].in_use = 0


def fire_irq_sources(img: image.SharedImage) -> int:
    """Raise the interrupts of every device that is due; returns ns until the next one."""
    now = time.monotonic_ns()
    wait = 1 << 62
    for src in img.img.irq_sources:
        if not src.in_use:
            continue
        while src.in_use and src.next_ns <= now:
            for _ in range(src.burst):
                irq_inject_interrupt(src.irq)
            src.fired += 1
            if src.remaining > 0:
                src.remaining -= 1
                if src.remaining == 0:
                    src.in_use = 0
            if not src.period_ns:
                src.in_use = 0
            src.next_ns += src.period_ns
            if src.next_ns <= now:  # periods missed while we were late: skip, no burst
                src.next_ns = now + src.period_ns
        if src.in_use:
            wait = min(wait, src.next_ns - now)
    return wait


class HungTaskDetector:
    """khungtaskd (kernel/hung_task.c): report tasks stuck in plain D sleep."""

    def __init__(self, img: image.SharedImage, death_wfd: int) -> None:
        self.img = img
        self.hdr = img.img.hdr
        self.death_wfd = death_wfd
        self.seen: dict[tuple[int, int], tuple[int, int]] = {}  # (slot, gen) -> (nvcsw, since)
        self.next_scan = time.monotonic_ns()

    def interval_ns(self) -> int:
        secs = self.hdr.hung_task_check_interval_secs or self.hdr.hung_task_timeout_secs
        return secs * 1_000_000_000

    def maybe_scan(self) -> None:
        if not self.hdr.hung_task_timeout_secs:
            return
        now = time.monotonic_ns()
        if now < self.next_scan:
            return
        self.next_scan = now + self.interval_ns()
        self.check_hung_uninterruptible_tasks(now)

    def check_hung_uninterruptible_tasks(self, now: int) -> None:
        if self.hdr.taint & (1 << TAINT_DIE):
            return  # "If the system crashed already then all bets are off"
        timeout_ns = self.hdr.hung_task_timeout_secs * 1_000_000_000
        tasks = self.img.img.tasks
        hung = 0
        live = set()
        for slot in range(self.hdr.task_high):
            rec = tasks[slot]
            state = rec.state
            if not rec.in_use or not state & TASK_UNINTERRUPTIBLE or state & (
                TASK_WAKEKILL | TASK_NOLOAD
            ):
                continue
            key = (slot, rec.generation)
            live.add(key)
            switches = rec.nvcsw
            if not switches:
                continue
            seen = self.seen.get(key)
            if seen is None or seen[0] != switches:
                self.seen[key] = (switches, now)
                continue
            if now - seen[1] < timeout_ns:
                continue
            hung += 1
            self.report(rec, (now - seen[1]) // 1_000_000_000)
        for key in set(self.seen) - live:
            del self.seen[key]
        if hung and self.hdr.hung_task_panic:
            panic(self.death_wfd, "hung_task: blocked tasks")

    def keep_report(self, rec: Any, blocked_secs: int) -> None:
        """Keep the report for kernel.hung_tasks, which must not depend on the log ring
        (it wraps). The entry is filled before the count makes it visible."""
        n = self.hdr.hung_reports_n
        if n < image.HUNG_REPORTS_MAX:
            entry = self.hdr.hung_reports[n]
            entry.pid, entry.secs, entry.comm = rec.pid, blocked_secs, rec.comm
        records.field_add(self.hdr, "hung_reports_n", 1)

    def report(self, rec: Any, blocked_secs: int) -> None:
        """check_hung_task(): the report of one hung task, written as one unit: header,
        the task's call trace (it hands it over, see bug.request_stack()), then what it
        waits on (debug_show_blocker())."""
        records.field_add(self.hdr, "hung_task_detect_count", 1)
        warnings = self.hdr.hung_task_warnings
        if not warnings:
            return
        if warnings > 0:
            self.hdr.hung_task_warnings = warnings - 1
        comm = rec.comm.decode("utf-8", "replace")
        pid = rec.pid
        lines = [
            f"INFO: task {comm}:{pid} blocked for more than {blocked_secs} seconds.",
            f"      {bug.tainted_str()} emu",
            '"echo 0 > /proc/sys/kernel/hung_task_timeout_secs" disables this message.',
            f"task:{comm:<15.15} state:D stack:0     pid:{pid} tgid:{pid} "
            f"ppid:{rec.ppid} flags:0x{rec.flags:08x}",
            "Call Trace:",
        ]
        trace = bug.request_stack(pid, SIG_SHOW_STACK)
        lines += trace if trace is not None else [" (the task did not hand over its stack)"]
        blocker = self.blocker(rec)
        if blocker:
            lines.append(f"INFO: task {comm}:{pid} {blocker}.")
        log_store(3, "\n".join(lines), keep=("hung_task",))
        self.keep_report(rec, blocked_secs)
        if warnings == 1:
            log_store(
                3, "Future hung task reports are suppressed, see sysctl kernel.hung_task_warnings"
            )

    def blocker(self, rec: Any) -> str:
        """What hung task `rec` waits on, as the end of an "INFO: task ..." sentence: the
        task it waits to exit (kthread_stop()) or to park (kthread_park()), else its
        completion and where that was created; "" if it waits on no completion."""
        if not rec.wq_on:
            return ""
        index = rec.wq_on - 1
        tasks = self.img.img.tasks
        for slot in range(self.hdr.task_high):
            other = tasks[slot]
            if not other.in_use or other.pid <= 0:
                continue
            who = f"{other.comm.decode('utf-8', 'replace')}:{other.pid}"
            if other.exited == index and other.flags & PF_KTHREAD:
                return f"is blocked in kthread_stop(), waiting for task {who} to exit"
            if other.parked == index and other.flags & PF_KTHREAD:
                return f"is blocked in kthread_park(), waiting for task {who} to park"
        comp = self.img.img.completions[index]
        origin = comp.site.decode("utf-8", "replace") or "?"
        return f"is blocked on completion#{index} created at {origin}"
