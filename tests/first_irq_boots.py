"""Boot many kernels in a row; in each, raise an interrupt on CPU 1 right after request_irq().

Run as a script in a fresh interpreter (tests/test_irq.py and stress/ do):

    python tests/first_irq_boots.py BOOTS [--timeout SECONDS] [--keep-going]

Each boot: request_irq() whose handler completes a completion, irq_set_affinity() to
CPU 1, irq_inject_interrupt() at once, then a bounded wait for the handler. The first
request_irq() of a kernel starts the idle tasks, so the interrupt reaches CPU 1 while
its idle task (or whatever runs there) is still starting up. Prints one JSON line:
``{"boots": N, "lost": [boot numbers], "seconds": S}``; stops at the first loss unless
--keep-going.
"""

from __future__ import annotations

import argparse
import json
import time

import emu

IRQ = 5


def handler(irq: int, done: emu.Completion) -> int:
    emu.complete(done)
    return emu.IRQ_HANDLED


def one_boot(timeout: float) -> bool:
    """True if the interrupt was handled within `timeout` seconds."""
    with emu.boot(cpus=2, console_loglevel=0) as kernel:
        done = emu.Completion()
        assert emu.request_irq(IRQ, handler, 0, "first", done) == 0
        assert emu.irq_set_affinity(IRQ, [1]) == 0
        emu.irq_inject_interrupt(IRQ)
        handled = emu.wait_for_completion_timeout(done, int(timeout * kernel.hz)) > 0
        emu.free_irq(IRQ, done)
        return handled


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("boots", type=int)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--keep-going", action="store_true")
    args = parser.parse_args()
    start = time.monotonic()
    lost: list[int] = []
    boots = 0
    for n in range(args.boots):
        boots += 1
        if not one_boot(args.timeout):
            lost.append(n)
            if not args.keep_going:
                break
    print(json.dumps({"boots": boots, "lost": lost,
                      "seconds": round(time.monotonic() - start, 2)}))


if __name__ == "__main__":
    main()
