"""A cluster keeps to a hub's write budget together: each node's hub writer paces its calls at
its share (the budget divided among the nodes writing to that hub now), over a real store
(both backends)."""

from __future__ import annotations

import time

import msgspec

from provisiond.service.hub_figures import BudgetShare, WriterFigures
from provisiond.storage import Collection, Store

HUB = "hub.example"


async def _figures_of(store: Store, node: str, hub: str = HUB) -> None:
    """What a node's writer stores while it makes calls to ``hub``."""
    figures = WriterFigures(hub=hub, node=node, calls=1)
    await store.write(
        Collection.HUB_WRITERS, f"{hub}/{node}", msgspec.json.encode(figures), index={"hub": hub}
    )


async def test_a_lone_node_has_the_whole_budget_and_unpaced_stays_unpaced(store: Store) -> None:
    share = BudgetShare(store, "a")
    await _figures_of(store, "a")  # its own figures do not count twice
    assert await share.of(HUB, 20.0) == 20.0
    assert await share.of(HUB, None) is None


async def test_nodes_writing_to_the_hub_share_its_budget(store: Store) -> None:
    await _figures_of(store, "a")
    await _figures_of(store, "b")
    await _figures_of(store, "c")
    await _figures_of(store, "d", hub="other.example")  # writes to another hub: not counted
    assert await BudgetShare(store, "a").of(HUB, 30.0) == 10.0
    assert await BudgetShare(store, "z").of(HUB, 30.0) == 7.5  # a fourth node about to write


async def test_a_node_that_stopped_writing_gives_its_share_back(store: Store) -> None:
    await _figures_of(store, "b")
    now = time.time()
    clock = [now]
    share = BudgetShare(store, "a", clock=lambda: clock[0], refresh=2.0)
    assert await share.of(HUB, 10.0) == 5.0
    clock[0] = now + 1.0  # within the refresh interval: the count is not read again
    await _figures_of(store, "c")
    assert await share.of(HUB, 10.0) == 5.0
    clock[0] = now + 2.5  # read again: b and c write
    assert await share.of(HUB, 10.0) == 10.0 / 3
    clock[0] = now + 60.0  # nobody stored figures for a minute: this node alone
    assert await share.of(HUB, 10.0) == 10.0
