"""The kill matrix: SIGKILL one process of a torture run at a random moment, for every
kind of process, and check that the run ends (no hang), the way that kind implies, and
leaves no process and no /dev/shm entry behind. Prints the table
kind x moment -> outcome, time to end, leftovers.

`EMU_KILL_SEEDS` (default 4) runs per cell, `EMU_KILL_SECS` (default 3) each run's
length. A cell's moments are drawn at random (seeded) within its phase of the run:
start-up, the first and second half of the torture loop, and its end (the checks at
rest and the shutdown). Runs as a script too: ``python3 stress/test_kill_matrix.py``.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import benchlib  # makes emu importable from a source checkout

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from killing import KINDS, Outcome, expected, kill_run  # noqa: E402

SEEDS = int(os.environ.get("EMU_KILL_SEEDS", "4"))
SECS = float(os.environ.get("EMU_KILL_SECS", "3"))
#: Phases of a run, as (name, first, last) seconds into the torture loop (None: as soon
#: as a process of the kind exists, in the start-up); "end" is the checks at rest, the
#: stopping of every task and the shutdown.
PHASES = (("start-up", None, None), ("early", 0.0, SECS / 2), ("late", SECS / 2, SECS),
          ("end", SECS, SECS + 0.5))
pytestmark = pytest.mark.timeout(SEEDS * 4 * (SECS + 70) + 60)

_rows: list[tuple[str, str, list[Outcome]]] = []


def run_cell(kind: str, phase: str) -> list[Outcome]:
    _, first, last = next(p for p in PHASES if p[0] == phase)
    outcomes = []
    for seed in range(1, SEEDS + 1):
        rng = random.Random(f"{kind}/{phase}/{seed}")
        moment = None if first is None or last is None else rng.uniform(first, last)
        outcomes.append(kill_run(kind, moment, seed=seed, duration=SECS))
    return outcomes


def table(rows: list[tuple[str, str, list[Outcome]]]) -> str:
    lines = [f"kill matrix: {SEEDS} run(s) per cell, {SECS:g} s torture each",
             "| process killed | moment | outcome | time to end (s) | leftovers |",
             "|---|---|---|---|---|"]
    for kind, phase, outs in rows:
        verdicts: dict[str, int] = {}
        for o in outs:
            key = _summary(o)
            verdicts[key] = verdicts.get(key, 0) + 1
        ends = [o.seconds_to_end for o in outs if not o.hung]
        span = f"{min(ends):.2f}-{max(ends):.2f}" if ends else "-"
        left = sum(len(o.leftovers) + len(o.shm) for o in outs)
        outcome = ", ".join(f"{n}x {k}" for k, n in sorted(verdicts.items()))
        lines.append(f"| {kind} | {phase} | {outcome} | {span} | {left} |")
    return "\n".join(lines)


def _summary(o: Outcome) -> str:
    problem = expected(o)
    if problem:
        return f"WRONG ({problem})"
    if not o.victim:
        return f"missed: {o.missed}"
    if o.status == 0:
        return "SUCCESS: killed as the run stopped its tasks"
    if o.kind == "booting":
        return "killed, all tasks gone"
    text = "\n".join(o.problems)
    if "kernel died: the kernel panicked: " in text:
        return "FAILURE: panic: " + text.split("kernel panicked: ", 1)[1].split("\n")[0]
    if "kernel died:" in text:
        return "FAILURE: kernel died"
    return "FAILURE: Oops"


@pytest.fixture(scope="module", autouse=True)
def print_table() -> Iterator[None]:
    yield
    if _rows:
        text = table(_rows)
        benchlib.REPORTS.append(text)
        print("\n" + text)


@pytest.mark.parametrize("phase", [p[0] for p in PHASES])
@pytest.mark.parametrize("kind", KINDS)
def test_kill_matrix(kind: str, phase: str) -> None:
    outs = run_cell(kind, phase)
    _rows.append((kind, phase, outs))
    for o in outs:
        if expected(o):
            print(f"\n--- {kind} {phase}: killed {o.victim} at {o.moment:.2f} s: "
                  f"{expected(o)}\n{o.output}")
    wrong = [(o.victim, o.moment, expected(o), o.output[-2000:]) for o in outs if expected(o)]
    assert not wrong, wrong


if __name__ == "__main__":
    rows = [(k, p[0], run_cell(k, p[0])) for k in KINDS for p in PHASES]
    print(table(rows))
