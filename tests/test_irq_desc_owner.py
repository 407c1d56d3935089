"""One owner for an IRQ descriptor's status word: every change is made under the
descriptor's lock, so no change made on one CPU is lost to another CPU's change.

The interleaving test runs enable_irq() in this process under an opcode tracer and, at
each opcode boundary in turn, lets a kthread on the other side make the change that a
threaded interrupt makes when it wakes its thread (the line stays masked, IRQS_ONESHOT,
until the thread returns). The kthread runs the real code; the tracer waits until it
is done or sleeps on the descriptor's lock (it then finishes once enable_irq() drops
it). Whatever the boundary, the ONESHOT mask must survive enable_irq(): an OR that
landed between enable_irq()'s read and write of the status word was lost before the
status word had one owner, and the replayed arrival then ran the hard handler while the
thread was still running. (The primary handler never wakes the thread, so that nothing
but the opponent sets the mask.)
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

import pytest

import emu
from emu import image, irqchip
from emu.irq import irq_task

from util import stop_after_exit, wait_until

IRQ = 5
T = 20.0
STOP = -1
EMU_DIR = os.path.dirname(emu.__file__)


def primary(irq, release):
    """Never wakes the thread itself: only the opponent does, so only its ONESHOT counts."""
    return emu.IRQ_HANDLED


def thread_fn(irq, release):
    emu.wait_for_completion(release)
    return emu.IRQ_HANDLED


def opponent(args):
    """The other CPU: on each `go`, wake the line's thread as do_IRQ() does, then say so."""
    go, done, index = args
    while True:
        emu.wait_for_completion(go)
        if emu.atomic_read(done) == STOP:
            return 0
        irqchip._wake_thread(IRQ, index)
        emu.atomic_set(done, 1)


class OpcodeInjector:
    """Count the opcode boundaries of the traced call (and what it calls in emu); at
    boundary `at`, release the opponent once and wait until its change is made or it
    waits for the descriptor's lock."""

    def __init__(self, at, go, done, lock_addr):
        self.at, self.go, self.done = at, go, done
        self.waiters = ctypes.c_int32.from_address(lock_addr + 4)
        self.count = 0
        self.injected = False

    def __call__(self, frame, event, arg):
        if not frame.f_code.co_filename.startswith(EMU_DIR):
            return None
        frame.f_trace_opcodes = True
        return self.local

    def local(self, frame, event, arg):
        if event == "opcode":
            self.boundary()
        return self.local

    def boundary(self):
        if not self.injected:
            self.count += 1
            if self.count == self.at:
                self.inject()

    def inject(self):
        self.injected = True
        emu.complete(self.go)
        deadline = time.monotonic() + T
        while not emu.atomic_read(self.done) and self.waiters.value <= 0:
            assert time.monotonic() < deadline, "the opponent neither ran nor waited"
            time.sleep(0)

    def run(self, fn, *args):
        """fn(*args) with a boundary() before each of its opcodes in emu's code: through
        sys.monitoring's INSTRUCTION events where there is one (Python 3.12 ignores
        f_trace_opcodes), else sys.settrace()."""
        if hasattr(sys, "monitoring"):
            self.run_monitored(fn, *args)
            return
        sys.settrace(self)
        try:
            fn(*args)
        finally:
            sys.settrace(None)

    def run_monitored(self, fn, *args):
        mon = sys.monitoring
        tool = next(i for i in range(6) if mon.get_tool(i) is None)

        def instruction(code, offset):
            if not code.co_filename.startswith(EMU_DIR):
                return mon.DISABLE
            self.boundary()
            return None

        mon.use_tool_id(tool, "emu-test-injector")
        mon.register_callback(tool, mon.events.INSTRUCTION, instruction)
        mon.set_events(tool, mon.events.INSTRUCTION)
        try:
            fn(*args)
        finally:
            mon.set_events(tool, 0)
            mon.register_callback(tool, mon.events.INSTRUCTION, None)
            mon.free_tool_id(tool)
            mon.restart_events()


def quiesce(desc, action, thread, release):
    """Let every run of the thread end; leave the line idle, enabled and unmasked."""
    emu.complete_all(release)
    wait_until(lambda: not action.thread_flags & irqchip.IRQTF_RUNTHREAD
               and not desc.threads_active
               and not desc.status & (irqchip.IRQS_ONESHOT | irqchip.IRQS_INPROGRESS
                                      | irqchip.IRQS_PENDING)
               and emu.task_state_to_char(thread) == "S", T, "the irq thread to go idle")
    emu.reinit_completion(release)


@pytest.mark.emu_boot(cpus=2)
@pytest.mark.timeout(120)
def test_a_thread_wakeup_racing_with_enable_irq_keeps_the_line_masked(kernel):
    release, go, done = emu.Completion(), emu.Completion(), emu.Atomic()
    assert emu.request_threaded_irq(IRQ, primary, thread_fn, emu.IRQF_ONESHOT, "owner",
                                    release) == 0
    desc = image.this().img.irqs[IRQ]
    index = next(i for i, a in enumerate(desc.actions) if a.in_use)
    action = desc.actions[index]
    thread = irq_task(IRQ)
    other = emu.kthread_run(opponent, (go, done, index), "opponent")
    lock_addr = image.field_addr(desc, "lock")
    lost = []
    at = 0
    while True:
        at += 1
        emu.disable_irq(IRQ)
        emu.irq_inject_interrupt(IRQ)  # held: the line is disabled
        wait_until(lambda: desc.status & irqchip.IRQS_PENDING, T, "the arrival to be held")
        emu.atomic_set(done, 0)
        injector = OpcodeInjector(at, go, done, lock_addr)
        injector.run(emu.enable_irq, IRQ)
        if injector.injected:
            wait_until(lambda: emu.atomic_read(done), T, "the opponent's wake-up")
            if not desc.status & irqchip.IRQS_ONESHOT:
                lost.append(at)
        quiesce(desc, action, thread, release)
        if not injector.injected:
            break  # every boundary of enable_irq() has been tried
        assert at < 5000, "enable_irq() never ends its opcodes?"
    assert at > 10, "the tracer saw no opcodes of enable_irq()"
    emu.atomic_set(done, STOP)
    emu.complete(go)
    stop_after_exit(other)
    emu.free_irq(IRQ, release)
    assert not lost, (f"IRQS_ONESHOT lost when the thread was woken at opcode boundaries "
                      f"{lost} of {at - 1} in enable_irq()")
