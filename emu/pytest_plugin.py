"""pytest plugin (registered through the ``pytest11`` entry point): the ``kernel`` fixture.

The fixture boots a kernel for one test and shuts it down afterwards. The test fails
if the kernel logged a WARN, BUG, Oops or hung task it did not declare, or if a task
process or an IPC object of the kernel outlived it. A failing test's report carries
the kernel log and the task table.

Markers::

    @pytest.mark.emu_boot(cpus=2, hz=1000)        # arguments for emu.boot()
    @pytest.mark.emu_expect(warnings=1, oopses=1)  # reports the test causes on purpose

``emu_expect`` counts are exact; pass ``None`` to accept any number.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

COUNTERS = ("warnings", "bugs", "oopses", "hung_tasks")
_KERNEL_ATTR = "_emu_kernel"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "emu_boot(**kwargs): arguments for emu.boot() in the kernel fixture"
    )
    config.addinivalue_line(
        "markers",
        "emu_expect(warnings=0, bugs=0, oopses=0, hung_tasks=0): kernel reports the test expects",
    )


def _counts(kernel: Any) -> dict[str, int]:
    return {
        "warnings": kernel.warnings,
        "bugs": kernel.bugs,
        "oopses": kernel.oopses,
        "hung_tasks": len(kernel.hung_tasks),
    }


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def kernel(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A booted emu kernel, shut down and checked for reports and leftovers after the test."""
    # Imported here, not at the top: pytest loads this plugin (an entry point) in every
    # run in an environment where emu is installed, and that must not import emu.
    import emu

    boot_marker = request.node.get_closest_marker("emu_boot")
    boot_kwargs = dict(boot_marker.kwargs) if boot_marker else {}
    expect_marker = request.node.get_closest_marker("emu_expect")
    expected = {name: 0 for name in COUNTERS}
    if expect_marker:
        unknown = set(expect_marker.kwargs) - set(COUNTERS)
        if unknown:
            raise pytest.UsageError(f"emu_expect: unknown counters {sorted(unknown)}")
        expected.update(expect_marker.kwargs)
    k = emu.boot(**boot_kwargs)
    setattr(request.node, _KERNEL_ATTR, k)
    try:
        yield k
    finally:
        pids = {t.pid for t in k.tasks() if t.pid != os.getpid()} | {k.supervisor_pid}
        counts = _counts(k)
        log = "\n".join(k.dmesg())
        k.shutdown()
        setattr(request.node, _KERNEL_ATTR, None)
    problems = [
        f"{name}: {counts[name]} (expected {want})"
        for name, want in expected.items()
        if want is not None and counts[name] != want
    ]
    deadline = time.monotonic() + 2.0
    leftover = {p for p in pids if _alive(p)}
    while leftover and time.monotonic() < deadline:
        time.sleep(0.01)
        leftover = {p for p in leftover if _alive(p)}
    if leftover:
        problems.append(f"task processes left running after shutdown: {sorted(leftover)}")
    from emu.image import own_ipc_names  # lazily, as `import emu` above

    shm_left = own_ipc_names(os.getpid())
    if shm_left:
        problems.append(f"IPC objects left in /dev/shm: {sorted(shm_left)}")
    if problems:
        pytest.fail("emu kernel check failed:\n  " + "\n  ".join(problems)
                    + "\n--- kernel log ---\n" + log, pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    report = yield
    k = getattr(item, _KERNEL_ATTR, None)
    if k is not None and report.failed and k.alive:
        try:
            report.sections.append(("emu kernel log", "\n".join(k.dmesg())))
            report.sections.append(("emu tasks", k.ps()))
        except Exception as exc:  # the kernel may be half torn down
            report.sections.append(("emu kernel log", f"(unavailable: {exc})"))
    return report
