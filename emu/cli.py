"""Command line: ``python -m emu COMMAND`` (also installed as ``emu``)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from emu import attach, top, tracefile
from emu.kernel import HZ_DEFAULT
from emu.module import run_module
from emu.torture import TYPES, Options, run_torture

DEMO_MODULE = "emu.examples.hello_kthread"
#: How often `emu dmesg -w` looks for new lines.
DMESG_POLL = 0.05


def _demo(args: argparse.Namespace) -> int:
    return run_module(DEMO_MODULE, False, {"period_ms": str(args.period_ms)}, cpus=args.cpus,
                      duration=args.seconds)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    words = list(args.args)
    if args.module is None:
        if not words:
            parser.error("give a module: FILE.py or -m MODULE")
        target, is_file = words.pop(0), True
    else:
        target, is_file = args.module, False
    params: dict[str, str] = {}
    for word in words:
        name, eq, value = word.partition("=")
        if not eq or not name:
            parser.error(f"module parameters are name=value, got {word!r}")
        params[name] = value
    return run_module(target, is_file, params, cpus=args.cpus, hz=args.hz,
                      duration=args.duration, trace=args.trace)


# --- looking at a running kernel from another terminal (attach.py) -------------------------

def _kernel_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", type=_positive(int), default=None, metavar="PID",
                   help="the pid that booted the kernel (default: the only one running)")


def _attach(args: argparse.Namespace) -> attach.Attached:
    return attach.Attached(attach.find_kernel(args.kernel))


def _kernels(args: argparse.Namespace) -> int:
    print(f"{'PID':>7} {'CPUS':>4} {'UPTIME':>9} {'TASKS':>5} COMMAND")
    for ref in attach.find_kernels():
        try:
            with attach.Attached(ref) as k:
                print(f"{k.pid:>7} {k.img.hdr.ncpus:>4} {k.uptime:>8.1f}s "
                      f"{len(k.task_recs()):>5} {k.boot_comm()}")
        except attach.AttachError as exc:  # ended, still booting, or another emu version
            print(f"{ref.pid:>7} {'?':>4} {'?':>9} {'?':>5} ({exc})")
    return 0


def _ps(args: argparse.Namespace) -> int:
    with _attach(args) as k:
        print("\n".join(k.ps()))
    return 0


def _dmesg(args: argparse.Namespace) -> int:
    with _attach(args) as k:
        reader = attach.LogReader(k.img)
        lines = reader.read()
        try:
            while args.follow and k.alive:
                if lines:
                    print("\n".join(lines), flush=True)
                time.sleep(DMESG_POLL)
                lines = reader.poll()
        except KeyboardInterrupt:
            return 130
        lines += reader.flush()
        if lines:
            print("\n".join(lines), flush=True)
    return 0


def _top(args: argparse.Namespace) -> int:
    with _attach(args) as k:
        return top.run(k)


def _cpus(text: str) -> int | list[int]:
    """--cpus: a count ("2") or a list of real CPU ids ("0,1")."""
    try:
        if "," in text:
            return [int(x) for x in text.split(",") if x]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--cpus takes a count or a list like 0,1: {text!r}") from None


def _torture(args: argparse.Namespace) -> int:
    types = TYPES if args.type == "all" else (args.type,)
    opts = Options(types=types, cpus=args.cpus, threads_per_cpu=args.threads_per_cpu,
                   duration=args.duration, irq_rate=args.irq_rate,
                   signal_rate=args.signal_rate, seed=args.seed,
                   stat_interval=args.stat_interval, json_file=args.json,
                   broken=args.inject_bug, trace=args.trace)
    result = run_torture(opts)
    return 0 if result["verdict"] == "SUCCESS" else 1


def _trace_report(args: argparse.Namespace) -> int:
    try:
        print(tracefile.report(args.file))
    except tracefile.TraceError as exc:
        print(f"emu trace report: {exc}", file=sys.stderr)
        return 1
    return 0


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


DESCRIPTION = ("Run Linux-kernel-style concurrent code for real: kthreads are processes "
               "pinned to CPUs, interrupts are signals. Also runs as: python -m emu COMMAND.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emu", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="boot a kernel, load a module (its init runs), stream "
                                     "the kernel log, unload it after --duration or Ctrl-C",
                         usage="emu run [-h] [--cpus N|LIST] [--hz HZ] [--duration SECONDS] "
                               "[--trace FILE] (FILE.py | -m MODULE) [name=value ...]")
    run.add_argument("-m", dest="module", metavar="MODULE", default=None,
                     help="load an importable module (e.g. emu.examples.hello_kthread)")
    run.add_argument("--cpus", type=_cpus, default=None,
                     help="emulated CPUs: a count or a list of real CPU ids (default: all)")
    run.add_argument("--hz", type=_positive(int), default=HZ_DEFAULT, help="HZ (default 250)")
    run.add_argument("--duration", type=_positive(float), default=None, metavar="SECONDS",
                     help="unload after this many seconds (default: at Ctrl-C or SIGTERM)")
    run.add_argument("--trace", default=None, metavar="FILE",
                     help="write a Perfetto trace of the run (open it at ui.perfetto.dev)")
    run.add_argument("args", nargs="*", metavar="FILE.py | name=value",
                     help="the module's file (without -m), then its parameters")
    run.set_defaults(func=lambda a: _run(a, run))

    demo = sub.add_parser("demo", help=f"emu run -m {DEMO_MODULE} for a few seconds")
    demo.add_argument("--seconds", type=_positive(float), default=3.0,
                      help="how long to run (default 3)")
    demo.add_argument("--period-ms", type=_positive(int), default=1000,
                      help="tick period (default 1000)")
    demo.add_argument("--cpus", type=_cpus, default=None, help="emulated CPUs (default: all)")
    demo.set_defaults(func=_demo)

    k = sub.add_parser("kernels", help="list your running kernels: boot pid, CPUs, uptime, "
                                       "tasks")
    k.set_defaults(func=_kernels)
    ps = sub.add_parser("ps", help="the task table of a running kernel (PID CPU S WCHAN "
                                   "COMMAND)")
    _kernel_option(ps)
    ps.set_defaults(func=_ps)
    dm = sub.add_parser("dmesg", help="the kernel log of a running kernel")
    dm.add_argument("-w", "--follow", action="store_true",
                    help="wait for new messages and print them as they are logged")
    _kernel_option(dm)
    dm.set_defaults(func=_dmesg)
    tp = sub.add_parser("top", help="live view of a running kernel: CPUs, tasks, log "
                                    "(q or Ctrl-C quits)")
    _kernel_option(tp)
    tp.set_defaults(func=_top)

    t = sub.add_parser("torture", help="load every CPU with kthreads and interrupts hammering "
                                       "the primitives, check invariants, end with a verdict")
    t.add_argument("--type", choices=[*TYPES, "all"], default="all",
                   help="what to torture (default: all)")
    t.add_argument("--cpus", type=_cpus, default=None,
                   help="emulated CPUs: a count or a list of real CPU ids (default: all)")
    t.add_argument("--threads-per-cpu", type=_positive(int), default=2,
                   help="completion waiters per CPU (default 2)")
    t.add_argument("--duration", type=_positive(float), default=10.0,
                   help="seconds to run (default 10)")
    t.add_argument("--irq-rate", type=float, default=500.0,
                   help="interrupts per second from each emulated device (default 500; 0: none)")
    t.add_argument("--signal-rate", type=float, default=100.0,
                   help="emulated signals per second sent to waiters (default 100)")
    t.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    t.add_argument("--stat-interval", type=_positive(float), default=5.0,
                   help="seconds between statistics lines (default 5)")
    t.add_argument("--json", default=None, metavar="FILE", help="write the statistics as JSON")
    t.add_argument("--trace", default=None, metavar="FILE",
                   help="write a Perfetto trace of the run (open it at ui.perfetto.dev)")
    t.add_argument("--inject-bug", action="store_true", help=argparse.SUPPRESS)
    t.set_defaults(func=_torture)

    tr = sub.add_parser("trace", help="look at a Perfetto trace written by --trace")
    trs = tr.add_subparsers(dest="trace_command", required=True)
    rep = trs.add_parser("report", help="per task run/sleep time and wake-up latency, IRQ "
                                        "handler latency, longest uninterruptible sleeps")
    rep.add_argument("file", metavar="FILE")
    rep.set_defaults(func=_trace_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except attach.AttachError as exc:
        print(f"emu {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
