"""Database fixtures: a PostgreSQL server for the session, a fresh database per test, and the
``store`` fixture that runs a test against every backend.

The server is a throwaway cluster (``initdb`` + ``pg_ctl``) in a temporary directory on a free
loopback port, started the first time a test asks for it and stopped at the end of the session.
As root, the PostgreSQL commands run as the ``postgres`` OS user (``initdb`` refuses root).

Environment:

- ``PROVISIOND_TEST_POSTGRES_URL``: use this server instead of starting one (a
  ``postgresql://`` URL of a database whose user may ``CREATE DATABASE``).
- ``PROVISIOND_SKIP_POSTGRES=1``: skip the PostgreSQL tests. Without it, missing PostgreSQL
  binaries make those tests fail, so that a CI job cannot pass without testing PostgreSQL.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from provisiond.storage import Store, open_store

__all__ = ["postgres_db_url", "postgres_url", "store", "store_url", "wait_for_no_connections"]

_ENV_URL = "PROVISIOND_TEST_POSTGRES_URL"
_ENV_SKIP = "PROVISIOND_SKIP_POSTGRES"


def _find_bindir() -> Path | None:
    """The newest directory holding ``initdb`` and ``pg_ctl``."""
    candidates = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    candidates.sort(key=lambda path: int(re.sub(r"\D", "", path.parent.name) or 0), reverse=True)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True, timeout=10
        )
        candidates.append(Path(out.stdout.strip()))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Cluster:
    """A throwaway PostgreSQL cluster."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="provisiond-pg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.port = _free_port()
        if self.as_root:
            import pwd

            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("Running as root, and there is no 'postgres' OS user to run initdb as")
            os.chown(self.dir, user.pw_uid, user.pw_gid)

    def _run(self, *args: str) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.dir / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{tail}"
            )

    def start(self) -> str:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        # -l: the server must not inherit our pipes, or capture_output would wait for it.
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "server.log"), "-w", "start"
        )
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a PostgreSQL server's ``postgres`` database (superuser, trust auth)."""
    if os.environ.get(_ENV_SKIP) == "1":
        pytest.skip(f"{_ENV_SKIP}=1")
    if url := os.environ.get(_ENV_URL):
        yield url
        return
    bindir = _find_bindir()
    if bindir is None:
        pytest.fail(
            "PostgreSQL binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin, "
            "`pg_config --bindir` or PATH. Install PostgreSQL (apt-get install postgresql), point "
            f"{_ENV_URL} at a server, or set {_ENV_SKIP}=1 to skip the PostgreSQL tests."
        )
    cluster = _Cluster(bindir)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _connections_to(admin_url: str, dbname: str) -> int:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)).fetchone()
        assert row is not None
        return int(row[0])


def wait_for_no_connections(admin_url: str, dbname: str, timeout: float = 5.0) -> int:
    """Poll until no session is connected to ``dbname`` (backends exit a moment after their
    client closes the socket); the count left at the deadline."""
    deadline = time.monotonic() + timeout
    while (count := _connections_to(admin_url, dbname)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return count


@pytest.fixture
def postgres_db_url(postgres_url: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards. The teardown fails the test if
    connections to it are still open (a store that leaks connections)."""
    dbname = f"provisiond_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        try:
            # An ICU collation on purpose: key order must not depend on the database locale.
            conn.execute(
                f"CREATE DATABASE {dbname} TEMPLATE template0 ENCODING 'UTF8' "
                "LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
            )
        except psycopg.Error:
            conn.execute(f"CREATE DATABASE {dbname} TEMPLATE template0 ENCODING 'UTF8'")
    url = urlsplit(postgres_url)._replace(path=f"/{dbname}").geturl()
    try:
        yield url
        leaked = wait_for_no_connections(postgres_url, dbname)
        assert leaked == 0, f"{leaked} connection(s) to {dbname} still open after the test"
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database for one test, once per backend: a SQLite file path or a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "db" / "provisiond.db")
    url: str = request.getfixturevalue("postgres_db_url")
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An open store on a fresh database, once per backend; closed after the test."""
    opened = open_store(store_url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()
