"""The AMQP 1.0 connection, both roles, sans-io (mqttproto's ``feed_bytes``/``get_outbound_data``).

Theory of operation
===================
One :class:`Connection` object is one end of one byte stream, client or server (:class:`Side`).
It does no I/O and reads no clock except through the ``clock`` it is given: the I/O loop feeds
it what arrived (:meth:`Connection.feed_bytes`, which returns :mod:`events <.events>`), writes
what it queued (:meth:`Connection.get_outbound_data`), and calls :meth:`Connection.tick` when
:meth:`Connection.next_deadline` passes. Operations (``sasl_init``, ``open``, ``begin``,
``attach``, ``send_message``, ``settle``...) only queue frames.

The byte stream goes through three phases (``_phase``):

1. **Protocol header.** ``AMQP 3 1 0 0`` starts SASL, ``AMQP 0 1 0 0`` starts AMQP directly.
   A server answers a header with its own (Part 2 §2.2): for SASL the server's header and its
   mechanisms; for AMQP its AMQP header, if it accepts connections without SASL (X.509 devices
   authenticated by TLS do exactly that). A header it does not support is answered with the
   one it would accept, and the connection ends.
2. **SASL** (Part 5 §5.3): the table in :mod:`.state` says who speaks next; the application
   answers each :class:`~.events.SaslInitReceived`/:class:`~.events.SaslResponseReceived`
   (server) or :class:`~.events.SaslMechanismsReceived`/:class:`~.events.SaslChallengeReceived`
   (client) with the next frame. Any mechanism works, including DPS's multi-round ``TPM``: the
   connection does not interpret the bytes. After an ``ok`` outcome both sides start over with
   the AMQP header; after any other outcome the connection is finished.
3. **AMQP frames**: open and close are the connection's (its table), begin maps a session on a
   channel, every other frame goes to the session of its channel (:mod:`.session`).

Bounds: the input buffer never holds more than one frame of at most our ``max_frame_size``
(refused from its size field), plus what one ``feed_bytes`` brought; at most
``channel_max + 1`` sessions and ``handle_max + 1`` links per session; messages of at most
``max_message_size`` bytes; link credit and session windows bound the deliveries in flight.

Errors: anything malformed or out of order raises
:class:`~provisiond.errors.AmqpProtocolError` inside; the connection answers it the only way
its phase allows (our header, a failed SASL outcome, or ``close`` with the error condition,
preceded by our ``open`` if we had not sent it), reports :class:`~.events.ConnectionClosed`
with that error, and is finished: the I/O loop flushes the output and drops the stream.
Idle timeouts (Part 2 §2.4.5): we advertise ours and close with
``amqp:resource-limit-exceeded`` when nothing arrives for that long; we send an empty frame
when half of the peer's has passed without output.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ...errors import AmqpProtocolError, InsufficientData, LocalProtocolError
from .events import (
    ConnectionClosed,
    ConnectionOpened,
    Event,
    LinkId,
    ProtocolHeaderReceived,
    SaslChallengeReceived,
    SaslInitReceived,
    SaslMechanismsReceived,
    SaslOutcomeReceived,
    SaslResponseReceived,
    SessionBegun,
)
from .frames import (
    MIN_MAX_FRAME_SIZE,
    Frame,
    FrameType,
    ProtocolHeader,
    ProtocolId,
    Templates,
    decode_protocol_header,
    encode_frame,
    frame_at,
    write_frame,
)
from .performatives import (
    Begin,
    Close,
    DeliveryState,
    Error,
    ErrorCondition,
    Message,
    Open,
    Performative,
    Role,
    SaslChallenge,
    SaslCode,
    SaslInit,
    SaslMechanisms,
    SaslOutcome,
    SaslResponse,
    SndSettleMode,
    Source,
    Target,
    encode_message,
)
from .session import Session, SessionLimits, error
from .state import (
    CONNECTION_TRANSITIONS,
    RECEIVED,
    SASL_TRANSITIONS,
    SENT,
    SESSION_FRAMES_DISCARDED,
    SESSION_FRAMES_PROCESSED,
    ConnectionState,
    Direction,
    SaslState,
    SessionState,
    Side,
    transition,
)
from .types import Symbol

__all__ = ["Connection", "ConnectionConfig", "Side"]

logger = logging.getLogger("provisiond.protocol.amqp")

#: Heartbeats are never sent more often than this, whatever idle-time-out the peer asks for.
_MIN_HEARTBEAT = 0.5
#: Input buffered while the application owes the peer an answer, in frames of our maximum size.
_PAUSED_INPUT_FRAMES = 4


T = TypeVar("T")


def _parse(buffer: bytearray, decode: Callable[[memoryview], tuple[memoryview, T]]) -> tuple[int, T]:
    """Decode from the start of ``buffer`` without copying it; return the bytes consumed. The
    views die with this frame, so that the caller may then resize the buffer."""
    view = memoryview(buffer)
    rest, item = decode(view)
    return len(view) - len(rest), item


@functools.lru_cache(maxsize=16)
def _mechanisms_frame(mechanisms: tuple[str, ...]) -> bytes:
    """The sasl-mechanisms frame offering ``mechanisms``: the same bytes for every connection of
    a server, made once."""
    frame = bytearray()
    performative = SaslMechanisms(sasl_server_mechanisms=tuple(Symbol(m) for m in mechanisms))
    encode_frame(Frame(FrameType.SASL, 0, performative), frame)
    return bytes(frame)


def _open_frame(config: ConnectionConfig) -> bytes:
    """Our open frame: the same bytes for every connection of one config, made once (unless
    the config's properties, a map, make it unhashable)."""
    try:
        return _open_frame_of(config)
    except TypeError:
        return _encode_open(config)


def _encode_open(config: ConnectionConfig) -> bytes:
    idle = config.idle_timeout
    open_ = Open(
        container_id=config.container_id,
        hostname=config.hostname,
        max_frame_size=config.max_frame_size,
        channel_max=config.channel_max,
        idle_time_out=int(idle * 1000) if idle is not None else None,
        properties=config.properties,
    )
    buffer = bytearray()
    write_frame(buffer, FrameType.AMQP, 0, open_)
    return bytes(buffer)


_open_frame_of = functools.lru_cache(maxsize=16)(_encode_open)


class _Phase(enum.Enum):
    HEADER = "header"
    SASL = "sasl"
    AMQP = "amqp"
    FINISHED = "finished"


@dataclass(frozen=True, kw_only=True)
class ConnectionConfig:
    """Our side of a connection.

    :param container_id: our container id (open's ``container-id``).
    :param hostname: open's ``hostname`` (client: the host it connects to).
    :param max_frame_size: the largest frame we accept (at least 512).
    :param channel_max: highest channel number, so ``channel_max + 1`` sessions at most.
    :param idle_timeout: seconds without input before we close; None for no limit.
    :param sessions: windows, link handles and message size of each session.
    :param sasl_mechanisms: server: the mechanisms offered (empty: SASL refused).
    :param allow_no_sasl: server: accept an AMQP header without SASL first.
    :param use_sasl: client: start with the SASL header.
    :param properties: open's ``properties``.
    """

    container_id: str
    hostname: str | None = None
    max_frame_size: int = 64 * 1024
    channel_max: int = 3
    idle_timeout: float | None = 120.0
    sessions: SessionLimits = field(default_factory=SessionLimits)
    sasl_mechanisms: tuple[str, ...] = ()
    allow_no_sasl: bool = True
    use_sasl: bool = True
    properties: dict[Symbol, Any] | None = None

    def __post_init__(self) -> None:
        if self.max_frame_size < MIN_MAX_FRAME_SIZE or not 0 <= self.channel_max <= 0xFFFF:
            raise LocalProtocolError("max_frame_size must be at least 512 and channel_max a ushort.")


class Connection:
    """One AMQP 1.0 connection end; see the module docstring."""

    def __init__(self, side: Side, config: ConnectionConfig, *, clock: Callable[[], float]) -> None:
        self.side = side
        self.config = config
        self._clock = clock
        self.state = ConnectionState.START
        self._phase = _Phase.HEADER
        self.sasl_state: SaslState | None = None
        #: The mechanism the client chose (None: no SASL layer).
        self.sasl_mechanism: Symbol | None = None
        self.remote_open: Open | None = None
        self._in = bytearray()
        self._out = bytearray()
        self._events: list[Event] = []
        self.sessions: dict[int, Session] = {}
        self._by_remote_channel: dict[int, Session] = {}
        now = clock()
        self._last_received = now
        self._last_sent = now
        if side is Side.CLIENT:
            protocol = ProtocolId.SASL if config.use_sasl else ProtocolId.AMQP
            if config.use_sasl:
                self.sasl_state = SaslState.AWAIT_HEADER
            self._send_header(protocol)

    # --- state ---------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Nothing more will happen: flush :meth:`get_outbound_data` and drop the stream."""
        return self._phase is _Phase.FINISHED

    @property
    def opened(self) -> bool:
        return self.state is ConnectionState.OPENED

    @property
    def remote_max_frame_size(self) -> int:
        return self.remote_open.max_frame_size if self.remote_open else MIN_MAX_FRAME_SIZE

    def _advance(self, direction: Direction, what: type) -> None:
        self.state = transition(CONNECTION_TRANSITIONS, self.state, direction, what, "connection")
        if self.state is ConnectionState.END:
            self._phase = _Phase.FINISHED

    def _advance_sasl(self, direction: Direction, what: type) -> None:
        if self.sasl_state is None:
            raise LocalProtocolError("This connection has no SASL layer.")
        self.sasl_state = transition(SASL_TRANSITIONS[self.side], self.sasl_state, direction, what, "SASL")

    # --- I/O -----------------------------------------------------------------------------------

    def feed_bytes(self, data: bytes) -> list[Event]:
        """Take bytes from the peer; return what happened. ``b""`` means the peer closed."""
        if self.finished:
            return []
        if not data:
            self._phase = _Phase.FINISHED
            if self.state is not ConnectionState.END:
                self._events.append(ConnectionClosed(error=None, by_peer=True))
            return self._take_events()
        self._last_received = self._clock()
        self._in += data
        if self._paused and len(self._in) > _PAUSED_INPUT_FRAMES * self.config.max_frame_size:
            self._in = bytearray()
            self._fail(ErrorCondition.RESOURCE_LIMIT_EXCEEDED, "Too much input while an answer was due.")
            return self._take_events()
        return self.poll_events()

    def poll_events(self) -> list[Event]:
        """Process input that waited for the application (a pipelining peer's bytes after a
        SASL frame we had to answer first), and return the events. Call it after acting on
        events until it returns none."""
        if not self._in:  # the common case after acting on events: nothing waited
            return self._take_events()
        try:
            while self._in and self._phase is not _Phase.FINISHED and not self._paused and self._step():
                pass
        except AmqpProtocolError as exc:
            failure = exc
        else:
            return self._take_events()
        self._in = bytearray()  # a new buffer: views of the old one may live in the traceback
        self._fail(failure.condition, failure.message)
        return self._take_events()

    @property
    def _paused(self) -> bool:
        """Whether the next input must wait for the application: it owes the peer a SASL frame,
        its open, or the answer to an attach (a pipelining peer's next frames depend on it)."""
        if self._phase is _Phase.SASL:
            return self.sasl_state is SaslState.DECIDING
        if self.state is ConnectionState.OPEN_RCVD:
            return True
        for session in self.sessions.values():
            if session.attach_received and session.awaiting_answer:
                return True
        return False

    @property
    def pending_input(self) -> int:
        """Bytes of a protocol header or frame that has begun but is not complete (0 while the
        input waits for the application)."""
        return 0 if not self._in or self._paused else len(self._in)

    def get_outbound_data(self) -> bytes:
        """The bytes to send now (and forget)."""
        data = bytes(self._out)
        self._out.clear()
        if data:
            self._last_sent = self._clock()
        return data

    def tick(self) -> list[Event]:
        """Enforce our idle timeout and queue a heartbeat when one is due."""
        if self.finished:
            return []
        now = self._clock()
        if self.config.idle_timeout is not None and now - self._last_received > self.config.idle_timeout:
            self._fail(
                ErrorCondition.RESOURCE_LIMIT_EXCEEDED,
                f"Nothing received for {self.config.idle_timeout:g} s (idle timeout).",
            )
        elif (interval := self._heartbeat_interval()) is not None and now - self._last_sent >= interval:
            self._send_frame(Frame(FrameType.AMQP, 0, None))
        return self._take_events()

    def next_deadline(self) -> float | None:
        """When :meth:`tick` has something to do (in ``clock`` time); None for never."""
        if self._phase is _Phase.FINISHED:
            return None
        return next_deadline(
            self.config.idle_timeout, self._last_received, self._last_sent, self._heartbeat_interval()
        )

    def _heartbeat_interval(self) -> float | None:
        return heartbeat_interval(self.remote_open) if self.state is ConnectionState.OPENED else None

    def _take_events(self) -> list[Event]:
        if not self._events:
            return []
        events = list(self._events)
        self._events.clear()  # in place: the sessions append to this same list
        return events

    # --- parsing -------------------------------------------------------------------------------

    def _step(self) -> bool:
        """Handle one header or frame from the input; False when more bytes are needed."""
        if self._phase is _Phase.HEADER:
            try:
                consumed, header = _parse(self._in, decode_protocol_header)
            except InsufficientData:
                return False
            del self._in[:consumed]
            self._on_header(header)
            return True
        found = frame_at(self._in, self.config.max_frame_size)
        if found is None:
            return False  # no exception for the common case of waiting for bytes
        frame, consumed = found
        del self._in[:consumed]
        expected = FrameType.SASL if self._phase is _Phase.SASL else FrameType.AMQP
        if frame.type is not expected:
            raise AmqpProtocolError(
                f"A {frame.type.name} frame during the {self._phase.value} phase.",
                condition=ErrorCondition.FRAMING_ERROR,
            )
        if frame.performative is None:
            return True  # an empty frame: the peer's heartbeat
        if self._phase is _Phase.SASL:
            self._on_sasl(frame.performative)
        else:
            self._on_frame(frame)
        return True

    def _on_header(self, header: ProtocolHeader) -> None:
        self._events.append(ProtocolHeaderReceived(protocol=header.protocol))
        sasl_wanted = self.sasl_state is not None and self.sasl_state is not SaslState.DONE
        if self.side is Side.SERVER and self.state is ConnectionState.START and self.sasl_state is None:
            # First header from a client: it chooses SASL or not.
            if header.protocol is ProtocolId.SASL and self.config.sasl_mechanisms:
                self.sasl_state = SaslState.AWAIT_HEADER
                sasl_wanted = True
            elif header.protocol is not ProtocolId.AMQP or not self.config.allow_no_sasl:
                offer = ProtocolId.SASL if self.config.sasl_mechanisms else ProtocolId.AMQP
                self._send_header(offer)
                self._refuse(f"The client's protocol header {header.protocol.name} is not accepted here.")
                return
        expected = ProtocolId.SASL if sasl_wanted else ProtocolId.AMQP
        if header.protocol is not expected or header.version != (1, 0, 0):
            if self.side is Side.SERVER:
                self._send_header(expected)
            self._refuse(
                f"The peer sent protocol header {header.protocol.name} {header.version}, not {expected.name} 1.0.0."
            )
            return
        if sasl_wanted:
            self._advance_sasl(RECEIVED, ProtocolHeader)
            self._phase = _Phase.SASL
            if self.side is Side.SERVER:
                self._send_header(ProtocolId.SASL)
                self._out += _mechanisms_frame(self.config.sasl_mechanisms)
            return
        self._advance(RECEIVED, ProtocolHeader)
        self._phase = _Phase.AMQP
        if self.side is Side.SERVER:
            self._send_header(ProtocolId.AMQP)

    def _refuse(self, why: str) -> None:
        logger.debug("AMQP connection refused: %s", why)
        self._phase = _Phase.FINISHED
        self._events.append(ConnectionClosed(error=error(ErrorCondition.NOT_ALLOWED, why), by_peer=False))

    def _on_sasl(self, performative: Performative) -> None:
        self._advance_sasl(RECEIVED, type(performative))
        if isinstance(performative, SaslMechanisms):
            self._events.append(SaslMechanismsReceived(mechanisms=performative.sasl_server_mechanisms))
        elif isinstance(performative, SaslInit):
            self.sasl_mechanism = performative.mechanism
            self._events.append(
                SaslInitReceived(
                    mechanism=performative.mechanism,
                    initial_response=performative.initial_response,
                    hostname=performative.hostname,
                )
            )
        elif isinstance(performative, SaslChallenge):
            self._events.append(SaslChallengeReceived(challenge=performative.challenge))
        elif isinstance(performative, SaslResponse):
            self._events.append(SaslResponseReceived(response=performative.response))
        elif isinstance(performative, SaslOutcome):
            self._events.append(
                SaslOutcomeReceived(code=performative.code, additional_data=performative.additional_data)
            )
            self._sasl_done(performative.code)

    def _sasl_done(self, code: SaslCode) -> None:
        if code is SaslCode.OK:
            self._phase = _Phase.HEADER
            if self.side is Side.CLIENT:
                self._send_header(ProtocolId.AMQP)
        else:
            self._phase = _Phase.FINISHED

    def _on_frame(self, frame: Frame) -> None:
        performative = frame.performative
        assert performative is not None
        kind = type(performative)  # a decoded performative is of its exact class
        if kind is Open:
            assert isinstance(performative, Open)
            self._advance(RECEIVED, Open)
            if performative.max_frame_size < MIN_MAX_FRAME_SIZE:
                raise AmqpProtocolError(
                    f"The peer's max-frame-size {performative.max_frame_size} is below 512.",
                    condition=ErrorCondition.FRAME_SIZE_TOO_SMALL,
                )
            self.remote_open = performative
            if self.state is ConnectionState.OPENED or self.state is ConnectionState.OPEN_RCVD:
                self._events.append(ConnectionOpened(open=performative))
        elif kind is Close:
            assert isinstance(performative, Close)
            answer = self.state is ConnectionState.OPENED
            self._advance(RECEIVED, Close)
            if answer:
                self._advance(SENT, Close)
                write_frame(self._out, FrameType.AMQP, 0, _CLOSE)
            self._phase = _Phase.FINISHED
            self._events.append(ConnectionClosed(error=performative.error, by_peer=True))
        elif self.state in SESSION_FRAMES_DISCARDED:
            return
        elif self.state not in SESSION_FRAMES_PROCESSED:
            raise AmqpProtocolError(
                f"A {type(performative).__name__} before the connection is open.",
                condition=ErrorCondition.ILLEGAL_STATE,
            )
        elif kind is Begin:
            self._on_begin(frame.channel, performative)  # type: ignore[arg-type]
        else:
            session = self._by_remote_channel.get(frame.channel)
            if session is None:
                raise AmqpProtocolError(
                    f"A {type(performative).__name__} on channel {frame.channel}, where no session begun.",
                    condition=ErrorCondition.ILLEGAL_STATE,
                )
            session.on_frame(performative, frame.payload)
            if session.state is SessionState.ENDED:
                self._unmap(session)

    def _on_begin(self, channel: int, begin: Begin) -> None:
        if channel > self.config.channel_max or channel in self._by_remote_channel:
            raise AmqpProtocolError(
                f"Begin on channel {channel}, which is in use or above channel-max {self.config.channel_max}.",
                condition=ErrorCondition.FRAMING_ERROR,
            )
        if begin.remote_channel is not None:
            session = self.sessions.get(begin.remote_channel)
            if session is None or session.state is not SessionState.BEGIN_SENT:
                raise AmqpProtocolError(
                    f"Begin answers channel {begin.remote_channel}, where we began no session.",
                    condition=ErrorCondition.ILLEGAL_STATE,
                )
            session.on_begin(channel, begin)
        else:
            session = self._new_session()
            session.on_begin(channel, begin)
            session.begin(begin)
        self._by_remote_channel[channel] = session
        self._events.append(SessionBegun(channel=session.channel))

    def _new_session(self) -> Session:
        limit = min(self.config.channel_max, self.remote_open.channel_max if self.remote_open else 0)
        channel = next((c for c in range(limit + 1) if c not in self.sessions), None)
        if channel is None:
            raise AmqpProtocolError(
                f"All {limit + 1} channels are in use.", condition=ErrorCondition.RESOURCE_LIMIT_EXCEEDED
            )
        # The session holds the output buffer and the event list, not this connection: no
        # reference cycle, so that a finished connection is freed by its reference count (with
        # its sessions, links and the peer's frames) instead of waiting for the cycle collector.
        session = Session(
            channel,
            limits=self.config.sessions,
            send=functools.partial(_write_session_frame, self._out),
            events=self._events,
            remote_max_frame_size=self.remote_max_frame_size,
        )
        self.sessions[channel] = session
        return session

    def _unmap(self, session: Session) -> None:
        self.sessions.pop(session.channel, None)
        if session.remote_channel is not None:
            self._by_remote_channel.pop(session.remote_channel, None)

    # --- failing -------------------------------------------------------------------------------

    def _fail(self, condition: str, description: str) -> None:
        """Close because the peer broke the protocol (or went idle), as the phase allows."""
        logger.debug("closing AMQP connection (%s phase): %s (%s)", self._phase.value, description, condition)
        err = error(condition, description)
        if self._phase is _Phase.HEADER and self.side is Side.SERVER:
            preferred = (
                ProtocolId.SASL
                if self.config.sasl_mechanisms and self.sasl_state is None
                else ProtocolId.AMQP
            )
            self._out += ProtocolHeader(preferred).encode()
        elif (
            self._phase is _Phase.SASL and self.side is Side.SERVER and self.sasl_state is not SaslState.DONE
        ):
            self._send_frame(Frame(FrameType.SASL, 0, SaslOutcome(code=SaslCode.SYS_PERM)))
        elif self._phase is _Phase.AMQP and self.state in (
            ConnectionState.HDR_EXCH,
            ConnectionState.OPEN_RCVD,
        ):
            self.open()  # a close must follow an open (Part 2 §2.4.1)
        if self._phase is _Phase.AMQP and (SENT, Close) in CONNECTION_TRANSITIONS.get(self.state, {}):
            self._advance(SENT, Close)
            self._send_frame(Frame(FrameType.AMQP, 0, Close(error=err)))
        self._phase = _Phase.FINISHED
        self._events.append(ConnectionClosed(error=err, by_peer=False))

    # --- sending -------------------------------------------------------------------------------

    def _send_header(self, protocol: ProtocolId) -> None:
        if protocol is ProtocolId.AMQP:
            self._advance(SENT, ProtocolHeader)
        self._out += ProtocolHeader(protocol).encode()

    def _send_frame(self, frame: Frame) -> None:
        encode_frame(frame, self._out)

    def _send_sasl(self, performative: Performative) -> None:
        if self._phase is not _Phase.SASL:
            raise LocalProtocolError("Not in the SASL phase.")
        self._advance_sasl(SENT, type(performative))
        before = len(self._out)
        write_frame(self._out, FrameType.SASL, 0, performative)
        if len(self._out) - before > MIN_MAX_FRAME_SIZE:
            del self._out[before:]
            raise LocalProtocolError(f"A SASL frame must fit {MIN_MAX_FRAME_SIZE} bytes; chunk the data.")

    # --- operations: SASL ----------------------------------------------------------------------

    def sasl_init(
        self, mechanism: str, initial_response: bytes | None = None, hostname: str | None = None
    ) -> None:
        """Client: pick a mechanism from :class:`~.events.SaslMechanismsReceived`."""
        self.sasl_mechanism = Symbol(mechanism)
        self._send_sasl(
            SaslInit(mechanism=Symbol(mechanism), initial_response=initial_response, hostname=hostname)
        )

    def sasl_response(self, response: bytes) -> None:
        """Client: answer a challenge."""
        self._send_sasl(SaslResponse(response=response))

    def sasl_challenge(self, challenge: bytes) -> None:
        """Server: send a challenge (at most 512 bytes with its frame)."""
        self._send_sasl(SaslChallenge(challenge=challenge))

    def sasl_outcome(self, code: SaslCode, additional_data: bytes | None = None) -> None:
        """Server: end the SASL exchange; anything but OK finishes the connection."""
        self._send_sasl(_OUTCOMES(code, additional_data))
        self._sasl_done(code)

    # --- operations: connection and sessions ---------------------------------------------------

    def open(self) -> None:
        """Send our open (a client may send it right after its header, before the server's)."""
        self._advance(SENT, Open)
        self._out += _open_frame(self.config)

    def close(self, err: Error | None = None) -> None:
        """Send close; the connection is finished when the peer's close arrives."""
        self._advance(SENT, Close)
        self._send_frame(Frame(FrameType.AMQP, 0, Close(error=err)))

    def begin(self) -> int:
        """Begin a session; returns its channel (usable at once: frames queue behind begin)."""
        if self.state is not ConnectionState.OPENED:
            raise LocalProtocolError("Begin a session once the connection is open.")
        session = self._new_session()
        session.begin()
        return session.channel

    def _session(self, channel: int) -> Session:
        session = self.sessions.get(channel)
        if session is None:
            raise LocalProtocolError(f"No session on channel {channel}.")
        return session

    def end(self, channel: int, err: Error | None = None) -> None:
        self._session(channel).end(err)

    # --- operations: links ---------------------------------------------------------------------

    def attach(
        self,
        channel: int,
        *,
        name: str,
        role: Role,
        source: Source | None = None,
        target: Target | None = None,
        snd_settle_mode: SndSettleMode = SndSettleMode.UNSETTLED,
        properties: dict[Symbol, Any] | None = None,
    ) -> LinkId:
        """Attach a link in our ``role``; :class:`~.events.LinkAttached` reports the answer."""
        return self._session(channel).attach(
            name=name,
            role=role,
            source=source,
            target=target,
            snd_settle_mode=snd_settle_mode,
            properties=properties,
        )

    def accept_link(self, link: LinkId, *, properties: dict[Symbol, Any] | None = None) -> None:
        """Answer the peer's attach (``answer_needed``) with ours."""
        self._session(link.channel).accept_link(link, properties=properties)

    def refuse_link(self, link: LinkId, err: Error) -> None:
        """Answer the peer's attach with a refusal carrying ``err``."""
        self._session(link.channel).refuse_link(link, err)

    def detach(self, link: LinkId, err: Error | None = None) -> None:
        self._session(link.channel).detach(link, err)

    def grant_credit(self, link: LinkId, credit: int) -> None:
        """Allow the peer ``credit`` messages on our receiving link."""
        self._session(link.channel).grant_credit(link, credit)

    def send_message(self, link: LinkId, message: Message, *, settled: bool = False) -> None:
        """Queue ``message`` on our sending link; it leaves when the peer grants credit.

        :raises MessageTooLargeError: it is larger than the peer's max-message-size for the link.
        """
        self._session(link.channel).send_message(link, encode_message(message), settled=settled)

    def has_link(self, link: LinkId) -> bool:
        """Whether ``link`` is still one of ours (a detach from the peer forgets it)."""
        session = self.sessions.get(link.channel)
        found = session.links.get(link.handle) if session else None
        return found is not None and found.id == link

    def credit(self, link: LinkId) -> int:
        """The link credit left on one of our links (0 when it is gone)."""
        session = self.sessions.get(link.channel)
        found = session.links.get(link.handle) if session else None
        return found.credit if found is not None and found.id == link else 0

    def settle(self, link: LinkId, delivery_id: int, state: DeliveryState) -> None:
        """Settle a received message with an outcome (accepted, rejected...)."""
        self._session(link.channel).settle(link, delivery_id, state)


def heartbeat_interval(remote_open: Open | None) -> float | None:
    """How often we must send something for the peer's idle-time-out: half of it, at least
    :data:`_MIN_HEARTBEAT` seconds; None when the peer asks for none (or has not opened)."""
    if remote_open is None or not remote_open.idle_time_out:
        return None
    return max(_MIN_HEARTBEAT, remote_open.idle_time_out / 2000)


def next_deadline(
    idle_timeout: float | None, last_received: float, last_sent: float, heartbeat: float | None
) -> float | None:
    """The earlier of the idle timeout (after the last bytes received) and the next heartbeat
    (after the last bytes sent); None for neither."""
    deadline = None if idle_timeout is None else last_received + idle_timeout
    if heartbeat is not None:
        beat = last_sent + heartbeat
        if deadline is None or beat < deadline:
            deadline = beat
    return deadline


def _write_session_frame(out: bytearray, channel: int, performative: Performative, payload: bytes) -> None:
    write_frame(out, FrameType.AMQP, channel, performative, payload)


#: The close that answers the peer's (no error).
_CLOSE = Close()
_OUTCOMES = Templates(lambda code, additional_data: SaslOutcome(code=code, additional_data=additional_data))
