"""The storage contract suite: every rule of :mod:`provisiond.storage.base`, run against every
backend through the ``store`` fixture (SQLite on a temporary file, PostgreSQL on a fresh
database of a real server)."""

from __future__ import annotations

import asyncio
import base64
import random
import re
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg
import pytest

from provisiond.errors import (
    ConflictError,
    DatabaseUnavailableError,
    InvalidQueryError,
    NotFoundError,
    PreconditionFailedError,
    ProvisioningError,
    RequestError,
    StorageError,
)
from provisiond.storage import (
    Collection,
    Delete,
    Record,
    Store,
    Write,
    WriteMode,
    new_etag,
    open_store,
)
from provisiond.storage._sql import load_migrations
from provisiond.storage.postgres import PostgresStore
from provisiond.storage.sqlite import SqliteStore
from tests._postgres import wait_for_no_connections

E = Collection.ENROLLMENTS
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
ETAG = re.compile(r'^"[^"]+"$')


async def outcome(coro: object) -> object:
    """The result of ``coro``, or the contract error it raised (as a value)."""
    try:
        return await coro  # type: ignore[misc]
    except ProvisioningError as exc:
        return exc


def ids(records: list[Record]) -> list[str]:
    return [record.id for record in records]


async def query_all(store: Store, collection: Collection, limit: int, **filters: str) -> list[list[Record]]:
    pages: list[list[Record]] = []
    continuation: str | None = None
    while True:
        page = await store.query(collection, filters=filters or None, limit=limit, continuation=continuation)
        pages.append(page.records)
        continuation = page.continuation
        if continuation is None:
            return pages
        assert len(pages) < 100, "paging does not end"


# -- schema -----------------------------------------------------------------------------------


async def test_schema_version_is_the_last_migration(store: Store) -> None:
    dialect = "sqlite" if store.backend == "sqlite" else "postgresql"
    assert await store.schema_version() == load_migrations(dialect)[-1].version


@pytest.mark.parametrize("collection", list(Collection), ids=lambda c: c.name.lower())
async def test_every_collection_stores_and_filters_its_index_columns(
    store: Store, collection: Collection
) -> None:
    index = {column: f"{column}-value" for column in collection.index_columns}
    # A key prefix column's value starts the key ("Key prefixes": the hub devices' hub).
    id = (
        "Some-Id" if collection.key_prefix_column is None else f"{collection.key_prefix_column}-value/Some-Id"
    )
    written = await store.write(collection, id, b'{"a": 1}', index=index)
    assert written.index == index
    assert await store.get(collection, id) == written
    for column, value in index.items():
        assert ids((await store.query(collection, filters={column: value})).records) == [id]
        assert await store.count(collection, filters={column: value}) == 1
        assert await store.count(collection, filters={column: "other"}) == 0


# -- records, keys, etags, timestamps ------------------------------------------------------------


async def test_write_returns_the_record_as_stored(store: Store) -> None:
    doc = b'{"x": "\xc3\xa9"}\x00\xff'  # bytes come back exactly, even ones that are not UTF-8
    written = await store.write(E, "dev-1", doc, index={"device_id": "d1", "attestation_type": "tpm"})
    assert written.id == "dev-1"
    assert written.doc == doc
    assert ETAG.match(written.etag)
    assert TIMESTAMP.match(written.created) and written.created == written.updated
    assert written.index == {
        "device_id": "d1",
        "provisioning_status": None,
        "attestation_type": "tpm",
        "iot_hub_host_name": None,
    }
    assert await store.get(E, "dev-1") == written
    assert await store.get(E, "nope") is None


async def test_keys_are_case_insensitive_and_the_first_id_is_kept(store: Store) -> None:
    first = await store.write(E, "MyDevice", b"1")
    assert (await store.get(E, "mydevice")) == first
    assert (await store.get(E, "MYDEVICE")) == first
    second = await store.write(E, "MYDEVICE", b"2")
    assert second.id == "MyDevice"
    assert second.created == first.created
    assert isinstance(await outcome(store.write(E, "mydevice", b"3", mode=WriteMode.CREATE)), ConflictError)
    assert await store.count(E) == 1
    found = await store.get_many(E, ["MYDEVICE", "myDevice", "missing"])
    assert list(found) == ["mydevice"]
    assert found["mydevice"].doc == b"2"
    deleted = await store.delete(E, "MyDEVICE")
    assert deleted.id == "MyDevice"
    assert await store.get(E, "mydevice") is None


async def test_hub_device_keys_are_case_sensitive(store: Store) -> None:
    hub = Collection.HUB_DEVICES
    upper = await store.write(hub, "hub.example/Dev", b"1", index={"hub": "hub.example"})
    lower = await store.write(hub, "hub.example/dev", b"2", index={"hub": "hub.example"})
    assert upper.etag != lower.etag
    assert await store.count(hub) == 2
    assert (await store.get(hub, "hub.example/Dev")) == upper
    assert await store.get(hub, "HUB.EXAMPLE/DEV") is None
    assert sorted(await store.get_many(hub, ["hub.example/Dev", "hub.example/dev", "hub.example/DEV"])) == [
        "hub.example/Dev",
        "hub.example/dev",
    ]
    assert ids((await store.query(hub, filters={"id": "hub.example/dev"})).records) == ["hub.example/dev"]


async def test_etag_changes_on_every_write_and_never_repeats(store: Store) -> None:
    seen = [(await store.write(E, "dev", b"0")).etag]
    for n in range(1, 8):
        seen.append((await store.write(E, "dev", str(n).encode(), if_match=seen[-1])).etag)
    seen.append((await store.write(E, "dev", b"x", mode=WriteMode.UPDATE)).etag)
    await store.delete(E, "dev")
    seen.append((await store.write(E, "dev", b"again", mode=WriteMode.CREATE)).etag)
    [batch] = await store.write_many(E, [Write("dev", b"batch")])
    assert isinstance(batch, Record)
    seen.append(batch.etag)
    assert len(set(seen)) == len(seen)
    assert all(ETAG.match(etag) for etag in seen)


async def test_created_is_kept_and_updated_is_bumped(store: Store) -> None:
    first = await store.write(E, "dev", b"1")
    await asyncio.sleep(0.002)
    second = await store.write(E, "dev", b"2")
    third = await store.write(E, "dev", b"3", mode=WriteMode.UPDATE, if_match="*")
    assert first.created == second.created == third.created
    assert first.updated < second.updated <= third.updated
    assert all(TIMESTAMP.match(r.updated) for r in (first, second, third))
    assert (await store.get(E, "dev")) == third
    # A record deleted and created again starts over.
    await store.delete(E, "dev")
    again = await store.write(E, "dev", b"4")
    assert again.created == again.updated >= third.updated


async def test_index_values_are_replaced_on_every_write(store: Store) -> None:
    await store.write(E, "dev", b"1", index={"device_id": "d1", "provisioning_status": "enabled"})
    updated = await store.write(E, "dev", b"2", index={"device_id": "d2"})
    assert updated.index["device_id"] == "d2" and updated.index["provisioning_status"] is None
    assert await store.count(E, filters={"provisioning_status": "enabled"}) == 0
    assert await store.count(E, filters={"device_id": "d2"}) == 1


async def test_unknown_index_column_is_a_value_error_and_writes_nothing(store: Store) -> None:
    with pytest.raises(ValueError, match="hub"):
        await store.write(E, "dev", b"1", index={"hub": "x"})
    with pytest.raises(ValueError):
        await store.write_many(E, [Write("ok", b"1"), Write("bad", b"2", index={"nope": "x"})])
    assert await store.count(E) == 0


# -- conditional writes ---------------------------------------------------------------------------

IF_MATCH_FORMS: dict[str, Callable[[str], str | None]] = {
    "none": lambda etag: None,
    "star": lambda etag: "*",
    "quoted": lambda etag: etag,
    "unquoted": lambda etag: etag.strip('"'),
    "weak": lambda etag: f"W/{etag}",
    "stale": lambda etag: new_etag(),
}
MATRIX = [(exists, mode, form) for exists in (True, False) for mode in WriteMode for form in IF_MATCH_FORMS]


def expected_error(exists: bool, mode: WriteMode, form: str) -> type[ProvisioningError] | None:
    """The contract: ``if_match`` first (it needs an existing record), then the write mode."""
    if form != "none" and (not exists or form == "stale"):
        return PreconditionFailedError
    if exists and mode is WriteMode.CREATE:
        return ConflictError
    if not exists and mode is WriteMode.UPDATE:
        return NotFoundError
    return None


def case_id(exists: bool, mode: WriteMode, form: str) -> str:
    return f"{'exists' if exists else 'missing'}-{mode.value}-{form}"


async def test_write_mode_and_if_match_matrix(store: Store) -> None:
    """Every WriteMode x if_match form, on an existing and a missing record, through write()."""
    problems = []
    for exists, mode, form in MATRIX:
        id = case_id(exists, mode, form)
        seed = await store.write(E, id, b"old") if exists else None
        if_match = IF_MATCH_FORMS[form](seed.etag if seed else new_etag())
        result = await outcome(store.write(E, id, b"new", mode=mode, if_match=if_match))
        expected = expected_error(exists, mode, form)
        stored = await store.get(E, id)
        if expected is not None:
            if not isinstance(result, expected) or stored != seed:
                problems.append(f"{id}: expected {expected.__name__}, got {result!r}, stored {stored!r}")
        elif not isinstance(result, Record) or stored != result or result.doc != b"new":
            problems.append(f"{id}: expected a write, got {result!r}, stored {stored!r}")
        elif seed is not None and (result.etag == seed.etag or result.created != seed.created):
            problems.append(f"{id}: etag kept or created changed: {seed!r} -> {result!r}")
    assert not problems, "\n".join(problems)


async def test_write_many_follows_the_same_matrix(store: Store) -> None:
    """The same cases in one batch: the same per-item outcomes."""
    seeds = await store.write_many(E, [Write(case_id(*case), b"old") for case in MATRIX if case[0]])
    etags = {record.id: record.etag for record in seeds if isinstance(record, Record)}
    items = [
        Write(
            case_id(*case),
            b"new",
            mode=case[1],
            if_match=IF_MATCH_FORMS[case[2]](etags.get(case_id(*case), new_etag())),
        )
        for case in MATRIX
    ]
    outcomes = await store.write_many(E, items)
    assert len(outcomes) == len(MATRIX)
    for case, result in zip(MATRIX, outcomes, strict=True):
        expected = expected_error(*case)
        stored = await store.get(E, case_id(*case))
        if expected is None:
            assert isinstance(result, Record) and result == stored, case_id(*case)
        else:
            assert isinstance(result, expected), (case_id(*case), result)
            assert (stored.etag if stored else None) == etags.get(case_id(*case)), case_id(*case)


@pytest.mark.parametrize("form", ["none", "star", "quoted", "unquoted", "weak"])
async def test_delete_returns_the_deleted_record(store: Store, form: str) -> None:
    written = await store.write(E, "Dev", b"doc", index={"device_id": "d"})
    deleted = await store.delete(E, "DEV", if_match=IF_MATCH_FORMS[form](written.etag))
    assert deleted == written
    assert await store.get(E, "dev") is None
    assert await store.count(E) == 0


async def test_delete_failures_write_nothing(store: Store) -> None:
    written = await store.write(E, "dev", b"doc")
    with pytest.raises(PreconditionFailedError):
        await store.delete(E, "dev", if_match=new_etag())
    assert await store.get(E, "dev") == written
    with pytest.raises(NotFoundError):
        await store.delete(E, "missing")
    # As for writes, if_match is checked first: any if_match on a missing record fails it.
    for if_match in ("*", new_etag()):
        with pytest.raises(PreconditionFailedError):
            await store.delete(E, "missing", if_match=if_match)


async def test_write_many_has_one_outcome_per_item(store: Store) -> None:
    existing = await store.write(E, "a", b"a0")
    outcomes = await store.write_many(
        E,
        [
            Write("a", b"a1", mode=WriteMode.CREATE),  # conflict
            Write("b", b"b1", mode=WriteMode.CREATE),  # created
            Write("B", b"b2", mode=WriteMode.CREATE),  # conflict with the item before it
            Write("c", b"c1", mode=WriteMode.UPDATE),  # not found
            Write("A", b"a2", if_match=existing.etag),  # updated
            Write("a", b"a3", if_match=existing.etag),  # stale now: the item before changed it
            Delete("b"),  # deletes the record this batch created
            Delete("b"),  # not found any more
            Delete("zzz", if_match="*"),  # precondition failed
            Write("d", b"d1", index={"device_id": "dd"}),  # upsert: created
        ],
    )
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == [
        "ConflictError",
        "Record",
        "ConflictError",
        "NotFoundError",
        "Record",
        "PreconditionFailedError",
        "Record",
        "NotFoundError",
        "PreconditionFailedError",
        "Record",
    ]
    updated, deleted = outcomes[4], outcomes[6]
    assert isinstance(updated, Record) and updated.id == "a" and updated.doc == b"a2"
    assert isinstance(deleted, Record) and deleted.id == "b" and deleted.doc == b"b1"
    stored = await store.get_many(E, ["a", "b", "c", "d"])
    assert {key: r.doc for key, r in stored.items()} == {"a": b"a2", "d": b"d1"}
    assert stored["a"] == updated
    assert await store.write_many(E, []) == []


# -- reads and queries -----------------------------------------------------------------------------


async def test_get_many(store: Store) -> None:
    await store.write_many(E, [Write(f"Dev-{n:04d}", b"%d" % n) for n in range(0, 1200, 2)])
    asked = [f"DEV-{n:04d}" for n in range(1200)] + ["dev-0000", "missing"]
    found = await store.get_many(E, asked)
    assert sorted(found) == [f"dev-{n:04d}" for n in range(0, 1200, 2)]
    assert found["dev-0010"].id == "Dev-0010" and found["dev-0010"].doc == b"10"
    assert await store.get_many(E, []) == {}


async def test_get_each_and_concurrent_point_reads(store: Store) -> None:
    """Point reads across collections, alone and many at once (which PostgreSQL answers
    together, in one statement): each gets its own record, or None."""
    await store.write_many(E, [Write(f"Dev-{n}", b"e%d" % n) for n in range(0, 40, 2)])
    await store.write_many(R, [Write(f"Dev-{n}", b"r%d" % n) for n in range(0, 40, 3)])
    pairs = [(c, f"DEV-{n}") for n in range(40) for c in (E, R)] + [(E, "nul\x00id"), (R, "missing")]
    expected = [
        (b"e%d" if c is E else b"r%d") % n if n % (2 if c is E else 3) == 0 else None
        for n in range(40)
        for c in (E, R)
    ] + [None, None]
    each = await store.get_each(pairs)
    assert [r.doc if r else None for r in each] == expected
    assert each[0] is not None and each[0].id == "Dev-0"
    alone = await asyncio.gather(*(store.get(c, id) for c, id in pairs))
    assert list(alone) == each
    assert await store.get_each([]) == []


async def test_get_each_of_a_few_records_across_tables(store: Store) -> None:
    """A registration's kind of point reads (a few, SQLite's one statement): tables of different
    widths, one table twice, a missing key and a key no record can have; each answer in its
    place, with its index values."""
    await store.write(R, "Dev-1", b"r1", index={"status": "assigned", "device_id": "dev-1"})
    await store.write(E, "Dev-1", b"e1")
    await store.write(E, "Dev-2", b"e2")
    pairs = [(R, "DEV-1"), (E, "dev-1"), (R, "dev-2"), (E, "DEV-2"), (E, "nul\x00id")]
    each = await store.get_each(pairs)
    assert [r.doc if r else None for r in each] == [b"r1", b"e1", None, b"e2", None]
    assert each[0] is not None and each[0].index["status"] == "assigned" and each[0].id == "Dev-1"
    assert each == list(await asyncio.gather(*(store.get(c, id) for c, id in pairs)))
    assert await store.get_each([(E, "dev-2")]) == [await store.get(E, "Dev-2")]


async def test_query_filters(store: Store) -> None:
    await store.write_many(
        E,
        [
            Write(
                f"dev-{n}",
                b"{}",
                index={"device_id": f"d{n % 3}", "provisioning_status": "enabled" if n % 2 else "disabled"},
            )
            for n in range(12)
        ],
    )
    page = await store.query(E, filters={"device_id": "d1"})
    assert ids(page.records) == ["dev-1", "dev-10", "dev-4", "dev-7"]
    assert page.continuation is None
    both = await store.query(E, filters={"device_id": "d1", "provisioning_status": "enabled"})
    assert ids(both.records) == ["dev-1", "dev-7"]
    assert await store.count(E, filters={"device_id": "d1", "provisioning_status": "enabled"}) == 2
    assert ids((await store.query(E, filters={"id": "DEV-5"})).records) == ["dev-5"]
    assert ids((await store.query(E, filters={"id": "dev-5", "device_id": "d0"})).records) == []
    empty = await store.query(E, filters={"device_id": "nobody"})
    assert empty.records == [] and empty.continuation is None
    assert await store.count(E) == 12
    assert await store.count(E, filters={"provisioning_status": "disabled"}) == 6
    assert (await store.query(Collection.LINKED_HUBS)).records == []


async def test_a_nul_in_an_id_or_a_filter_value_finds_nothing(store: Store) -> None:
    """The service never writes a NUL (PostgreSQL text cannot hold one), but clients send
    anything: reads with one find nothing, on every backend, instead of a driver error."""
    await store.write(E, "dev-1", b"{}", index={"device_id": "d1"})
    assert await store.get(E, "dev-1\x00") is None
    assert await store.get(Collection.HUB_DEVICES, "\x00") is None
    assert sorted(await store.get_many(E, ["dev-1", "dev\x00-1"])) == ["dev-1"]
    for filters in ({"device_id": "d1\x00"}, {"id": "\x00"}, {"id": "dev-1", "device_id": "\x00"}):
        page = await store.query(E, filters=filters)
        assert page.records == [] and page.continuation is None
        assert await store.count(E, filters=filters) == 0
    token = base64.urlsafe_b64encode(b"k1:dev\x00").decode().rstrip("=")
    with pytest.raises(InvalidQueryError):
        await store.query(E, continuation=token)


@pytest.mark.parametrize("filters", [{"nope": "x"}, {"hub": "x"}, {"key": "x"}, {"etag": "x"}])
async def test_unknown_filter_is_a_value_error(store: Store, filters: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        await store.query(E, filters=filters)
    with pytest.raises(ValueError):
        await store.count(E, filters=filters)


async def test_paging_returns_every_record_once(store: Store) -> None:
    names = [f"Dev-{n:03d}" for n in range(250)]
    random.Random(7).shuffle(names)
    await store.write_many(E, [Write(name, b"{}", index={"device_id": "all"}) for name in names])
    for filters in ({}, {"device_id": "all"}):
        pages = await query_all(store, E, 100, **filters)
        assert [len(page) for page in pages] == [100, 100, 50]
        assert [r.id for page in pages for r in page] == sorted(names)
    # A last page that is exactly full still ends the paging.
    assert [len(page) for page in await query_all(store, E, 125)] == [125, 125]
    assert [len(page) for page in await query_all(store, E, 250)] == [250]


async def test_query_all_pages_through_everything(store: Store) -> None:
    names = [f"All-{n:04d}" for n in range(2100)]
    await store.write_many(
        E,
        [Write(name, b"{}", index={"device_id": "even" if n % 2 else "odd"}) for n, name in enumerate(names)],
    )
    assert [r.id for r in await store.query_all(E)] == names
    assert [r.id for r in await store.query_all(E, filters={"device_id": "even"})] == names[1::2]


async def test_paging_is_keyset_across_writes(store: Store) -> None:
    await store.write_many(E, [Write(f"k{n}", b"{}") for n in range(10, 40)])
    first = await store.query(E, limit=10)
    assert ids(first.records) == [f"k{n}" for n in range(10, 20)]
    assert first.continuation is not None
    await store.write(E, "k05", b"{}")  # behind the cursor: not returned
    await store.write(E, "k15", b"changed")  # already returned: not returned again
    await store.write(E, "k35a", b"{}")  # ahead: returned
    await store.delete(E, "k25")  # ahead, deleted: not returned
    await store.delete(E, "k19")  # the cursor's own record going away does not matter
    rest: list[str] = []
    continuation: str | None = first.continuation
    while continuation is not None:
        page = await store.query(E, limit=10, continuation=continuation)
        rest += ids(page.records)
        continuation = page.continuation
    expected = sorted([f"k{n}" for n in range(20, 40) if n != 25] + ["k35a"])
    assert rest == expected


async def test_key_order_does_not_depend_on_the_database_locale(store: Store) -> None:
    names = ["a-b", "ab", "a_b", "A1", "a.b", "B", "a b", "é", "z", "Z0", "aB", "a~"]
    await store.write_many(E, [Write(name, b"{}") for name in names])
    # Keys compare as Unicode code points (UTF-8 bytes) on both backends.
    expected = sorted({name.lower() for name in names})
    pages = await query_all(store, E, 3)
    assert [E.key(r.id) for page in pages for r in page] == expected
    # Case-sensitive keys too: "B" < "Z0" < "a-b" in code point order, not in a locale's.
    hub = Collection.HUB_DEVICES
    await store.write_many(hub, [Write(name, b"{}") for name in names])
    assert [r.id for page in await query_all(store, hub, 5) for r in page] == sorted(names)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("!!!", id="not-base64"),
        pytest.param("", id="empty"),
        pytest.param("a", id="bad-padding"),
        pytest.param(base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(), id="not-utf8"),
        pytest.param(base64.urlsafe_b64encode(b"some key").decode(), id="no-prefix"),
        pytest.param("k1:dev-1", id="raw-key"),
    ],
)
async def test_bad_continuation_is_an_invalid_query(store: Store, token: str) -> None:
    with pytest.raises(InvalidQueryError) as info:
        await store.query(E, continuation=token)
    assert isinstance(info.value, RequestError)


async def test_limit_must_be_positive(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.query(E, limit=0)


# -- settings ---------------------------------------------------------------------------------------


async def test_settings(store: Store) -> None:
    assert await store.get_setting("id_scope") is None
    await store.set_setting("id_scope", "0ne0001")
    assert await store.get_setting("id_scope") == "0ne0001"
    await store.set_setting("id_scope", "0ne0002")
    assert await store.get_setting("id_scope") == "0ne0002"
    assert await store.setting_setdefault("id_scope", "other") == "0ne0002"
    assert await store.setting_setdefault("signing_key", "k1") == "k1"
    assert await store.get_setting("signing_key") == "k1"


async def test_concurrent_setdefault_has_one_winner(store: Store) -> None:
    values = [f"value-{n}" for n in range(30)]
    results = await asyncio.gather(*(store.setting_setdefault("key", value) for value in values))
    assert len(set(results)) == 1
    assert results[0] in values
    assert await store.get_setting("key") == results[0]


# -- concurrency ------------------------------------------------------------------------------------


async def test_concurrent_creates_have_one_winner(store: Store) -> None:
    results = await asyncio.gather(
        *(
            outcome(store.write(E, "Race" if n % 2 else "race", b"%d" % n, mode=WriteMode.CREATE))
            for n in range(50)
        )
    )
    winners = [r for r in results if isinstance(r, Record)]
    assert len(winners) == 1
    assert all(isinstance(r, ConflictError) for r in results if not isinstance(r, Record))
    assert await store.get(E, "race") == winners[0]


async def test_concurrent_conditional_updates_have_one_winner(store: Store) -> None:
    start = await store.write(E, "dev", b"start")
    results = await asyncio.gather(
        *(outcome(store.write(E, "dev", b"%d" % n, if_match=start.etag)) for n in range(50))
    )
    winners = [r for r in results if isinstance(r, Record)]
    assert len(winners) == 1
    assert all(isinstance(r, PreconditionFailedError) for r in results if not isinstance(r, Record))
    assert await store.get(E, "dev") == winners[0]


async def test_concurrent_batches_on_overlapping_keys(store: Store) -> None:
    """Batches touching the same (new and existing) keys in different orders all succeed."""
    await store.write_many(E, [Write(f"old-{n}", b"{}") for n in range(10)])
    keys = [f"old-{n}" for n in range(10)] + [f"new-{n}" for n in range(10)]

    def batch(seed: int) -> list[Write | Delete]:
        order = keys[:]
        random.Random(seed).shuffle(order)
        return [Write(key, b"%d" % seed) for key in order]

    results = await asyncio.gather(*(store.write_many(E, batch(seed)) for seed in range(12)))
    assert all(isinstance(o, Record) for outcomes in results for o in outcomes)
    assert await store.count(E) == 20


# -- lifecycle and nodes ----------------------------------------------------------------------------


async def test_close_is_idempotent_and_a_closed_store_refuses_work(store_url: str) -> None:
    store = open_store(store_url)
    await store.open()
    await store.open()  # already open: nothing happens
    await store.write(E, "dev", b"kept")
    await store.close()
    await store.close()
    with pytest.raises(StorageError):
        await store.get(E, "dev")
    # SQLite: no thread (and so no connection) left behind; PostgreSQL's connections are
    # checked by the postgres_db_url fixture and test_postgres_close_releases_every_connection.
    assert [t.name for t in threading.enumerate() if t.name.startswith("provisiond-sqlite")] == []
    # The same instance opens again, and a new one finds the data too.
    await store.open()
    try:
        assert (await store.get(E, "dev")).doc == b"kept"  # type: ignore[union-attr]
    finally:
        await store.close()
    again = open_store(store_url)
    await again.open()
    try:
        assert (await again.get(E, "dev")).doc == b"kept"  # type: ignore[union-attr]
        assert await again.schema_version() == await _version(again)
    finally:
        await again.close()


async def _version(store: Store) -> int:
    return load_migrations("sqlite" if store.backend == "sqlite" else "postgresql")[-1].version


async def test_two_nodes_share_one_database(store_url: str) -> None:
    one, two = open_store(store_url), open_store(store_url)
    await asyncio.gather(one.open(), two.open())  # both migrate at once: safe
    try:
        assert await one.schema_version() == await two.schema_version() == await _version(one)
        written = await one.write(E, "Dev", b"from one")
        assert await two.get(E, "dev") == written
        updated = await two.write(E, "dev", b"from two", if_match=written.etag)
        assert await one.get(E, "DEV") == updated
        with pytest.raises(PreconditionFailedError):
            await one.write(E, "dev", b"stale", if_match=written.etag)
        results = await asyncio.gather(
            *(outcome(node.write(E, "race", b"x", mode=WriteMode.CREATE)) for node in (one, two) * 10)
        )
        assert sum(isinstance(r, Record) for r in results) == 1
        assert sum(isinstance(r, ConflictError) for r in results) == 19
        assert await two.setting_setdefault("k", "two") == await one.setting_setdefault("k", "one")
    finally:
        await asyncio.gather(one.close(), two.close())


async def test_driver_errors_become_storage_errors(store: Store, store_url: str) -> None:
    await store.write(Collection.LINKED_HUBS, "hub", b"{}")
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store_url) as conn:
            conn.execute("DROP TABLE linked_hubs")
        conn.close()
        driver_error: type[Exception] = sqlite3.Error
    else:
        with psycopg.connect(store_url, autocommit=True) as pg:
            pg.execute("DROP TABLE linked_hubs")
        driver_error = psycopg.Error
    for call in (
        store.get(Collection.LINKED_HUBS, "hub"),
        store.write(Collection.LINKED_HUBS, "hub", b"{}"),
        store.query(Collection.LINKED_HUBS),
    ):
        with pytest.raises(StorageError) as info:
            await call
        assert isinstance(info.value.__cause__, driver_error)


async def test_opening_an_unusable_sqlite_file_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = SqliteStore(blocker / "db.sqlite")
    with pytest.raises(StorageError):
        await store.open()
    await store.close()


async def test_sqlite_stores_opening_one_new_file_together(tmp_path: Path) -> None:
    """Switching a new file to WAL does not wait for busy_timeout by itself; open() does."""
    for round in range(10):
        stores = [SqliteStore(tmp_path / f"{round}.sqlite") for _ in range(4)]
        try:
            await asyncio.gather(*(store.open() for store in stores))
            versions = await asyncio.gather(*(store.schema_version() for store in stores))
            assert set(versions) == {await _version(stores[0])}
        finally:
            await asyncio.gather(*(store.close() for store in stores))


async def test_sqlite_readers_do_not_wait_for_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = SqliteStore(path, busy_timeout=0.2)
    await store.open()
    try:
        await store.write(E, "dev", b"committed")
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
            other.execute("DELETE FROM enrollments")
            # A reader that had to wait for the lock would fail after busy_timeout instead.
            assert (await store.get(E, "dev")).doc == b"committed"  # type: ignore[union-attr]
            assert await store.count(E) == 1
            # A write waits busy_timeout, then fails with the retryable 503.
            with pytest.raises(DatabaseUnavailableError) as caught:
                await store.write(E, "dev", b"blocked")
            assert caught.value.http_status == 503 and caught.value.retry_after >= 1
            assert "locked" in caught.value.message
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert (await store.write(E, "dev", b"free again")).doc == b"free again"
    finally:
        await store.close()


@pytest.mark.postgres
async def test_postgres_close_releases_every_connection(postgres_url: str, postgres_db_url: str) -> None:
    store = PostgresStore(postgres_db_url, max_size=6)
    await store.open()
    await asyncio.gather(*(store.write(E, f"dev-{n}", b"{}") for n in range(30)))
    dbname = postgres_db_url.rsplit("/", 1)[1]
    with psycopg.connect(postgres_url) as admin:
        row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)).fetchone()
    assert row is not None and 1 <= row[0] <= 6
    await store.close()
    assert wait_for_no_connections(postgres_url, dbname) == 0


@pytest.mark.postgres
async def test_postgres_unreachable_server_is_a_storage_error(postgres_url: str) -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/postgres", connect_timeout=0.5)
    with pytest.raises(DatabaseUnavailableError, match="port 1 failed: Connection refused"):
        await store.open()
    await store.close()


@pytest.mark.postgres
async def test_postgres_lost_connections_are_retryable_and_replaced(
    postgres_url: str, postgres_db_url: str
) -> None:
    """Every connection of the store dies under it (an administrator, a crashed backend) while
    the server stays up: the call that meets a dead connection fails with the retryable 503,
    and the store serves again by itself, on new connections, without being reopened."""
    store = PostgresStore(postgres_db_url, min_size=2, max_size=2)
    await store.open()
    try:
        await store.write(E, "dev", b"kept")
        assert await store.ping() is None
        dbname = postgres_db_url.rsplit("/", 1)[1]
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s",
                (dbname,),
            ).fetchone()
        assert killed is not None and killed[0] == 2
        with pytest.raises(DatabaseUnavailableError) as caught:
            await store.get(E, "dev")
        assert caught.value.http_status == 503 and caught.value.retry_after >= 1
        assert "terminating connection" in caught.value.message
        for _ in range(200):  # each try fails at once or succeeds; recovery takes one probe
            try:
                record = await store.get(E, "dev")
                break
            except DatabaseUnavailableError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("the store did not serve again on new connections")
        assert record is not None and record.doc == b"kept"
        assert (await store.write(E, "dev", b"again")).doc == b"again"
    finally:
        await store.close()


# -- write_atomic: all or nothing, across collections ------------------------------------------------

H = Collection.HUB_DEVICES
R = Collection.REGISTRATIONS
L = Collection.LINKED_HUBS
CREATE = WriteMode.CREATE


async def snapshot(store: Store) -> dict[Collection, list[Record]]:
    """Every record of every collection, to show that a failed write_atomic wrote nothing."""
    return {c: [r for page in await query_all(store, c, 1000) for r in page] for c in Collection}


def hub_and_registration(n: int, reverse: bool = False) -> list[tuple[Collection, Write | Delete]]:
    """The registrar's pair: a hub identity and a registration record, both CREATE."""
    items: list[tuple[Collection, Write | Delete]] = [
        (H, Write("hub.example/Dev", b"hub-%d" % n, index={"hub": "hub.example"}, mode=CREATE)),
        (R, Write("Dev" if n % 2 else "dev", b"reg-%d" % n, index={"device_id": "Dev"}, mode=CREATE)),
    ]
    return items[::-1] if reverse else items


async def test_write_atomic_applies_every_item_across_collections(store: Store) -> None:
    registration = await store.write(R, "Dev-1", b"r0", index={"device_id": "Dev-1"})
    enrollment = await store.write(E, "enr", b"e0", index={"device_id": "x"})
    linked = await store.write(L, "hub.example", b"l0")
    records = await store.write_atomic(
        [
            (H, Write("hub.example/Dev-1", b"h1", index={"hub": "hub.example"}, mode=CREATE)),
            (
                R,
                Write(
                    "DEV-1",
                    b"r1",
                    index={"device_id": "Dev-1", "status": "assigned"},
                    mode=WriteMode.UPDATE,
                    if_match=registration.etag,
                ),
            ),
            (E, Write("ENR", b"e1")),  # an upsert of an existing record
            (L, Delete("HUB.example", if_match=linked.etag)),
            (E, Write("new", b"n1", mode=WriteMode.UPSERT)),
        ]
    )
    assert ids(records) == ["hub.example/Dev-1", "Dev-1", "enr", "hub.example", "new"]
    assert [r.doc for r in records] == [b"h1", b"r1", b"e1", b"l0", b"n1"]
    hub, reg, enr, deleted, new = records
    assert await store.get(H, "hub.example/Dev-1") == hub
    assert hub.index == {"hub": "hub.example", "status": None, "connection_state": None}
    assert hub.created == hub.updated and TIMESTAMP.match(hub.created)
    assert await store.get(R, "dev-1") == reg and reg.created == registration.created
    assert reg.index["status"] == "assigned"
    assert await store.get(E, "enr") == enr and enr.created == enrollment.created
    assert enr.index["device_id"] is None  # index values are replaced, as by write()
    assert deleted == linked and await store.get(L, "hub.example") is None
    assert await store.get(E, "new") == new
    etags = [hub.etag, reg.etag, enr.etag, new.etag]
    assert len(set(etags)) == 4 and all(ETAG.match(etag) for etag in etags)
    assert not {registration.etag, enrollment.etag} & set(etags)


ATOMIC_FAILURES: dict[str, tuple[Write | Delete, type[ProvisioningError]]] = {
    "conflict": (Write("seeded", b"x", mode=CREATE), ConflictError),
    "stale-etag": (Write("seeded", b"x", if_match='"stale"'), PreconditionFailedError),
    "update-missing": (Write("missing", b"x", mode=WriteMode.UPDATE), NotFoundError),
    "if-match-missing": (Write("missing", b"x", if_match="*"), PreconditionFailedError),
    "delete-missing": (Delete("missing"), NotFoundError),
    "delete-stale-etag": (Delete("seeded", if_match='"stale"'), PreconditionFailedError),
}


@pytest.mark.parametrize("failure", list(ATOMIC_FAILURES))
async def test_write_atomic_with_a_failing_item_writes_nothing(store: Store, failure: str) -> None:
    registration = await store.write(R, "reg", b"r0", index={"device_id": "d"})
    seeded = await store.write(E, "seeded", b"s0")
    doomed = await store.write(L, "doomed", b"l0")
    other = await store.write(E, "other", b"o0")
    before = await snapshot(store)
    bad, error = ATOMIC_FAILURES[failure]
    items: list[tuple[Collection, Write | Delete]] = [
        (H, Write("hub/dev", b"h", index={"hub": "hub"}, mode=CREATE)),  # would create
        (R, Write("reg", b"r1", mode=WriteMode.UPDATE, if_match=registration.etag)),  # would update
        (E, bad),
        (L, Delete("doomed")),  # would delete
        (E, Write("other", b"o1", if_match=other.etag)),  # would update
    ]
    with pytest.raises(error) as info:
        await store.write_atomic(items)
    assert repr(bad.id) in str(info.value)  # the failing item's own error
    assert await snapshot(store) == before
    assert await store.get(H, "hub/dev") is None
    assert await store.get(R, "reg") == registration
    assert await store.get(E, "seeded") == seeded
    assert await store.get(L, "doomed") == doomed
    assert await store.get(E, "other") == other
    # Nothing was left locked or half-done: the other items still go through together.
    records = await store.write_atomic(items[:2] + items[3:])
    assert [r.doc for r in records] == [b"h", b"r1", b"l0", b"o1"]


async def test_write_atomic_raises_the_first_failing_item(store: Store) -> None:
    await store.write(E, "taken", b"0")
    items: list[tuple[Collection, Write | Delete]] = [
        (E, Write("fine", b"1")),
        (R, Delete("gone")),
        (E, Write("taken", b"1", mode=CREATE)),
    ]
    with pytest.raises(NotFoundError, match="'gone'"):
        await store.write_atomic(items)
    with pytest.raises(ConflictError, match="'taken'"):
        await store.write_atomic(items[::-1])
    assert await store.get(E, "fine") is None
    assert (await store.get(E, "taken")).doc == b"0"  # type: ignore[union-attr]


async def test_write_atomic_large_batch_is_all_or_nothing(store: Store) -> None:
    """More items than SQLite writes on the caller's thread: the writer thread's path."""
    items: list[tuple[Collection, Write | Delete]] = [
        (E if n % 2 else R, Write(f"dev-{n:02d}", b"%d" % n, mode=CREATE)) for n in range(40)
    ]
    await store.write(R, "dev-38", b"taken")
    with pytest.raises(ConflictError, match="dev-38"):
        await store.write_atomic(items)
    assert (await store.count(E), await store.count(R)) == (0, 1)
    records = await store.write_atomic(items[:38])
    assert ids(records) == [f"dev-{n:02d}" for n in range(38)]
    assert (await store.count(E), await store.count(R)) == (19, 20)


async def test_write_atomic_validates_before_writing(store: Store) -> None:
    assert await store.write_atomic([]) == []
    bad_calls: list[list[tuple[Collection, Write | Delete]]] = [
        [(E, Write("a", b"1")), (E, Write("a", b"2"))],
        [(E, Write("a", b"1")), (R, Write("b", b"2")), (E, Delete("A"))],  # one key, two cases
        [(H, Write("h/x", b"1")), (H, Write("h/x", b"2", mode=CREATE))],
        [(E, Write("a", b"1")), (R, Write("b", b"2", index={"nope": "x"}))],
        [(E, Write("a", b"1")), (H, Write("h/x", b"2", index={"device_id": "x"}))],  # not H's column
    ]
    for items in bad_calls:
        with pytest.raises(ValueError):
            await store.write_atomic(items)
    assert all(records == [] for records in (await snapshot(store)).values())
    # One id in several collections, and ids that differ in case where keys are case-sensitive,
    # are different records.
    records = await store.write_atomic(
        [
            (E, Write("Dev", b"1")),
            (R, Write("dev", b"2")),
            (H, Write("h/Dev", b"3")),
            (H, Write("h/dev", b"4")),
        ]
    )
    assert ids(records) == ["Dev", "dev", "h/Dev", "h/dev"]


async def test_concurrent_write_atomic_creates_have_one_winner(store: Store) -> None:
    results = await asyncio.gather(
        *(outcome(store.write_atomic(hub_and_registration(n, reverse=n % 3 == 0))) for n in range(40))
    )
    winners = [r for r in results if isinstance(r, list)]
    assert len(winners) == 1, results
    assert all(isinstance(r, ConflictError) for r in results if not isinstance(r, list))
    stored = [await store.get(H, "hub.example/Dev"), await store.get(R, "dev")]
    assert sorted(winners[0], key=lambda r: r.doc) == stored  # one task's pair, whole


#: Index values a text encoding of arrays must quote or escape (PostgreSQL's array input:
#: braces, delimiters, quotes, backslashes, white space, the word NULL, the empty string).
AWKWARD = ["NULL", "null", "", " ", '"{a,b}"', "back\\slash", "tab\tand\nline", "\u3000", "é✓"]


async def test_concurrent_creates_keep_awkward_values_and_documents(store: Store) -> None:
    """First registrations' shape (an identity and a record created together), many at once so
    that PostgreSQL writes them as one statement of arrays: every index value (None apart from
    the text "NULL") and every document byte comes back as written, by point reads, reads
    across tables and filtered queries."""
    docs = [bytes(range(256)) * 2 + b"%d" % n for n in range(len(AWKWARD))]
    calls = [
        [
            (
                H,
                Write(
                    f"hub.example/d{n}", docs[n], index={"hub": "hub.example", "status": value}, mode=CREATE
                ),
            ),
            (R, Write(f"d{n}", docs[n][::-1], index={"device_id": value, "status": None}, mode=CREATE)),
        ]
        for n, value in enumerate(AWKWARD)
    ]
    written = await asyncio.gather(*(store.write_atomic(call) for call in calls))
    for n, value in enumerate(AWKWARD):
        hub, reg = written[n]
        assert await store.get_each([(H, f"hub.example/d{n}"), (R, f"d{n}")]) == [hub, reg]
        assert hub.doc == docs[n] and hub.index["status"] == value
        assert reg.doc == docs[n][::-1] and reg.index == {**reg.index, "device_id": value, "status": None}
        page = await store.query(H, filters={"status": value})
        assert [r.id for r in page.records] == [f"hub.example/d{n}"]
    found = await store.get_many(R, [f"d{n}" for n in range(len(AWKWARD))])
    assert sorted(r.index["device_id"] for r in found.values()) == sorted(AWKWARD)


async def test_updates_told_their_index_before_store_the_whole_index(store: Store) -> None:
    """``Write.index_before`` (the index of the version ``if_match`` names) changes nothing a
    caller sees: every index column holds the new value, changed or not, by reads and queries;
    a stale etag still fails the update."""
    old = {
        "device_id": "dev-1",
        "status": "assigned",
        "assigned_hub": "hub.example",
        "enrollment_group_id": "g",
    }
    first = await store.write(R, "Dev-1", b"r0", index=old)
    new = {**old, "status": "disabled", "operation_id": "op-2"}
    item = Write(
        "DEV-1", b"r1", index=new, mode=WriteMode.UPDATE, if_match=first.etag, index_before=first.index
    )
    [written] = await store.write_atomic([(R, item)])
    assert written.index == {**first.index, **new} and await store.get(R, "dev-1") == written
    assert [r.id for r in (await store.query(R, filters={"status": "disabled"})).records] == ["Dev-1"]
    assert [r.id for r in (await store.query(R, filters={"enrollment_group_id": "g"})).records] == ["Dev-1"]
    with pytest.raises(PreconditionFailedError):
        await store.write_atomic([(R, item)])  # the etag it names is gone


async def test_concurrent_write_atomic_calls_fail_alone(store: Store) -> None:
    """Concurrent calls (which SQLite commits together, in one transaction): the ones whose
    last item fails leave nothing behind; the others are all written."""
    await store.write(E, "seeded", b"s")

    def items(n: int) -> list[tuple[Collection, Write | Delete]]:
        last = (E, Write("seeded", b"x", mode=CREATE)) if n % 2 else (R, Write(f"dev-{n}", b"r", mode=CREATE))
        return [(H, Write(f"hub/dev-{n}", b"h", index={"hub": "hub"}, mode=CREATE)), last]

    results = await asyncio.gather(*(outcome(store.write_atomic(items(n))) for n in range(24)))
    for n, result in enumerate(results):
        if n % 2:
            assert isinstance(result, ConflictError), result
            assert await store.get(H, f"hub/dev-{n}") is None
        else:
            assert isinstance(result, list) and ids(result) == [f"hub/dev-{n}", f"dev-{n}"]
            assert await store.get(H, f"hub/dev-{n}") == result[0]
    assert (await store.count(H), await store.count(R), await store.count(E)) == (12, 12, 1)


@pytest.mark.parametrize("if_match", ["*", '"some-etag"'])
async def test_write_atomic_creates_with_if_match_on_a_missing_record_fail(
    store: Store, if_match: str
) -> None:
    """``if_match`` is checked before the mode, in ``write_atomic`` too: a CREATE with one on a
    record that does not exist is a failed precondition (PostgreSQL's one-statement creates
    once wrote it)."""
    items: list[tuple[Collection, Write | Delete]] = [
        (H, Write("hub.example/Dev", b"h", index={"hub": "hub.example"}, mode=CREATE, if_match=if_match)),
        (R, Write("dev", b"r", index={"device_id": "Dev"}, mode=CREATE)),
    ]
    with pytest.raises(PreconditionFailedError, match="hub.example/Dev"):
        await store.write_atomic(items)
    with pytest.raises(PreconditionFailedError, match="hub.example/Dev"):
        await store.write_atomic(items[:1])
    assert (await store.count(H), await store.count(R)) == (0, 0)


def re_registration(hub: Record, reg: Record, n: int) -> list[tuple[Collection, Write | Delete]]:
    """The registrar's re-registration: the identity and the record, each updated on its etag."""
    return [
        (
            H,
            Write(
                hub.id, b"hub-%d" % n, index={"hub": "hub.example"}, mode=WriteMode.UPDATE, if_match=hub.etag
            ),
        ),
        (
            R,
            Write(
                reg.id, b"reg-%d" % n, index={"device_id": "Dev"}, mode=WriteMode.UPDATE, if_match=reg.etag
            ),
        ),
    ]


@pytest.mark.parametrize("stale", ["first", "second", "gone"])
async def test_write_atomic_updates_on_etags_are_all_or_nothing(store: Store, stale: str) -> None:
    """Updates on etags only (PostgreSQL writes them as one statement): one etag that no
    longer matches, or a row that is gone, and nothing is written; the error names it."""
    hub, reg = await store.write_atomic(hub_and_registration(0))
    if stale == "first":
        moved = await store.write(H, hub.id, b"moved", index={"hub": "hub.example"})
    elif stale == "second":
        moved = await store.write(R, reg.id, b"moved", index={"device_id": "Dev"})
    else:
        moved = await store.delete(R, reg.id)
    before = await snapshot(store)
    with pytest.raises(PreconditionFailedError) as info:
        await store.write_atomic(re_registration(hub, reg, 1))
    assert repr(moved.id) in str(info.value)
    assert await snapshot(store) == before
    if stale == "first":
        hub = moved
    elif stale == "second":
        reg = moved
    else:
        return
    records = await store.write_atomic(re_registration(hub, reg, 2))
    assert [r.doc for r in records] == [b"hub-2", b"reg-2"]
    assert [await store.get(H, hub.id), await store.get(R, reg.id)] == records
    assert [(r.id, r.created) for r in records] == [(hub.id, hub.created), (reg.id, reg.created)]
    assert records[1].index == {**reg.index, "device_id": "Dev"}
    assert not {hub.etag, reg.etag} & {r.etag for r in records}


async def test_concurrent_re_registrations_have_one_winner_and_fail_alone(store: Store) -> None:
    """Concurrent updates of one pair on the same etags (which PostgreSQL sends in one
    transaction): exactly one commits, whole; the others fail with 412 and write nothing. Calls
    on other pairs in the same turn go through, and so do they when creates in the same turn
    fail."""
    hub, reg = await store.write_atomic(hub_and_registration(0))
    others = []
    for n in range(8):
        others.append(
            await store.write_atomic(
                [
                    (H, Write(f"hub.example/o{n}", b"h", index={"hub": "hub.example"}, mode=CREATE)),
                    (R, Write(f"o{n}", b"r", index={"device_id": f"o{n}"}, mode=CREATE)),
                ]
            )
        )
    calls = [outcome(store.write_atomic(re_registration(hub, reg, n))) for n in range(24)]
    calls += [outcome(store.write_atomic(re_registration(h, r, 100))) for h, r in others]
    # Creates of keys that exist, in the same turn: PostgreSQL's shared transaction fails, and
    # every call is then made alone.
    calls += [outcome(store.write_atomic(hub_and_registration(n))) for n in range(4)]
    results = await asyncio.gather(*calls)
    assert all(isinstance(r, ConflictError) for r in results[-4:]), results[-4:]
    results = results[:-4]
    winners = [r for r in results[:24] if isinstance(r, list)]
    assert len(winners) == 1, results
    assert all(isinstance(r, PreconditionFailedError) for r in results[:24] if not isinstance(r, list))
    assert winners[0] == [await store.get(H, hub.id), await store.get(R, reg.id)]
    assert winners[0][0].doc[4:] == winners[0][1].doc[4:]  # one call's pair, whole
    for result in results[24:]:
        assert isinstance(result, list) and [r.doc for r in result] == [b"hub-100", b"reg-100"]


async def test_concurrent_write_atomic_on_overlapping_keys(store: Store) -> None:
    """Transactions over the same (new and existing) keys in different orders, mixed with
    batches and single writes: none deadlocks or fails."""
    await store.write_many(E, [Write(f"k{n}", b"old") for n in range(3)])
    keys = [(c, f"k{n}") for c in (E, R) for n in range(6)]

    def items(seed: int) -> list[tuple[Collection, Write | Delete]]:
        order = keys[:]
        random.Random(seed).shuffle(order)
        return [(c, Write(key, b"%d" % seed)) for c, key in order]

    calls: list[Awaitable[object]] = [store.write_atomic(items(seed)) for seed in range(12)]
    calls += [
        store.write_many(E, [Write(item.id, b"m") for c, item in items(seed) if c is E]) for seed in range(4)
    ]
    calls += [store.write(R, "k3", b"w") for _ in range(4)]
    results = await asyncio.gather(*calls)
    assert all(isinstance(o, Record) for r in results for o in (r if isinstance(r, list) else [r]))
    assert (await store.count(E), await store.count(R)) == (6, 6)


async def test_two_nodes_race_write_atomic(store_url: str) -> None:
    one, two = open_store(store_url), open_store(store_url)
    await asyncio.gather(one.open(), two.open())
    try:
        # The same CREATE pair from both nodes, in both orders: exactly one commits.
        results = await asyncio.gather(
            *(
                outcome(node.write_atomic(hub_and_registration(n, n % 4 < 2)))
                for n, node in enumerate((one, two) * 10)
            )
        )
        winners = [r for r in results if isinstance(r, list)]
        assert len(winners) == 1, results
        assert sum(isinstance(r, ConflictError) for r in results) == 19
        assert sorted(winners[0], key=lambda r: r.doc) == [
            await two.get(H, "hub.example/Dev"),
            await one.get(R, "dev"),
        ]
        # Against a plain CREATE of one of its keys on the other node: the pair commits whole,
        # or nothing of it does.
        for n in range(20):
            atomic, single = await asyncio.gather(
                outcome(
                    one.write_atomic(
                        [
                            (H, Write(f"hub/{n}", b"pair", mode=CREATE)),
                            (R, Write(f"r{n}", b"pair", mode=CREATE)),
                        ]
                    )
                ),
                outcome(two.write(R, f"r{n}", b"single", mode=CREATE)),
            )
            if isinstance(atomic, list):
                assert isinstance(single, ConflictError)
                assert [await two.get(H, f"hub/{n}"), await two.get(R, f"r{n}")] == atomic
            else:
                assert isinstance(atomic, ConflictError) and isinstance(single, Record)
                assert await one.get(H, f"hub/{n}") is None
                assert await one.get(R, f"r{n}") == single
    finally:
        await asyncio.gather(one.close(), two.close())


async def test_two_nodes_race_re_registrations(store_url: str) -> None:
    """The same re-registration (both rows updated on the etags read) from two nodes, many
    times over, several rounds: each round exactly one call commits, whole, and the others
    fail with 412 (on PostgreSQL: separate transactions, whose row locks re-check the etags)."""
    one, two = open_store(store_url), open_store(store_url)
    await asyncio.gather(one.open(), two.open())
    try:
        hub, reg = await one.write_atomic(hub_and_registration(0))
        for round_ in range(5):
            results = await asyncio.gather(
                *(
                    outcome(node.write_atomic(re_registration(hub, reg, 100 * round_ + n)))
                    for n, node in enumerate((one, two) * 8)
                )
            )
            winners = [r for r in results if isinstance(r, list)]
            assert len(winners) == 1, results
            assert sum(isinstance(r, PreconditionFailedError) for r in results) == 15, results
            hub, reg = winners[0]
            assert [await two.get(H, hub.id), await one.get(R, reg.id)] == [hub, reg]
            assert hub.doc[4:] == reg.doc[4:]  # one call's pair
    finally:
        await asyncio.gather(one.close(), two.close())


async def test_sqlite_write_atomic_waits_for_another_writer(tmp_path: Path) -> None:
    """With the write lock taken, a small write_atomic goes to the writer thread and waits."""
    path = tmp_path / "db.sqlite"
    store = SqliteStore(path)
    await store.open()
    try:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute(
                "INSERT INTO registrations (key, id, etag, created, updated, doc) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    "dev",
                    "Dev",
                    new_etag(),
                    "2024-01-01T00:00:00.000000Z",
                    "2024-01-01T00:00:00.000000Z",
                    b"other",
                ),
            )
            task = asyncio.create_task(store.write_atomic(hub_and_registration(0)))
            await asyncio.sleep(0.2)
            assert not task.done()
            other.execute("COMMIT")
        finally:
            other.close()
        with pytest.raises(ConflictError):
            await task
        assert await store.get(H, "hub.example/Dev") is None
        assert (
            len(await store.write_atomic([(H, Write("hub.example/Dev", b"h")), (E, Write("e", b"e"))])) == 2
        )
    finally:
        await store.close()


@pytest.mark.postgres
@pytest.mark.parametrize("mode", [WriteMode.CREATE, WriteMode.UPSERT])
async def test_postgres_write_atomic_losing_an_insert_race(postgres_db_url: str, mode: WriteMode) -> None:
    """Another node inserts a key after write_atomic looked (and found nothing to lock): the
    item is decided again on that row. A CREATE fails and rolls the whole transaction back;
    an UPSERT updates the row."""
    store = PostgresStore(postgres_db_url)
    await store.open()
    try:
        async with await psycopg.AsyncConnection.connect(postgres_db_url) as other:
            await other.execute(
                "INSERT INTO registrations (key, id, etag, created, updated, doc) VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    "dev",
                    "Dev",
                    new_etag(),
                    "2024-01-01T00:00:00.000000Z",
                    "2024-01-01T00:00:00.000000Z",
                    b"other",
                ),
            )  # not committed yet: invisible to write_atomic's look, but its insert waits for it
            items = [(H, Write("hub.example/Dev", b"h", mode=mode)), (R, Write("DEV", b"r", mode=mode))]
            task = asyncio.create_task(store.write_atomic(items))
            await asyncio.sleep(0.3)
            assert not task.done()
            await other.commit()
        if mode is WriteMode.CREATE:
            with pytest.raises(ConflictError):
                await task
            assert await store.get(H, "hub.example/Dev") is None
            assert (await store.get(R, "dev")).doc == b"other"  # type: ignore[union-attr]
        else:
            hub, reg = await task
            assert reg.id == "Dev" and reg.created == "2024-01-01T00:00:00.000000Z" and reg.doc == b"r"
            assert [await store.get(H, "hub.example/Dev"), await store.get(R, "dev")] == [hub, reg]
    finally:
        await store.close()
