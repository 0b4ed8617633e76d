"""Identities written into a real peer (issue 12, item 7): a second ``provisiond serve`` whose
built-in hub serves IoT Hub's service REST API (issue 11) is linked to the first by its
connection string (connection.json's ``hubConnectionString``), the same wire as an Azure IoT
hub. Devices register with the first; the second's registry then holds their identities, keys
and twins, read back through its REST API and by the official Python service SDK
(``azure-iot-hub``'s ``IoTHubRegistryManager``), and every identity has its record.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from provisiond.errors import NotFoundError
from provisiond.protocol.sas import derive_device_key
from tests._fault_proxy import FaultProxy
from tests._server import RunningServer, start_server
from tests.service.test_device_api import enroll_symmetric_group, uid
from tests.service.test_hub_writer import KILLED_UNDER_REQUESTS, TWIN, enroll_in, register, register_then_kill

PEER_HUB = "127.0.0.1"  # the peer's --host, hence its built-in hub (the first server's is localhost)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, RunningServer]]:
    peer = start_server(tmp_path_factory.mktemp("peer"), "--host", PEER_HUB)
    dps = start_server(tmp_path_factory.mktemp("dps"), "--assignment-budget", "2")
    try:
        yield dps, peer
    finally:
        dps.stop()
        peer.stop()


def link_peer(dps: RunningServer, peer: RunningServer, *, port: int | None = None, **fields: Any) -> str:
    """Link ``peer``'s built-in hub to ``dps`` by its connection string, out of allocation
    (``port``: reach it there instead, a proxy in front of it); the hub's host name."""
    hub = str(peer.info["builtinHub"])
    connection_string = peer.info["hubConnectionString"]
    if port is not None:
        connection_string = connection_string.replace(f":{peer.port};", f":{port};")
    with dps.client() as admin:
        admin.put(
            f"/admin/linkedHubs/{hub}",
            {
                "hostName": hub,
                "connectionString": connection_string,
                "caCertificate": Path(peer.ca_file).read_text(),
                "applyAllocationPolicy": False,
                **fields,
            },
        )
    return hub


def test_registrations_land_in_a_second_provisiond_hub(
    servers: tuple[RunningServer, RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    dps, peer = servers
    hub = link_peer(dps, peer, writeBudgetPerSecond=50)
    assert hub == PEER_HUB, peer.info
    with dps.client() as admin:
        reg, key = enroll_in(admin, hub, initialTwin=TWIN)
        gid = uid("g")
        group_key = enroll_symmetric_group(
            admin, gid, iotHubs=[hub], allocationPolicy="static", initialTwin=TWIN
        )
    group_devices = [uid() for _ in range(6)]
    keys = {reg: key, **{d: derive_device_key(group_key, d) for d in group_devices}}
    with ThreadPoolExecutor(7) as pool:
        results = list(pool.map(lambda r: register(dps, r, keys[r]), keys))
    for device, body in results:
        device.close()
        assert body["status"] == "assigned", body
        assert body["registrationState"]["assignedHub"] == hub

    # The official Python service SDK reads what provisiond wrote, over the peer's REST API:
    # every identity with its keys and its twin.
    from azure.iot.hub import IoTHubRegistryManager

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", peer.ca_file)
    manager = IoTHubRegistryManager.from_connection_string(peer.info["hubConnectionString"])
    for device_id, device_key in keys.items():
        device = manager.get_device(device_id)
        assert device.authentication.type == "sas"
        assert device.authentication.symmetric_key.primary_key == device_key
        twin = manager.get_twin(device_id)
        assert twin.tags == TWIN["tags"] and twin.properties.desired["interval"] == 30
    # Every identity in the peer's hub has its assigned record, and the other way round.
    with peer.client() as peer_admin:
        listed = {d["deviceId"] for d in peer_admin.get(f"/admin/linkedHubs/{hub}/devices")}
    with dps.client() as admin:
        for device_id in listed:
            record = admin.get(f"/registrations/{device_id}")
            assert (record["status"], record["assignedHub"], record["deviceId"]) == (
                "assigned",
                hub,
                device_id,
            )
    assert set(keys) <= listed


@KILLED_UNDER_REQUESTS
def test_faults_and_kill_9_against_the_real_peer(
    servers: tuple[RunningServer, RunningServer], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The peer behind a fault proxy (answers cut after the peer wrote, refused connections),
    and the registering provisiond killed with SIGKILL under load, then restarted on its
    database: every acknowledged registration ends assigned with its identity and twin in the
    peer, every identity there has its record, and nothing is doubled."""
    _, peer = servers
    proxy = FaultProxy(peer.port)
    proxy.start()
    data_dir = tmp_path_factory.mktemp("dps-kill")
    args = ("--assignment-budget", "0.5", "--hub-write-lease", "2")
    node = start_server(data_dir, *args)
    try:
        hub = link_peer(node, peer, port=proxy.port)
        with node.client() as admin:
            gid = uid("g")
            group_key = enroll_symmetric_group(
                admin, gid, iotHubs=[hub], allocationPolicy="static", initialTwin=TWIN
            )
        proxy.drop_answers, proxy.refuse_connections = 3, 2
        regs = [uid() for _ in range(16)]
        acknowledged = register_then_kill(node, group_key, regs, enough=6)
        node = start_server(data_dir, *args)
        with node.client() as admin:
            deadline = time.monotonic() + 60
            records: dict[str, dict[str, Any]] = {}
            for reg in regs:
                while True:
                    try:
                        record = admin.get(f"/registrations/{reg}")
                    except NotFoundError:
                        assert reg not in acknowledged, reg
                        break
                    if record["status"] != "assigning":
                        records[reg] = record
                        break
                    assert time.monotonic() < deadline, record
                    time.sleep(0.2)
        assert acknowledged <= {r for r, rec in records.items() if rec["status"] == "assigned"}, records
        with peer.client() as peer_admin:
            identities = {
                d["deviceId"]
                for d in peer_admin.get(f"/admin/linkedHubs/{hub}/devices")
                if d["deviceId"] in regs
            }
            for reg in identities:
                assert (
                    peer_admin.get(f"/admin/linkedHubs/{hub}/devices/{reg}")["twin"]["tags"] == TWIN["tags"]
                )
        assigned = {r for r, rec in records.items() if rec["status"] == "assigned"}
        assert identities == assigned, identities ^ assigned
        assert proxy.dropped == 5, "the faults were not all met: the test proved less than it says"
    finally:
        node.stop()
        proxy.stop()
