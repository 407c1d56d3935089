"""Benchmark: queue_work() → work function running, against a completion's one-way time.

    python3 -m pytest -s -p no:cacheprovider stress/test_bench_workqueue.py
    python3 stress/test_bench_workqueue.py [--reps 5] [--iters 2000]

A kthread pinned to emulated CPU 0 stamps CLOCK_MONOTONIC, hands work to the other side
and waits for a completion that the other side posts once it runs. The other side
stamps when it starts; the one-way time is the mean of (start stamp − hand-over stamp).
The sides:

- **queue_work_on()** of a work item onto `system_wq` for CPU 0 (same CPU) or CPU 1
  (across): the work function, in a kworker, stamps;
- **kthread_queue_work()** onto a kthread worker bound to CPU 0 or 1;
- **complete()** to a kthread bound to CPU 0 or 1 sleeping in wait_for_completion():
  the peer. It is the same handshake as the ping-pong of test_bench_completion.py,
  timed the same way as the work items here.

Target (issue #11): queue_work() → running ≤ 2× the completion's one-way time. The tests
assert only sanity (every hand-over ran, nothing is left behind), never a time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import pytest

import emu

import benchlib as bl

pytestmark = pytest.mark.timeout(900)

REPS = 5
ITERS = 2000
HANG_SECS = 20


def _hang() -> int:
    return emu.msecs_to_jiffies(HANG_SECS * 1000)


def _driver(d: tuple[Any, ...]) -> int:
    """Side A: `iters` times stamp, hand over, wait for the other side's answer."""
    kick, back, t0, iters, fin = d
    now = time.perf_counter_ns
    wait = emu.wait_for_completion_timeout
    hang = _hang()
    for _ in range(iters // 10):  # warm-up
        emu.atomic64_set(t0, now())
        kick()
        if not wait(back, hang):
            return -1
    emu.atomic64_set(t0, 0)
    for _ in range(iters):
        emu.atomic64_set(t0, now())
        kick()
        if not wait(back, hang):
            return -1
    emu.complete(fin)
    return 1


def _answer(t0: emu.Atomic64, total: emu.Atomic64, back: emu.Completion) -> None:
    """Side B's part: add (now − hand-over stamp) to `total` (not in warm-up), answer."""
    start = emu.atomic64_read(t0)
    if start:
        emu.atomic64_add(time.perf_counter_ns() - start, total)
    emu.complete(back)


def _make_answer_fn(t0: emu.Atomic64, total: emu.Atomic64,
                    back: emu.Completion) -> Any:
    def fn(work: Any) -> None:
        _answer(t0, total, back)
    return fn


def _waiter(d: tuple[Any, ...]) -> int:
    """The completion peer's side B: wait for the kick, answer, until told to stop."""
    kick, t0, total, back, iters = d
    for _ in range(iters + iters // 10):
        emu.wait_for_completion(kick)
        _answer(t0, total, back)
    return 2


def _run(kind: str, cpu: int, iters: int) -> dict[str, float]:
    back, fin, kick_c = emu.Completion(), emu.Completion(), emu.Completion()
    t0, total = emu.Atomic64(), emu.Atomic64()
    peer = worker = None
    if kind == "queue_work":
        work = emu.Work(_make_answer_fn(t0, total, back))
        wq = emu.system_wq

        def kick() -> None:
            emu.queue_work_on(cpu, wq, work)
    elif kind == "kthread_queue_work":
        worker = emu.kthread_run_worker_on_cpu(cpu, 0, "bench-kw/%u")
        kwork = emu.KthreadWork(_make_answer_fn(t0, total, back))

        def kick() -> None:
            emu.kthread_queue_work(worker, kwork)
    else:
        peer = emu.kthread_run_on_cpu(_waiter, (kick_c, t0, total, back, iters), cpu,
                                      "bench-wait/%u")

        def kick() -> None:
            emu.complete(kick_c)
    a = emu.kthread_run_on_cpu(_driver, (kick, back, t0, iters, fin), 0, "bench-drv/%u")
    if not emu.wait_for_completion_timeout(fin, _hang() * 2):
        raise AssertionError(f"{kind} to CPU {cpu}: the driver did not finish:\n"
                             + bl.hang_report([a] + ([peer] if peer else [])))
    assert emu.kthread_stop(a) == 1
    if peer is not None:
        assert emu.kthread_stop(peer) == 2
    if worker is not None:
        emu.kthread_destroy_worker(worker)
    return {"one_way_us": emu.atomic64_read(total) / iters / 1e3}


def bench_workqueue(reps: int = REPS, iters: int = ITERS) -> dict[str, Any]:
    t_start = bl.banner("queue_work() → work running")
    real = bl.real_cpus()[:2]
    places = {"same": 0, "cross": 1} if len(real) > 1 else {"same": 0}
    kinds = ("queue_work", "kthread_queue_work", "complete")
    configs = []
    for place, cpu in places.items():
        for kind in kinds:
            def run(k: str = kind, c: int = cpu) -> dict[str, float]:
                return _run(k, c, iters)
            configs.append((f"{kind}/{place}", run))
    with bl.nothing_left_behind("workqueue benchmark"):
        with emu.boot(cpus=real, hz=1000) as kernel:
            with bl.kernel_report_on_failure(kernel):
                out = bl.round_robin(configs, reps, warmup=1)
            bl.check_kernel_clean(kernel)
    labels = {"queue_work": "queue_work_on(system_wq) → work function (kworker)",
              "kthread_queue_work": "kthread_queue_work() → work function (kthread worker)",
              "complete": "complete() → wait_for_completion() returns (kthread)"}
    rows = []
    notes = [f"{bl.machine_line()}; {reps} repetitions (+1 warm-up), round-robin, "
             f"median (min–max) of the mean over {iters} hand-overs (after {iters // 10} "
             "warm-up ones). The driver runs on emulated CPU 0.",
             "`× complete`: paired ratio of the one-way µs (this row / the completion's, "
             "same placement)."]
    for place, cpu in places.items():
        base = bl.column(out[f"complete/{place}"], "one_way_us")
        for kind in kinds:
            col = bl.column(out[f"{kind}/{place}"], "one_way_us")
            rows.append([labels[kind], f"CPU 0 → {cpu}", bl.cell(col),
                         bl.ratio_cell(bl.paired_ratios(col, base))])
        r = statistics.median(bl.paired_ratios(bl.column(out[f"queue_work/{place}"],
                                                         "one_way_us"), base))
        notes.append(f"- target queue_work() → running ≤ 2× the completion's one-way time "
                     f"({place} CPU): {r:.2f}× → {bl.verdict(r, 2.0)}")
    bl.table("queue_work() → work function running, against a completion's one-way time",
             ["configuration", "placement", "one-way µs", "× complete"], rows, notes)
    bl.finish("queue_work() → work running", t_start)
    return out


def test_bench_workqueue() -> None:
    reps = bl.env_int("EMU_BENCH_REPS", REPS)
    out = bench_workqueue(reps=reps)
    assert all(len(runs) == reps for runs in out.values())
    assert all(r["one_way_us"] > 0 for runs in out.values() for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=REPS)
    ap.add_argument("--iters", type=int, default=ITERS)
    args = ap.parse_args()
    bench_workqueue(reps=args.reps, iters=args.iters)


if __name__ == "__main__":
    main()
