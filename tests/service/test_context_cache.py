"""The registration path's cached copies (``ServiceContext``: service settings, linked hubs,
enrollment groups): when a copy expires with many registrations in flight, one read refreshes
it for all of them, on a real store that counts its reads."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

from provisiond.errors import StorageError
from provisiond.models import AttestationType
from provisiond.service.app import initialize
from provisiond.service.context import ServiceContext
from provisiond.service.settings import Settings
from provisiond.storage import Collection, Page
from provisiond.storage.sqlite import SqliteStore


class CountingStore(SqliteStore):
    """A SQLite store that counts its queries and settings reads, and can hold them (``gate``)
    or fail them (``failing``) to keep a read in progress or make it fail."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads: Counter[str] = Counter()
        self.gate: asyncio.Event | None = None
        self.failing = False

    async def _reading(self, what: str) -> None:
        self.reads[what] += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise StorageError("the database is gone")

    async def query(
        self,
        collection: Collection,
        *,
        filters: Mapping[str, str] | None = None,
        limit: int = 100,
        continuation: str | None = None,
    ) -> Page:
        await self._reading(collection.table)
        return await super().query(collection, filters=filters, limit=limit, continuation=continuation)

    async def get_setting(self, key: str) -> str | None:
        await self._reading(f"setting {key}")
        return await super().get_setting(key)


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[ServiceContext]:
    store = CountingStore(tmp_path / "provisiond.db")
    await store.open()
    try:
        settings = Settings(data_dir=tmp_path)
        await initialize(store, settings)
        yield ServiceContext(settings=settings, store=store)
    finally:
        await store.close()


def counting(ctx: ServiceContext) -> CountingStore:
    assert isinstance(ctx.store, CountingStore)
    ctx.store.reads.clear()
    return ctx.store


async def test_one_read_refreshes_an_expired_copy_for_every_caller(ctx: ServiceContext) -> None:
    store = counting(ctx)
    settings, hubs, groups = await asyncio.gather(
        asyncio.gather(*(ctx.service_settings(max_age=60) for _ in range(64))),
        asyncio.gather(*(ctx.linked_hubs(max_age=60) for _ in range(64))),
        asyncio.gather(
            *(ctx.enrollment_groups(AttestationType.SYMMETRIC_KEY, max_age=60) for _ in range(64))
        ),
    )
    assert all(s is settings[0] for s in settings) and all(h is hubs[0] for h in hubs)
    assert all(g is groups[0] for g in groups)
    assert sorted(store.reads.values()) == [1, 1, 1], store.reads
    # Then the copies are cached: no read at all.
    await asyncio.gather(*(ctx.linked_hubs(max_age=60) for _ in range(8)))
    assert sorted(store.reads.values()) == [1, 1, 1], store.reads
    # A caller that wants a fresh copy (max_age 0: the management paths) always reads.
    await asyncio.gather(*(ctx.linked_hubs() for _ in range(3)))
    assert store.reads[Collection.LINKED_HUBS.table] == 4


async def test_a_caller_after_an_invalidation_does_not_share_the_read_before_it(ctx: ServiceContext) -> None:
    store = counting(ctx)
    store.gate = asyncio.Event()
    before = asyncio.ensure_future(ctx.linked_hubs(max_age=60))
    await asyncio.sleep(0)  # its read is in progress, held by the gate
    ctx.invalidate()  # a linked hub was written on this node
    after = asyncio.ensure_future(ctx.linked_hubs(max_age=60))
    await asyncio.sleep(0)
    store.gate.set()
    await asyncio.gather(before, after)
    assert store.reads[Collection.LINKED_HUBS.table] == 2


async def test_a_cancelled_caller_does_not_fail_the_others(ctx: ServiceContext) -> None:
    store = counting(ctx)
    store.gate = asyncio.Event()
    first = asyncio.ensure_future(ctx.service_settings(max_age=60))
    others = [asyncio.ensure_future(ctx.service_settings(max_age=60)) for _ in range(3)]
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    store.gate.set()
    results = await asyncio.gather(*others)
    assert first.cancelled()
    assert all(result.id_scope for result in results)
    assert store.reads.total() == 1


async def test_a_failed_read_fails_its_callers_and_is_not_kept(ctx: ServiceContext) -> None:
    store = counting(ctx)
    store.failing = True
    results = await asyncio.gather(*(ctx.linked_hubs(max_age=60) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(result, StorageError) for result in results), results
    assert store.reads.total() == 1
    store.failing = False
    assert isinstance(await ctx.linked_hubs(max_age=60), dict)
    assert store.reads.total() == 2
