"""pytest plugin (registered through the ``pytest11`` entry point): the ``kernel`` fixture.

The fixture boots a kernel for one test and shuts it down afterwards. The test fails
if, when it returns:

- the kernel logged a WARN, BUG, Oops or hung task it did not declare;
- a kthread it started is still running (the kernel would go on running code of an
  unloaded module): the fixture stops it, as ``kthread_stop()`` would, and counts it
  in ``leaked_kthreads``; one that ignores ``kthread_should_stop()`` and has to be
  killed counts in ``killed_kthreads`` instead (Linux would hang in rmmod).

These checks run when the test function returns, so a failure is the test's failure.
What happens afterwards is checked when the kernel shuts down, after the teardown of
the fixtures that use it, and is a teardown error: reports made during that teardown,
kthreads left running by those fixtures, task processes or IPC objects that outlive
the kernel. A failing test's report carries the kernel log and the task table. Call
traces of reports made in the test's process start at the test function.

Markers::

    @pytest.mark.emu_boot(cpus=2, hz=1000)        # arguments for emu.boot()
    @pytest.mark.emu_expect(warnings=1, oopses=1)  # what the test causes on purpose

``emu_expect`` counts are exact (``warnings=1`` fails a test that makes two, or none);
a counter not named must stay 0; pass ``None`` to accept any number.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

#: What emu_expect may declare, each an exact count (None: any).
COUNTERS = ("warnings", "bugs", "oopses", "hung_tasks", "leaked_kthreads", "killed_kthreads")
_CHECK_ATTR = "_emu_kernel_check"
_EXPECT_HELP = (
    "emu_expect(warnings=0, bugs=0, oopses=0, hung_tasks=0, leaked_kthreads=0, "
    "killed_kthreads=0): the exact number of each kernel report the test causes on purpose "
    "(None: any number); a counter not named must stay 0. leaked_kthreads: kthreads still "
    "running when the test returned, stopped by the fixture; killed_kthreads: those that "
    "ignored kthread_should_stop() and were killed"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "emu_boot(**kwargs): arguments for emu.boot() in the kernel fixture"
    )
    config.addinivalue_line("markers", _EXPECT_HELP)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _names(tasks: list[Any]) -> list[str]:
    return [f"{t.comm}/{t.pid}" for t in tasks]


class KernelCheck:
    """The kernel of one test and what is checked of it (see the module's doc)."""

    def __init__(self, kernel: Any, expected: dict[str, int | None]) -> None:
        self.kernel = kernel
        self.expected = expected
        self.leaked: list[str] = []
        self.killed: list[str] = []
        self.before: set[int] = set()  # kthreads that fixtures started before the test
        self.verdict: bool | None = None  # the call-time check: None if it did not run

    def counts(self) -> dict[str, int]:
        k = self.kernel
        return {"warnings": k.warnings, "bugs": k.bugs, "oopses": k.oopses,
                "hung_tasks": len(k.hung_tasks), "leaked_kthreads": len(self.leaked),
                "killed_kthreads": len(self.killed)}

    def problems(self, counts: dict[str, int]) -> list[str]:
        wrong = {name for name, want in self.expected.items()
                 if want is not None and counts[name] != want}
        found = [f"{name}: {counts[name]} (expected {self.expected[name]})"
                 for name in COUNTERS if name in wrong]
        if "leaked_kthreads" in wrong and self.leaked:
            found.append("kthreads still running when the test ended (stopped by the "
                         f"fixture): {', '.join(self.leaked)}")
        if "killed_kthreads" in wrong and self.killed:
            found.append("kthreads that ignored kthread_should_stop() (killed): "
                         f"{', '.join(self.killed)}")
        return found

    def test_started(self) -> None:
        self.before = {t.pid for t in self.kernel.running_kthreads()}

    def test_returned(self) -> list[str]:
        """Stop the kthreads the test left running; what the test did wrong."""
        k = self.kernel
        if not k.alive:
            self.verdict = True
            return []
        mine = [t for t in k.running_kthreads() if t.pid not in self.before]
        stubborn = k.stop_kthreads(mine)
        self.killed += _names(stubborn)
        self.leaked += [n for n in _names(mine) if n not in self.killed]
        problems = self.problems(self.counts())
        self.verdict = not problems
        return problems

    def shut_down(self) -> list[str]:
        """Shut the kernel down; what went wrong since the test returned, and leftovers."""
        k = self.kernel
        problems: list[str] = []
        running = _names(k.running_kthreads()) if k.alive else []
        pids = {t.pid for t in k.tasks() if t.pid != os.getpid()} | {k.supervisor_pid}
        counts = self.counts()
        log = "\n".join(k.dmesg())
        k.shutdown()
        self.killed += [n for n in k.killed_kthreads if n not in self.killed]
        self.leaked += [n for n in running if n not in self.killed and n not in self.leaked]
        counts.update(leaked_kthreads=len(self.leaked), killed_kthreads=len(self.killed))
        if self.verdict:  # the test passed its own check: nothing may change after it
            problems += self.problems(counts)
        problems += _leftovers(pids)
        if problems:
            problems.append("--- kernel log ---\n" + log)
        return problems


def _leftovers(pids: set[int]) -> list[str]:
    problems = []
    deadline = time.monotonic() + 2.0
    leftover = {p for p in pids if _alive(p)}
    while leftover and time.monotonic() < deadline:
        time.sleep(0.01)
        leftover = {p for p in leftover if _alive(p)}
    if leftover:
        problems.append(f"task processes left running after shutdown: {sorted(leftover)}")
    from emu.image import own_ipc_names  # lazily, as `import emu` in kernel()

    shm_left = own_ipc_names(os.getpid())
    if shm_left:
        problems.append(f"IPC objects left in /dev/shm: {sorted(shm_left)}")
    return problems


def _fail(problems: list[str]) -> None:
    pytest.fail("emu kernel check failed:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def kernel(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A booted emu kernel for one test, checked when the test returns and shut down
    (and checked for leftovers) after it; see the plugin's doc for what fails a test."""
    # Imported here, not at the top: pytest loads this plugin (an entry point) in every
    # run in an environment where emu is installed, and that must not import emu.
    import emu

    boot_marker = request.node.get_closest_marker("emu_boot")
    boot_kwargs = dict(boot_marker.kwargs) if boot_marker else {}
    expect_marker = request.node.get_closest_marker("emu_expect")
    expected: dict[str, int | None] = {name: 0 for name in COUNTERS}
    if expect_marker:
        unknown = set(expect_marker.kwargs) - set(COUNTERS)
        if unknown:
            raise pytest.UsageError(f"emu_expect: unknown counters {sorted(unknown)}; "
                                    f"known: {', '.join(COUNTERS)}")
        expected.update(expect_marker.kwargs)
    check = KernelCheck(emu.boot(**boot_kwargs), expected)
    setattr(request.node, _CHECK_ATTR, check)
    try:
        yield check.kernel
    finally:
        try:
            problems = check.shut_down()
        finally:
            setattr(request.node, _CHECK_ATTR, None)
    if problems:
        _fail(problems)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Around the test function: call traces start at it, and the kernel fixture's
    call-time check (see the module's doc) fails the test itself."""
    check: KernelCheck | None = getattr(item, _CHECK_ATTR, None)
    bug = sys.modules.get("emu.bug")
    code = getattr(getattr(item, "function", None), "__code__", None)
    if bug is not None:
        bug.set_stack_base(code)
    try:
        if check is not None:
            check.test_started()
        result = yield  # a test that raised has failed already: no check then
    finally:
        if bug is not None:
            bug.set_stack_base(None)
    if check is not None:
        problems = check.test_returned()
        if problems:
            _fail(problems + ["--- kernel log ---\n" + "\n".join(check.kernel.dmesg())])
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    report = yield
    check: KernelCheck | None = getattr(item, _CHECK_ATTR, None)
    k = check.kernel if check is not None else None
    if k is not None and report.failed and k.alive:
        try:
            report.sections.append(("emu kernel log", "\n".join(k.dmesg())))
            report.sections.append(("emu tasks", k.ps()))
        except Exception as exc:  # the kernel may be half torn down
            report.sections.append(("emu kernel log", f"(unavailable: {exc})"))
    return report
