"""A cheap load generator for MQTT, AMQP and HTTPS registrations (``bench/cpu.py``'s ``mqtt-*``,
``amqp-*`` and ``https-*`` phases): raw asyncio (uvloop) with byte frames made before the clock starts by the
project's own sans-io codecs, so that the load spends little of the 2 shared cores.

Each device is a new TCP and TLS connection. Like wrk, every connection slot keeps the TLS
session of its previous connection and resumes it (the server's stateful session cache), so
these phases pay the same abbreviated handshake as wrk's HTTPS phases. What a device sends, one
step after the other, each step waiting for the server's answer, as the official SDKs do
(device-protocol.md §3, §4):

* MQTT: CONNECT (user name and SAS token) -> CONNACK; SUBSCRIBE ``$dps/registrations/res/#``
  -> SUBACK; PUBLISH the register request -> the PUBLISH answering it; then its PUBACK and
  DISCONNECT, and the client closes.
* AMQP: the SASL header -> sasl-mechanisms; sasl-init PLAIN (user name and SAS token) ->
  sasl-outcome; the AMQP header, open, begin, a sender and a receiver link and the receiver's
  credit in one write -> both attaches and the sender's credit; the register message (a
  transfer) -> the answer (a transfer) and the disposition of the request; then the answer's
  disposition and close -> the server's close, and the client closes.
* HTTPS: the register PUT with ``Connection: close``, then the answer until the server closes:
  the same registration as wrk's ``group`` phase, made by this generator, so that MQTT and
  AMQP are also compared with HTTPS under the same load generator.
* ``*-trivial``: the TLS handshake, then the client closes: what the listener costs before
  the protocol starts.
* ``amqp-pipelined`` (a diagnostic, no SDK does it): the SASL header, sasl-init and the AMQP
  setup in one write, without waiting for the mechanisms and the outcome: the same frames with
  two round trips fewer, which says what the round trips cost the server.

The answers are split into frames by their length prefixes only (no decoding); a device counts
as failed unless its answer reads ``"status":"assigned"``.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from provisiond.protocol.amqp import dps
from provisiond.protocol.amqp.frames import Frame, FrameType, ProtocolHeader, ProtocolId, encode_frame
from provisiond.protocol.amqp.performatives import (
    Accepted,
    Attach,
    Begin,
    Close,
    Data,
    Disposition,
    Flow,
    Message,
    Open,
    Properties,
    Role,
    SaslInit,
    Source,
    Target,
    Transfer,
    encode_message,
)
from provisiond.protocol.amqp.types import Symbol
from provisiond.protocol.mqtt import MqttConnection, Subscription
from provisiond.protocol.mqtt import Role as MqttRole
from provisiond.protocol.sas import build_sas_token, derive_device_key
from provisiond.protocol.topics import RESPONSE_FILTER, build_username, register_topic

API_VERSION = "2021-06-01"
ASSIGNED = b'"status":"assigned"'

# what a step waits for
_MQTT_CONNACK, _MQTT_SUBACK, _MQTT_PUBLISH = 0x20, 0x90, 0x30
_AMQP_MECHANISMS, _AMQP_OUTCOME = 0x40, 0x44
_AMQP_ATTACH, _AMQP_FLOW, _AMQP_TRANSFER, _AMQP_CLOSE = 0x12, 0x13, 0x14, 0x18


@dataclass(frozen=True)
class Job:
    """One load process's share: ``protocol`` is ``https``, ``mqtt``, ``amqp``,
    ``amqp-pipelined`` or ``tls`` (the handshake only)."""

    protocol: str
    port: int
    scope: str
    group_key: str
    names: list[str]
    concurrency: int
    seconds: float


# --- frames, made before the clock ---------------------------------------------------------------


def _token(scope: str, reg: str, key: str, expiry: int | None = None) -> str:
    if expiry is None:
        expiry = int(time.time()) + 7200
    return build_sas_token(f"{scope}/registrations/{reg}", key, expiry, key_name="registration")


def mqtt_steps(scope: str, reg: str, key: str) -> list[bytes]:
    """CONNECT, SUBSCRIBE and the register PUBLISH, each a step's bytes."""
    client = MqttConnection(MqttRole.CLIENT, clock=time.monotonic)
    client.connect(
        client_id=reg,
        username=build_username(scope, reg, api_version=API_VERSION, client_version="bench"),
        password=_token(scope, reg, key).encode(),
        keep_alive=60,
    )
    connect = client.get_outbound_data()
    client.subscribe([Subscription(topic_filter=RESPONSE_FILTER)])
    subscribe = client.get_outbound_data()
    client.publish(register_topic("1"), json.dumps({"registrationId": reg}).encode())
    return [connect, subscribe, client.get_outbound_data()]


def https_request(scope: str, reg: str, key: str) -> bytes:
    """The register PUT with ``Connection: close``, as wrk sends it in ``bench/cpu.py``."""
    body = json.dumps({"registrationId": reg}).encode()
    return (
        f"PUT /{scope}/registrations/{reg}/register?api-version={API_VERSION} HTTP/1.1\r\n"
        f"Host: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Authorization: {_token(scope, reg, key)}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _frame(performative: Any, payload: bytes = b"", *, sasl: bool = False) -> bytes:
    buffer = bytearray()
    encode_frame(Frame(FrameType.SASL if sasl else FrameType.AMQP, 0, performative, payload), buffer)
    return bytes(buffer)


def amqp_steps(
    scope: str,
    reg: str,
    key: str,
    host: str = "localhost",
    *,
    expiry: int | None = None,
    ids: Callable[[], uuid.UUID] = uuid.uuid4,
) -> list[bytes]:
    """The SASL header; sasl-init; the AMQP header, open, begin, attaches and flow; the register
    transfer; the answer's disposition and close. The token expires in two hours unless
    ``expiry`` is given, the container-id, link names and message ids are ``ids()`` (the
    tests fix both, so that their sessions are the same bytes in every run)."""
    address = f"{scope}/registrations/{reg}"
    properties = {Symbol(dps.API_VERSION_PROPERTY): API_VERSION}
    sasl_header = ProtocolHeader(ProtocolId.SASL, (1, 0, 0)).encode()
    init = _frame(
        SaslInit(
            mechanism=Symbol(dps.Mechanism.PLAIN.value),
            initial_response=dps.plain_response(address, _token(scope, reg, key, expiry)),
            hostname=host,
        ),
        sasl=True,
    )
    setup = b"".join(
        [
            ProtocolHeader(ProtocolId.AMQP, (1, 0, 0)).encode(),
            _frame(Open(container_id=str(ids()), hostname=host)),
            _frame(Begin(next_outgoing_id=0, incoming_window=5000, outgoing_window=5000)),
            _frame(
                Attach(
                    name=f"sender-{ids()}",
                    handle=0,
                    role=Role.SENDER,
                    source=Source(),
                    target=Target(address=address),
                    initial_delivery_count=0,
                    properties=properties,
                )
            ),
            _frame(
                Attach(
                    name=f"receiver-{ids()}",
                    handle=1,
                    role=Role.RECEIVER,
                    source=Source(address=address),
                    target=Target(),
                    properties=properties,
                )
            ),
            _frame(
                Flow(
                    next_incoming_id=None,
                    incoming_window=5000,
                    next_outgoing_id=0,
                    outgoing_window=5000,
                    handle=1,
                    delivery_count=0,
                    link_credit=8,
                )
            ),
        ]
    )
    message = Message(
        properties=Properties(message_id=str(ids()), correlation_id=str(ids())),
        application_properties={
            dps.OPERATION_TYPE: dps.OperationType.REGISTER.value,
            dps.FORCE_REGISTRATION: False,
        },
        body=(Data(json.dumps({"registrationId": reg}).encode()),),
    )
    transfer = _frame(
        Transfer(handle=0, delivery_id=0, delivery_tag=b"\x00\x00\x00\x00", message_format=0, settled=False),
        encode_message(message),
    )
    done = _frame(Disposition(role=Role.RECEIVER, first=0, settled=True, state=Accepted())) + _frame(Close())
    return [sasl_header, init, setup, transfer, done]


# --- splitting answers ---------------------------------------------------------------------------


def _mqtt_packets(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Complete MQTT packets at the start of ``buffer`` (removed from it): (type byte, body)."""
    packets = []
    while len(buffer) >= 2:
        size, shift, i = 0, 0, 1
        while True:
            if i >= len(buffer):
                return packets
            byte = buffer[i]
            size |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
        if len(buffer) < i + size:
            return packets
        packets.append((buffer[0], bytes(buffer[i : i + size])))
        del buffer[: i + size]
    return packets


def _amqp_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Complete AMQP frames (and protocol headers: code 0) at the start of ``buffer``: (the
    performative's descriptor code, the frame's body)."""
    frames = []
    while len(buffer) >= 8:
        if buffer[:4] == b"AMQP":
            frames.append((0, b""))
            del buffer[:8]
            continue
        size = int.from_bytes(buffer[:4], "big")
        if len(buffer) < size:
            break
        body = bytes(buffer[buffer[4] * 4 : size])
        del buffer[:size]
        code = body[2] if len(body) > 2 and body[1] == 0x53 else -1  # smallulong descriptor
        frames.append((code, body))
    return frames


# --- one device --------------------------------------------------------------------------------


class _ResumingContext(ssl.SSLContext):
    """A client context that offers the session of this slot's previous connection (as wrk does)."""

    saved: ssl.SSLSession | None = None

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):  # type: ignore[no-untyped-def,override]
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session or self.saved)


def _context() -> _ResumingContext:
    context = _ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the server's CPU is measured, not the client's trust
    return context


async def _read_until(
    reader: asyncio.StreamReader, buffer: bytearray, split: Any, want: Any
) -> list[tuple[int, bytes]]:
    """Read until ``want(seen)`` holds for the frames seen; raises EOFError when the server closes."""
    seen: list[tuple[int, bytes]] = []
    while not want(seen):
        data = await reader.read(65536)
        if not data:
            raise EOFError
        buffer += data
        seen += split(buffer)
    return seen


async def _device(job: Job, context: _ResumingContext, steps: list[bytes]) -> tuple[bool, bool]:
    """Whether the device was assigned (for ``tls``: connected), and whether its TLS session was resumed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", job.port, ssl=context)
    ok = resumed = False
    try:
        buffer = bytearray()
        if job.protocol == "https":
            writer.write(steps[0])
            answer = await reader.read()  # Connection: close: the answer, then the server closes
            ok = ASSIGNED in answer
        elif job.protocol == "mqtt":
            connect, subscribe, publish = steps
            for data, code in ((connect, _MQTT_CONNACK), (subscribe, _MQTT_SUBACK)):
                writer.write(data)
                await _read_until(
                    reader, buffer, _mqtt_packets, lambda s, c=code: any(t & 0xF0 == c for t, _ in s)
                )
            writer.write(publish)
            seen = await _read_until(
                reader, buffer, _mqtt_packets, lambda s: any(t & 0xF0 == _MQTT_PUBLISH for t, _ in s)
            )
            first, body = next(p for p in seen if p[0] & 0xF0 == _MQTT_PUBLISH)
            ok = ASSIGNED in body
            done = b"\xe0\x00"
            if first & 0x06:  # QoS 1: acknowledge (the packet id follows the topic)
                at = 2 + int.from_bytes(body[:2], "big")
                done = b"\x40\x02" + body[at : at + 2] + done
            writer.write(done)
        elif job.protocol in ("amqp", "amqp-pipelined"):
            sasl_header, init, setup, transfer, done = steps
            if job.protocol == "amqp":
                writer.write(sasl_header)
                await _read_until(
                    reader, buffer, _amqp_frames, lambda s: any(c == _AMQP_MECHANISMS for c, _ in s)
                )
                writer.write(init)
                await _read_until(
                    reader, buffer, _amqp_frames, lambda s: any(c == _AMQP_OUTCOME for c, _ in s)
                )
                writer.write(setup)
            else:  # no SDK does this: what two round trips fewer would save
                writer.write(sasl_header + init + setup)
            await _read_until(
                reader,
                buffer,
                _amqp_frames,
                lambda s: sum(c == _AMQP_ATTACH for c, _ in s) == 2 and any(c == _AMQP_FLOW for c, _ in s),
            )
            writer.write(transfer)
            seen = await _read_until(
                reader, buffer, _amqp_frames, lambda s: any(c == _AMQP_TRANSFER for c, _ in s)
            )
            ok = any(c == _AMQP_TRANSFER and ASSIGNED in body for c, body in seen)
            writer.write(done)
            await _read_until(reader, buffer, _amqp_frames, lambda s: any(c == _AMQP_CLOSE for c, _ in s))
        else:
            ok = True
            # TLS 1.3 sends the session ticket after the handshake: wait for it (at most 0.5 s)
            ssl_object = writer.get_extra_info("ssl_object")
            for _ in range(250):
                if ssl_object is None or (ssl_object.session is not None and ssl_object.session.has_ticket):
                    break
                await asyncio.sleep(0.002)
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            resumed = ssl_object.session_reused
            if ssl_object.session is not None:
                context.saved = ssl_object.session
    except (EOFError, StopIteration):
        ok = False
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass
    return ok, resumed


async def _run(job: Job, steps: list[list[bytes]], start: Any) -> tuple[int, int, float, int]:
    """Devices done, failed, seconds, connections that resumed a session."""
    next_device = iter(range(len(steps)))
    done = bad = resumed = 0
    started = time.monotonic()
    deadline = started + job.seconds

    async def slot() -> None:
        nonlocal done, bad, resumed
        context = _context()
        for i in next_device:
            if time.monotonic() >= deadline:
                return
            try:
                ok, again = await _device(job, context, steps[i])
            except (OSError, ssl.SSLError):
                ok = again = False
            done += 1
            bad += not ok
            resumed += again

    await asyncio.gather(*(slot() for _ in range(job.concurrency)))
    return done, bad, time.monotonic() - started, resumed


def _worker(job: Job, barrier: Any, results: Any) -> None:
    import uvloop

    keys = {}
    steps: list[list[bytes]] = []
    for reg in job.names:
        key = keys.setdefault(reg, derive_device_key(job.group_key, reg))
        if job.protocol == "mqtt":
            steps.append(mqtt_steps(job.scope, reg, key))
        elif job.protocol.startswith("amqp"):
            steps.append(amqp_steps(job.scope, reg, key))
        elif job.protocol == "https":
            steps.append([https_request(job.scope, reg, key)])
        else:
            steps.append([])
    barrier.wait()  # every process has its frames: the clock starts
    results.put(uvloop.run(_run(job, steps, None)))


def run(
    protocol: str,
    port: int,
    scope: str,
    group_key: str,
    names: list[str],
    *,
    concurrency: int,
    seconds: float,
    processes: int,
    on_start: Any,
) -> tuple[int, int, float, int]:
    """Run ``names`` (each a device of the group) over ``protocol`` from ``processes`` processes
    for at most ``seconds``; ``on_start()`` is called when the frames are ready and the load
    starts. Returns (devices done, failed, seconds, resumed TLS sessions)."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    workers = [
        ctx.Process(
            target=_worker,
            args=(
                Job(
                    protocol,
                    port,
                    scope,
                    group_key,
                    names[i::processes],
                    max(1, concurrency // processes),
                    seconds,
                ),
                barrier,
                results,
            ),
        )
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    barrier.wait()
    on_start()
    outcomes = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    return (
        sum(o[0] for o in outcomes),
        sum(o[1] for o in outcomes),
        max(o[2] for o in outcomes),
        sum(o[3] for o in outcomes),
    )
