"""python -m emu torture: a short run of every type succeeds; a broken completion fails."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from emu.torture import Options, boot_capacities, run_torture


def test_short_torture_of_every_type_succeeds(tmp_path):
    out = io.StringIO()
    report = tmp_path / "t.json"
    result = run_torture(Options(duration=3, stat_interval=1, irq_rate=300, signal_rate=50,
                                 json_file=str(report)), out)
    text = out.getvalue()
    assert result["verdict"] == "SUCCESS", text + "\n".join(result.get("log_tail", []))
    assert text.rstrip().endswith("End of test: SUCCESS")
    for kind in ("completion", "kthread", "irq"):
        assert f"{kind}-torture: t=" in text
        assert result["types"][kind]["ops"] > 0
        assert len(result["types"][kind]["per_cpu"]) == result["cpus"]
    assert result["baseline_posix_ipc_ops_per_s"] > 0
    assert json.loads(report.read_text())["verdict"] == "SUCCESS"


def test_the_run_sizes_its_kernel_for_64_cpus():
    """64 CPUs need more than the default 256 task slots and 32 IRQ lines."""
    opts = Options(cpus=64, duration=1, stat_interval=1, irq_rate=100, signal_rate=20)
    capacities = boot_capacities(opts)
    assert capacities["max_tasks"] > 64 * (opts.threads_per_cpu + 6)
    out = io.StringIO()
    result = run_torture(opts, out)
    assert result["verdict"] == "SUCCESS", out.getvalue() + "\n".join(result.get("log_tail", []))
    assert result["cpus"] == 64
    assert all(result["types"][kind]["ops"] > 0 for kind in ("completion", "kthread", "irq"))


def test_a_broken_completion_is_caught():
    out = io.StringIO()
    result = run_torture(Options(types=("completion",), duration=3, stat_interval=1,
                                 irq_rate=0, broken=True), out)
    assert result["verdict"] == "FAILURE"
    assert any("conservation" in p or "lost wake-up" in p for p in result["problems"])
    assert out.getvalue().rstrip().endswith("End of test: FAILURE")


def test_cli_exit_status_and_bad_arguments(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "emu", "torture", "--type", "kthread",
                         "--duration", "1", "--stat-interval", "1", "--cpus", "1"],
                        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "End of test: SUCCESS" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "emu", "torture", "--duration", "-1"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert bad.returncode == 2 and "--duration" in bad.stderr


def test_ctrl_c_ends_the_run_early_with_the_summary_and_a_clean_shutdown(tmp_path):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "emu", "torture", "--duration", "60",
                             "--stat-interval", "0.5", "--type", "completion"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, start_new_session=True)
    try:
        first = proc.stdout.readline()  # the first statistics line: the run is going
        assert "completion-torture: t=" in first, first + proc.stderr.read()
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert time.monotonic() - start < 30
    assert "interrupted" in out and "--- torture summary" in out
    assert "End of test: " in out, out + err
    # Every task of that kernel lived in the command's session: none may survive it.
    deadline = time.monotonic() + 2
    while (left := _session_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []


def _session_members(sid):
    import os

    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    members.append(int(entry))
            except OSError:
                pass
    return members
