"""The hub writer's pace and figures: the per-hub write budget, the pacer that spaces each
node's calls to a hub, and the figures the writer keeps (``HUB_WRITERS``) and the admin API
shows (``GET /admin/linkedHubs/{hub}/writer``). Used by :mod:`.hub_writer`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from ..errors import ProvisioningError
from ..models import HubWriterReport, LinkedHub, WriterCounts
from ..storage import Collection, Store, utc_iso

__all__ = [
    "BudgetShare",
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


class BudgetShare:
    """This node's share of each hub's write budget: the budget divided among the nodes writing
    to the hub now, so that a cluster together keeps to it. A node counts while its figures for
    the hub (``HUB_WRITERS``, stored about once a second while it makes calls, or once per call
    when its calls are further apart) are recent: within three of its call spacings, and at
    least :attr:`window` seconds. The count is read again at most every ``refresh`` seconds; a
    node that starts writing counts for the others from its first stored figures on, so for
    about a second the cluster may exceed the budget by one node's share.

    :param node: this node's name (its figures' key is ``{hub}/{node}``).
    """

    window = 5.0

    def __init__(
        self, store: Store, node: str, *, clock: Callable[[], float] = time.time, refresh: float = 2.0
    ) -> None:
        self._store = store
        self._node = node
        self._clock = clock
        self._refresh = refresh
        self._nodes: dict[str, tuple[int, float]] = {}  # hub -> (writing nodes, read again after)

    async def of(self, hub: str, budget: float | None) -> float | None:
        """This node's calls a second to ``hub`` (lower-cased host name) under ``budget``."""
        if not budget:
            return budget
        now = self._clock()
        known = self._nodes.get(hub)
        if known is None or known[1] <= now:
            nodes = await self._writing_nodes(hub, budget, known[0] if known else 1, now)
            known = self._nodes[hub] = (nodes, now + self._refresh)
        return budget / known[0]

    async def _writing_nodes(self, hub: str, budget: float, previous: int, now: float) -> int:
        since = utc_iso(now - max(self.window, 3.0 * previous / budget))
        try:
            records = await self._store.query_all(Collection.HUB_WRITERS, filters={"hub": hub})
        except ProvisioningError:
            return previous  # keep the last count until the store answers again
        mine = f"{hub}/{self._node}".lower()
        return 1 + sum(1 for r in records if r.updated >= since and r.id.lower() != mine)


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
