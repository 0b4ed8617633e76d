"""AMQP 1.0 sessions and links (Part 2 §2.5, §2.6), sans-io; driven by :mod:`.connection`.

Theory of operation
===================
A :class:`Session` lives on one channel pair (ours, the peer's). It numbers transfers
(``next-outgoing-id`` / ``next-incoming-id``) and keeps both *session windows*: we accept at
most ``incoming_window`` transfers before we send a flow that opens it again (the window is
re-opened as soon as half of it is used: messages are consumed as they complete), and we
send a transfer only while the peer's window is open. A peer that sends past our window
ends the session with ``amqp:session:window-violation``.

A :class:`Link` is one attached link endpoint. A *receiving* link counts link credit: a
delivery (the first transfer of a message) without credit detaches the link with
``amqp:link:transfer-limit-exceeded``; a message bigger than the link's ``max_message_size``
detaches it with ``amqp:link:message-size-exceeded``; transfers with ``more`` are collected up
to that size, then decoded into a :class:`~.performatives.Message`. A *sending* link queues
messages and sends them only when the peer has given credit (``delivery-count`` +
``link-credit`` − our ``delivery-count``) and the session window allows every frame of the
message; big messages are split across transfer frames of the peer's maximum frame size.

Dispositions name ranges of delivery ids; they are applied to the deliveries we track, never
by walking the range, so a ``first=0, last=2**32-1`` costs what our unsettled set costs.

Errors: a violation that concerns one link detaches that link with the error; one that
concerns the session ends it (``amqp:session:unattached-handle``, ``handle-in-use``...); one
that concerns the connection (a handle above ``handle-max``) is raised as
:class:`~provisiond.errors.AmqpProtocolError` for the connection to close with.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import AmqpProtocolError, LocalProtocolError, MessageTooLargeError
from .events import (
    CreditGranted,
    DeliveryUpdated,
    Event,
    LinkAttached,
    LinkDetached,
    LinkId,
    MessageReceived,
    SessionEnded,
)
from .frames import Templates, frame_size
from .performatives import (
    Accepted,
    Attach,
    Begin,
    DeliveryState,
    Detach,
    Disposition,
    End,
    Error,
    ErrorCondition,
    Flow,
    Performative,
    Rejected,
    Role,
    SndSettleMode,
    Source,
    Target,
    Transfer,
    decode_message,
)
from .state import (
    LINK_TRANSITIONS,
    RECEIVED,
    SENT,
    SESSION_TRANSITIONS,
    Direction,
    LinkState,
    SessionState,
    transition,
)
from .types import Symbol

__all__ = ["Link", "Session", "SessionLimits"]

logger = logging.getLogger("provisiond.protocol.amqp")

_MOD = 1 << 32
#: More than the frame of a message's first transfer takes besides the payload (header,
#: handle, delivery id and 4-byte tag, format, settled, more: 39 bytes at most).
_TRANSFER_FRAME_BOUND = 64
#: Our outgoing window: we never hold transfers back on our side.
_OUTGOING_WINDOW = 0x7FFF_FFFF

SendFrame = Callable[[int, Performative, bytes], None]


def error(condition: str, description: str) -> Error:
    return Error(condition=Symbol(condition), description=description)


@dataclass(frozen=True, kw_only=True)
class SessionLimits:
    """What we accept on a session: transfers in flight, links, message size."""

    incoming_window: int = 64
    handle_max: int = 7
    max_message_size: int = 256 * 1024


@dataclass
class Link:
    """One link endpoint. ``role`` is ours; ``handle`` ours, ``remote_handle`` the peer's."""

    id: LinkId
    name: str
    role: Role
    state: LinkState = LinkState.DETACHED
    remote_handle: int | None = None
    remote: Attach | None = None
    max_message_size: int = 0
    delivery_count: int = 0
    credit: int = 0
    # Sending side: (payload, settled) of the messages waiting for credit.
    pending: deque[tuple[bytes, bool]] = field(default_factory=deque)
    # Receiving side: the message being collected across transfers.
    incoming: bytearray | None = None
    incoming_id: int = 0
    incoming_tag: bytes = b""
    incoming_settled: bool = False

    def advance(self, direction: Direction, what: type) -> None:
        self.state = transition(LINK_TRANSITIONS, self.state, direction, what, "link")


class Session:
    """One session; the connection hands it the frames of its channel and gives it a way to send."""

    def __init__(
        self,
        channel: int,
        *,
        limits: SessionLimits,
        send: SendFrame,
        events: list[Event],
        remote_max_frame_size: int,
    ) -> None:
        self.channel = channel
        self.remote_channel: int | None = None
        self.state = SessionState.UNMAPPED
        self.limits = limits
        self._send_frame = send
        self._events = events
        #: The peer's max-frame-size (a session begins once the peer's open is in).
        self.remote_max_frame_size = remote_max_frame_size
        self.next_outgoing_id = 0
        self.next_incoming_id = 0
        self.incoming_window = limits.incoming_window
        self.remote_incoming_window = 0
        self.remote_handle_max = 0xFFFF_FFFF
        self.links: dict[int, Link] = {}
        self.by_remote_handle: dict[int, Link] = {}
        self._next_delivery_id = 0
        self._sent_unsettled: dict[int, Link] = {}
        #: Set when the peer attaches a link first; cleared when no link awaits our answer (so
        #: that the question, asked before every frame, is mostly a flag).
        self.attach_received = False

    # --- begin / end ---------------------------------------------------------------------------

    def _send(self, performative: Performative, payload: bytes = b"") -> None:
        self._send_frame(self.channel, performative, payload)

    def begin(self, remote: Begin | None = None) -> None:
        """Send our begin (the answer to ``remote`` when the peer began)."""
        self.state = transition(SESSION_TRANSITIONS, self.state, SENT, Begin, "session")
        self._send(
            _BEGINS(
                self.remote_channel if remote is not None else None,
                self.next_outgoing_id,
                self.incoming_window,
                self.limits.handle_max,
            )
        )

    def on_begin(self, remote_channel: int, begin: Begin) -> None:
        self.state = transition(SESSION_TRANSITIONS, self.state, RECEIVED, Begin, "session")
        self.remote_channel = remote_channel
        self.next_incoming_id = begin.next_outgoing_id
        self.remote_incoming_window = begin.incoming_window
        self.remote_handle_max = begin.handle_max

    def end(self, err: Error | None = None) -> None:
        """Send end; links go with it."""
        self.state = transition(SESSION_TRANSITIONS, self.state, SENT, End, "session")
        self._send(End(error=err))
        if err is not None:
            self._events.append(SessionEnded(channel=self.channel, error=err, by_peer=False))

    def fail(self, condition: str, description: str) -> None:
        """End the session because the peer broke a session rule."""
        logger.debug("ending AMQP session %d: %s (%s)", self.channel, description, condition)
        self.end(error(condition, description))

    @property
    def awaiting_answer(self) -> bool:
        """Whether the peer attached a link the application has not answered yet."""
        if not self.attach_received:
            return False
        self.attach_received = any(link.state is LinkState.ATTACH_RCVD for link in self.links.values())
        return self.attach_received

    @property
    def live(self) -> bool:
        """Whether the peer's session frames are still processed (not ending)."""
        return self.state is SessionState.MAPPED

    def on_frame(self, performative: Performative, payload: bytes) -> None:
        kind = type(performative)
        if kind is End:
            self._on_end(performative)  # type: ignore[arg-type]
        elif self.state is not SessionState.MAPPED:
            return  # we are ending the session: discard until the peer's end
        elif kind is Transfer:
            self._on_transfer(performative, payload)  # type: ignore[arg-type]
        else:
            handler = _HANDLERS.get(kind)
            if handler is None:
                raise AmqpProtocolError(
                    f"A {kind.__name__} is not a session frame.", condition="amqp:illegal-state"
                )
            handler(self, performative)

    def _on_end(self, end: End) -> None:
        answer = self.state is SessionState.MAPPED
        self.state = transition(SESSION_TRANSITIONS, self.state, RECEIVED, End, "session")
        if answer:
            self.state = transition(SESSION_TRANSITIONS, self.state, SENT, End, "session")
            self._send(End())
            self._events.append(SessionEnded(channel=self.channel, error=end.error, by_peer=True))

    # --- links ---------------------------------------------------------------------------------

    def _free_handle(self) -> int | None:
        limit = min(self.limits.handle_max, self.remote_handle_max)
        return next((h for h in range(limit + 1) if h not in self.links), None)

    def attach(
        self,
        *,
        name: str,
        role: Role,
        source: Source | None,
        target: Target | None,
        snd_settle_mode: SndSettleMode = SndSettleMode.UNSETTLED,
        properties: dict[Symbol, object] | None = None,
    ) -> LinkId:
        if self.state not in (SessionState.BEGIN_SENT, SessionState.MAPPED):
            raise LocalProtocolError(f"Session {self.channel} is {self.state.value}.")
        handle = self._free_handle()
        if handle is None:
            raise LocalProtocolError(f"Session {self.channel} has no free link handle.")
        link = Link(LinkId(self.channel, handle), name, role, max_message_size=self.limits.max_message_size)
        self._send_attach(link, source, target, snd_settle_mode, properties)
        self.links[handle] = link
        return link.id

    def _send_attach(
        self,
        link: Link,
        source: Source | None,
        target: Target | None,
        snd_settle_mode: SndSettleMode,
        properties: dict[Symbol, object] | None,
    ) -> None:
        link.advance(SENT, Attach)
        self._send(
            Attach(
                name=link.name,
                handle=link.id.handle,
                role=link.role,
                snd_settle_mode=snd_settle_mode,
                source=source,
                target=target,
                initial_delivery_count=0 if link.role is Role.SENDER else None,
                # Both roles: the C SDK (uAMQP) logs an error for an attach without it.
                max_message_size=link.max_message_size,
                properties=properties,
            )
        )

    def _on_attach(self, attach: Attach) -> None:
        if attach.handle > self.limits.handle_max:
            raise AmqpProtocolError(
                f"Attach with handle {attach.handle} above handle-max {self.limits.handle_max}.",
                condition="amqp:connection:framing-error",
            )
        if attach.handle in self.by_remote_handle:
            self.fail(ErrorCondition.HANDLE_IN_USE, f"Handle {attach.handle} is already attached.")
            return
        ours = next(
            (
                link
                for link in self.links.values()
                if link.state is LinkState.ATTACH_SENT
                and link.name == attach.name
                and link.role is not attach.role
            ),
            None,
        )
        if ours is None:
            handle = self._free_handle()
            if handle is None:
                self.fail(ErrorCondition.RESOURCE_LIMIT_EXCEEDED, "No free link handle on this session.")
                return
            role = Role.RECEIVER if attach.role is Role.SENDER else Role.SENDER
            ours = Link(
                LinkId(self.channel, handle), attach.name, role, max_message_size=self.limits.max_message_size
            )
            self.links[handle] = ours
        answer_needed = ours.state is LinkState.DETACHED
        ours.advance(RECEIVED, Attach)
        self.attach_received = True
        ours.remote_handle = attach.handle
        ours.remote = attach
        if ours.role is Role.RECEIVER:
            ours.delivery_count = attach.initial_delivery_count or 0
        self.by_remote_handle[attach.handle] = ours
        self._events.append(
            LinkAttached(link=ours.id, role=ours.role, remote=attach, answer_needed=answer_needed)
        )

    def link(self, link_id: LinkId) -> Link:
        link = self.links.get(link_id.handle)
        if link is None or link.id != link_id:
            raise LocalProtocolError(f"No link {link_id}.")
        return link

    def accept_link(self, link_id: LinkId, *, properties: dict[Symbol, object] | None = None) -> None:
        """Answer the peer's attach with ours, echoing its terminus addresses."""
        link = self.link(link_id)
        remote = link.remote
        assert remote is not None
        self._send_attach(
            link,
            remote.source if isinstance(remote.source, Source) else None,
            remote.target if isinstance(remote.target, Target) else None,
            remote.snd_settle_mode,
            properties,
        )

    def refuse_link(self, link_id: LinkId, err: Error) -> None:
        """Attach with a null terminus on our side, then detach with ``err`` (Part 2 §2.6.3)."""
        link = self.link(link_id)
        remote = link.remote
        assert remote is not None
        source = remote.source if link.role is Role.RECEIVER and isinstance(remote.source, Source) else None
        target = remote.target if link.role is Role.SENDER and isinstance(remote.target, Target) else None
        self._send_attach(link, source, target, remote.snd_settle_mode, None)
        self.detach(link_id, err)

    def detach(self, link_id: LinkId, err: Error | None = None) -> None:
        link = self.link(link_id)
        link.advance(SENT, Detach)
        self._send(Detach(handle=link.id.handle, closed=True, error=err))
        if link.state is LinkState.GONE:
            self._forget(link)
        if err is not None:
            logger.debug("detaching AMQP link %r: %s (%s)", link.name, err.description, err.condition)
            self._events.append(LinkDetached(link=link.id, error=err, by_peer=False))

    def _forget(self, link: Link) -> None:
        self.links.pop(link.id.handle, None)
        if link.remote_handle is not None:
            self.by_remote_handle.pop(link.remote_handle, None)
        for delivery_id in [d for d, owner in self._sent_unsettled.items() if owner is link]:
            del self._sent_unsettled[delivery_id]

    def _on_detach(self, detach: Detach) -> None:
        link = self.by_remote_handle.get(detach.handle)
        if link is None:
            self.fail(
                ErrorCondition.UNATTACHED_HANDLE, f"Detach of handle {detach.handle}, which is not attached."
            )
            return
        answer = link.state is LinkState.ATTACHED
        link.advance(RECEIVED, Detach)
        if answer:
            link.advance(SENT, Detach)
            self._send(Detach(handle=link.id.handle, closed=detach.closed))
            self._events.append(LinkDetached(link=link.id, error=detach.error, by_peer=True))
        self._forget(link)

    # --- flow control --------------------------------------------------------------------------

    def _flow(self, link: Link | None = None, *, echo: bool = False) -> None:
        if link is None:
            flow = _FLOWS(
                self.next_incoming_id,
                self.incoming_window,
                self.next_outgoing_id,
                None,
                None,
                None,
                None,
                echo,
            )
        else:
            flow = _FLOWS(
                self.next_incoming_id,
                self.incoming_window,
                self.next_outgoing_id,
                link.id.handle,
                link.delivery_count,
                link.credit,
                len(link.pending) if link.role is Role.SENDER else None,
                echo,
            )
        self._send(flow)

    def grant_credit(self, link_id: LinkId, credit: int) -> None:
        """Let the peer send ``credit`` more messages on our receiving link (absolute, not added)."""
        link = self.link(link_id)
        if link.role is not Role.RECEIVER or link.state not in (LinkState.ATTACH_SENT, LinkState.ATTACHED):
            raise LocalProtocolError(
                f"Credit is granted on an attached receiving link, not {link.name!r} ({link.state.value})."
            )
        link.credit = credit
        self._flow(link)

    def _on_flow(self, flow: Flow) -> None:
        base = flow.next_incoming_id if flow.next_incoming_id is not None else 0
        self.remote_incoming_window = max(0, (base + flow.incoming_window - self.next_outgoing_id) % _MOD)
        if flow.handle is None:
            self._pump_all()
            return
        link = self.by_remote_handle.get(flow.handle)
        if link is None:
            self.fail(
                ErrorCondition.UNATTACHED_HANDLE, f"Flow for handle {flow.handle}, which is not attached."
            )
            return
        if link.role is Role.SENDER and flow.link_credit is not None:
            count = flow.delivery_count if flow.delivery_count is not None else 0
            link.credit = (count + flow.link_credit - link.delivery_count) % _MOD
            if link.credit >= 1 << 31:  # the peer's count is behind ours: no credit
                link.credit = 0
            if link.credit:
                self._events.append(CreditGranted(link=link.id, credit=link.credit))
            self._pump(link)
            if flow.drain and link.credit and not link.pending:
                link.delivery_count = (link.delivery_count + link.credit) % _MOD
                link.credit = 0
                self._flow(link)
        if flow.echo:
            self._flow(link)
        self._pump_all()

    # --- sending -------------------------------------------------------------------------------

    def send_message(self, link_id: LinkId, payload: bytes, *, settled: bool) -> None:
        """Queue an encoded message; it goes out when credit and the window allow."""
        link = self.link(link_id)
        if link.role is not Role.SENDER or link.state not in (LinkState.ATTACHED, LinkState.ATTACH_SENT):
            raise LocalProtocolError(f"Cannot send on {link.name!r} ({link.role.name}, {link.state.value}).")
        limit = link.remote.max_message_size if link.remote else None
        if limit and len(payload) > limit:
            raise MessageTooLargeError(
                f"a {len(payload)}-byte message exceeds the peer's limit of {int(limit)} bytes on {link.name!r}"
            )
        link.pending.append((payload, settled))
        self._pump(link)

    def _pump_all(self) -> None:
        for link in list(self.links.values()):
            if link.role is Role.SENDER and link.pending:
                self._pump(link)

    def _pump(self, link: Link) -> None:
        while link.pending and link.credit > 0 and link.state is LinkState.ATTACHED and self.live:
            payload, settled = link.pending[0]
            delivery_id = self._next_delivery_id
            first = _TRANSFERS(link.id.handle, delivery_id, settled)
            if len(payload) <= self.remote_max_frame_size - _TRANSFER_FRAME_BOUND:
                chunks = [payload]  # one frame (the common case: no need to measure the transfer)
            else:
                room = max(64, self.remote_max_frame_size - frame_size(dataclasses.replace(first, more=True)))
                chunks = [payload[i : i + room] for i in range(0, len(payload), room)] or [b""]
            if len(chunks) > self.remote_incoming_window:
                return  # wait for the peer to open its session window
            link.pending.popleft()
            self._next_delivery_id = (delivery_id + 1) % _MOD
            link.credit -= 1
            link.delivery_count = (link.delivery_count + 1) % _MOD
            if not settled:
                self._sent_unsettled[delivery_id] = link
            for index, chunk in enumerate(chunks):
                more = index < len(chunks) - 1
                transfer = (
                    (dataclasses.replace(first, more=True) if more else first)
                    if index == 0
                    else Transfer(handle=link.id.handle, more=more)
                )
                self._send(transfer, chunk)
                self.next_outgoing_id = (self.next_outgoing_id + 1) % _MOD
                self.remote_incoming_window -= 1

    def settle(self, link_id: LinkId, delivery_id: int, state: DeliveryState) -> None:
        """Settle a message we received, with its outcome."""
        link = self.link(link_id)
        if link.role is not Role.RECEIVER:
            raise LocalProtocolError(f"{link.name!r} does not receive messages.")
        if type(state) is Accepted:  # the common outcome: one per delivery id
            self._send(_ACCEPTED(delivery_id, state))
        else:
            self._send(Disposition(role=Role.RECEIVER, first=delivery_id, settled=True, state=state))

    # --- receiving -----------------------------------------------------------------------------

    def _on_transfer(self, transfer: Transfer, payload: bytes) -> None:
        if self.incoming_window <= 0:
            self.fail(
                ErrorCondition.WINDOW_VIOLATION,
                "A transfer arrived with the session's incoming window closed.",
            )
            return
        self.incoming_window -= 1
        self.next_incoming_id = (self.next_incoming_id + 1) % _MOD
        if self.incoming_window <= self.limits.incoming_window // 2:
            self.incoming_window = self.limits.incoming_window
            self._flow()
        link = self.by_remote_handle.get(transfer.handle)
        if link is None:
            self.fail(
                ErrorCondition.UNATTACHED_HANDLE,
                f"Transfer on handle {transfer.handle}, which is not attached.",
            )
            return
        if link.state is not LinkState.ATTACHED:
            return  # detaching: drop
        if link.role is not Role.RECEIVER:
            self.detach(
                link.id, error(ErrorCondition.NOT_ALLOWED, "The peer sent a transfer on its receiving link.")
            )
            return
        if link.incoming is None:
            if transfer.delivery_id is None or transfer.delivery_tag is None:
                self.detach(
                    link.id,
                    error(
                        ErrorCondition.INVALID_FIELD, "A delivery's first transfer has no delivery-id or tag."
                    ),
                )
                return
            if link.credit <= 0:
                self.detach(
                    link.id,
                    error(ErrorCondition.TRANSFER_LIMIT_EXCEEDED, "A message arrived without link credit."),
                )
                return
            link.credit -= 1
            link.delivery_count = (link.delivery_count + 1) % _MOD
            link.incoming = bytearray()
            link.incoming_id = transfer.delivery_id
            link.incoming_tag = transfer.delivery_tag
            link.incoming_settled = bool(transfer.settled)
        elif transfer.delivery_id is not None and transfer.delivery_id != link.incoming_id:
            self.detach(
                link.id,
                error(ErrorCondition.INVALID_FIELD, "A continuation transfer names another delivery."),
            )
            return
        link.incoming += payload
        link.incoming_settled = link.incoming_settled or bool(transfer.settled)
        if len(link.incoming) > link.max_message_size:
            self.detach(
                link.id,
                error(
                    ErrorCondition.MESSAGE_SIZE_EXCEEDED,
                    f"A message exceeds the link's {link.max_message_size} bytes.",
                ),
            )
            return
        if transfer.aborted:
            link.incoming = None
            return
        if transfer.more:
            return
        data, link.incoming = bytes(link.incoming), None
        try:
            message = decode_message(data)
        except AmqpProtocolError as exc:
            logger.debug("rejecting a malformed AMQP message on %r: %s", link.name, exc)
            if not link.incoming_settled:
                self.settle(link.id, link.incoming_id, Rejected(error=error(exc.condition, exc.message)))
            return
        self._events.append(
            MessageReceived(
                link=link.id,
                delivery_id=link.incoming_id,
                delivery_tag=link.incoming_tag,
                message=message,
                settled=link.incoming_settled,
            )
        )

    def _on_disposition(self, disposition: Disposition) -> None:
        if disposition.role is not Role.RECEIVER:
            return  # the peer settles its own deliveries: we keep no state for them
        first = disposition.first
        span = ((disposition.last if disposition.last is not None else first) - first) % _MOD
        for delivery_id, link in list(self._sent_unsettled.items()):
            if (delivery_id - first) % _MOD <= span:
                if disposition.settled:
                    del self._sent_unsettled[delivery_id]
                self._events.append(
                    DeliveryUpdated(
                        link=link.id,
                        delivery_id=delivery_id,
                        state=disposition.state,
                        settled=disposition.settled,
                    )
                )


#: What a session does with each of its frames but end and transfer (by the performative's
#: exact class: a decoded performative is one).
_HANDLERS: dict[type[Performative], Callable[[Session, Any], None]] = {
    Attach: Session._on_attach,
    Flow: Session._on_flow,
    Disposition: Session._on_disposition,
    Detach: Session._on_detach,
}


# The performatives the machine sends alike on every connection, made once per distinct
# values (see :class:`~.frames.Templates`).
_BEGINS = Templates(
    lambda remote_channel, next_outgoing_id, incoming_window, handle_max: Begin(
        remote_channel=remote_channel,
        next_outgoing_id=next_outgoing_id,
        incoming_window=incoming_window,
        outgoing_window=_OUTGOING_WINDOW,
        handle_max=handle_max,
    )
)
_FLOWS = Templates(
    lambda next_incoming_id, incoming_window, next_outgoing_id, handle, delivery_count, credit, available, echo: (
        Flow(
            next_incoming_id=next_incoming_id,
            incoming_window=incoming_window,
            next_outgoing_id=next_outgoing_id,
            outgoing_window=_OUTGOING_WINDOW,
            handle=handle,
            delivery_count=delivery_count,
            link_credit=credit,
            available=available,
            echo=echo,
        )
    )
)
_ACCEPTED = Templates(
    lambda first, state: Disposition(role=Role.RECEIVER, first=first, settled=True, state=state)
)
_TRANSFERS = Templates(
    lambda handle, delivery_id, settled: Transfer(
        handle=handle,
        delivery_id=delivery_id,
        delivery_tag=delivery_id.to_bytes(4, "big"),
        message_format=0,
        settled=settled,
        more=False,
    )
)
