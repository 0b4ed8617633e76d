"""What idle provisiond nodes cost a PostgreSQL database: statements and CPU a second.

Every worker of every node runs the built-in hub's broker, which reads the signal stream
(``service/hub_broker.py``): every 20 ms before LISTEN/NOTIFY, when woken (and every
``--hub-signal-poll`` seconds) since. This bench starts a throwaway cluster (``bench/_pg.py``,
with pg_stat_statements), ``--nodes`` ``provisiond serve`` on it with ``--workers`` each, lets
them settle, then counts over ``--seconds`` of idleness: the statements the database ran (by
statement), its transactions, its processes' CPU (utime + stime from /proc) and the nodes' own
CPU; per second, and per worker process.

    python bench/pg_idle.py [--nodes 2] [--workers 2] [--seconds 10] [--server-arg ARG ...]
                            [--calls 200 --devices 10]

``--calls N`` then measures the cross-node direct method: ``--devices`` devices connected to the
last node answer at once, and N calls are made one at a time through the first node's admin
API (as ``bench/hub.py``'s methods part, across nodes: the request and the answer each cross
the signal stream), first 0.1 s apart (a call in a quiet cluster), then back to back. With
``--workers 1`` every call crosses nodes.

Compare two source trees by running it with each on PYTHONPATH (under the bench lock: it
measures CPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Server, machine_summary, percentile, start_server, terminate_on_signals
from _pg import PostgresCluster, find_bindir
from cpu import process_tree_cpu

#: The bench's own statements (``PostgresCluster.snapshot`` and ``stats``), not counted.
_OWN = (
    "SELECT queryid",
    "SELECT wal_records",
    "SELECT checkpoints_timed",
    "SELECT relname",
    "SELECT pid, backend_type",
    "SELECT (SELECT count(*)",
)


def sample(cluster: PostgresCluster, servers: list[Server]) -> dict[str, Any]:
    snapshot = cluster.snapshot()
    return {
        "at": time.monotonic(),
        "pg": snapshot,
        "commits": cluster.stats()["commits"],
        "nodes": sum(process_tree_cpu(server.pid) for server in servers),
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


def _timed_calls(caller: Server, hub_name: str, device_ids: list[str], calls: int, gap: float) -> list[float]:
    """``calls`` direct methods through ``caller``'s admin API, one at a time on one keep-alive
    connection, ``gap`` seconds apart; each one's round trip (request to answer)."""
    import http.client
    import json
    import random
    import ssl

    from provisiond.protocol.sas import build_sas_token
    from provisiond.service_client import ConnectionString

    cs = ConnectionString.parse(caller.connection_string)
    _, _, port = cs.host.partition(":")
    conn = http.client.HTTPSConnection(
        "127.0.0.1", int(port or 443), context=ssl.create_default_context(cafile=caller.ca_file), timeout=60
    )
    conn.connect()
    token = build_sas_token(cs.host, cs.key, int(time.time()) + 3600, key_name=cs.key_name)
    rng = random.Random(7)
    times: list[float] = []
    for i in range(calls):
        body = json.dumps({"methodName": "echo", "payload": {"call": i}, "responseTimeoutInSeconds": 30})
        start = time.perf_counter()
        conn.request(
            "POST",
            f"/admin/linkedHubs/{hub_name}/devices/{rng.choice(device_ids)}/methods?api-version=2021-04-12",
            body=body.encode(),
            headers={"Authorization": token, "Content-Type": "application/json"},
        )
        response = conn.getresponse()
        data = response.read()
        times.append(time.perf_counter() - start)
        if response.status != 200 or json.loads(data) != {"status": 200, "payload": {"call": i}}:
            raise RuntimeError(f"call {i}: {response.status} {data[:300]!r}")
        time.sleep(gap)
    conn.close()
    return times


def cross_node_methods(caller: Server, holder: Server, devices: int, calls: int) -> list[str]:
    """Direct methods invoked through ``caller`` on devices connected to ``holder``: spaced
    (a call in a quiet cluster), then back to back (the broker's reads are paced: at most one
    per 20 ms over time)."""
    import asyncio

    import hub  # bench/hub.py

    fleet = hub.provision(caller, "cross", devices)

    async def run() -> tuple[list[float], list[float], int]:
        connected, failures = await hub._connect_all(
            fleet, int(holder.info["mqttPort"]), holder.ca_file, keep_alive=1200, subscribe=hub.FILTERS[:1]
        )
        answering = [asyncio.ensure_future(hub._answer_methods(d)) for d in connected]
        ids = [d.device_id for d in connected]
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, _timed_calls, caller, fleet.hub, ids, 10, 0.0)  # warm-up
            spaced = await loop.run_in_executor(None, _timed_calls, caller, fleet.hub, ids, calls, 0.1)
            tight = await loop.run_in_executor(None, _timed_calls, caller, fleet.hub, ids, calls, 0.0)
        finally:
            for task in answering:
                task.cancel()
            for device in connected:
                device.close()
        return spaced, tight, failures

    spaced, tight, failures = asyncio.run(run())
    lines = [f"cross-node methods, {devices - failures} devices on the last node, {calls} calls each way:"]
    for name, times in (("0.1 s apart", spaced), ("back to back", tight)):
        lines.append(
            f"  {name}: round trip p50 {percentile(times, 50) * 1000:.1f} ms, p90 "
            f"{percentile(times, 90) * 1000:.1f} ms, p99 {percentile(times, 99) * 1000:.1f} ms, "
            f"max {max(times) * 1000:.1f} ms"
        )
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
    parser.add_argument("--calls", type=int, default=0, help="cross-node direct methods to time (0: none)")
    parser.add_argument("--devices", type=int, default=10, help="devices connected for --calls")
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
            if args.calls:
                print("\n".join(cross_node_methods(servers[0], servers[-1], args.devices, args.calls)))
        finally:
            for server in servers:
                server.stop()
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
