"""Benchmark: N individual enrollments through the bulk API, on SQLite and on PostgreSQL.

For each backend it starts a fresh ``provisiond serve`` (its own data dir in a temporary
directory; for PostgreSQL also a throwaway cluster with the default durability settings, fsync
on), then:

1. creates N symmetric-key individual enrollments with ``POST /enrollments`` (bulk, mode
   ``create``) over HTTPS from ``--clients`` concurrent senders, each request filled up to
   ``--batch-bytes`` of JSON (the service refuses bodies over 96 KiB). The server generates the
   keys (two 64-byte random keys per enrollment), as in real use. Registration ids are
   ``<8 hex digits of a hash>-<n>``, so they arrive in random key order, like device serial
   numbers do (``--id-order sequential`` for the best case); every tenth enrollment is
   disabled; ``deviceId`` equals the registration id;
2. reports the create time and rate, and the database size (SQLite: the db, -wal and -shm files;
   PostgreSQL: ``pg_database_size``);
3. lists every enrollment (``POST /enrollments/query`` following continuations), which checks
   the count and collects continuation tokens at evenly spread points, and does the same for
   ``WHERE provisioningStatus = 'disabled'``;
4. measures p50/p99 of ``--lookups`` single ``GET /enrollments/{id}`` of random ids, one after
   the other on one keep-alive connection, then of ``--pages`` query pages of 100 (no WHERE,
   ``WHERE provisioningStatus = 'disabled'``, each from a random collected continuation token,
   and ``WHERE deviceId = '<random>'``);
5. reports the server process's RSS (now, and its peak).

Latencies are measured at the client (http.client, one connection), so they include TLS and
HTTP parsing on both sides, as a real caller sees them. Usage::

    .venv/bin/python bench/enrollments.py [--count 1000000] [--backends sqlite,postgresql]
        [--clients 2] [--batch-bytes 90000] [--lookups 2000] [--pages 200]

Everything it starts (servers, the PostgreSQL cluster) is stopped and every temporary directory
removed at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from _common import (
    Api,
    ApiError,
    Server,
    human_bytes,
    machine_summary,
    percentile,
    rss_of,
    start_server,
    terminate_on_signals,
)

BACKENDS = ("sqlite", "postgresql")
MAX_BODY_BYTES = 96 * 1024  # the service's request limit (DPS's message size)
PAGE_SIZE = 100
DISABLED_EVERY = 10  # every tenth enrollment is disabled


# -- the enrollments --------------------------------------------------------------------------


def registration_id(n: int, order: str) -> str:
    """The registration id of enrollment ``n``: unique, and in random key order unless
    ``order`` is "sequential"."""
    if order == "sequential":
        return f"bench-{n:08d}"
    prefix = hashlib.blake2b(n.to_bytes(8, "big"), digest_size=4).hexdigest()
    return f"{prefix}-{n:08d}"


def enrollment_json(n: int, order: str) -> str:
    rid = registration_id(n, order)
    status = "disabled" if n % DISABLED_EVERY == 0 else "enabled"
    # No keys: the service generates them (as `provisiond enrollment create` and the portal do).
    return (
        f'{{"registrationId":"{rid}","deviceId":"{rid}",'
        f'"attestation":{{"type":"symmetricKey"}},"provisioningStatus":"{status}"}}'
    )


def bulk_bodies(count: int, max_bytes: int, order: str) -> Iterator[tuple[bytes, int]]:
    """Bulk-create request bodies holding enrollments 0..count-1, each at most ``max_bytes``
    long; yields (body, how many enrollments it holds)."""
    head, tail = '{"mode":"create","enrollments":[', "]}"
    items: list[str] = []
    size = len(head) + len(tail)
    for n in range(count):
        item = enrollment_json(n, order)
        if items and size + len(item) + 1 > max_bytes:
            yield (head + ",".join(items) + tail).encode(), len(items)
            items, size = [], len(head) + len(tail)
        items.append(item)
        size += len(item) + (1 if len(items) > 1 else 0)
    if items:
        yield (head + ",".join(items) + tail).encode(), len(items)


# -- results ----------------------------------------------------------------------------------


@dataclass
class Latencies:
    """Latencies of one kind of request, in seconds."""

    samples: list[float] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        return percentile(self.samples, 50) * 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.samples, 99) * 1000


@dataclass
class Result:
    backend: str
    count: int = 0
    create_seconds: float = 0.0
    requests: int = 0
    bulk: Latencies = field(default_factory=Latencies)
    db_bytes: int = 0
    db_detail: str = ""
    listed: int = 0
    list_seconds: float = 0.0
    list_page: int = 0
    lookup: Latencies = field(default_factory=Latencies)
    page_all: Latencies = field(default_factory=Latencies)
    page_status: Latencies = field(default_factory=Latencies)
    page_device: Latencies = field(default_factory=Latencies)
    rss: int = 0
    rss_peak: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def create_rate(self) -> float:
        return self.count / self.create_seconds if self.create_seconds else float("nan")


# -- phases -----------------------------------------------------------------------------------


def create_enrollments(server: Server, args: argparse.Namespace, result: Result) -> None:
    """Send every bulk request from ``args.clients`` threads; print progress every ~10%."""
    bodies = bulk_bodies(args.count, args.batch_bytes, args.id_order)
    source_lock = threading.Lock()
    stats_lock = threading.Lock()
    stop = threading.Event()
    failures: list[BaseException] = []
    created = 0

    def sender() -> None:
        nonlocal created
        try:
            with server.api() as api:
                while not stop.is_set():
                    with source_lock:
                        next_body = next(bodies, None)
                    if next_body is None:
                        return
                    body, n = next_body
                    started = time.perf_counter()
                    data, _ = api.request("POST", "/enrollments", body)
                    elapsed = time.perf_counter() - started
                    outcome = json.loads(data)
                    if not outcome.get("isSuccessful"):
                        errors = outcome.get("errors", [])
                        raise RuntimeError(f"{len(errors)} enrollment(s) refused, first: {errors[:3]}")
                    with stats_lock:
                        created += n
                        result.requests += 1
                        result.bulk.samples.append(elapsed)
        except BaseException as exc:
            failures.append(exc)
            stop.set()

    threads = [threading.Thread(target=sender, daemon=True, name=f"bulk-{i}") for i in range(args.clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    step = max(1, math.ceil(args.count / 10))
    next_report, last_count, last_time = step, 0, started
    try:
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(0.2)
            now = time.perf_counter()
            if created >= next_report or not any(t.is_alive() for t in threads):
                if created > last_count:
                    print(
                        f"  {created:>9,} created ({created / args.count:4.0%})  {now - started:7.1f} s  "
                        f"{created / (now - started):7,.0f}/s overall, "
                        f"{(created - last_count) / (now - last_time):7,.0f}/s in this step",
                        flush=True,
                    )
                next_report = (created // step + 1) * step
                last_count, last_time = created, now
    finally:
        stop.set()
    if failures:
        raise RuntimeError(f"bulk create failed after {created:,} enrollments: {failures[0]}") from failures[
            0
        ]
    result.create_seconds = time.perf_counter() - started
    result.count = created


def measure_size(server: Server, backend: str, db_url: str | None, result: Result) -> None:
    if backend == "sqlite":
        base = server.data_dir / "provisiond.db"
        sizes = {
            suffix or "db": (base.parent / (base.name + suffix)).stat().st_size
            for suffix in ("", "-wal", "-shm")
            if (base.parent / (base.name + suffix)).exists()
        }
        result.db_bytes = sum(sizes.values())
        result.db_detail = ", ".join(f"{name} {human_bytes(size)}" for name, size in sizes.items())
        return
    import psycopg

    assert db_url is not None
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_database_size(current_database()), pg_total_relation_size('enrollments'), "
            "pg_relation_size('enrollments'), pg_indexes_size('enrollments')"
        ).fetchone()
        assert row is not None
        total, table_total, heap, indexes = (int(x) for x in row)
    result.db_bytes = total
    result.db_detail = (
        f"enrollments table {human_bytes(table_total)} (heap {human_bytes(heap)}, "
        f"indexes {human_bytes(indexes)}, TOAST and the rest {human_bytes(table_total - heap - indexes)})"
    )


def autovacuum_state(db_url: str) -> str:
    """Whether autovacuum is at work (it starts on a table after many inserts, and competes
    with the reads for the CPUs), and what it has done to the enrollments table so far."""
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as conn:
        workers = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
        ).fetchone()
        table = conn.execute(
            "SELECT autovacuum_count, autoanalyze_count FROM pg_stat_user_tables WHERE relname = 'enrollments'"
        ).fetchone()
    running = int(workers[0]) if workers else 0
    vacuums, analyzes = (int(table[0]), int(table[1])) if table else (0, 0)
    return (
        f"{running} autovacuum worker(s) running; enrollments autovacuumed {vacuums} time(s), "
        f"autoanalyzed {analyzes} time(s)"
    )


def query_body(where: str = "") -> bytes:
    return json.dumps({"query": f"SELECT * FROM enrollments{where}"}).encode()


def query_page(api: Api, body: bytes, size: int, continuation: str | None) -> tuple[int, str | None]:
    headers = {"x-ms-max-item-count": str(size)}
    if continuation:
        headers["x-ms-continuation"] = continuation
    data, response = api.request("POST", "/enrollments/query", body, headers)
    return len(json.loads(data)), response.headers.get("x-ms-continuation")


def scan(api: Api, body: bytes, expected: int, points: int) -> tuple[int, float, int, list[str | None]]:
    """Follow a query to its end with pages sized to stop at about ``points`` places; returns
    (records, seconds, page size, continuation tokens, None standing for the start)."""
    size = max(PAGE_SIZE, min(10_000, math.ceil(expected / max(1, points))))
    tokens: list[str | None] = [None]
    total, continuation = 0, None
    started = time.perf_counter()
    while True:
        n, continuation = query_page(api, body, size, continuation)
        total += n
        if continuation is None:
            break
        tokens.append(continuation)
    return total, time.perf_counter() - started, size, tokens


@contextlib.contextmanager
def timed(samples: Latencies) -> Iterator[None]:
    """Add the duration of the ``with`` body to ``samples``."""
    started = time.perf_counter()
    yield
    samples.samples.append(time.perf_counter() - started)


def measure_reads(server: Server, args: argparse.Namespace, result: Result) -> None:
    rng = random.Random(args.seed)
    expected_disabled = len(range(0, result.count, DISABLED_EVERY))
    all_body = query_body()
    status_body = query_body(" WHERE provisioningStatus = 'disabled'")
    with server.api() as api:
        # Listing: checks that every enrollment is there, and collects continuation tokens.
        listed, seconds, size, all_tokens = scan(api, all_body, result.count, args.pages)
        result.listed, result.list_seconds, result.list_page = listed, seconds, size
        print(f"  listed {listed:,} enrollments in {seconds:.1f} s (pages of {size:,})", flush=True)
        if listed != result.count:
            raise RuntimeError(f"the listing returned {listed:,} enrollments, not {result.count:,}")
        disabled, seconds, size, status_tokens = scan(api, status_body, expected_disabled, args.pages)
        print(f"  listed {disabled:,} disabled ones in {seconds:.1f} s (pages of {size:,})", flush=True)
        if disabled != expected_disabled:
            raise RuntimeError(f"{disabled:,} disabled enrollments listed, not {expected_disabled:,}")

        api.request("GET", f"/enrollments/{registration_id(0, args.id_order)}")  # warm the connection
        for _ in range(args.lookups):
            rid = registration_id(rng.randrange(result.count), args.id_order)
            with timed(result.lookup):
                data, _ = api.request("GET", f"/enrollments/{quote(rid)}")
            if json.loads(data).get("registrationId") != rid:
                raise RuntimeError(f"GET /enrollments/{rid} returned another enrollment")
        print(
            f"  {args.lookups:,} lookups: p50 {result.lookup.p50_ms:.2f} ms, p99 {result.lookup.p99_ms:.2f} ms",
            flush=True,
        )
        for _ in range(args.pages):
            token = rng.choice(all_tokens)
            with timed(result.page_all):
                query_page(api, all_body, PAGE_SIZE, token)
        for _ in range(args.pages):
            token = rng.choice(status_tokens)
            with timed(result.page_status):
                query_page(api, status_body, PAGE_SIZE, token)
        for _ in range(args.pages):
            rid = registration_id(rng.randrange(result.count), args.id_order)
            body = query_body(f" WHERE deviceId = '{rid}'")
            with timed(result.page_device):
                n, _ = query_page(api, body, PAGE_SIZE, None)
            if n != 1:
                raise RuntimeError(f"WHERE deviceId = '{rid}' found {n} enrollments, not 1")
        print(
            f"  {args.pages:,} query pages each: no WHERE p50 {result.page_all.p50_ms:.2f} ms, "
            f"WHERE provisioningStatus p50 {result.page_status.p50_ms:.2f} ms, "
            f"WHERE deviceId p50 {result.page_device.p50_ms:.2f} ms",
            flush=True,
        )


# -- one backend ------------------------------------------------------------------------------


def run_backend(backend: str, args: argparse.Namespace, root: Path) -> Result:
    result = Result(backend)
    data_dir = root / backend
    print(f"\n== {backend} ==", flush=True)
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, data_dir, ignore_errors=True)
        db_url: str | None = None
        extra: list[str] = []
        if backend == "postgresql":
            db_url = start_postgres(stack, root)
            extra = ["--db", db_url]
        server = start_server(data_dir, *extra)
        stack.callback(server.stop)  # runs before the cluster's stop (LIFO)
        print(f"  provisiond serve pid {server.pid}, data dir {data_dir}", flush=True)
        try:
            create_enrollments(server, args, result)
            print(
                f"  created {result.count:,} in {result.create_seconds:.1f} s: "
                f"{result.create_rate:,.0f}/s over {result.requests:,} requests "
                f"({result.count / max(1, result.requests):,.0f} enrollments each)",
                flush=True,
            )
            measure_size(server, backend, db_url, result)
            print(f"  database {human_bytes(result.db_bytes)}: {result.db_detail}", flush=True)
            if db_url is not None:
                result.notes.append(f"before the reads: {autovacuum_state(db_url)}")
            measure_reads(server, args, result)
            result.rss, result.rss_peak = rss_of(server.pid)
            if db_url is not None:
                result.notes.append(f"after the reads: {autovacuum_state(db_url)}")
            for note in result.notes:
                print(f"  {note}", flush=True)
        except (ApiError, RuntimeError, OSError):
            print(f"  server log (tail):\n{server.log_tail()}", file=sys.stderr)
            raise
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited early:\n{server.log_tail()}")
    return result


def start_postgres(stack: contextlib.ExitStack, root: Path) -> str:
    """A throwaway cluster with default durability; the URL of a fresh ``provisiond`` database."""
    import psycopg
    from _pg import PostgresCluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) not found; install PostgreSQL")
    cluster = PostgresCluster(bindir)
    stack.callback(cluster.stop)
    admin_url = cluster.start()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE provisiond TEMPLATE template0 ENCODING 'UTF8'")
        settings = {
            name: str(row[0]) if (row := conn.execute(f"SHOW {name}").fetchone()) else "?"
            for name in (
                "server_version",
                "fsync",
                "synchronous_commit",
                "full_page_writes",
                "shared_buffers",
            )
        }
    print(
        f"  PostgreSQL {settings['server_version']} (throwaway cluster, default settings): "
        f"fsync={settings['fsync']}, synchronous_commit={settings['synchronous_commit']}, "
        f"full_page_writes={settings['full_page_writes']}, shared_buffers={settings['shared_buffers']}",
        flush=True,
    )
    return admin_url.rsplit("/", 1)[0] + "/provisiond"


# -- the report -------------------------------------------------------------------------------


def report(results: Sequence[Result]) -> None:
    names = [r.backend for r in results]
    ratio = len(results) == 2 and tuple(names) == BACKENDS
    rows: list[tuple[str, list[str], str]] = []

    def add(label: str, values: list[float], fmt: str, higher_is: str = "") -> None:
        cells = [format(v, fmt) for v in values]
        extra = ""
        if ratio and values[0] and not math.isnan(values[0]) and not math.isnan(values[1]):
            extra = f"{values[1] / values[0]:.2f}x"
        rows.append((label, cells, extra))

    add("enrollments created", [r.count for r in results], ",d")
    add("create time (s)", [r.create_seconds for r in results], ",.1f")
    add("create rate (enrollments/s)", [r.create_rate for r in results], ",.0f")
    add("bulk request p50 (ms)", [r.bulk.p50_ms for r in results], ",.1f")
    add("bulk request p99 (ms)", [r.bulk.p99_ms for r in results], ",.1f")
    add("database size (MiB)", [r.db_bytes / 2**20 for r in results], ",.1f")
    add("bytes per enrollment", [r.db_bytes / max(1, r.count) for r in results], ",.0f")
    add("lookup GET p50 (ms)", [r.lookup.p50_ms for r in results], ".2f")
    add("lookup GET p99 (ms)", [r.lookup.p99_ms for r in results], ".2f")
    add("query page, no WHERE, p50 (ms)", [r.page_all.p50_ms for r in results], ".2f")
    add("query page, no WHERE, p99 (ms)", [r.page_all.p99_ms for r in results], ".2f")
    add("query page, WHERE status, p50 (ms)", [r.page_status.p50_ms for r in results], ".2f")
    add("query page, WHERE status, p99 (ms)", [r.page_status.p99_ms for r in results], ".2f")
    add("query, WHERE deviceId, p50 (ms)", [r.page_device.p50_ms for r in results], ".2f")
    add("query, WHERE deviceId, p99 (ms)", [r.page_device.p99_ms for r in results], ".2f")
    add("full listing (s)", [r.list_seconds for r in results], ",.1f")
    add("server RSS at end (MiB)", [r.rss / 2**20 for r in results], ",.0f")
    add("server peak RSS (MiB)", [r.rss_peak / 2**20 for r in results], ",.0f")

    headers = ["metric", *names, *(["postgresql/sqlite"] if ratio else [])]
    table = [[label, *cells, *([extra] if ratio else [])] for label, cells, extra in rows]
    widths = [max(len(row[i]) for row in [headers, *table]) for i in range(len(headers))]
    print("\n== results ==")
    print(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    )
    print("  ".join("-" * w for w in widths))
    for row in table:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    for r in results:
        print(f"{r.backend} database: {human_bytes(r.db_bytes)} ({r.db_detail})")
        for note in r.notes:
            print(f"{r.backend} {note}")
    print(
        f"Query pages hold {PAGE_SIZE} enrollments and start at a random continuation token from the "
        "listing; WHERE deviceId matches one enrollment. Latencies are client-side, one request at a time."
    )


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--count", type=int, default=1_000_000, help="enrollments to create (default 1,000,000)"
    )
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated: sqlite,postgresql (default both)"
    )
    parser.add_argument(
        "--batch-bytes",
        type=int,
        default=90_000,
        help=f"largest bulk request body in bytes (default 90000; the service refuses more than {MAX_BODY_BYTES})",
    )
    parser.add_argument("--clients", type=int, default=2, help="concurrent bulk senders (default 2)")
    parser.add_argument(
        "--lookups", type=int, default=2000, help="GET /enrollments/{id} to time (default 2000)"
    )
    parser.add_argument("--pages", type=int, default=200, help="query pages to time per kind (default 200)")
    parser.add_argument(
        "--id-order",
        choices=("random", "sequential"),
        default="random",
        help="registration ids in random key order (default, like serial numbers) or sequential",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the random lookups (default 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the temporary data dirs")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - set(BACKENDS)
    if unknown or not args.backends:
        parser.error(f"--backends: choose from {', '.join(BACKENDS)}")
    if args.count < 1 or args.clients < 1 or args.lookups < 1 or args.pages < 1:
        parser.error("--count, --clients, --lookups and --pages must be at least 1")
    if not 1000 <= args.batch_bytes <= MAX_BODY_BYTES:
        parser.error(f"--batch-bytes must be between 1000 and {MAX_BODY_BYTES}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print("provisiond enrollment benchmark")
    print(f"  machine: {machine_summary()}")
    print(
        f"  {args.count:,} symmetric-key individual enrollments per backend, keys generated by the server; "
        f"bulk requests up to {args.batch_bytes:,} bytes from {args.clients} concurrent client(s); "
        f"ids in {args.id_order} order"
    )
    print(f"  {args.lookups:,} lookups and {args.pages:,} query pages of each kind, measured one at a time")
    results: list[Result] = []
    with terminate_on_signals(), contextlib.ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="provisiond-bench-", dir=args.workdir))
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        try:
            for backend in args.backends:
                results.append(run_backend(backend, args, root))
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the servers and removing the temporary files", file=sys.stderr)
            return 130
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
