"""The remote hub benchmark runs end to end on a tiny count. Only that it works and reports is
checked here (and the soak's invariants, which hold at any size); its figures are measured by
running it (docs/performance.md), never asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "remote_hub.py"


def test_remote_hub_bench_runs_and_prints_its_table(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--devices",
            "12",
            "--budget",
            "20",
            "--soak-devices",
            "16",
            "--kills",
            "1",
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
        "== budgeted, new devices ==",
        "== budgeted, re-registrations ==",
        "== unpaced, new devices ==",
        "== unpaced, a second provisiond's hub ==",
        "== kill -9 soak ==",
        "achieved/budget",
        "429 from the hub",
    ):
        assert header in out, f"{header!r} missing from:\n{out}"
    for name in ("lost", "orphaned", "doubled"):
        assert re.search(rf"^\s+{name}\s+0$", out, re.M), out
    assert list(tmp_path.iterdir()) == []
