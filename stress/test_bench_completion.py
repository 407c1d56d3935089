"""Benchmarks: completion ping-pong and complete_all() fan-out, against raw posix_ipc and mp.Event.

    python3 -m pytest -s -p no:cacheprovider stress/test_bench_completion.py
    python3 stress/test_bench_completion.py [--reps 7] [--only pingpong|wake_all] [--k 1,4,16,64]

The tests assert only sanity (every handshake happened, counts match, nothing left
behind), never a time. See stress/README.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

import emu

import benchlib as bl

pytestmark = pytest.mark.timeout(900)

HANG_SECS = 20
PINGPONG_REPS = 7
WAKE_ALL_REPS = 5
WAKE_ALL_ROUNDS = 20
WAKE_ALL_KS = (1, 4, 16, 64)
#: Pause after every waiter is known to be asleep, so all really are (as shared/bench).
SETTLE_S = 0.005

#: Round trips per measured run (a tenth more as warm-up), chosen for ≈ 0.3 s each.
PINGPONG_ITERS = {
    ("emu", "same"): 20000, ("emu", "cross"): 10000,
    ("posix_ipc", "same"): 50000, ("posix_ipc", "cross"): 10000,
    ("mp_event", "same"): 20000, ("mp_event", "cross"): 3000,
}

_fork = mp.get_context("fork")


def _hang_jiffies() -> int:
    return emu.msecs_to_jiffies(HANG_SECS * 1000)


def _wait_emu(c: emu.Completion, count: int, what: str, tasks: list[emu.Task],
              hang: int = 0) -> None:
    """Consume `count` completions of `c`, each within `hang` jiffies (default HANG_SECS).

    Inside a timed region, pass `hang` and a constant `what`: then the waker runs nothing
    but the waits after complete_all(), as the posix_ipc waker runs nothing but acquire().
    """
    hang = hang or _hang_jiffies()
    wait = emu.wait_for_completion_timeout
    for i in range(count):
        if not wait(c, hang):
            raise AssertionError(f"{what}: only {i} of {count} completions within "
                                 f"{HANG_SECS}s:\n" + bl.hang_report(tasks))


# --- 2a. ping-pong --------------------------------------------------------------------------------

def pp_emu_a(d: tuple[Any, ...]) -> int:
    """Side A: complete(c1), wait_for_completion(c2); times `iters` round trips itself."""
    c1, c2, warm, iters, res, fin = d
    complete, wait = emu.complete, emu.wait_for_completion
    for _ in range(warm):
        complete(c1)
        wait(c2)
    t0 = time.perf_counter()
    for _ in range(iters):
        complete(c1)
        wait(c2)
    res[0] = time.perf_counter() - t0
    complete(fin)
    return 1


def pp_emu_b(d: tuple[Any, ...]) -> int:
    """Side B: wait_for_completion(c1), complete(c2)."""
    c1, c2, warm, iters, res, fin = d
    complete, wait = emu.complete, emu.wait_for_completion
    for _ in range(warm + iters):
        wait(c1)
        complete(c2)
    complete(fin)
    return 2


def pingpong_emu(cpus: tuple[int, int], iters: int, res: Any) -> dict[str, float]:
    """Two kthreads on emulated CPUs `cpus` bounce a token through two completions."""
    c1, c2, fin = emu.Completion(), emu.Completion(), emu.Completion()
    res[0] = -1.0
    d = (c1, c2, iters // 10, iters, res, fin)
    b = emu.kthread_run_on_cpu(pp_emu_b, d, cpus[1], "ppB/%u")
    a = emu.kthread_run_on_cpu(pp_emu_a, d, cpus[0], "ppA/%u")
    _wait_emu(fin, 2, "emu ping-pong", [a, b])  # on a hang, kernel shutdown kills the threads
    results = (emu.kthread_stop(a), emu.kthread_stop(b))
    assert results == (1, 2), f"ping-pong kthreads returned {results}"
    assert c1.done == 0 and c2.done == 0, "unconsumed completions left"
    return _pp_figures(iters, res[0])


def _pp_figures(iters: int, secs: float) -> dict[str, float]:
    assert secs > 0, "side A did not report its time"
    return {"rtps": iters / secs, "one_way_us": secs / iters / 2 * 1e6}


def _run_pair(side_a: Callable[[], None], side_b: Callable[[], None],
              real: tuple[int, int], warm: int, iters: int, res: Any) -> dict[str, float]:
    """Fork two peer processes pinned to real CPUs; A times `iters` round trips."""
    res[0] = -1.0
    pid_b = os.fork()
    if pid_b == 0:
        code = 1
        try:
            bl.pin(real[1])
            for _ in range(warm + iters):
                side_b()
            code = 0
        finally:
            os._exit(code)
    pid_a = os.fork()
    if pid_a == 0:
        code = 1
        try:
            bl.pin(real[0])
            for _ in range(warm):
                side_a()
            t0 = time.perf_counter()
            for _ in range(iters):
                side_a()
            res[0] = time.perf_counter() - t0
            code = 0
        finally:
            os._exit(code)
    codes = (bl.wait_pid(pid_a, HANG_SECS), bl.wait_pid(pid_b, HANG_SECS))
    assert codes == (0, 0), f"peer ping-pong children exited with {codes}"
    return _pp_figures(iters, res[0])


def pingpong_posix_ipc(real: tuple[int, int], iters: int, res: Any) -> dict[str, float]:
    """Raw posix_ipc.Semaphore ping-pong (shared/bench/py/pingpong.py), both sides forked."""
    with bl.SemSet() as sems:
        ping, pong = sems.new(), sems.new()
        ping_rel, ping_acq, pong_rel, pong_acq = ping.release, ping.acquire, pong.release, \
            pong.acquire

        def a() -> None:
            ping_rel()
            pong_acq()

        def b() -> None:
            ping_acq()
            pong_rel()

        return _run_pair(a, b, real, iters // 10, iters, res)


def pingpong_mp_event(real: tuple[int, int], iters: int, res: Any) -> dict[str, float]:
    """multiprocessing.Event ping-pong (set / wait / clear), both sides forked."""
    ping, pong = _fork.Event(), _fork.Event()

    def a() -> None:
        ping.set()
        pong.wait()
        pong.clear()

    def b() -> None:
        ping.wait()
        ping.clear()
        pong.set()

    return _run_pair(a, b, real, iters // 10, iters, res)


def bench_pingpong(reps: int = PINGPONG_REPS,
                   iters: dict[tuple[str, str], int] | None = None) -> dict[str, Any]:
    t_start = bl.banner("completion ping-pong")
    iters = dict(PINGPONG_ITERS, **(iters or {}))
    real = bl.real_cpus()[:2]
    placements = {"same": (0, 0)}
    if len(real) > 1:
        placements["cross"] = (0, 1)
    res = _fork.Array("d", 1, lock=False)  # shared with every forked side, before any fork
    configs = []
    for place, emu_cpus in placements.items():
        real_cpus = (real[emu_cpus[0]], real[emu_cpus[1]])

        def run_emu(c: tuple[int, int] = emu_cpus, n: int = iters[("emu", place)]) -> Any:
            return pingpong_emu(c, n, res)

        def run_sem(c: tuple[int, int] = real_cpus, n: int = iters[("posix_ipc", place)]) -> Any:
            return pingpong_posix_ipc(c, n, res)

        def run_ev(c: tuple[int, int] = real_cpus, n: int = iters[("mp_event", place)]) -> Any:
            return pingpong_mp_event(c, n, res)

        configs += [(f"emu/{place}", run_emu), (f"posix_ipc/{place}", run_sem),
                    (f"mp_event/{place}", run_ev)]
    with bl.nothing_left_behind("ping-pong benchmark"):
        with emu.boot(cpus=real, max_tasks=16) as kernel:
            with bl.kernel_report_on_failure(kernel):
                out = bl.round_robin(configs, reps, warmup=1)
            bl.check_kernel_clean(kernel)
            assert [t for t in kernel.tasks() if t.is_kthread] == [], "kthreads left running"

    def one_way(name: str) -> list[float]:
        return bl.column(out[name], "one_way_us")

    labels = {"emu": "emu complete / wait_for_completion (kthreads)",
              "posix_ipc": "posix_ipc.Semaphore (forked, pinned)",
              "mp_event": "multiprocessing.Event set/wait/clear (forked, pinned)"}
    rows = []
    notes = [f"{bl.machine_line()}; {reps} repetitions (+1 warm-up), round-robin, "
             "median (min–max). Timed inside side A (time.perf_counter around N round "
             "trips, after N/10 warm-up round trips).",
             "`× posix_ipc` / `× mp.Event`: paired ratio of the one-way µs (emu / peer); "
             "below 1 means emu is faster."]
    for place, emu_cpus in placements.items():
        real_cpus = (real[emu_cpus[0]], real[emu_cpus[1]])
        for impl in ("emu", "posix_ipc", "mp_event"):
            name = f"{impl}/{place}"
            vs_sem = bl.paired_ratios(one_way(name), one_way(f"posix_ipc/{place}"))
            vs_ev = bl.paired_ratios(one_way(name), one_way(f"mp_event/{place}"))
            where = (f"CPU {emu_cpus[0]} / {emu_cpus[1]} (real {real_cpus[0]} / "
                     f"{real_cpus[1]})")
            rows.append([labels[impl], where, str(iters[(impl, place)]),
                         bl.cell(bl.column(out[name], "rtps"), 0), bl.cell(one_way(name)),
                         bl.ratio_cell(vs_sem), bl.ratio_cell(vs_ev)])
        r_sem = statistics.median(bl.paired_ratios(one_way(f"emu/{place}"),
                                                   one_way(f"posix_ipc/{place}")))
        r_ev = statistics.median(bl.paired_ratios(one_way(f"emu/{place}"),
                                                  one_way(f"mp_event/{place}")))
        if place == "same":
            notes.append(f"- target emu ≤ 2× posix_ipc on the same CPU: {r_sem:.2f}× → "
                         f"{bl.verdict(r_sem, 2.0)}")
        else:
            notes.append(f"- across CPUs (no target; bimodal on this VM): emu {r_sem:.2f}× "
                         "posix_ipc")
        notes.append(f"- target emu faster than mp.Event ({place} CPU): {r_ev:.2f}× → "
                     f"{bl.verdict(r_ev, 1.0)}")
    bl.table("completion ping-pong: two tasks hand a token back and forth",
             ["configuration", "placement", "round trips", "round trips/s", "one-way µs",
              "× posix_ipc", "× mp.Event"], rows, notes)
    bl.finish("completion ping-pong", t_start)
    return out


# --- 2b. complete_all() to K waiters --------------------------------------------------------------

def wa_emu_waiter(d: tuple[Any, ...]) -> int:
    """Round r: wait on comps[r % 2], stamp CLOCK_MONOTONIC, report through `woke`."""
    idx, comps, woke, rounds, stamps = d
    now = time.perf_counter_ns
    for r in range(rounds):
        emu.wait_for_completion(comps[r % 2])
        stamps[idx] = now()
        emu.complete(woke)
    return rounds


def _round_figures(t0: int, t1: int, stamps: Any, k: int) -> dict[str, float]:
    wakes = sorted(stamps[i] - t0 for i in range(k))
    return {"call_us": (t1 - t0) / 1e3, "first_us": wakes[0] / 1e3,
            "median_us": statistics.median(wakes) / 1e3, "last_us": wakes[-1] / 1e3}


def _median_rounds(per_round: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in per_round) for key in per_round[0]}


def wake_all_emu(k: int, rounds: int, stamps: Any, placement: dict[int, list[int]],
                 cpu_map: list[int]) -> dict[str, float]:
    """K kthreads (emulator's round-robin placement) woken by complete_all() each round.

    Two completions alternate, so the one of round r is reinit_completion()ed (after
    all K waiters left it) before any waiter can reach it again in round r + 2. The real
    CPUs the waiters got are left in placement[k] for the same-placement peer.
    """
    comps = [emu.Completion(), emu.Completion()]
    woke = emu.Completion()
    total = rounds + 1  # round 0 is a warm-up
    tasks = [emu.kthread_run(wa_emu_waiter, (i, comps, woke, total, stamps), "wa/%d", i)
             for i in range(k)]
    placement[k] = [cpu_map[t.cpu] for t in tasks]
    hang = _hang_jiffies()
    per_round = []
    # On a failure the waiters are left to kernel shutdown (kthread_stop() would wait
    # for a waiter that can never leave wait_for_completion()).
    for r in range(total):
        c = comps[r % 2]
        bl.wait_until(lambda: all(emu.task_state_to_char(t) == "D" for t in tasks),
                      HANG_SECS, f"all {k} waiters to sleep in D (round {r})",
                      report=lambda: bl.hang_report(tasks))
        time.sleep(SETTLE_S)
        for i in range(k):
            stamps[i] = 0
        t0 = time.perf_counter_ns()
        emu.complete_all(c)
        t1 = time.perf_counter_ns()
        _wait_emu(woke, k, "complete_all", tasks, hang)
        emu.reinit_completion(c)
        assert all(stamps[i] > t0 for i in range(k)), "a waiter did not stamp its wake-up"
        if r:
            per_round.append(_round_figures(t0, t1, stamps, k))
    results = [emu.kthread_stop(t) for t in tasks]
    assert results == [total] * k, f"waiters returned {set(results)}"
    return _median_rounds(per_round)


def wake_all_posix_ipc(k: int, rounds: int, stamps: Any,
                       pins: list[int] | None) -> dict[str, float]:
    """shared/bench/py/wake_all.py: one process posts K per-waiter posix_ipc semaphores.

    Waiter i is pinned to real CPU pins[i], or unpinned when `pins` is None.
    """
    total = rounds + 1
    per_round = []
    pids: list[int] = []
    with bl.SemSet() as sems:
        mine = [sems.new() for _ in range(k)]
        ready, done = sems.new(), sems.new()
        try:
            for i in range(k):
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        if pins is not None:
                            bl.pin(pins[i])
                        acquire, now = mine[i].acquire, time.perf_counter_ns
                        for _ in range(total):
                            ready.release()
                            acquire()
                            stamps[i] = now()
                            done.release()
                        code = 0
                    finally:
                        os._exit(code)
                pids.append(pid)
            posts = [s.release for s in mine]
            for r in range(total):
                for _ in range(k):
                    ready.acquire(HANG_SECS)
                time.sleep(SETTLE_S)
                for i in range(k):
                    stamps[i] = 0
                t0 = time.perf_counter_ns()
                for post in posts:
                    post()
                t1 = time.perf_counter_ns()
                for _ in range(k):
                    done.acquire(HANG_SECS)
                assert all(stamps[i] > t0 for i in range(k)), "a waiter did not stamp"
                if r:
                    per_round.append(_round_figures(t0, t1, stamps, k))
        except BaseException:
            for pid in pids:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            raise
        codes = [bl.wait_pid(pid, HANG_SECS) for pid in pids]
    assert codes == [0] * k, f"posix_ipc waiters exited with {set(codes)}"
    return _median_rounds(per_round)


def bench_wake_all(reps: int = WAKE_ALL_REPS, ks: tuple[int, ...] = WAKE_ALL_KS,
                   rounds: int = WAKE_ALL_ROUNDS) -> dict[int, Any]:
    t_start = bl.banner("complete_all() to K waiters")
    stamps = _fork.Array("q", max(ks), lock=False)
    results: dict[int, Any] = {}
    placement: dict[int, list[int]] = {}
    cpus = bl.real_cpus()

    def same_pins(k: int) -> list[int]:
        return placement.get(k) or [cpus[i % len(cpus)] for i in range(k)]

    with bl.nothing_left_behind("wake-all benchmark"):
        with emu.boot(max_tasks=max(ks) + 8) as kernel:
            cpu_map = kernel.cpu_map
            for k in ks:
                print(f"  K={k}", file=sys.stderr, flush=True)
                configs = [
                    ("emu", lambda k=k: wake_all_emu(k, rounds, stamps, placement, cpu_map)),
                    ("posix_ipc", lambda k=k: wake_all_posix_ipc(k, rounds, stamps, None)),
                    ("posix_ipc_rr",
                     lambda k=k: wake_all_posix_ipc(k, rounds, stamps, same_pins(k))),
                ]
                with bl.kernel_report_on_failure(kernel):
                    results[k] = bl.round_robin(configs, reps, warmup=0)
            bl.check_kernel_clean(kernel)
            assert [t for t in kernel.tasks() if t.is_kthread] == [], "kthreads left running"
    labels = {"emu": "emu complete_all (kthreads, round-robin CPUs)",
              "posix_ipc": "posix_ipc post ×K (waiters unpinned)",
              "posix_ipc_rr": "posix_ipc post ×K (waiters pinned like emu's)"}
    rows = []
    notes = [f"{bl.machine_line()}; {reps} runs per configuration (round-robin) of "
             f"{rounds} rounds (+1 warm-up round) each; a run's figure is its median round, "
             "cells are median (min–max) over runs.",
             "Times are µs from the waker's CLOCK_MONOTONIC stamp just before complete_all() "
             "(or the first post) to each waiter's stamp after it woke; `waker call` is the "
             "complete_all() call (or the post loop) itself.",
             "`last × posix_ipc`: paired ratio of the last waiter's time against the "
             "unpinned posix_ipc row (shared/bench's wake_all.py)."]
    for k, out in results.items():
        def col(name: str, key: str, runs: dict[str, Any] = out) -> list[float]:
            return bl.column(runs[name], key)

        for name in ("emu", "posix_ipc", "posix_ipc_rr"):
            ratio = bl.paired_ratios(col(name, "last_us"), col("posix_ipc", "last_us"))
            rows.append([str(k), labels[name], bl.cell(col(name, "call_us"), 1),
                         bl.cell(col(name, "first_us"), 1), bl.cell(col(name, "median_us"), 1),
                         bl.cell(col(name, "last_us"), 1), bl.ratio_cell(ratio)])
        med = statistics.median(bl.paired_ratios(col("emu", "last_us"),
                                                 col("posix_ipc", "last_us")))
        med_rr = statistics.median(bl.paired_ratios(col("emu", "last_us"),
                                                    col("posix_ipc_rr", "last_us")))
        notes.append(f"- target K={k}: last waiter within 1.5× posix_ipc: {med:.2f}× → "
                     f"{bl.verdict(med, 1.5)} (vs the same placement: {med_rr:.2f}×)")
    bl.table("complete_all() to K waiters: time until the waiters run (µs)",
             ["K", "configuration", "waker call µs", "first waiter µs", "median waiter µs",
              "last waiter µs", "last × posix_ipc"], rows, notes)
    bl.finish("complete_all() to K waiters", t_start)
    return results


# --- pytest entry points ------------------------------------------------------------------------

def test_bench_completion_pingpong() -> None:
    reps = bl.env_int("EMU_BENCH_REPS", PINGPONG_REPS)
    out = bench_pingpong(reps=reps)
    assert all(len(runs) == reps for runs in out.values())
    assert all(r["rtps"] > 0 for runs in out.values() for r in runs)


def test_bench_complete_all() -> None:
    reps = bl.env_int("EMU_BENCH_REPS", WAKE_ALL_REPS)
    out = bench_wake_all(reps=reps)
    assert sorted(out) == sorted(WAKE_ALL_KS)
    assert all(len(runs) == reps for per_k in out.values() for runs in per_k.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default per benchmark)")
    ap.add_argument("--only", choices=["pingpong", "wake_all"])
    ap.add_argument("--k", default=",".join(map(str, WAKE_ALL_KS)),
                    help="waiter counts for wake_all, comma-separated")
    ap.add_argument("--rounds", type=int, default=WAKE_ALL_ROUNDS)
    args = ap.parse_args()
    if args.only in (None, "pingpong"):
        bench_pingpong(reps=args.reps or PINGPONG_REPS)
    if args.only in (None, "wake_all"):
        ks = tuple(int(x) for x in args.k.split(","))
        bench_wake_all(reps=args.reps or WAKE_ALL_REPS, ks=ks, rounds=args.rounds)


if __name__ == "__main__":
    main()
