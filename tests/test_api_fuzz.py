"""The public API called with arbitrary arguments in a booted kernel (hypothesis).

Each example makes a short sequence of calls of one area of the API, every argument
drawn from a mix of the right objects (a Completion where a completion is due, a small
timeout, ...) and anything else: None, bools, ints of every size, floats, strings,
bytes, lists, emu objects of the wrong kind. The test checks that

* only documented exceptions escape: TypeError, ValueError, OverflowError or an
  emu.EmuError (errors the kernel reports are return values or log entries);
* a call refused with TypeError/ValueError/OverflowError changed nothing observable
  (context, task state and signals, the pool objects, IRQ lines, record pools, tasks);
* after each example, once the example's effects are undone, the kernel still works:
  a complete/wait round trip with a kthread and an atomic operation;
* at the end nothing leaked: the task processes, the IPC objects in /dev/shm and the
  records in use in every pool are those of the start (the ``kernel`` fixture checks
  the processes and IPC objects again after shutdown).

Not called, because they block for good or end the process whatever emu does (the
kernel too): a sleep longer than a few jiffies (msleep(10**6) with a valid count, ...);
a wait on a pool completion that is not done (the completion is completed first, so the
wait runs and returns); tasklet_kill() of a scheduled tasklet (it may be disabled, or
this task may not run softirqs now: the kernel hangs there too); taking the spinlock
this task already holds (BUG "spinlock recursion", tested in test_locking.py); calls
without arguments (nothing to get wrong). An IRQ ``dev`` is never NaN: free_irq() finds
the action by ``==`` and NaN != NaN, so such a line could not be freed.

The examples are derandomized, so the suite is deterministic; EMU_FUZZ_EXAMPLES=N runs
N random examples per area instead.
"""

from __future__ import annotations

import gc
import os
import signal

import hypothesis.strategies as st
import psutil
import pytest
from hypothesis import HealthCheck, given, settings

import emu
from emu import image
from emu.callback import callback_load
from emu.heap import heap_used
from emu.image import own_ipc_names
from emu.irqchip import ACTION_LIVE, _views

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
S64_MIN, S64_MAX = -(2**63), 2**63 - 1
DOCUMENTED = (TypeError, ValueError, OverflowError, emu.EmuError)
REFUSED = (TypeError, ValueError, OverflowError)
POOLS = ("completions", "atomics", "spinlocks", "tasklets")
SLEEP_JIFFIES = 2  # the longest sleep a call may ask for
EXAMPLES = int(os.environ.get("EMU_FUZZ_EXAMPLES", "60"))

# --- callbacks -------------------------------------------------------------------------


def threadfn(data):
    while not emu.kthread_should_stop():
        emu.schedule_timeout_interruptible(emu.MAX_SCHEDULE_TIMEOUT)
    return 0


def handler(irq, dev):
    return emu.IRQ_HANDLED


def thread_fn(irq, dev):
    return emu.IRQ_HANDLED


def tasklet_fn(t):
    pass


def responder(pair):
    """The kthread of the round trip: complete(pong) for each complete(ping); parks."""
    ping, pong = pair
    while not emu.kthread_should_stop():
        if emu.kthread_should_park():
            emu.kthread_parkme()
        elif emu.wait_for_completion_interruptible_timeout(ping, 5) > 0:
            emu.complete(pong)
    return 0


# --- the world: the right objects of each kind, and how to undo an example ---------------

class World:
    """The objects the calls get, in the kernel booted for one test."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.me = emu.current()
        self.c, self.c2 = emu.Completion(), emu.Completion()
        self.a, self.a64 = emu.Atomic(), emu.Atomic64()
        self.lock = emu.Spinlock()
        self.tasklet = emu.Tasklet(tasklet_fn, 1)  # also starts the idle tasks
        self.err = emu.ERR_PTR(-emu.EINVAL)
        self.ping, self.pong, self.probe = emu.Completion(), emu.Completion(), emu.Atomic()
        self.k = self.start_responder()
        self.created = []  # tasks that calls returned: stopped by undo()

    def start_responder(self):
        emu.init_completion(self.ping)
        emu.init_completion(self.pong)
        return emu.kthread_run(responder, (self.ping, self.pong), "fuzz-k")

    def undo(self):
        """Put the context, the objects and the kernel back as an example found them."""
        if emu.spin_is_locked(self.lock):
            emu.spin_unlock(self.lock)
        while emu.preempt_count() & 0xFF00:
            emu.local_bh_enable()
        while emu.preempt_count() & 0xFF:
            emu.preempt_enable()
        emu.local_irq_enable()
        emu.set_current_state(emu.TASK_RUNNING)
        emu.flush_signals(self.me)
        while self.tasklet._rec.count:
            emu.tasklet_enable(self.tasklet)
        emu.tasklet_kill(self.tasklet)
        emu.tasklet_setup(self.tasklet, tasklet_fn, 1)  # a call may have set other data
        undo_irq_lines()
        for t in self.created:
            emu.kthread_stop(t)
        self.created.clear()
        if self.k._rec.generation != self.k.generation or not self.k._rec.in_use:
            self.k = self.start_responder()  # a call stopped it
        else:
            emu.kthread_unpark(self.k)

    def check_works(self, n):
        """A round trip through the responder kthread and an atomic operation."""
        emu.complete(self.ping)
        assert emu.wait_for_completion_timeout(self.pong, 20 * emu.HZ) > 0, "no round trip"
        assert emu.atomic_inc_return(self.probe) == n

    def snapshot(self):
        """What a refused call must leave as it was."""
        me = self.me._rec
        descs = _views().descs
        return {
            "context": (emu.preempt_count(), emu.irqs_disabled(), self.me.state),
            "signals": (me.sigpending, me.sigallowed, me.sigkernel, me.notify_signal),
            "completions": (self.c._rec.done, self.c2._rec.done),
            "atomics": (emu.atomic_read(self.a), emu.atomic64_read(self.a64)),
            "lock": emu.spin_is_locked(self.lock),
            "tasklet": (self.tasklet._rec.state, self.tasklet._rec.count,
                        self.tasklet._rec.ref),
            "responder": (self.k._rec.kflags, self.k._rec.cpu),
            "irq lines": [(d.depth, d.affinity, [a.in_use for a in d.actions]) for d in descs],
            "pools": pools_in_use(),
            "tasks": len(self.kernel.tasks()),
        }


def undo_irq_lines():
    for irq, desc in enumerate(_views().descs):
        while desc.depth:
            emu.enable_irq(irq)
        for action in desc.actions:
            if action.in_use == ACTION_LIVE:
                dev = callback_load(action.ref, action.ref_generation)[1]
                assert emu.free_irq(irq, dev) is not None, f"cannot free irq {irq}"


def pools_in_use():
    img = image.this()
    counts = {}
    for table in POOLS:
        pool = getattr(img.img.hdr, f"{table}_pool")
        records = getattr(img.img, table)
        counts[table] = sum(records[i].in_use for i in range(pool.high))
    counts["task slots"] = sum(t._rec.in_use for t in emu.task.live_tasks())
    counts["heap bytes"] = heap_used()
    return counts


def child_pids():
    me = psutil.Process()
    return {p.pid for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


WORLD: World  # the current test's, read by the strategies when they draw


# --- arguments -------------------------------------------------------------------------------

def pool(*names):
    """One of the world's objects, looked up when drawn (the responder may be replaced)."""
    return st.sampled_from(names).map(lambda name: getattr(WORLD, name))


EMU_OBJECTS = pool("c", "c2", "a", "a64", "lock", "tasklet", "err", "me", "k")
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
    st.floats(), st.text(max_size=4), st.binary(max_size=4),
    st.lists(st.integers(-3, 3), max_size=3), EMU_OBJECTS,
)
STATES = st.sampled_from([
    emu.TASK_RUNNING, emu.TASK_INTERRUPTIBLE, emu.TASK_UNINTERRUPTIBLE, emu.TASK_KILLABLE,
    emu.TASK_IDLE, emu.TASK_PARKED, emu.TASK_NORMAL, emu.TASK_WAKEKILL, 1 << 31, emu.UINT_MAX,
])
RIGHT = {
    "x": pool("c", "c2"),
    "comp": pool("c", "c2") | st.none(),
    "task": pool("me", "k"),
    "v": pool("a"),
    "v64": pool("a64"),
    "int": st.integers(INT_MIN, INT_MAX) | st.sampled_from([INT_MIN, INT_MAX, -1, 0, 1]),
    "s64": st.integers(S64_MIN, S64_MAX) | st.sampled_from([S64_MIN, S64_MAX, -1, 0, 1]),
    "lock": pool("lock"),
    "t": pool("tasklet"),
    "errptr": pool("err"),
    "irq": st.integers(0, 3),
    "cpu": st.integers(0, 1),
    "cpus": st.integers(0, 1) | st.lists(st.integers(0, 2), max_size=2),
    "irqflags": st.sampled_from([0, 0x200]),
    "reqflags": st.sampled_from([0, emu.IRQF_SHARED, emu.IRQF_ONESHOT,
                                 emu.IRQF_SHARED | emu.IRQF_ONESHOT]),
    "timeout": st.integers(-1, SLEEP_JIFFIES),
    "state": STATES,
    "sig": st.integers(1, 64) | st.sampled_from([signal.SIGKILL, signal.SIGTERM]),
    "priv": st.integers(0, 1) | st.booleans(),
    "msecs": st.integers(0, 3),
    "seconds": st.just(0),
    "usecs": st.integers(0, 3000),
    "count": st.integers(0, 10**9),
    "fmt": st.text(max_size=6) | st.sampled_from(["%d", "%s %s", emu.KERN_ERR + "%s", "%"]),
    "name": st.text(max_size=6),
    "namefmt": st.sampled_from(["fz", "fz/%d", "fz%s"]) | st.text(max_size=6),
    "threadfn": st.just(threadfn),
    "handler": st.sampled_from([handler, None]),
    "thread_fn": st.sampled_from([thread_fn, None]),
    "callback": st.just(tasklet_fn),
    "dev": pool("a", "c") | st.none() | st.integers(),
    "data": JUNK,
    "varargs": st.lists(st.integers() | st.text(max_size=3) | st.none(), max_size=2),
}


def argument(kind, right_only):
    """An argument of `kind`: the right kind twice as often as anything else, or only
    the right kind (so that calls with several arguments also run)."""
    if kind == "varargs" or right_only:
        return RIGHT[kind]
    if kind == "dev":  # anything but NaN (see the module docstring)
        return st.one_of(RIGHT[kind], JUNK.filter(lambda d: d == d))
    return st.one_of(RIGHT[kind], RIGHT[kind], JUNK)


def ops(prefix, v, i):
    return {
        f"{prefix}read": [v], f"{prefix}set": [v, i], f"{prefix}add": [i, v],
        f"{prefix}sub": [i, v], f"{prefix}inc": [v], f"{prefix}dec": [v],
        f"{prefix}add_return": [i, v], f"{prefix}sub_return": [i, v],
        f"{prefix}inc_return": [v], f"{prefix}dec_return": [v],
        f"{prefix}dec_and_test": [v], f"{prefix}inc_and_test": [v],
        f"{prefix}xchg": [v, i], f"{prefix}cmpxchg": [v, i, i],
    }


#: The API by area: name -> the kinds of its arguments (API.md's signatures).
API = {
    "completion": {
        "complete": ["x"], "complete_all": ["x"], "init_completion": ["x"],
        "reinit_completion": ["x"], "try_wait_for_completion": ["x"],
        "completion_done": ["x"], "wait_for_completion": ["x"],
        "wait_for_completion_io": ["x"], "wait_for_completion_timeout": ["x", "timeout"],
        "wait_for_completion_io_timeout": ["x", "timeout"],
        "wait_for_completion_interruptible": ["x"],
        "wait_for_completion_interruptible_timeout": ["x", "timeout"],
        "wait_for_completion_killable": ["x"],
        "wait_for_completion_killable_timeout": ["x", "timeout"],
        "wait_for_completion_state": ["x", "state"],
        "kthread_complete_and_exit": ["comp", "s64"],
    },
    "task": {
        "kthread_create": ["threadfn", "data", "namefmt"],
        "kthread_run": ["threadfn", "data", "namefmt"],
        "kthread_create_on_cpu": ["threadfn", "data", "cpu", "namefmt"],
        "kthread_run_on_cpu": ["threadfn", "data", "cpu", "namefmt"],
        "kthread_bind": ["task", "cpu"], "kthread_bind_mask": ["task", "cpus"],
        "kthread_stop": ["task"], "kthread_park": ["task"], "kthread_unpark": ["task"],
        "kthread_data": ["task"], "kthread_func": ["task"], "kthread_exit": ["s64"],
        "wake_up_process": ["task"], "wake_up_state": ["task", "state"],
        "set_current_state": ["state"], "task_state_to_char": ["task"],
        "send_sig": ["sig", "task", "priv"], "allow_signal": ["sig"],
        "allow_kernel_signal": ["sig"], "disallow_signal": ["sig"],
        "signal_pending": ["task"], "fatal_signal_pending": ["task"],
        "flush_signals": ["task"],
    },
    "sleep": {
        "schedule_timeout": ["timeout"], "schedule_timeout_interruptible": ["timeout"],
        "schedule_timeout_uninterruptible": ["timeout"],
        "schedule_timeout_killable": ["timeout"], "schedule_timeout_idle": ["timeout"],
        "msleep": ["msecs"], "msleep_interruptible": ["msecs"], "ssleep": ["seconds"],
        "usleep_range": ["usecs", "usecs"], "msecs_to_jiffies": ["count"],
        "usecs_to_jiffies": ["count"], "jiffies_to_msecs": ["count"],
        "set_current_state": ["state"], "send_sig": ["sig", "task", "priv"],
    },
    "atomic": {
        "Atomic": ["int"], "Atomic64": ["s64"], "ATOMIC_INIT": ["int"],
        **ops("atomic_", "v", "int"), **ops("atomic64_", "v64", "s64"),
    },
    "lock": {
        "spin_lock_init": ["lock"], "spin_lock": ["lock"], "spin_unlock": ["lock"],
        "spin_trylock": ["lock"], "spin_lock_irq": ["lock"], "spin_unlock_irq": ["lock"],
        "spin_lock_irqsave": ["lock"], "spin_unlock_irqrestore": ["lock", "irqflags"],
        "spin_lock_bh": ["lock"], "spin_unlock_bh": ["lock"], "spin_is_locked": ["lock"],
        "local_irq_restore": ["irqflags"], "atomic_inc": ["v"],
        "complete": ["x"], "wait_for_completion_timeout": ["x", "timeout"],
    },
    "irq": {
        "request_irq": ["irq", "handler", "reqflags", "name", "dev"],
        "request_threaded_irq": ["irq", "handler", "thread_fn", "reqflags", "name", "dev"],
        "free_irq": ["irq", "dev"], "disable_irq": ["irq"], "disable_irq_nosync": ["irq"],
        "enable_irq": ["irq"], "synchronize_irq": ["irq"], "irq_inject_interrupt": ["irq"],
        "irq_set_affinity": ["irq", "cpus"], "local_irq_restore": ["irqflags"],
        "Tasklet": ["callback", "data"], "tasklet_setup": ["t", "callback", "data"],
        "tasklet_schedule": ["t"], "tasklet_hi_schedule": ["t"], "tasklet_disable": ["t"],
        "tasklet_enable": ["t"], "tasklet_kill": ["t"],
    },
    "printk": {
        **{name: ["fmt", "varargs"] for name in (
            "printk", "pr_emerg", "pr_alert", "pr_crit", "pr_err", "pr_warn", "pr_warning",
            "pr_notice", "pr_info", "pr_debug", "pr_cont")},
        "ERR_PTR": ["s64"], "PTR_ERR": ["errptr"], "IS_ERR": ["data"],
    },
}


@st.composite
def calls(draw, area):
    """A sequence of (name, args) of `area`."""
    names = sorted(API[area])
    out = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        right_only = draw(st.booleans())
        args = []
        for kind in API[area][name]:
            value = draw(argument(kind, right_only))
            args.extend(value if kind == "varargs" else [value])
        out.append((name, args))
    return out


# --- exclusions: calls that block for good (see the module docstring) -------------------------

def is_count(value, limit):
    """`value` is a valid count (an int, not a bool) above `limit`."""
    return isinstance(value, int) and not isinstance(value, bool) and value > limit


def blocks(name, args):
    """True if the call would sleep long or for good, so it is not made."""
    if name.startswith("schedule_timeout_") or name == "schedule_timeout":
        return is_count(args[0], SLEEP_JIFFIES)
    if name in ("msleep", "msleep_interruptible"):
        return is_count(args[0], 1000 * SLEEP_JIFFIES // emu.HZ)
    if name == "ssleep":
        return is_count(args[0], 0)
    if name == "usleep_range":
        return is_count(args[0], 1_000_000 * SLEEP_JIFFIES // emu.HZ)
    if name == "tasklet_kill" and args[0] is WORLD.tasklet:
        return bool(WORLD.tasklet._rec.state & 1)  # TASKLET_STATE_SCHED
    if name.startswith("spin_lock") and args[0] is WORLD.lock:
        return emu.spin_is_locked(WORLD.lock)
    return False


def prepare(name, args):
    """A wait on a pool completion that is not done gets one posted first."""
    if name.startswith("wait_for_completion") and args and (
            args[0] is WORLD.c or args[0] is WORLD.c2) and not emu.completion_done(args[0]):
        emu.complete(args[0])


# --- what a call that succeeded must have done: never a silent wrong value ------------------

def value(v):
    return emu.atomic64_read(v) if type(v) is emu.Atomic64 else emu.atomic_read(v)


POSTCONDITIONS = {
    "Atomic": lambda args, result: result.counter == args[0],
    "Atomic64": lambda args, result: result.counter == args[0],
    "ATOMIC_INIT": lambda args, result: result.counter == args[0],
    "atomic_set": lambda args, result: value(args[0]) == args[1],
    "atomic64_set": lambda args, result: value(args[0]) == args[1],
    "atomic_xchg": lambda args, result: value(args[0]) == args[1],
    "atomic64_xchg": lambda args, result: value(args[0]) == args[1],
    "set_current_state": lambda args, result: WORLD.me.state == args[0],
    "PTR_ERR": lambda args, result: result == args[0].errno,
}


# --- the test ---------------------------------------------------------------------------------

def call(name, args):
    """Make the call; check what escaped, that a refusal changed nothing, and what a
    call that succeeded did."""
    fn = getattr(emu, name)
    prepare(name, args)
    if blocks(name, args):
        return
    before = WORLD.snapshot()
    refused = None
    try:
        result = fn(*args)
    except REFUSED as exc:
        refused = f"{type(exc).__name__}: {exc}"
    except emu.EmuError:
        return
    except Exception as exc:  # pragma: no cover - the failure this test looks for
        raise AssertionError(
            f"{name}{tuple(args)!r} raised an undocumented {type(exc).__name__}: {exc}"
        ) from exc
    else:
        if isinstance(result, emu.Task) and result not in (WORLD.me, WORLD.k):
            WORLD.created.append(result)
        post = POSTCONDITIONS.get(name)
        assert post is None or post(args, result), f"{name}{tuple(args)!r} -> {result!r}"
        return
    after = WORLD.snapshot()
    if after["pools"] != before["pools"]:
        gc.collect()  # a refused constructor's object may only go with its traceback
        after = WORLD.snapshot()
    changed = {key: (before[key], after[key]) for key in before if before[key] != after[key]}
    assert not changed, f"{name}{tuple(args)!r} was refused ({refused}) but changed {changed}"


@pytest.mark.emu_boot(cpus=2)
@pytest.mark.emu_expect(warnings=None, bugs=None)
@pytest.mark.parametrize("area", sorted(API))
def test_arbitrary_arguments_get_documented_errors_and_leak_nothing(kernel, area):
    global WORLD
    WORLD = World(kernel)
    gc.collect()
    tasks, children = len(kernel.tasks()), child_pids() - {WORLD.k.pid}
    pools, ipc = pools_in_use(), own_ipc_names(os.getpid())
    rounds = [0]

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              derandomize="EMU_FUZZ_EXAMPLES" not in os.environ,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(sequence=calls(area))
    def fuzz(sequence):
        try:
            for name, args in sequence:
                call(name, args)
        finally:
            WORLD.undo()
        rounds[0] += 1
        WORLD.check_works(rounds[0])

    fuzz()
    gc.collect()
    assert len(kernel.tasks()) == tasks, kernel.ps()
    assert child_pids() - {WORLD.k.pid} == children
    assert pools_in_use() == pools
    assert own_ipc_names(os.getpid()) == ipc
    emu.kthread_stop(WORLD.k)
