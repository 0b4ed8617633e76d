"""The hub's service REST API with ``serve --workers 2``: twin writes land in whichever worker
the kernel gives the request to, and each desired change reaches the device connected to one of
them (the broker's signal stream between processes), in order, none lost."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._hub import HubPaho, Provisioned
from tests._hub_service import HubService
from tests._server import RunningServer, start_server


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("hub-workers"), "--workers", "2")
    yield running
    running.stop()
    assert "Traceback" not in running.log()


def test_desired_patches_through_any_worker_reach_the_device(workers: RunningServer, tmp_path: Path) -> None:
    hub = HubService(workers.info["hubConnectionString"], ca_file=workers.ca_file, port=workers.port)
    device_id = f"w-{uuid.uuid4().hex[:10]}"
    made = hub.request("PUT", f"/devices/{device_id}", json={"deviceId": device_id}).json()
    device = Provisioned(
        hub=workers.info["builtinHub"],
        device_id=device_id,
        key=made["authentication"]["symmetricKey"]["primaryKey"],
    )
    client = HubPaho(workers, device, clean_session=True).connected()
    try:
        assert client.subscribe("$iothub/twin/PATCH/properties/desired/#") == (1,)
        patches = 12
        for n in range(patches):
            # a new connection each time, so the kernel spreads them over both workers
            hub.http.close()
            hub = HubService(workers.info["hubConnectionString"], ca_file=workers.ca_file, port=workers.port)
            answer = hub.request("PATCH", f"/twins/{device_id}", json={"properties": {"desired": {"n": n}}})
            assert answer.status_code == 200, answer.text
            hub.request("GET", "/twins/no-such-device")  # a logged 404, with the worker's pid
        received = [json.loads(client.message()[2]) for _ in range(patches)]
        assert [r["n"] for r in received] == list(range(patches))
        assert [r["$version"] for r in received] == list(range(2, patches + 2))
    finally:
        client.close()
        hub.close()
