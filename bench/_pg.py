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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import free_port

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

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

    def __init__(
        self,
        bindir: Path,
        *,
        parent: Path | None = None,
        settings: Sequence[str] = (),
        diagnose: bool = False,
    ) -> None:
        self.bindir = bindir
        #: ``NAME=VALUE`` server settings beyond the defaults (``--pg-setting``: the bench says so)
        self.settings = tuple(settings)
        #: pg_stat_statements and WAL I/O timing on (``--pg-diagnose``: they cost a little CPU)
        self.diagnose = diagnose
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
        if self.diagnose:
            options += " -c shared_preload_libraries=pg_stat_statements -c track_wal_io_timing=on"
        for setting in self.settings:
            name, _, value = setting.partition("=")
            if not re.fullmatch(r"[a-z_.]+", name) or not re.fullmatch(r"[\w.]+", value):
                raise ValueError(f"--pg-setting {setting!r}: expected NAME=VALUE (letters, digits, _ .)")
            options += f" -c {name}={value}"
        # -l: the server must not inherit our pipes, or capture_output would wait for it.
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "server.log"), "-w", "start"
        )
        if self.diagnose:
            import psycopg

            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
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

    # -- where PostgreSQL's CPU goes (--pg-diagnose) -------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What :func:`diagnosis` compares: each PostgreSQL process's utime and stime (by its
        ``backend_type``), ``pg_stat_wal``, the checkpointer's and bgwriter's counters, the
        tables' inserted, updated and HOT-updated rows and, with ``diagnose``,
        ``pg_stat_statements``. Call it a moment after the load stops (statistics are
        reported about a second after a backend goes idle)."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            processes = conn.execute(
                "SELECT pid, backend_type FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
            ).fetchall()
            wal = conn.execute(
                "SELECT wal_records, wal_fpi, wal_bytes, wal_buffers_full, wal_write, wal_sync,"
                " wal_write_time, wal_sync_time FROM pg_stat_wal"
            ).fetchone()
            bgwriter = conn.execute(
                "SELECT checkpoints_timed + checkpoints_req, buffers_checkpoint, buffers_clean,"
                " buffers_backend, buffers_backend_fsync FROM pg_stat_bgwriter"
            ).fetchone()
            tables = conn.execute(
                "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, autovacuum_count + autoanalyze_count"
                " FROM pg_stat_user_tables"
            ).fetchall()
            statements = []
            if self.diagnose:
                statements = conn.execute(
                    "SELECT queryid, left(regexp_replace(query, '\\s+', ' ', 'g'), 110), calls,"
                    " total_exec_time, rows, wal_bytes, wal_fpi FROM pg_stat_statements"
                ).fetchall()
        cpu: dict[str, list[float]] = {}
        for pid, kind in processes:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            times = cpu.setdefault(kind or "?", [0.0, 0.0, 0.0])
            times[0] += int(fields[11]) / CLOCK_TICKS
            times[1] += int(fields[12]) / CLOCK_TICKS
            times[2] += 1
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
        # the postmaster itself, and what its exited children (autovacuum workers, ...) used
        cpu["postmaster (+ exited)"] = [
            (int(fields[11]) + int(fields[13])) / CLOCK_TICKS,
            (int(fields[12]) + int(fields[14])) / CLOCK_TICKS,
            1,
        ]
        return {
            "cpu": cpu,
            "wal": [float(v) for v in wal or ()],
            "bgwriter": [float(v) for v in bgwriter or ()],
            "tables": {row[0]: [float(v) for v in row[1:]] for row in tables},
            "statements": {row[0]: (row[1], *[float(v) for v in row[2:]]) for row in statements},
        }


def diagnosis(before: dict[str, Any], after: dict[str, Any], requests: int) -> list[str]:
    """Per request between two :meth:`PostgresCluster.snapshot`s: where PostgreSQL's CPU went
    (utime and stime by process type), its WAL (records, full-page images, bytes, writes and
    flushes and their time), the checkpointer's work, the rows written and HOT-updated, and
    the statements that took the time (pg_stat_statements, with ``diagnose``)."""
    per = max(requests, 1)
    lines = []
    cpu = []
    for kind, (user, system, count) in sorted(after["cpu"].items()):
        was = before["cpu"].get(kind, [0.0, 0.0, 0])
        u, s = (user - was[0]) / per * 1e6, (system - was[1]) / per * 1e6
        if u + s >= 0.5:
            cpu.append(f"{kind} x{count:.0f} {u:.0f}+{s:.0f}")
    lines.append("cpu us/req (user+system): " + ", ".join(cpu))
    w = [a - b for a, b in zip(after["wal"], before["wal"], strict=True)]
    lines.append(
        f"wal/req: {w[0] / per:.2f} records, {w[1] / per:.3f} full-page images, {w[2] / per:,.0f} bytes, "
        f"{w[4] / per:.3f} writes ({w[6] * 1000 / max(w[4], 1):.0f} us each), "
        f"{w[5] / per:.3f} flushes ({w[7] * 1000 / max(w[5], 1):.0f} us each), {w[3]:.0f} buffers full"
    )
    g = [a - b for a, b in zip(after["bgwriter"], before["bgwriter"], strict=True)]
    lines.append(
        f"checkpoints {g[0]:.0f}, buffers written/req: checkpoint {g[1] / per:.3f}, bgwriter {g[2] / per:.3f}, "
        f"backends {g[3] / per:.3f} (fsyncs {g[4]:.0f})"
    )
    rows = []
    for table, values in sorted(after["tables"].items()):
        was = before["tables"].get(table, [0.0] * 4)
        d = [a - b for a, b in zip(values, was, strict=True)]
        if d[0] or d[1] or d[3]:
            rows.append(
                f"{table} +{d[0] / per:.2f} ins {d[1] / per:.2f} upd ({d[2] / per:.2f} HOT) av {d[3]:.0f}"
            )
    lines.append("rows/req: " + ("; ".join(rows) or "none"))
    changes = []
    for queryid, (text, calls, time_ms, nrows, wal_bytes, fpi) in after["statements"].items():
        was = before["statements"].get(queryid, (text, 0.0, 0.0, 0.0, 0.0, 0.0))
        d_calls = calls - was[1]
        if d_calls > 0:
            changes.append(
                (time_ms - was[2], d_calls, nrows - was[3], wal_bytes - was[4], fpi - was[5], text)
            )
    changes.sort(reverse=True)
    for time_ms, calls, nrows, wal_bytes, fpi, text in changes[:8]:
        lines.append(
            f"  {time_ms * 1000 / per:6.1f} us/req {calls / per:6.3f} calls/req {nrows / max(calls, 1):5.1f} rows/call "
            f"{wal_bytes / per:6.0f} WAL B/req {fpi / per:.3f} fpi/req  {text}"
        )
    return lines
