"""Identities in remote hubs through the durable outbox (issue 12, items 2-4), over real HTTPS:
a device registers with a running ``provisiond serve`` whose enrollment names a linked remote
hub (tests/_hub_peer.py: IoT Hub's registry REST API with a fault injector). The registration
says ``assigned`` only once the hub has the identity and its twin; a throttled or failing hub
is retried (Retry-After honoured) and the device's polls end ``assigned``; a hub that refuses
for good leaves the registration ``failed`` with 400209 and the hub's error, and no identity.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from provisiond.errors import NotFoundError
from provisiond.hub import IdentityRef
from provisiond.hub.outbox import removal
from provisiond.models import Deprovision
from provisiond.protocol.sas import derive_device_key
from provisiond.storage import Collection, open_store
from tests._fault_proxy import FaultProxy, fault_proxy
from tests._hub_peer import Fault, HubPeer
from tests._server import RunningServer, start_server
from tests.service.test_device_api import Device, enroll_symmetric, enroll_symmetric_group, uid

__all__ = ["fault_proxy"]

V = {"api-version": "2021-06-01"}


@pytest.fixture(scope="module")
def writer_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server with a short assignment budget (a slow hub answers 'assigning' soon)."""
    running = start_server(tmp_path_factory.mktemp("writer"), "--assignment-budget", "1")
    yield running
    running.stop()


@pytest.fixture
def admin(writer_server: RunningServer) -> Iterator[Any]:
    client = writer_server.client()
    yield client
    client.close()


def poll(device: Device, first: httpx.Response, key: str, timeout: float = 30.0) -> dict[str, Any]:
    """The device's polls after a register, as the SDKs make them, until a terminal status."""
    body: dict[str, Any] = first.json()
    assert first.status_code == 202, first.text
    deadline = time.monotonic() + timeout
    while body["status"] == "assigning":
        assert time.monotonic() < deadline, body
        time.sleep(0.2)
        r = device.http.get(
            f"/{device.server.id_scope}/registrations/{device.registration_id}/operations/{body['operationId']}",
            params=V,
            headers={"Authorization": device.token(key)},
        )
        assert r.status_code in (200, 202), r.text
        body = r.json()
    return body


def register(server: RunningServer, reg: str, key: str) -> tuple[Device, dict[str, Any]]:
    device = Device(server, reg)
    return device, poll(device, device.register(device.token(key)), key)


def enroll_in(admin: Any, hub: str, **extra: Any) -> tuple[str, str]:
    """A new symmetric-key enrollment assigned to ``hub`` (static): its registration id and key."""
    reg = uid()
    return reg, enroll_symmetric(admin, reg, iotHubs=[hub], allocationPolicy="static", **extra)


def register_all(server: RunningServer, group_key: str, regs: list[str]) -> None:
    """The group's devices ``regs`` register at once; every one ends 'assigned'."""
    with ThreadPoolExecutor(len(regs)) as pool:
        results = list(pool.map(lambda reg: register(server, reg, derive_device_key(group_key, reg)), regs))
    for device, body in results:
        device.close()
        assert body["status"] == "assigned", body


#: For the tests that kill a node under requests (register_then_kill): a request cut off by the
#: kill can leave the test's own HTTP client (httpx, in the registering threads) with a TLS
#: socket it never closes, in a reference cycle. Its ResourceWarning is about that client, not
#: about the service under test (a separate process); register_then_kill collects the cycles
#: before it returns, so that the warning comes within the marked test, not in a later one.
KILLED_UNDER_REQUESTS = pytest.mark.filterwarnings("ignore:unclosed <ssl.SSLSocket:ResourceWarning")


def register_then_kill(
    node: RunningServer,
    group_key: str,
    regs: list[str],
    *,
    enough: int,
    in_flight: Callable[[int], bool] | None = None,
) -> set[str]:
    """The group's devices ``regs`` register, 8 at a time, with ``node``; once ``enough`` are
    acknowledged (202 with an operation id), and ``in_flight(acknowledged)`` says that more work
    is under way (up to 10 s more), the node is killed (kill -9). The acknowledged ones."""
    acknowledged: set[str] = set()
    reached = threading.Event()

    def one(reg: str) -> None:
        device = Device(node, reg)
        try:
            r = device.register(device.token(derive_device_key(group_key, reg)))
            if r.status_code == 202 and r.json().get("operationId"):
                acknowledged.add(reg)
                if len(acknowledged) >= enough:
                    reached.set()
        except httpx.HTTPError:
            pass  # the node died under this request: not acknowledged
        finally:
            device.close()

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, reg) for reg in regs]
        assert reached.wait(60), "no registrations were acknowledged"
        deadline = time.monotonic() + 10
        while in_flight is not None and not in_flight(len(acknowledged)) and time.monotonic() < deadline:
            time.sleep(0.005)
        node.process.kill()  # kill -9
        node.process.wait(10)
        for future in futures:
            future.result()
    gc.collect()  # what the cut-off requests left in cycles goes now, under the test's filter
    return acknowledged


TWIN = {"tags": {"site": "line-3"}, "properties": {"desired": {"interval": 30}}}


def test_registration_writes_identity_and_twin_into_the_remote_hub(
    writer_server: RunningServer, admin: Any, hub_peer: HubPeer
) -> None:
    hub = hub_peer.link(admin)
    reg, key = enroll_in(admin, hub, initialTwin=TWIN)
    device, body = register(writer_server, reg, key)
    state = body["registrationState"]
    assert body["status"] == "assigned", body
    assert state["assignedHub"] == hub and state["deviceId"] == reg
    identity = hub_peer.devices[reg]
    assert identity["authentication"]["type"] == "sas"
    assert identity["authentication"]["symmetricKey"]["primaryKey"] == key
    assert hub_peer.twins[reg]["tags"] == {"site": "line-3"}
    assert hub_peer.twins[reg]["properties"]["desired"] == {"interval": 30}
    # The service API's record agrees; nothing is left in the outbox.
    assert admin.get(f"/registrations/{reg}")["status"] == "assigned"
    # Registering again updates the identity in place: one identity, same keys.
    again = poll(device, device.register(device.token(key)), key)
    assert again["status"] == "assigned" and list(hub_peer.devices) == [reg]
    device.close()


def test_group_device_keys_are_the_derived_keys(
    writer_server: RunningServer, admin: Any, hub_peer: HubPeer
) -> None:
    hub = hub_peer.link(admin)
    gid = uid("g")
    group_key = enroll_symmetric_group(admin, gid, iotHubs=[hub], allocationPolicy="static")
    reg = uid()
    key = derive_device_key(group_key, reg)
    device, body = register(writer_server, reg, key)
    device.close()
    assert body["status"] == "assigned", body
    assert hub_peer.devices[reg]["authentication"]["symmetricKey"]["primaryKey"] == key


def test_throttled_and_failing_hub_is_retried_until_assigned(
    writer_server: RunningServer, admin: Any, hub_peer: HubPeer
) -> None:
    hub = hub_peer.link(admin)
    reg, key = enroll_in(admin, hub, initialTwin=TWIN)
    hub_peer.inject(
        Fault(status=429, retry_after=1, method="PUT"),
        Fault(status=503, method="PUT"),
        Fault(status=429, retry_after=1, method="PUT"),
    )
    device = Device(writer_server, reg)
    first = device.register(device.token(key))
    assert first.json()["status"] == "assigning", first.text  # the hub is slower than the budget
    body = poll(device, first, key)
    assert body["status"] == "assigned", body
    assert hub_peer.answered[429] == 2 and hub_peer.answered[503] == 1
    assert hub_peer.devices[reg]["authentication"]["symmetricKey"]["primaryKey"] == key
    assert hub_peer.twins[reg]["tags"] == {"site": "line-3"}
    # A register while the write is in flight would have answered the same operation; now it
    # is done, the record is assigned.
    assert admin.get(f"/registrations/{reg}")["status"] == "assigned"
    device.close()


def test_a_slow_hub_answers_assigning_and_polls_end_assigned(
    writer_server: RunningServer, admin: Any, hub_peer: HubPeer
) -> None:
    hub = hub_peer.link(admin)
    reg, key = enroll_in(admin, hub)
    hub_peer.inject(Fault(delay=2.5, method="PUT"))
    device = Device(writer_server, reg)
    first = device.register(device.token(key))
    assert first.status_code == 202 and first.json()["status"] == "assigning", first.text
    # A second register while the first is in flight answers the same operation.
    second = device.register(device.token(key))
    assert second.json()["operationId"] == first.json()["operationId"], second.text
    assert poll(device, first, key)["status"] == "assigned"
    assert reg in hub_peer.devices
    device.close()


def test_a_hub_that_refuses_fails_the_registration_and_keeps_nothing(
    writer_server: RunningServer, admin: Any, hub_peer: HubPeer
) -> None:
    hub = hub_peer.link(admin)
    reg, key = enroll_in(admin, hub, initialTwin=TWIN)
    # The identity is created, then the hub refuses its twin for good: compensation deletes it.
    hub_peer.inject(Fault(status=403, code="IotHubQuotaExceeded", method="PUT", kind="twins"))
    device, body = register(writer_server, reg, key)
    state = body["registrationState"]
    assert body["status"] == "failed", body
    assert state["errorCode"] == 400209 and "IotHubQuotaExceeded" in state["errorMessage"], state
    assert reg not in hub_peer.devices
    assert "failed for good" in writer_server.log()
    device.close()


def test_a_rotated_key_is_the_hubs_401_named(
    writer_server: RunningServer, admin: Any, hub_peer: HubPeer
) -> None:
    hub = hub_peer.link(admin)
    linked_key = hub_peer.key
    hub_peer.key = "d3Jvbmd3cm9uZ3dyb25nd3Jvbmc="  # the hub's policy key rotated after the link
    reg, key = enroll_in(admin, hub)
    try:
        device, body = register(writer_server, reg, key)
    finally:
        hub_peer.key = linked_key
    device.close()
    state = body["registrationState"]
    assert body["status"] == "failed" and state["errorCode"] == 400209
    assert "401" in state["errorMessage"] and "IotHubUnauthorizedAccess" in state["errorMessage"]
    assert linked_key not in writer_server.log() and linked_key not in state["errorMessage"]


@KILLED_UNDER_REQUESTS
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_kill_9_under_load_leaves_every_identity_and_record_in_agreement(
    tmp_path_factory: pytest.TempPathFactory, hub_peer: HubPeer, backend: str, request: pytest.FixtureRequest
) -> None:
    """kill -9 of the registering provisiond while its hub writes are in flight; a restart on
    the same database finishes them once their leases run out (on PostgreSQL the restarted
    writer's watch is live: it waits for the earliest lease's end it reads, which no
    notification announces). Afterwards every acknowledged registration is assigned and has
    its identity (and twin) in the hub, every identity in the hub has its assigned record, and
    nothing is doubled."""
    data_dir = tmp_path_factory.mktemp("kill9")
    args: tuple[str, ...] = ("--assignment-budget", "0.5", "--hub-write-lease", "2")
    db_url = f"sqlite:///{data_dir / 'provisiond.db'}"
    if backend == "postgresql":
        db_url = str(request.getfixturevalue("postgres_db_url"))
        args += ("--db", db_url)
    node = start_server(data_dir, *args)
    admin = node.client()
    hub = hub_peer.link(admin)
    gid = uid("g")
    group_key = enroll_symmetric_group(admin, gid, iotHubs=[hub], allocationPolicy="static", initialTwin=TWIN)
    admin.close()
    # Every identity write is slow: many are in flight when the node dies.
    hub_peer.inject(*(Fault(delay=0.4, method="PUT", kind="devices") for _ in range(40)))
    regs = [uid() for _ in range(24)]
    # Killed while a hub write beyond the acknowledged ones' has started (each takes 0.4 s): its
    # record is then 'assigning', whatever the machine's speed.
    acknowledged = register_then_kill(
        node, group_key, regs, enough=8, in_flight=lambda done: hub_peer.calls["PUT devices"] > done + 1
    )
    assert len(acknowledged) >= 8
    # What the kill cut short, read from the database before the restart: had no hub write been
    # in flight (records 'assigning', their outbox items leased), the test would prove nothing.
    in_flight = asyncio.run(_assigning(db_url, regs))
    assert in_flight, "no hub write was in flight at the kill: the test proved nothing"

    node = start_server(data_dir, *args)
    admin = node.client()
    try:
        deadline = time.monotonic() + 60
        pending = set(regs)
        records: dict[str, dict[str, Any]] = {}
        while pending:
            assert time.monotonic() < deadline, {r: records.get(r) for r in pending}
            for reg in sorted(pending):
                try:
                    record = admin.get(f"/registrations/{reg}")
                except NotFoundError:
                    if reg not in acknowledged:
                        pending.discard(reg)  # never committed: the device would retry
                    continue
                records[reg] = record
                if record["status"] != "assigning":
                    pending.discard(reg)
            time.sleep(0.2)
        for reg in acknowledged:
            assert records[reg]["status"] == "assigned", records[reg]
        assigned = {reg for reg, record in records.items() if record["status"] == "assigned"}
        assert assigned == set(hub_peer.devices), assigned ^ set(hub_peer.devices)
        for reg in assigned:
            assert records[reg]["assignedHub"] == hub and records[reg]["deviceId"] == reg
            assert hub_peer.twins[reg]["tags"] == {"site": "line-3"}
            key = derive_device_key(group_key, reg)
            assert hub_peer.devices[reg]["authentication"]["symmetricKey"]["primaryKey"] == key
        assert not [r for r in records.values() if r["status"] == "failed"], records
        assert in_flight <= assigned  # the restarted node finished what the killed one left
    finally:
        admin.close()
        node.stop()


async def _assigning(db_url: str, regs: list[str]) -> set[str]:
    """Which of ``regs`` the database holds as 'assigning' (their hub writes not done)."""
    store = open_store(db_url)
    await store.open()
    try:
        found = await store.get_many(Collection.REGISTRATIONS, regs)
    finally:
        await store.close()
    return {record.id for record in found.values() if record.index.get("status") == "assigning"}


def writer_figures(admin: Any, hub: str, *, written: int) -> dict[str, Any]:
    """The writer's figures for ``hub`` once ``written`` identities are counted (the nodes
    store their figures about once a second)."""
    deadline = time.monotonic() + 10
    while True:
        figures: dict[str, Any] = admin.get(f"/admin/linkedHubs/{hub}/writer")
        if figures["written"] >= written or time.monotonic() > deadline:
            return figures
        time.sleep(0.2)


def test_a_write_budget_keeps_a_flood_under_the_hubs_throttle(
    writer_server: RunningServer, admin: Any, hub_peer: HubPeer
) -> None:
    """The hub throttles beyond 30 calls in any second; linked with a budget of 20 writes a
    second, a flood of registrations gets no 429 at all (unpaced, it gets many: the next test)."""
    hub = hub_peer.link(admin, writeBudgetPerSecond=20)
    before = admin.get(f"/admin/linkedHubs/{hub}/writer")
    hub_peer.rate_limit = 30
    gid = uid("g")
    group_key = enroll_symmetric_group(admin, gid, iotHubs=[hub], allocationPolicy="static", initialTwin=TWIN)
    regs = [uid() for _ in range(12)]
    register_all(writer_server, group_key, regs)
    assert hub_peer.answered[429] == 0, hub_peer.answered
    assert set(hub_peer.devices) == set(regs)
    figures = writer_figures(admin, hub, written=before["written"] + 12)
    assert figures["budgetPerSecond"] == 20 and figures["queued"] == 0
    done = {name: figures[name] - before[name] for name in ("written", "throttled", "failed")}
    assert done == {"written": 12, "throttled": 0, "failed": 0}, (before, figures)
    # Queued for the writer loop, the new identities went in bulk calls (with their twins).
    assert hub_peer.bulk_devices > 0 and figures["bulkCalls"] > before["bulkCalls"], (hub_peer.calls, figures)
    assert sum(hub_peer.calls.values()) < 3 * 12, hub_peer.calls


def test_unpaced_the_flood_is_throttled_and_retried(
    writer_server: RunningServer, admin: Any, hub_peer: HubPeer
) -> None:
    hub = hub_peer.link(admin)
    before = admin.get(f"/admin/linkedHubs/{hub}/writer")
    hub_peer.rate_limit = 30
    gid = uid("g")
    group_key = enroll_symmetric_group(admin, gid, iotHubs=[hub], allocationPolicy="static")
    regs = [uid() for _ in range(12)]
    register_all(writer_server, group_key, regs)
    assert hub_peer.answered[429] > 0
    figures = writer_figures(admin, hub, written=before["written"] + 12)
    assert figures["written"] - before["written"] == 12, (before, figures)
    assert figures["throttled"] - before["throttled"] == hub_peer.answered[429], (before, figures)
    assert figures["budgetPerSecond"] is None


@pytest.mark.parametrize("mode", ["disable", "delete"])
def test_deprovisioning_items_are_carried_out(
    writer_server: RunningServer, admin: Any, hub_peer: HubPeer, mode: str
) -> None:
    """A removal item in the outbox (what deleting a record with ?deprovision= commits with the
    deletion) is carried out by the writer loop: the identity disabled or deleted in the hub."""
    hub = hub_peer.link(admin)
    reg, key = enroll_in(admin, hub)
    device, body = register(writer_server, reg, key)
    device.close()
    assert body["status"] == "assigned" and reg in hub_peer.devices
    before = admin.get(f"/admin/linkedHubs/{hub}/writer")

    async def enqueue() -> None:
        store = open_store(f"sqlite:///{writer_server.data_dir / 'provisiond.db'}")
        await store.open()
        try:
            await store.write_atomic([removal(IdentityRef(hub, reg), Deprovision(mode), now=time.time())])
        finally:
            await store.close()

    asyncio.run(enqueue())
    deadline = time.monotonic() + 10
    while (reg in hub_peer.devices) == (mode == "delete") or (
        mode == "disable" and hub_peer.devices[reg].get("status") != "disabled"
    ):
        assert time.monotonic() < deadline, hub_peer.devices.get(reg)
        time.sleep(0.1)
    figures = writer_figures(admin, hub, written=before["written"])
    deadline = time.monotonic() + 10
    while figures["removed"] == before["removed"] or figures["queued"]:
        assert time.monotonic() < deadline, figures
        time.sleep(0.2)
        figures = admin.get(f"/admin/linkedHubs/{hub}/writer")
    assert figures["removed"] == before["removed"] + 1


def test_answers_lost_on_the_way_back_are_retried_without_doubling(
    writer_server: RunningServer, admin: Any, hub_peer: HubPeer, fault_proxy: FaultProxy
) -> None:
    """The network cuts the hub's answers (the hub wrote; provisiond never heard) and refuses
    connections: the writer retries each idempotent step, and the device ends with one
    identity, its keys and its twin."""
    hub = hub_peer.link(admin, port=fault_proxy.port)
    reg, key = enroll_in(admin, hub, initialTwin=TWIN)
    fault_proxy.drop_answers = 2
    fault_proxy.refuse_connections = 1
    device, body = register(writer_server, reg, key)
    device.close()
    assert body["status"] == "assigned", body
    assert fault_proxy.dropped == 3
    assert list(hub_peer.devices) == [reg]
    assert hub_peer.devices[reg]["authentication"]["symmetricKey"]["primaryKey"] == key
    assert hub_peer.twins[reg]["tags"] == {"site": "line-3"}


@pytest.mark.parametrize(
    ("policy", "substatus", "tags"),
    [
        ({"updateHubAssignment": True, "migrateDeviceData": True}, "deviceDataMigrated", {"gen": 1}),
        ({"updateHubAssignment": True, "migrateDeviceData": False}, "deviceDataReset", {"gen": 2}),
    ],
    ids=["migrate", "reset"],
)
def test_reprovisioning_moves_the_identity_between_built_in_and_remote_hubs(
    writer_server: RunningServer,
    admin: Any,
    hub_peer: HubPeer,
    policy: dict[str, bool],
    substatus: str,
    tags: dict[str, int],
) -> None:
    """A device moved from a built-in hub to a remote one gets its twin migrated or reset there,
    and its old identity is removed; moved back, the remote identity is removed."""
    remote = hub_peer.link(admin)
    builtin = f"{uid('hub')}.example.local"
    admin.put(
        f"/admin/linkedHubs/{builtin}", {"hostName": builtin, "builtin": True, "applyAllocationPolicy": False}
    )
    reg = uid()
    key = enroll_symmetric(
        admin,
        reg,
        iotHubs=[builtin],
        allocationPolicy="static",
        reprovisionPolicy=policy,
        initialTwin={"tags": {"gen": 1}},
    )
    device, body = register(writer_server, reg, key)
    assert body["registrationState"]["assignedHub"] == builtin

    def move_to(hub: str, gen: int) -> dict[str, Any]:
        current = admin.get(f"/enrollments/{reg}")
        admin.put(
            f"/enrollments/{reg}",
            {**current, "iotHubs": [hub], "initialTwin": {"tags": {"gen": gen}}},
            if_match=current["etag"],
        )
        return poll(device, device.register(device.token(key)), key)

    moved = move_to(remote, 2)
    state = moved["registrationState"]
    assert moved["status"] == "assigned" and (state["assignedHub"], state["substatus"]) == (remote, substatus)
    assert hub_peer.twins[reg]["tags"] == tags
    assert hub_peer.devices[reg]["authentication"]["symmetricKey"]["primaryKey"] == key
    with pytest.raises(NotFoundError):
        admin.get(f"/admin/linkedHubs/{builtin}/devices/{reg}")

    back = move_to(builtin, 3)
    assert back["status"] == "assigned" and back["registrationState"]["assignedHub"] == builtin
    assert reg not in hub_peer.devices
    assert admin.get(f"/admin/linkedHubs/{builtin}/devices/{reg}")["deviceId"] == reg
    device.close()
    admin.delete(f"/admin/linkedHubs/{builtin}")


def test_bulk_writes_send_existing_identities_the_single_way(
    writer_server: RunningServer, admin: Any, hub_peer: HubPeer
) -> None:
    """In a bulk create, an identity the hub already has (made outside provisiond) is refused
    alone; the writer then reads it and updates it in place: its keys, and (a first assignment)
    the initial twin's tags and desired properties, as for the others."""
    hub = hub_peer.link(admin, writeBudgetPerSecond=50)
    gid = uid("g")
    group_key = enroll_symmetric_group(admin, gid, iotHubs=[hub], allocationPolicy="static", initialTwin=TWIN)
    regs = [uid() for _ in range(8)]
    existing = regs[3]
    hub_peer.devices[existing] = {"deviceId": existing, "authentication": {"type": "sas"}, "etag": "x"}
    hub_peer.twins[existing] = {"tags": {"made": "elsewhere"}, "properties": {"desired": {}, "reported": {}}}
    register_all(writer_server, group_key, regs)
    assert set(hub_peer.devices) == set(regs)
    for reg in regs:
        key = derive_device_key(group_key, reg)
        assert hub_peer.devices[reg]["authentication"]["symmetricKey"]["primaryKey"] == key
    assert all(hub_peer.twins[reg]["tags"] == {"site": "line-3"} for reg in regs)
    assert hub_peer.bulk_devices >= 1


def test_a_record_deleted_while_its_identity_is_written_leaves_no_identity(
    writer_server: RunningServer, admin: Any, hub_peer: HubPeer
) -> None:
    """The operator deletes the registration record while the hub is still writing its
    identity: the writer finds no record to finish and deletes the identity it created."""
    hub = hub_peer.link(admin)
    reg, key = enroll_in(admin, hub)
    hub_peer.inject(Fault(delay=2.0, method="PUT", kind="devices"))
    device = Device(writer_server, reg)
    first = device.register(device.token(key))
    device.close()
    assert first.json()["status"] == "assigning", first.text
    admin.delete(f"/registrations/{reg}")
    deadline = time.monotonic() + 15
    while hub_peer.calls["DELETE devices"] == 0:
        assert time.monotonic() < deadline, hub_peer.calls
        time.sleep(0.1)
    assert reg not in hub_peer.devices
    with pytest.raises(NotFoundError):
        admin.get(f"/registrations/{reg}")
    figures = admin.get(f"/admin/linkedHubs/{hub}/writer")
    deadline = time.monotonic() + 10
    while figures["queued"]:
        assert time.monotonic() < deadline, figures
        time.sleep(0.1)
        figures = admin.get(f"/admin/linkedHubs/{hub}/writer")


@pytest.mark.parametrize("mode", ["disable", "delete"])
def test_deprovisioning_a_registration_through_the_api_reaches_the_remote_hub(
    writer_server: RunningServer, admin: Any, hub_peer: HubPeer, mode: str
) -> None:
    """DELETE /registrations/{id}?deprovision=... (part admin's operation) commits a removal
    item with the record's deletion; the writer disables or deletes the identity in the hub."""
    hub = hub_peer.link(admin)
    reg, key = enroll_in(admin, hub)
    device, body = register(writer_server, reg, key)
    device.close()
    assert body["status"] == "assigned" and reg in hub_peer.devices
    record = admin.get(f"/registrations/{reg}")
    admin.request(
        "DELETE", f"/registrations/{reg}", params={"deprovision": mode}, headers={"If-Match": record["etag"]}
    )
    with pytest.raises(NotFoundError):
        admin.get(f"/registrations/{reg}")
    deadline = time.monotonic() + 10
    while (
        (reg in hub_peer.devices) if mode == "delete" else hub_peer.devices[reg].get("status") != "disabled"
    ):
        assert time.monotonic() < deadline, hub_peer.devices.get(reg)
        time.sleep(0.1)


@pytest.mark.postgres
def test_on_postgresql_the_writer_is_woken_not_polled(
    tmp_path_factory: pytest.TempPathFactory, postgres_db_url: str, hub_peer: HubPeer
) -> None:
    """On PostgreSQL the writer loop waits on the store's watch of the outbox, and looks by
    itself only after the lease (60 s here), longer than any wait below: a retry whose backoff
    ends comes due (the loop waits for the earliest due it saw), and a deprovisioning item that
    another process commits wakes it (LISTEN/NOTIFY); both are done long before a poll."""
    lease = 60.0
    node = start_server(
        tmp_path_factory.mktemp("woken"), "--db", postgres_db_url, "--hub-write-lease", str(lease)
    )
    admin = node.client()
    try:
        hub = hub_peer.link(admin)
        reg, key = enroll_in(admin, hub)
        # The first identity write gets 503 with Retry-After 1: the item is put back, due later.
        hub_peer.inject(Fault(status=503, retry_after=1, method="PUT", kind="devices"))
        started = time.monotonic()
        device, body = register(node, reg, key)
        device.close()
        assert body["status"] == "assigned", body
        assert hub_peer.answered[503] == 1
        assert time.monotonic() - started < lease / 3, "the retry waited for the fallback"
        # Once its figures are stored, the writer has nothing left: it waits. A registration
        # worked by its request meanwhile has its figures stored within about a second too.
        assert writer_figures(admin, hub, written=1)["written"] == 1
        second, second_key = enroll_in(admin, hub)
        device, body = register(node, second, second_key)
        device.close()
        assert body["status"] == "assigned", body
        assert writer_figures(admin, hub, written=2)["written"] == 2, "the figures waited for the fallback"

        async def enqueue() -> None:  # another process (this one) queues a removal
            store = open_store(postgres_db_url)
            await store.open()
            try:
                await store.write_atomic(
                    [removal(IdentityRef(hub, reg), Deprovision.DISABLE, now=time.time())]
                )
            finally:
                await store.close()

        started = time.monotonic()
        asyncio.run(enqueue())
        while hub_peer.devices[reg].get("status") != "disabled":
            assert time.monotonic() - started < lease / 3, "the removal waited for the fallback"
            time.sleep(0.1)
    finally:
        admin.close()
        node.stop()
