"""The hub writer's pace and figures: the per-hub write budget, the pacer that spaces each
node's calls to a hub, and the figures the writer keeps (``HUB_WRITERS``) and the admin API
shows (``GET /admin/linkedHubs/{hub}/writer``). Used by :mod:`.hub_writer`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from ..models import LinkedHub
from ..storage import Collection, Store

__all__ = [
    "HubWriterReport",
    "NodeFigures",
    "Pacer",
    "WriterFigures",
    "budget_per_second",
    "hub_writer_report",
]


def budget_per_second(hub: LinkedHub) -> float | None:
    """The hub's write budget (calls a second), or ``None``: unpaced
    (:meth:`~provisiond.models.LinkedHub.registry_write_budget`)."""
    return hub.registry_write_budget()


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


class WriterFigures(msgspec.Struct, kw_only=True, rename="camel"):
    """One node's figures for one hub (``HUB_WRITERS``, keyed ``{hub}/{node}``); the admin API
    sums them over the nodes."""

    hub: str
    node: str
    calls: int = 0
    written: int = 0
    throttled: int = 0
    retried: int = 0
    failed: int = 0
    removed: int = 0
    bulk_calls: int = 0


class HubWriterReport(msgspec.Struct, kw_only=True, rename="camel"):
    """``GET /admin/linkedHubs/{hub}/writer``: the hub writer's figures for one hub, summed
    over the nodes since their figures were first stored (they survive restarts)."""

    hub: str
    #: The write budget in force (calls a second; ``None``: unpaced).
    budget_per_second: float | None
    #: Outbox items not yet done for this hub (registrations 'assigning', deprovisioning),
    #: whether a writer holds them now or they wait for their turn.
    queued: int
    #: Registry calls made, identities written (registrations finished 'assigned'),
    #: throttled answers (429), items retried after a transient failure, items failed for
    #: good, deprovisioning items done.
    calls: int = 0
    written: int = 0
    throttled: int = 0
    retried: int = 0
    failed: int = 0
    removed: int = 0
    #: Bulk registry calls (``POST /devices``, up to 100 new identities each) among the calls.
    bulk_calls: int = 0
    nodes: int = 0


async def hub_writer_report(store: Store, hub: LinkedHub) -> HubWriterReport:
    """The figures of ``hub`` (:class:`HubWriterReport`)."""
    host = hub.host_name.lower()
    queued = await store.count(Collection.HUB_OUTBOX, filters={"hub": host})
    report = HubWriterReport(hub=hub.host_name, budget_per_second=budget_per_second(hub), queued=queued)
    for record in await store.query_all(Collection.HUB_WRITERS, filters={"hub": host}):
        figures = msgspec.json.decode(record.doc, type=WriterFigures)
        report.calls += figures.calls
        report.written += figures.written
        report.throttled += figures.throttled
        report.retried += figures.retried
        report.failed += figures.failed
        report.removed += figures.removed
        report.bulk_calls += figures.bulk_calls
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
