"""Hostile input for the invariant tests (test_invariants.py): seeded generators of broken
JSON, bytes, MQTT packets and AMQP messages, and raw clients whose every wait is bounded (HTTPS
requests exactly as given, a TLS or WebSocket byte channel, an AMQP exchange driven by the
project's own machine)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import socket
import ssl
import string
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from provisiond.protocol.amqp import dps as amqp_dps
from provisiond.protocol.amqp.connection import Connection, ConnectionConfig, Side
from provisiond.protocol.amqp.events import (
    ConnectionClosed,
    ConnectionOpened,
    DeliveryUpdated,
    Event,
    LinkDetached,
    LinkId,
    MessageReceived,
    SaslMechanismsReceived,
    SaslOutcomeReceived,
)
from provisiond.protocol.amqp.performatives import (
    Accepted,
    AmqpValue,
    Data,
    Message,
    Properties,
    Rejected,
    Role,
    SaslCode,
    Source,
    Target,
)
from provisiond.protocol.amqp.types import Symbol
from provisiond.protocol.mqtt import QoS, Subscribe, Subscription, encode_packet
from provisiond.protocol.sas import build_sas_token
from tests._server import RunningServer

#: Every wait of the clients here is bounded by this many seconds.
CLOSE_WITHIN = 10.0
#: The keep-alive of the MQTT CONNECTs made here: the server closes 1.5 s after the last packet.
KEEP_ALIVE = 1


@dataclass
class Dps:
    server: RunningServer
    reg: str  # an enrolled symmetric-key device
    key: str
    group: str  # an enrollment group
    tpm_reg: str  # an enrolled TPM device: its EK and an SRK (TPM2B_PUBLIC)
    ek: bytes
    srk: bytes

    @property
    def scope(self) -> str:
        return self.server.id_scope

    def device_token(self, reg: str | None = None, key: str | None = None) -> str:
        reg = reg or self.reg
        return build_sas_token(
            f"{self.scope}/registrations/{reg}",
            key or self.key,
            int(time.time()) + 3600,
            key_name="registration",
        )


def connections(server: RunningServer) -> int:
    """The TCP connections the server holds on its own ports (not its database's)."""
    pid = server.process.pid
    ports = {server.port, int(server.info["mqttPort"]), int(server.info["amqpPort"])}
    inodes = {
        os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1]
        for fd in os.listdir(f"/proc/{pid}/fd")
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")
    }
    held = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                held += fields[3] != "0A" and fields[9] in inodes and local_port in ports  # 0A: LISTEN
    return held


# --- generators -----------------------------------------------------------------------------------

_TEXT = string.ascii_letters + string.digits + " -_.:/%?&=+#$'\"\\{}[]"
_ODD_STRINGS = ["", " ", "\x00", "\u202e", "\ud7ff", "é" * 3, "💥", "a" * 300, "%00", "../..", "null", "*"]


def text(rng: random.Random, longest: int = 40) -> str:
    if rng.random() < 0.3:
        return rng.choice(_ODD_STRINGS)
    return "".join(rng.choice(_TEXT) for _ in range(rng.randrange(longest)))


def json_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 2**64, 10**30])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e-320, 3.0])
    if kind in (4, 5, 6):
        return text(rng)
    if kind == 7:
        return [json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {text(rng, 12): json_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def mutate_json(doc: Any, rng: random.Random) -> Any:
    """``doc`` with one node replaced by a value of another type, a key dropped or added."""
    if isinstance(doc, dict) and doc:
        doc = dict(doc)
        key = rng.choice(list(doc))
        choice = rng.randrange(4)
        if choice == 0:
            del doc[key]
        elif choice == 1:
            doc[text(rng, 12)] = json_value(rng)
        elif choice == 2:
            doc[key] = json_value(rng)
        else:
            doc[key] = mutate_json(doc[key], rng)
        return doc
    if isinstance(doc, list) and doc:
        doc = list(doc)
        i = rng.randrange(len(doc))
        doc[i] = mutate_json(doc[i], rng)
        return doc
    return json_value(rng)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(len(out) + 1)
        if op == 0:
            del out[i:]  # truncated
        elif op == 1 and out:
            out[min(i, len(out) - 1)] = rng.randrange(256)
        elif op == 2:
            out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        elif op == 3:
            del out[i : i + rng.randrange(1, 16)]
        else:
            out[i:i] = out[i : i + rng.randrange(1, 64)]
    return bytes(out)


def hostile_body(valid: Any, rng: random.Random) -> bytes:
    """A body derived from a valid one: wrongly typed, mutated, truncated, nested, oversized..."""
    choice = rng.randrange(12)
    encoded = json.dumps(valid).encode()
    if choice <= 3:
        doc = valid
        for _ in range(rng.randrange(1, 4)):
            doc = mutate_json(doc, rng)
        return json.dumps(doc).encode()
    if choice <= 6:
        return mutate_bytes(encoded, rng)
    if choice == 7:
        depth = rng.choice([65, 200, 1000, 5000])
        opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        return opener * depth + closer * depth
    if choice == 8:
        return b'{"payload":"' + b"x" * (97 * 1024) + b'"}'
    if choice == 9:
        return rng.choice([b"", b" ", b"null", b"[]", b"1", b'"x"', b"\xef\xbb\xbf{}", b"\xff\xfe{", b"{}"])
    if choice == 10:
        return json.dumps(json_value(rng)).encode()
    return encoded.replace(b'"', b"'")


# --- raw clients and packets ---------------------------------------------------------------------


def http_request(
    server: RunningServer, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh TLS connection, exactly as given; the server's status, headers and body."""
    context = ssl.create_default_context(cafile=server.ca_file)
    with socket.create_connection(("127.0.0.1", server.port), timeout=CLOSE_WITHIN) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            head = f"{method} {target} HTTP/1.1\r\n".encode("latin-1")
            head += f"Host: localhost:{server.port}\r\nConnection: close\r\n".encode()
            head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
            if not any(name.lower() == b"content-length" for name, _ in headers):
                head += f"Content-Length: {len(body)}\r\n".encode()
            sock.sendall(head + b"\r\n" + body)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    response_headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        response_headers[name.strip().lower()] = value.strip()
    return status, response_headers, payload


def mqtt_connect(t: Dps, rng: random.Random, *, hostile: bool) -> bytes:
    """A CONNECT as bytes (keep-alive :data:`KEEP_ALIVE`), with a hostile field when asked:
    anything goes in the strings, unpaired surrogates and NULs included."""
    reg, scope = t.reg, t.scope
    client_id: bytes = reg.encode()
    username: bytes | None = f"{scope}/registrations/{reg}/api-version=2019-03-31".encode()
    password: bytes | None = t.device_token().encode()
    if hostile:
        field = rng.randrange(4)
        if field == 0:
            client_id = text(rng, 200).encode("utf-8", "surrogatepass")
        elif field == 1:
            choices = [text(rng, 200), f"{scope}/registrations/{text(rng)}/api-version=x", ""]
            username = rng.choice([None, *(c.encode("utf-8", "surrogatepass") for c in choices)])
        elif field == 2:
            noise = bytes(rng.randrange(256) for _ in range(40))
            password = rng.choice([None, b"", mutate_bytes(t.device_token().encode(), rng), noise])
        else:
            password = t.device_token(key="QUFBQQ==").encode()  # the wrong key: attested at register
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + KEEP_ALIVE.to_bytes(2, "big")
    for value in (client_id, username, password):
        if value is not None:
            body += len(value).to_bytes(2, "big") + value
    return b"\x10" + remaining_length(len(body)) + body


def remaining_length(size: int) -> bytes:
    out = bytearray()
    while True:
        size, digit = divmod(size, 128)
        out.append(digit | (0x80 if size else 0))
        if not size:
            return bytes(out)


def mqtt_topic(rng: random.Random) -> str:
    rid = rng.choice(["1", "42", text(rng, 20).replace("&", "").replace("#", "").replace("+", "") or "x"])
    choice = rng.randrange(6)
    if choice <= 2:
        return f"$dps/registrations/PUT/iotdps-register/?$rid={rid}"
    if choice == 3:
        operation = rng.choice([str(uuid.uuid4()), quote(text(rng), safe=""), ""])
        return f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={operation}"
    if choice == 4:
        return f"$dps/registrations/PUT/iotdps-register/?{quote(text(rng), safe='=&$')}"
    return rng.choice(["$dps/registrations/PUT/", "devices/x/messages/events/", "$dps/#", text(rng) or "x"])


def raw_publish(topic: bytes, payload: bytes, qos: int, packet_id: int) -> bytes:
    """A PUBLISH as bytes (the codec would refuse to encode some of the topics sent here)."""
    body = len(topic).to_bytes(2, "big") + topic + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return bytes([0x30 | qos << 1]) + remaining_length(len(body)) + body


def mqtt_session(t: Dps, rng: random.Random) -> bytes:
    device_body = {"registrationId": t.reg, "payload": {"n": [1, 2]}}
    kind = rng.randrange(8)
    if kind == 0:  # not MQTT at all, or a broken CONNECT
        return rng.choice(
            [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), b"\x10", b"\x10\xff\xff\xff\xff"]
        )
    if kind == 1:
        return mqtt_connect(t, rng, hostile=True)
    packets = [
        mqtt_connect(t, rng, hostile=kind == 2),
        encode_packet(
            Subscribe(
                packet_id=1,
                subscriptions=(Subscription(topic_filter="$dps/registrations/res/#", qos=QoS.AT_LEAST_ONCE),),
            )
        ),
    ]
    for n in range(rng.randrange(1, 4)):
        qos = rng.randrange(2)
        packets.append(raw_publish(mqtt_topic(rng).encode(), hostile_body(device_body, rng), qos, n + 2))
    tail = b"".join(packets[1:])
    if kind == 3:  # a valid CONNECT, then corrupted packets
        tail = mutate_bytes(tail, rng)
    return packets[0] + tail


class Channel:
    """A device connection for raw bytes: TLS on the protocol's port, or binary WebSocket
    messages (of random sizes) on the HTTPS port when ``subprotocol`` is given. ``receive``
    returns b"" once the server closed. (A WebSocket client of its own: every wait bounded.)"""

    def __init__(self, dps: Dps, port_key: str, subprotocol: str | None, rng: random.Random) -> None:
        self.rng = rng
        self.websocket = subprotocol is not None
        port = dps.server.port if self.websocket else int(dps.server.info[port_key])
        context = ssl.create_default_context(cafile=dps.server.ca_file)
        raw = socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WITHIN)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.buffer = b""
        if self.websocket:
            key = base64.b64encode(os.urandom(16)).decode()
            self.sock.sendall(
                f"GET /$iothub/websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: {subprotocol}\r\n\r\n".encode()
            )
            while b"\r\n\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                assert chunk, "the server closed during the WebSocket handshake"
                self.buffer += chunk
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        mask = os.urandom(4)
        size = len(payload)
        length = (
            bytes([0x80 | size])
            if size < 126
            else (
                bytes([0x80 | 126]) + size.to_bytes(2, "big")
                if size < 65536
                else bytes([0x80 | 127]) + size.to_bytes(8, "big")
            )
        )
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bytes([0x80 | opcode]) + length + mask + masked

    def send(self, data: bytes) -> None:
        if not self.websocket:
            self.sock.sendall(data)
            return
        while data:  # in messages of random sizes
            cut = self.rng.randrange(1, len(data) + 1)
            self.sock.sendall(self._frame(0x2, data[:cut]))
            data = data[cut:]

    def _read(self, timeout: float) -> bytes:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            raise
        except OSError:
            return b""

    def receive(self, timeout: float) -> bytes:
        if not self.websocket:
            return self._read(timeout)
        while True:  # the next data frame's payload (the server sends unmasked, unfragmented frames)
            if len(self.buffer) >= 2:
                opcode, size, start = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F, 2
                if size == 126 and len(self.buffer) >= 4:
                    size, start = int.from_bytes(self.buffer[2:4], "big"), 4
                elif size == 127 and len(self.buffer) >= 10:
                    size, start = int.from_bytes(self.buffer[2:10], "big"), 10
                if size < 126 or start > 2:
                    if len(self.buffer) >= start + size:
                        payload, self.buffer = self.buffer[start : start + size], self.buffer[start + size :]
                        if opcode == 0x8:
                            return b""
                        if opcode in (0x0, 0x1, 0x2) and payload:
                            return payload
                        continue  # ping, pong, empty
            chunk = self._read(timeout)
            if not chunk:
                return b""
            self.buffer += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.websocket:
                self.sock.sendall(self._frame(0x8, b"\x03\xe8"))
        self.sock.close()


@dataclass
class AmqpOutcome:
    answers: list[Message]
    rejections: list[Rejected]
    closed_with: str | None  # the condition the server closed with, if it closed first
    wire: bytes = b""  # what the client sent


def amqp_exchange(t: Dps, rng: random.Random, messages: list[Message], *, hostile_sasl: bool) -> AmqpOutcome:
    """One connection with the project's AMQP machine as the client: SASL PLAIN, open, a sender
    and a receiver on the device's address (or a hostile one), ``messages``, then close once
    each is answered (or the server refused the link or closed)."""
    address = f"{t.scope}/registrations/{t.reg}"
    user, password = address, t.device_token()
    if hostile_sasl:
        choice = rng.randrange(3)
        if choice == 0:
            user = text(rng, 100)
        elif choice == 1:
            password = text(rng, 100)
        else:
            password = t.device_token(key="QUFBQQ==")  # the wrong key: attested at register
    link_address = (
        address if rng.random() < 0.85 else rng.choice([text(rng), f"{t.scope}/registrations/{text(rng)}"])
    )
    conn = Connection(Side.CLIENT, ConnectionConfig(container_id="fuzz", use_sasl=True), clock=time.monotonic)
    links: dict[str, LinkId] = {}
    outcome = AmqpOutcome([], [], None)
    done = closing = False

    def on_event(event: Event) -> None:
        nonlocal done
        if isinstance(event, SaslMechanismsReceived):
            conn.sasl_init("PLAIN", amqp_dps.plain_response(user, password))
        elif isinstance(event, SaslOutcomeReceived) and event.code is SaslCode.OK:
            conn.open()
        elif isinstance(event, ConnectionOpened):
            channel = conn.begin()
            links["send"] = conn.attach(
                channel, name="s", role=Role.SENDER, target=Target(address=link_address)
            )
            links["recv"] = conn.attach(
                channel, name="r", role=Role.RECEIVER, source=Source(address=link_address)
            )
            conn.grant_credit(links["recv"], 20)
            for message in messages:
                conn.send_message(links["send"], message)
        elif isinstance(event, MessageReceived):
            conn.settle(event.link, event.delivery_id, Accepted())
            outcome.answers.append(event.message)
        elif isinstance(event, DeliveryUpdated) and isinstance(event.state, Rejected):
            outcome.rejections.append(event.state)
        elif isinstance(event, LinkDetached) and event.by_peer:
            done = True  # a refused link, or a message the service would not take
        elif isinstance(event, ConnectionClosed) and event.by_peer and not closing:
            outcome.closed_with = str(event.error.condition) if event.error else ""
        if len(outcome.answers) + len(outcome.rejections) >= len(messages):
            done = True

    context = ssl.create_default_context(cafile=t.server.ca_file)
    wire = bytearray()
    with socket.create_connection(("127.0.0.1", int(t.server.info["amqpPort"])), timeout=CLOSE_WITHIN) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            while not conn.finished:
                if done and conn.opened and not closing:
                    conn.close()
                    closing = True  # wait for the server's close
                out = conn.get_outbound_data()
                if out:
                    sock.sendall(out)
                    wire += out
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    raise AssertionError(f"no answer within {CLOSE_WITHIN} s") from None
                except OSError:
                    data = b""
                events = conn.feed_bytes(data)
                while events:
                    for event in events:
                        on_event(event)
                    events = conn.poll_events()
    outcome.wire = bytes(wire)
    return outcome


def amqp_message(t: Dps, rng: random.Random, n: int) -> Message:
    device_body = {"registrationId": t.reg, "payload": {"n": [1, 2]}}
    operation: Any = rng.choice(
        [amqp_dps.OperationType.REGISTER.value] * 4
        + [amqp_dps.OperationType.GET_OPERATION_STATUS.value] * 2
        + [text(rng), 7, None, b"iotdps-register", [1], Symbol("iotdps-register")]
    )
    properties: dict[Any, Any] = {amqp_dps.OPERATION_TYPE: operation}
    if rng.random() < 0.5:
        properties[amqp_dps.OPERATION_ID] = rng.choice(
            [str(uuid.uuid4()), text(rng), 12, b"\x00", None, {"a": 1}]
        )
    if rng.random() < 0.3:
        properties[amqp_dps.FORCE_REGISTRATION] = rng.choice([True, "true", 1, None])
    if rng.random() < 0.1:
        properties[text(rng, 10) or "k"] = rng.choice([None, 2**63 - 1, -1.5, "", text(rng), b"\xff", [], {}])
    raw = hostile_body(device_body, rng)
    body: Any = rng.choice(
        [
            (Data(raw),),
            (Data(raw[: len(raw) // 2]), Data(raw[len(raw) // 2 :])),
            AmqpValue(raw.decode("utf-8", "replace")),
            AmqpValue(raw),
            AmqpValue(rng.choice([7, None, [1, 2], {"registrationId": t.reg}, True])),
            None,
        ]
    )
    correlation = rng.choice([f"c{n}", n, uuid.uuid4(), b"\x01\x02", None])
    return Message(
        properties=Properties(message_id=f"m{n}", correlation_id=correlation),
        application_properties=properties,
        body=body,
    )
