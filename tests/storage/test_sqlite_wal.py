"""How the SQLite store writes its WAL: small ``write_atomic`` calls of consecutive turns of the
event loop commit together, and under steady writes the WAL starts over instead of growing.

The commits are read from the WAL file itself (each frame's header says whether it ends a
commit), the size from the file system: what SQLite wrote, not what the store says it did."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import struct
from pathlib import Path
from typing import Any

from provisiond.storage import Collection, Write, WriteMode
from provisiond.storage.sqlite import SqliteStore

H = Collection.HUB_DEVICES
R = Collection.REGISTRATIONS
CREATE = WriteMode.CREATE


def wal_commits(path: Path) -> int:
    """The commits in the WAL of the database at ``path``: frames whose header carries the
    database's size (a commit's last frame), among those of the WAL's current start (their
    salts are the header's; frames left from before it started over have others)."""
    data = (path.parent / f"{path.name}-wal").read_bytes()
    if len(data) < 32:
        return 0
    page_size = struct.unpack(">I", data[8:12])[0]
    salts = data[16:24]
    commits, offset = 0, 32
    while offset + 24 + page_size <= len(data):
        header = data[offset : offset + 24]
        if header[8:16] != salts:
            break
        commits += struct.unpack(">I", header[4:8])[0] != 0
        offset += 24 + page_size
    return commits


def wal_frames(path: Path) -> int:
    """The frames (pages written) in the WAL of the database at ``path`` since its current start."""
    data = (path.parent / f"{path.name}-wal").read_bytes()
    if len(data) < 32:
        return 0
    page_size = struct.unpack(">I", data[8:12])[0]
    salts, frames, offset = data[16:24], 0, 32
    while offset + 24 + page_size <= len(data) and data[offset + 8 : offset + 16] == salts:
        frames += 1
        offset += 24 + page_size
    return frames


def wal_restarts(path: Path) -> int:
    """How many times the WAL of the database at ``path`` has started over (its header's
    checkpoint sequence number)."""
    header = (path.parent / f"{path.name}-wal").read_bytes()[:32]
    return struct.unpack(">I", header[12:16])[0] if len(header) == 32 else 0


def wal_size(path: Path) -> int:
    return os.path.getsize(path.parent / f"{path.name}-wal")


def registration(n: int) -> list[tuple[Collection, Write]]:
    """The registrar's pair: a hub identity and a registration record, both created."""
    device = f"device-{n:06d}"
    return [
        (H, Write(f"hub.example/{device}", b"h" * 600, index={"hub": "hub.example"}, mode=CREATE)),
        (R, Write(device, b"r" * 400, index={"enrollment_group_id": "group"}, mode=CREATE)),
    ]


async def test_calls_of_the_next_turn_of_the_event_loop_join_the_batch(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "p.db")
    await store.open()
    try:
        before = wal_commits(store.path)
        first = asyncio.ensure_future(store.write_atomic(registration(1)))
        await asyncio.sleep(0)  # `first` is submitted in this turn; the next call in the next one
        second = asyncio.ensure_future(store.write_atomic(registration(2)))
        written = await asyncio.gather(first, second)
        assert [[r.id for r in records] for records in written] == [
            ["hub.example/device-000001", "device-000001"],
            ["hub.example/device-000002", "device-000002"],
        ]
        assert wal_commits(store.path) - before == 1
        # An idle store still commits a lone call (after one turn), and it is read back.
        assert [r.id for r in await store.write_atomic(registration(3))] == [
            "hub.example/device-000003",
            "device-000003",
        ]
        assert wal_commits(store.path) - before == 2
        assert await store.count(R) == 3
    finally:
        await store.close()


async def test_under_steady_writes_the_wal_starts_over(tmp_path: Path) -> None:
    """Writes that never pause: a passive checkpoint never catches up with them, and SQLite
    starts the WAL over only when every frame is copied; the store's checkpoint lets it."""
    store = SqliteStore(tmp_path / "p.db")
    store.CHECKPOINT_EVERY = 20
    await store.open()
    try:
        restarts = wal_restarts(store.path)
        for start in range(0, 3000, 6):
            await asyncio.gather(*(store.write_atomic(registration(n)) for n in range(start, start + 6)))
        # The 3,000 registrations wrote about 37 MiB of WAL frames: without the restarts, the
        # WAL's file holds all of them.
        wal = wal_size(store.path)
        assert wal_restarts(store.path) - restarts >= 3
        assert wal < 24 * 1024 * 1024, wal  # without the restarts: about 37 MiB
        assert await store.count(R) == 3000
    finally:
        await store.close()


async def test_the_group_index_holds_only_group_devices_and_serves_their_query(tmp_path: Path) -> None:
    """Schema 9: an individual enrollment's registration writes no entry to the registrations'
    group index, and a group's devices are still read through it (not by scanning the table)."""
    store = SqliteStore(tmp_path / "p.db")
    await store.open()
    try:
        await store.write_many(
            R,
            [Write(f"g-{n}", b"r", index={"enrollment_group_id": "group"}, mode=CREATE) for n in range(50)]
            + [Write(f"i-{n}", b"r", mode=CREATE) for n in range(70)],
        )
        page = await store.query(R, filters={"enrollment_group_id": "group"}, limit=100)
        assert sorted(r.id for r in page.records) == sorted(f"g-{n}" for n in range(50))
    finally:
        await store.close()
    entries, plan = index_entries_and_plan(store.path)
    assert entries == 50
    assert "USING INDEX registrations_enrollment_group_id_idx" in plan, plan


def index_entries_and_plan(path: Path) -> tuple[int, str]:
    """The entries of the registrations' group index (from its pages, ``dbstat``), and the plan of
    the store's own query for a group's devices."""
    from provisiond.storage import _sql

    text, params = _sql.page_query(R, {"enrollment_group_id": "group"}, 100, None, _sql.ParamStyle.QMARK)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        [(entries,)] = conn.execute(
            "SELECT sum(ncell) FROM dbstat WHERE name = 'registrations_enrollment_group_id_idx'"
            " AND pagetype = 'leaf'"
        ).fetchall()
        plan = " ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {text}", params))
    return int(entries), plan


async def test_an_update_told_its_index_before_leaves_unchanged_indexes_alone(tmp_path: Path) -> None:
    """A re-registration's update on the etag read: SQLite rewrites an index entry for every
    column an UPDATE sets, changed or not. Told the index values of the version it updates
    (``Write.index_before``), the store sets only the columns that change: the hub devices'
    status and connection state indexes are then not written, one page a commit instead of
    three (counted in the WAL's frames), and the records read back are the same."""
    store = SqliteStore(tmp_path / "p.db")
    await store.open()
    try:
        index = {"hub": "hub.example", "status": "enabled", "connection_state": "Disconnected"}
        keys = [f"hub.example/device-{n:03d}" for n in range(40)]
        created = await store.write_many(
            H, [Write(key, b"h" * 600, index=index, mode=CREATE) for key in keys]
        )

        async def update(records: list[Any], hint: bool, new: dict[str, str]) -> tuple[float, list[Any]]:
            before, written = wal_frames(store.path), []
            for record in records:  # one commit each
                item = Write(
                    record.id,
                    b"u" * 600,
                    index={**index, **new},
                    mode=WriteMode.UPDATE,
                    if_match=record.etag,
                    index_before=record.index if hint else None,
                )
                written += await store.write_atomic([(H, item)])
            return (wal_frames(store.path) - before) / len(records), written

        plain, _ = await update(created[:20], False, {})
        hinted, written = await update(created[20:30], True, {})
        assert plain >= 2.5 and hinted <= 1.5, (plain, hinted)
        assert [record.index for record in written] == [index] * 10
        # A column that changes is set (and its index written); the others are left as they were.
        _, moved = await update(written[:5], True, {"status": "disabled"})
        assert [record.index["status"] for record in moved] == ["disabled"] * 5
        for record in moved:
            assert await store.get(H, record.id) == record
        disabled = await store.query(H, filters={"hub": "hub.example", "status": "disabled"}, limit=100)
        assert [record.id for record in disabled.records] == keys[20:25]
        everyone = await store.query(
            H, filters={"hub": "hub.example", "connection_state": "Disconnected"}, limit=100
        )
        assert [record.id for record in everyone.records] == keys
    finally:
        await store.close()
