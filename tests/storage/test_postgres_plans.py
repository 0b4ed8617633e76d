"""How PostgreSQL runs the store's reads by key on a table that grew after its first reads (a
fresh database under a first burst of registrations): an index scan, not the sequential scan of
a plan cached while the table was small. Observed through the table's counters
(``pg_stat_user_tables``), which count scans and rows, not time."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from provisiond.storage import Collection
from provisiond.storage.postgres import PostgresStore

pytestmark = pytest.mark.postgres

R, E = Collection.REGISTRATIONS, Collection.ENROLLMENTS


async def _counters(url: str, *, scans: int, inserted: int) -> tuple[int, int]:
    """The registrations table's (sequential, index) scans, once the backends have reported at
    least ``scans`` scans and ``inserted`` inserted rows (a backend reports its counters a
    moment after it goes idle, or when it exits)."""
    row = None
    for _ in range(400):
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            cursor = await conn.execute(
                "SELECT seq_scan, coalesce(idx_scan, 0), n_tup_ins FROM pg_stat_user_tables"
                " WHERE relname = 'registrations'"
            )
            row = await cursor.fetchone()
        assert row is not None
        if row[0] + row[1] >= scans and row[2] >= inserted:
            return int(row[0]), int(row[1])
        await asyncio.sleep(0.05)
    raise AssertionError(f"the registrations table's counters were not reported: {row}")


async def _read_four(store: PostgresStore, n: int) -> None:
    """Four registrations' reads (the record and the enrollment each) in one turn of the event loop."""
    keys = [f"dev-{max(n - k, 0)}" for k in range(4)]
    results = await asyncio.gather(*(store.get_each([(R, key), (E, key)]) for key in keys))
    assert [record and record.id for record, _ in results] == keys


async def _report(store: PostgresStore) -> None:
    """Make the store's (one) backend report its counters as soon as it is idle."""
    async with store._connections.connection() as conn:
        await conn.execute("SELECT pg_stat_force_next_flush()")


async def test_reads_by_key_use_the_index_after_the_table_grew(postgres_db_url: str) -> None:
    store = PostgresStore(postgres_db_url, max_size=1)  # one connection: it made the first reads
    await store.open()
    try:
        # The first registrations, four at a time (their reads go together: one statement per
        # table, four keys): enough reads for psycopg to prepare the statement (on its fifth use)
        # and for PostgreSQL to choose a generic plan of it (after five more), on a small table.
        for n in range(20):
            await store.write(R, f"dev-{n}", b"r")
            await _read_four(store, n)
        # The table grows (on another connection, which reports its rows when it closes).
        async with await psycopg.AsyncConnection.connect(postgres_db_url, autocommit=True) as conn:
            await conn.execute(
                "INSERT INTO registrations (key, id, etag, created, updated, doc)"
                " SELECT 'dev-' || n, 'dev-' || n, 'e', 'c', 'u', '\\x00' FROM generate_series(20, 6000) AS n"
            )
        await _report(store)
        seq, idx = await _counters(postgres_db_url, scans=20, inserted=6001)
        for n in range(100, 120):
            await _read_four(store, n)
        await _report(store)
        seq_after, idx_after = await _counters(postgres_db_url, scans=seq + idx + 20, inserted=6001)
        assert seq_after - seq == 0, "a read by key scanned the whole table"
        assert idx_after - idx >= 20
    finally:
        await store.close()
