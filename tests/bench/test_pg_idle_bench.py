"""bench/pg_idle.py runs end to end on a tiny count: only that it works and prints its figures is
checked (they are measured by running it: docs/performance.md), never asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.skipif(
    not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")), reason="PostgreSQL's server is not installed"
)
def test_pg_idle_bench_counts_statements_and_cpu(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH / "pg_idle.py"),
            "--nodes",
            "1",
            "--workers",
            "1",
            "--seconds",
            "1",
            "--settle",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    for line in ("1 worker processes", "statements:", "PostgreSQL CPU:", "provisiond CPU:"):
        assert line in result.stdout, result.stdout
    assert list(tmp_path.iterdir()) == []  # its temporary directories are gone
