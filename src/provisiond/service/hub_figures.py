"""The hub writer's pace and figures: the per-hub write budget, the pacer that spaces each
node's calls to a hub, and the figures the writer keeps (``HUB_WRITERS``) and the admin API
shows (``GET /admin/linkedHubs/{hub}/writer``). Used by :mod:`.hub_writer`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from ..models import HubWriterReport, LinkedHub, WriterCounts
from ..storage import Collection, Store

__all__ = [
    "HubWriterReport",
    "NodeFigures",
    "Pacer",
    "WriterFigures",
    "hub_writer_report",
]


class Pacer:
    """Per-hub pacing in this node: calls evenly spaced at the hub's budget, and a pause after
    the hub throttled (its Retry-After)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._next: dict[str, float] = {}
        self._paused: dict[str, float] = {}
        self._lock: dict[str, asyncio.Lock] = {}

    async def acquire(self, hub: str, budget: float | None) -> None:
        """Wait for the hub's next slot."""
        lock = self._lock.setdefault(hub, asyncio.Lock())
        async with lock:
            now = self._clock()
            start = max(now, self._paused.get(hub, 0.0))
            if budget:
                # Evenly spaced: no burst the hub's own bucket could count against us.
                start = max(start, self._next.get(hub, 0.0))
                self._next[hub] = start + 1.0 / budget
            if start > now:
                await asyncio.sleep(start - now)

    def pause(self, hub: str, seconds: float) -> None:
        self._paused[hub] = max(self._paused.get(hub, 0.0), self._clock() + seconds)


class WriterFigures(WriterCounts, kw_only=True, rename="camel"):
    """One node's figures for one hub (``HUB_WRITERS``, keyed ``{hub}/{node}``); the admin API
    sums them over the nodes."""

    hub: str
    node: str


async def hub_writer_report(store: Store, hub: LinkedHub) -> HubWriterReport:
    """The figures of ``hub`` (:class:`HubWriterReport`)."""
    host = hub.host_name.lower()
    queued = await store.count(Collection.HUB_OUTBOX, filters={"hub": host})
    report = HubWriterReport(hub=hub.host_name, budget_per_second=hub.registry_write_budget(), queued=queued)
    for record in await store.query_all(Collection.HUB_WRITERS, filters={"hub": host}):
        report.add(msgspec.json.decode(record.doc, type=WriterFigures))
        report.nodes += 1
    return report


@dataclass
class NodeFigures:
    by_hub: dict[str, WriterFigures] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)

    def of(self, hub: str, node: str) -> WriterFigures:
        figures = self.by_hub.get(hub)
        if figures is None:
            figures = self.by_hub[hub] = WriterFigures(hub=hub, node=node)
        self.dirty.add(hub)
        return figures
