"""The MQTT 3.1.1 connection, one state machine for both roles, sans-io.

Theory of operation
===================

:class:`MqttConnection` is mqttproto's state machine in 3.1.1 form: the application feeds it
the bytes it received (:meth:`~MqttConnection.feed_bytes` returns the packets they completed,
already checked against the state) and drains the bytes to send
(:meth:`~MqttConnection.get_outbound_data`). Operations (``publish``, ``subscribe``,
``accept`` ...) validate, queue bytes and return packet identifiers; nothing here touches a
socket, sleeps or spawns anything. The same class plays the **client** (the device) and the
**server** (the DPS endpoint): "the packets you send as a client are exactly the ones you
receive as a server" (h11).

Rule 1: everything that decides which packet may come or go in which state lives in the two
tables below, :data:`RECEIVE` and :data:`SEND`, keyed by role, then state, then packet type,
and giving the next state. A packet a table does not list is a protocol violation: from the
peer it raises :class:`~provisiond.errors.RemoteProtocolError` (and the connection is closed),
from the application :class:`~provisiond.errors.LocalProtocolError` (our bug).

Rule 2: this module knows nothing of DPS. Topics, identities and registrations are the
business of :mod:`provisiond.protocol.topics` and the endpoints.

States (:class:`State`)::

    client:  IDLE --connect()--> CONNECTING --CONNACK 0--> CONNECTED --disconnect()--> CLOSED
                                            --CONNACK refused---------------------> CLOSED
    server:  IDLE --CONNECT--> CONNECTING --accept()--> CONNECTED --DISCONNECT--> CLOSED
                                          --refuse()-----------------------------> CLOSED

The server **pauses** in CONNECTING (as h11 pauses after a request): a client may pipeline
packets behind its CONNECT, and none of them may be answered before the CONNACK, so parsing
stops after the CONNECT until the application calls :meth:`~MqttConnection.accept` (then it
calls ``feed_bytes(b"")`` to get what was pipelined) or :meth:`~MqttConnection.refuse`. The
machine refuses by itself what 3.1.1 decides alone: another protocol level (return code 1) and
an empty client identifier without clean session (return code 2, MQTT-3.1.3-8).

The machine answers what needs no decision: PINGREQ with PINGRESP and UNSUBSCRIBE with
UNSUBACK. PUBLISH (QoS 1) is acknowledged by the application with
:meth:`~MqttConnection.acknowledge`, so that it decides the order (the DPS endpoint sends the
PUBACK before its response, as the .NET SDK requires) and whether to acknowledge at all.
QoS 2 is not supported: a QoS 2 PUBLISH is a protocol error here.

Time comes from the ``clock`` callable the machine is given (monotonic seconds), never from a
clock it reads itself. :meth:`~MqttConnection.deadline` says when something lapses: for a
server, the CONNECT that never came (``connect_timeout``) or the keep-alive (1.5 times the
client's interval since the last bytes received, MQTT-3.1.2-24), or ``max_idle`` when that is
shorter or the keep-alive is 0 (MQTT 3.1.1 §3.1.2.10 lets a server drop an inactive client
whatever its keep-alive; IoT Hub caps its side at 1,767 s); for a client, the keep-alive interval since the last bytes sent. When the deadline passes the I/O
layer calls :meth:`~MqttConnection.handle_deadline`: a server closes and names the
:class:`Lapse`; a client queues a PINGREQ, or gives up when the previous one went unanswered.

Input is bounded: :func:`~provisiond.protocol._mqtt_packets.decode_packet` refuses a packet
larger than ``max_packet_size`` as soon as its header announces it, so the buffer never holds
more than one packet (plus at most what one read returned).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .._enums import IdentityEnum
from ..errors import InsufficientData, LocalProtocolError, RemoteProtocolError
from ._mqtt_packets import (
    DEFAULT_MAX_PACKET_SIZE,
    Connack,
    Connect,
    ConnectReturnCode,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    QoS,
    Suback,
    SubackReturnCode,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    decode_packet,
)

__all__ = ["RECEIVE", "SEND", "Lapse", "MqttConnection", "Role", "State"]

KEEP_ALIVE_GRACE = 1.5  # MQTT-3.1.2-24: the server allows one and a half keep-alive intervals
_SHOWN_BYTES = 32  # of a peer that does not speak MQTT, in the error


class Role(IdentityEnum):
    CLIENT = "client"
    SERVER = "server"


class State(IdentityEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


class Lapse(IdentityEnum):
    """Why :meth:`MqttConnection.handle_deadline` closed the connection."""

    CONNECT_TIMEOUT = "no CONNECT arrived within the connect timeout"
    KEEP_ALIVE = "the keep-alive lapsed"
    IDLE = "nothing received within the idle timeout"


_T = PacketType
_C, _S = Role.CLIENT, Role.SERVER
_CONNECTED_FROM_CLIENT = {_T.PUBLISH, _T.PUBACK, _T.SUBSCRIBE, _T.UNSUBSCRIBE, _T.PINGREQ}
_CONNECTED_FROM_SERVER = {_T.PUBLISH, _T.PUBACK, _T.SUBACK, _T.UNSUBACK, _T.PINGRESP}


def _stay(types: Iterable[PacketType], state: State) -> dict[PacketType, State]:
    return dict.fromkeys(types, state)


#: Role -> state -> packet type the peer may send -> the state after it. (A refusing CONNACK
#: closes instead; a server pauses in CONNECTING, so it receives nothing there.)
RECEIVE: dict[Role, dict[State, dict[PacketType, State]]] = {
    _S: {
        State.IDLE: {_T.CONNECT: State.CONNECTING},
        State.CONNECTED: {**_stay(_CONNECTED_FROM_CLIENT, State.CONNECTED), _T.DISCONNECT: State.CLOSED},
    },
    _C: {
        State.CONNECTING: {_T.CONNACK: State.CONNECTED},
        State.CONNECTED: _stay(_CONNECTED_FROM_SERVER, State.CONNECTED),
    },
}

#: Role -> state -> packet type the application may send -> the state after it. (A refusing
#: CONNACK closes instead.) A client may send before its CONNACK arrives (§3.1.4).
SEND: dict[Role, dict[State, dict[PacketType, State]]] = {
    _S: {
        State.CONNECTING: {_T.CONNACK: State.CONNECTED},
        State.CONNECTED: _stay(_CONNECTED_FROM_SERVER, State.CONNECTED),
    },
    _C: {
        State.IDLE: {_T.CONNECT: State.CONNECTING},
        State.CONNECTING: {**_stay(_CONNECTED_FROM_CLIENT, State.CONNECTING), _T.DISCONNECT: State.CLOSED},
        State.CONNECTED: {**_stay(_CONNECTED_FROM_CLIENT, State.CONNECTED), _T.DISCONNECT: State.CLOSED},
    },
}


@dataclass(frozen=True, slots=True)
class _Pending:
    """A SUBSCRIBE or UNSUBSCRIBE of ours awaiting its acknowledgement."""

    packet_type: PacketType
    count: int


class MqttConnection:
    """One MQTT 3.1.1 connection, as ``role`` sees it. See the module's theory of operation.

    :param clock: monotonic seconds (``time.monotonic``), read on each feed and drain.
    :param max_packet_size: the largest packet accepted from the peer, fixed header included.
    :param connect_timeout: server: seconds from construction to the CONNECT (None: no limit).
    :param max_idle: server: seconds without input after which a connected client is closed,
        when its keep-alive does not close it sooner (also with keep-alive 0; None: no limit).
    :param max_inflight: QoS 1 publishes of ours that may await their PUBACK at once.
    """

    def __init__(
        self,
        role: Role,
        *,
        clock: Callable[[], float],
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        connect_timeout: float | None = None,
        max_idle: float | None = None,
        max_inflight: int = 0xFFFF,
    ) -> None:
        if not 0 < max_inflight <= 0xFFFF:
            raise ValueError(f"max_inflight must be 1 to 65535, not {max_inflight!r}")
        self.role = role
        self.state = State.IDLE
        #: Why the connection closed (for logs); None while it is open.
        self.close_reason: str | None = None
        #: Server: the client's CONNECT once it arrived.
        self.connect_packet: Connect | None = None
        self.keep_alive = 0
        self._clock = clock
        self._max_packet_size = max_packet_size
        self._max_inflight = max_inflight
        self._in = bytearray()
        self._out = bytearray()
        self._next_id = 0
        self._inflight: set[int] = set()  # our QoS 1 publishes awaiting PUBACK
        self._pending: dict[int, _Pending] = {}  # our SUBSCRIBE/UNSUBSCRIBE awaiting their ack
        now = clock()
        self._last_received = now
        self._last_sent = now
        self._ping_outstanding = False
        self._clean_session = True
        self._connect_deadline = now + connect_timeout if connect_timeout is not None else None
        self._max_idle = max_idle
        self._heard = False  # whether a packet from the peer has arrived

    # --- bytes in, bytes out ---------------------------------------------------------------------

    def feed_bytes(self, data: bytes) -> list[Packet]:
        """Take bytes from the peer; return the packets they complete, in order.

        :raises RemoteProtocolError: the peer broke the protocol (malformed or oversized
            packet, or one not allowed now); the connection is then CLOSED.
        """
        if self.state is State.CLOSED:
            return []  # after DISCONNECT or a refusal the rest is discarded (MQTT-3.14.4-2)
        if data:
            self._last_received = self._clock()
            self._ping_outstanding = False
            self._in += data
        try:
            packets, consumed = self._parse()
        except RemoteProtocolError as exc:
            self._in = bytearray()  # rebind, do not resize: a traceback may still see the buffer
            self._close(exc.message)
            raise
        del self._in[:consumed]
        return packets

    def _parse(self) -> tuple[list[Packet], int]:
        packets: list[Packet] = []
        view = memoryview(self._in)
        offset = 0
        while offset < len(view) and not self._paused():
            if self.state is State.CLOSED:
                offset = len(view)
                break
            if not self._heard:
                self._check_first_bytes(view[offset:])
            try:
                rest, packet = decode_packet(view[offset:], max_packet_size=self._max_packet_size)
            except InsufficientData:
                break
            offset = len(view) - len(rest)
            del rest
            self._received(packet)
            packets.append(packet)
        view.release()
        return packets, offset

    def _check_first_bytes(self, data: memoryview) -> None:
        """The peer's first byte must begin the packet the table expects first (a CONNACK, a
        CONNECT). Anything else is refused before it is decoded, naming the bytes: a peer that
        does not speak MQTT (an HTTPS server's ``HTTP/1.1 400``) is not mistaken for a malformed
        packet (``H`` is a PUBACK with reserved flags)."""
        expected = RECEIVE[self.role].get(self.state, {})
        kind = data[0] >> 4
        if expected and kind not in {packet_type.value for packet_type in expected}:
            names = " or ".join(packet_type.name for packet_type in expected)
            raise RemoteProtocolError(
                f"The {_peer(self.role)}'s first bytes {bytes(data[:_SHOWN_BYTES])!r} are not a {names} packet."
            )

    def _paused(self) -> bool:
        return self.role is Role.SERVER and self.state is State.CONNECTING

    @property
    def pending_input(self) -> int:
        """Bytes of a packet that has begun but is not complete (0 while the input waits for
        the application, as after a CONNECT)."""
        return 0 if self._paused() else len(self._in)

    @property
    def outbound_pending(self) -> int:
        """Bytes queued for the peer and not yet taken by :meth:`get_outbound_data`."""
        return len(self._out)

    def get_outbound_data(self) -> bytes:
        """The bytes to send to the peer, in order (empty when there are none)."""
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        self._last_sent = self._clock()
        return data

    # --- time ------------------------------------------------------------------------------------

    def deadline(self) -> float | None:
        """When :meth:`handle_deadline` is due, in ``clock`` seconds; None: no deadline."""
        if self.state is State.CLOSED:
            return None
        if self.role is Role.SERVER:
            if self.state is State.IDLE:
                return self._connect_deadline
            if self.state is State.CONNECTED and (limit := self._idle_limit()) is not None:
                return self._last_received + limit[0]
            return None
        if self.keep_alive and self.state is not State.IDLE:
            return self._last_sent + self.keep_alive
        return None

    def handle_deadline(self) -> Lapse | None:
        """Act on a deadline that passed: a server closes (and returns why); a client queues a
        PINGREQ, or closes when its last one went unanswered. Returns None when nothing lapsed."""
        due = self.deadline()
        if due is None or self._clock() < due:
            return None
        if self.role is Role.CLIENT and not self._ping_outstanding:
            self.ping()
            return None
        if self.state is State.IDLE:
            lapse, detail = Lapse.CONNECT_TIMEOUT, ""
        else:
            seconds, lapse = self._idle_limit() or (0.0, Lapse.KEEP_ALIVE)
            detail = f" ({self.keep_alive} s)" if lapse is Lapse.KEEP_ALIVE else f" ({seconds:g} s)"
        self._close(lapse.value + detail)
        return lapse

    def _idle_limit(self) -> tuple[float, Lapse] | None:
        """Server: how long a connected client may be silent, and what lapses then."""
        keep_alive = KEEP_ALIVE_GRACE * self.keep_alive if self.keep_alive else None
        if self._max_idle is not None and (keep_alive is None or self._max_idle < keep_alive):
            return self._max_idle, Lapse.IDLE
        return (keep_alive, Lapse.KEEP_ALIVE) if keep_alive is not None else None

    # --- operations: both roles ------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes = b"", *, qos: QoS = QoS.AT_LEAST_ONCE, dup: bool = False
    ) -> int | None:
        """Queue a PUBLISH; return its packet identifier (None at QoS 0). ``dup`` marks a
        redelivery (QoS 1 only): a message the peer may have seen on an earlier connection.

        :raises LocalProtocolError: not connected, QoS 2, or too many unacknowledged publishes.
        """
        if qos is QoS.EXACTLY_ONCE:
            raise LocalProtocolError("QoS 2 is not supported.")
        packet_id = None
        if qos is QoS.AT_LEAST_ONCE:
            if len(self._inflight) >= self._max_inflight:
                raise LocalProtocolError(f"{len(self._inflight)} publishes already await their PUBACK.")
            packet_id = self._allocate_id()
        self._send(Publish(topic=topic, payload=payload, qos=qos, packet_id=packet_id, dup=dup))
        if packet_id is not None:
            self._inflight.add(packet_id)
        return packet_id

    def acknowledge(self, publish: Publish) -> None:
        """Acknowledge a received PUBLISH (a PUBACK at QoS 1; nothing at QoS 0)."""
        if publish.packet_id is not None:
            self._send(Puback(packet_id=publish.packet_id))

    def close(self, reason: str) -> None:
        """Mark the connection closed by the application (sends nothing)."""
        self._close(reason)

    def set_limits(self, *, max_packet_size: int, max_idle: float | None, max_inflight: int) -> None:
        """Change the limits given at construction (see the class). A server that serves
        several protocols on one port learns which one a client speaks from its CONNECT and
        applies that protocol's limits from then on (the DPS and IoT Hub endpoints share the
        MQTT port)."""
        if not 0 < max_inflight <= 0xFFFF:
            raise ValueError(f"max_inflight must be 1 to 65535, not {max_inflight!r}")
        self._max_packet_size = max_packet_size
        self._max_idle = max_idle
        self._max_inflight = max_inflight

    @property
    def inflight(self) -> int:
        """How many of our QoS 1 publishes await their PUBACK."""
        return len(self._inflight)

    # --- operations: server ----------------------------------------------------------------------

    def accept(self, *, session_present: bool = False) -> None:
        """Accept the CONNECT (CONNACK 0). ``session_present``: the server kept a session for
        this client id from an earlier connection (never for a clean-session CONNECT,
        MQTT-3.2.2-1)."""
        self._require(Role.SERVER, "accept a CONNECT")
        if session_present and self.connect_packet is not None and self.connect_packet.clean_session:
            raise LocalProtocolError("A clean-session CONNECT has no session present (MQTT-3.2.2-1).")
        self._send(Connack(return_code=ConnectReturnCode.ACCEPTED, session_present=session_present))

    def refuse(self, code: ConnectReturnCode, reason: str) -> None:
        """Refuse the CONNECT with ``code`` and close; ``reason`` is for the logs."""
        self._require(Role.SERVER, "refuse a CONNECT")
        if code is ConnectReturnCode.ACCEPTED:
            raise LocalProtocolError("refuse() needs a refusing return code.")
        self._send(Connack(return_code=code), closing=True)
        self._close(f"CONNECT refused with return code {int(code)} ({code.name.lower()}): {reason}")

    def grant(self, subscribe: Subscribe, return_codes: Iterable[SubackReturnCode]) -> None:
        """Answer a SUBSCRIBE: one return code per topic filter, in order."""
        self._require(Role.SERVER, "grant a SUBSCRIBE")
        codes = tuple(return_codes)
        if len(codes) != len(subscribe.subscriptions):
            raise LocalProtocolError(
                f"{len(codes)} return codes for {len(subscribe.subscriptions)} topic filters."
            )
        self._send(Suback(packet_id=subscribe.packet_id, return_codes=codes))

    # --- operations: client ----------------------------------------------------------------------

    def connect(
        self,
        *,
        client_id: str,
        username: str | None = None,
        password: bytes | None = None,
        keep_alive: int = 60,
        clean_session: bool = True,
    ) -> None:
        """Queue the CONNECT."""
        self._require(Role.CLIENT, "connect")
        packet = Connect(
            client_id=client_id,
            username=username,
            password=password,
            keep_alive=keep_alive,
            clean_session=clean_session,
        )
        self._send(packet)
        self.keep_alive = keep_alive
        self._clean_session = clean_session

    def subscribe(self, subscriptions: Iterable[Subscription]) -> int:
        """Queue a SUBSCRIBE; return its packet identifier."""
        self._require(Role.CLIENT, "subscribe")
        packet = Subscribe(packet_id=self._allocate_id(), subscriptions=tuple(subscriptions))
        self._send(packet)
        self._pending[packet.packet_id] = _Pending(_T.SUBSCRIBE, len(packet.subscriptions))
        return packet.packet_id

    def unsubscribe(self, topic_filters: Iterable[str]) -> int:
        """Queue an UNSUBSCRIBE; return its packet identifier."""
        self._require(Role.CLIENT, "unsubscribe")
        packet = Unsubscribe(packet_id=self._allocate_id(), topic_filters=tuple(topic_filters))
        self._send(packet)
        self._pending[packet.packet_id] = _Pending(_T.UNSUBSCRIBE, len(packet.topic_filters))
        return packet.packet_id

    def ping(self) -> None:
        """Queue a PINGREQ."""
        self._require(Role.CLIENT, "ping")
        self._send(Pingreq())
        self._ping_outstanding = True

    def disconnect(self) -> None:
        """Queue a DISCONNECT and close."""
        self._require(Role.CLIENT, "disconnect")
        self._send(Disconnect())
        self._close("disconnected")

    def pending(self, packet_id: int) -> bool:
        """Whether our SUBSCRIBE/UNSUBSCRIBE ``packet_id`` still awaits its acknowledgement."""
        return packet_id in self._pending

    # --- internals -------------------------------------------------------------------------------

    def _require(self, role: Role, what: str) -> None:
        if self.role is not role:
            raise LocalProtocolError(f"A {self.role.value} cannot {what}.")

    def _send(self, packet: Packet, *, closing: bool = False) -> None:
        allowed = SEND[self.role].get(self.state, {})
        next_state = allowed.get(packet.packet_type)
        if next_state is None:
            raise LocalProtocolError(
                f"A {self.role.value} cannot send {packet.packet_type.name} while {self.state.value}."
            )
        packet.encode(self._out)
        if not closing:
            self.state = next_state

    def _received(self, packet: Packet) -> None:
        self._heard = True
        next_state = RECEIVE[self.role].get(self.state, {}).get(packet.packet_type)
        if next_state is None:
            raise RemoteProtocolError(
                f"A {packet.packet_type.name} packet is not allowed from the {_peer(self.role)} while "
                f"{self.state.value}."
            )
        self.state = next_state
        if isinstance(packet, Publish):
            if packet.qos is QoS.EXACTLY_ONCE:
                raise RemoteProtocolError("QoS 2 publishes are not supported.")
        elif isinstance(packet, Puback):
            self._inflight.discard(packet.packet_id)  # an unknown identifier is harmless
        elif isinstance(packet, Pingreq):
            self._send(Pingresp())
        elif isinstance(packet, Unsubscribe):
            self._send(Unsuback(packet_id=packet.packet_id))
        elif isinstance(packet, Suback | Unsuback):
            self._acknowledged(packet)
        elif isinstance(packet, Connect):
            self._on_connect(packet)
        elif isinstance(packet, Connack):
            if packet.return_code is not ConnectReturnCode.ACCEPTED:
                self._close(f"the server refused the CONNECT with return code {int(packet.return_code)}")
            elif packet.session_present and self._clean_session:
                raise RemoteProtocolError(
                    "The server claims a session, but this client asked for a clean one."
                )
        elif isinstance(packet, Disconnect):
            self._close("the client disconnected")

    def _on_connect(self, packet: Connect) -> None:
        self.connect_packet = packet
        self.keep_alive = packet.keep_alive
        if not packet.is_supported_version:
            self.refuse(
                ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION,
                f"protocol {packet.protocol_name} level {packet.protocol_level}; this server speaks MQTT 3.1.1 (level 4)",
            )
        elif not packet.client_id and not packet.clean_session:
            self.refuse(
                ConnectReturnCode.IDENTIFIER_REJECTED, "an empty client identifier needs clean session"
            )

    def _acknowledged(self, packet: Suback | Unsuback) -> None:
        expected = _T.SUBSCRIBE if isinstance(packet, Suback) else _T.UNSUBSCRIBE
        pending = self._pending.get(packet.packet_id)
        if pending is None or pending.packet_type is not expected:
            raise RemoteProtocolError(
                f"A {packet.packet_type.name} for packet {packet.packet_id}, which awaits no {packet.packet_type.name}."
            )
        if isinstance(packet, Suback) and len(packet.return_codes) != pending.count:
            raise RemoteProtocolError(
                f"A SUBACK with {len(packet.return_codes)} return codes for {pending.count} topic filters."
            )
        del self._pending[packet.packet_id]

    def _allocate_id(self) -> int:
        for _ in range(0xFFFF):
            self._next_id = self._next_id % 0xFFFF + 1
            if self._next_id not in self._inflight and self._next_id not in self._pending:
                return self._next_id
        raise LocalProtocolError("Every packet identifier is in use.")

    def _close(self, reason: str) -> None:
        self.state = State.CLOSED
        if self.close_reason is None:  # the first reason is the real one
            self.close_reason = reason

    def __repr__(self) -> str:
        return f"<MqttConnection {self.role.value} {self.state.value}>"


def _peer(role: Role) -> str:
    return "client" if role is Role.SERVER else "server"
