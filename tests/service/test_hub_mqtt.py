"""The built-in hub's device endpoint over real TLS (and WebSockets) on loopback, against
``provisiond serve``: devices provisioned through DPS connect to their assigned hub on the
MQTT listener DPS uses, with paho-mqtt as the independent peer. What the service side triggers
(a desired patch, a method, a disconnect) comes from the test process acting as a second node
on the server's database: it reaches the device through the broker's signal stream.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg
import pytest

from provisiond import pki
from provisiond.errors import DeviceNotOnlineError, GatewayTimeoutError
from provisiond.hub.messages import CloudToDeviceMessage, c2d_to, decode_event, encode_c2d, partition
from provisiond.hub.models import ConnectionState, Device, DeviceStatus, TwinPatch, TwinProperties
from provisiond.hub.registry import HubRegistry
from provisiond.protocol.mqtt import Connack, MqttConnection, Packet, Publish, QoS, Role, Suback, Subscription
from provisiond.protocol.sas import build_sas_token, derive_device_key
from provisiond.service.hub_broker import HubBroker, MethodRequest
from provisiond.service_client import ServiceClient
from provisiond.storage import Collection, Stream, open_store, utc_iso
from tests._hub import (
    HubPaho,
    Provisioned,
    hub_token,
    hub_username,
    poll_until,
    provision_symmetric,
    provision_x509,
    server_store,
    uid,
)
from tests._server import RunningServer, start_server

WAIT = 10.0


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("hub-mqtt"))
    yield running
    running.stop()
    assert "Traceback" not in running.log() and "internal error" not in running.log()


@pytest.fixture(scope="module")
def admin(hub_server: RunningServer) -> Iterator[ServiceClient]:
    with hub_server.client() as client:
        yield client


@pytest.fixture
def devices() -> Iterator[list[HubPaho]]:
    made: list[HubPaho] = []
    yield made
    for device in made:
        device.close()


def wait_for_state(server: RunningServer, device: Provisioned, state: str) -> None:
    """Until the identity's connectionState is ``state`` (``Disconnected``: the server is done
    with the connection: its Will, its stored session, then the state)."""

    async def reached() -> bool:
        async with server_store(server) as store:
            identity = await HubRegistry(store).find(device.hub, device.device_id)
        return identity is not None and identity.connection_state.value == state

    assert asyncio.run(poll_until(reached)), f"{device.device_id} never {state}"


def connect(server: RunningServer, device: Provisioned, made: list[HubPaho], **options: Any) -> HubPaho:
    client = HubPaho(server, device, **options)
    made.append(client)
    return client


# --- CONNECT -----------------------------------------------------------------------------------


@pytest.mark.parametrize("websockets", [False, True], ids=["mqtt", "mqtt-ws"])
def test_a_provisioned_device_connects_with_its_key(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho], websockets: bool
) -> None:
    device = provision_symmetric(hub_server, admin)
    assert device.hub == hub_server.info["builtinHub"]
    connect(hub_server, device, devices, websockets=websockets).connected()


def test_a_group_device_connects_with_its_derived_key(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho]
) -> None:
    gid = uid("hubskg")
    admin.put(f"/enrollmentGroups/{gid}", {"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}})
    group_key = admin.post(f"/enrollmentGroups/{gid}/attestationmechanism")["symmetricKey"]["primaryKey"]
    reg = uid("hubskgd")
    key = derive_device_key(group_key, reg)
    token = build_sas_token(
        f"{hub_server.id_scope}/registrations/{reg}", key, int(time.time()) + 600, key_name="registration"
    )
    with hub_server.http() as http:
        r = http.put(
            f"/{hub_server.id_scope}/registrations/{reg}/register",
            params={"api-version": "2021-10-01"},
            json={"registrationId": reg},
            headers={"Authorization": token},
        )
    assert r.status_code == 202 and r.json()["status"] == "assigned", r.text
    device = Provisioned(r.json()["registrationState"]["assignedHub"], reg, key=key)
    connect(hub_server, device, devices).connected()
    # The group's own key is not the device's.
    assert connect(hub_server, Provisioned(device.hub, reg, key=group_key), devices).connack() == (5, 0)


async def test_an_identity_created_in_the_registry_connects_with_either_key(
    hub_server: RunningServer, devices: list[HubPaho]
) -> None:
    """Identities made by the service (the registry, as ``PUT /devices/{id}`` makes them; keys
    generated) connect like provisioned ones, with the primary or the secondary key."""
    hub = hub_server.info["builtinHub"]
    device_id = uid("hubreg")
    async with server_store(hub_server) as store:
        created = await HubRegistry(store).create(hub, Device(device_id=device_id))
    keys = created.authentication.symmetric_key
    assert keys is not None and keys.primary_key and keys.secondary_key
    for key, session_present in ((keys.primary_key, 0), (keys.secondary_key, 1)):
        client = await asyncio.to_thread(connect, hub_server, Provisioned(hub, device_id, key=key), devices)
        assert await asyncio.to_thread(client.connack) == (0, session_present)
        await asyncio.to_thread(client.close)


def test_an_x509_device_connects_with_its_certificate(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho], tmp_path: Path
) -> None:
    device = provision_x509(hub_server, admin, tmp_path)
    connect(hub_server, device, devices).connected()
    # Another certificate (of the same name) is not the device's.
    impostor = pki.make_device_cert(device.device_id)
    pki.write_issued(impostor, tmp_path / "impostor")
    other = Provisioned(
        device.hub,
        device.device_id,
        cert=pki.cert_path(tmp_path / "impostor"),
        key_file=pki.key_path(tmp_path / "impostor"),
    )
    assert connect(hub_server, other, devices).connack() == (5, 0)
    hub_server.wait_for_log(device.device_id, "return code 5", "thumbprint mismatch")


def test_a_ca_authenticated_device_connects_with_its_chain_to_a_verified_ca(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho], tmp_path: Path
) -> None:
    """A group device the hub keeps as ``certificateAuthority`` connects with a certificate that
    chains (through the intermediate it presents) to a CA certificate verified in provisiond;
    while that CA is not verified, or from another CA, the CONNECT is refused (5)."""
    hub = hub_server.info["builtinHub"]
    admin.put(
        f"/admin/linkedHubs/{hub}",
        {"hostName": hub, "x509GroupAuthentication": "certificateAuthority"},
        if_match="*",
    )
    root = pki.make_root_ca(uid("Hub Root"))
    inter = pki.make_intermediate_ca(uid("Hub Intermediate"), root)
    gid = uid("hubca")
    admin.put(
        f"/enrollmentGroups/{gid}",
        {
            "enrollmentGroupId": gid,
            "attestation": {
                "type": "x509",
                "x509": {
                    "signingCertificates": {
                        "primary": {"certificate": pki.certificate_pem(root.cert).decode()}
                    }
                },
            },
        },
    )

    def provisioned(issuer: pki.Issued) -> Provisioned:
        reg = uid("hubcad")
        prefix = tmp_path / reg
        pki.write_issued(pki.make_device_cert(reg, issuer), prefix, chain=True)
        ctx = ssl.create_default_context(cafile=hub_server.ca_file)
        ctx.load_cert_chain(str(pki.chain_path(prefix)), str(pki.key_path(prefix)))
        with httpx.Client(base_url=hub_server.base_url, verify=ctx, timeout=10) as http:
            r = http.put(
                f"/{hub_server.id_scope}/registrations/{reg}/register",
                params={"api-version": "2021-10-01"},
                json={"registrationId": reg},
            )
        assert r.status_code == 202 and r.json()["status"] == "assigned", r.text
        state = r.json()["registrationState"]
        return Provisioned(
            state["assignedHub"],
            state["deviceId"],
            cert=pki.chain_path(prefix),
            key_file=pki.key_path(prefix),
        )

    device = provisioned(inter)

    async def authentication() -> Any:
        async with server_store(hub_server) as store:
            record = await store.get(Collection.HUB_DEVICES, f"{device.hub}/{device.device_id}")
        assert record is not None
        return msgspec.json.decode(record.doc)["authentication"]["type"]

    assert asyncio.run(authentication()) == "certificateAuthority"
    # The CA is not verified in provisiond yet.
    name = uid("hubroot")
    admin.put(f"/admin/certificates/{name}", {"certificate": pki.certificate_pem(root.cert).decode()})
    assert connect(hub_server, device, devices).connack() == (5, 0)
    hub_server.wait_for_log(device.device_id, "return code 5")
    code = admin.post(f"/admin/certificates/{name}/generateVerificationCode")["verificationCode"]
    proof = pki.certificate_pem(pki.make_verification_cert(code, root).cert).decode()
    assert admin.post(f"/admin/certificates/{name}/verify", {"certificate": proof})["isVerified"] is True
    connect(hub_server, device, devices).connected()
    # A certificate with the device's name from another CA is not the device's.
    impostor = Provisioned(device.hub, device.device_id)
    stranger = pki.make_intermediate_ca(uid("Stranger"), pki.make_root_ca(uid("Stranger Root")))
    pki.write_issued(pki.make_device_cert(device.device_id, stranger), tmp_path / "stranger", chain=True)
    impostor.cert, impostor.key_file = (
        pki.chain_path(tmp_path / "stranger"),
        pki.key_path(tmp_path / "stranger"),
    )
    assert connect(hub_server, impostor, devices).connack() == (5, 0)


@pytest.mark.parametrize("special", ["%20x", "%41", "+@$(!)'"])
def test_device_ids_with_special_characters_connect_with_the_sdks_token(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho], special: str
) -> None:
    """IoT Hub's device ids may hold "%" and two hex digits: the Python SDK URL-encodes its
    token's sr once (quote(f"{hub}/devices/{id}", safe="")), and the hub decoded it twice, so
    "d%20x" became "d x" and the device was refused (CONNACK 4). The Node.js SDK's form, the id
    encoded before the whole sr, still connects."""
    device = provision_symmetric(hub_server, admin, device_id=f"d{special}-{uuid.uuid4().hex[:6]}")
    assert device.key is not None
    expiry = int(time.time()) + 600
    python_sdk = build_sas_token(f"{device.hub}/devices/{device.device_id}", device.key, expiry)
    node_sdk = build_sas_token(
        f"{device.hub}/devices/{urllib.parse.quote(device.device_id, safe='')}", device.key, expiry
    )
    for password in (python_sdk, node_sdk):
        client = connect(hub_server, device, devices, password=password, clean_session=True)
        assert (got := client.connack()) == (0, 0), got
        client.close()


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        pytest.param("wrong-key", 5, "matches neither of the device's keys", id="wrong-key"),
        pytest.param("expired", 5, "expired", id="expired-token"),
        pytest.param("other-device", 4, "not {hub}/devices/", id="token-for-another-device"),
        pytest.param("garbage", 4, "SharedAccessSignature", id="garbage-password"),
        pytest.param("no-credential", 5, "no credential", id="no-credential"),
        pytest.param("client-id", 2, "is not the user name's device id", id="client-id-not-username"),
        pytest.param("module", 2, "module identities", id="module"),
        pytest.param("unknown", 5, "no device", id="unknown-device"),
    ],
)
def test_bad_connects_get_iot_hubs_return_codes(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho], case: str, code: int, words: str
) -> None:
    device = provision_symmetric(hub_server, admin)
    assert device.key is not None
    options: dict[str, Any] = {}
    other_key = provision_symmetric(hub_server, admin).key
    assert other_key is not None
    if case == "wrong-key":
        options["password"] = hub_token(device.hub, device.device_id, other_key)
    elif case == "expired":
        options["password"] = hub_token(device.hub, device.device_id, device.key, ttl=-600)
    elif case == "other-device":
        options["password"] = hub_token(device.hub, "someone-else", device.key)
    elif case == "garbage":
        options["password"] = "hunter2"
    elif case == "no-credential":
        device = Provisioned(device.hub, device.device_id)
    elif case == "client-id":
        options["client_id"] = "not-" + device.device_id
    elif case == "module":
        options["username"] = f"{device.hub}/{device.device_id}/module-1/?api-version=2021-04-12"
        options["client_id"] = f"{device.device_id}/module-1"
    elif case == "unknown":
        device = Provisioned(device.hub, "no-such-" + device.device_id, key=device.key)
    words = words.replace("{hub}", device.hub)
    assert connect(hub_server, device, devices, **options).connack() == (code, 0)
    hub_server.wait_for_log(device.device_id, f"return code {code}", words)


async def test_disabling_a_connected_device_closes_it_and_refuses_it_with_server_unavailable(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho]
) -> None:
    """The registry's update says why a connected device must go; the broker closes its
    connection wherever it is (here: the server, told by the test process as another node);
    a disabled device's CONNECT gets 3, what the C and Java SDKs read as "device disabled"."""
    device = provision_symmetric(hub_server, admin)
    client = await asyncio.to_thread(lambda: connect(hub_server, device, devices).connected())
    async with server_store(hub_server) as store:
        broker = HubBroker(store)
        await broker.start()
        try:
            changed = await HubRegistry(store).update(
                device.hub, Device(device_id=device.device_id, status=DeviceStatus.DISABLED), if_match="*"
            )
            assert changed.disconnect == "the device was disabled"
            await broker.disconnect(device.hub, device.device_id, changed.disconnect)
        finally:
            await broker.close()
    await asyncio.to_thread(client.next, "disconnect")
    await asyncio.to_thread(hub_server.wait_for_log, device.device_id, "closed", "the device was disabled")
    again = await asyncio.to_thread(connect, hub_server, device, devices)
    assert await asyncio.to_thread(again.connack) == (3, 0)
    await asyncio.to_thread(hub_server.wait_for_log, device.device_id, "return code 3", "disabled")


def test_dps_connects_keep_working_on_the_shared_listener(
    hub_server: RunningServer, admin: ServiceClient
) -> None:
    """A DPS user name is not a hub's: the DPS endpoint answers it as before."""
    from tests.service.test_mqtt_endpoint import PahoDevice, enroll, token

    reg = uid_()
    key = enroll(admin, reg)
    device = PahoDevice(hub_server, reg, password=token(hub_server, reg, key)).connected()
    try:
        assert device.subscribe() == (1,)
    finally:
        device.close()


def uid_() -> str:
    return f"dps-{uuid.uuid4().hex[:10]}"


# --- telemetry ---------------------------------------------------------------------------------


async def test_telemetry_is_acknowledged_once_stored_with_its_properties(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho]
) -> None:
    device = provision_symmetric(hub_server, admin)
    client = await asyncio.to_thread(lambda: connect(hub_server, device, devices).connected())
    topic = f"devices/{device.device_id}/messages/events/%24.mid=m-1&%24.ct=application%2Fjson&color=red&flag"
    mid = client.publish(topic, b'{"t":21.5}', qos=1)
    assert (await asyncio.to_thread(client.next, "puback"))[1] == mid
    client.publish(f"devices/{device.device_id}/messages/events/", b"qos0", qos=0)
    retained = client.client.publish(
        f"devices/{device.device_id}/messages/events/", b"kept", qos=1, retain=True
    )
    while (await asyncio.to_thread(client.next, "puback"))[1] != retained.mid:
        pass  # paho reports QoS 0 publishes as sent too
    async with server_store(hub_server) as store:
        entries = await store.read(Stream.HUB_EVENTS, partition=partition(device.hub, device.device_id))
    events = [decode_event(e.doc) for e in entries]
    assert [e.body for e in events] == [b'{"t":21.5}', b"qos0", b"kept"]
    first = events[0]
    assert first.device_id == device.device_id
    assert first.properties == {"color": "red", "flag": None}
    assert first.system_properties["message-id"] == "m-1"
    assert first.system_properties["content-type"] == "application/json"
    assert first.system_properties["iothub-connection-device-id"] == device.device_id
    assert events[2].properties == {"mqtt-retain": "true"}


async def test_telemetry_sent_just_before_disconnect_is_stored(
    hub_server: RunningServer, admin: ServiceClient
) -> None:
    """A PUBLISH and a DISCONNECT in one write (a quick ``publish(); disconnect()``): the
    DISCONNECT closes the session as it is read, and the publishes before it were dropped
    without a word; they are the device's telemetry and are stored."""
    device = provision_symmetric(hub_server, admin)
    silent = SilentDevice(hub_server, device)
    assert isinstance(silent.next(Connack), Connack)
    topic = f"devices/{device.device_id}/messages/events/"
    silent.machine.publish(topic, b"at most once", qos=QoS.AT_MOST_ONCE)
    silent.machine.publish(topic, b"at least once", qos=QoS.AT_LEAST_ONCE)
    silent.disconnect()  # one sendall: both publishes and the DISCONNECT

    async def stored() -> bool:
        async with server_store(hub_server) as store:
            entries = await store.read(Stream.HUB_EVENTS, partition=partition(device.hub, device.device_id))
        return [decode_event(e.doc).body for e in entries] == [b"at most once", b"at least once"]

    assert await poll_until(stored)
    assert "Traceback" not in hub_server.log()


def test_a_device_that_does_not_read_its_answers_is_disconnected(
    hub_server: RunningServer, admin: ServiceClient
) -> None:
    """A device that sends requests and never reads the answers (twin GETs at QoS 0, which no
    in-flight cap bounds): the session stops reading it once 256 KiB of answers wait behind the
    kernel's buffers, and disconnects it after 30 s, where it used to read on and hold
    gigabytes of answers."""
    device = provision_symmetric(hub_server, admin)
    reported = {f"k{n}": "x" * 3000 for n in range(10)}  # each answer about 30 KB
    twin = HubPaho(hub_server, device, clean_session=True)
    twin.connected()
    twin.subscribe("$iothub/twin/res/#")
    response_topic, _ = twin.twin_request(
        "$iothub/twin/PATCH/properties/reported/?$rid=1", json.dumps(reported).encode()
    )
    assert response_topic.startswith("$iothub/twin/res/204/"), response_topic
    twin.close()
    silent = SilentDevice(hub_server, device)
    assert isinstance(silent.next(Connack), Connack)
    silent.sock.settimeout(1.0)
    sent, deadline = 0, time.monotonic() + 90
    try:  # 100 GETs (3 MB of answers) at a time, reading nothing, until the server gives up
        while time.monotonic() < deadline:
            for _ in range(100):
                silent.machine.publish(f"$iothub/twin/GET/?$rid={sent}", b"", qos=QoS.AT_MOST_ONCE)
                sent += 1
            silent.sock.sendall(silent.machine.get_outbound_data())
    except OSError:
        pass  # a send that timed out (the server stopped reading), or the connection closed
    line = hub_server.wait_for_log(device.device_id, "the device did not read its answers", timeout=60)
    assert "bytes more were waiting after 30 s" in line
    silent.sock.close()
    assert "Traceback" not in hub_server.log()


async def test_a_will_on_the_telemetry_topic_is_stored_when_the_connection_breaks(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho]
) -> None:
    """The Will (IoT Hub: on the device's telemetry topic) becomes telemetry with
    ``iothub-MessageType: Will`` when the connection ends without DISCONNECT; not after one."""
    device = provision_symmetric(hub_server, admin)
    topic = f"devices/{device.device_id}/messages/events/reason=gone"
    orderly = await asyncio.to_thread(
        lambda: connect(hub_server, device, devices, will=(topic, b"orderly")).connected()
    )
    await asyncio.to_thread(wait_for_state, hub_server, device, "Connected")
    await asyncio.to_thread(orderly.close)  # DISCONNECT: no Will
    await asyncio.to_thread(wait_for_state, hub_server, device, "Disconnected")
    broken = await asyncio.to_thread(
        lambda: connect(hub_server, device, devices, will=(topic, b"broken")).connected(session_present=1)
    )
    broken.client.socket().shutdown(socket.SHUT_RDWR)  # no DISCONNECT
    await asyncio.to_thread(broken.next, "disconnect")
    key = partition(device.hub, device.device_id)

    async def events() -> list[Any]:
        async with server_store(hub_server) as store:
            return [decode_event(e.doc) for e in await store.read(Stream.HUB_EVENTS, partition=key)]

    async def stored() -> bool:
        return bool(await events())

    assert await poll_until(stored)
    found = await events()
    assert [e.body for e in found] == [b"broken"], [(e.body, e.properties) for e in found]
    event = found[0]
    assert event.body == b"broken" and event.properties == {"reason": "gone", "iothub-MessageType": "Will"}


@pytest.mark.parametrize(
    ("topic", "qos", "words"),
    [
        pytest.param(
            "devices/{other}/messages/events/", 1, "telemetry for another device", id="other-device"
        ),
        pytest.param("some/topic", 1, "a topic IoT Hub does not have", id="unknown-topic"),
        pytest.param("devices/{id}/messages/events/", 2, "QoS 2", id="qos-2"),
    ],
)
def test_publishes_iot_hub_does_not_take_close_the_connection(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho], topic: str, qos: int, words: str
) -> None:
    device = provision_symmetric(hub_server, admin)
    client = connect(hub_server, device, devices).connected()
    client.publish(
        topic.replace("{other}", "x" + device.device_id).replace("{id}", device.device_id), b"x", qos=qos
    )
    client.next("disconnect")
    hub_server.wait_for_log(device.device_id, "closed", words)


# --- subscriptions -----------------------------------------------------------------------------


def test_subscriptions_are_iot_hubs_and_qos_2_is_granted_as_1(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho]
) -> None:
    device = provision_symmetric(hub_server, admin)
    client = connect(hub_server, device, devices).connected()
    assert client.subscribe("$iothub/twin/res/#", qos=2) == (1,)
    assert client.subscribe("$iothub/methods/POST/#", qos=0) == (0,)
    assert client.subscribe("some/other/#", f"devices/x{device.device_id}/messages/devicebound/#") == (
        128,
        128,
    )
    # Five filters at most (two spellings of one filter count twice).
    assert client.subscribe(
        f"devices/{device.device_id}/messages/devicebound/#",
        "$iothub/twin/PATCH/properties/desired/#",
        "$iothub/twin/res/+/#",
        "$iothub/methods/POST/+/#",
    ) == (1, 1, 1, 128)
    hub_server.wait_for_log(device.device_id, "refused the subscription", "over 5 subscriptions")


# --- twins -------------------------------------------------------------------------------------


def test_twin_get_and_reported_patch(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho]
) -> None:
    device = provision_symmetric(
        hub_server, admin, initial_twin={"tags": {"site": "a"}, "properties": {"desired": {"rate": 5}}}
    )
    client = connect(hub_server, device, devices).connected()
    assert client.subscribe("$iothub/twin/res/#") == (1,)
    topic, body = client.twin_request("$iothub/twin/GET/?$rid=1", b" ")
    assert topic == "$iothub/twin/res/200/?$rid=1"
    assert body == {"desired": {"rate": 5, "$version": 1}, "reported": {"$version": 1}}
    topic, body = client.twin_request(
        "$iothub/twin/PATCH/properties/reported/?$rid=2", b'{"fw":"1.0","gone":null}'
    )
    assert (topic, body) == ("$iothub/twin/res/204/?$rid=2&$version=2", None)
    client.twin_request("$iothub/twin/PATCH/properties/reported/?$rid=3", b'{"fw":null,"ok":true}')
    topic, body = client.twin_request("$iothub/twin/GET/?$rid=4", b"")
    assert body == {"desired": {"rate": 5, "$version": 1}, "reported": {"ok": True, "$version": 3}}


def nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for level in range(levels):
        value = {f"l{level}": value}
    return value


@pytest.mark.parametrize(
    ("body", "words"),
    [
        pytest.param(b"{not json", "not JSON", id="not-json"),
        pytest.param(b"[1, 2]", "must be a JSON object", id="not-an-object"),
        pytest.param(b'{"$version": 4}', "members starting with '$'", id="dollar-member"),
        pytest.param(json.dumps(nested(12)).encode(), "deep", id="too-deep"),
        pytest.param(json.dumps({"big": "x" * 4097}).encode(), "4", id="string-too-long"),
    ],
)
def test_bad_reported_patches_answer_400_with_an_error_body(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho], body: bytes, words: str
) -> None:
    device = provision_symmetric(hub_server, admin)
    client = connect(hub_server, device, devices).connected()
    client.subscribe("$iothub/twin/res/#")
    topic, error = client.twin_request("$iothub/twin/PATCH/properties/reported/?$rid=9", body)
    assert topic == "$iothub/twin/res/400/?$rid=9"
    # The Node.js SDK only sees an error through errorCode in the body.
    assert error["errorCode"] == 400004 and words in error["message"] and error["trackingId"]
    hub_server.wait_for_log(device.device_id, "twin-reported $rid=9: 400", error["trackingId"])
    _, twin = client.twin_request("$iothub/twin/GET/?$rid=10", b" ")
    assert twin["reported"] == {"$version": 1}, "a refused patch changes nothing"


# --- the service side: desired patches, methods, disconnects -------------------------------------


async def test_desired_patches_reach_the_connected_device_with_their_version(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho]
) -> None:
    device = provision_symmetric(hub_server, admin, initial_twin={"properties": {"desired": {"rate": 5}}})
    client = await asyncio.to_thread(lambda: connect(hub_server, device, devices).connected())
    assert await asyncio.to_thread(client.subscribe, "$iothub/twin/PATCH/properties/desired/#") == (1,)
    async with server_store(hub_server) as store:
        broker = HubBroker(store)
        await broker.start()
        try:
            update = await HubRegistry(store).update_twin(
                device.hub,
                device.device_id,
                TwinPatch(properties=TwinProperties(desired={"rate": 7, "mode": "eco"})),
            )
            changes, version = update.desired_changes, update.device.twin.desired_version
            assert version == 2 and changes is not None
            await broker.notify_desired(device.hub, device.device_id, changes, version)
            topic, qos, payload, _ = await asyncio.to_thread(client.message)
        finally:
            await broker.close()
    assert topic == "$iothub/twin/PATCH/properties/desired/?$version=2" and qos == 1
    assert json.loads(payload) == {"rate": 7, "mode": "eco", "$version": 2}


async def test_a_method_invoked_on_another_node_is_answered_by_the_device(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho]
) -> None:
    device = provision_symmetric(hub_server, admin)
    client = await asyncio.to_thread(lambda: connect(hub_server, device, devices).connected())
    assert await asyncio.to_thread(client.subscribe, "$iothub/methods/POST/#") == (1,)

    def answer() -> tuple[str, int, Any]:
        topic, qos, payload, _ = client.message()
        rid = topic.split("?$rid=")[1]
        client.publish(
            f"$iothub/methods/res/201/?$rid={rid}", json.dumps({"got": json.loads(payload)}).encode()
        )
        return topic, qos, json.loads(payload)

    async with server_store(hub_server) as store:
        broker = HubBroker(store)
        await broker.start()
        try:
            answering = asyncio.ensure_future(asyncio.to_thread(answer))
            result = await broker.invoke_method(
                device.hub, device.device_id, "reboot", {"delay": 1}, response_timeout=10
            )
            topic, qos, request = await answering
            with pytest.raises(GatewayTimeoutError):  # subscribed, but nobody answers
                await broker.invoke_method(device.hub, device.device_id, "slow", None, response_timeout=0.5)
            with pytest.raises(DeviceNotOnlineError):
                await broker.invoke_method(
                    device.hub, "not-connected-" + device.device_id, "x", None, response_timeout=5
                )
        finally:
            await broker.close()
    assert topic.startswith("$iothub/methods/POST/reboot/?$rid=") and qos == 0  # IoT Hub sends them at QoS 0
    assert request == {"delay": 1}
    assert (result.status, result.payload) == (201, {"got": {"delay": 1}})


async def test_a_method_request_signalled_twice_reaches_the_device_once(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho]
) -> None:
    """A caller on another node may signal its request again with the same $rid (it saw the
    device connect); the process holding the device delivers each $rid once."""
    device = provision_symmetric(hub_server, admin)
    client = await asyncio.to_thread(lambda: connect(hub_server, device, devices).connected())
    assert await asyncio.to_thread(client.subscribe, "$iothub/methods/POST/#") == (1,)
    key = partition(device.hub, device.device_id)

    def request(rid: str, name: str) -> tuple[str, bytes]:
        signal = MethodRequest(rid=rid, name=name, payload=b"{}", connect_deadline=0.0, origin="elsewhere")
        return key, msgspec.json.encode(signal)

    async with server_store(hub_server) as store:
        await store.append(Stream.HUB_SIGNALS, [request("rid-1", "first")])
        await store.append(Stream.HUB_SIGNALS, [request("rid-1", "first")])
        await store.append(Stream.HUB_SIGNALS, [request("rid-2", "second")])
    topics = [(await asyncio.to_thread(client.message))[0] for _ in range(2)]
    assert topics == ["$iothub/methods/POST/first/?$rid=rid-1", "$iothub/methods/POST/second/?$rid=rid-2"]


async def test_a_device_not_subscribed_to_methods_is_not_online(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho]
) -> None:
    device = provision_symmetric(hub_server, admin)
    await asyncio.to_thread(lambda: connect(hub_server, device, devices).connected())
    async with server_store(hub_server) as store:
        broker = HubBroker(store)
        await broker.start()
        try:
            with pytest.raises(DeviceNotOnlineError, match="not subscribed to methods"):
                await broker.invoke_method(device.hub, device.device_id, "x", None, response_timeout=5)
        finally:
            await broker.close()


def test_one_connection_per_device_the_new_one_wins(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho]
) -> None:
    device = provision_symmetric(hub_server, admin)
    first = connect(hub_server, device, devices).connected()
    second = connect(hub_server, device, devices).connected(session_present=1)
    first.next("disconnect")
    hub_server.wait_for_log(device.device_id, "closed", "a new connection of the device replaced it")
    second.subscribe("$iothub/twin/res/#")  # the new one works
    _, twin = second.twin_request("$iothub/twin/GET/?$rid=1", b" ")
    assert twin["reported"] == {"$version": 1}


def test_keep_alive_is_enforced_at_one_and_a_half_times(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho]
) -> None:
    device = provision_symmetric(hub_server, admin)
    client = connect(hub_server, device, devices, keepalive=1).connected()
    client.client.loop_stop()  # no more PINGREQs
    hub_server.wait_for_log(device.device_id, "closed", "the keep-alive lapsed (1 s)")


def test_the_session_ends_when_its_sas_token_expires(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho]
) -> None:
    """As IoT Hub: a connection lasts until its SAS token expires (with the service's clock
    skew, 60 s), then the device must connect again with a new one."""
    device = provision_symmetric(hub_server, admin)
    assert device.key is not None
    token = hub_token(device.hub, device.device_id, device.key, ttl=-58)  # 2 s of skew left
    client = connect(hub_server, device, devices, password=token).connected()
    client.next("disconnect")
    hub_server.wait_for_log(device.device_id, "closed", "the SAS token expired")


# --- persistent sessions and cloud-to-device messages --------------------------------------------


async def enqueue_c2d(
    store: Any, device: Provisioned, body: bytes, *, expiry: str | None = None, **props: str
) -> None:
    message = CloudToDeviceMessage(
        message_id=uuid.uuid4().hex,
        to=c2d_to(device.device_id),
        enqueued_time=utc_iso(time.time()),
        expiry_time_utc=expiry,
        properties=dict(props),
        body=body,
    )
    await store.append(Stream.HUB_C2D, [(partition(device.hub, device.device_id), encode_c2d(message))])


async def test_c2d_messages_wait_for_the_device_and_go_once_acknowledged(
    hub_server: RunningServer, admin: ServiceClient, devices: list[HubPaho]
) -> None:
    device = provision_symmetric(hub_server, admin)
    key = partition(device.hub, device.device_id)
    async with server_store(hub_server) as store:
        await enqueue_c2d(store, device, b"one", color="red")
        await enqueue_c2d(store, device, b"stale", expiry="2001-01-01T00:00:00.000000Z")
        await enqueue_c2d(store, device, b"two")
        client = await asyncio.to_thread(lambda: connect(hub_server, device, devices).connected())
        assert await asyncio.to_thread(
            client.subscribe, f"devices/{device.device_id}/messages/devicebound/#"
        ) == (1,)
        first = await asyncio.to_thread(client.message)
        second = await asyncio.to_thread(client.message)
        assert [first[2], second[2]] == [b"one", b"two"], "the expired one is dropped"
        assert first[0].startswith(f"devices/{device.device_id}/messages/devicebound/%24.mid=")
        assert first[0].endswith("&color=red") and first[1] == 1 and not first[3]

        async def drained() -> bool:
            return await store.entry_count(Stream.HUB_C2D, partition=key) == 0

        assert await poll_until(drained), "acknowledged and expired ones are gone"
        # While connected: a new message arrives once the broker is told.
        broker = HubBroker(store)
        await broker.start()
        try:
            await enqueue_c2d(store, device, b"three")
            await broker.notify_c2d(device.hub, device.device_id)
            assert (await asyncio.to_thread(client.message))[2] == b"three"
        finally:
            await broker.close()


def test_a_persistent_session_keeps_its_subscriptions_across_a_restart(tmp_path: Path) -> None:
    server = start_server(tmp_path / "node")
    try:
        with server.client() as admin:
            device = provision_symmetric(server, admin)
        client = HubPaho(server, device).connected(session_present=0)
        assert client.subscribe(
            "$iothub/twin/res/#", f"devices/{device.device_id}/messages/devicebound/#"
        ) == (1, 1)
        client.close()
        server.stop()
        server = start_server(tmp_path / "node", port=server.port)
        client = HubPaho(server, device).connected(session_present=1)
        try:
            # No SUBSCRIBE on this connection: the twin response still comes.
            topic, body = client.twin_request("$iothub/twin/GET/?$rid=1", b" ")
            assert topic == "$iothub/twin/res/200/?$rid=1" and body["reported"] == {"$version": 1}

            async def enqueue() -> None:
                async with server_store(server) as store:
                    await enqueue_c2d(store, device, b"after restart")
                    broker = HubBroker(store)
                    await broker.start()
                    await broker.notify_c2d(device.hub, device.device_id)
                    await broker.close()

            asyncio.run(enqueue())
            assert client.message()[2] == b"after restart"
        finally:
            client.close()
        # A clean session forgets it.
        clean = HubPaho(server, device, clean_session=True).connected(session_present=0)
        clean.close()
        again = HubPaho(server, device).connected(session_present=0)
        again.close()
    finally:
        server.stop()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_one_connection_per_device_across_nodes(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Two ``provisiond serve`` on one database (a SQLite file; PostgreSQL, as several nodes
    run): the device's newer connection, on the other node, closes the older one; the identity
    stays connected, and a method invoked from a third process, a method and a cloud-to-device
    message sent through the first node's API reach the device where it is now.

    On PostgreSQL every process reads the signal stream when a notification wakes it, and its
    fallback poll is set to 30 s here: a signal read by the poll would fail the method calls
    (nobody accepts them within the broker's 1 s) and time the client's waits out. The nodes'
    listening connections are terminated half-way: they come back, and wake the nodes again."""
    fallback = 30.0
    if backend == "postgresql":
        db = str(request.getfixturevalue("postgres_db_url"))
        options = ["--hub-signal-poll", str(fallback)]
    else:
        db = f"sqlite:///{tmp_path / 'a' / 'provisiond.db'}"
        options = []
    node_a = start_server(tmp_path / "a", "--db", db.removeprefix("sqlite:///"), *options)
    node_b = start_server(tmp_path / "b", "--db", db.removeprefix("sqlite:///"), *options)
    made: list[HubPaho] = []
    try:
        with node_a.client() as admin:
            device = provision_symmetric(node_a, admin)
        first = connect(node_a, device, made).connected()
        assert first.subscribe("$iothub/methods/POST/#") == (1,)
        second = connect(node_b, device, made).connected(session_present=1)
        first.next("disconnect")
        node_a.wait_for_log(device.device_id, "closed", "a new connection of the device (on another process)")

        async def invoke() -> tuple[Any, bool]:
            store = open_store(db)
            await store.open()
            try:
                broker = HubBroker(store, fallback_interval=fallback)
                await broker.start()
                try:
                    answering = asyncio.ensure_future(asyncio.to_thread(answer))
                    result = await broker.invoke_method(
                        device.hub, device.device_id, "where", None, response_timeout=10
                    )
                    await answering
                finally:
                    await broker.close()
                identity = await HubRegistry(store).get(device.hub, device.device_id)
                return result, identity.connection_state is ConnectionState.CONNECTED
            finally:
                await store.close()

        def answer() -> None:
            topic, _, _, _ = second.message()  # the stored session's subscription, on node B
            rid = topic.split("?$rid=")[1]
            second.publish(f"$iothub/methods/res/200/?$rid={rid}", b'"node b"')

        result, connected = asyncio.run(invoke())
        assert (result.status, result.payload) == (200, "node b")
        assert connected, "the replaced connection does not mark the identity disconnected"

        if backend == "postgresql":
            # Both nodes lose their listening connections: they reconnect by themselves (and
            # read what came meanwhile), and notifications wake them again.
            with psycopg.connect(db, autocommit=True) as conn:
                ended = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query LIKE 'LISTEN %'"
                ).fetchall()
            assert ended == [(True,), (True,)], "one listening connection per node"
            for node in (node_a, node_b):
                node.wait_for_log("listening for notifications again")

        # Through node A's API (real sockets end to end): a method, then a message.
        with node_a.client() as admin:
            answering = threading.Thread(target=answer)
            answering.start()
            called = admin.hub_messages.invoke_method(
                device.hub, device.device_id, "where", response_timeout=10
            )
            answering.join()
            assert (called.status, called.payload) == (200, "node b")
            assert second.subscribe(f"devices/{device.device_id}/messages/devicebound/#") == (1,)
            admin.hub_messages.send_c2d(device.hub, device.device_id, b"to node b")
            topic, _, payload, _ = second.message()
            assert topic.startswith(f"devices/{device.device_id}/messages/devicebound/")
            assert payload == b"to node b"
    finally:
        for client in made:
            client.close()
        node_b.stop()
        node_a.stop()
    for node in (node_a, node_b):
        assert "Traceback" not in node.log(), node.log()[-3000:]


def test_last_activity_is_written_in_batches_not_per_message(tmp_path: Path) -> None:
    """connectionState and lastActivityTime on the identity: written at connect, not for each
    message (the identity's record is unchanged after a burst of telemetry when the batch
    interval has not passed), and brought forward by the batch while the device stays
    connected."""

    async def identity(server: RunningServer, device: Provisioned) -> tuple[str, dict[str, Any]]:
        async with server_store(server) as store:
            record = await store.get(Collection.HUB_DEVICES, f"{device.hub}/{device.device_id}")
        assert record is not None
        return record.etag, msgspec.json.decode(record.doc)

    def burst(client: HubPaho, device: Provisioned) -> None:
        mids = [
            client.publish(f"devices/{device.device_id}/messages/events/", b"x%d" % i, qos=1)
            for i in range(20)
        ]
        acked = {client.next("puback")[1] for _ in mids}
        assert acked == set(mids)

    for interval, batched in (("3600", False), ("0.2", True)):
        server = start_server(tmp_path / interval, "--hub-activity-interval", interval)
        try:
            with server.client() as admin:
                device = provision_symmetric(server, admin)
            client = HubPaho(server, device).connected()
            try:

                async def connected(server: RunningServer = server, device: Provisioned = device) -> bool:
                    return (await identity(server, device))[1].get("connectionState") == "Connected"

                assert asyncio.run(poll_until(connected))
                etag, doc = asyncio.run(identity(server, device))
                at_connect = doc["lastActivityTime"]
                assert doc["connectionStateUpdatedTime"] == at_connect
                burst(client, device)
                if not batched:
                    assert asyncio.run(identity(server, device))[0] == etag, "a write per message"
                    continue

                async def moved(
                    server: RunningServer = server, device: Provisioned = device, at_connect: str = at_connect
                ) -> bool:
                    doc = (await identity(server, device))[1]
                    return bool(
                        doc["lastActivityTime"] > at_connect and doc["connectionState"] == "Connected"
                    )

                assert asyncio.run(poll_until(moved)), "the batch brings lastActivityTime forward"
            finally:
                client.close()
        finally:
            server.stop()


class SilentDevice:
    """A device that does not acknowledge what it receives (provisiond's own MQTT machine, in
    the client role, over a TLS socket): paho acknowledges every QoS 1 publish at once."""

    def __init__(self, server: RunningServer, device: Provisioned) -> None:
        assert device.key is not None
        ctx = ssl.create_default_context(cafile=server.ca_file)
        raw = socket.create_connection(("localhost", int(server.info["mqttPort"])), timeout=WAIT)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.machine = MqttConnection(Role.CLIENT, clock=time.monotonic)
        self.machine.connect(
            client_id=device.device_id,
            username=hub_username(device.hub, device.device_id),
            password=hub_token(device.hub, device.device_id, device.key).encode(),
            clean_session=False,
        )
        self.packets: list[Packet] = []

    def _send(self) -> None:
        self.sock.sendall(self.machine.get_outbound_data())

    def next(self, kind: type[Packet]) -> Packet:
        self._send()
        while True:
            for i, packet in enumerate(self.packets):
                if isinstance(packet, kind):
                    return self.packets.pop(i)
            self.packets += self.machine.feed_bytes(self.sock.recv(65536))

    def subscribe(self, topic_filter: str) -> None:
        self.machine.subscribe([Subscription(topic_filter=topic_filter, qos=QoS.AT_LEAST_ONCE)])
        self.next(Suback)

    def disconnect(self) -> None:
        self.machine.disconnect()
        self._send()
        self.sock.close()


def test_an_unacknowledged_c2d_message_is_delivered_again_with_dup_after_a_restart(tmp_path: Path) -> None:
    """A cloud-to-device message published to a persistent session and not acknowledged stays
    queued; the device's next connection, after a server restart, gets it again with DUP set
    and without subscribing again (its stored session subscribed), and its PUBACK removes it."""
    server = start_server(tmp_path / "node")
    try:
        with server.client() as admin:
            device = provision_symmetric(server, admin)
        key = partition(device.hub, device.device_id)

        async def enqueue() -> None:
            async with server_store(server) as store:
                await enqueue_c2d(store, device, b"once")

        asyncio.run(enqueue())
        silent = SilentDevice(server, device)
        connack = silent.next(Connack)
        assert isinstance(connack, Connack) and not connack.session_present
        silent.subscribe(f"devices/{device.device_id}/messages/devicebound/#")
        first = silent.next(Publish)
        assert isinstance(first, Publish) and first.payload == b"once" and not first.dup
        silent.disconnect()  # without a PUBACK
        wait_for_state(server, device, "Disconnected")
        server.stop()

        server = start_server(tmp_path / "node", port=server.port)
        client = HubPaho(server, device).connected(session_present=1)
        try:
            topic, qos, payload, dup = client.message()
            assert (payload, qos, dup) == (b"once", 1, True)
            assert topic.startswith(f"devices/{device.device_id}/messages/devicebound/")

            async def drained() -> bool:
                async with server_store(server) as store:
                    return await store.entry_count(Stream.HUB_C2D, partition=key) == 0

            assert asyncio.run(poll_until(drained)), "the PUBACK removes it"
        finally:
            client.close()
    finally:
        server.stop()
