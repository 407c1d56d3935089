"""What a newcomer types works from the root of a source checkout.

``python -m`` puts the current directory first on ``sys.path``, so there the checkout's
``emu/`` (which holds no build products) shadows the installed package: it must still
find emu's compiled part. tools/newcomer checks the same from a fresh clone and venv.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_checkout(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=50)


def test_python_m_emu_from_the_checkout_root() -> None:
    proc = run_in_checkout("-m", "emu", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "torture" in proc.stdout


def test_the_checkout_emu_is_the_one_imported_and_it_boots() -> None:
    code = ("import emu, os; print(os.path.dirname(emu.__file__))\n"
            "with emu.boot(cpus=1) as k:\n"
            "    c = emu.Completion(); emu.complete(c); emu.wait_for_completion(c)\n"
            "print('booted')")
    proc = run_in_checkout("-c", code)
    assert proc.returncode == 0, proc.stderr
    where, booted = proc.stdout.split()
    assert where == os.path.join(ROOT, "emu"), "the test did not exercise the shadowing case"
    assert booted == "booted"
