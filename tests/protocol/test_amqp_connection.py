"""The AMQP 1.0 connection machines, client and server wired together with no network (h11's
``ConnectionPair``): SASL (PLAIN, none, a multi-round TPM-like mechanism, failure, pipelining),
open/begin/attach, messages both ways, flow control, idle timeouts, bad input closed with the
right condition, misuse, and a bounded fuzz of the server with mutated valid sessions."""

from __future__ import annotations

import gc
import random
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from provisiond.errors import LocalProtocolError
from provisiond.protocol.amqp.connection import Connection, ConnectionConfig, Side
from provisiond.protocol.amqp.events import (
    ConnectionClosed,
    ConnectionOpened,
    CreditGranted,
    DeliveryUpdated,
    Event,
    LinkAttached,
    LinkDetached,
    LinkId,
    MessageReceived,
    SaslChallengeReceived,
    SaslInitReceived,
    SaslMechanismsReceived,
    SaslOutcomeReceived,
    SaslResponseReceived,
    SessionEnded,
)
from provisiond.protocol.amqp.frames import Frame, FrameType, ProtocolHeader, ProtocolId, encode_frame
from provisiond.protocol.amqp.performatives import (
    Accepted,
    Attach,
    Begin,
    Data,
    Disposition,
    Error,
    ErrorCondition,
    Flow,
    Message,
    Open,
    Properties,
    Rejected,
    Role,
    SaslCode,
    Source,
    Target,
    Transfer,
    encode_message,
)
from provisiond.protocol.amqp.session import SessionLimits
from provisiond.protocol.amqp.state import ConnectionState
from provisiond.protocol.amqp.types import Symbol

ADDRESS = "0ne00000001/registrations/dev-1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Handler = Callable[[Connection, Event], None]


@dataclass
class Pair:
    """A client and a server with a fake network in between; handlers answer events."""

    client: Connection
    server: Connection
    clock: Clock
    on_client: Handler
    on_server: Handler
    client_events: list[Event] = field(default_factory=list)
    server_events: list[Event] = field(default_factory=list)
    client_wire: bytearray = field(default_factory=bytearray)  # everything the client sent

    def _deliver(
        self, conn: Connection, data: bytes, seen: list[Event], handler: Handler, *, bytewise: bool
    ) -> None:
        chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
        for chunk in chunks:
            events = conn.feed_bytes(chunk)
            while events:
                for event in events:
                    seen.append(event)
                    handler(conn, event)
                events = conn.poll_events()

    def run(self, *, bytewise: bool = False, rounds: int = 50) -> None:
        for _ in range(rounds):
            to_server = self.client.get_outbound_data()
            to_client = self.server.get_outbound_data()
            if not to_server and not to_client:
                return
            self.client_wire += to_server
            if to_server:
                self._deliver(self.server, to_server, self.server_events, self.on_server, bytewise=bytewise)
            if to_client:
                self._deliver(self.client, to_client, self.client_events, self.on_client, bytewise=bytewise)
        raise AssertionError("the pair never went quiet")


def of(events: list[Event], kind: type[Any]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


@dataclass
class DpsLikeServer:
    """A server application: accepts PLAIN/ANONYMOUS, accepts links, answers each message on
    the sending link with the request's correlation id."""

    mechanisms_ok: tuple[str, ...] = ("PLAIN", "ANONYMOUS", "EXTERNAL")
    sender: LinkId | None = None
    credit: int = 5

    def __call__(self, conn: Connection, event: Event) -> None:
        if isinstance(event, SaslInitReceived):
            ok = event.mechanism in self.mechanisms_ok
            conn.sasl_outcome(SaslCode.OK if ok else SaslCode.AUTH)
        elif isinstance(event, ConnectionOpened):
            conn.open()
        elif isinstance(event, LinkAttached) and event.answer_needed:
            conn.accept_link(event.link)
            if event.role is Role.RECEIVER:
                conn.grant_credit(event.link, self.credit)
            else:
                self.sender = event.link
        elif isinstance(event, MessageReceived):
            conn.settle(event.link, event.delivery_id, Accepted())
            assert self.sender is not None and event.message.properties is not None
            reply = Message(
                properties=Properties(correlation_id=event.message.properties.correlation_id),
                application_properties={"retry-after": 1},
                body=(Data(b'{"status":"assigned"}'),),
            )
            conn.send_message(self.sender, reply)


@dataclass
class DeviceLikeClient:
    """A client application: PLAIN (or no SASL), one session, a sender and a receiver, one
    request, then close when the answer arrives."""

    mechanism: str = "PLAIN"
    initial_response: bytes = b"\x00scope/registrations/dev\x00SharedAccessSignature sr=x"
    links: dict[str, LinkId] = field(default_factory=dict)
    requests: int = 1
    close_after: bool = True
    payload: bytes = b'{"registrationId":"dev-1"}'
    answers: int = 0

    def __call__(self, conn: Connection, event: Event) -> None:
        if isinstance(event, SaslMechanismsReceived):
            conn.sasl_init(self.mechanism, self.initial_response)
        elif isinstance(event, SaslOutcomeReceived) and event.code is SaslCode.OK:
            conn.open()
        elif isinstance(event, ConnectionOpened):
            channel = conn.begin()
            self.links["send"] = conn.attach(
                channel, name="sender_link", role=Role.SENDER, target=Target(address=ADDRESS)
            )
            self.links["recv"] = conn.attach(
                channel, name="recv_link", role=Role.RECEIVER, source=Source(address=ADDRESS)
            )
            conn.grant_credit(self.links["recv"], 10)
            for n in range(self.requests):
                request = Message(
                    properties=Properties(message_id=f"m{n}", correlation_id=f"c{n}"),
                    application_properties={"iotdps-operation-type": "iotdps-register"},
                    body=(Data(self.payload),),
                )
                conn.send_message(self.links["send"], request)
        elif isinstance(event, MessageReceived):
            conn.settle(event.link, event.delivery_id, Accepted())
            self.answers += 1
            if self.close_after and self.answers == self.requests:
                conn.close()


def make_pair(
    *,
    client_app: Handler | None = None,
    server_app: Handler | None = None,
    use_sasl: bool = True,
    server_config: dict[str, Any] | None = None,
    client_config: dict[str, Any] | None = None,
) -> Pair:
    clock = Clock()
    client = Connection(
        Side.CLIENT,
        ConnectionConfig(container_id="device", use_sasl=use_sasl, **(client_config or {})),
        clock=clock,
    )
    server = Connection(
        Side.SERVER,
        ConnectionConfig(
            container_id="provisiond",
            sasl_mechanisms=("TPM", "PLAIN", "EXTERNAL", "ANONYMOUS"),
            **(server_config or {}),
        ),
        clock=clock,
    )
    if not use_sasl:
        client.open()  # pipelined behind the AMQP header
    return Pair(client, server, clock, client_app or DeviceLikeClient(), server_app or DpsLikeServer())


# --- happy paths -------------------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True], ids=["chunks", "byte-at-a-time"])
def test_plain_sasl_registration_exchange(bytewise: bool) -> None:
    pair = make_pair()
    pair.run(bytewise=bytewise)
    init = of(pair.server_events, SaslInitReceived)[0]
    assert init.mechanism == "PLAIN" and init.initial_response is not None
    assert init.initial_response.split(b"\x00")[1] == b"scope/registrations/dev"
    request = of(pair.server_events, MessageReceived)[0].message
    assert request.application_properties == {"iotdps-operation-type": "iotdps-register"}
    assert request.data == b'{"registrationId":"dev-1"}'
    answer = of(pair.client_events, MessageReceived)[0].message
    assert answer.properties is not None and answer.properties.correlation_id == "c0"
    assert answer.data == b'{"status":"assigned"}'
    assert of(pair.client_events, DeliveryUpdated)[0].state == Accepted()
    assert of(pair.server_events, DeliveryUpdated)[0].state == Accepted()
    assert pair.client.finished and pair.server.finished
    assert pair.client.state is ConnectionState.END is pair.server.state
    assert pair.server.sasl_mechanism == "PLAIN"


def test_a_finished_connection_is_freed_without_the_cycle_collector() -> None:
    """Sessions hold the connection's output buffer and event list, not the connection: the
    connection, its sessions and links and the peer's frames go when the last reference does,
    not at the next cycle collection (a server makes one connection per registration)."""
    pair = make_pair()
    pair.run()
    assert pair.server.finished and pair.server.sessions  # a session was begun and is still mapped
    server, session = weakref.ref(pair.server), weakref.ref(next(iter(pair.server.sessions.values())))
    gc.disable()
    try:
        del pair
        assert server() is None and session() is None
    finally:
        gc.enable()


def test_every_attach_carries_max_message_size() -> None:
    """Both roles, both sides: the C SDK (uAMQP) logs an error for an attach without
    max-message-size, so each attach advertises the session's limit, sender links included."""
    pair = make_pair(
        server_config={"sessions": SessionLimits(max_message_size=100_000)},
        client_config={"sessions": SessionLimits(max_message_size=70_000)},
    )
    pair.run()
    from_client = [e.remote for e in of(pair.server_events, LinkAttached)]
    from_server = [e.remote for e in of(pair.client_events, LinkAttached)]
    assert {a.role for a in from_client} == {Role.SENDER, Role.RECEIVER} == {a.role for a in from_server}
    assert [a.max_message_size for a in from_client] == [70_000, 70_000]
    assert [a.max_message_size for a in from_server] == [100_000, 100_000]


def test_no_sasl_for_x509_devices() -> None:
    pair = make_pair(use_sasl=False)
    pair.run()
    assert pair.client_wire.startswith(b"AMQP\x00\x01\x00\x00")
    assert pair.server.sasl_mechanism is None
    assert of(pair.client_events, MessageReceived)
    assert pair.server.finished


def test_server_may_refuse_connections_without_sasl() -> None:
    pair = make_pair(use_sasl=False, server_config={"allow_no_sasl": False})
    pair.run()
    closed = of(pair.server_events, ConnectionClosed)
    assert pair.server.finished and closed and closed[0].error is not None
    assert of(pair.client_events, ConnectionClosed)  # the server's SASL header is not what it sent


def test_failed_sasl_outcome_finishes_both() -> None:
    pair = make_pair(server_app=DpsLikeServer(mechanisms_ok=()))
    pair.run()
    assert of(pair.client_events, SaslOutcomeReceived)[0].code is SaslCode.AUTH
    assert pair.server.finished and pair.client.finished


@dataclass
class TpmLikeServer(DpsLikeServer):
    """Challenges 0x00, then sends a blob in two chunks (ctrl 0x80|seq, 0xC0|seq)."""

    blob: bytes = bytes(range(256)) * 3
    step: int = 0
    responses: list[bytes] = field(default_factory=list)

    def __call__(self, conn: Connection, event: Event) -> None:
        if isinstance(event, SaslInitReceived):
            conn.sasl_challenge(b"\x00")
        elif isinstance(event, SaslResponseReceived):
            self.responses.append(event.response)
            self.step += 1
            if self.step == 1:
                conn.sasl_challenge(bytes([0x80]) + self.blob[:400])
            elif self.step == 2:
                conn.sasl_challenge(bytes([0xC1]) + self.blob[400:])
            else:
                conn.sasl_outcome(SaslCode.OK)
        else:
            super().__call__(conn, event)


@dataclass
class TpmLikeClient(DeviceLikeClient):
    mechanism: str = "TPM"
    initial_response: bytes = b"\x00scope\x00dev\x00EK"
    chunks: list[bytes] = field(default_factory=list)

    def __call__(self, conn: Connection, event: Event) -> None:
        if isinstance(event, SaslChallengeReceived):
            if event.challenge == b"\x00":
                conn.sasl_response(b"\x00SRK")
            else:
                self.chunks.append(event.challenge)
                final = event.challenge[0] & 0x40
                conn.sasl_response(b"\x00SharedAccessSignature sr=x" if final else b"\x00")
        else:
            super().__call__(conn, event)


def test_multi_round_tpm_like_sasl() -> None:
    server_app, client_app = TpmLikeServer(), TpmLikeClient()
    pair = make_pair(server_app=server_app, client_app=client_app)
    pair.run()
    assert server_app.responses == [b"\x00SRK", b"\x00", b"\x00SharedAccessSignature sr=x"]
    assert b"".join(c[1:] for c in client_app.chunks) == server_app.blob
    assert [c[0] for c in client_app.chunks] == [0x80, 0xC1]
    assert of(pair.client_events, MessageReceived)


def test_a_pipelining_client_waits_for_the_sasl_answer() -> None:
    """proton pipelines its AMQP header and open after sasl-init (ANONYMOUS): the server must
    not read them as SASL frames before it has sent the outcome."""
    clock = Clock()
    server = Connection(
        Side.SERVER, ConnectionConfig(container_id="s", sasl_mechanisms=("ANONYMOUS",)), clock=clock
    )
    wire = bytearray(ProtocolHeader(ProtocolId.SASL).encode())
    from provisiond.protocol.amqp.performatives import SaslInit

    encode_frame(Frame(FrameType.SASL, 0, SaslInit(mechanism=Symbol("ANONYMOUS"))), wire)
    wire += ProtocolHeader(ProtocolId.AMQP).encode()
    encode_frame(Frame(FrameType.AMQP, 0, Open(container_id="c")), wire)
    events = server.feed_bytes(bytes(wire))
    assert isinstance(events[-1], SaslInitReceived)
    server.sasl_outcome(SaslCode.OK)
    events = server.poll_events()
    assert isinstance(events[-1], ConnectionOpened)
    server.open()
    assert server.opened


# --- flow control and limits -------------------------------------------------------------------


def test_messages_wait_for_credit() -> None:
    server_app = DpsLikeServer()
    client_app = DeviceLikeClient(close_after=False)
    pair = make_pair(server_app=server_app, client_app=client_app)
    pair.run()
    assert server_app.sender is not None
    link = client_app.links["recv"]
    # Use up the device's credit (10), then one more: it waits until credit comes.
    for n in range(9):
        pair.server.send_message(server_app.sender, Message(body=(Data(b"%d" % n),)))
    pair.run()
    assert len(of(pair.client_events, MessageReceived)) == 10  # the answer plus nine
    pair.server.send_message(server_app.sender, Message(body=(Data(b"late"),)))
    pair.run()
    assert len(of(pair.client_events, MessageReceived)) == 10
    pair.client.grant_credit(link, 1)
    pair.run()
    assert of(pair.client_events, MessageReceived)[-1].message.data == b"late"
    assert of(pair.server_events, CreditGranted)


def test_large_messages_span_frames_of_the_peers_size() -> None:
    payload = bytes(range(256)) * 20  # 5 KB in 512-byte frames
    client_app = DeviceLikeClient(payload=payload)
    pair = make_pair(client_app=client_app, server_config={"max_frame_size": 512})
    pair.run()
    assert of(pair.server_events, MessageReceived)[0].message.data == payload


def _opened_pair(**kwargs: Any) -> tuple[Pair, DeviceLikeClient]:
    client_app = DeviceLikeClient(requests=0, close_after=False)
    pair = make_pair(client_app=client_app, **kwargs)
    pair.run()
    return pair, client_app


def test_message_over_the_size_limit_detaches_the_link() -> None:
    pair, client_app = _opened_pair(server_config={"sessions": SessionLimits(max_message_size=1000)})
    pair.client.sessions[0].links[
        client_app.links["send"].handle
    ].remote = None  # ignore the advertised limit
    pair.client.send_message(client_app.links["send"], Message(body=(Data(b"x" * 2000),)))
    pair.run()
    detached = of(pair.server_events, LinkDetached)
    assert detached and detached[0].error is not None
    assert detached[0].error.condition == ErrorCondition.MESSAGE_SIZE_EXCEEDED
    assert of(pair.client_events, LinkDetached)[0].by_peer


def _inject(pair: Pair, *frames: Frame) -> list[Event]:
    wire = bytearray()
    for frame in frames:
        encode_frame(frame, wire)
    events = pair.server.feed_bytes(bytes(wire))
    pair.server_events += events
    return events


def test_transfer_without_credit_detaches_with_transfer_limit_exceeded() -> None:
    pair, client_app = _opened_pair(server_app=DpsLikeServer(credit=0))
    payload = encode_message(Message(body=(Data(b"x"),)))
    events = _inject(
        pair,
        Frame(
            FrameType.AMQP, 0, Transfer(handle=0, delivery_id=0, delivery_tag=b"t", settled=False), payload
        ),
    )
    detached = of(events, LinkDetached)
    assert detached and detached[0].error is not None
    assert detached[0].error.condition == ErrorCondition.TRANSFER_LIMIT_EXCEEDED


def test_transfers_past_the_session_window_end_the_session() -> None:
    pair, _ = _opened_pair(
        server_config={"sessions": SessionLimits(incoming_window=2)}, server_app=DpsLikeServer(credit=100)
    )
    payload = encode_message(Message(body=(Data(b"x"),)))
    # One delivery split in many frames: each frame uses the window, and the window reopens at
    # half; bypass the reopening flow by sending without reading it.
    frames = [
        Frame(FrameType.AMQP, 0, Transfer(handle=0, delivery_id=0, delivery_tag=b"t", more=True), payload)
    ]
    events = _inject(pair, *frames)
    assert not of(events, SessionEnded)
    pair.server.sessions[0].incoming_window = 0  # as if the peer ignored our flow
    events = _inject(pair, Frame(FrameType.AMQP, 0, Transfer(handle=0, more=True), payload))
    ended = of(events, SessionEnded)
    assert (
        ended and ended[0].error is not None and ended[0].error.condition == ErrorCondition.WINDOW_VIOLATION
    )


def test_a_disposition_range_costs_what_is_unsettled() -> None:
    pair, client_app = _opened_pair()
    events = _inject(
        pair,
        Frame(
            FrameType.AMQP,
            0,
            Disposition(role=Role.RECEIVER, first=0, last=2**32 - 1, settled=True, state=Accepted()),
        ),
    )
    assert not of(events, ConnectionClosed)


def test_refused_link_reaches_the_client_as_a_detach_with_the_error() -> None:
    def refuse(conn: Connection, event: Event) -> None:
        if isinstance(event, LinkAttached) and event.answer_needed:
            conn.refuse_link(
                event.link, Error(condition=Symbol("amqp:not-found"), description="no such node")
            )
        else:
            DpsLikeServer()(conn, event)

    pair, _ = _opened_pair(server_app=refuse)
    detached = of(pair.client_events, LinkDetached)
    assert len(detached) == 2 and all(
        d.by_peer and d.error and d.error.condition == "amqp:not-found" for d in detached
    )
    attached = of(pair.client_events, LinkAttached)
    assert attached[0].remote.target is None and attached[1].remote.source is None


# --- time --------------------------------------------------------------------------------------


def test_idle_peer_is_closed_with_resource_limit_exceeded() -> None:
    pair, _ = _opened_pair(server_config={"idle_timeout": 10})
    assert pair.server.next_deadline() is not None
    pair.clock.now += 5
    assert not of(pair.server.tick(), ConnectionClosed)
    pair.clock.now += 6
    closed = of(pair.server.tick(), ConnectionClosed)
    assert closed and closed[0].error is not None
    assert closed[0].error.condition == ErrorCondition.RESOURCE_LIMIT_EXCEEDED
    assert pair.server.finished
    pair.run()
    assert of(pair.client_events, ConnectionClosed)[0].error == closed[0].error


def test_heartbeats_keep_an_idle_connection_open() -> None:
    pair, _ = _opened_pair(server_config={"idle_timeout": 10}, client_config={"idle_timeout": 10})
    for _ in range(10):
        pair.clock.now += 4
        pair.client.tick()
        pair.server.tick()
        pair.run()
    assert not pair.server.finished and not pair.client.finished


# --- bad input ---------------------------------------------------------------------------------


def _fresh_server(**config: Any) -> Connection:
    return Connection(
        Side.SERVER, ConnectionConfig(container_id="s", sasl_mechanisms=("PLAIN",), **config), clock=Clock()
    )


def _amqp(*frames: Frame) -> bytes:
    wire = bytearray(ProtocolHeader(ProtocolId.AMQP).encode())
    for frame in frames:
        encode_frame(frame, wire)
    return bytes(wire)


def _feed_answering_open(conn: Connection, data: bytes) -> list[Event]:
    """Feed ``data``; answer the peer's open as an application would."""
    events = conn.feed_bytes(data)
    seen = list(events)
    while events:
        if of(events, ConnectionOpened):
            conn.open()
        events = conn.poll_events()
        seen += events
    return seen


def _closed_with(conn: Connection, data: bytes) -> str | None:
    closed = of(_feed_answering_open(conn, data), ConnectionClosed)
    assert conn.finished and closed
    error = closed[-1].error
    return str(error.condition) if error else None


OPEN = Frame(FrameType.AMQP, 0, Open(container_id="c"))
BEGIN = Frame(FrameType.AMQP, 0, Begin(next_outgoing_id=0, incoming_window=10, outgoing_window=10))


@pytest.mark.parametrize(
    ("data", "condition"),
    [
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", "amqp:connection:framing-error", id="http"),
        pytest.param(b"AMQP\x02\x01\x00\x00", "amqp:not-allowed", id="tls-header"),
        pytest.param(b"AMQP\x00\x02\x00\x00", "amqp:not-allowed", id="wrong-version"),
        pytest.param(_amqp(BEGIN), "amqp:illegal-state", id="begin-before-open"),
        pytest.param(_amqp(OPEN, OPEN), "amqp:illegal-state", id="open-twice"),
        pytest.param(
            _amqp(
                OPEN, Frame(FrameType.AMQP, 0, Flow(incoming_window=1, next_outgoing_id=0, outgoing_window=1))
            ),
            "amqp:illegal-state",
            id="flow-without-session",
        ),
        pytest.param(
            _amqp(OPEN, Frame(FrameType.AMQP, 9, BEGIN.performative)),
            "amqp:connection:framing-error",
            id="channel-above-max",
        ),
        pytest.param(_amqp(OPEN, BEGIN, BEGIN), "amqp:connection:framing-error", id="channel-in-use"),
        pytest.param(
            _amqp(OPEN, BEGIN, Frame(FrameType.AMQP, 0, Attach(name="x", handle=99, role=Role.SENDER))),
            "amqp:connection:framing-error",
            id="handle-above-max",
        ),
        pytest.param(
            _amqp(Frame(FrameType.AMQP, 0, Open(container_id="c", max_frame_size=100))),
            "amqp:frame-size-too-small",
            id="frame-size-too-small",
        ),
        pytest.param(
            _amqp() + b"\x00\x10\x00\x00\x02\x00\x00\x00",
            "amqp:connection:framing-error",
            id="frame-too-large",
        ),
        pytest.param(
            _amqp() + b"\x00\x00\x00\x09\x02\x00\x00\x00\x40",
            "amqp:decode-error",
            id="frame-not-a-performative",
        ),
        pytest.param(
            b"AMQP\x03\x01\x00\x00" + b"\x00\x00\x00\x08\x02\x00\x00\x00",
            "amqp:connection:framing-error",
            id="amqp-frame-during-sasl",
        ),
    ],
)
def test_bad_input_closes_with_the_right_condition(data: bytes, condition: str) -> None:
    assert _closed_with(_fresh_server(), data) == condition


def test_a_close_is_preceded_by_our_open() -> None:
    server = _fresh_server()
    server.feed_bytes(_amqp(BEGIN))
    out = server.get_outbound_data()
    assert out.startswith(b"AMQP\x00\x01\x00\x00")
    assert b"\x00\x53\x10" in out and b"\x00\x53\x18" in out  # open, then close
    assert out.index(b"\x00\x53\x10") < out.index(b"\x00\x53\x18")


def test_frames_on_an_unattached_handle_end_the_session() -> None:
    server = _fresh_server()
    events = _feed_answering_open(
        server,
        _amqp(OPEN, BEGIN, Frame(FrameType.AMQP, 0, Transfer(handle=3, delivery_id=0, delivery_tag=b"t"))),
    )
    ended = of(events, SessionEnded)
    assert (
        ended and ended[0].error is not None and ended[0].error.condition == ErrorCondition.UNATTACHED_HANDLE
    )


def test_input_piling_up_while_an_answer_is_due_is_refused() -> None:
    server = _fresh_server(max_frame_size=512)
    wire = bytearray(b"AMQP\x03\x01\x00\x00")
    from provisiond.protocol.amqp.performatives import SaslInit

    encode_frame(
        Frame(FrameType.SASL, 0, SaslInit(mechanism=Symbol("PLAIN"), initial_response=b"\x00u\x00p")), wire
    )
    assert isinstance(server.feed_bytes(bytes(wire))[-1], SaslInitReceived)  # the app now owes the outcome
    closed = of(server.feed_bytes(b"\x00" * 4096), ConnectionClosed)
    assert (
        closed
        and closed[0].error is not None
        and closed[0].error.condition == ErrorCondition.RESOURCE_LIMIT_EXCEEDED
    )


def test_garbage_after_close_is_ignored() -> None:
    pair = make_pair()
    pair.run()
    assert pair.server.feed_bytes(b"\xff" * 100) == []


def test_eof_is_a_close_by_the_peer() -> None:
    server = _fresh_server()
    assert of(server.feed_bytes(b""), ConnectionClosed)[0].by_peer
    assert server.finished


@pytest.mark.parametrize(
    "misuse",
    [
        pytest.param(lambda c: c.sasl_init("PLAIN"), id="server-sasl-init"),
        pytest.param(lambda c: c.sasl_outcome(SaslCode.OK), id="outcome-before-init"),
        pytest.param(lambda c: c.begin(), id="begin-before-open"),
        pytest.param(lambda c: c.close(), id="close-before-header"),
        pytest.param(lambda c: c.end(5), id="end-unknown-channel"),
        pytest.param(lambda c: c.grant_credit(LinkId(0, 0), 1), id="credit-unknown-link"),
    ],
)
def test_misuse_is_a_local_protocol_error(misuse: Callable[[Connection], None]) -> None:
    with pytest.raises(LocalProtocolError):
        misuse(_fresh_server())


def test_sending_on_a_receiving_link_is_misuse() -> None:
    pair, client_app = _opened_pair()
    with pytest.raises(LocalProtocolError):
        pair.client.send_message(client_app.links["recv"], Message())
    with pytest.raises(LocalProtocolError):
        pair.client.grant_credit(client_app.links["send"], 1)


def test_sasl_frames_must_fit_512_bytes() -> None:
    server = _fresh_server()
    server.feed_bytes(b"AMQP\x03\x01\x00\x00")
    wire = bytearray()
    from provisiond.protocol.amqp.performatives import SaslInit

    encode_frame(Frame(FrameType.SASL, 0, SaslInit(mechanism=Symbol("TPM"), initial_response=b"x")), wire)
    server.feed_bytes(bytes(wire))
    with pytest.raises(LocalProtocolError, match="512"):
        server.sasl_challenge(b"x" * 600)


def test_rejections_carry_the_error() -> None:
    def reject(conn: Connection, event: Event) -> None:
        if isinstance(event, MessageReceived):
            conn.settle(
                event.link,
                event.delivery_id,
                Rejected(
                    error=Error(
                        condition=Symbol("amqp:not-allowed"),
                        description="{}",
                        info={Symbol("retry-after"): 3},
                    )
                ),
            )
        else:
            DpsLikeServer()(conn, event)

    pair, client_app = _opened_pair(server_app=reject)
    pair.client.send_message(client_app.links["send"], Message(body=(Data(b"{}"),)))
    pair.run()
    update = of(pair.client_events, DeliveryUpdated)[0]
    assert isinstance(update.state, Rejected) and update.state.error is not None
    assert update.state.error.info == {"retry-after": 3}


# --- fuzz --------------------------------------------------------------------------------------

#: Mutated client byte streams fed to a fresh server each (reported in the issue).
FUZZ_SESSIONS = 10_000


def test_fuzz_the_server_with_mutated_sessions(capsys: pytest.CaptureFixture[str]) -> None:
    """Record valid client byte streams (PLAIN, none, TPM-like), mutate them, and feed each
    to a fresh server in random chunks; the server must never raise (it closes instead) and
    its buffers stay bounded."""
    seeds = []
    for kwargs in ({}, {"use_sasl": False}, {"client_app": TpmLikeClient(), "server_app": TpmLikeServer()}):
        pair = make_pair(**kwargs)
        pair.run()
        seeds.append(bytes(pair.client_wire))
    rng = random.Random(60)
    tried = opened = messages = 0
    for _ in range(FUZZ_SESSIONS):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            where = rng.randrange(len(data))
            op = rng.randrange(4)
            if op == 0:
                data[where] ^= 1 << rng.randrange(8)
            elif op == 1:
                data[where] = rng.choice((0x00, 0xFF, 0x40, 0x45, 0x53, 0xA1, 0xE0, 0xC0, 0x70))
            elif op == 2:
                del data[where : where + rng.randint(1, 8)]
            else:
                data[where:where] = rng.randbytes(rng.randint(1, 8))
        clock = Clock()
        server = Connection(
            Side.SERVER,
            ConnectionConfig(
                container_id="s", sasl_mechanisms=("TPM", "PLAIN", "ANONYMOUS"), max_frame_size=4096
            ),
            clock=clock,
        )
        app = TpmLikeServer()
        position = 0
        while position < len(data) and not server.finished:
            size = rng.randint(1, 64)
            events = server.feed_bytes(bytes(data[position : position + size]))
            position += size
            while events:
                for event in events:
                    try:
                        app(server, event)
                    except LocalProtocolError:
                        pass  # the app's own guesses about what a mutated peer wants
                events = server.poll_events()
            assert len(server._in) <= 4096 + 64
            server.get_outbound_data()
        opened += server.remote_open is not None
        messages += app.sender is not None and bool(server.sessions)
        clock.now += 1000
        server.tick()
        tried += 1
    assert tried == FUZZ_SESSIONS
    assert opened > FUZZ_SESSIONS // 4 and messages > FUZZ_SESSIONS // 10  # the mutations reach deep states
    with capsys.disabled():
        print(  # noqa: T201 (the report line)
            f"\n[amqp fuzz] server connection: {tried} mutated sessions, {opened} reached open, {messages} reached links"
        )
