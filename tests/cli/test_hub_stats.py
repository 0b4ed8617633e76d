"""``provisiond hub stats HUB`` and ``hub show HUB --stats``: the hub writer's per-hub figures
(issue 12, item 4) through the CLI, against the session's ``provisiond serve`` with a remote
hub linked (tests/_hub_peer.py's stand-in registry over HTTPS) and a device registered
into it."""

from __future__ import annotations

import time
from typing import Any

from provisiond.errors import NotFoundError
from tests._hub_peer import HubPeer
from tests._server import RunningServer
from tests.cli.test_manage import fails, run, run_json
from tests.service.test_hub_writer import enroll_in, register


def _stats_once_written(server: RunningServer, hub: str, written: int) -> dict[str, Any]:
    """``hub stats --json`` once ``written`` identities are counted (each node stores its
    figures about once a second)."""
    deadline = time.monotonic() + 10
    while True:
        stats: dict[str, Any] = run_json(server, "hub", "stats", hub, "--json")
        if stats["written"] >= written or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def test_hub_stats_shows_the_writers_figures(server: RunningServer, hub_peer: HubPeer) -> None:
    with server.client() as admin:
        hub = hub_peer.link(admin, writeBudgetPerSecond=25)
        before = run_json(server, "hub", "stats", hub, "--json")
        assert before == admin.get(f"/admin/linkedHubs/{hub}/writer")
        assert before["hub"] == hub and before["budgetPerSecond"] == 25
        reg, key = enroll_in(admin, hub)
    device, body = register(server, reg, key)
    device.close()
    assert body["status"] == "assigned" and body["registrationState"]["assignedHub"] == hub, body
    assert reg in hub_peer.devices

    after = _stats_once_written(server, hub, before["written"] + 1)
    assert after["written"] == before["written"] + 1
    assert after["calls"] > before["calls"] and after["queued"] == 0 and after["nodes"] == 1
    human = run(server, "hub", "stats", hub).stdout
    assert f"Hub writer for {hub!r}:" in human and "25/s" in human
    assert f"Written          {after['written']}" in human

    shown = run_json(server, "hub", "show", hub, "--stats")
    assert shown["writer"]["written"] == after["written"] and shown["hostName"] == hub
    assert "connectionString" not in shown and hub_peer.key not in str(shown)
    assert "writer" not in run_json(server, "hub", "show", hub)
    builtin = server.info["builtinHub"]
    assert "writer" not in run_json(server, "hub", "show", builtin, "--stats")
    assert isinstance(fails(server, "hub", "stats", f"x{hub}"), NotFoundError)
    run(server, "hub", "remove", hub)
