"""The enrollment benchmark runs end to end on a tiny count. Only that it works and reports is
checked here: its figures are measured by running it (docs/performance.md), never asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "enrollments.py"


def test_enrollment_bench_runs_and_prints_its_table(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--count",
            "300",
            "--lookups",
            "20",
            "--pages",
            "5",
            "--backends",
            "sqlite",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    out = result.stdout
    for header in (
        "== sqlite ==",
        "== results ==",
        "metric",
        "enrollments created",
        "create rate (enrollments/s)",
        "database size (MiB)",
        "bytes per enrollment",
        "lookup GET p50 (ms)",
        "lookup GET p99 (ms)",
        "query page, no WHERE, p50 (ms)",
        "query page, WHERE status, p99 (ms)",
        "query, WHERE deviceId, p50 (ms)",
        "server RSS at end (MiB)",
    ):
        assert header in out, f"{header!r} missing from:\n{out}"
    assert "listed 300 enrollments" in out
    # Everything it started is gone: its temporary directory was removed.
    assert list(tmp_path.iterdir()) == []
