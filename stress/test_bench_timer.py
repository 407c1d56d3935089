"""Benchmark: timer lateness at HZ=1000 against threading.Timer and a raw select() loop.

    python3 -m pytest -s -p no:cacheprovider stress/test_bench_timer.py
    python3 stress/test_bench_timer.py [--reps 5] [--samples 300]

Each configuration waits `samples` times for a deadline 1 to 5 ms ahead (random, the
same sequence for every configuration) and records how late it fired:

- emu: a timer that re-arms itself from its callback with ``expires = jiffies + d``;
  it is due when jiffies passes ``expires`` (the kernel's level-0 wheel), and its
  callback runs in softirq context on CPU 0, where no task runs (the idle task takes it).
  Lateness is measured from that due time; ``vs expires`` adds the jiffy the kernel's
  wheel rounds up.
- threading.Timer, one after another, in this process.
- a raw timerfd-style loop in a forked process pinned to one CPU: select() until the
  absolute CLOCK_MONOTONIC deadline, then stamp.

Target: emu's p99 within one jiffy plus the raw loop's p99. The test asserts only that
every sample arrived, never a time.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import statistics
import struct
import threading
import time
from typing import Any

import pytest

import emu

import benchlib as bl

pytestmark = pytest.mark.timeout(900)

HZ = 1000
JIFFY_NS = 1_000_000_000 // HZ
REPS = 5
SAMPLES = 300
SEED = 7


def _delays(samples: int) -> list[int]:
    rng = random.Random(SEED)
    return [rng.randint(1, 5) for _ in range(samples)]


def _figures(late_ns: list[int]) -> dict[str, float]:
    late = sorted(late_ns)
    return {"median_us": statistics.median(late) / 1e3,
            "p99_us": late[min(len(late) - 1, int(len(late) * 0.99))] / 1e3,
            "max_us": late[-1] / 1e3}


# --- emu --------------------------------------------------------------------------------------

def emu_timer_fn(t: emu.TimerList) -> None:
    now = time.monotonic_ns()
    n = emu.atomic_inc_return(t.n) - 1  # shared: any task on the CPU may run it
    due = t.boot_ns + -(-(t.expires + 1) * 1_000_000_000 // HZ)
    emu.atomic64_set(t.late[n], now - due)
    if n + 1 < len(t.delays):
        emu.mod_timer(t, emu.jiffies() + t.delays[n + 1])
    else:
        emu.complete(t.done)


def lateness_emu(kernel: Any, delays: list[int], late: list[emu.Atomic64]) -> dict[str, float]:
    t = emu.TimerList(emu_timer_fn)
    t.n, t.delays, t.late, t.done = emu.Atomic(), delays, late, emu.Completion()
    t.boot_ns = kernel._img.img.hdr.boot_ns
    emu.mod_timer(t, emu.jiffies() + delays[0])
    if not emu.wait_for_completion_timeout(t.done, emu.msecs_to_jiffies(60_000)):
        raise AssertionError("the emu timer stopped firing:\n" + "\n".join(kernel.dmesg()[-20:]))
    emu.del_timer_sync(t)
    out = _figures([emu.atomic64_read(a) for a in late[:len(delays)]])
    out["vs_expires_p99_us"] = out["p99_us"] + JIFFY_NS / 1e3
    return out


# --- peers ------------------------------------------------------------------------------------

def lateness_threading(delays: list[int]) -> dict[str, float]:
    late: list[int] = []
    for d in delays:
        fired = threading.Event()
        stamp: list[int] = []
        deadline = time.monotonic_ns() + d * JIFFY_NS
        timer = threading.Timer(d / HZ, lambda s=stamp, f=fired: (s.append(time.monotonic_ns()),
                                                                  f.set()))
        timer.start()
        fired.wait(10)
        timer.join()
        late.append(stamp[0] - deadline)
    return _figures(late)


def lateness_raw_loop(delays: list[int], cpu: int) -> dict[str, float]:
    """A forked process pinned to `cpu`: select() to each absolute deadline."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            bl.pin(cpu)
            out = []
            for d in delays:
                deadline = time.monotonic_ns() + d * JIFFY_NS
                while (left := deadline - time.monotonic_ns()) > 0:
                    select.select([], [], [], left / 1e9)
                out.append(time.monotonic_ns() - deadline)
            os.write(w, struct.pack(f"{len(out)}q", *out))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    assert bl.wait_pid(pid) == 0, "the raw loop failed"
    return _figures(list(struct.unpack(f"{len(delays)}q", data)))


# --- the table ----------------------------------------------------------------------------------

def bench_timer(reps: int = REPS, samples: int = SAMPLES) -> dict[str, Any]:
    t_start = bl.banner("timer lateness at HZ=1000")
    delays = _delays(samples)
    cpus = bl.real_cpus()
    with bl.nothing_left_behind("timer benchmark"):
        with emu.boot(cpus=1, hz=HZ) as kernel:
            late = [emu.Atomic64() for _ in range(samples)]
            configs = [
                ("emu", lambda: lateness_emu(kernel, delays, late)),
                ("threading", lambda: lateness_threading(delays)),
                ("raw", lambda: lateness_raw_loop(delays, cpus[-1])),
            ]
            with bl.kernel_report_on_failure(kernel):
                out = bl.round_robin(configs, reps, warmup=0)
            bl.check_kernel_clean(kernel)
    labels = {"emu": "emu timer_list (softirq in the idle task)",
              "threading": "threading.Timer (same process)",
              "raw": "raw select() loop (forked, pinned)"}
    rows = []
    for name in ("emu", "threading", "raw"):
        ratio = bl.paired_ratios(bl.column(out[name], "p99_us"), bl.column(out["raw"], "p99_us"))
        rows.append([labels[name], bl.cell(bl.column(out[name], "median_us"), 1),
                     bl.cell(bl.column(out[name], "p99_us"), 1),
                     bl.cell(bl.column(out[name], "max_us"), 1), bl.ratio_cell(ratio)])
    emu_p99 = statistics.median(bl.column(out["emu"], "p99_us"))
    raw_p99 = statistics.median(bl.column(out["raw"], "p99_us"))
    limit = JIFFY_NS / 1e3 + raw_p99
    notes = [f"{bl.machine_line()}; {reps} runs per configuration (round-robin) of {samples} "
             "deadlines 1–5 ms ahead; cells are median (min–max) over runs.",
             "emu's lateness is from the moment jiffies passes `expires` (when the kernel's "
             "wheel runs a level-0 timer); measured from `expires` itself add one jiffy "
             f"(p99 {emu_p99 + JIFFY_NS / 1e3:.1f} µs).",
             f"- target: emu p99 within one jiffy + the raw loop's p99 ({limit:.1f} µs): "
             f"{emu_p99:.1f} µs → {bl.verdict(emu_p99, limit)}"]
    bl.table("timer lateness at HZ=1000 (µs)",
             ["configuration", "median µs", "p99 µs", "max µs", "p99 × raw"], rows, notes)
    bl.finish("timer lateness", t_start)
    return out


def test_bench_timer() -> None:
    reps = bl.env_int("EMU_BENCH_REPS", REPS)
    out = bench_timer(reps=reps)
    assert all(len(runs) == reps for runs in out.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=REPS)
    ap.add_argument("--samples", type=int, default=SAMPLES)
    args = ap.parse_args()
    bench_timer(args.reps, args.samples)


if __name__ == "__main__":
    main()
