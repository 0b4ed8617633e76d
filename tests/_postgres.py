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
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from provisiond.storage import Store, open_store

__all__ = [
    "ReplicatedPair",
    "postgres_db_url",
    "postgres_url",
    "replicated_postgres",
    "store",
    "store_url",
    "wait_for_no_connections",
]

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
        self.killed = False
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

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, options: str = "-c synchronous_commit=off", *, initdb: bool = True) -> str:
        if initdb:
            self._run(
                "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"
            )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off "
            f"-c full_page_writes=off {options}"
        )
        # -l: the server must not inherit our pipes, or capture_output would wait for it.
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "server.log"), "-w", "start"
        )
        return self.url

    def start_standby_of(self, primary: _Cluster, name: str) -> str:
        """Copy ``primary`` with pg_basebackup and start the copy as a streaming standby whose
        walreceiver reports ``name`` (its ``cluster_name``) as its application name."""
        self._run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            "-D", str(self.data), "-R", "-X", "stream", "--no-sync",
        )  # fmt: skip
        return self.start(f"-c cluster_name={name}", initdb=False)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash: its backends exit when they notice)."""
        pid = self.postmaster_pid()
        assert pid is not None, "the server is not running"
        os.kill(pid, signal.SIGKILL)
        self.killed = True

    def promote(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "promote")

    def stop(self) -> None:
        try:
            # A killed postmaster may linger as a zombie (no init reaps it in a container).
            if not self.killed and self.postmaster_pid() is not None:
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
    cluster = _Cluster(_bindir_or_fail())
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _bindir_or_fail() -> Path:
    bindir = _find_bindir()
    if bindir is None:
        pytest.fail(
            "PostgreSQL binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin, "
            "`pg_config --bindir` or PATH. Install PostgreSQL (apt-get install postgresql), point "
            f"{_ENV_URL} at a server, or set {_ENV_SKIP}=1 to skip the PostgreSQL tests."
        )
    return bindir


@dataclass
class ReplicatedPair:
    """A primary and its synchronous streaming standby (commits wait for the standby's flush)."""

    primary: _Cluster
    standby: _Cluster

    @property
    def multi_host_url(self) -> str:
        """One URL naming both servers; libpq connects to whichever accepts writes."""
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
            "/postgres?target_session_attrs=read-write"
        )


_STANDBY_NAME = "standby1"


@pytest.fixture
def replicated_postgres() -> Iterator[ReplicatedPair]:
    """A fresh primary with a synchronous standby (``synchronous_standby_names``), streaming,
    for tests that kill the primary and promote the standby. Never the external server of
    ``PROVISIOND_TEST_POSTGRES_URL``: the test kills it."""
    if os.environ.get(_ENV_SKIP) == "1":
        pytest.skip(f"{_ENV_SKIP}=1")
    bindir = _bindir_or_fail()
    primary, standby = _Cluster(bindir), _Cluster(bindir)
    try:
        primary.start(f"-c synchronous_commit=on -c synchronous_standby_names={_STANDBY_NAME}")
        standby.start_standby_of(primary, _STANDBY_NAME)
        deadline = time.monotonic() + 30
        with psycopg.connect(primary.url, autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT sync_state FROM pg_stat_replication WHERE application_name = %s",
                    (_STANDBY_NAME,),
                ).fetchone()
                if row is not None and row[0] == "sync":
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"the standby did not become synchronous: {row}")
                time.sleep(0.05)
        yield ReplicatedPair(primary, standby)
    finally:
        try:
            primary.stop()
        finally:
            standby.stop()


def connections_to(admin_url: str, dbname: str) -> int:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)).fetchone()
        assert row is not None
        return int(row[0])


def wait_for_no_connections(admin_url: str, dbname: str, timeout: float = 5.0) -> int:
    """Poll until no session is connected to ``dbname`` (backends exit a moment after their
    client closes the socket); the count left at the deadline."""
    deadline = time.monotonic() + timeout
    while (count := connections_to(admin_url, dbname)) and time.monotonic() < deadline:
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


@contextlib.asynccontextmanager
async def opened_store(url: str) -> AsyncIterator[Store]:
    """The store of ``url``, open for the block and closed after it."""
    opened = open_store(url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An open store on a fresh database, once per backend; closed after the test."""
    async with opened_store(store_url) as opened:
        yield opened
