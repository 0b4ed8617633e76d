"""A one-pass AMQP server for the frame sequences the official SDKs send (sans-io), beside the
general :class:`~.connection.Connection`.

Theory of operation
===================
Provisioning over AMQP is one short script: a protocol header (SASL, or AMQP for an X.509
device), sasl-init, the AMQP header, open, begin, two attaches (the device's sender and its
receiver), its flow, the register and operation-status transfers and dispositions, then detach,
end and close. The general machines (connection, session and link, with their state tables and
events) answer every frame the specification allows, and cost about twice MQTT's whole endpoint
for that script. :class:`SdkPath` answers *only* that script, in one pass over the frames:

* each frame is decoded once (:func:`~.frames.frame_at`, the composites' byte readers; an SDK's
  attach from the shape of one read before, :func:`attach_like`), checked against what the
  script allows at that point, and answered at once from the same templates the machines use
  (:class:`~.frames.Templates`, :func:`~.frames.write_frame`), the attach, the answer's transfer
  and its message (:class:`Reply`) from parts made once with the composites' own writers: the
  machines' bytes;
* the state is a handful of numbers: one session, its windows and ids, and a small record per
  link (handle, role, delivery count, credit);
* what needs the application (the SASL mechanism's check, a link's address, a message's answer)
  is a step (:meth:`SdkPath.next`) that the application answers before the next frame is read,
  as the machine pauses for it.

**Anything else hands the connection over** to a general :class:`~.connection.Connection`
(:meth:`SdkPath.handover`): an unusual field (drain, echo, a multi-frame message, a begin that
answers ours), a second session, a heartbeat, a malformed or oversized frame, a refusal of any
kind (the general path then makes it, with its log line and error), a frame out of the script's
order, a transfer followed by more input in the same read (the machine would process those
frames before answering it), a deadline (idle timeout, heartbeat). The fast path hands over
*before* it acts on the frame that deviates, so it has produced the answers of the frames it
handled and nothing else.

The hand-over replays: a fresh server :class:`~.connection.Connection` (sans-io, so
deterministic) is fed the bytes the fast path handled, and answers its events with the
decisions the fast path recorded (the SASL outcome, each link accepted, each message's
settlement and answer). The machine's output for those bytes is dropped: the fast path sent the
same bytes (``tests/service/test_amqp_fastpath.py`` drives both with the SDKs' recorded
sequences and variants, cut at every frame, and compares them). A message whose answer the fast
path could not send itself (no link credit, the peer's window closed, an answer larger than a
frame) is replayed last and that output is kept. The unread rest of the input then goes to the
machine as if it had just arrived, and the application carries on with the general machine.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...errors import AmqpProtocolError, MessageTooLargeError
from .connection import (
    _CLOSE,
    _OUTCOMES,
    Connection,
    ConnectionConfig,
    _mechanisms_frame,
    _open_frame,
    heartbeat_interval,
    next_deadline,
)
from .events import (
    ConnectionOpened,
    Event,
    LinkAttached,
    LinkId,
    MessageReceived,
    SaslInitReceived,
)
from .frames import (
    MIN_MAX_FRAME_SIZE,
    FrameType,
    ProtocolHeader,
    ProtocolId,
    Templates,
    frame_at,
    write_frame,
)
from .performatives import (
    Accepted,
    Attach,
    Begin,
    Close,
    DeliveryState,
    Detach,
    Disposition,
    End,
    Error,
    ErrorCondition,
    Flow,
    Message,
    Open,
    Role,
    SaslCode,
    SaslInit,
    Transfer,
    decode_message,
)
from .session import _ACCEPTED, _BEGINS, _FLOWS, _TRANSFER_FRAME_BOUND
from .shapes import (
    Reply,
    attach_and_termini,
    open_like,
    sasl_init_like,
    transfer_like,
    write_attach,
    write_transfer,
)
from .state import Side
from .types import Symbol

__all__ = [
    "HEADER",
    "OPENED",
    "AttachStep",
    "Reply",
    "ClosedStep",
    "MessageStep",
    "SaslInitStep",
    "SdkPath",
    "deliver",
]

_MOD = 1 << 32
_SASL_HEADER = ProtocolHeader(ProtocolId.SASL).encode()
_ATTACH_DESCRIPTOR = bytes((0x00, 0x53, 0x12))
_OPEN_DESCRIPTOR = bytes((0x00, 0x53, 0x10))
_TRANSFER_DESCRIPTOR = bytes((0x00, 0x53, 0x14))
_SASL_INIT_DESCRIPTOR = bytes((0x00, 0x53, 0x41))
_SASL_CHANNEL_0 = bytes((2, 1, 0, 0))  # DOFF 2, a SASL frame, channel 0
_CHANNEL_0 = bytes((2, 0, 0, 0))  # DOFF 2, an AMQP frame, channel 0
_AMQP_HEADER = ProtocolHeader(ProtocolId.AMQP).encode()

# What the script expects next (``SdkPath._expect``).
_HEADER, _SASL_INIT, _AMQP_HEADER_AFTER_SASL, _OPEN, _FRAMES, _DONE = range(6)


class _Handover(Exception):
    """Internal: the input deviates from the script."""


#: A step: a protocol header came in (the guard's first request).
HEADER = "header"
#: A step: the connection is open (both opens exchanged).
OPENED = "opened"


@dataclass(frozen=True, slots=True)
class SaslInitStep:
    """The device chose ``mechanism``: answer :meth:`SdkPath.sasl_ok`, or hand over to refuse."""

    mechanism: Symbol
    initial_response: bytes | None


@dataclass(frozen=True, slots=True)
class AttachStep:
    """The device attached a link (``role`` is ours): :meth:`SdkPath.accept_link`, or hand over."""

    link: LinkId
    role: Role
    remote: Attach


@dataclass(frozen=True, slots=True)
class MessageStep:
    """A complete message on our receiving ``link``: answer with :meth:`SdkPath.answer`."""

    link: LinkId
    delivery_id: int
    message: Message
    settled: bool


@dataclass(frozen=True, slots=True)
class ClosedStep:
    """The device closed the connection (``error`` is its close's, or None; None also when the
    stream ended)."""

    close: Close | None


Step = str | SaslInitStep | AttachStep | MessageStep | ClosedStep


class _Link:
    __slots__ = ("credit", "delivery_count", "handle", "name", "remote", "remote_handle", "role", "termini")

    def __init__(self, handle: int, remote: Attach, role: Role) -> None:
        self.handle = handle
        self.name = remote.name
        self.remote = remote
        self.remote_handle = remote.handle
        self.role = role
        self.credit = 0
        self.delivery_count = (remote.initial_delivery_count or 0) if role is Role.RECEIVER else 0
        #: The encoding of the answering attach's source and target, when known (:mod:`.shapes`).
        self.termini: bytes | None = None


@dataclass(frozen=True, slots=True)
class _Answer:
    """What the application did with one message (replayed on a hand-over)."""

    state: DeliveryState | None
    sender: LinkId | None
    reply: Reply | None


class SdkPath:
    """The fast path of one server connection; see the module docstring. ``credit`` is the link
    credit the application grants a device's sending link (and tops up below half of it)."""

    def __init__(self, config: ConnectionConfig, *, credit: int, clock: Callable[[], float]) -> None:
        self.config = config
        self.credit = credit
        self._clock = clock
        self._in = bytearray()
        self._out = bytearray()
        self._expect = _HEADER
        self.sasl_mechanism: Symbol | None = None
        self.remote_open: Open | None = None
        self.finished = False
        #: The answers the hand-over could not send (larger than the device's link takes: the
        #: link is detached), for the application's log line.
        self.unsent: list[MessageTooLargeError] = []
        #: Every read (kept for a hand-over), and how many of their bytes were handled
        #: (answered), then how many the step awaiting the application holds.
        self._received: list[bytes] = []
        self._handled = 0
        self._waiting = 0
        self._answers: list[_Answer] = []
        self._step: Step | None = None
        # The one session: the peer's channel (None: none begun, -1: ended) and its numbers.
        self._channel: int | None = None
        self._next_incoming_id = 0
        self._incoming_window = config.sessions.incoming_window
        self._next_outgoing_id = 0
        self._remote_incoming_window = 0
        self._remote_handle_max = 0
        self._next_delivery_id = 0
        self._links: dict[int, _Link] = {}
        self._by_remote: dict[int, _Link] = {}
        self._pending_link: _Link | None = None
        #: The device's address as SASL PLAIN named it (its links name it too), in UTF-8.
        self._address: bytes | None = None
        now = clock()
        self.last_received = now
        self.last_sent = now

    # --- what the I/O loop asks (the general machine's names) ------------------------------------

    @property
    def opened(self) -> bool:
        return self.remote_open is not None and not self.finished

    @property
    def pending_input(self) -> int:
        return len(self._in)

    def next_deadline(self) -> float | None:
        """The machine's :meth:`~.connection.Connection.next_deadline` in the same state."""
        if self.finished:
            return None
        heartbeat = heartbeat_interval(self.remote_open)
        return next_deadline(self.config.idle_timeout, self.last_received, self.last_sent, heartbeat)

    def receive(self, data: bytes) -> None:
        """Bytes from the peer (not ``b""``: the stream's end is :meth:`ended`)."""
        self.last_received = self._clock()
        self._received.append(data)
        self._in += data

    def ended(self) -> ClosedStep:
        """The stream ended: the connection is over (as the machine's ``feed_bytes(b"")``)."""
        self.finished = True
        return ClosedStep(None)

    def _write(self, performative: Any, payload: bytes = b"") -> None:
        """Queue one frame on our channel (0: the one session's)."""
        write_frame(self._out, FrameType.AMQP, 0, performative, payload)

    def get_outbound_data(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        if data:
            self.last_sent = self._clock()
        return data

    # --- the script ---------------------------------------------------------------------------

    def next(self) -> Step | None | bool:
        """The next step for the application; None when more bytes are needed (or the
        connection is finished); False when the input leaves the script: :meth:`handover`."""
        if self._step is not None:
            raise RuntimeError("The previous step is not answered.")
        try:
            while self._in and not self.finished:
                expect = self._expect
                if expect == _FRAMES:
                    code = self._in[10] if len(self._in) > 10 else 0  # the descriptor's, if small
                    if code == 0x12:
                        attach = self._known_attach()
                        if attach is not None:
                            return self._attach(*attach)
                    elif code == 0x14:
                        transfer = self._known_transfer()
                        if transfer is not None:
                            return self._transfer(*transfer)
                    found = frame_at(self._in, self.config.max_frame_size)
                    if found is None:
                        return None
                    frame, size = found
                    if frame.type is not FrameType.AMQP:
                        return False
                    step = self._frame(frame.channel, frame.performative, frame.payload, size)
                    if step is not None:
                        return step
                elif expect == _HEADER or expect == _AMQP_HEADER_AFTER_SASL:
                    return self._header()
                else:
                    return self._opening(expect)
        except (_Handover, AmqpProtocolError):
            return False
        return None

    def _opening(self, expect: int) -> Step | None:
        """sasl-init, or the open."""
        if expect == _OPEN:
            known = self._known(_OPEN_DESCRIPTOR)
            performative: Any = None if known is None else open_like(known)
            if performative is not None and known is not None:
                return self._open(performative, len(known))
        else:
            known = self._known(_SASL_INIT_DESCRIPTOR, _SASL_CHANNEL_0)
            performative = None if known is None else sasl_init_like(known)
            if performative is not None and known is not None:
                step = SaslInitStep(performative.mechanism, performative.initial_response)
                return self._wait(len(known), step)
        found = frame_at(self._in, self.config.max_frame_size)
        if found is None:
            return None
        frame, size = found
        performative = frame.performative
        if expect == _SASL_INIT:
            if frame.type is not FrameType.SASL or type(performative) is not SaslInit:
                raise _Handover
            assert isinstance(performative, SaslInit)
            return self._wait(size, SaslInitStep(performative.mechanism, performative.initial_response))
        if frame.type is not FrameType.AMQP or type(performative) is not Open:
            raise _Handover
        return self._open(performative, size)

    def _open(self, performative: Open, size: int) -> Step:
        if performative.max_frame_size < MIN_MAX_FRAME_SIZE:
            raise _Handover
        self.remote_open = performative
        self._out += _open_frame(self.config)
        self._expect = _FRAMES
        self._done(size)
        return OPENED

    def _done(self, size: int) -> None:
        self._handled += size
        del self._in[:size]

    def _wait(self, size: int, step: Step) -> Step:
        """A frame that the application answers: kept aside until it has."""
        del self._in[:size]
        self._waiting = size
        self._step = step
        return step

    def _answered(self) -> None:
        self._handled += self._waiting
        self._waiting = 0
        self._step = None

    def _header(self) -> Step | None:
        expected = _AMQP_HEADER if self._expect == _AMQP_HEADER_AFTER_SASL else None
        head = bytes(self._in[:8])
        if len(head) < 8:
            if (expected or _SASL_HEADER).startswith(head) or (
                expected is None and _AMQP_HEADER.startswith(head)
            ):
                return None
            raise _Handover
        if expected is not None:
            if head != expected:
                raise _Handover
            self._out += _AMQP_HEADER
            self._expect = _OPEN
        elif head == _SASL_HEADER and self.config.sasl_mechanisms:
            self._out += _SASL_HEADER
            self._out += _mechanisms_frame(self.config.sasl_mechanisms)
            self._expect = _SASL_INIT
        elif head == _AMQP_HEADER and self.config.allow_no_sasl:
            self._out += _AMQP_HEADER
            self._expect = _OPEN
        else:
            raise _Handover
        self._done(8)
        return HEADER

    def _frame(self, channel: int, performative: Any, payload: bytes, size: int) -> Step | None:
        """One AMQP frame after the open; a step, or None when it needed no application."""
        kind = type(performative)
        if kind is Close:
            self._out += _CLOSE_FRAME()
            self.finished = True
            self._done(size)
            return ClosedStep(performative)
        if kind is Begin:
            if (
                self._channel is not None
                or performative.remote_channel is not None
                or channel > self.config.channel_max
            ):
                raise _Handover
            self._channel = channel
            self._next_incoming_id = performative.next_outgoing_id
            self._remote_incoming_window = performative.incoming_window
            self._remote_handle_max = performative.handle_max
            limits = self.config.sessions
            self._out += _BEGIN_FRAMES(channel, 0, self._incoming_window, limits.handle_max)
            self._done(size)
            return None
        if performative is None or channel != self._channel:
            raise _Handover  # a heartbeat, a frame before the open, or on a channel not ours
        if kind is Attach:
            return self._attach(performative, size)
        if kind is Flow:
            self._flow(performative)
        elif kind is Transfer:
            return self._transfer(performative, payload, size)
        elif kind is Disposition:
            pass  # the machine keeps track of our unsettled deliveries; nothing to answer
        elif kind is Detach:
            link = self._by_remote.get(performative.handle)
            if link is None:
                raise _Handover
            self._write(Detach(handle=link.handle, closed=performative.closed))
            del self._links[link.handle], self._by_remote[link.remote_handle]
        elif kind is End:
            self._write(_END)
            self._channel = -1  # unmapped: any frame on it now goes the general way
            self._links.clear()
            self._by_remote.clear()
        else:
            raise _Handover
        self._done(size)
        return None

    # --- links ---------------------------------------------------------------------------------

    def _known(self, descriptor: bytes, head: bytes = _CHANNEL_0) -> bytes | None:
        """The whole frame at the start of the input when it is complete, within our limit, on
        channel 0 with no extended header, and its performative's descriptor is ``descriptor``
        (read then by its shape, :mod:`.shapes`); else None (read it through
        :func:`~.frames.frame_at`)."""
        buf = self._in
        if len(buf) < 14 or buf[8:11] != descriptor or buf[4:8] != head:
            return None
        size = int.from_bytes(buf[:4], "big")
        if size < 14 or size > len(buf) or size > self.config.max_frame_size:
            return None  # shorter than its own header and descriptor: malformed, the decoder says so
        return bytes(buf[:size])

    def _known_attach(self) -> tuple[Attach, int, bytes | None] | None:
        """The attach at the start of the input, read through :func:`attach_and_termini`
        (with its termini's echo); None when it is not one that can be."""
        if self._address is None or self._channel != 0:
            return None
        frame = self._known(_ATTACH_DESCRIPTOR)
        found = None if frame is None else attach_and_termini(frame, self._address)
        return None if found is None or frame is None else (found[0], len(frame), found[1])

    def _known_transfer(self) -> tuple[Transfer, bytes, int] | None:
        """The transfer at the start of the input and its payload, read through
        :func:`transfer_like`; None when it is not one that can be."""
        if self._channel != 0:
            return None
        frame = self._known(_TRANSFER_DESCRIPTOR)
        found = None if frame is None else transfer_like(frame)
        return None if found is None or frame is None else (found[0], found[1], len(frame))

    def _attach(self, attach: Attach, size: int, termini: bytes | None = None) -> Step:
        limits = self.config.sessions
        if attach.handle > limits.handle_max or attach.handle in self._by_remote:
            raise _Handover
        limit = min(limits.handle_max, self._remote_handle_max)
        handle = next((h for h in range(limit + 1) if h not in self._links), None)
        if handle is None:
            raise _Handover
        role = Role.RECEIVER if attach.role is Role.SENDER else Role.SENDER
        link = _Link(handle, attach, role)
        link.termini = termini
        self._pending_link = link
        return self._wait(size, AttachStep(LinkId(0, handle), role, attach))

    def accept_link(self) -> None:
        """Answer the attach of the last :class:`AttachStep` with ours (and the receiving
        link's credit)."""
        link = self._pending_link
        assert link is not None
        self._links[link.handle] = link
        self._by_remote[link.remote_handle] = link
        sender = link.role is Role.SENDER
        write_attach(
            self._out, link, 0 if sender else None, self.config.sessions.max_message_size, link.termini
        )
        if not sender:
            link.credit = self.credit
            self._link_flow(link)
        self._answered()

    def _link_flow(self, link: _Link) -> None:
        self._out += _FLOW_FRAMES(
            self._next_incoming_id,
            self._incoming_window,
            self._next_outgoing_id,
            link.handle,
            link.delivery_count,
            link.credit,
            None,
            False,
        )

    def _flow(self, flow: Flow) -> None:
        link = None
        if flow.handle is not None:
            link = self._by_remote.get(flow.handle)
            if link is None:
                raise _Handover
        if flow.drain or flow.echo:
            raise _Handover
        base = flow.next_incoming_id if flow.next_incoming_id is not None else 0
        self._remote_incoming_window = max(0, (base + flow.incoming_window - self._next_outgoing_id) % _MOD)
        if link is not None and link.role is Role.SENDER and flow.link_credit is not None:
            count = flow.delivery_count if flow.delivery_count is not None else 0
            credit = (count + flow.link_credit - link.delivery_count) % _MOD
            link.credit = 0 if credit >= 1 << 31 else credit

    # --- messages ------------------------------------------------------------------------------

    def _transfer(self, transfer: Transfer, payload: bytes, size: int) -> Step:
        link = self._by_remote.get(transfer.handle)
        if (
            size != len(self._in)  # more input behind it: the machine would read that first
            or link is None
            or link.role is not Role.RECEIVER
            or self._incoming_window - 1 <= self.config.sessions.incoming_window // 2
            or transfer.more
            or transfer.aborted
            or transfer.delivery_id is None
            or transfer.delivery_tag is None
            or link.credit <= 0
            or len(payload) > self.config.sessions.max_message_size
        ):
            raise _Handover
        message = decode_message(payload)  # a malformed message: the machine rejects it
        self._incoming_window -= 1
        self._next_incoming_id = (self._next_incoming_id + 1) % _MOD
        link.credit -= 1
        link.delivery_count = (link.delivery_count + 1) % _MOD
        step = MessageStep(LinkId(0, link.handle), transfer.delivery_id, message, bool(transfer.settled))
        return self._wait(size, step)

    def answer(self, state: DeliveryState | None, sender: LinkId | None, message: Reply | None) -> bool:
        """Answer the last :class:`MessageStep`: settle it with ``state`` (None: the device had
        settled it), send ``message`` on our ``sender`` link, top the credit up. False when the
        fast path cannot send the answer itself: hand over (the machine then queues it)."""
        step = self._step
        assert isinstance(step, MessageStep)
        self._answers.append(_Answer(state, sender, message))
        payload = b""
        out_link = None
        if message is not None and sender is not None:
            out_link = self._links.get(sender.handle)
            payload = message.payload()
            remote = self.remote_open
            assert remote is not None
            limit = out_link.remote.max_message_size if out_link is not None else None
            if (
                out_link is None
                or out_link.role is not Role.SENDER
                or out_link.credit <= 0
                or (limit and len(payload) > limit)
                or len(payload) > remote.max_frame_size - _TRANSFER_FRAME_BOUND
                or self._remote_incoming_window < 1
            ):
                return False
        if state is not None:
            if type(state) is Accepted:
                self._out += _ACCEPTED_FRAMES(step.delivery_id, _ACCEPTED_STATE)
            else:
                disposition = Disposition(
                    role=Role.RECEIVER, first=step.delivery_id, settled=True, state=state
                )
                self._write(disposition)
        if out_link is not None:
            delivery_id = self._next_delivery_id
            self._next_delivery_id = (delivery_id + 1) % _MOD
            out_link.credit -= 1
            out_link.delivery_count = (out_link.delivery_count + 1) % _MOD
            write_transfer(self._out, out_link.handle, delivery_id, payload)
            self._next_outgoing_id = (self._next_outgoing_id + 1) % _MOD
            self._remote_incoming_window -= 1
        link = self._links[step.link.handle]
        if link.credit < self.credit // 2:
            link.credit = self.credit
            self._link_flow(link)
        self._answered()
        return True

    def sasl_ok(self) -> None:
        """Answer the :class:`SaslInitStep` with the *ok* outcome."""
        step = self._step
        assert isinstance(step, SaslInitStep)
        self.sasl_mechanism = step.mechanism
        if step.mechanism == "PLAIN" and step.initial_response:
            self._address = step.initial_response.split(b"\x00")[1]  # as the endpoint read it
        self._out += _OUTCOME_FRAMES(SaslCode.OK, None)
        self._expect = _AMQP_HEADER_AFTER_SASL
        self._answered()

    # --- the hand-over -------------------------------------------------------------------------

    def handover(self) -> tuple[Connection, list[Event]]:
        """A general connection in the state this one reached, holding its unsent output, and
        the events of the input it has not handled (see the module docstring)."""
        machine = Connection(Side.SERVER, self.config, clock=self._clock)
        answers = deque(self._answers)
        received = b"".join(self._received)
        handled, waiting = self._handled, self._waiting
        if handled:
            _replay(machine, machine.feed_bytes(received[:handled]), answers, self.credit, self.unsent)
            machine.get_outbound_data()  # the fast path's answers: already sent, or in self._out
        kept = b""
        if waiting and answers:  # a message answered but not sent: the machine sends it
            _replay(
                machine,
                machine.feed_bytes(received[handled : handled + waiting]),
                answers,
                self.credit,
                self.unsent,
            )
            kept = machine.get_outbound_data()
            handled += waiting
        machine._out += self._out
        machine._out += kept
        machine._last_received = self.last_received
        machine._last_sent = self.last_sent
        rest = received[handled:]  # a step the application refused, and the rest
        assert rest.endswith(self._in)
        self._in.clear()
        self._out.clear()
        self.finished = True
        events: list[Event] = []
        if rest:
            machine._in += rest
            events = machine.poll_events()
        return machine, events


def _replay(
    machine: Connection,
    events: list[Event],
    answers: deque[_Answer],
    credit: int,
    unsent: list[MessageTooLargeError],
) -> None:
    """Answer the machine's events as the application answered the fast path's steps (an
    answer too large for the device's link goes to ``unsent``)."""
    while events:
        for event in events:
            kind = type(event)
            if kind is SaslInitReceived:
                machine.sasl_outcome(SaslCode.OK)
            elif kind is ConnectionOpened:
                machine.open()
            elif kind is LinkAttached:
                assert isinstance(event, LinkAttached)
                machine.accept_link(event.link)
                if event.role is Role.RECEIVER:
                    machine.grant_credit(event.link, credit)
            elif kind is MessageReceived:
                assert isinstance(event, MessageReceived)
                answer = answers.popleft()  # as the application delivers it
                too_large = deliver(machine, event, answer.state, answer.sender, answer.reply, credit)
                if too_large is not None:
                    unsent.append(too_large)
        events = machine.poll_events()


def deliver(
    machine: Connection,
    event: MessageReceived,
    state: DeliveryState | None,
    sender: LinkId | None,
    reply: Reply | None,
    credit: int,
) -> MessageTooLargeError | None:
    """Settle a request, send its answer and top its link's credit up, on the links that are
    still there (the device may have detached either in the same read as its request: the
    machine read that detach before the request was answered). An answer larger than the
    device's receiving link takes is not sent: that link is detached with
    ``amqp:link:message-size-exceeded``, and the error is returned (for the log line)."""
    too_large = None
    if state is not None and machine.has_link(event.link):
        machine.settle(event.link, event.delivery_id, state)
    if sender is not None and reply is not None and machine.has_link(sender):
        try:
            machine.send_message(sender, reply.message())
        except MessageTooLargeError as exc:
            too_large = exc
            error = Error(condition=Symbol(ErrorCondition.MESSAGE_SIZE_EXCEEDED), description=exc.message)
            machine.detach(sender, error)
    if machine.has_link(event.link) and machine.credit(event.link) < credit // 2:
        machine.grant_credit(event.link, credit)
    return too_large


_END = End()


def _framed(make: Callable[..., Any], frame_type: FrameType = FrameType.AMQP) -> Templates[bytes]:
    """The frames (channel 0) of one call site's performatives: ``frames(*values)`` is the
    encoding of ``make(*values)`` (a :class:`~.frames.Templates` or a constant's maker),
    written once per tuple of values rather than looked up by the performative each time."""

    def frame(*values: Any) -> bytes:
        buffer = bytearray()
        write_frame(buffer, frame_type, 0, make(*values))
        return bytes(buffer)

    return Templates(frame)


_ACCEPTED_STATE = Accepted()
_CLOSE_FRAME = _framed(lambda: _CLOSE)
_BEGIN_FRAMES = _framed(_BEGINS)
_FLOW_FRAMES = _framed(_FLOWS)
_ACCEPTED_FRAMES = _framed(_ACCEPTED)
_OUTCOME_FRAMES = _framed(_OUTCOMES, FrameType.SASL)
