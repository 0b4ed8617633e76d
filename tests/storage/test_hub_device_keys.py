"""Schema 10: the hub devices have no (hub, key) index. A filter on ``hub`` reads the key range
``["{hub}/", "{hub}0")`` of the primary key (``Collection.key_prefix_column``), on both
backends: the same records and counts as the equality alone, across pages; hubs whose names are
prefixes of each other kept apart; a write whose hub is not its key's prefix refused; the
query plans read the key's index (SQLite ``EXPLAIN QUERY PLAN``, PostgreSQL ``EXPLAIN`` with a
custom and a generic plan); a schema 9 database upgraded in place with its identities."""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Mapping
from pathlib import Path

import psycopg
import pytest

from provisiond.errors import ProvisioningError
from provisiond.storage import Collection, Write, WriteMode, _sql, open_store
from provisiond.storage._sql import ParamStyle, load_migrations
from provisiond.storage.base import Store

H = Collection.HUB_DEVICES

#: Hubs whose names are prefixes of one another, or differ from one another just below or
#: above ``/`` ("-" and "." sort before it, "0" right after it).
HUBS = ("hub.a", "hub.a.b", "hub-a", "hub.a0", "hub.ab", "hub")
#: Device ids that sit at the edges of a hub's range: the empty id, ids starting below and
#: above "/" and "0", one with a "/", characters outside ASCII and outside the BMP.
DEVICES = ("", "-", ".", "/", "0", "0x", "a/b", "z", "\u00e9", "\uffff", "\U0001f600")


def hub_write(hub: str, device: str, *, status: str = "enabled", state: str = "Disconnected") -> Write:
    return Write(
        f"{hub}/{device}",
        b"{}",
        index={"hub": hub, "status": status, "connection_state": state},
        mode=WriteMode.CREATE,
    )


async def fill(store: Store) -> dict[str, list[str]]:
    """Every hub's devices (every third disabled, every fourth connected); the ids by hub, in
    key order."""
    writes = [
        hub_write(
            hub,
            device,
            status="disabled" if n % 3 == 0 else "enabled",
            state="Connected" if n % 4 == 0 else "Disconnected",
        )
        for hub in HUBS
        for n, device in enumerate(DEVICES)
    ]
    # Records with no hub at all, whose keys still fall in the ranges: the equality leaves them out.
    writes += [Write(f"{hub}/nohub", b"{}") for hub in HUBS]
    outcomes = await store.write_many(H, writes)
    assert not [o for o in outcomes if isinstance(o, ProvisioningError)]
    return {hub: sorted(f"{hub}/{device}" for device in DEVICES) for hub in HUBS}


async def paged(store: Store, filters: Mapping[str, str], limit: int) -> list[str]:
    ids: list[str] = []
    continuation: str | None = None
    while True:
        page = await store.query(H, filters=filters, limit=limit, continuation=continuation)
        assert len(page.records) <= limit
        ids += [record.id for record in page.records]
        if page.continuation is None:
            return ids
        continuation = page.continuation


def key_sorted(ids: list[str]) -> list[str]:
    return sorted(ids, key=lambda id: id.encode())  # code point order, as both backends sort keys


async def test_a_hubs_devices_are_its_key_range_exactly(store: Store) -> None:
    by_hub = await fill(store)
    assert await store.count(H) == len(HUBS) * (len(DEVICES) + 1)
    for hub, expected in by_hub.items():
        assert await store.count(H, filters={"hub": hub}) == len(DEVICES)
        for limit in (1, 3, 100):
            assert await paged(store, {"hub": hub}, limit) == key_sorted(expected), (hub, limit)
        # The other filters still narrow the hub's devices (through their own indexes).
        for column, value, every in (("status", "disabled", 3), ("connection_state", "Connected", 4)):
            selected = [f"{hub}/{d}" for n, d in enumerate(DEVICES) if n % every == 0]
            assert await paged(store, {"hub": hub, column: value}, 2) == key_sorted(selected)
            assert await store.count(H, filters={"hub": hub, column: value}) == len(selected)
        # An id filter within the hub, and one of another hub.
        assert [r.id for r in (await store.query(H, filters={"hub": hub, "id": f"{hub}/z"})).records] == [
            f"{hub}/z"
        ]
        assert (
            await store.query(H, filters={"hub": hub, "id": "hub.a.b/z" if hub != "hub.a.b" else "hub.a/z"})
        ).records == []
    for missing in ("hub.", "hu", "hub.a/", "hub.a.b.c", "HUB.A"):
        assert await store.count(H, filters={"hub": missing}) == 0
        assert (await store.query(H, filters={"hub": missing})).records == []


async def test_paging_a_hub_resumes_after_writes_in_between(store: Store) -> None:
    """Keyset paging over the key range: records created behind the cursor are not returned,
    ahead of it they are, and other hubs' new records (at either end of the range) never."""
    for n in range(10):
        await store.write_many(H, [hub_write(hub, f"d{n:02}") for hub in ("hub.a", "hub.a.b", "hub.a0")])
    page = await store.query(H, filters={"hub": "hub.a"}, limit=4)
    assert [r.id for r in page.records] == [f"hub.a/d{n:02}" for n in range(4)]
    await store.write_many(
        H,
        [hub_write("hub.a", "a"), hub_write("hub.a", "d05x"), hub_write("hub.a", "\U0001f600")]
        + [hub_write("hub.a.b", "zz"), hub_write("hub.a0", "0"), hub_write("hub-a", "d05y")],
    )
    rest = await paged_from(store, {"hub": "hub.a"}, 4, page.continuation)
    assert rest == [
        *(f"hub.a/d{n:02}" for n in range(4, 6)),
        "hub.a/d05x",
        *(f"hub.a/d{n:02}" for n in range(6, 10)),
        "hub.a/\U0001f600",
    ]
    # A token made after any record (Store.continuation_after) resumes the range after it.
    token = store.continuation_after(H, "hub.a/d08")
    assert await paged_from(store, {"hub": "hub.a"}, 1, token) == ["hub.a/d09", "hub.a/\U0001f600"]
    # A token from another hub's range (below or above it) gives the range's part after it.
    assert len(await paged_from(store, {"hub": "hub.a"}, 5, store.continuation_after(H, "hub.a.b/zz"))) == 13
    assert await paged_from(store, {"hub": "hub.a"}, 5, store.continuation_after(H, "hub.a0/0")) == []


async def paged_from(
    store: Store, filters: Mapping[str, str], limit: int, continuation: str | None
) -> list[str]:
    ids: list[str] = []
    while continuation is not None:
        page = await store.query(H, filters=filters, limit=limit, continuation=continuation)
        ids += [record.id for record in page.records]
        continuation = page.continuation
    return ids


@pytest.mark.parametrize(
    ("key", "hub"),
    [
        pytest.param("hub.a.b/dev", "hub.a", id="longer-hub"),
        pytest.param("hub.a/dev", "hub.a.b", id="shorter-hub"),
        pytest.param("hub.a/dev", "HUB.A", id="case"),
        pytest.param("hub.a", "hub.a", id="no-slash"),
        pytest.param("hub.adev", "hub.a", id="no-slash-after-it"),
    ],
)
async def test_a_write_whose_hub_is_not_its_keys_prefix_is_refused(store: Store, key: str, hub: str) -> None:
    with pytest.raises(ValueError, match="not its key's prefix"):
        await store.write(H, key, b"{}", index={"hub": hub})
    with pytest.raises(ValueError, match="not its key's prefix"):
        await store.write_many(
            H, [Write("hub.a/ok", b"{}", index={"hub": "hub.a"}), Write(key, b"{}", index={"hub": hub})]
        )
    with pytest.raises(ValueError, match="not its key's prefix"):
        await store.write_atomic(
            [
                (H, Write("hub.a/ok", b"{}", index={"hub": "hub.a"})),
                (H, Write(key, b"{}", index={"hub": hub})),
            ]
        )
    assert await store.count(H) == 0
    # Without a hub, or another collection's hub column, any key goes.
    await store.write(H, key, b"{}")
    await store.write(Collection.HUB_POLICIES, key, b"{}", index={"hub": hub})


# --- query plans ---------------------------------------------------------------------------------

#: The filters the registry, the management API and the hub's statistics use, with the index each
#: is read through: the key's (its range for a hub alone), or the status or connection state one.
PLANS = [
    pytest.param({"hub": "hub.a"}, "pkey", id="hub"),
    pytest.param({"hub": "hub.a", "status": "disabled"}, "hub_devices_status_idx", id="hub-disabled"),
    pytest.param({"hub": "hub.a", "status": "enabled"}, "hub_devices_status_idx", id="hub-enabled"),
    pytest.param(
        {"hub": "hub.a", "connection_state": "Connected"},
        "hub_devices_connection_state_idx",
        id="hub-connected",
    ),
    pytest.param({"hub": "hub.a", "id": "hub.a/x"}, "pkey", id="hub-id"),
]


def statements(filters: Mapping[str, str], style: ParamStyle) -> list[tuple[str, str, list[object]]]:
    """The store's statements for ``filters``: a first page, a page after a key, a count."""
    first = _sql.page_query(H, filters, 100, None, style)
    after = _sql.page_query(H, filters, 100, _sql.encode_continuation("hub.a/m"), style)
    columns, params = _sql.filter_params(H, filters)
    count = (_sql.count_sql(H, columns, style), list(params))
    return [("page", *first), ("page", *after), ("count", *count)]


@pytest.mark.parametrize(("filters", "index"), PLANS)
async def test_sqlite_reads_a_hub_through_the_keys_index(
    tmp_path: Path, filters: Mapping[str, str], index: str
) -> None:
    path = tmp_path / "p.db"
    store = open_store(str(path))
    await store.open()
    try:
        await fill(store)
    finally:
        await store.close()
    expected = "sqlite_autoindex_hub_devices_1" if index == "pkey" else index
    with contextlib.closing(sqlite3.connect(path)) as conn:
        found = conn.execute("SELECT name FROM sqlite_master WHERE name = 'hub_devices_hub_idx'")
        assert found.fetchall() == []
        for _, text, params in statements(filters, ParamStyle.QMARK):
            plan = " | ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {text}", params))
            assert re.match(f"SEARCH hub_devices USING (COVERING )?INDEX {expected} \\(", plan), plan
            assert "SCAN" not in plan and "TEMP B-TREE" not in plan, plan
            if index == "pkey" and "id" not in filters:
                assert "(key>? AND key<?)" in plan, plan


@pytest.mark.postgres
@pytest.mark.parametrize(("filters", "index"), PLANS)
async def test_postgres_reads_a_hub_through_the_keys_index(
    postgres_db_url: str, filters: Mapping[str, str], index: str
) -> None:
    """A custom plan (the parameters known) and a generic one (a prepared statement's, as
    psycopg's after its fifth use) on an analyzed table of four hubs of 2,000 devices, the
    queried hub's neighbours in key order on both sides of its range: a page of a hub is the
    primary key's range in key order (no sort); with a status or connection state, the
    filter's index when its value is the rare one, an index of the table otherwise. A count
    reads the hub's entries in one of its indexes in the generic plan; a custom plan for a
    quarter of the table may scan the table instead, as it did with the (hub, key) index (the
    cost model's choice: docs/performance.md, "The eighth round")."""
    store = open_store(postgres_db_url)
    await store.open()
    try:
        await fill(store)
        for hub in ("hub.a", "hub.a.b", "hub-a", "hub.a0"):
            await store.write_many(H, [hub_write(hub, f"p{n:04}") for n in range(2000)])
    finally:
        await store.close()
    strict = index == "pkey" or filters.get("status") != "enabled"
    expected = "hub_devices_pkey" if index == "pkey" else index if strict else r"hub_devices_\w+"
    read = re.compile(f"(Index Scan using|Index Only Scan using|Bitmap Index Scan on) {expected}\\b")
    any_index = re.compile(r"(Index Scan using|Index Only Scan using|Bitmap Index Scan on) hub_devices_")
    with psycopg.connect(postgres_db_url, autocommit=True, prepare_threshold=None) as conn:
        conn.execute("VACUUM ANALYZE hub_devices")
        found = conn.execute("SELECT indexname FROM pg_indexes WHERE indexname = 'hub_devices_hub_idx'")
        assert found.fetchall() == []
        for what, text, params in statements(filters, ParamStyle.FORMAT):
            literals = ", ".join(quote(conn, value) for value in params)
            for mode in ("force_custom_plan", "force_generic_plan"):
                conn.execute(f"SET plan_cache_mode = {mode}")
                conn.execute("DEALLOCATE ALL")
                conn.execute(f"PREPARE q AS {numbered_params(text)}")
                rows = conn.execute(f"EXPLAIN EXECUTE q({literals})").fetchall()
                plan = "\n".join(str(row[0]) for row in rows)
                if what == "count":  # the hub's entries in any of its indexes; or the table
                    assert any_index.search(plan) or mode == "force_custom_plan", (mode, filters, plan)
                    continue
                assert read.search(plan), (mode, filters, plan)
                assert "Seq Scan" not in plan, (mode, filters, plan)
                if index == "pkey":
                    assert "Sort" not in plan, (mode, filters, plan)


def numbered_params(text: str) -> str:
    """``%s`` placeholders as ``$1``, ``$2``, ... (for PREPARE)."""
    parts = text.split("%s")
    return "".join(part + (f"${n}" if n < len(parts) else "") for n, part in enumerate(parts, start=1))


def quote(conn: psycopg.Connection, value: object) -> str:
    if isinstance(value, int):
        return str(value)
    return psycopg.sql.Literal(value).as_string(conn)


# --- the upgrade from schema 9 -------------------------------------------------------------------


async def test_a_schema_9_database_upgrades_in_place(store_url: str) -> None:
    """Schema 9 with identities in it (written by the schema 9 store's SQL): opening it drops
    the (hub, key) index, and the identities are found, paged and counted as before."""
    postgres = store_url.startswith("postgresql")
    dialect = "postgresql" if postgres else "sqlite"
    old = [m for m in load_migrations(dialect) if m.version <= 9]
    assert [m.version for m in old][-1] == 9
    rows = [
        (f"{hub}/{device}", f"{hub}/{device}", '"e"', "t", "t", b"{}", hub, status, "Disconnected")
        for hub in HUBS
        for n, device in enumerate(DEVICES)
        for status in ["disabled" if n % 3 == 0 else "enabled"]
    ]
    insert = (
        "INSERT INTO hub_devices (key, id, etag, created, updated, doc, hub, status, connection_state)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    if postgres:
        with psycopg.connect(store_url, autocommit=True) as pg:
            pg.execute(_sql.BOOTSTRAP_MIGRATIONS)
            for migration in old:
                pg.execute(migration.text)  # type: ignore[arg-type]
                pg.execute("INSERT INTO schema_migrations VALUES (%s, 'then')", (migration.version,))
            with pg.cursor() as cursor:
                cursor.executemany(_sql.sql(insert, ParamStyle.FORMAT), rows)
            assert pg.execute("SELECT 1 FROM pg_indexes WHERE indexname = 'hub_devices_hub_idx'").fetchall()
    else:
        Path(store_url).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(store_url)) as conn, conn:
            conn.execute(_sql.BOOTSTRAP_MIGRATIONS)
            for migration in old:
                conn.executescript(migration.text)
                conn.execute("INSERT INTO schema_migrations VALUES (?, 'then')", (migration.version,))
            conn.executemany(insert, rows)
            assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'hub_devices_hub_idx'").fetchall()
    store = open_store(store_url)
    await store.open()
    try:
        assert await store.schema_version() == 10
        for hub in HUBS:
            expected = key_sorted([f"{hub}/{device}" for device in DEVICES])
            assert await paged(store, {"hub": hub}, 4) == expected
            assert await store.count(H, filters={"hub": hub}) == len(DEVICES)
            assert await store.count(H, filters={"hub": hub, "status": "disabled"}) == 4
        # New identities beside the old ones.
        await store.write_many(H, [hub_write(hub, "new") for hub in HUBS])
        assert await store.count(H, filters={"hub": "hub.a"}) == len(DEVICES) + 1
    finally:
        await store.close()
    if postgres:
        with psycopg.connect(store_url, autocommit=True) as pg:
            assert not pg.execute(
                "SELECT 1 FROM pg_indexes WHERE indexname = 'hub_devices_hub_idx'"
            ).fetchall()
    else:
        with contextlib.closing(sqlite3.connect(store_url)) as conn:
            assert not conn.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'hub_devices_hub_idx'"
            ).fetchall()
