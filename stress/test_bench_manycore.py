"""Benchmark: what emulated CPUs cost when nothing runs on them (issue #13).

    python3 -m pytest -s -p no:cacheprovider stress/test_bench_manycore.py
    python3 stress/test_bench_manycore.py [--reps 7] [--only boot|memory|torture]
        [--torture-secs 10]

Three tables, each over cpus = a few counts up to a thousand on the same real CPUs
(round robin: emulated CPU i runs on the (i mod R)-th real CPU):

- **boot**: ``emu.boot(cpus=N)`` + the first ``request_irq()`` (it starts the first idle
  task) + ``shutdown()``, for N = 2, 64, 256, 1024, interleaved round-robin in this
  process. Ratio: paired, against cpus=2 in the same repetition. Target: ≤ 2× at 1024.
- **memory**: the shared image's size and the booting process's USS after boot + the
  first ``request_irq()``, each N in a fresh interpreter (so that nothing of an earlier
  boot stays in its memory). Target: ≤ 64 KiB per additional emulated CPU (slope
  against cpus=2).
- **torture**: ``python -m emu torture --duration D --cpus N`` for N = 2, 16, 64, 256,
  one run each: the verdict (SUCCESS every time) and ops/s per type. More emulated CPUs
  on the same real ones show oversubscription, not speed-up.

The tests assert only sanity (no kernel report, nothing left behind, SUCCESS), never a
time. `EMU_BENCH_REPS` and `EMU_TORTURE_SECS` shorten a run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

import emu
from emu.task import live_tasks

import benchlib as bl

BOOT_CPUS = (2, 64, 256, 1024)
MEMORY_CPUS = (2, 64, 256, 1024)
TORTURE_CPUS = (2, 16, 64, 256)
BOOT_REPS = 7
TORTURE_SECS = 10.0
IRQ = 5
KiB = 1024


def _handler(irq: int, dev: object) -> int:
    return emu.IRQ_HANDLED


def boot_once(ncpus: int) -> dict[str, float]:
    """Boot with `ncpus` CPUs, request the first IRQ, shut down: seconds of each."""
    t0 = time.perf_counter()
    kernel = emu.boot(cpus=ncpus)
    t1 = time.perf_counter()
    try:
        assert emu.request_irq(IRQ, _handler, 0, "first", None) == 0
        t2 = time.perf_counter()
        bl.check_kernel_clean(kernel)
        emu.free_irq(IRQ, None)
    finally:
        t3 = time.perf_counter()
        kernel.shutdown()
    t4 = time.perf_counter()
    return {"boot": t1 - t0, "irq": t2 - t1, "shutdown": t4 - t3, "total": t4 - t0 - (t3 - t2)}


def bench_boot(reps: int = BOOT_REPS, cpus: tuple[int, ...] = BOOT_CPUS) -> dict[str, list]:
    t_start = bl.banner("boot + first request_irq() + shutdown vs cpus")
    with bl.nothing_left_behind("boot benchmark"):
        runs = bl.round_robin([(str(n), lambda n=n: boot_once(n)) for n in cpus], reps)
    base = bl.column(runs[str(cpus[0])], "total")
    rows = []
    for n in cpus:
        r = runs[str(n)]
        ms = {k: [v * 1000 for v in bl.column(r, k)] for k in ("boot", "irq", "shutdown", "total")}
        ratio = bl.paired_ratios(bl.column(r, "total"), base)
        rows.append([str(n), bl.cell(ms["boot"], 1), bl.cell(ms["irq"], 1),
                     bl.cell(ms["shutdown"], 1), bl.cell(ms["total"], 1), bl.ratio_cell(ratio)])
    top = bl.paired_ratios(bl.column(runs[str(cpus[-1])], "total"), base)
    med = sorted(top)[len(top) // 2]
    notes = [f"{bl.machine_line()}; {reps} repetitions (+1 warm-up), configurations "
             "interleaved round-robin; median (min–max).",
             f"`× cpus={cpus[0]}`: paired ratio of the total (boot + first request_irq() + "
             "shutdown) against the first row in the same repetition.",
             f"- target ≤ 2× the cpus={cpus[0]} time at cpus={cpus[-1]}: {med:.2f}× → "
             f"{bl.verdict(med, 2.0)}"]
    bl.table("boot + first request_irq() + shutdown (ms)",
             ["cpus", "boot", "first request_irq()", "shutdown", "total", f"× cpus={cpus[0]}"],
             rows, notes)
    bl.finish("boot vs cpus", t_start)
    return runs


def memory_child(ncpus: int) -> dict[str, float]:
    """In a fresh interpreter: boot, first request_irq(), measure, shut down."""
    with emu.boot(cpus=ncpus) as kernel:
        assert emu.request_irq(IRQ, _handler, 0, "first", None) == 0
        info = psutil.Process().memory_full_info()
        out = {"image": kernel._img.size, "uss": info.uss, "rss": info.rss,
               "processes": 2 + sum(1 for t in live_tasks() if t.is_kthread)}
        emu.free_irq(IRQ, None)
    return out


def bench_memory(cpus: tuple[int, ...] = MEMORY_CPUS) -> dict[int, dict[str, float]]:
    t_start = bl.banner("shared image and booting process memory vs cpus")
    out: dict[int, dict[str, float]] = {}
    with bl.nothing_left_behind("memory benchmark"):
        for n in cpus:
            proc = subprocess.run([sys.executable, __file__, "--memory-child", str(n)],
                                  capture_output=True, text=True, timeout=120, check=True)
            out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = out[cpus[0]]
    rows = []
    worst = 0.0
    for n in cpus:
        m = out[n]
        extra = n - cpus[0]
        img_slope = (m["image"] - base["image"]) / extra / KiB if extra else 0.0
        uss_slope = (m["uss"] - base["uss"]) / extra / KiB if extra else 0.0
        worst = max(worst, img_slope, uss_slope)
        rows.append([str(n), f"{m['image'] / KiB:,.0f}", f"{img_slope:,.2f}" if extra else "—",
                     f"{m['uss'] / KiB:,.0f}", f"{uss_slope:,.2f}" if extra else "—",
                     f"{m['rss'] / KiB:,.0f}", str(int(m["processes"]))])
    notes = [f"{bl.machine_line()}; one fresh interpreter per row, measured after boot + the "
             "first request_irq() (psutil memory_full_info of the booting process).",
             f"`/CPU`: KiB per emulated CPU beyond cpus={cpus[0]}. `processes`: the booting "
             "process, the supervisor and every kthread (the idle tasks).",
             f"- target ≤ 64 KiB per additional emulated CPU: worst {worst:.2f} KiB → "
             f"{bl.verdict(worst, 64.0)}"]
    bl.table("memory vs cpus (KiB)",
             ["cpus", "image", "image /CPU", "USS", "USS /CPU", "RSS", "processes"], rows, notes)
    bl.finish("memory vs cpus", t_start)
    return out


def torture_once(ncpus: int, secs: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "run.json")
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "emu", "torture", "--cpus", str(ncpus), "--duration",
             str(secs), "--stat-interval", str(secs), "--json", report],
            capture_output=True, text=True, timeout=secs * 20 + 300, cwd=bl.ROOT)
        wall = time.monotonic() - t0
        with open(report) as f:
            result = json.load(f)
    result["wall"] = wall
    result["status"] = proc.returncode
    result["tail"] = proc.stdout[-2000:] + proc.stderr[-2000:]
    return result


def bench_torture(secs: float = TORTURE_SECS, cpus: tuple[int, ...] = TORTURE_CPUS) -> dict:
    t_start = bl.banner(f"emu torture --duration {secs:g} vs --cpus")
    out = {}
    with bl.nothing_left_behind("torture benchmark"):
        for n in cpus:
            out[n] = torture_once(n, secs)
            print(f"  [cpus={n}: {out[n]['verdict']}, {out[n]['wall']:.1f}s]",
                  file=sys.stderr, flush=True)
    kinds = list(out[cpus[0]]["types"])
    rows = []
    for n in cpus:
        r = out[n]
        rate = [r["types"][k]["ops_per_s"] for k in kinds]
        base = [out[cpus[0]]["types"][k]["ops_per_s"] for k in kinds]
        rows.append([str(n), r["verdict"], *(f"{x:,.0f} ({x / b:.2f}×)" if b else f"{x:,.0f}"
                                             for x, b in zip(rate, base, strict=True)),
                     f"{r['wall']:.1f}"])
    notes = [f"{bl.machine_line()}; one run per row, `python -m emu torture --cpus N "
             f"--duration {secs:g}` (default types, threads per CPU, interrupt rates).",
             f"ops/s per type (× the cpus={cpus[0]} row): every emulated CPU gets its own "
             "waiters, completer, churner and worker, all time-sliced on the same real CPUs, "
             "so the figures show oversubscription, not speed-up. `wall`: the whole run, "
             "start-up and shutdown included."]
    for n in cpus:
        notes += [f"- cpus={n}: {problem}" for problem in out[n]["problems"]]
    bl.table(f"emu torture --duration {secs:g} (ops/s)",
             ["cpus", "verdict", *(f"{k}" for k in kinds), "wall s"], rows, notes)
    bl.finish("torture vs cpus", t_start)
    return out


# --- pytest entry points ------------------------------------------------------------------------

def test_bench_manycore_boot() -> None:
    reps = bl.env_int("EMU_BENCH_REPS", BOOT_REPS)
    runs = bench_boot(reps=reps)
    assert all(len(r) == reps for r in runs.values())


def test_bench_manycore_memory() -> None:
    out = bench_memory()
    assert all(m["processes"] <= 2 + len(bl.real_cpus()) for m in out.values())


@pytest.mark.timeout(3600)
def test_bench_manycore_torture() -> None:
    secs = float(os.environ.get("EMU_TORTURE_SECS", TORTURE_SECS))
    out = bench_torture(secs=secs)
    bad = {n: r["tail"] for n, r in out.items() if r["verdict"] != "SUCCESS" or r["status"]}
    assert not bad, bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=BOOT_REPS, help="boot repetitions")
    ap.add_argument("--only", choices=["boot", "memory", "torture"])
    ap.add_argument("--torture-secs", type=float, default=TORTURE_SECS)
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child)))
        return
    if args.only in (None, "boot"):
        bench_boot(reps=args.reps)
    if args.only in (None, "memory"):
        bench_memory()
    if args.only in (None, "torture"):
        bench_torture(secs=args.torture_secs)


if __name__ == "__main__":
    main()
