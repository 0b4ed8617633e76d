"""bench/tls_front.py and bench/cpu.py --preload run end to end on tiny counts (wrk needed; nginx
is left out: it is the bench's, never the tests'). Only that they work and print their tables
is checked: their figures are measured by running them (docs/performance.md), never asserted."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")


def _run(*args: str, tmp_path: Path) -> str:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout


def test_tls_front_bench_runs_and_prints_its_table(tmp_path: Path) -> None:
    out = _run(
        str(BENCH / "tls_front.py"),
        "--fronts",
        "provisiond,provisiond-healthz",
        "--seconds",
        "1",
        "--rounds",
        "1",
        "--connections",
        "4",
        tmp_path=tmp_path,
    )
    assert "| front | req/s |" in out
    for front in ("| provisiond |", "| provisiond-healthz |"):
        assert front in out, out
    assert list(tmp_path.iterdir()) == []  # its temporary directory is gone


def test_cpu_bench_preload_fills_the_database_and_reregisters(tmp_path: Path) -> None:
    out = _run(
        str(BENCH / "cpu.py"),
        "--devices",
        "30",
        "--preload",
        "300",
        "--seconds",
        "1",
        "--connections",
        "4",
        "--phases",
        "trivial,reregister",
        tmp_path=tmp_path,
    )
    assert "# preloaded 300 devices in" in out
    for label in ("| sqlite 30 devices | reregister |", "| sqlite 300 devices | reregister |"):
        assert label in out, out
    # every re-registration was answered 2xx (the preloaded devices are real ones)
    rows = [line for line in out.splitlines() if "| reregister |" in line]
    assert all(line.split("|")[-3].strip() == "0" for line in rows), rows
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (.ci/run installs it)")
def test_tls_front_offload_runs_through_haproxy_and_prints_its_table(tmp_path: Path) -> None:
    out = _run(
        str(BENCH / "tls_front.py"),
        "--offload",
        "--offload-phases",
        "trivial,group,x509-group",
        "--offload-fronts",
        "provisiond,haproxy,haproxy-resume",
        "--devices",
        "40",
        "--x509-devices",
        "6",
        "--seconds",
        "1",
        "--rounds",
        "1",
        "--connections",
        "4",
        tmp_path=tmp_path,
    )
    assert "| front | phase | req/s |" in out
    for row in ("| haproxy | trivial |", "| haproxy | group |", "| haproxy | x509-group |"):
        assert row in out, out
    # the X.509 registrations through HAProxy were answered 2xx: the chain reached the app
    x509 = next(line for line in out.splitlines() if line.startswith("| haproxy | x509-group |"))
    assert x509.rstrip(" |").endswith("| 0"), out
    # the resumption probe ran on every front; with the sample config (no resumption) the
    # device registers again (what HAProxy does on a resumed session is its own, not asserted)
    for front in ("provisiond", "haproxy", "haproxy-resume"):
        assert f"# {front}: an X.509 device registering" in out, out
    probe = next(line for line in out.splitlines() if line.startswith("# haproxy: an X.509"))
    assert probe.split("): ", 1)[1].split(", ") == [
        f"{v} full 202" for v in ("TLSv1_2", "TLSv1_2", "TLSv1_3", "TLSv1_3")
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (.ci/run installs it)")
def test_cpu_bench_through_haproxy_front(tmp_path: Path) -> None:
    """``--front haproxy``: the phases go through HAProxy running the sample config in front of
    ``serve --front-port``; every registration, symmetric-key and X.509 group, is answered 2xx."""
    out = _run(
        str(BENCH / "cpu.py"),
        "--front",
        "haproxy",
        "--phases",
        "trivial,group,x509-group",
        "--devices",
        "40",
        "--x509-devices",
        "6",
        "--seconds",
        "1",
        "--connections",
        "4",
        tmp_path=tmp_path,
    )
    assert "# through HAProxy (samples/haproxy/haproxy.cfg)" in out, out
    for phase in ("group", "x509-group"):
        row = next(line for line in out.splitlines() if line.startswith(f"| sqlite | {phase} |"))
        assert row.split("|")[-3].strip() == "0", row  # non-2xx
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(
    not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")), reason="PostgreSQL's server is not installed"
)
def test_cpu_bench_diagnoses_postgresql_and_says_which_settings(tmp_path: Path) -> None:
    out = _run(
        str(BENCH / "cpu.py"),
        "--db",
        "postgresql",
        "--pg-diagnose",
        "--pg-setting",
        "wal_compression=on",
        "--devices",
        "30",
        "--seconds",
        "1",
        "--connections",
        "4",
        "--phases",
        "trivial,group",
        tmp_path=tmp_path,
    )
    assert "# PostgreSQL settings: wal_compression=on (NOT the defaults)" in out, out
    for part in (
        "group       pg: cpu us/req",
        "group       pg: wal/req",
        "group       pg: rows/req: hub_devices",
    ):
        assert part in out, out
    assert "| postgresql | group |" in out
    assert list(tmp_path.iterdir()) == []
    refused = subprocess.run(
        [sys.executable, str(BENCH / "cpu.py"), "--db", "postgresql", "--pg-setting", "fsync=off"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "durability" in refused.stderr, refused.stderr


@pytest.mark.skipif(
    shutil.which("callgrind_control") is None, reason="valgrind is not installed (.ci/run installs it)"
)
def test_cpu_bench_counts_the_servers_instructions_under_callgrind(tmp_path: Path) -> None:
    """``--callgrind``: the server under callgrind, each phase's instructions per request in the
    tables instead of CPU time; every registration is answered 2xx; ``--callgrind-dir`` keeps
    each phase's dump."""
    dumps = tmp_path / "dumps"
    out = _run(
        str(BENCH / "cpu.py"),
        "--callgrind",
        "--callgrind-dir",
        str(dumps),
        "--phases",
        "trivial,group,amqp-group",
        "--devices",
        "60",
        "--seconds",
        "2",
        "--connections",
        "2",
        "--threads",
        "1",
        tmp_path=tmp_path,
    )
    assert "# warmed up:" in out and "# the idle server:" in out, out
    assert "| server k instructions/req (callgrind) |" in out, out
    for phase in ("group", "amqp-group"):
        row = next(line for line in out.splitlines() if line.startswith(f"| sqlite | {phase} |"))
        cells = [cell.strip() for cell in row.split("|")]
        assert float(cells[6]) > 0, row  # k instructions per request
        assert cells[-3] == "0", row  # non-2xx
    assert list(tmp_path.iterdir()) == [dumps]
    kept = "".join(dump.read_text(errors="replace") for dump in dumps.glob("callgrind.out.*.*"))
    for label in ("dump idle", "dump phase0-trivial", "dump phase1-group", "dump phase2-amqp-group"):
        assert f"Trigger: {label}\n" in kept, label
    refused = subprocess.run(
        [sys.executable, str(BENCH / "cpu.py"), "--callgrind", "--phases", "x509-group"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "--callgrind" in refused.stderr, refused.stderr


@pytest.mark.skipif(
    shutil.which("callgrind_control") is None, reason="valgrind is not installed (.ci/run installs it)"
)
def test_cpu_inprocess_counts_instructions_under_callgrind(tmp_path: Path) -> None:
    """``bench/cpu_inprocess.py --callgrind`` runs itself again under callgrind and prints each
    phase's instructions per request in place of CPU time, every phase counted."""
    out = _run(str(BENCH / "cpu_inprocess.py"), "--callgrind", "--devices", "20", tmp_path=tmp_path)
    assert "| k instructions per request (callgrind) |" in out, out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and "(ASGI)" in line]
    assert len(rows) == 3 and all(float(row[3]) > 0 for row in rows), out
    assert not list(tmp_path.glob("provisiond-callgrind-*")), "the dumps' directory is left behind"


def _perf_unavailable(module: str) -> str | None:
    """Why the bench's ``module`` (``_syscalls``, ``_libraries``) cannot use perf here, or None."""
    sys.path.insert(0, str(BENCH))
    try:
        why: str | None = importlib.import_module(module).available()
    finally:
        sys.path.remove(str(BENCH))
    return why


def _trivial_and_group(flag: str, tmp_path: Path) -> str:
    """``bench/cpu.py`` with ``flag``, on a tiny run of the trivial and group phases."""
    return _run(
        str(BENCH / "cpu.py"),
        flag,
        "--devices",
        "50",
        "--seconds",
        "1",
        "--connections",
        "4",
        "--phases",
        "trivial,group",
        tmp_path=tmp_path,
    )


@pytest.mark.skipif(
    _perf_unavailable("_syscalls") is not None, reason="perf cannot count the kernel's tracepoints here"
)
def test_cpu_bench_counts_system_calls(tmp_path: Path) -> None:
    out = _trivial_and_group("--syscalls", tmp_path)
    counted = [line for line in out.splitlines() if " per request: pwrite64 " in line]
    assert [line.split()[0] for line in counted] == ["trivial", "group"], out
    assert "of them WAL frames (24-byte)" in counted[1] and "getrandom" in counted[1]
    assert "group       SQLite's WAL file:" in out, out
    assert "| sqlite | group |" in out and "of it system µs/req" in out
    assert list(tmp_path.iterdir()) == []
    assert (
        "provisiond_bench_"
        not in subprocess.run(["perf", "probe", "-l"], capture_output=True, text=True).stdout
    )


@pytest.mark.skipif(_perf_unavailable("_libraries") is not None, reason="perf cannot sample processes here")
def test_cpu_bench_shares_cpu_out_by_library(tmp_path: Path) -> None:
    out = _trivial_and_group("--libraries", tmp_path)
    shared = [line for line in out.splitlines() if " µs/req by library: " in line]
    assert [line.split()[0] for line in shared] == ["trivial", "group"], out
    # the interpreter (libpython, or the python executable when it is linked in), OpenSSL, the kernel...
    assert "python" in shared[1] and "kernel" in shared[1] and shared[1].count(",") >= 3, out
    assert "| library | trivial | group | group − trivial |" in out, out
    [total] = [line.split("|") for line in out.splitlines() if line.startswith("| all |")]
    group = [line.split("|") for line in out.splitlines() if line.startswith("| sqlite | group |")][0]
    assert abs(float(total[3]) - float(group[6])) <= 1, out  # the shares add up to the phase's CPU
    assert list(tmp_path.iterdir()) == []
