"""Command line: ``python -m emu COMMAND`` (also installed as ``emu``)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import emu
from emu.examples import hello_kthread
from emu.torture import TYPES, Options, run_torture


def _demo(args: argparse.Namespace) -> int:
    with emu.boot(cpus=args.cpus) as kernel:
        hello_kthread.hello_init(period_ms=args.period_ms)
        deadline = time.monotonic() + args.seconds
        time.sleep(max(0.0, min(args.seconds / 2, args.seconds)))
        print("--- tasks (while running) ---")
        print(kernel.ps())
        time.sleep(max(0.0, deadline - time.monotonic()))
        hello_kthread.hello_exit()
        print("--- kernel log ---")
        print("\n".join(kernel.dmesg()))
        failed = kernel.warnings or kernel.bugs or kernel.oopses
    return 1 if failed else 0


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
                   broken=args.inject_bug)
    result = run_torture(opts)
    return 0 if result["verdict"] == "SUCCESS" else 1


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the classic kthread example module and show "
                                      "the kernel log and the task table")
    demo.add_argument("--seconds", type=float, default=3.0, help="how long to run (default 3)")
    demo.add_argument("--period-ms", type=int, default=1000, help="tick period (default 1000)")
    demo.add_argument("--cpus", type=int, default=None, help="emulated CPUs (default: all)")
    demo.set_defaults(func=_demo)

    t = sub.add_parser("torture", help="load every CPU with kthreads and interrupts hammering "
                                       "the primitives, check invariants, end with a verdict")
    t.add_argument("--type", choices=["completion", "kthread", "irq", "timer", "all"],
                   default="all",
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
    t.add_argument("--inject-bug", action="store_true", help=argparse.SUPPRESS)
    t.set_defaults(func=_torture)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
