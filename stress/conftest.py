"""pytest set-up for stress/: import paths, the timeout marker, and a summary of the tables.

The benchmarks boot their own kernel (one per benchmark), so they do not use the
``kernel`` fixture of emu.pytest_plugin; they check for leftovers themselves.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import benchlib  # noqa: E402  (makes emu importable from a source checkout)


def pytest_configure(config: Any) -> None:
    # Registered by pytest-timeout when it is installed; declared here so that the
    # benchmarks' generous per-test timeout is not an unknown marker without it.
    config.addinivalue_line("markers", "timeout(seconds): per-test time limit (pytest-timeout)")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    """Repeat the benchmark tables at the end when output was captured (no -s)."""
    if not benchlib.REPORTS or config.getoption("capture") == "no":
        return
    terminalreporter.section("emu benchmarks")
    for text in benchlib.REPORTS:
        terminalreporter.write(text + "\n")
