"""The pytest plugin: the kernel fixture fails tests on unexpected reports and leftovers."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


def run(pytester: pytest.Pytester, body: str) -> pytest.RunResult:
    pytester.makepyfile("import emu, os, signal, pytest\n" + body)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")


def test_clean_test_passes(pytester):
    result = run(pytester, """
def test_ok(kernel):
    t = emu.kthread_run(lambda d: 0, None, "ok")
    emu.kthread_stop(t)
""")
    result.assert_outcomes(passed=1)


def test_unexpected_warn_fails_the_test_and_shows_the_log(pytester):
    result = run(pytester, """
def test_warns(kernel):
    c = emu.Completion()
    emu.complete_all(c)
    emu.complete_all(c)
""")
    result.assert_outcomes(failed=1)  # the test's failure, not an error at teardown
    result.stdout.fnmatch_lines(["*warnings: 1 (expected 0)*", "*kernel log*",
                                 "*complete_all() called twice*"])


def test_expected_reports_are_accepted(pytester):
    result = run(pytester, """
@pytest.mark.emu_expect(warnings=1, oopses=1)
def test_warns(kernel):
    c = emu.Completion()
    emu.complete_all(c)
    emu.complete_all(c)
    t = emu.kthread_run(lambda d: 1 // 0, None, "oops")
    while emu.task_state_to_char(t) != "X":
        pass
    emu.kthread_stop(t)
""")
    result.assert_outcomes(passed=1)


def test_failing_test_report_carries_log_and_task_table(pytester):
    result = run(pytester, """
def test_fails(kernel):
    emu.pr_info("something to see")
    emu.kthread_create(lambda d: 0, None, "visible")
    assert False
""")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*emu kernel log*", "*something to see*", "*emu tasks*",
                                 "*D kthread ?visible?*"])


def test_boot_marker_passes_arguments(pytester):
    result = run(pytester, """
@pytest.mark.emu_boot(cpus=1, hz=100)
def test_boot_args(kernel):
    assert kernel.ncpus == 1 and kernel.hz == 100
""")
    result.assert_outcomes(passed=1)


def test_unknown_expectation_is_a_usage_error(pytester):
    result = run(pytester, """
@pytest.mark.emu_expect(warning=1)
def test_typo(kernel):
    pass
""")
    result.stdout.fnmatch_lines(["*unknown counters*"])
