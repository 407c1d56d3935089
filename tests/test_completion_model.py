"""Model-based test of one completion: random sequences of complete(), complete_all(),
reinit, try_wait, new waiter kthreads, signals and spurious wake-ups, checked step by step
against a model of the counter and the FIFO wait queue (spec §1).

The model predicts exactly which waiter a complete() releases (the queue head), so each
step checks that this waiter finishes and every other queued waiter still sleeps. One
kernel is booted per example, by the state machine itself.
"""

from __future__ import annotations

import gc
import signal

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import emu

from util import stop_after_exit, wait_state, wait_until

LONG = 600_000  # jiffies: a timed wait that never runs out during a test
#: wait variant -> ps letter while it sleeps
VARIANTS = {"plain": "D", "timeout": "D", "interruptible": "S"}
MAX_QUEUED = 5
OK = 1
#: Bound (s) of each wait for an observable state: short, so that a failing example
#: shrinks within pytest-timeout's budget.
BOUND = 2.0


def waiter(c: emu.Completion, variant: str):
    """threadfn: wait on `c`; OK when completed, -ERESTARTSYS when interrupted, else < 0."""
    def fn(_):
        if variant == "plain":
            return OK if emu.wait_for_completion(c) is None else -1
        if variant == "timeout":
            left = emu.wait_for_completion_timeout(c, LONG)
            return OK if 1 <= left <= LONG else -2
        emu.allow_signal(signal.SIGUSR1)
        r = emu.wait_for_completion_interruptible(c)
        return OK if r == 0 else r
    return fn


class CompletionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.kernel = emu.boot(hz=1000)
        self.c = emu.Completion()
        self.done = 0  # model of c.done
        self.queue: list[tuple[emu.Task, str]] = []  # queued waiters, head first
        self.expected_warnings = 0  # complete_all() twice without reinit
        self.posted = 0  # complete() calls since done was last reset
        self.consumed = 0  # successful waits and try_waits since then
        self.started = 0
        self.finished = 0

    # --- helpers ------------------------------------------------------------------------------

    def finish(self, t: emu.Task, want: int = OK) -> None:
        """`t` must run to its end with result `want`; reaps it."""
        assert stop_after_exit(t, BOUND) == want, f"{t.comm} ended with an unexpected result"
        self.finished += 1

    def consume(self) -> None:
        if self.done != emu.UINT_MAX:
            self.done -= 1
            self.consumed += 1

    def asleep_as_modelled(self) -> None:
        got = [emu.task_state_to_char(t) for t, _ in self.queue]
        assert got == [VARIANTS[v] for _, v in self.queue], "a queued waiter woke up"

    # --- rules ----------------------------------------------------------------------------------

    @rule(times=st.integers(1, 3))
    def complete(self, times: int) -> None:
        for _ in range(times):
            self.complete_once()

    def complete_once(self) -> None:
        if not self.queue:
            emu.complete(self.c)
            if self.done != emu.UINT_MAX:
                self.done += 1
                self.posted += 1
            return
        head, _ = self.queue.pop(0)
        emu.complete(self.c)
        # The head and only the head was woken, inside complete().
        assert emu.task_state_to_char(head) in ("R", "X"), "complete() did not wake the head"
        self.asleep_as_modelled()
        self.posted += 1
        self.consumed += 1
        self.finish(head)

    @rule()
    def complete_all(self) -> None:
        if self.done == emu.UINT_MAX:
            self.expected_warnings += 1
        woken, self.queue = self.queue, []
        emu.complete_all(self.c)
        for t, _ in woken:  # all woken inside complete_all()
            assert emu.task_state_to_char(t) in ("R", "X")
        for t, _ in woken:
            self.finish(t)
        self.done = emu.UINT_MAX
        self.posted = self.consumed = 0

    @precondition(lambda self: not self.queue)
    @rule()
    def reinit(self) -> None:
        emu.reinit_completion(self.c)
        self.done = 0
        self.posted = self.consumed = 0

    @rule()
    def try_wait(self) -> None:
        got = emu.try_wait_for_completion(self.c)
        assert got is (self.done > 0)
        if got:
            self.consume()

    @initialize(variants=st.lists(st.sampled_from(sorted(VARIANTS)), max_size=MAX_QUEUED))
    def first_waiters(self, variants: list[str]) -> None:
        """Every example starts with a few waiters queued on the fresh completion."""
        self.start_waiters(variants)

    @precondition(lambda self: len(self.queue) < MAX_QUEUED)
    @rule(variants=st.lists(st.sampled_from(sorted(VARIANTS)), min_size=1, max_size=3))
    def start_waiters(self, variants: list[str]) -> None:
        """Start waiters one at a time; each passes at once while done > 0, else it is
        queued at the tail (known order: each is asleep before the next starts)."""
        for variant in variants[:MAX_QUEUED - len(self.queue)]:
            t = emu.kthread_run(waiter(self.c, variant), None, "w%d", self.started)
            self.started += 1
            if self.done:
                self.consume()
                self.finish(t)
            else:
                wait_state(t, VARIANTS[variant], BOUND)
                self.queue.append((t, variant))

    @precondition(lambda self: any(v == "interruptible" for _, v in self.queue))
    @rule(pick=st.integers(0, MAX_QUEUED - 1))
    def interrupt_a_waiter(self, pick: int) -> None:
        """A signal ends one interruptible waiter anywhere in the queue; it leaves the queue,
        the others keep their order."""
        candidates = [i for i, (_, v) in enumerate(self.queue) if v == "interruptible"]
        t, _ = self.queue.pop(candidates[pick % len(candidates)])
        assert emu.send_sig(signal.SIGUSR1, t, 0) == 0
        self.finish(t, -emu.ERESTARTSYS)
        self.asleep_as_modelled()

    @precondition(lambda self: bool(self.queue))
    @rule(pick=st.integers(0, MAX_QUEUED - 1))
    def spurious_wakeup(self, pick: int) -> None:
        """wake_up_process() on a queued waiter: it goes back to sleep, keeping its place."""
        t, variant = self.queue[pick % len(self.queue)]
        assert emu.wake_up_process(t) == 1
        wait_until(lambda: emu.task_state_to_char(t) in (VARIANTS[variant], "X"),
                   timeout=BOUND, what=f"{t.comm} to sleep again")
        self.asleep_as_modelled()

    # --- invariants -------------------------------------------------------------------------------

    @invariant()
    def counter_matches_the_model(self) -> None:
        assert self.c.done == self.done
        assert emu.completion_done(self.c) is (self.done != 0)
        if self.done != emu.UINT_MAX:
            assert self.posted == self.consumed + self.done, "a completion was lost or duplicated"
        assert self.started == self.finished + len(self.queue)

    @invariant()
    def only_predicted_reports(self) -> None:
        k = self.kernel
        assert (k.warnings, k.bugs, k.oopses) == (self.expected_warnings, 0, 0), \
            "\n".join(k.dmesg())

    def teardown(self) -> None:
        try:
            if self.queue:  # release the waiters still queued (done is 0 here)
                woken, self.queue = self.queue, []
                emu.complete_all(self.c)
                for t, _ in woken:
                    self.finish(t)
            k = self.kernel
            counts = (k.warnings, k.bugs, k.oopses)
            log = "\n".join(k.dmesg())
            assert self.started == self.finished
        finally:
            # Free the completion in its own kernel: a handle garbage-collected after the
            # next example booted would free that kernel's record of the same index.
            self.c = None
            gc.collect()
            self.kernel.shutdown()
        assert counts == (self.expected_warnings, 0, 0), log


CompletionMachine.TestCase.settings = settings(
    max_examples=15,
    stateful_step_count=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_completion_model = CompletionMachine.TestCase
