"""The MQTT device endpoint over real TLS (and WebSockets) on loopback, against ``provisiond
serve``. paho-mqtt is the independent peer; raw TLS sockets with the project's codec send what
paho will not (oversized, malformed, other protocol levels, nothing at all). Every close must
come with a log line that says why, and no input may crash the server: a fuzz of mutated valid
sessions ends the module, followed by a registration that must still work.
"""

from __future__ import annotations

import json
import queue
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho  # type: ignore[import-untyped]
import pytest

from provisiond import pki
from provisiond.errors import InsufficientData
from provisiond.protocol.mqtt import (
    Connack,
    Connect,
    ConnectReturnCode,
    Disconnect,
    MqttConnection,
    Packet,
    Pingresp,
    Puback,
    Publish,
    QoS,
    Role,
    State,
    Suback,
    SubackReturnCode,
    Subscribe,
    Subscription,
    decode_packet,
    encode_packet,
)
from provisiond.protocol.sas import build_sas_token, derive_device_key
from provisiond.protocol.topics import register_topic, status_topic
from provisiond.service_client import ServiceClient
from tests._server import RunningServer, start_server

CONNECT_TIMEOUT = 1.0  # --mqtt-connect-timeout of this module's server
WAIT = 10.0


@pytest.fixture(scope="module")
def dps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("mqtt"), "--mqtt-connect-timeout", str(CONNECT_TIMEOUT))
    yield running
    running.stop()
    assert "Traceback" not in running.log() and "internal error" not in running.log()


@pytest.fixture(scope="module")
def admin(dps: RunningServer) -> Iterator[ServiceClient]:
    with dps.client() as client:
        yield client


def uid(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def enroll(admin: ServiceClient, reg: str, **extra: Any) -> str:
    admin.put(
        f"/enrollments/{reg}", {"registrationId": reg, "attestation": {"type": "symmetricKey"}, **extra}
    )
    key: str = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    return key


def username(dps: RunningServer, reg: str) -> str:
    return f"{dps.id_scope}/registrations/{reg}/api-version=2019-03-31&ClientVersion=test%2F1"


def token(dps: RunningServer, reg: str, key: str, ttl: int = 3600) -> str:
    return build_sas_token(f"{dps.id_scope}/registrations/{reg}", key, int(time.time()) + ttl)


# --- paho, the independent peer --------------------------------------------------------------------


class PahoDevice:
    """paho-mqtt 1.6 as a DPS device: every callback lands in ``events`` in arrival order."""

    def __init__(
        self,
        dps: RunningServer,
        reg: str,
        *,
        password: str | None = None,
        user: str | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        keepalive: int = 60,
        websockets: bool = False,
    ) -> None:
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.log: list[tuple[Any, ...]] = []
        transport = "websockets" if websockets else "tcp"
        self.client = paho.Client(
            client_id=reg, clean_session=False, protocol=paho.MQTTv311, transport=transport
        )
        ctx = ssl.create_default_context(cafile=dps.ca_file)
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key))
        self.client.tls_set_context(ctx)
        if websockets:
            self.client.ws_set_options(path="/$iothub/websocket")
        self.client.username_pw_set(user if user is not None else username(dps, reg), password)
        self.client.on_connect = lambda c, u, flags, rc: self._event("connack", rc, flags["session present"])
        self.client.on_subscribe = lambda c, u, mid, granted: self._event("suback", mid, tuple(granted))
        self.client.on_publish = lambda c, u, mid: self._event("puback", mid)
        self.client.on_message = lambda c, u, m: self._event("message", m.topic, m.qos, m.payload)
        self.client.on_disconnect = lambda c, u, rc: self._event("disconnect", rc)
        port = dps.port if websockets else int(dps.info["mqttPort"])
        self.client.connect("localhost", port, keepalive)
        self.client.loop_start()

    def _event(self, *event: Any) -> None:
        self.log.append(event)
        self.events.put(event)

    def next(self, kind: str) -> tuple[Any, ...]:
        deadline = time.monotonic() + WAIT
        while True:
            event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if event[0] == kind:
                return event

    def connected(self) -> PahoDevice:
        _, rc, session_present = self.next("connack")
        assert (rc, session_present) == (0, 0)
        return self

    def subscribe(self, qos: int = 1) -> tuple[int, ...]:
        self.client.subscribe("$dps/registrations/res/#", qos=qos)
        granted: tuple[int, ...] = self.next("suback")[2]
        return granted

    def request(self, topic: str, body: bytes, qos: int = 1) -> tuple[str, int, dict[str, Any]]:
        info = self.client.publish(topic, body, qos=qos)
        _, response_topic, response_qos, payload = self.next("message")
        if qos:  # the PUBACK came before the response (.NET requires it)
            assert self.log.index(("puback", info.mid)) < self.log.index(self.log[-1])
        return response_topic, response_qos, json.loads(payload)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def devices() -> Iterator[list[PahoDevice]]:
    made: list[PahoDevice] = []
    yield made
    for device in made:
        device.close()


def register_body(reg: str) -> bytes:
    return json.dumps({"payload": None, "registrationId": reg}, sort_keys=True).encode()  # the Python SDK's


def test_register_and_poll_symmetric_key(
    dps: RunningServer, admin: ServiceClient, devices: list[PahoDevice]
) -> None:
    reg = uid()
    key = enroll(admin, reg, deviceId="mqtt-device")
    device = PahoDevice(dps, reg, password=token(dps, reg, key)).connected()
    devices.append(device)
    assert device.subscribe(qos=2) == (1,)  # QoS 2 is granted as 1
    rid = str(uuid.uuid4())
    topic, qos, body = device.request(register_topic(rid), register_body(reg))
    assert topic == f"$dps/registrations/res/202/?$rid={rid}" and qos == 1
    assert body["status"] == "assigned"
    state = body["registrationState"]
    assert (state["deviceId"], state["assignedHub"]) == ("mqtt-device", dps.info["builtinHub"])
    topic, qos, polled = device.request(status_topic("p1", body["operationId"]), b" ")
    assert topic == "$dps/registrations/res/200/?$rid=p1" and polled["status"] == "assigned"
    assert admin.get(f"/registrations/{reg}")["status"] == "assigned"
    dps.wait_for_log(f"registration {reg} assigned", "[mqtt]")


def test_group_key_qos0_publish_and_net_style_body(
    dps: RunningServer, admin: ServiceClient, devices: list[PahoDevice]
) -> None:
    gid = uid("grp")
    admin.put(f"/enrollmentGroups/{gid}", {"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}})
    group_key = admin.post(f"/enrollmentGroups/{gid}/attestationmechanism")["symmetricKey"]["primaryKey"]
    reg = uid()
    device = PahoDevice(dps, reg, password=token(dps, reg, derive_device_key(group_key, reg))).connected()
    devices.append(device)
    device.subscribe()
    # The C SDK publishes at QoS 0; .NET sends no registrationId; the answer still comes at QoS 1.
    topic, qos, body = device.request(register_topic("7"), b'{"payload":{"model":"c"}}', qos=0)
    assert topic == "$dps/registrations/res/202/?$rid=7" and qos == 1
    assert body["registrationState"]["symmetricKey"] == {"enrollmentGroupId": gid}
    assert admin.get(f"/registrations/{reg}")["payload"] == {"model": "c"}


def test_x509_individual_and_group_over_tls_and_websockets(
    dps: RunningServer, admin: ServiceClient, devices: list[PahoDevice], tmp_path: Path
) -> None:
    reg = uid("x")
    leaf = pki.make_device_cert(reg)
    pki.write_issued(leaf, tmp_path / "leaf")
    admin.put(
        f"/enrollments/{reg}",
        {
            "registrationId": reg,
            "attestation": {
                "type": "x509",
                "x509": {
                    "clientCertificates": {
                        "primary": {"certificate": pki.certificate_pem(leaf.cert).decode()}
                    }
                },
            },
        },
    )
    root = pki.make_root_ca("MQTT Root " + uid())
    intermediate = pki.make_intermediate_ca("MQTT Intermediate " + uid(), root)
    gid = uid("xg")
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
    member = uid("xm")
    pki.write_issued(pki.make_device_cert(member, intermediate), tmp_path / "member", chain=True)
    cases = [
        (reg, pki.cert_path(tmp_path / "leaf"), pki.key_path(tmp_path / "leaf"), False),
        (member, pki.chain_path(tmp_path / "member"), pki.key_path(tmp_path / "member"), True),
    ]
    states = []
    for name, cert, key, websockets in cases:
        device = PahoDevice(dps, name, cert=cert, key=key, websockets=websockets).connected()  # no password
        devices.append(device)
        device.subscribe()
        _, _, body = device.request(register_topic("1"), register_body(name))
        assert body["status"] == "assigned" and body["registrationState"]["deviceId"] == name
        states.append(body["registrationState"]["x509"])
    assert states[0]["certificateInfo"]["subjectName"] == f"CN={reg}" and "enrollmentGroupId" not in states[0]
    assert states[1]["enrollmentGroupId"] == gid


def test_a_wrong_key_is_answered_at_register_with_the_dps_error(
    dps: RunningServer, admin: ServiceClient, devices: list[PahoDevice]
) -> None:
    reg = uid()
    enroll(admin, reg)
    wrong = enroll(admin, uid())
    device = PahoDevice(dps, reg, password=token(dps, reg, wrong)).connected()
    devices.append(device)
    device.subscribe()
    topic, _, body = device.request(register_topic("9"), register_body(reg))
    assert topic == "$dps/registrations/res/401/?$rid=9"
    assert body["errorCode"] == 401002 and "not signed with a key" in body["message"] and body["trackingId"]
    dps.wait_for_log("MQTT", reg, "401002", body["trackingId"])
    _, _, body = device.request(status_topic("10", "no-such-operation"), b" ")
    assert body["errorCode"] == 401002  # a poll attests again


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        pytest.param("garbage-password", 4, "SharedAccessSignature", id="garbage-password"),
        pytest.param("expired", 4, "expired", id="expired-token"),
        pytest.param(
            "other-device", 4, "check the ID scope and the registration id", id="token-for-another-device"
        ),
        pytest.param("no-credential", 5, "no credential", id="no-credential"),
        pytest.param("id-mismatch", 2, "is not the user name's registration id", id="client-id-not-username"),
        pytest.param("bad-username", 4, "is not {idScope}/registrations", id="bad-username"),
        pytest.param("bad-id", 2, "client id must be the registration id", id="invalid-registration-id"),
    ],
)
def test_bad_connects_get_the_right_connack(
    dps: RunningServer, admin: ServiceClient, devices: list[PahoDevice], case: str, code: int, words: str
) -> None:
    reg = uid()
    key = enroll(admin, reg)
    client_id, user = reg, None
    password: str | None = token(dps, reg, key)
    if case == "garbage-password":
        password = "hunter2"
    elif case == "expired":
        password = token(dps, reg, key, ttl=-600)
    elif case == "other-device":
        password = token(dps, uid(), key)
    elif case == "no-credential":
        password = None
    elif case == "id-mismatch":
        user = username(dps, uid())
    elif case == "bad-username":
        user = "just-a-name"
    elif case == "bad-id":
        client_id = "-bad id-"
        user = username(dps, client_id)
    device = PahoDevice(dps, client_id, password=password, user=user)
    devices.append(device)
    _, rc, session_present = device.next("connack")
    assert (rc, session_present) == (code, 0)
    dps.wait_for_log("MQTT", f"CONNECT refused with return code {code}", words)


# --- raw TLS sockets, for what paho will not send --------------------------------------------------


class Raw:
    """A TLS connection that speaks bytes; ``packets()`` decodes what comes back."""

    def __init__(self, dps: RunningServer) -> None:
        ctx = ssl.create_default_context(cafile=dps.ca_file)
        raw = socket.create_connection(("127.0.0.1", int(dps.info["mqttPort"])), timeout=WAIT)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.buffer = b""

    def send(self, *packets: Packet | bytes) -> None:
        self.sock.sendall(b"".join(p if isinstance(p, bytes) else encode_packet(p) for p in packets))

    def packet(self) -> Packet | None:
        """The next packet, or None when the server closed the connection."""
        while True:
            try:
                rest, packet = decode_packet(memoryview(self.buffer))
            except InsufficientData:
                data = self.sock.recv(65536)
                if not data:
                    return None
                self.buffer += data
                continue
            self.buffer = bytes(rest)
            return packet

    def closed_within(self, seconds: float) -> float:
        """Seconds until the server closed the connection (it must, within ``seconds``)."""
        start = time.monotonic()
        self.sock.settimeout(seconds)
        while self.packet() is not None:
            pass
        return time.monotonic() - start

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(dps: RunningServer) -> Iterator[Raw]:
    conn = Raw(dps)
    yield conn
    conn.close()


def connect_packet(dps: RunningServer, reg: str, key: str, **options: Any) -> Connect:
    return Connect(
        client_id=reg, username=username(dps, reg), password=token(dps, reg, key).encode(), **options
    )


def test_wire_details(dps: RunningServer, admin: ServiceClient, raw: Raw) -> None:
    """Session present 0 for a persistent-session CONNECT, keep-alive 0 accepted, QoS 2 granted
    as 1, a foreign filter refused, PUBACK then a QoS 1 response with $rid first."""
    reg = uid()
    key = enroll(admin, reg)
    raw.send(
        connect_packet(dps, reg, key, clean_session=False, keep_alive=0),
        Subscribe(
            packet_id=1,
            subscriptions=(
                Subscription(topic_filter="$dps/registrations/res/#", qos=QoS.EXACTLY_ONCE),
                Subscription(topic_filter="devices/#", qos=QoS.AT_LEAST_ONCE),
            ),
        ),
        Publish(topic=register_topic("42"), payload=register_body(reg), qos=QoS.AT_LEAST_ONCE, packet_id=5),
    )  # all pipelined behind the CONNECT
    assert raw.packet() == Connack(return_code=ConnectReturnCode.ACCEPTED, session_present=False)
    assert raw.packet() == Suback(
        packet_id=1, return_codes=(SubackReturnCode.GRANTED_QOS_1, SubackReturnCode.FAILURE)
    )
    assert raw.packet() == Puback(packet_id=5)
    response = raw.packet()
    assert isinstance(response, Publish) and response.qos is QoS.AT_LEAST_ONCE and not response.retain
    assert response.topic == "$dps/registrations/res/202/?$rid=42"
    raw.send(Puback(packet_id=response.packet_id or 0))
    dps.wait_for_log("refused the subscription to 'devices/#'")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        pytest.param(b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x03abc", "return code 1", id="mqtt5"),
        pytest.param(b"\x10\x0f\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x01a", "return code 1", id="mqtt31"),
    ],
)
def test_other_protocol_versions_get_connack_1(dps: RunningServer, raw: Raw, data: bytes, words: str) -> None:
    raw.send(data)
    assert raw.packet() == Connack(return_code=ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION)
    assert raw.packet() is None
    dps.wait_for_log("MQTT", words, "this server speaks MQTT 3.1.1")


def test_unknown_topic_closes(dps: RunningServer, admin: ServiceClient, devices: list[PahoDevice]) -> None:
    reg = uid()
    device = PahoDevice(dps, reg, password=token(dps, reg, enroll(admin, reg))).connected()
    devices.append(device)
    device.client.publish("devices/x/messages/events/", b"telemetry", qos=1)
    assert device.next("disconnect")[1] != 0  # the server closed it
    assert not any(event[0] == "puback" for event in device.log)
    dps.wait_for_log(
        "MQTT", reg, "closed: a publish to a topic DPS does not have", "devices/x/messages/events/"
    )


def test_oversized_packet_closes_before_the_body_arrives(
    dps: RunningServer, admin: ServiceClient, raw: Raw
) -> None:
    reg = uid()
    raw.send(connect_packet(dps, reg, enroll(admin, reg)))
    assert raw.packet() == Connack()
    raw.send(b"\x32\xff\xff\x7f")  # a PUBLISH announcing 2 MB; not one byte of it is sent
    assert raw.closed_within(WAIT) < WAIT
    dps.wait_for_log("MQTT", reg, "exceeds the maximum packet size")


def test_a_disconnect_behind_other_packets_is_an_orderly_close(
    dps: RunningServer, admin: ServiceClient, raw: Raw
) -> None:
    """The answer's PUBACK and the DISCONNECT in one write (as a lean client sends them) end the
    session without a log line at info, like a DISCONNECT alone."""
    reg = uid()
    raw.send(
        connect_packet(dps, reg, enroll(admin, reg)),
        Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter="$dps/registrations/res/#"),)),
        Publish(topic=register_topic("1"), payload=register_body(reg)),
    )
    assert raw.packet() == Connack()
    assert isinstance(raw.packet(), Suback)
    response = raw.packet()
    assert isinstance(response, Publish) and response.qos is QoS.AT_LEAST_ONCE
    raw.send(Puback(packet_id=response.packet_id or 0), Disconnect())
    assert raw.closed_within(WAIT) < WAIT
    # a second session that ends with a line at info: the first one's line would come before it
    other, after = Raw(dps), uid()
    try:
        other.send(connect_packet(dps, after, enroll(admin, after)))
        assert other.packet() == Connack()
        other.send(b"\x30\x04\x00\x02\xc3\x28")  # a topic that is not UTF-8
        assert other.closed_within(WAIT) < WAIT
    finally:
        other.close()
    dps.wait_for_log("MQTT", after, "not well-formed UTF-8")
    closes = [line for line in dps.log().splitlines() if f" {reg} " in line and "closed:" in line]
    assert not [line for line in closes if " INFO " in line], closes


def test_malformed_packet_closes(dps: RunningServer, admin: ServiceClient, raw: Raw) -> None:
    reg = uid()
    raw.send(connect_packet(dps, reg, enroll(admin, reg)))
    assert raw.packet() == Connack()
    raw.send(b"\x30\x04\x00\x02\xc3\x28")  # a topic that is not UTF-8
    assert raw.closed_within(WAIT) < WAIT
    dps.wait_for_log("MQTT", reg, "not well-formed UTF-8")


def test_no_connect_is_closed_after_the_timeout(dps: RunningServer, raw: Raw) -> None:
    took = raw.closed_within(WAIT)
    assert CONNECT_TIMEOUT * 0.9 < took < CONNECT_TIMEOUT + 3
    dps.wait_for_log("MQTT", "(before CONNECT)", "closed: no CONNECT arrived within the connect timeout")


def test_keep_alive_lapse_closes(dps: RunningServer, admin: ServiceClient, raw: Raw) -> None:
    reg = uid()
    raw.send(connect_packet(dps, reg, enroll(admin, reg), keep_alive=1))
    assert raw.packet() == Connack()
    took = raw.closed_within(WAIT)
    assert 1.3 < took < 4  # one and a half keep-alives (1.5 s) after the last bytes
    dps.wait_for_log("MQTT", reg, "closed: the keep-alive lapsed (1 s)")


def test_pingreq_keeps_a_connection_alive(dps: RunningServer, admin: ServiceClient, raw: Raw) -> None:
    reg = uid()
    raw.send(connect_packet(dps, reg, enroll(admin, reg), keep_alive=1))
    assert raw.packet() == Connack()
    for _ in range(3):
        time.sleep(0.8)
        raw.send(b"\xc0\x00")
        assert raw.packet() == Pingresp()


def test_websocket_subprotocol_spellings(dps: RunningServer, admin: ServiceClient) -> None:
    """``MQTT`` (the C SDK's) on ``/``, echoed as sent; an unknown subprotocol is refused."""
    from websockets.exceptions import InvalidStatus, NegotiationError
    from websockets.sync.client import connect as ws_connect
    from websockets.typing import Subprotocol

    reg = uid()
    key = enroll(admin, reg)
    ctx = ssl.create_default_context(cafile=dps.ca_file)
    with ws_connect(f"wss://localhost:{dps.port}/", ssl=ctx, subprotocols=[Subprotocol("MQTT")]) as ws:
        assert ws.subprotocol == "MQTT"
        client = MqttConnection(Role.CLIENT, clock=time.monotonic)
        client.connect(client_id=reg, username=username(dps, reg), password=token(dps, reg, key).encode())
        client.subscribe([Subscription(topic_filter="$dps/registrations/res/#")])
        client.publish(register_topic("3"), register_body(reg))
        ws.send(client.get_outbound_data())
        got: list[Packet] = []
        while not any(isinstance(p, Publish) for p in got):
            got += client.feed_bytes(ws.recv(timeout=WAIT))  # type: ignore[arg-type]
        response = next(p for p in got if isinstance(p, Publish))
        assert response.topic == "$dps/registrations/res/202/?$rid=3"
        assert json.loads(response.payload)["status"] == "assigned"
    with pytest.raises((InvalidStatus, NegotiationError, ConnectionError)):
        with ws_connect(
            f"wss://localhost:{dps.port}/$iothub/websocket", ssl=ctx, subprotocols=[Subprotocol("stomp")]
        ) as ws:
            ws.recv(timeout=WAIT)


def test_empty_websocket_frames_are_skipped(dps: RunningServer, admin: ServiceClient) -> None:
    """Thousands of empty binary frames before the CONNECT are nothing to read, not a reason to
    drop the session (they once recursed until a RecursionError closed it)."""
    from websockets.sync.client import connect as ws_connect
    from websockets.typing import Subprotocol

    reg = uid()
    key = enroll(admin, reg)
    ctx = ssl.create_default_context(cafile=dps.ca_file)
    with ws_connect(
        f"wss://localhost:{dps.port}/$iothub/websocket", ssl=ctx, subprotocols=[Subprotocol("mqtt")]
    ) as ws:
        for _ in range(3000):
            ws.send(b"")
        client = MqttConnection(Role.CLIENT, clock=time.monotonic)
        client.connect(client_id=reg, username=username(dps, reg), password=token(dps, reg, key).encode())
        ws.send(client.get_outbound_data())
        got: list[Packet] = []
        while not got:
            got += client.feed_bytes(ws.recv(timeout=WAIT))  # type: ignore[arg-type]
        assert client.state is State.CONNECTED, got


# --- fuzz: mutated valid sessions over real TLS ----------------------------------------------------

FUZZ_CONNECTIONS = 240
FUZZ_SECONDS = 12.0


def _session_bytes(dps: RunningServer, reg: str, key: str) -> bytes:
    client = MqttConnection(Role.CLIENT, clock=time.monotonic)
    client.connect(
        client_id=reg, username=username(dps, reg), password=token(dps, reg, key).encode(), keep_alive=5
    )
    client.subscribe([Subscription(topic_filter="$dps/registrations/res/#")])
    client.publish(register_topic("1"), register_body(reg))
    client.publish(status_topic("2", "op"), b" ")
    client.ping()
    client.disconnect()
    return client.get_outbound_data()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(len(buf))
        op = rng.randrange(4)
        if op == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos] = rng.choice([0x00, 0x7F, 0x80, 0xFF])
        elif op == 2:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 6))
        else:
            del buf[pos : pos + rng.randint(1, 6)]
    return bytes(buf)


def _fuzz_one(dps: RunningServer, data: bytes) -> None:
    ctx = ssl.create_default_context(cafile=dps.ca_file)
    with socket.create_connection(("127.0.0.1", int(dps.info["mqttPort"])), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            try:
                sock.sendall(data)
                sock.settimeout(0.5)
                while sock.recv(65536):
                    pass
            except (TimeoutError, OSError):
                pass  # the server may close mid-send or keep an odd but valid session open


def test_fuzz_endpoint_with_mutated_sessions(
    dps: RunningServer, admin: ServiceClient, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = uid("fz")
    key = enroll(admin, reg)
    session = _session_bytes(dps, reg, key)
    rng = random.Random(0xD95)
    inputs = [_mutate(session, rng) for _ in range(FUZZ_CONNECTIONS)]
    deadline = time.monotonic() + FUZZ_SECONDS
    tried = 0
    lock = threading.Lock()

    def run(data: bytes) -> None:
        nonlocal tried
        if time.monotonic() < deadline:
            _fuzz_one(dps, data)
            with lock:
                tried += 1

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(run, inputs))
    assert tried >= 50
    # The server is alive and still registers devices; nothing crashed.
    reg2 = uid()
    device = PahoDevice(dps, reg2, password=token(dps, reg2, enroll(admin, reg2))).connected()
    device.subscribe()
    assert device.request(register_topic("ok"), register_body(reg2))[2]["status"] == "assigned"
    device.close()
    assert "Traceback" not in dps.log() and "internal error" not in dps.log()
    with capsys.disabled():
        print(f"\n[mqtt endpoint fuzz] {tried} mutated sessions over TLS, server healthy")  # noqa: T201 (the report line)
