"""The watch rules of the storage contract (:mod:`provisiond.storage.base`, "Watches"), on every
backend through the ``store`` fixture: another store on the same database stands for another
process or node. PostgreSQL's watches are live (LISTEN/NOTIFY on a listening connection, which
reconnects when it is lost); SQLite's never are (its readers poll)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import psycopg
import pytest

from provisiond.storage import Store, Stream, StreamWatch
from tests._postgres import opened_store

SIGNALS = Stream.HUB_SIGNALS
#: A generous bound on a wake that must come (the point is that it comes, not how fast).
WAKE = 30.0


@pytest.fixture
async def other(store_url: str) -> AsyncIterator[Store]:
    """A second store on the test's database: another process, as far as the first knows."""
    async with opened_store(store_url) as opened:
        yield opened


async def until(watch: StreamWatch, live: bool) -> None:
    """Wait until the watch is (not) live: it wakes when that changes."""
    for _ in range(int(WAKE / 0.1)):
        if watch.live is live:
            return
        await watch.wait(0.1)
    raise AssertionError(f"the watch did not become {'live' if live else 'not live'}")


async def test_a_live_watch_wakes_on_what_another_store_appends(store: Store, other: Store) -> None:
    watch = store.watch(SIGNALS)
    try:
        if store.backend == "sqlite":
            assert not watch.live, "SQLite cannot wake another process: its readers poll"
            assert await watch.wait(0.01) is False
            return
        await until(watch, live=True)
        for n in range(3):
            [entry] = await other.append(SIGNALS, [("hub/d", b"%d" % n)])
            assert await watch.wait(WAKE), "another store's append wakes the watch"
            # The wake comes after the commit: the woken reader finds the entry.
            assert [e.seq for e in await store.read(SIGNALS, after=entry.seq - 1)] == [entry.seq]
        other_stream = store.watch(Stream.HUB_EVENTS)
        assert not other_stream.live, "only the signal stream notifies"
        other_stream.close()
    finally:
        watch.close()


async def test_a_wake_before_the_wait_is_kept() -> None:
    """A reader reads, then waits: an append committed in between must not be missed."""
    watch = StreamWatch(SIGNALS)
    watch.wake()
    assert await watch.wait(WAKE) is True
    assert await watch.wait(0) is False, "one wake, one return"


async def test_the_listening_connection_comes_back(
    store_url: str, store: Store, other: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The listening connection is lost (its backend terminated): the watch stops being live and
    wakes (its reader polls), the store connects again, the watch is live and wakes again (its
    reader reads what came meanwhile), and appends wake it as before; one log line each way."""
    if store.backend != "postgresql":
        pytest.skip("SQLite has no listening connection")
    caplog.set_level(logging.WARNING, logger="provisiond.storage.postgres")
    watch = store.watch(SIGNALS)
    try:
        await until(watch, live=True)
        async with await psycopg.AsyncConnection.connect(store_url, autocommit=True) as admin:
            cursor = await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN %%'"
            )
            assert [row[0] for row in await cursor.fetchall()] == [True], "one listening connection"
        await until(watch, live=False)
        await until(watch, live=True)
        [entry] = await other.append(SIGNALS, [("hub/d", b"after")])
        assert await watch.wait(WAKE)
        assert [e.doc for e in await store.read(SIGNALS, after=entry.seq - 1)] == [b"after"]
    finally:
        watch.close()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("no listening connection" in line for line in lines) == 1, lines
    assert sum("listening for notifications again" in line for line in lines) == 1, lines
