"""The kernel fixture catches kthread life-cycle bugs, and its failures are the test's."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

LOOPER = '''
def looper(d):
    while not emu.kthread_should_stop():
        emu.msleep(5)
    return 0

def deaf(started):
    emu.complete(started)
    while True:        # never asks kthread_should_stop(): Linux would hang in rmmod
        emu.msleep(5)
'''


def run(pytester: pytest.Pytester, body: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile("import emu, pytest\n" + LOOPER + body)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", *args)


def test_a_leaked_kthread_fails_the_test_itself(pytester):
    result = run(pytester, """
def test_leaks(kernel):
    emu.kthread_run(looper, None, "leaky")
""")
    result.assert_outcomes(failed=1)  # the test fails: no "ERROR at teardown"
    result.stdout.fnmatch_lines([
        "*leaked_kthreads: 1 (expected 0)*",
        "*kthreads still running when the test ended (stopped by the fixture): leaky/*",
    ])
    result.stdout.no_fnmatch_line("*ERROR at teardown*")


def test_a_declared_leak_passes(pytester):
    result = run(pytester, """
@pytest.mark.emu_expect(leaked_kthreads=1)
def test_leaks(kernel):
    emu.kthread_run(looper, None, "leaky")
""")
    result.assert_outcomes(passed=1)


def test_a_kthread_that_ignores_kthread_should_stop_fails_the_test(pytester):
    result = run(pytester, """
def test_deaf(kernel):
    started = emu.Completion()
    emu.kthread_run(deaf, started, "deaf")
    emu.wait_for_completion(started)
""")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*killed_kthreads: 1 (expected 0)*",
        "*kthreads that ignored kthread_should_stop() (killed): deaf/*",
    ])


def test_a_declared_killed_kthread_passes(pytester):
    result = run(pytester, """
@pytest.mark.emu_expect(killed_kthreads=1)
def test_deaf(kernel):
    started = emu.Completion()
    emu.kthread_run(deaf, started, "deaf")
    emu.wait_for_completion(started)
""")
    result.assert_outcomes(passed=1)


def test_kthreads_a_fixture_stops_in_its_teardown_are_not_leaks(pytester):
    result = run(pytester, """
@pytest.fixture
def device(kernel):
    t = emu.kthread_run(looper, None, "device")
    yield t
    emu.kthread_stop(t)

def test_uses_device(device):
    assert emu.task_state_to_char(device) in "RSD"
""")
    result.assert_outcomes(passed=1)


def test_a_fixture_that_leaks_a_kthread_is_an_error_at_teardown(pytester):
    result = run(pytester, """
@pytest.fixture
def device(kernel):
    yield emu.kthread_run(looper, None, "device")

def test_uses_device(device):
    pass
""")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*leaked_kthreads: 1 (expected 0)*", "*device/*"])


def test_a_failing_test_is_not_blamed_for_its_leaks(pytester):
    result = run(pytester, """
def test_fails_early(kernel):
    emu.kthread_run(looper, None, "leaky")
    assert False, "the real problem"
""")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the real problem*"])
    result.stdout.no_fnmatch_line("*leaked_kthreads*")


def test_reports_in_the_test_start_their_trace_at_the_test_function(pytester):
    result = run(pytester, """
def helper():
    c = emu.Completion()
    emu.complete_all(c)
    emu.complete_all(c)

@pytest.mark.emu_expect(warnings=1)
def test_warns(kernel):
    helper()
    trace = "\\n".join(kernel.dmesg())
    assert "in test_warns" in trace and "in helper" in trace
    assert "_pytest" not in trace and "pluggy" not in trace, trace
""")
    result.assert_outcomes(passed=1)


def test_marker_help_says_the_counts_are_exact(pytester):
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["*emu_expect(*leaked_kthreads=0, killed_kthreads=0)*exact*"])
