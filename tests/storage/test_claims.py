"""The storage contract's claims (:meth:`Store.claim`, the module docstring's "Claims"), against
every backend: due order, the lease, filters, the etag a claimer keeps the record by, and
disjoint claims from concurrent tasks and from two stores on one database (two nodes)."""

from __future__ import annotations

import asyncio

import pytest

from provisiond.errors import PreconditionFailedError
from provisiond.storage import Collection, Record, Store, WriteMode, open_store, utc_iso

OUTBOX = Collection.HUB_OUTBOX
T0 = 1_700_000_000.0


def at(seconds: float) -> str:
    return utc_iso(T0 + seconds)


async def put(store: Store, id: str, *, due: float, hub: str = "hub-a", owner: str | None = None) -> Record:
    return await store.write(
        OUTBOX, id, b'{"n":"%s"}' % id.encode(), index={"hub": hub, "due": at(due), "owner": owner}
    )


async def test_claims_take_due_records_oldest_first(store: Store) -> None:
    await put(store, "c", due=3)
    await put(store, "A", due=1)
    await put(store, "b", due=1)
    await put(store, "later", due=100)
    claimed = await store.claim(OUTBOX, now=at(10), until=at(40), owner="node-1", limit=10)
    assert [r.id for r in claimed] == ["A", "b", "c"]  # due order, then key order
    for record in claimed:
        assert record.index["due"] == at(40) and record.index["owner"] == "node-1"
        assert record.index["hub"] == "hub-a"
        assert await store.get(OUTBOX, record.id) == record  # returned as stored
    assert claimed[0].doc == b'{"n":"A"}'  # the document is untouched


async def test_a_claim_takes_at_most_limit(store: Store) -> None:
    for n in range(5):
        await put(store, f"dev-{n}", due=n)
    first = await store.claim(OUTBOX, now=at(10), until=at(40), owner="one", limit=2)
    second = await store.claim(OUTBOX, now=at(10), until=at(40), owner="two", limit=2)
    rest = await store.claim(OUTBOX, now=at(10), until=at(40), owner="three", limit=2)
    assert [r.id for r in first] == ["dev-0", "dev-1"]
    assert [r.id for r in second] == ["dev-2", "dev-3"]
    assert [r.id for r in rest] == ["dev-4"]
    assert await store.claim(OUTBOX, now=at(10), until=at(40), owner="four") == []


async def test_a_claimed_record_is_due_again_when_its_lease_ends(store: Store) -> None:
    await put(store, "dev", due=0)
    [leased] = await store.claim(OUTBOX, now=at(1), until=at(30), owner="one")
    assert await store.claim(OUTBOX, now=at(29), until=at(60), owner="two") == []
    [taken_over] = await store.claim(OUTBOX, now=at(30), until=at(60), owner="two")
    assert taken_over.id == "dev" and taken_over.etag != leased.etag
    assert taken_over.index["owner"] == "two"


async def test_the_claimer_keeps_the_record_by_its_etag(store: Store) -> None:
    before = await put(store, "dev", due=0)
    [claimed] = await store.claim(OUTBOX, now=at(1), until=at(30), owner="one")
    assert claimed.etag != before.etag
    with pytest.raises(PreconditionFailedError):  # whoever read it before the claim
        await store.write(OUTBOX, "dev", b"{}", index={"hub": "hub-a", "due": at(0)}, if_match=before.etag)
    # The holder renews its lease (a checkpoint) on the claim's etag ...
    renewed = await store.write(
        OUTBOX,
        "dev",
        b'{"step":2}',
        index={"hub": "hub-a", "due": at(60), "owner": "one"},
        if_match=claimed.etag,
    )
    # ... and someone who took it over after the lease ended makes the holder's next write fail.
    [other] = await store.claim(OUTBOX, now=at(60), until=at(90), owner="two")
    assert other.doc == b'{"step":2}'
    with pytest.raises(PreconditionFailedError):
        await store.delete(OUTBOX, "dev", if_match=renewed.etag)
    await store.delete(OUTBOX, "dev", if_match=other.etag)
    assert await store.get(OUTBOX, "dev") is None


async def test_claims_filter_on_index_columns(store: Store) -> None:
    await put(store, "a1", due=0, hub="hub-a")
    await put(store, "b1", due=0, hub="hub-b")
    await put(store, "a2", due=1, hub="hub-a")
    claimed = await store.claim(OUTBOX, now=at(5), until=at(9), owner="x", limit=10, filters={"hub": "hub-b"})
    assert [r.id for r in claimed] == ["b1"]
    claimed = await store.claim(OUTBOX, now=at(5), until=at(9), owner="x", limit=10, filters={"hub": "hub-a"})
    assert [r.id for r in claimed] == ["a1", "a2"]
    assert await store.claim(OUTBOX, now=at(5), until=at(9), owner="x", filters={"hub": "bad\x00hub"}) == []


async def test_records_put_back_with_a_later_due_wait(store: Store) -> None:
    await put(store, "dev", due=0)
    [claimed] = await store.claim(OUTBOX, now=at(1), until=at(30), owner="one")
    # A backoff: the holder puts it back, unowned, due later.
    await store.write(
        OUTBOX,
        "dev",
        claimed.doc,
        index={"hub": "hub-a", "due": at(10)},
        mode=WriteMode.UPDATE,
        if_match=claimed.etag,
    )
    assert await store.claim(OUTBOX, now=at(9), until=at(30), owner="two") == []
    [again] = await store.claim(OUTBOX, now=at(10), until=at(30), owner="two")
    assert again.index["owner"] == "two"


async def test_claims_refuse_collections_without_a_lease(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.claim(Collection.ENROLLMENTS, now=at(0), until=at(1), owner="x")
    with pytest.raises(ValueError):
        await store.claim(OUTBOX, now=at(0), until=at(1), owner="x", limit=0)
    with pytest.raises(ValueError):
        await store.claim(OUTBOX, now=at(0), until=at(1), owner="x", filters={"nope": "1"})


async def test_next_due_is_the_earliest_due_leases_included(store: Store) -> None:
    """When a claim may next find a record no write announced: a backoff's end, a lease's end."""
    assert await store.next_due(OUTBOX) is None
    await put(store, "later", due=50)
    await put(store, "soon", due=5)
    assert await store.next_due(OUTBOX) == at(5)
    [leased] = await store.claim(OUTBOX, now=at(5), until=at(20), owner="one")
    assert leased.id == "soon"
    assert await store.next_due(OUTBOX) == at(20), "a leased record is due again at its lease's end"
    await store.delete(OUTBOX, "soon", if_match=leased.etag)
    assert await store.next_due(OUTBOX) == at(50)
    with pytest.raises(ValueError):
        await store.next_due(Collection.ENROLLMENTS)


async def test_concurrent_claims_are_disjoint(store: Store) -> None:
    for n in range(60):
        await put(store, f"dev-{n:02}", due=n % 7)
    batches = await asyncio.gather(
        *(store.claim(OUTBOX, now=at(10), until=at(40), owner=f"w{n}", limit=4) for n in range(20))
    )
    taken = [record.id for batch in batches for record in batch]
    assert len(taken) == len(set(taken)) == 60
    for n, batch in enumerate(batches):
        assert all(record.index["owner"] == f"w{n}" for record in batch)


async def test_two_nodes_claim_disjoint_records(store_url: str) -> None:
    one, two = open_store(store_url), open_store(store_url)
    await asyncio.gather(one.open(), two.open())
    try:
        for n in range(40):
            await put(one, f"dev-{n:02}", due=0)
        batches = await asyncio.gather(
            *(
                node.claim(OUTBOX, now=at(1), until=at(30), owner=f"{node_name}-{n}", limit=3)
                for n in range(10)
                for node_name, node in (("one", one), ("two", two))
            )
        )
        taken = [record.id for batch in batches for record in batch]
        assert len(taken) == len(set(taken)) == 40
    finally:
        await asyncio.gather(one.close(), two.close())
