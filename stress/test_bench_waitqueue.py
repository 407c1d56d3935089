"""Benchmark: wake_up_all() to K waiters (exclusive and not) against complete_all().

    python3 -m pytest -s -p no:cacheprovider stress/test_bench_waitqueue.py
    python3 stress/test_bench_waitqueue.py [--reps 5] [--k 1,4,16,64]

The three configurations run round-robin in one kernel: complete_all() as in
test_bench_completion.py's wake-all benchmark, and K kthreads sleeping in
wait_event() (non-exclusive, D) or wait_event_interruptible_exclusive() (S) on one wait
queue, woken by wake_up_all() after a shared generation counter moved (their condition).
Waiter i runs on CPU i mod ncpus in every configuration.
Times are µs from the waker's stamp before the wake-up (before the counter store for the
wait queue) to each waiter's stamp after it woke. Target: the last waiter within 1.1× of
complete_all()'s (paired ratio, same run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import pytest
from test_bench_completion import (
    HANG_SECS,
    SETTLE_S,
    WAKE_ALL_KS,
    WAKE_ALL_REPS,
    WAKE_ALL_ROUNDS,
    _fork,
    _hang_jiffies,
    _median_rounds,
    _round_figures,
    _wait_emu,
    wa_emu_waiter,
)

import emu

import benchlib as bl

pytestmark = pytest.mark.timeout(900)

_NCPUS = [1]  # the booted kernel's CPU count


def wq_waiter(d: tuple[Any, ...]) -> int:
    """Round r: wait until gen > r on `wq`, stamp, report through `woke`."""
    idx, wq, gen, woke, rounds, stamps, exclusive = d
    now, read = time.perf_counter_ns, emu.atomic_read
    for r in range(rounds):
        if exclusive:
            emu.wait_event_interruptible_exclusive(wq, lambda r=r: read(gen) > r)
        else:
            emu.wait_event(wq, lambda r=r: read(gen) > r)
        stamps[idx] = now()
        emu.complete(woke)
    return rounds


def _start(fn: Any, data: Any, i: int) -> emu.Task:
    """Waiter i on CPU i mod ncpus in every configuration, so that they compare."""
    return emu.kthread_run_on_cpu(fn, data, i % _NCPUS[0], "wq/%u")


def wake_all_completion(k: int, rounds: int, stamps: Any) -> dict[str, float]:
    """test_bench_completion.py's complete_all() rounds, waiters placed as wake_all_wq's."""
    comps = [emu.Completion(), emu.Completion()]
    woke = emu.Completion()
    total = rounds + 1
    tasks = [_start(wa_emu_waiter, (i, comps, woke, total, stamps), i) for i in range(k)]
    return _rounds(tasks, "D", k, total, stamps, woke,
                   lambda r: emu.complete_all(comps[r % 2]),
                   lambda r: emu.reinit_completion(comps[r % 2]))


def wake_all_wq(k: int, rounds: int, stamps: Any, exclusive: bool) -> dict[str, float]:
    """K kthreads woken by wake_up_all() after the condition's counter moved."""
    wq, gen, woke = emu.WaitQueueHead(), emu.Atomic(), emu.Completion()
    total = rounds + 1  # round 0 is a warm-up
    tasks = [_start(wq_waiter, (i, wq, gen, woke, total, stamps, exclusive), i)
             for i in range(k)]

    def wake(r: int) -> None:
        emu.atomic_set(gen, r + 1)
        emu.wake_up_all(wq)

    return _rounds(tasks, "S" if exclusive else "D", k, total, stamps, woke, wake,
                   lambda r: None)


def _rounds(tasks: list[emu.Task], letter: str, k: int, total: int, stamps: Any,
            woke: emu.Completion, wake: Any, after: Any) -> dict[str, float]:
    """Time `total` rounds of wake(r) (the first a warm-up); the median round."""
    hang = _hang_jiffies()
    per_round = []
    for r in range(total):
        bl.wait_until(lambda: all(emu.task_state_to_char(t) == letter for t in tasks),
                      HANG_SECS, f"all {k} waiters to sleep in {letter} (round {r})",
                      report=lambda: bl.hang_report(tasks))
        time.sleep(SETTLE_S)
        for i in range(k):
            stamps[i] = 0
        t0 = time.perf_counter_ns()
        wake(r)
        t1 = time.perf_counter_ns()
        _wait_emu(woke, k, "wake-up", tasks, hang)
        after(r)
        assert all(stamps[i] > t0 for i in range(k)), "a waiter did not stamp its wake-up"
        if r:
            per_round.append(_round_figures(t0, t1, stamps, k))
    results = [emu.kthread_stop(t) for t in tasks]
    assert results == [total] * k, f"waiters returned {set(results)}"
    return _median_rounds(per_round)


def bench_wake_up_all(reps: int = WAKE_ALL_REPS, ks: tuple[int, ...] = WAKE_ALL_KS,
                      rounds: int = WAKE_ALL_ROUNDS) -> dict[int, Any]:
    t_start = bl.banner("wake_up_all() vs complete_all() to K waiters")
    stamps = _fork.Array("q", max(ks), lock=False)
    results: dict[int, Any] = {}
    with bl.nothing_left_behind("wake_up_all benchmark"):
        with emu.boot(max_tasks=max(ks) + 8) as kernel:
            _NCPUS[0] = kernel.ncpus
            for k in ks:
                print(f"  K={k}", file=sys.stderr, flush=True)
                configs = [
                    ("complete_all", lambda k=k: wake_all_completion(k, rounds, stamps)),
                    ("wq", lambda k=k: wake_all_wq(k, rounds, stamps, False)),
                    ("wq_excl", lambda k=k: wake_all_wq(k, rounds, stamps, True)),
                ]
                with bl.kernel_report_on_failure(kernel):
                    results[k] = bl.round_robin(configs, reps, warmup=0)
            bl.check_kernel_clean(kernel)
            assert [t for t in kernel.tasks() if t.is_kthread] == [], "kthreads left running"
    labels = {"complete_all": "complete_all() (wait_for_completion, D)",
              "wq": "wake_up_all() (wait_event, D)",
              "wq_excl": "wake_up_all() (wait_event_interruptible_exclusive, S)"}
    rows = []
    notes = [f"{bl.machine_line()}; {reps} runs per configuration (round-robin) of "
             f"{rounds} rounds (+1 warm-up round) each; a run's figure is its median round, "
             "cells are median (min–max) over runs.",
             "`last × complete_all`: paired ratio of the last waiter's time against the "
             "complete_all() row of the same repetition."]
    for k, out in results.items():
        def col(name: str, key: str, runs: dict[str, Any] = out) -> list[float]:
            return bl.column(runs[name], key)

        for name in ("complete_all", "wq", "wq_excl"):
            ratio = bl.paired_ratios(col(name, "last_us"), col("complete_all", "last_us"))
            rows.append([str(k), labels[name], bl.cell(col(name, "call_us"), 1),
                         bl.cell(col(name, "first_us"), 1), bl.cell(col(name, "median_us"), 1),
                         bl.cell(col(name, "last_us"), 1), bl.ratio_cell(ratio)])
        for name in ("wq", "wq_excl"):
            med = statistics.median(bl.paired_ratios(col(name, "last_us"),
                                                     col("complete_all", "last_us")))
            notes.append(f"- target K={k} {name}: last waiter within 1.1× complete_all(): "
                         f"{med:.2f}× → {bl.verdict(med, 1.1)}")
    bl.table("wake_up_all() vs complete_all() to K waiters: time until the waiters run (µs)",
             ["K", "configuration", "waker call µs", "first waiter µs", "median waiter µs",
              "last waiter µs", "last × complete_all"], rows, notes)
    bl.finish("wake_up_all() vs complete_all()", t_start)
    return results


def test_bench_wake_up_all() -> None:
    reps = bl.env_int("EMU_BENCH_REPS", WAKE_ALL_REPS)
    out = bench_wake_up_all(reps=reps)
    assert sorted(out) == sorted(WAKE_ALL_KS)
    assert all(len(runs) == reps for per_k in out.values() for runs in per_k.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=WAKE_ALL_REPS)
    ap.add_argument("--k", default=",".join(map(str, WAKE_ALL_KS)))
    ap.add_argument("--rounds", type=int, default=WAKE_ALL_ROUNDS)
    args = ap.parse_args()
    bench_wake_up_all(args.reps, tuple(int(x) for x in args.k.split(",")), args.rounds)


if __name__ == "__main__":
    main()
