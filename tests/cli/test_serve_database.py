"""``provisiond serve --db postgresql://...`` when PostgreSQL cannot be used: one line that says
why and what to do, within seconds, never a traceback or a 30 s pool timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests._server import free_port

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


def serve(tmp_path: Path, db: str, *, pythonpath: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")}
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    command = [
        sys.executable, "-m", "provisiond", "serve", "--data-dir", str(tmp_path / "data"),
        "--bind", "127.0.0.1", "--https-port", str(free_port()), "--mqtt-port", "0",
        "--amqp-port", "0", "--db", db,
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
