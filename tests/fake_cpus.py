"""Run emu as if this machine had N CPUs (tests/test_manycore.py runs it in a subprocess).

    python tests/fake_cpus.py N torture [OPTIONS]   # `emu torture OPTIONS`
    python tests/fake_cpus.py N boot                # boot with the default cpus, see below

``os.sched_getaffinity`` reports CPUs 0..N-1 (for a process pinned to one real CPU: the
fake CPUs that run on it), and ``os.sched_setaffinity`` pins fake CPU f onto the
(f mod R)-th real CPU, R being the real CPUs this process may run on. emu sees a machine
with N CPUs and runs on the real ones.

``boot`` boots a kernel with the default cpus, raises an interrupt on its last CPU and
prints one JSON line: ``{"ncpus": ..., "handled_on": CPU the handler saw, "idle_tasks":
...}``.
"""

from __future__ import annotations

import json
import os
import sys

_real = sorted(os.sched_getaffinity(0))
_real_getaffinity = os.sched_getaffinity
_real_setaffinity = os.sched_setaffinity


def fake(n: int) -> None:
    """Make this process (and its forks) see `n` CPUs."""
    def real_of(cpu: int) -> int:
        return _real[cpu % len(_real)]

    def sched_getaffinity(pid: int) -> set[int]:
        real = _real_getaffinity(pid)
        if real >= set(_real):
            return set(range(n))
        return {cpu for cpu in range(n) if real_of(cpu) in real}

    def sched_setaffinity(pid: int, mask: object) -> None:
        cpus = set(mask)  # type: ignore[call-overload]
        if not cpus or not all(0 <= c < n for c in cpus):
            raise OSError(22, "Invalid argument")
        _real_setaffinity(pid, {real_of(c) for c in cpus})

    os.sched_getaffinity = sched_getaffinity
    os.sched_setaffinity = sched_setaffinity


def boot_check() -> dict[str, int]:
    import emu
    from emu.constants import PF_IDLE
    from emu.task import live_tasks

    def handler(irq: int, dev: tuple[emu.Atomic, emu.Completion]) -> int:
        emu.atomic_set(dev[0], emu.current().cpu)
        emu.complete(dev[1])
        return emu.IRQ_HANDLED

    with emu.boot(console_loglevel=0) as kernel:
        cpu, done = dev = (emu.Atomic(-1), emu.Completion())
        assert emu.request_irq(5, handler, 0, "fake", dev) == 0
        assert emu.irq_set_affinity(5, kernel.ncpus - 1) == 0
        emu.irq_inject_interrupt(5)
        assert emu.wait_for_completion_timeout(done, 20 * kernel.hz), "the handler never ran"
        idle = sum(1 for t in live_tasks() if t.flags & PF_IDLE)
        emu.free_irq(5, dev)
        return {"ncpus": kernel.ncpus, "handled_on": emu.atomic_read(cpu), "idle_tasks": idle}


def main() -> int:
    fake(int(sys.argv[1]))
    if sys.argv[2] == "boot":
        print(json.dumps(boot_check()))
        return 0
    from emu import cli

    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
