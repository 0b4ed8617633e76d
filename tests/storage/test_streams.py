"""The stream rules of the storage contract (:mod:`provisiond.storage.base`, "Streams"), on
every backend through the ``store`` fixture (SQLite on a file, PostgreSQL on a real server)."""

from __future__ import annotations

import asyncio

import pytest

from provisiond.storage import Store, Stream, open_store

EV = Stream.HUB_EVENTS
C2D = Stream.HUB_C2D


async def test_append_then_read_in_order(store: Store) -> None:
    entries = await store.append(EV, [("hub/d1", b"one"), ("hub/d2", b"two"), ("hub/d1", b"three")])
    assert [e.doc for e in entries] == [b"one", b"two", b"three"]
    seqs = [e.seq for e in entries]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert all(e.stream is EV and e.created.endswith("Z") for e in entries)
    read = await store.read(EV)
    assert [(e.seq, e.partition, e.doc) for e in read] == [(e.seq, e.partition, e.doc) for e in entries]
    assert [e.doc for e in await store.read(EV, partition="hub/d1")] == [b"one", b"three"]
    assert [e.doc for e in await store.read(EV, after=seqs[0])] == [b"two", b"three"]
    assert [e.doc for e in await store.read(EV, limit=1)] == [b"one"]
    assert await store.read(C2D) == [], "streams are apart"
    assert await store.entry_count(EV) == 3
    assert await store.entry_count(EV, partition="hub/d2") == 1
    assert await store.append(EV, []) == []


async def test_concurrent_appends_share_transactions_and_keep_every_entry(store: Store) -> None:
    results = await asyncio.gather(
        *(store.append(EV, [(f"hub/d{i % 7}", str(i).encode())]) for i in range(300))
    )
    docs = [entry.doc for result in results for entry in result]
    assert sorted(docs) == sorted(str(i).encode() for i in range(300))
    everything = await store.read(EV, limit=1000)
    assert len(everything) == 300
    assert [e.seq for e in everything] == sorted(e.seq for e in everything)
    # Each caller got its own entries back, with the seq the store holds.
    by_seq = {e.seq: e.doc for e in everything}
    assert all(by_seq[entry.seq] == entry.doc for result in results for entry in result)


async def test_a_cursor_sees_every_entry_once(store: Store) -> None:
    """A reader that pages with ``after`` while others append sees each entry exactly once."""
    seen: list[int] = []
    done = asyncio.Event()

    async def writer() -> None:
        for batch in range(20):
            await asyncio.gather(*(store.append(EV, [("hub/x", f"{batch}-{i}".encode())]) for i in range(10)))
        done.set()

    async def reader() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            page = await store.read(EV, after=cursor, limit=37)
            seen.extend(e.seq for e in page)
            if page:
                cursor = page[-1].seq
            elif finished:
                return
            await asyncio.sleep(0)

    await asyncio.gather(writer(), reader())
    assert len(seen) == 200 and len(set(seen)) == 200 and seen == sorted(seen)


async def test_remove(store: Store) -> None:
    entries = await store.append(C2D, [("hub/d1", b"a"), ("hub/d1", b"b"), ("hub/d2", b"c")])
    assert await store.remove(C2D, [entries[0].seq, entries[2].seq, 10**12]) == 2
    assert [e.doc for e in await store.read(C2D)] == [b"b"]
    assert await store.remove(EV, [entries[1].seq]) == 0, "a seq of another stream is not removed"
    assert await store.remove(C2D, []) == 0


async def test_trim_by_count_and_age(store: Store) -> None:
    first = await store.append(EV, [("hub/a", str(i).encode()) for i in range(5)])
    await store.append(EV, [("hub/b", str(i).encode()) for i in range(3)])
    assert await store.trim(EV, keep=2, partition="hub/a") == 3
    assert [e.doc for e in await store.read(EV, partition="hub/a")] == [b"3", b"4"]
    assert await store.entry_count(EV, partition="hub/b") == 3
    assert await store.trim(EV, keep=4) == 1, "the oldest of the stream goes: hub/a's 3"
    assert await store.entry_count(EV) == 4
    assert [e.doc for e in await store.read(EV, partition="hub/a")] == [b"4"]
    assert await store.trim(EV, keep=10) == 0
    # By age: everything created before a stamp later than all of them.
    assert await store.trim(EV, before="9999-01-01T00:00:00.000000Z", partition="hub/b") == 3
    assert await store.trim(EV, before=first[0].created) == 0, "nothing is older than the first"
    assert await store.trim(EV, before="9999-01-01T00:00:00.000000Z") == 1
    assert await store.entry_count(EV) == 0


async def test_last_seq_tells_where_new_entries_start(store: Store) -> None:
    assert await store.last_seq(EV) == 0, "an empty stream"
    old = await store.append(EV, [("hub/a", b"old"), ("hub/b", b"old2")])
    await store.append(C2D, [("hub/a", b"other stream")])
    assert await store.last_seq(EV) == old[-1].seq, "the newest of this stream, not of the other"
    assert await store.last_seq(EV, before=old[0].created) == 0, "nothing older than the first"
    assert await store.last_seq(EV, before="9999-01-01T00:00:00.000000Z") == old[-1].seq
    new = await store.append(EV, [("hub/a", b"new")])
    # A reader starting at a time between the two appends reads only what came after it.
    start = await store.last_seq(EV, before=new[0].created)
    assert start == old[-1].seq
    assert [e.doc for e in await store.read(EV, after=start)] == [b"new"]
    assert [e.doc for e in await store.read(EV, after=await store.last_seq(EV))] == []


async def test_appends_survive_reopening(store_url: str) -> None:
    store = open_store(store_url)
    await store.open()
    try:
        [entry] = await store.append(EV, [("hub/p", b"kept")])
    finally:
        await store.close()
    again = open_store(store_url)
    await again.open()
    try:
        [read] = await again.read(EV, partition="hub/p")
        assert (read.seq, read.doc) == (entry.seq, b"kept")
        [later] = await again.append(EV, [("hub/p", b"next")])
        assert later.seq > entry.seq, "seqs are never reused"
    finally:
        await again.close()


@pytest.mark.parametrize("partition", ["a\0b", 5])
async def test_bad_partitions(store: Store, partition: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        await store.append(EV, [(partition, b"x")])  # type: ignore[list-item]
