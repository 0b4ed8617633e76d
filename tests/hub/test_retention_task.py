"""The retention task stops with the app, on both stores: a shutdown that cancels it in the
middle of a database call (its first pass runs at start) must not leave it running (on
PostgreSQL the driver cancels the query on the server, and the cancellation did not reach the
task's loop: the app's shutdown waited forever)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from provisiond.service.app import create_app, initialize
from provisiond.service.settings import Settings
from provisiond.storage import Store

#: Seconds a shutdown may take before it counts as hung (it takes milliseconds).
HUNG = 30.0


@pytest.mark.parametrize("pause_ms", [0, 1, 2, 3, 5, 8, 13, 21])
async def test_the_app_stops_whenever_the_retention_pass_is(
    store: Store, tmp_path: Path, pause_ms: int
) -> None:
    settings = Settings(data_dir=tmp_path, host="localhost", https_port=8443, mqtt_port=0, amqp_port=0)
    await initialize(store, settings)
    app = create_app(settings, store=store)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    await asyncio.sleep(pause_ms / 1000)
    stopping = asyncio.ensure_future(lifespan.__aexit__(None, None, None))
    done, _ = await asyncio.wait({stopping}, timeout=HUNG)
    assert stopping in done, "the app did not stop: the retention task ignored its cancellation"
    assert not any(t.get_name() == "provisiond-hub-retention" for t in asyncio.all_tasks())
