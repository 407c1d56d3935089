"""Long torture runs over a matrix of CPU counts, thread counts and interrupt rates.

Each must end with SUCCESS; a run against a deliberately broken completion must end
with FAILURE naming the broken invariant. `EMU_TORTURE_SECS` sets each run's length.
"""

from __future__ import annotations

import io
import os

import pytest

from emu.torture import TYPES, Options, run_torture

SECS = float(os.environ.get("EMU_TORTURE_SECS", "20"))
pytestmark = pytest.mark.timeout(SECS * 4 + 120)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("cpus", [1, 2])
@pytest.mark.parametrize("threads, irq_rate", [(1, 200), (4, 2000)])
def test_torture_matrix(kind, cpus, threads, irq_rate):
    out = io.StringIO()
    result = run_torture(Options(types=(kind,), cpus=cpus, threads_per_cpu=threads,
                                 duration=SECS, irq_rate=irq_rate, stat_interval=SECS / 4), out)
    print(out.getvalue())
    assert result["verdict"] == "SUCCESS", "\n".join(result["problems"])


def test_torture_catches_a_broken_completion():
    out = io.StringIO()
    result = run_torture(Options(types=("completion",), duration=SECS / 2, broken=True), out)
    print(out.getvalue())
    assert result["verdict"] == "FAILURE"
    assert any("conservation" in p or "lost wake-up" in p for p in result["problems"])
