"""Tests for the C extension _emu_native (atomics, owner-aware lock, process helpers,
the WaitCore layout and rules).

All memory is one anonymous MAP_SHARED page (mmap.mmap(-1, 4096)), inherited by
os.fork(), so the cross-process tests exercise exactly what the emulator relies on.
Every forked child leaves through os._exit() and is reaped by the test.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import select
import signal
import threading
import time
import traceback

import pytest

import _emu_native as _native

pytestmark = pytest.mark.timeout(30)

INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
SEC = 1_000_000_000
MS = 1_000_000


def s32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def s64(x: int) -> int:
    x &= 0xFFFFFFFFFFFFFFFF
    return x - (1 << 64) if x >= 1 << 63 else x


@contextlib.contextmanager
def shared_page():
    """Yield the address of a zeroed, 4096-byte, MAP_SHARED anonymous page."""
    mm = mmap.mmap(-1, 4096)
    buf = ctypes.c_char.from_buffer(mm)
    try:
        yield ctypes.addressof(buf)
    finally:
        del buf
        mm.close()


@pytest.fixture
def base():
    with shared_page() as addr:
        yield addr


class Children:
    """Fork helper: runs fn in a child that always leaves via os._exit; reaps all."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def fork(self, fn) -> int:
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                code = fn() or 0
            except BaseException:  # noqa: BLE001 (a child must never unwind into pytest)
                traceback.print_exc()
            finally:
                os._exit(code)
        self.pids.append(pid)
        return pid

    def reap(self, pid: int) -> int:
        """waitpid(pid) and return its exit code (negative signal number if killed)."""
        _, status = os.waitpid(pid, 0)
        self.pids.remove(pid)
        return os.waitstatus_to_exitcode(status)

    def cleanup(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.pids.clear()


@pytest.fixture
def children():
    c = Children()
    try:
        yield c
    finally:
        c.cleanup()


@pytest.fixture
def pipe():
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


def read_byte(fd: int, timeout: float = 10.0) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "timed out waiting for the other process"
    return os.read(fd, 1)


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


@contextlib.contextmanager
def signal_main_thread_after(delay: float, handler, signum: int = signal.SIGUSR1):
    """Install handler for signum and pthread_kill() the main thread after delay."""
    old = signal.signal(signum, handler)
    main = threading.main_thread().ident
    timer = threading.Timer(delay, signal.pthread_kill, (main, signum))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signum, old)


# --------------------------------------------------------------------------- atomics


def test_module_surface():
    names = [
        *("load32", "store32", "add32", "xchg32", "cmpxchg32", "or32", "and32"),
        *("load64", "store64", "add64", "xchg64", "cmpxchg64", "or64", "and64"),
        *("lock", "trylock", "unlock", "lock_owner"),
        *("set_comm", "get_comm", "pid_is_dead"),
    ]
    assert _native.__doc__
    for name in names:
        fn = getattr(_native, name)
        assert fn.__doc__ and "return" in fn.__doc__.lower(), name
    # Nothing ships that only tests used.
    for name in ("force_unlock", "futex_wait", "futex_wake", "set_pdeathsig"):
        assert not hasattr(_native, name), name


def test_atomics32(base):
    a = base + 4
    assert _native.load32(a) == 0
    assert _native.store32(a, 41) is None
    assert _native.load32(a) == 41
    assert _native.add32(a, 1) == 42
    assert _native.add32(a, -50) == -8
    assert _native.xchg32(a, 7) == -8
    assert _native.load32(a) == 7
    # cmpxchg: success returns old (== expected) and stores; failure changes nothing.
    assert _native.cmpxchg32(a, 7, 9) == 7
    assert _native.load32(a) == 9
    assert _native.cmpxchg32(a, 7, 100) == 9
    assert _native.load32(a) == 9
    assert _native.or32(a, 0b110) == 9
    assert _native.load32(a) == 0b1111
    assert _native.and32(a, ~0b0101) == 0b1111
    assert _native.load32(a) == 0b1010
    # Neighbouring words are untouched.
    assert _native.load32(base) == 0 and _native.load32(base + 8) == 0


def test_atomics32_wrap(base):
    a = base
    _native.store32(a, 0xFFFFFFFF)
    assert _native.load32(a) == -1
    assert ctypes.c_uint32.from_address(a).value == 0xFFFFFFFF
    _native.store32(a, INT32_MAX)
    assert _native.add32(a, 1) == INT32_MIN
    assert _native.add32(a, -1) == INT32_MAX
    assert _native.add32(a, 2**32 + 1) == INT32_MIN  # delta wraps too
    _native.store32(a, 0x1_0000_0005)
    assert _native.load32(a) == 5
    assert _native.xchg32(a, 0x80000000) == 5
    assert _native.load32(a) == INT32_MIN
    # cmpxchg compares the wrapped 32-bit values.
    assert _native.cmpxchg32(a, 0x80000000, -1) == INT32_MIN
    assert _native.load32(a) == -1
    assert _native.or32(a, 0) == -1
    assert _native.and32(a, 0xFFFF) == -1
    assert _native.load32(a) == 0xFFFF
    assert _native.or32(a, 0xFFFF0000) == 0xFFFF
    assert _native.load32(a) == -1


def test_atomics64(base):
    a = base + 8
    assert _native.load64(a) == 0
    assert _native.store64(a, 2**40) is None
    assert _native.load64(a) == 2**40
    assert _native.add64(a, 1) == 2**40 + 1
    assert _native.add64(a, -(2**41)) == -(2**40) + 1
    assert _native.xchg64(a, 3) == -(2**40) + 1
    assert _native.cmpxchg64(a, 3, 2**50) == 3
    assert _native.load64(a) == 2**50
    assert _native.cmpxchg64(a, 3, 4) == 2**50
    assert _native.load64(a) == 2**50
    assert _native.or64(a, 1 << 62) == 2**50
    assert _native.load64(a) == 2**50 | 1 << 62
    assert _native.and64(a, ~(1 << 50)) == 2**50 | 1 << 62
    assert _native.load64(a) == 1 << 62
    assert _native.load64(base) == 0 and _native.load64(base + 16) == 0


def test_atomics64_wrap(base):
    a = base
    _native.store64(a, 0xFFFFFFFFFFFFFFFF)
    assert _native.load64(a) == -1
    _native.store64(a, INT64_MAX)
    assert _native.add64(a, 1) == INT64_MIN
    assert _native.add64(a, -1) == INT64_MAX
    assert _native.xchg64(a, 1 << 63) == INT64_MAX
    assert _native.load64(a) == INT64_MIN
    assert _native.cmpxchg64(a, 1 << 63, 2**64 + 7) == INT64_MIN
    assert _native.load64(a) == 7
    assert _native.or64(a, 1 << 63) == 7
    assert _native.load64(a) == INT64_MIN + 7
    assert _native.and64(a, 0xFF) == INT64_MIN + 7
    assert _native.load64(a) == 7


def test_atomics_match_reference_model():
    """A deterministic sweep comparing every 32/64-bit op against a Python model."""
    edges32 = [
        0,
        1,
        -1,
        2,
        INT32_MAX,
        INT32_MIN,
        0xFFFFFFFF,
        0x80000000,
        2**32,
        2**40 + 3,
        -(2**35) - 1,
        0x5A5A5A5A,
        -0x12345678,
    ]
    edges64 = [
        0,
        1,
        -1,
        INT64_MAX,
        INT64_MIN,
        2**64 - 1,
        2**63,
        2**64,
        2**70 + 5,
        0x5A5A5A5A5A5A5A5A,
        -0x123456789ABCDEF,
    ]
    with shared_page() as a:
        for _bits, edges, wrap, ops in (
            (
                32,
                edges32,
                s32,
                ("load32", "store32", "add32", "xchg32", "cmpxchg32", "or32", "and32"),
            ),
            (
                64,
                edges64,
                s64,
                ("load64", "store64", "add64", "xchg64", "cmpxchg64", "or64", "and64"),
            ),
        ):
            load, store, add, xchg, cmpxchg, or_, and_ = (getattr(_native, n) for n in ops)
            for x in edges:
                for y in edges:
                    store(a, x)
                    assert load(a) == wrap(x)
                    assert add(a, y) == wrap(x + y)
                    store(a, x)
                    assert xchg(a, y) == wrap(x) and load(a) == wrap(y)
                    store(a, x)
                    assert or_(a, y) == wrap(x) and load(a) == wrap(x | y)
                    store(a, x)
                    assert and_(a, y) == wrap(x) and load(a) == wrap(x & y)
                    store(a, x)
                    assert cmpxchg(a, y, 12345) == wrap(x)
                    assert load(a) == (12345 if wrap(x) == wrap(y) else wrap(x))


def test_add32_two_processes_without_lock(base, children):
    counter, ready, go = base, base + 4, base + 8
    n = 20000

    def child():
        _native.add32(ready, 1)
        while _native.load32(go) == 0:
            pass
        for _ in range(n):
            _native.add32(counter, 1)
        return 0

    pid = children.fork(child)
    wait_until(lambda: _native.load32(ready) == 1)
    _native.store32(go, 1)
    for _ in range(n):
        _native.add32(counter, 1)
    assert children.reap(pid) == 0
    assert _native.load32(counter) == 2 * n


# ------------------------------------------------------------------- argument checks

ADDR_FUNCS = {
    "load32": (4, ()),
    "store32": (4, (1,)),
    "add32": (4, (1,)),
    "xchg32": (4, (1,)),
    "cmpxchg32": (4, (0, 1)),
    "or32": (4, (1,)),
    "and32": (4, (1,)),
    "load64": (8, ()),
    "store64": (8, (1,)),
    "add64": (8, (1,)),
    "xchg64": (8, (1,)),
    "cmpxchg64": (8, (0, 1)),
    "or64": (8, (1,)),
    "and64": (8, (1,)),
    "lock": (4, (os.getpid(), 0, 0)),
    "trylock": (4, (os.getpid(),)),
    "unlock": (4, (os.getpid(),)),
    "lock_owner": (4, ()),
}


@pytest.mark.parametrize("name", sorted(ADDR_FUNCS))
def test_bad_addresses(base, name):
    fn = getattr(_native, name)
    align, rest = ADDR_FUNCS[name]
    with pytest.raises(ValueError, match="addr"):
        fn(0, *rest)
    with pytest.raises(ValueError, match="addr"):
        fn(-align, *rest)
    for off in range(1, align):
        with pytest.raises(ValueError, match="addr.*aligned"):
            fn(base + off, *rest)
    with pytest.raises(TypeError):
        fn(float(base), *rest)
    with pytest.raises(TypeError):  # wrong arity
        fn(base, *rest, 0)
    # Nothing was written by the rejected calls.
    assert bytes(ctypes.string_at(base, 16)) == bytes(16)


def test_bad_values(base):
    with pytest.raises(TypeError):
        _native.store32(base, 1.5)
    with pytest.raises(TypeError):
        _native.add64(base, "1")
    with pytest.raises(ValueError, match="pid"):
        _native.lock(base, 0, 0, 0)
    with pytest.raises(ValueError, match="pid"):
        _native.trylock(base, -1)
    with pytest.raises(ValueError, match="pid"):
        _native.unlock(base, 0)
    with pytest.raises(ValueError, match="pid"):
        _native.pid_is_dead(0)
    assert _native.lock_owner(base) == 0


# ------------------------------------------------------------------------------ lock


def test_lock_single_process(base):
    me = os.getpid()
    waiters = base + 4
    assert _native.lock_owner(base) == 0
    assert _native.lock(base, me, 10, -1) == 0
    assert _native.lock_owner(base) == me
    assert _native.trylock(base, me) is False
    assert _native.trylock(base, me + 1) is False
    # unlock by a non-owner fails and changes nothing.
    assert _native.unlock(base, me + 1) is False
    assert _native.lock_owner(base) == me
    assert _native.unlock(base, me) is True
    assert _native.lock_owner(base) == 0
    assert _native.unlock(base, me) is False
    assert _native.trylock(base, me) is True
    assert _native.lock_owner(base) == me
    assert _native.unlock(base, me) is True
    assert _native.load32(waiters) == 0


def test_lock_recursion_times_out(base):
    me = os.getpid()
    assert _native.lock(base, me, 5, 0) == 0
    # A second acquire by the holder is not special-cased: it waits until the timeout.
    assert _native.lock(base, me, 5, 0) == -1
    t0 = time.monotonic()
    assert _native.lock(base, me, 5, 100 * MS) == -1
    elapsed = time.monotonic() - t0
    assert 0.09 <= elapsed < 5
    assert _native.lock_owner(base) == me
    assert _native.load32(base + 4) == 0
    assert _native.unlock(base, me)


def test_unlock_only_by_its_owner(base):
    me = os.getpid()
    assert _native.unlock(base, me) is False  # free: nothing to release
    assert _native.trylock(base, me)
    assert _native.unlock(base, me + 1) is False
    assert _native.lock_owner(base) == me
    assert _native.unlock(base, me) is True
    assert _native.lock_owner(base) == 0


def test_lock_releases_gil_and_unlock_wakes(base):
    """A thread sleeps in lock() (so the GIL is free); unlock wakes it at once."""
    me = os.getpid()
    assert _native.trylock(base, me)  # a live owner: the sleeper must not take over
    result = {}

    def sleeper():
        t0 = time.monotonic()
        result["r"] = _native.lock(base, me, 0, 20 * SEC)
        result["t"] = time.monotonic() - t0

    th = threading.Thread(target=sleeper)
    th.start()
    wait_until(lambda: _native.load32(base + 4) == 1)  # asleep in FUTEX_WAIT
    time.sleep(0.05)
    assert "r" not in result
    assert _native.unlock(base, me) is True
    th.join(10)
    assert not th.is_alive()
    assert result["r"] == 0 and result["t"] < 10
    assert _native.lock_owner(base) == me
    assert _native.load32(base + 4) == 0
    assert _native.unlock(base, me)


def test_lock_eintr_handler_raises(base):
    me = os.getpid()
    assert _native.trylock(base, me)

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    t0 = time.monotonic()
    with signal_main_thread_after(0.1, handler), pytest.raises(Interrupted):
        _native.lock(base, me, 0, 20 * SEC)
    assert time.monotonic() - t0 < 10
    assert _native.load32(base + 4) == 0  # the waiters increment was undone
    assert _native.lock_owner(base) == me
    assert _native.unlock(base, me)


def test_lock_eintr_handler_returns(base):
    me = os.getpid()
    assert _native.trylock(base, me)
    calls = []
    with signal_main_thread_after(0.05, lambda s, f: calls.append(s)):
        t0 = time.monotonic()
        assert _native.lock(base, me, 0, 300 * MS) == -1
        elapsed = time.monotonic() - t0
    assert calls == [signal.SIGUSR1]
    assert 0.29 <= elapsed < 10
    assert _native.load32(base + 4) == 0
    assert _native.unlock(base, me)


def test_lock_two_processes_timeout_then_acquire(base, children, pipe):
    me = os.getpid()
    to_parent_r, to_parent_w = pipe
    to_child_r, to_child_w = os.pipe()
    release = threading.Timer(0.1, os.write, (to_child_w, b"U"))
    try:

        def child():
            mypid = os.getpid()
            if _native.lock(base, mypid, 10, 5 * SEC) != 0:
                return 2
            os.write(to_parent_w, b"L")
            read_byte(to_child_r)
            return 0 if _native.unlock(base, mypid) else 3

        pid = children.fork(child)
        assert read_byte(to_parent_r) == b"L"
        assert _native.lock_owner(base) == pid
        t0 = time.monotonic()
        assert _native.lock(base, me, 10, 150 * MS) == -1
        assert time.monotonic() - t0 >= 0.14
        assert _native.trylock(base, me) is False
        assert _native.unlock(base, me) is False
        assert _native.lock_owner(base) == pid

        # Now sleep in lock() (no timeout) and have the child release it under us.
        release.start()
        t0 = time.monotonic()
        assert _native.lock(base, me, 10, -1) == 0
        assert time.monotonic() - t0 < 10
        assert _native.lock_owner(base) == me
        assert children.reap(pid) == 0
        assert _native.unlock(base, me)
        assert _native.load32(base + 4) == 0
    finally:
        release.cancel()
        if release.is_alive():
            release.join()
        os.close(to_child_r)
        os.close(to_child_w)


def test_lock_dead_owner_reaped(base, children):
    me = os.getpid()

    def child():
        return 0 if _native.trylock(base, os.getpid()) else 2  # exits holding the lock

    pid = children.fork(child)
    assert children.reap(pid) == 0
    assert _native.lock_owner(base) == pid
    assert _native.pid_is_dead(pid) is True
    assert _native.lock(base, me, 10, 5 * SEC) == pid
    assert _native.lock_owner(base) == me
    assert _native.unlock(base, me)


def test_lock_dead_owner_timeout_zero(base, children):
    """Even with timeout 0 a dead owner is detected before giving up."""
    me = os.getpid()
    pid = children.fork(lambda: 0 if _native.trylock(base, os.getpid()) else 2)
    assert children.reap(pid) == 0
    assert _native.lock(base, me, 0, 0) == pid
    assert _native.unlock(base, me)


def test_lock_dead_owner_zombie(base, children, pipe):
    """An exited but unreaped owner (state Z, kill() still succeeds) counts as dead."""
    me = os.getpid()
    r, w = pipe

    def child():
        if not _native.trylock(base, os.getpid()):
            return 2
        os.write(w, b"L")
        return 0

    pid = children.fork(child)
    assert read_byte(r) == b"L"
    assert _native.lock(base, me, 10, 10 * SEC) == pid
    # The child was not reaped yet: it was a zombie when lock() took over.
    wpid, status = os.waitpid(pid, os.WNOHANG)
    assert wpid == pid and os.waitstatus_to_exitcode(status) == 0
    children.pids.remove(pid)
    assert _native.lock_owner(base) == me
    assert _native.unlock(base, me)


def test_lock_owner_dies_while_we_sleep(base, children, pipe):
    me = os.getpid()
    r, w = pipe

    def child():
        if _native.lock(base, os.getpid(), 10, 5 * SEC) != 0:
            return 2
        os.write(w, b"L")
        wait_until(lambda: _native.load32(base + 4) >= 1)  # parent is asleep
        time.sleep(0.05)
        return 0  # exit holding the lock

    pid = children.fork(child)
    assert read_byte(r) == b"L"
    assert _native.lock(base, me, 10, -1) == pid
    assert children.reap(pid) == 0
    assert _native.lock_owner(base) == me
    assert _native.load32(base + 4) == 0
    assert _native.unlock(base, me)


def test_lock_two_processes_counter(base, children):
    lockw, ready, go, counter = base, base + 8, base + 12, base + 16
    n = 20000

    def work() -> int:
        mypid = os.getpid()
        value = ctypes.c_int32.from_address(counter)
        for _ in range(n):
            if _native.lock(lockw, mypid, 100, 10 * SEC) != 0:
                return 2
            value.value = value.value + 1  # plain, non-atomic read-modify-write
            if not _native.unlock(lockw, mypid):
                return 3
        return 0

    def child():
        _native.add32(ready, 1)
        while _native.load32(go) == 0:
            pass
        return work()

    pid = children.fork(child)
    wait_until(lambda: _native.load32(ready) == 1)
    _native.store32(go, 1)
    assert work() == 0
    assert children.reap(pid) == 0
    assert _native.load32(counter) == 2 * n
    assert _native.lock_owner(lockw) == 0
    assert _native.load32(lockw + 4) == 0


# ----------------------------------------------------------------------- process helpers


def _comm() -> str:
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
        return f.read().rstrip("\n")


def test_set_comm():
    original = _comm()
    try:
        assert _native.set_comm("emu-test") is None
        assert _comm() == "emu-test"
        _native.set_comm(b"emu-bytes")
        assert _comm() == "emu-bytes"
        _native.set_comm("a-very-long-kthread-name/0")
        assert _comm() == "a-very-long-kth"  # truncated to 15 bytes by the kernel
        with pytest.raises(ValueError):
            _native.set_comm("bad\0name")
        with pytest.raises(TypeError):
            _native.set_comm(42)
    finally:
        _native.set_comm(original)
    assert _comm() == original


def test_get_comm_reads_what_set_comm_wrote():
    original = _native.get_comm()
    assert original == _comm().encode()
    try:
        _native.set_comm("añandú-ñandú")  # 16 bytes: the kernel cuts inside the last ú
        assert _native.get_comm() == "añandú-ñandú".encode()[:15]
        _native.set_comm(b"\xff\xfe raw")
        assert _native.get_comm() == b"\xff\xfe raw"
    finally:
        _native.set_comm(original)
    assert _native.get_comm() == original


def test_pid_is_dead(children, pipe):
    assert _native.pid_is_dead(os.getpid()) is False
    assert _native.pid_is_dead(1) is False  # init exists (EPERM or not, never ESRCH)

    r, w = pipe

    def child():
        read_byte(r)
        return 0

    pid = children.fork(child)
    assert _native.pid_is_dead(pid) is False
    os.write(w, b"x")
    wait_until(lambda: _native.pid_is_dead(pid))  # zombie: exists but state Z
    assert os.kill(pid, 0) is None  # still there, unreaped
    assert children.reap(pid) == 0
    assert _native.pid_is_dead(pid) is True  # gone: ESRCH


# --------------------------------------------------------------------------- image layout


def _reversed_record(rtype):
    """rtype with its fields in the opposite order: the same names, other offsets."""
    return type(f"Reversed{rtype.__name__}", (ctypes.Structure,),
                {"_fields_": list(reversed(rtype._fields_))})


@contextlib.contextmanager
def _waitcore_layout(task_type, comp_type):
    """A WaitCore layout over 2 task slots and 2 completions of the given record types."""
    from emu.image import record_table

    tasks, comps = (task_type * 2)(), (comp_type * 2)()
    yield {"tasks": record_table(tasks), "completions": record_table(comps)}, tasks, comps


def test_waitcore_layout_names_its_missing_field():
    from emu.image import CompletionRec, TaskSlot

    with _waitcore_layout(TaskSlot, CompletionRec) as (layout, _, _):
        del layout["tasks"]["fields"]["wq_next"]
        with pytest.raises(ValueError, match="tasks record has no field 'wq_next'"):
            _native.WaitCore(layout, os.getpid())
    with _waitcore_layout(TaskSlot, CompletionRec) as (layout, _, _):
        del layout["completions"]
        with pytest.raises(ValueError, match="WaitCore layout: the layout has no 'completions'"):
            _native.WaitCore(layout, os.getpid())


def test_waitcore_layout_checks_field_size_and_bounds():
    from emu.image import CompletionRec, TaskSlot

    with _waitcore_layout(TaskSlot, CompletionRec) as (layout, _, _):
        fields = layout["completions"]["fields"]
        fields["done"] = (fields["done"][0], 8)
        with pytest.raises(ValueError, match="completions field 'done' is 8 bytes, not 4"):
            _native.WaitCore(layout, os.getpid())
        fields["done"] = (layout["completions"]["size"], 4)
        with pytest.raises(ValueError, match="field 'done' at offset .* outside its"):
            _native.WaitCore(layout, os.getpid())


def test_waitcore_follows_reordered_records():
    """Records whose fields are in another order work alike: C finds every field by name."""
    from emu.image import CompletionRec, TaskSlot

    with _waitcore_layout(_reversed_record(TaskSlot), _reversed_record(CompletionRec)) as (
            layout, tasks, comps):
        core = _native.WaitCore(layout, os.getpid())
        comps[1].generation = 5
        comps[1].head = comps[1].tail = -1
        assert core.complete(1, 5, False) == 0
        assert comps[1].done == 1
        assert core.try_wait(1, 5) is True
        assert core.try_wait(1, 5) is False
        assert core.try_wait(1, 4) is None  # a stale handle
        tasks[1].state = 1  # TASK_INTERRUPTIBLE
        assert core.wake(1, 2) == 0 and tasks[1].state == 1


# --------------------------------------------------------------------------- WaitCore rules


def test_waitcore_timeout_conversions():
    """schedule_timeout()'s and the completion waits' one jiffies <-> ns conversion."""
    from emu.image import CompletionRec, TaskSlot

    with _waitcore_layout(TaskSlot, CompletionRec) as (layout, _, _):
        core = _native.WaitCore(layout, os.getpid())
        with pytest.raises(RuntimeError, match="no timebase"):
            core.timeout_ns(1)
        core.set_timebase(MS, 1 << 62)
        assert core.timeout_ns(0) == 0
        assert core.timeout_ns(5) == 5 * MS
        assert core.timeout_ns((1 << 62) // MS + 1) == -1  # reaches forever: no timer
        with pytest.raises(ValueError, match="timeout must be >= 0"):
            core.timeout_ns(-1)
        assert [core.jiffies_left(ns) for ns in (-5, 0, 1, 2 * MS, 2 * MS + 1)] == [0, 0, 1, 2, 3]


def test_waitcore_signal_pending_state():
    """signal_pending_state(): any signal ends S, only SIGKILL ends TASK_KILLABLE, none D."""
    from emu.constants import TASK_INTERRUPTIBLE, TASK_KILLABLE, TASK_UNINTERRUPTIBLE
    from emu.image import CompletionRec, TaskSlot

    with _waitcore_layout(TaskSlot, CompletionRec) as (layout, tasks, _):
        core = _native.WaitCore(layout, os.getpid())
        states = (TASK_INTERRUPTIBLE, TASK_KILLABLE, TASK_UNINTERRUPTIBLE)
        assert [core.signal_pending_state(1, s) for s in states] == [False] * 3
        tasks[1].sigpending = 1 << (signal.SIGUSR1 - 1)
        assert [core.signal_pending_state(1, s) for s in states] == [True, False, False]
        tasks[1].sigpending |= 1 << (signal.SIGKILL - 1)
        assert [core.signal_pending_state(1, s) for s in states] == [True, True, False]
        tasks[1].sigpending = 0
        tasks[1].notify_signal = 1  # TIF_NOTIFY_SIGNAL (kthread_stop)
        assert core.signal_pending_state(1, TASK_INTERRUPTIBLE) is True
        assert core.signal_pending_state(0, TASK_INTERRUPTIBLE) is False
        with pytest.raises(ValueError, match="slot 2 out of range"):
            core.signal_pending_state(2, TASK_INTERRUPTIBLE)
