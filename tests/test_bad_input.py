"""Bad input gets a clear error, never a silent wrong value (API.md, "Conventions").

A wrong type raises TypeError and an int the kernel's C type cannot hold raises
ValueError, each naming the argument by its API name, before anything is changed.
Arithmetic on atomics still wraps as in the kernel. tests/test_api_fuzz.py calls the
whole API with arbitrary arguments; these pin the cases measured in the issue.
"""

from __future__ import annotations

import pytest

import emu
from emu import image

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
S64_MIN, S64_MAX = -(2**63), 2**63 - 1


def in_use(table: str) -> int:
    """Records of `table` ("atomics", "completions", ...) in use in the running kernel."""
    img = image.this()
    pool = getattr(img.img.hdr, f"{table}_pool")
    records = getattr(img.img, table)
    return sum(records[i].in_use for i in range(pool.high))


def tasklet_fn(t):
    pass


# --- completions ------------------------------------------------------------------------------

X_CALLS = {
    "complete": lambda x: emu.complete(x),
    "complete_all": lambda x: emu.complete_all(x),
    "init_completion": lambda x: emu.init_completion(x),
    "reinit_completion": lambda x: emu.reinit_completion(x),
    "wait_for_completion": lambda x: emu.wait_for_completion(x),
    "wait_for_completion_io": lambda x: emu.wait_for_completion_io(x),
    "wait_for_completion_timeout": lambda x: emu.wait_for_completion_timeout(x, 1),
    "wait_for_completion_io_timeout": lambda x: emu.wait_for_completion_io_timeout(x, 1),
    "wait_for_completion_interruptible": lambda x: emu.wait_for_completion_interruptible(x),
    "wait_for_completion_interruptible_timeout":
        lambda x: emu.wait_for_completion_interruptible_timeout(x, 1),
    "wait_for_completion_killable": lambda x: emu.wait_for_completion_killable(x),
    "wait_for_completion_killable_timeout":
        lambda x: emu.wait_for_completion_killable_timeout(x, 1),
    "wait_for_completion_state":
        lambda x: emu.wait_for_completion_state(x, emu.TASK_UNINTERRUPTIBLE),
    "try_wait_for_completion": lambda x: emu.try_wait_for_completion(x),
    "completion_done": lambda x: emu.completion_done(x),
}


@pytest.mark.parametrize("call", X_CALLS)
@pytest.mark.parametrize("bad, typename", [(None, "NoneType"), (42, "int"), ("c", "str")])
def test_completion_calls_name_x_for_a_wrong_type(kernel, call, bad, typename):
    with pytest.raises(TypeError, match=f"^x must be an emu.Completion, not {typename}$"):
        X_CALLS[call](bad)


def test_complete_none_is_a_type_error_without_internals(kernel):
    with pytest.raises(TypeError) as info:
        emu.complete(None)
    assert str(info.value) == "x must be an emu.Completion, not NoneType"
    assert info.value.__suppress_context__, "the AttributeError inside must not be shown"


def test_another_emu_object_is_not_a_completion(kernel):
    with pytest.raises(TypeError, match="x must be an emu.Completion, not Atomic"):
        emu.complete(emu.Atomic())


def test_wait_state_of_a_wrong_type_is_a_type_error(kernel):
    c = emu.Completion()
    emu.complete(c)
    for state in ("D", None, 1.0):
        with pytest.raises(TypeError, match="state must be an int"):
            emu.wait_for_completion_state(c, state)
    with pytest.raises(ValueError, match="state must be in the range of unsigned int"):
        emu.wait_for_completion_state(c, (1 << 32) | emu.TASK_UNINTERRUPTIBLE)
    assert c.done == 1, "a rejected wait must not consume"


# --- tasks and kthreads -----------------------------------------------------------------------

K_CALLS = {
    "kthread_stop": (lambda k: emu.kthread_stop(k), "k"),
    "kthread_park": (lambda k: emu.kthread_park(k), "k"),
    "kthread_unpark": (lambda k: emu.kthread_unpark(k), "k"),
    "kthread_bind": (lambda k: emu.kthread_bind(k, 0), "k"),
    "kthread_bind_mask": (lambda k: emu.kthread_bind_mask(k, [0]), "k"),
    "kthread_data": (lambda k: emu.kthread_data(k), "task"),
    "kthread_func": (lambda k: emu.kthread_func(k), "task"),
    "wake_up_process": (lambda k: emu.wake_up_process(k), "task"),
    "wake_up_state": (lambda k: emu.wake_up_state(k, emu.TASK_NORMAL), "task"),
    "task_state_to_char": (lambda k: emu.task_state_to_char(k), "task"),
    "send_sig": (lambda k: emu.send_sig(9, k, 0), "task"),
    "signal_pending": (lambda k: emu.signal_pending(k), "task"),
    "fatal_signal_pending": (lambda k: emu.fatal_signal_pending(k), "task"),
    "flush_signals": (lambda k: emu.flush_signals(k), "task"),
}


@pytest.mark.parametrize("call", K_CALLS)
def test_task_calls_name_the_task_for_a_wrong_type(kernel, call):
    fn, name = K_CALLS[call]
    for bad, typename in [(42, "int"), (None, "NoneType"), (emu.Completion(), "Completion")]:
        with pytest.raises(TypeError, match=f"^{name} must be an emu.Task, not {typename}$"):
            fn(bad)


def test_kthread_stop_42_is_a_type_error(kernel):
    with pytest.raises(TypeError) as info:
        emu.kthread_stop(42)
    assert str(info.value) == "k must be an emu.Task, not int"


@pytest.mark.emu_expect(warnings=2)
def test_stop_or_park_of_a_task_that_is_not_a_kthread_warns(kernel):
    me = emu.current()
    assert emu.kthread_stop(me) == -emu.EINVAL
    assert emu.kthread_park(me) == -emu.EINVAL
    assert not emu.signal_pending(me), "the refused stop must not leave TIF_NOTIFY_SIGNAL"
    assert sum("which is not a kthread" in line for line in kernel.dmesg()) == 2


def test_kthread_exit_arguments_are_checked_before_anything(kernel):
    c = emu.Completion()
    with pytest.raises(TypeError, match="comp must be an emu.Completion or None, not int"):
        emu.kthread_complete_and_exit(7, 0)
    with pytest.raises(TypeError, match="code must be an int"):
        emu.kthread_complete_and_exit(c, "0")
    with pytest.raises(ValueError, match="code must be in the range of long"):
        emu.kthread_complete_and_exit(c, 2**63)
    assert c.done == 0, "a rejected call must not complete"
    with pytest.raises(TypeError, match="result must be an int"):
        emu.kthread_exit(None)


def test_bind_mask_needs_an_iterable_of_cpus(kernel):
    me = emu.current()
    for bad in (0, None, "0"):
        with pytest.raises(TypeError, match="cpus must be an iterable of CPU numbers"):
            emu.kthread_bind_mask(me, bad)


def test_task_state_and_mask_are_checked(kernel):
    me = emu.current()
    with pytest.raises(TypeError, match="state must be an int"):
        emu.set_current_state("D")
    with pytest.raises(ValueError, match="state must be in the range of unsigned int"):
        emu.set_current_state(-1)
    assert me.state == emu.TASK_RUNNING
    with pytest.raises(TypeError, match="mask must be an int"):
        emu.wake_up_state(me, None)
    with pytest.raises(ValueError, match="mask must be in the range of unsigned int"):
        emu.wake_up_state(me, 1 << 32)
    assert emu.wake_up_state(me, emu.UINT_MAX) == 0  # running: nothing to wake
    emu.set_current_state(1 << 31)  # __state is an unsigned int: it reads back as given
    try:
        assert me.state == 1 << 31
    finally:
        emu.set_current_state(emu.TASK_RUNNING)


def test_send_sig_checks_types_and_refuses_non_signals_like_the_kernel(kernel):
    me = emu.current()
    with pytest.raises(TypeError, match="sig must be a signal number"):
        emu.send_sig("9", me, 0)
    with pytest.raises(TypeError, match="priv must be an int"):
        emu.send_sig(10, me, None)
    assert emu.send_sig(99, me, 0) == -emu.EINVAL
    assert not emu.signal_pending(me)


# --- sleeping ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sleep", [emu.schedule_timeout, emu.schedule_timeout_interruptible,
                                   emu.schedule_timeout_uninterruptible,
                                   emu.schedule_timeout_killable, emu.schedule_timeout_idle])
def test_schedule_timeout_checks_the_timeout_before_the_state_changes(kernel, sleep):
    with pytest.raises(TypeError, match="timeout must be an int"):
        sleep("1")
    with pytest.raises(ValueError, match="timeout must be in the range of long"):
        sleep(2**63)
    assert emu.current().state == emu.TASK_RUNNING
    assert emu.task_state_to_char(emu.current()) == "R"


def test_ssleep_refuses_seconds_that_overflow_msecs(kernel):
    with pytest.raises(ValueError, match="seconds must be at most"):
        emu.ssleep(2**32 // 1000 + 1)


# --- atomics and spinlocks --------------------------------------------------------------------

def test_atomic_of_2_to_the_40_is_refused_not_zero(kernel):
    before = in_use("atomics")
    with pytest.raises(ValueError, match=r"value must be in the range of int, "
                                         r"-2147483648 to 2147483647; got 1099511627776"):
        emu.Atomic(2**40)
    assert in_use("atomics") == before, "a refused constructor must not take a record"
    assert emu.Atomic(INT_MAX).counter == INT_MAX and emu.Atomic(INT_MIN).counter == INT_MIN
    assert emu.Atomic64(2**40).counter == 2**40


@pytest.mark.parametrize("cls, lo, hi", [(emu.Atomic, INT_MIN, INT_MAX),
                                         (emu.Atomic64, S64_MIN, S64_MAX)])
def test_constructor_range_and_type(kernel, cls, lo, hi):
    for bad in (hi + 1, lo - 1, 2**100):
        with pytest.raises(ValueError, match="value must be in the range of"):
            cls(bad)
    for bad in ("1", 1.0, None, True):
        with pytest.raises(TypeError, match="value must be an int"):
            cls(bad)
    with pytest.raises(ValueError, match="i must be in the range of int"):
        emu.ATOMIC_INIT(hi + 1 if cls is emu.Atomic else 2**40)
    assert cls(hi).counter == hi and cls(lo).counter == lo


def test_atomic_set_of_2_to_the_31_is_refused_and_changes_nothing(kernel):
    a = emu.Atomic(5)
    with pytest.raises(ValueError, match="i must be in the range of int, "
                                         "-2147483648 to 2147483647; got 2147483648"):
        emu.atomic_set(a, 2**31)
    assert emu.atomic_read(a) == 5


OPS = {  # name: (call(v, value), the argument the value is)
    "set": (lambda p, v, i: p.set(v, i), "i"),
    "add": (lambda p, v, i: p.add(i, v), "i"),
    "sub": (lambda p, v, i: p.sub(i, v), "i"),
    "add_return": (lambda p, v, i: p.add_return(i, v), "i"),
    "sub_return": (lambda p, v, i: p.sub_return(i, v), "i"),
    "xchg": (lambda p, v, i: p.xchg(v, i), "new"),
    "cmpxchg old": (lambda p, v, i: p.cmpxchg(v, i, 0), "old"),
    "cmpxchg new": (lambda p, v, i: p.cmpxchg(v, 5, i), "new"),
}


class Ops:
    """atomic_<op> or atomic64_<op> by name."""

    def __init__(self, prefix):
        self.prefix = prefix

    def __getattr__(self, op):
        return getattr(emu, self.prefix + op)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("cls, prefix, lo, hi", [(emu.Atomic, "atomic_", INT_MIN, INT_MAX),
                                                 (emu.Atomic64, "atomic64_", S64_MIN, S64_MAX)])
def test_every_value_argument_is_checked_before_the_change(kernel, op, cls, prefix, lo, hi):
    call, arg = OPS[op]
    ops = Ops(prefix)
    v = cls(5)
    for bad in (hi + 1, lo - 1, 2**200):
        with pytest.raises(ValueError, match=f"{arg} must be in the range of"):
            call(ops, v, bad)
    for bad in (1.0, "1", None, [1], True):
        with pytest.raises(TypeError, match=f"{arg} must be an int"):
            call(ops, v, bad)
    assert ops.read(v) == 5, "a refused call must not change the value"
    call(ops, v, lo)
    call(ops, v, hi)  # both ends of the range are accepted


def test_arithmetic_wraps_as_in_the_kernel(kernel):
    a = emu.Atomic(INT_MAX)
    emu.atomic_inc(a)
    assert emu.atomic_read(a) == INT_MIN
    emu.atomic_dec(a)
    assert emu.atomic_read(a) == INT_MAX
    emu.atomic_add(INT_MAX, a)
    assert emu.atomic_read(a) == -2
    emu.atomic_sub(INT_MIN, a)  # -INT_MIN wraps to INT_MIN: adds 2**31
    assert emu.atomic_read(a) == INT_MAX - 1
    b = emu.Atomic64(S64_MAX)
    emu.atomic64_inc(b)
    assert emu.atomic64_read(b) == S64_MIN
    assert emu.atomic64_sub_return(S64_MIN, b) == 0


def test_bad_irqrestore_flags_leave_the_lock_held(kernel):
    lock = emu.Spinlock()
    flags = emu.spin_lock_irqsave(lock)
    for bad in (None, "x", -1, 2**64):
        with pytest.raises((TypeError, ValueError), match="flags must be"):
            emu.spin_unlock_irqrestore(lock, bad)
    assert emu.spin_is_locked(lock) and emu.irqs_disabled() and emu.in_atomic()
    emu.spin_unlock_irqrestore(lock, flags)
    assert not emu.spin_is_locked(lock) and not emu.irqs_disabled()
    with pytest.raises(TypeError, match="flags must be an int"):
        emu.local_irq_restore(None)


# --- interrupts and tasklets ------------------------------------------------------------------

def test_irq_numbers_and_request_arguments(kernel):
    for fn in (emu.disable_irq, emu.enable_irq, emu.synchronize_irq, emu.irq_inject_interrupt,
               emu.disable_irq_nosync):
        for bad in (None, "3", 3.0, True):
            with pytest.raises(TypeError, match="irq must be an int IRQ number"):
                fn(bad)
        with pytest.raises(ValueError, match="irq must be an IRQ number from 0 to"):
            fn(10**6)
    dev = emu.Atomic()
    with pytest.raises(TypeError, match="flags must be an int"):
        emu.request_irq(3, emu.irq.irq_default_primary_handler, "0", "x", dev)
    with pytest.raises(TypeError, match="thread_fn must be callable or None"):
        emu.request_threaded_irq(3, None, 5, emu.IRQF_ONESHOT, "x", dev)
    with pytest.raises(TypeError, match="name must be a str"):
        emu.request_irq(3, emu.irq.irq_default_primary_handler, 0, None, dev)
    assert emu.request_irq(3, None, 0, "x", dev) == -emu.EINVAL  # the kernel's answer
    for bad in (None, "0", 1.5, [0, "1"]):
        with pytest.raises(TypeError, match="cpus must be a CPU number or an iterable"):
            emu.irq_set_affinity(3, bad)
    assert emu.irq_set_affinity(3, [10**6]) == -emu.EINVAL


def test_tasklet_arguments(kernel):
    before = in_use("tasklets")
    with pytest.raises(TypeError, match="callback must be callable, not int"):
        emu.Tasklet(3)
    assert in_use("tasklets") == before, "a refused constructor must not take a record"
    for fn in (emu.tasklet_schedule, emu.tasklet_hi_schedule, emu.tasklet_disable,
               emu.tasklet_enable, emu.tasklet_kill):
        with pytest.raises(TypeError, match="t must be an emu.Tasklet, not Completion"):
            fn(emu.Completion())
    with pytest.raises(TypeError, match="t must be an emu.Tasklet, not NoneType"):
        emu.tasklet_setup(None, tasklet_fn)


# --- printk and ERR_PTR -----------------------------------------------------------------------

def test_printk_names_fmt(kernel):
    for fn in (emu.printk, emu.pr_info, emu.pr_cont):
        with pytest.raises(TypeError, match="fmt must be a str, not NoneType"):
            fn(None)
    with pytest.raises(ValueError, match="fmt '%d' does not fit its arguments"):
        emu.pr_info("%d", "x")
    with pytest.raises(ValueError, match="fmt"):
        emu.printk("%s %s", 1)
    assert emu.printk("100%") == 4, "without arguments fmt is the text"


def test_ptr_err(kernel):
    assert emu.PTR_ERR(emu.ERR_PTR(-emu.EINVAL)) == -emu.EINVAL
    with pytest.raises(TypeError, match="x must be an emu.ErrPtr, not NoneType"):
        emu.PTR_ERR(None)
    with pytest.raises(TypeError, match="errno must be an int"):
        emu.ERR_PTR("EINVAL")
