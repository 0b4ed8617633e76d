"""The device-client benchmark runs end to end on a tiny count. Only that it works and reports
is checked here: its figures are measured by running it (docs/performance.md, "The device
client"), never asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "client.py"


def test_client_bench_runs_and_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--devices", "3", "--rounds", "1", "--hold", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    out = result.stdout
    assert "CPU/reg µs" in out and "x lean" in out and "import cost" in out
    rows = [line.split()[:2] for line in out.splitlines() if line.startswith(("https ", "mqtt ", "amqp "))]
    assert rows == [[t, c] for t in ("https", "mqtt", "amqp") for c in ("lean", "async", "sync")]
