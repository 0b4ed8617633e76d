"""``provisiond serve --db postgresql://...`` when PostgreSQL cannot be used: one line that says
why and what to do, within seconds, never a traceback or a 30 s pool timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from tests._postgres import connections_to, wait_for_no_connections
from tests._server import free_port, start_server

#: A ``sitecustomize`` that makes the interpreter behave as if the ``postgres`` extra (psycopg,
#: psycopg-pool) were not installed, as after ``make run``.
_WITHOUT_PSYCOPG = """
import sys


class _NoPsycopg:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("psycopg", "psycopg_pool", "psycopg_binary", "psycopg_c"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoPsycopg())
"""


def serve(
    tmp_path: Path,
    db: str,
    *extra: str,
    pythonpath: Sequence[str] = (),
    env_vars: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")} | dict(env_vars or {})
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    command = [
        sys.executable, "-m", "provisiond", "serve", "--data-dir", str(tmp_path / "data"),
        "--bind", "127.0.0.1", "--https-port", str(free_port()), "--mqtt-port", "0",
        "--amqp-port", "0", "--db", db, *extra,
    ]  # fmt: skip
    # The timeout is the test's bound: an unreachable database must not wait out a pool timeout.
    return subprocess.run(command, capture_output=True, text=True, timeout=20, env=env)


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def test_postgres_url_without_the_postgres_extra_says_how_to_install_it(tmp_path: Path) -> None:
    blocker = tmp_path / "without-psycopg"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(_WITHOUT_PSYCOPG)
    result = serve(tmp_path, "postgresql://postgres@127.0.0.1:5432/provisiond", pythonpath=[str(blocker)])
    assert result.returncode == 2, result.stderr
    [line] = error_lines(result)
    assert line.startswith("Error: PostgreSQL support is not installed"), line
    assert "pip install 'provisiond[postgres]'" in line
    assert ".venv/bin/pip install -e '.[postgres]'" in line


def test_unreachable_postgres_fails_at_once_with_the_connection_error(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there: the connection is refused
    result = serve(tmp_path, f"postgresql://postgres@127.0.0.1:{port}/provisiond")
    assert result.returncode == 1, result.stderr
    [line] = error_lines(result)
    assert line.startswith("Error: The database is unavailable: "), line
    assert f"port {port} failed: Connection refused" in line, line


@pytest.mark.parametrize(
    ("given", "env"), [("5-2", False), ("0", False), ("2-x", False), ("sixteen", True), ("-1", True)]
)
def test_a_bad_pool_size_is_refused_at_start(tmp_path: Path, given: str, env: bool) -> None:
    """``--db-pool-size`` (or PROVISIOND_DB_POOL_SIZE) is checked before anything starts: one
    line naming the flag and what it takes, exit status 2."""
    db = "postgresql://postgres@127.0.0.1:1/provisiond"  # never reached
    if env:
        result = serve(tmp_path, db, env_vars={"PROVISIOND_DB_POOL_SIZE": given})
    else:
        result = serve(tmp_path, db, "--db-pool-size", given)
    assert result.returncode == 2, result.stderr
    [line] = error_lines(result)
    assert line == (
        f"Error: Invalid value for --db-pool-size: {given!r} is not a pool size: MAX or MIN-MAX, "
        "whole numbers with 0 <= MIN <= MAX and MAX >= 1 (e.g. 16 or 2-16)"
    ), line


@pytest.mark.postgres
def listening(admin_url: str, dbname: str, expected: int, timeout: float = 10.0) -> int:
    """How many sessions to ``dbname`` have run ``LISTEN``, once there are ``expected`` (or at
    the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND query LIKE 'LISTEN %%'",
                (dbname,),
            ).fetchone()
        count = int(row[0]) if row is not None else 0
        if count == expected or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def test_the_pool_size_reaches_every_workers_pool(postgres_db_url: str, tmp_path: Path) -> None:
    """Each worker's pool keeps at least the MIN of ``--db-pool-size`` open and at most its MAX
    (so the setting reached it, through the settings the workers are given); the default keeps
    one to 16 each. Startup's concurrent statements may grow a pool above its MIN. Each worker
    holds one listening connection besides."""
    url = urlsplit(postgres_db_url)
    admin, dbname = url._replace(path="/postgres").geturl(), url.path.lstrip("/")
    for n, (extra, env, low, high) in enumerate(
        [
            (("--db-pool-size", "7-7"), None, 14, 14),
            ((), {"PROVISIOND_DB_POOL_SIZE": "5-6"}, 10, 12),
            ((), None, 2, 32),
        ]
    ):
        assert wait_for_no_connections(admin, dbname) == 0
        server = start_server(
            tmp_path / f"data{n}", "--db", postgres_db_url, "--workers", "2", *extra, env=env
        )
        try:
            server.wait_for_log("provisiond is running.")  # every worker has opened its pool
            # ... and one listening connection each, outside the pool (the hub broker's LISTEN),
            # which its worker opens in the background.
            assert listening(admin, dbname, 2) == 2
            assert low + 2 <= connections_to(admin, dbname) <= high + 2, (extra, env)
        finally:
            server.stop()
