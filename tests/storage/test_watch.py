"""The watch rules of the storage contract (:mod:`provisiond.storage.base`, "Watches"), on every
backend through the ``store`` fixture: another store on the same database stands for another
process or node. PostgreSQL's watches are live (LISTEN/NOTIFY on a listening connection, which
reconnects when it is lost); SQLite's never are (its readers poll). A watch of the hub outbox
wakes on releases (items left without an owner), the store's own too, on every backend."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import psycopg
import pytest

from provisiond.storage import Collection, Record, Store, Stream, StreamWatch, Write, WriteMode, utc_iso
from tests._postgres import opened_store

SIGNALS = Stream.HUB_SIGNALS
OUTBOX = Collection.HUB_OUTBOX
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


async def put(store: Store, id: str, owner: str | None, *, if_match: str | None = None) -> Record:
    """An outbox item held by ``owner`` for 30 s, or released (None: claimable by anyone now)."""
    due = time.time() + (0 if owner is None else 30)
    return await store.write(
        OUTBOX,
        id,
        b"{}",
        index={"hub": "hub-a", "due": utc_iso(due), "owner": owner},
        mode=WriteMode.UPSERT if if_match is None else WriteMode.UPDATE,
        if_match=if_match,
    )


async def test_the_stores_own_releases_wake_a_watch_of_the_outbox(store: Store) -> None:
    """Every backend: a write that leaves an item without an owner (a new unleased item, one
    put back) wakes the outbox's watches at once; a leased write, a claim, a delete do not."""
    watch = store.watch(OUTBOX)
    try:
        if store.backend == "postgresql":
            await until(watch, live=True)  # (becoming live wakes it)
            await watch.wait(0)
        leased = await put(store, "leased", "node-1")
        await store.delete(OUTBOX, "leased", if_match=leased.etag)
        await store.write(OUTBOX, "due", b"{}", index={"due": utc_iso(time.time()), "owner": "node-1"})
        now = time.time()
        [claimed] = await store.claim(OUTBOX, now=utc_iso(now), until=utc_iso(now + 30), owner="n")
        await store.delete(OUTBOX, "due", if_match=claimed.etag)
        assert await watch.wait(0) is False, "a leased write, a claim, a delete release nothing"
        queued = await put(store, "queued", None)
        assert await watch.wait(0) is True, "a new unleased item wakes the watch"
        [claimed] = await store.claim(
            OUTBOX, now=utc_iso(time.time()), until=utc_iso(time.time() + 30), owner="n"
        )
        assert claimed.id == queued.id and await watch.wait(0) is False
        await put(store, "queued", None, if_match=claimed.etag)  # put back
        assert await watch.wait(0) is True, "an item put back wakes the watch"
        await store.write_atomic([(OUTBOX, Write("other", b"{}", {"due": utc_iso(time.time())}))])
        assert await watch.wait(0) is True, "write_atomic's releases wake it too"
    finally:
        watch.close()


async def test_another_stores_release_wakes_a_live_watch_of_the_outbox(
    store_url: str, store: Store, other: Store
) -> None:
    """Another process's release wakes a live watch (PostgreSQL: it notifies after its commit),
    and its leased writes do not notify: a listener of the channel gets a marker sent after
    them first."""
    watch = store.watch(OUTBOX)
    try:
        if store.backend == "sqlite":
            assert not watch.live, "SQLite cannot wake another process: the writers poll"
            return
        await until(watch, live=True)
        await watch.wait(0)
        async with await psycopg.AsyncConnection.connect(store_url, autocommit=True) as listener:
            await listener.execute("LISTEN provisiond_hub_outbox")
            record = await put(other, "leased", "node-2")
            await put(other, "leased", "node-2", if_match=record.etag)  # a checkpoint
            await listener.execute("SELECT pg_notify('provisiond_hub_outbox', 'marker')")
            released = await put(other, "queued", None)
            assert await watch.wait(WAKE), "another store's release wakes the watch"
            # The wake comes after the commit: the woken claimer finds the item.
            [claimed] = await store.claim(
                OUTBOX, now=utc_iso(time.time()), until=utc_iso(time.time() + 30), owner="n"
            )
            assert claimed.id == released.id
            payloads = []
            async for notify in listener.notifies(timeout=WAKE, stop_after=2):
                payloads.append(notify.payload)
            assert payloads[0] == "marker", "the leased writes before it notified nobody"
            assert payloads[1] != "marker", payloads
    finally:
        watch.close()
