"""What idle provisiond nodes cost a PostgreSQL database: statements and CPU a second.

Every worker of every node runs the built-in hub's broker, which reads the signal stream
(``service/hub_broker.py``): every 20 ms before LISTEN/NOTIFY, when woken (and every
``--hub-signal-poll`` seconds) since. This bench starts a throwaway cluster (``bench/_pg.py``,
with pg_stat_statements), ``--nodes`` ``provisiond serve`` on it with ``--workers`` each, lets
them settle, then counts over ``--seconds`` of idleness: the statements the database ran (by
statement), its transactions, its processes' CPU (utime + stime from /proc) and the nodes' own
CPU; per second, and per worker process.

    python bench/pg_idle.py [--nodes 2] [--workers 2] [--seconds 10] [--server-arg ARG ...]

Compare two source trees by running it with each on PYTHONPATH (under the bench lock: it
measures CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Server, machine_summary, start_server, terminate_on_signals
from _pg import PostgresCluster, find_bindir

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: The bench's own statements (``PostgresCluster.snapshot`` and ``stats``), not counted.
_OWN = (
    "SELECT queryid",
    "SELECT wal_records",
    "SELECT checkpoints_timed",
    "SELECT relname",
    "SELECT pid, backend_type",
    "SELECT (SELECT count(*)",
)


def tree_cpu(root: int) -> float:
    """utime + stime (seconds) of ``root`` and its living descendants."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo += [child for child, parent in parents.items() if parent == pid]
    return total


def sample(cluster: PostgresCluster, servers: list[Server]) -> dict[str, Any]:
    snapshot = cluster.snapshot()
    return {
        "at": time.monotonic(),
        "pg": snapshot,
        "commits": cluster.stats()["commits"],
        "nodes": sum(tree_cpu(server.pid) for server in servers),
    }


def report(before: dict[str, Any], after: dict[str, Any], processes: int) -> list[str]:
    seconds = after["at"] - before["at"]
    pg_cpu = sum(u + s for u, s, _ in after["pg"]["cpu"].values()) - sum(
        u + s for u, s, _ in before["pg"]["cpu"].values()
    )
    statements = []
    for queryid, (text, calls, time_ms, *_) in after["pg"]["statements"].items():
        was = before["pg"]["statements"].get(queryid, (text, 0.0, 0.0))
        if calls - was[1] > 0 and not text.startswith(_OWN):
            statements.append((calls - was[1], time_ms - was[2], text))
    statements.sort(reverse=True)
    calls = sum(c for c, _, _ in statements)
    lines = [
        f"over {seconds:.1f} s idle, {processes} worker processes:",
        f"  statements: {calls / seconds:.1f}/s ({calls / seconds / processes:.2f}/s per process)",
        f"  transactions committed: {(after['commits'] - before['commits']) / seconds:.1f}/s",
        f"  PostgreSQL CPU: {pg_cpu / seconds * 1000:.2f} ms/s",
        f"  provisiond CPU: {(after['nodes'] - before['nodes']) / seconds * 1000:.2f} ms/s",
    ]
    for count, time_ms, text in statements[:6]:
        lines.append(f"    {count / seconds:7.2f}/s {time_ms * 1000 / max(count, 1):6.1f} us each  {text}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait after the nodes start")
    parser.add_argument("--server-arg", action="append", default=[], help="an extra `serve` argument")
    args = parser.parse_args()
    bindir = find_bindir()
    if bindir is None:
        print("PostgreSQL's initdb and pg_ctl are not installed", file=sys.stderr)
        return 2
    print(f"# {machine_summary()}")
    print(f"# provisiond from {__import__('provisiond').__file__}")
    servers: list[Server] = []
    with terminate_on_signals(), tempfile.TemporaryDirectory(prefix="provisiond-pg-idle-") as work:
        cluster = PostgresCluster(bindir, diagnose=True)
        try:
            url = cluster.start()
            for n in range(args.nodes):
                servers.append(
                    start_server(
                        Path(work) / f"node{n}", "--db", url, "--workers", str(args.workers), *args.server_arg
                    )
                )
            time.sleep(args.settle)
            before = sample(cluster, servers)
            time.sleep(args.seconds)
            after = sample(cluster, servers)
            print("\n".join(report(before, after, args.nodes * args.workers)))
        finally:
            for server in servers:
                server.stop()
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
