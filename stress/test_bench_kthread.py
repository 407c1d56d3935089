"""Benchmarks: kthread creation and idle kthread memory, against raw fork and multiprocessing.

    python3 -m pytest -s -p no:cacheprovider stress/test_bench_kthread.py
    python3 stress/test_bench_kthread.py [--reps 7] [--n 100] [--only creation|memory]

The tests assert only sanity (every thread ran or was stopped, counts match, nothing
left behind), never a time. See stress/README.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import posix_ipc  # noqa: F401  (same parent footprint as shared/bench)
import psutil
import pytest

import emu

import benchlib as bl

pytestmark = pytest.mark.timeout(900)

#: Wait this long for anything the benchmark itself waits on before calling it a hang.
HANG_SECS = 20
N_DEFAULT = 100
N_SPAWN = 10
CREATE_REPS = 5
MEMORY_REPS = 3
MEMORY_PER_REP = 8
MEMORY_SETTLE_S = 0.3

TRIVIAL_RESULT = 1
RAN_RESULT = 2
MiB = bl.MiB


def _hang_jiffies() -> int:
    return emu.msecs_to_jiffies(HANG_SECS * 1000)


# --- threadfns ------------------------------------------------------------------------------

def trivial_threadfn(data: object) -> int:
    return TRIVIAL_RESULT


def ran_threadfn(ran: emu.Completion) -> int:
    emu.complete(ran)
    return RAN_RESULT


def idle_threadfn(data: object) -> int:
    while not emu.kthread_should_stop():
        emu.schedule_timeout_interruptible(emu.MAX_SCHEDULE_TIMEOUT)
    return 0


# --- 1a. creation -----------------------------------------------------------------------------

def _check_results(results: list[int], ran: bool) -> int:
    """Sanity of kthread_stop() results; returns how many stops won the race (-EINTR)."""
    if ran:
        assert results == [RAN_RESULT] * len(results), f"unexpected results {set(results)}"
        return 0
    allowed = {TRIVIAL_RESULT, -emu.EINTR}
    assert set(results) <= allowed, f"unexpected results {set(results) - allowed}"
    return results.count(-emu.EINTR)


def _wait_ran(ran: emu.Completion, count: int, tasks: list[emu.Task]) -> None:
    for i in range(count):
        if not emu.wait_for_completion_timeout(ran, _hang_jiffies()):
            raise AssertionError(f"only {i} of {count} kthreads ran within {HANG_SECS}s:\n"
                                 + bl.hang_report(tasks))


def emu_all(n: int, ran: bool) -> dict[str, float]:
    """kthread_run() n threads, then kthread_stop() them all."""
    done = emu.Completion()
    fn = ran_threadfn if ran else trivial_threadfn
    t0 = time.perf_counter()
    tasks = [emu.kthread_run(fn, done, "bench/%d", i) for i in range(n)]
    t1 = time.perf_counter()
    if ran:
        _wait_ran(done, n, tasks)
    results = [emu.kthread_stop(t) for t in tasks]
    t2 = time.perf_counter()
    eintr = _check_results(results, ran)
    return {"start_ms": (t1 - t0) * 1e3 / n, "total_ms": (t2 - t0) * 1e3 / n, "eintr": eintr}


def emu_loop(n: int, ran: bool) -> dict[str, float]:
    """kthread_run() + kthread_stop() one thread at a time."""
    done = emu.Completion()
    fn = ran_threadfn if ran else trivial_threadfn
    results = []
    t0 = time.perf_counter()
    for i in range(n):
        t = emu.kthread_run(fn, done, "bench/%d", i)
        if ran:
            _wait_ran(done, 1, [t])
        results.append(emu.kthread_stop(t))
    t1 = time.perf_counter()
    eintr = _check_results(results, ran)
    return {"total_ms": (t1 - t0) * 1e3 / n, "eintr": eintr}


def fork_all(n: int, affinity: bool) -> dict[str, float]:
    """os.fork() n children (child: os._exit(0)), then os.waitpid() them all."""
    cpus = bl.real_cpus()
    pids = []
    t0 = time.perf_counter()
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            if affinity:
                os.sched_setaffinity(0, {cpus[i % len(cpus)]})
            bl.trivial(i)
            os._exit(0)
        pids.append(pid)
    t1 = time.perf_counter()
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    t2 = time.perf_counter()
    assert codes == [0] * n, f"children failed: {set(codes)}"
    return {"start_ms": (t1 - t0) * 1e3 / n, "total_ms": (t2 - t0) * 1e3 / n}


def fork_loop(n: int) -> dict[str, float]:
    """os.fork() + os.waitpid() one child at a time."""
    codes = []
    t0 = time.perf_counter()
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            bl.trivial(i)
            os._exit(0)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    t1 = time.perf_counter()
    assert codes == [0] * n, f"children failed: {set(codes)}"
    return {"total_ms": (t1 - t0) * 1e3 / n}


def mp_all(n: int, method: str) -> dict[str, float]:
    """multiprocessing Process(target=trivial).start() n times, then join() them all."""
    ctx = mp.get_context(method)
    t0 = time.perf_counter()
    procs = [ctx.Process(target=bl.trivial, args=(i,)) for i in range(n)]
    for p in procs:
        p.start()
    t1 = time.perf_counter()
    for p in procs:
        p.join()
    t2 = time.perf_counter()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * n, f"{method} children failed: {set(codes)}"
    return {"start_ms": (t1 - t0) * 1e3 / n, "total_ms": (t2 - t0) * 1e3 / n}


def bench_creation(reps: int = CREATE_REPS, n: int = N_DEFAULT,
                   n_spawn: int = N_SPAWN) -> dict[str, list[dict[str, float]]]:
    t_start = bl.banner("kthread creation")

    def spawn() -> dict[str, float]:
        with bl.bare_main_module():
            return mp_all(n_spawn, "spawn")

    configs = [
        ("emu_all", lambda: emu_all(n, ran=False)),
        ("emu_all_ran", lambda: emu_all(n, ran=True)),
        ("emu_loop", lambda: emu_loop(n, ran=False)),
        ("emu_loop_ran", lambda: emu_loop(n, ran=True)),
        ("fork_all", lambda: fork_all(n, affinity=False)),
        ("fork_aff_all", lambda: fork_all(n, affinity=True)),
        ("fork_loop", lambda: fork_loop(n)),
        ("mp_fork_all", lambda: mp_all(n, "fork")),
        ("mp_spawn_all", spawn),
    ]
    with bl.nothing_left_behind("kthread creation benchmark"):
        with emu.boot(max_tasks=n + 16) as kernel:
            with bl.kernel_report_on_failure(kernel):
                res = bl.round_robin(configs, reps, warmup=1)
            bl.check_kernel_clean(kernel)
            assert [t for t in kernel.tasks() if t.is_kthread] == [], "kthreads left running"

    def total(name: str) -> list[float]:
        return bl.column(res[name], "total_ms")

    rows_spec = [
        ("emu kthread_run ×N, then kthread_stop ×N (trivial threadfn)", "emu_all", n,
         "fork_all"),
        ("emu … same, each thread really ran (waits for its completion first)",
         "emu_all_ran", n, "fork_all"),
        ("emu kthread_run + kthread_stop per thread (trivial)", "emu_loop", n, "fork_loop"),
        ("emu kthread_run + wait until it ran + kthread_stop per thread", "emu_loop_ran", n,
         "fork_loop"),
        ("os.fork ×N, then os.waitpid ×N", "fork_all", n, "fork_all"),
        ("os.fork ×N + sched_setaffinity in child, then waitpid ×N", "fork_aff_all", n,
         "fork_all"),
        ("os.fork + os.waitpid per process", "fork_loop", n, "fork_loop"),
        ("multiprocessing fork: start ×N, then join ×N", "mp_fork_all", n, "fork_all"),
        ("multiprocessing spawn: start ×N, then join ×N", "mp_spawn_all", n_spawn, "fork_all"),
    ]
    rows = []
    for label, name, count, peer in rows_spec:
        runs = res[name]
        start = bl.cell(bl.column(runs, "start_ms"), 3) if "start_ms" in runs[0] else "—"
        ratio = bl.ratio_cell(bl.paired_ratios(total(name), total(peer)))
        eintr = (bl.cell(bl.column(runs, "eintr"), 0) + f" of {count}") if "eintr" in runs[0] \
            else "—"
        rows.append([label, str(count), start, bl.cell(total(name), 3), ratio, eintr])
    notes = [f"{bl.machine_line()}; {reps} repetitions (+1 warm-up), round-robin, "
             "median (min–max).",
             "`× os.fork` is the paired ratio of the total ms/proc against the os.fork row "
             "of the same shape (all-then-all or per process).",
             "`stops that won` counts kthread_stop() calls that returned -EINTR because "
             "they came before the thread's first wake-up (kernel semantics).",
             "spawn children import benchlib (posix_ipc + psutil), like shared/bench's "
             "proc_create.py; the spawn row's ratio is against os.fork ×N."]
    for name, peer in (("emu_all", "fork_all"), ("emu_all_ran", "fork_all"),
                       ("emu_loop", "fork_loop"), ("emu_loop_ran", "fork_loop")):
        med = statistics.median(bl.paired_ratios(total(name), total(peer)))
        notes.append(f"- target ≤ 2× os.fork per kthread, {name}: {med:.2f}× → "
                     f"{bl.verdict(med, 2.0)}")
    bl.table("kthread creation: ms per process (start = create+start phase; total = "
             "start+stop/join)",
             ["configuration", "N", "start ms/proc", "total ms/proc", "× os.fork",
              "stops that won (-EINTR)"], rows, notes)
    bl.finish("kthread creation", t_start)
    return res


# --- 1b. memory ---------------------------------------------------------------------------------

def _fork_idle(ready_w: int, block_r: int) -> int:
    """A bare os.fork child: report ready, then block in read() on a pipe."""
    pid = os.fork()
    if pid == 0:
        try:
            os.write(ready_w, b"1")
            os.read(block_r, 1)
        finally:
            os._exit(0)
    return pid


def _mem(pid: int) -> dict[str, float]:
    info = psutil.Process(pid).memory_full_info()
    return {"uss": info.uss / MiB, "rss": info.rss / MiB, "pss": info.pss / MiB}


def memory_round(count: int, kthread_first: bool) -> dict[str, list[dict[str, float]]]:
    ready_r, ready_w = os.pipe()
    block_r, block_w = os.pipe()
    tasks: list[emu.Task] = []
    pids: list[int] = []
    try:
        for i in range(count):
            for kind in (("k", "f") if kthread_first else ("f", "k")):
                if kind == "k":
                    tasks.append(emu.kthread_run(idle_threadfn, None, "idle/%d", i))
                else:
                    pids.append(_fork_idle(ready_w, block_r))
        got = b""
        while len(got) < count:
            got += os.read(ready_r, count - len(got))
        bl.wait_until(lambda: all(emu.task_state_to_char(t) == "S" for t in tasks), HANG_SECS,
                      "the idle kthreads to sleep in S", report=lambda: bl.hang_report(tasks))
        time.sleep(MEMORY_SETTLE_S)  # let every child settle into its idle state
        out = {"kthread": [_mem(t.pid) for t in tasks], "fork": [_mem(p) for p in pids]}
    finally:
        results = [emu.kthread_stop(t) for t in tasks]
        os.write(block_w, b"x" * len(pids))
        codes = [bl.wait_pid(p, HANG_SECS) for p in pids]
        for fd in (ready_r, ready_w, block_r, block_w):
            os.close(fd)
    assert results == [0] * count, f"idle kthreads returned {results}"
    assert codes == [0] * count, f"idle fork children exited with {codes}"
    return out


def bench_memory(reps: int = MEMORY_REPS, count: int = MEMORY_PER_REP) -> dict[str, list]:
    t_start = bl.banner("idle kthread memory")
    samples: dict[str, list[dict[str, float]]] = {"kthread": [], "fork": []}
    per_rep_ratio = []
    with bl.nothing_left_behind("memory benchmark"):
        with emu.boot(max_tasks=count + 16) as kernel:
            for rep in range(reps):
                with bl.kernel_report_on_failure(kernel):
                    out = memory_round(count, kthread_first=rep % 2 == 0)
                for k, v in out.items():
                    samples[k].extend(v)
                per_rep_ratio.append(statistics.median(m["uss"] for m in out["kthread"])
                                     / statistics.median(m["uss"] for m in out["fork"]))
                print(f"  [rep {rep + 1}/{reps}]", file=sys.stderr, flush=True)
            bl.check_kernel_clean(kernel)
            assert [t for t in kernel.tasks() if t.is_kthread] == [], "kthreads left running"
    rows = []
    for label, key in (("emu idle kthread (schedule_timeout_interruptible loop)", "kthread"),
                       ("bare os.fork child blocked in os.read(pipe)", "fork")):
        s = samples[key]
        ratio = bl.ratio_cell(per_rep_ratio) if key == "kthread" else "—"
        rows.append([label, str(len(s)), bl.cell([m["uss"] for m in s]),
                     bl.cell([m["rss"] for m in s]), bl.cell([m["pss"] for m in s]), ratio])
    med_uss = statistics.median(m["uss"] for m in samples["kthread"])
    extra = med_uss - statistics.median(m["uss"] for m in samples["fork"])
    notes = [f"{bl.machine_line()}; {reps} rounds of {count} kthreads + {count} forks, created "
             "interleaved from the same parent (emu, psutil, posix_ipc imported), measured "
             f"after {MEMORY_SETTLE_S}s idle; median (min–max) over all samples.",
             "`× fork` is the per-round ratio of the median USS.",
             f"- target ≤ 2 MiB USS per idle kthread: {med_uss:.2f} MiB → "
             f"{bl.verdict(med_uss, 2.0)} (emu's own share over a bare fork: {extra:+.2f} MiB)"]
    bl.table("idle kthread memory (MiB, psutil memory_full_info)",
             ["process", "samples", "USS MiB", "RSS MiB", "PSS MiB", "× fork (USS)"], rows, notes)
    bl.finish("idle kthread memory", t_start)
    return {"samples": samples, "ratio": per_rep_ratio}


# --- pytest entry points ------------------------------------------------------------------------

def test_bench_kthread_creation() -> None:
    n = bl.env_int("EMU_BENCH_N", N_DEFAULT)
    reps = bl.env_int("EMU_BENCH_REPS", CREATE_REPS)
    res = bench_creation(reps=reps, n=n)
    assert all(len(runs) == reps for runs in res.values())


def test_bench_kthread_memory() -> None:
    reps = bl.env_int("EMU_BENCH_REPS", MEMORY_REPS)
    out = bench_memory(reps=reps)
    assert len(out["samples"]["kthread"]) == reps * MEMORY_PER_REP
    assert len(out["samples"]["fork"]) == reps * MEMORY_PER_REP


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default per benchmark)")
    ap.add_argument("--n", type=int, default=N_DEFAULT, help="kthreads per creation run")
    ap.add_argument("--only", choices=["creation", "memory"])
    args = ap.parse_args()
    if args.only in (None, "creation"):
        bench_creation(reps=args.reps or CREATE_REPS, n=args.n)
    if args.only in (None, "memory"):
        bench_memory(reps=args.reps or MEMORY_REPS)


if __name__ == "__main__":
    main()
