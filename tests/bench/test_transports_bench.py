"""The MQTT and AMQP phases of ``bench/cpu.py`` and ``bench/transports_inprocess.py`` run end to
end on a few devices. Only that they work (every device assigned, the tables printed) is checked:
their figures are measured by running them (docs/performance.md), never asserted."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, env={**os.environ}
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="bench/cpu.py needs wrk (Debian: apt-get install wrk)"
)
def test_cpu_bench_runs_the_mqtt_and_amqp_phases() -> None:
    out = _run(
        str(BENCH / "cpu.py"),
        "--devices",
        "40",
        "--seconds",
        "3",
        "--connections",
        "4",
        "--phases",
        "https-trivial,https-group,mqtt-trivial,mqtt-group,amqp-trivial,amqp-group,amqp-pipelined",
    )
    assert "x https-group's" in out, out
    rows = re.findall(
        r"^\| sqlite \| (https|mqtt|amqp)-(trivial|group|pipelined) \| (\d+) \| (\d+) \| \S+ \| \S+ \| (\d+) \|$",
        out,
        re.M,
    )
    assert len(rows) == 7, out
    for protocol, kind, _rate, _cpu, failed in rows:
        assert failed == "0", f"{protocol}-{kind}: {failed} devices failed\n{out}"
    for protocol in ("https", "mqtt", "amqp"):
        resumed = re.search(rf"^# {protocol}-group: (\d+) of (\d+) connections resumed", out, re.M)
        assert resumed is not None and int(resumed.group(2)) > 0, out


def test_inprocess_transport_bench_runs() -> None:
    out = _run(str(BENCH / "transports_inprocess.py"), "--devices", "30", "--concurrency", "4", "--layers")
    for phase in ("registrar alone", "mqtt", "amqp", "amqp, answered at once", "mqtt, answered at once"):
        assert re.search(rf"^\| {phase} \| 30 \| \d+ \|$", out, re.M), out
    assert re.search(r"^\| CPU µs per session, answered at once \| \d+ \| \d+ \|$", out, re.M), out
    assert re.search(
        r"^\| objects left in reference cycles per session \| [\d.]+ \| [\d.]+ \|$", out, re.M
    ), out
