"""Benchmark: completion ping-pong with tracing on vs off, in one kernel, round-robin.

    python3 -m pytest -s -p no:cacheprovider stress/test_bench_trace.py
    python3 stress/test_bench_trace.py [--reps 5]

Target: one-way latency with tracing on ≤ 1.3× tracing off. Each traced repetition
writes its Perfetto trace (not timed: side A times its round trips itself); the table
also gives the events written, the events dropped and the time taken to write the
file. Tracing off against the code before tracing existed: run
stress/test_bench_completion.py --only pingpong on both checkouts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import pytest
from test_bench_completion import PINGPONG_ITERS, _fork, pingpong_emu

import emu

import benchlib as bl

pytestmark = pytest.mark.timeout(900)
REPS = 5


def bench_trace(reps: int = REPS) -> dict[str, Any]:
    t_start = bl.banner("tracing cost: completion ping-pong")
    real = bl.real_cpus()[:2]
    placements = {"same": (0, 0)}
    if len(real) > 1:
        placements["cross"] = (0, 1)
    res = _fork.Array("d", 1, lock=False)
    extra: dict[str, list[tuple[int, int, float, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="emu-bench-trace-") as tmp, \
            bl.nothing_left_behind("trace benchmark"):
        with emu.boot(cpus=real, max_tasks=16) as kernel:
            configs = []
            for place, cpus in placements.items():
                n = PINGPONG_ITERS[("emu", place)]

                def off(c: tuple[int, int] = cpus, n: int = n) -> Any:
                    return pingpong_emu(c, n, res)

                def on(c: tuple[int, int] = cpus, n: int = n, place: str = place) -> Any:
                    path = os.path.join(tmp, f"{place}.pftrace")
                    kernel.trace_start(path)
                    try:
                        out = pingpong_emu(c, n, res)
                    finally:
                        t0 = time.perf_counter()
                        events, dropped = kernel.trace_stop()
                        write_s = time.perf_counter() - t0
                    extra.setdefault(place, []).append(
                        (events, dropped, write_s, os.path.getsize(path)))
                    return out

                configs += [(f"off/{place}", off), (f"on/{place}", on)]
            with bl.kernel_report_on_failure(kernel):
                out = bl.round_robin(configs, reps, warmup=1)
            bl.check_kernel_clean(kernel)
    rows = []
    notes = [f"{bl.machine_line()}; {reps} repetitions (+1 warm-up), round-robin, median "
             "(min–max); tracing on and off alternate in one kernel."]
    for place, cpus in placements.items():
        off_us = bl.column(out[f"off/{place}"], "one_way_us")
        on_us = bl.column(out[f"on/{place}"], "one_way_us")
        ratios = bl.paired_ratios(on_us, off_us)
        runs = extra[place][-reps:]
        rows.append([place, f"CPU {cpus[0]} / {cpus[1]}", bl.cell(off_us), bl.cell(on_us),
                     bl.ratio_cell(ratios),
                     f"{statistics.median(r[0] for r in runs):.0f}",
                     f"{max(r[1] for r in runs)}",
                     f"{statistics.median(r[2] for r in runs):.2f}",
                     f"{statistics.median(r[3] for r in runs) / bl.MiB:.1f}"])
        r = statistics.median(ratios)
        notes.append(f"- target tracing on ≤ 1.3× off ({place} CPU): {r:.2f}× → "
                     f"{bl.verdict(r, 1.3)}")
    bl.table("completion ping-pong, tracing on vs off",
             ["placement", "CPUs", "off one-way µs", "on one-way µs", "on / off",
              "events", "dropped (max)", "write s", "trace MiB"], rows, notes)
    bl.finish("tracing cost", t_start)
    return out


def test_bench_trace() -> None:
    pytest.importorskip("perfetto")
    out = bench_trace(bl.env_int("EMU_BENCH_REPS", REPS))
    assert all(len(v) == bl.env_int("EMU_BENCH_REPS", REPS) for v in out.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=REPS)
    bench_trace(ap.parse_args().reps)


if __name__ == "__main__":
    main()
