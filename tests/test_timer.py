"""Timers (spec §11): arming and deleting with the kernel's return values, the callback's
context and CPU, never before expires, self re-arming, timer_delete_sync() racing with a
running callback, timer_shutdown_sync(), misuse reports, and a state machine against a
sequential model.

Callbacks run in other tasks (or in this one, when it runs on the timer's CPU): they
report through emu objects carried as timer attributes.
"""

from __future__ import annotations

import gc
import pickle
import threading

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import emu

from util import stop_after_exit, wait_state, wait_until

T = 5.0
FAR = 10**9  # jiffies: never expires during a test


def read(a: emu.Atomic) -> int:
    return emu.atomic_read(a)


class Probe:
    """What a callback saw, in shared memory."""

    def __init__(self) -> None:
        self.runs = emu.Atomic()
        self.early = emu.Atomic()  # runs with jiffies <= expires
        self.bad_context = emu.Atomic()
        self.cpu = emu.Atomic(-1)
        self.pid = emu.Atomic()
        self.pending_inside = emu.Atomic(-1)
        self.mod_inside = emu.Atomic(-1)


def cb_probe(t):
    p = t.probe
    if not emu.jiffies() > t.expires:
        emu.atomic_inc(p.early)
    if not (emu.in_serving_softirq() and emu.in_interrupt() and not emu.in_task()):
        emu.atomic_inc(p.bad_context)
    emu.atomic_set(p.cpu, emu.this_cpu())
    emu.atomic_set(p.pid, emu.current().pid)
    emu.atomic_set(p.pending_inside, int(emu.timer_pending(t)))
    emu.atomic_inc(p.runs)


def probe_timer(cb=cb_probe):
    t = emu.TimerList(cb)
    t.probe = Probe()
    return t


# --- return values ------------------------------------------------------------------------------

def test_mod_timer_and_del_timer_return_values(kernel):
    t = probe_timer()
    assert not emu.timer_pending(t)
    assert emu.mod_timer(t, emu.jiffies() + FAR) == 0  # was inactive
    assert emu.timer_pending(t) and t.expires >= FAR
    assert emu.mod_timer(t, emu.jiffies() + FAR + 1) == 1  # was pending
    assert emu.mod_timer_pending(t, emu.jiffies() + FAR) == 1
    assert emu.del_timer(t) == 1
    assert emu.del_timer(t) == 0
    assert emu.mod_timer_pending(t, emu.jiffies() + 1) == 0
    assert not emu.timer_pending(t)
    assert emu.timer_delete_sync(t) == 0
    assert read(t.probe.runs) == 0


@pytest.mark.emu_expect(warnings=1)
def test_add_timer_uses_expires_and_warns_on_a_pending_timer(kernel):
    t = probe_timer()
    t.expires = emu.jiffies() + FAR
    emu.add_timer(t)
    assert emu.timer_pending(t) and t.expires >= FAR
    emu.add_timer(t)  # WARN_ON_ONCE, ignored
    assert "add_timer() on a pending timer" in "\n".join(kernel.dmesg())
    assert emu.del_timer(t) == 1


# --- when, where and how a callback runs --------------------------------------------------------

@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_callback_runs_after_expires_in_softirq_context_on_the_arming_cpu(kernel):
    t = probe_timer()
    armed_on = emu.this_cpu()
    assert emu.mod_timer(t, emu.jiffies() + 3) == 0
    wait_until(lambda: read(t.probe.runs) == 1, T, "the callback")
    p = t.probe
    assert (read(p.early), read(p.bad_context), read(p.pending_inside)) == (0, 0, 0)
    assert read(p.cpu) == armed_on
    assert not emu.timer_pending(t)


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_a_timer_armed_by_a_sleeping_kthread_fires_in_its_cpus_idle_task(kernel):
    t = probe_timer()

    def arm(_):
        # Not running (state S) from before it arms: an interrupt for its CPU goes to
        # swapper/1 even if the timer fires before this task is really asleep.
        emu.set_current_state(emu.TASK_INTERRUPTIBLE)
        emu.mod_timer(t, emu.jiffies() + 2)
        emu.schedule_timeout(emu.msecs_to_jiffies(200))
        return 0

    k = emu.kthread_run_on_cpu(arm, None, 1, "armer/%u")
    wait_until(lambda: read(t.probe.runs) == 1, T, "the callback")
    assert read(t.probe.cpu) == 1
    assert read(t.probe.pid) not in (k.pid, emu.current().pid)  # swapper/1 ran it
    assert read(t.probe.bad_context) == 0
    assert stop_after_exit(k) == 0


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_expires_in_the_past_runs_at_the_next_tick(kernel):
    t = probe_timer()
    emu.mod_timer(t, 0)
    wait_until(lambda: read(t.probe.runs) == 1, T, "the callback")
    assert read(t.probe.early) == 0


def cb_rearm(t):
    n = emu.atomic_inc_return(t.probe.runs)
    if not emu.jiffies() > t.expires:
        emu.atomic_inc(t.probe.early)
    # unlinked before its callback runs: re-arming finds it inactive
    if n < t.times and emu.mod_timer(t, emu.jiffies() + 1) != 0:
        emu.atomic_inc(t.probe.bad_context)


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_a_timer_rearms_itself_from_its_callback(kernel):
    t = emu.TimerList(cb_rearm)
    t.probe, t.times = Probe(), 5
    emu.mod_timer(t, emu.jiffies() + 1)
    wait_until(lambda: read(t.probe.runs) == 5, T, "five runs")
    wait_until(lambda: not emu.timer_pending(t), T, "the last run not to re-arm")
    assert (read(t.probe.early), read(t.probe.bad_context)) == (0, 0)
    assert emu.del_timer_sync(t) == 0
    assert read(t.probe.runs) == 5


def cb_count_data(t):
    emu.atomic_add(t.data[0], t.data[1])


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_attributes_travel_with_the_timer_and_follow_changes(kernel):
    total = emu.Atomic()
    t = emu.TimerList(cb_count_data)
    t.data = (1, total)
    emu.mod_timer(t, emu.jiffies() + 1)
    wait_until(lambda: read(total) == 1, T, "the first run")
    t.data = (10, total)
    emu.mod_timer(t, emu.jiffies() + 1)
    wait_until(lambda: read(total) == 11, T, "the second run, with the new data")


def test_any_callable_is_a_callback(kernel):
    hits = emu.Atomic()
    t = emu.TimerList(lambda timer: emu.atomic_inc(hits))
    emu.mod_timer(t, emu.jiffies() + 1)
    wait_until(lambda: read(hits) == 1, T, "the lambda")


# --- deleting while it runs -----------------------------------------------------------------------

def cb_spin(t):
    entered, go, rearm = t.sync
    emu.atomic_inc(entered)
    while not emu.atomic_read(go):
        pass
    if emu.atomic_read(rearm):
        emu.mod_timer(t, emu.jiffies() + FAR)


def spinning_timer(cpu, rearm=0):
    """A timer whose callback spins on `cpu` until released, armed there by a kthread
    (which may be the task that runs it: stop it once the callback is released)."""
    t = emu.TimerList(cb_spin)
    t.sync = (emu.Atomic(), emu.Atomic(), emu.Atomic(rearm))

    def arm(_):
        emu.mod_timer(t, emu.jiffies() + 1)
        return 0

    armer = emu.kthread_run_on_cpu(arm, None, cpu, "arm/%u")
    wait_until(lambda: read(t.sync[0]) == 1, T, "the callback to start")
    return t, armer


@pytest.mark.emu_boot(cpus=2, hz=1000)
@pytest.mark.parametrize("rearm, want", [(0, 0), (1, 1)])
def test_del_timer_sync_waits_for_the_callback_running_on_another_cpu(kernel, rearm, want):
    t, armer = spinning_timer(1, rearm)
    assert emu.del_timer(t) == 0  # running is not pending
    done = emu.Atomic(-1)
    deleter = emu.kthread_run_on_cpu(
        lambda _: emu.atomic_set(done, emu.del_timer_sync(t)) or 0, None, 0, "del/%u")
    wait_state(deleter, "D")  # waits, asleep
    assert read(done) == -1
    emu.atomic_set(t.sync[1], 1)
    assert stop_after_exit(deleter) == 0
    assert read(done) == want  # a callback that re-armed its timer is deleted too
    assert not emu.timer_pending(t)
    assert stop_after_exit(armer) == 0


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_timer_shutdown_sync_keeps_the_running_callback_from_rearming(kernel):
    t, armer = spinning_timer(1, rearm=1)
    res = emu.Atomic(-1)
    k = emu.kthread_run_on_cpu(
        lambda _: emu.atomic_set(res, emu.timer_shutdown_sync(t)) or 0, None, 0, "shut/%u")
    wait_state(k, "D")
    emu.atomic_set(t.sync[1], 1)
    assert stop_after_exit(k) == 0
    assert stop_after_exit(armer) == 0
    assert read(res) == 0 and not emu.timer_pending(t)
    assert emu.mod_timer(t, emu.jiffies() + 1) == 0 and not emu.timer_pending(t)
    assert t.function is None
    emu.timer_setup(t, cb_spin)  # usable again
    emu.atomic_set(t.sync[2], 0)
    assert emu.mod_timer(t, emu.jiffies() + FAR) == 0 and emu.timer_pending(t)
    assert emu.timer_shutdown(t) == 1 and not emu.timer_pending(t)


def cb_delete_self(t):
    emu.atomic_set(t.res, emu.del_timer_sync(t))


@pytest.mark.emu_expect(warnings=1)
def test_del_timer_sync_from_its_own_callback_is_reported(kernel):
    t = emu.TimerList(cb_delete_self)
    t.res = emu.Atomic(-1)
    emu.mod_timer(t, emu.jiffies() + 1)
    wait_until(lambda: read(t.res) != -1, T, "the callback")
    assert "possible recursive locking detected" in "\n".join(kernel.dmesg())


@pytest.mark.emu_expect(warnings=1)
def test_del_timer_sync_in_hardirq_on_a_non_irqsafe_timer_is_reported(kernel):
    t = probe_timer()
    done = emu.Atomic()

    def handler(irq, dev):
        emu.del_timer_sync(t)
        emu.atomic_inc(done)
        return emu.IRQ_HANDLED

    assert emu.request_irq(6, handler, 0, "deleter", None) == 0
    emu.irq_inject_interrupt(6)
    wait_until(lambda: read(done) == 1, T, "the handler")
    assert "without TIMER_IRQSAFE" in "\n".join(kernel.dmesg())
    emu.free_irq(6, None)


def cb_sleep(t):
    emu.msleep(1)
    emu.atomic_inc(t.after)  # never reached: the callback is ended


@pytest.mark.emu_expect(bugs=None, oopses=None)
def test_sleeping_in_a_callback_is_scheduling_while_atomic(kernel):
    t = emu.TimerList(cb_sleep)
    t.after = emu.Atomic()
    emu.mod_timer(t, emu.jiffies() + 1)
    wait_until(lambda: "BUG: scheduling while atomic" in "\n".join(kernel.dmesg()), T,
               "the report")
    assert read(t.after) == 0


def cb_raise(t):
    raise RuntimeError("timer boom")


@pytest.mark.emu_expect(oopses=1)
def test_an_exception_in_a_callback_is_an_oops_and_timers_go_on(kernel):
    bad = emu.TimerList(cb_raise)
    emu.mod_timer(bad, emu.jiffies() + 1)
    wait_until(lambda: kernel.oopses == 1, T, "the Oops")
    good = probe_timer()
    emu.mod_timer(good, emu.jiffies() + 1)
    wait_until(lambda: read(good.probe.runs) == 1, T, "a later timer")


# --- misuse Python rejects, lifetime -------------------------------------------------------------

def test_bad_arguments_name_the_argument(kernel):
    with pytest.raises(TypeError, match="timer must be an emu.TimerList, not NoneType"):
        emu.mod_timer(None, 1)
    with pytest.raises(TypeError, match="callback must be callable"):
        emu.TimerList(42)
    t = probe_timer()
    with pytest.raises(ValueError, match="expires"):
        emu.mod_timer(t, -1)
    with pytest.raises(TypeError, match="expires"):
        emu.mod_timer(t, 1.5)
    lock = threading.Lock()
    with pytest.raises(TypeError, match="callback"):
        emu.TimerList(lambda timer: lock.acquire())
    assert not emu.timer_pending(t)


@pytest.mark.emu_expect(warnings=1)
def test_freeing_a_pending_timer_is_reported_and_deletes_it(kernel):
    t = probe_timer()
    other = pickle.loads(pickle.dumps(t))
    emu.mod_timer(t, emu.jiffies() + FAR)
    del t
    gc.collect()
    assert "ODEBUG: free active" in "\n".join(kernel.dmesg())
    with pytest.raises(emu.StaleObjectError):
        emu.timer_pending(other)


# --- a state machine against a sequential model --------------------------------------------------

def cb_model(t):
    emu.atomic_inc(t.fired)


class TimerMachine(RuleBasedStateMachine):
    """One timer armed far ahead (never fires by itself) or due now (then awaited):
    every return value and the number of runs follow the model."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = emu.boot(cpus=2, hz=1000)
        self.t = emu.TimerList(cb_model)
        self.t.fired = emu.Atomic()
        self.pending = False
        self.shut = False
        self.fired = 0

    @rule(far=st.booleans())
    def mod_timer(self, far: bool) -> None:
        ret = emu.mod_timer(self.t, emu.jiffies() + (FAR if far else 1))
        assert ret == int(self.pending)
        if self.shut:
            return
        self.pending = True
        if not far:
            self.fired += 1
            wait_until(lambda: read(self.t.fired) == self.fired, T, "the run")
            self.pending = False

    @rule()
    def mod_timer_pending(self) -> None:
        assert emu.mod_timer_pending(self.t, emu.jiffies() + FAR) == int(self.pending)

    @rule(sync=st.booleans())
    def delete(self, sync: bool) -> None:
        fn = emu.del_timer_sync if sync else emu.del_timer
        assert fn(self.t) == int(self.pending)
        self.pending = False

    @rule(sync=st.booleans())
    def shutdown(self, sync: bool) -> None:
        fn = emu.timer_shutdown_sync if sync else emu.timer_shutdown
        assert fn(self.t) == int(self.pending)
        self.pending, self.shut = False, True

    @rule()
    def setup_again(self) -> None:
        if self.pending:
            return  # re-initialising a pending timer is a reported bug
        emu.timer_setup(self.t, cb_model)
        self.shut = False

    @invariant()
    def matches_the_model(self) -> None:
        assert emu.timer_pending(self.t) == self.pending
        assert read(self.t.fired) == self.fired
        assert (self.kernel.warnings, self.kernel.bugs, self.kernel.oopses) == (0, 0, 0)

    def teardown(self) -> None:
        try:
            emu.del_timer_sync(self.t)
            counts = (self.kernel.warnings, self.kernel.bugs, self.kernel.oopses)
        finally:
            self.t = None
            gc.collect()
            self.kernel.shutdown()
        assert counts == (0, 0, 0)


TimerMachine.TestCase.settings = settings(
    max_examples=10, stateful_step_count=15, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_timer_model = TimerMachine.TestCase


# --- the example module --------------------------------------------------------------------------

@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_periodic_timer_example_ticks_until_its_exit(kernel):
    from emu.examples import periodic_timer

    assert periodic_timer.periodic_init(period_ms=5) == 0
    timer = periodic_timer._timer
    wait_until(lambda: emu.atomic_read(timer.ticks) >= 3, T, "three ticks")
    ticks = periodic_timer.periodic_exit()
    assert ticks >= 3
    assert not emu.timer_pending(timer) and emu.atomic_read(timer.ticks) == ticks
    log = "\n".join(kernel.dmesg())
    assert "periodic: tick 0 on CPU" in log and f"stopped after {ticks} ticks" in log


def h_count(irq, dev):
    emu.atomic_inc(dev)
    return emu.IRQ_HANDLED


@pytest.mark.emu_boot(cpus=2, hz=1000)
def test_overdue_timers_of_a_cpu_with_interrupts_off_wait_and_nothing_stalls(kernel):
    # CPU 1's task keeps interrupts off while its timer is overdue well past the
    # supervisor's backup ring: the timer runs once they are on again, and meanwhile
    # the supervisor goes on emulating devices (it once looped on such a CPU for good).
    t = probe_timer()
    go = emu.Atomic()

    def hold(_):
        emu.local_irq_disable()  # first: a tick between the two would run the timer here
        emu.mod_timer(t, emu.jiffies() + 1)
        while not emu.atomic_read(go):
            pass
        emu.local_irq_enable()
        return 0

    k = emu.kthread_run_on_cpu(hold, None, 1, "irqsoff/%u")
    wait_until(lambda: emu.timer_pending(t) and emu.jiffies() > t.expires + 30, T,
               "the timer to be 30 jiffies overdue")
    assert read(t.probe.runs) == 0
    count = emu.Atomic()
    assert emu.request_irq(7, h_count, 0, "still-alive", count) == 0
    kernel.add_irq_source(7, rate_hz=500, count=10)
    wait_until(lambda: read(count) == 10, T, "the supervisor's device interrupts")
    emu.atomic_set(go, 1)
    wait_until(lambda: read(t.probe.runs) == 1, T, "the timer, once interrupts are on")
    assert read(t.probe.cpu) == 1 and read(t.probe.early) == 0
    assert stop_after_exit(k) == 0
    emu.free_irq(7, count)
