"""A throwaway PostgreSQL cluster for benchmarks: ``initdb`` + ``pg_ctl`` in a temporary
directory, on a free loopback port, with PostgreSQL's **default durability settings** (fsync on,
synchronous_commit on, full_page_writes on), unlike the test suite's cluster which turns them
off for speed.

As root, the PostgreSQL commands run as the ``postgres`` OS user (``initdb`` refuses root). The
postmaster runs in its own session, so a Ctrl-C in the terminal does not reach it: the bench
stops it itself (``stop()``), in order, after the provisiond server that uses it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from _common import free_port

__all__ = ["PostgresCluster", "find_bindir"]


def find_bindir() -> Path | None:
    """The newest directory holding ``initdb`` and ``pg_ctl`` (None when PostgreSQL is missing)."""
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


class PostgresCluster:
    """One throwaway cluster. ``start()`` returns the ``postgres`` database's URL."""

    def __init__(self, bindir: Path, *, parent: Path | None = None) -> None:
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        # Not under the bench's own (0700, root-owned) temp dir: the postgres user must reach it.
        self.dir = Path(tempfile.mkdtemp(prefix="provisiond-bench-pg-", dir=parent or "/tmp"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.version = bindir.parent.name
        if self.as_root:
            import pwd

            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise RuntimeError(
                    "Running as root, and there is no 'postgres' OS user to run initdb as"
                ) from None
            os.chown(self.dir, user.pw_uid, user.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        # start_new_session: the postmaster (started by pg_ctl) must not get the terminal's SIGINT.
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, start_new_session=True)
        if result.returncode != 0:
            log = self.dir / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{tail}"
            )

    def start(self) -> str:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8")
        # Only where to listen: every durability and memory setting stays at its default.
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir}"
        # -l: the server must not inherit our pipes, or capture_output would wait for it.
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "server.log"), "-w", "start"
        )
        return self.url

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete the cluster. Safe to call twice."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    #: What :meth:`stats` reads: the client sessions (the provisiond pools' connections, the
    #: pool's size since connections idle for 10 minutes before it closes them), transactions
    #: committed, checkpoints, WAL written and flushed, autovacuum and autoanalyze runs.
    STATS = (
        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        " AND pid <> pg_backend_pid()),"
        " (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),"
        " (SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter),"
        " (SELECT wal_bytes FROM pg_stat_wal), (SELECT wal_sync FROM pg_stat_wal),"
        " (SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0) FROM pg_stat_user_tables)"
    )

    def stats(self) -> dict[str, float]:
        """The server's cumulative statistics (``pg_stat_*``): what differs between a good and
        a bad round. Backends report theirs about a second after they go idle: call it a
        moment after the load stops."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute(self.STATS).fetchone()
        assert row is not None
        names = ("connections", "commits", "checkpoints", "wal_bytes", "wal_syncs", "autovacuums")
        return {name: float(value) for name, value in zip(names, row, strict=True)}
