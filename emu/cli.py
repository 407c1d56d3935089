"""Command line: ``python -m emu COMMAND`` (also installed as ``emu``)."""

from __future__ import annotations

import argparse
import sys
import time

import emu


def _demo(args: argparse.Namespace) -> int:
    from emu.examples import hello_kthread

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the classic kthread example module and show "
                                      "the kernel log and the task table")
    demo.add_argument("--seconds", type=float, default=3.0, help="how long to run (default 3)")
    demo.add_argument("--period-ms", type=int, default=1000, help="tick period (default 1000)")
    demo.add_argument("--cpus", type=int, default=None, help="emulated CPUs (default: all)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
