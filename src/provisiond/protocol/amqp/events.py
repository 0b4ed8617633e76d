"""What :meth:`Connection.feed_bytes <provisiond.protocol.amqp.connection.Connection.feed_bytes>`
returns: small frozen events, one per thing the application may need to act on (h11's
``_events.py``). Both roles receive the same kinds of events: a server sees
:class:`SaslInitReceived` where a client sees :class:`SaslMechanismsReceived`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .frames import ProtocolId
from .performatives import Attach, DeliveryState, Error, Message, Open, Role, SaslCode
from .types import Symbol

__all__ = [
    "ConnectionClosed",
    "ConnectionOpened",
    "CreditGranted",
    "DeliveryUpdated",
    "Event",
    "LinkAttached",
    "LinkDetached",
    "LinkId",
    "MessageReceived",
    "ProtocolHeaderReceived",
    "SaslChallengeReceived",
    "SaslInitReceived",
    "SaslMechanismsReceived",
    "SaslOutcomeReceived",
    "SaslResponseReceived",
    "SessionBegun",
    "SessionEnded",
]


@dataclass(frozen=True, slots=True)
class LinkId:
    """Names one of our link endpoints: the session's channel and our handle."""

    channel: int
    handle: int


class Event:
    """Base of every event."""

    __slots__ = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtocolHeaderReceived(Event):
    """The peer's protocol header: SASL, or AMQP (without SASL, or after it)."""

    protocol: ProtocolId


@dataclass(frozen=True, slots=True, kw_only=True)
class SaslMechanismsReceived(Event):
    """Client: the server's mechanisms; answer with :meth:`Connection.sasl_init`."""

    mechanisms: tuple[Symbol, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SaslInitReceived(Event):
    """Server: the client chose a mechanism; answer with a challenge or an outcome."""

    mechanism: Symbol
    initial_response: bytes | None
    hostname: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SaslChallengeReceived(Event):
    """Client: answer with :meth:`Connection.sasl_response`."""

    challenge: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class SaslResponseReceived(Event):
    """Server: answer with another challenge or the outcome."""

    response: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class SaslOutcomeReceived(Event):
    """Client: the outcome; on OK the AMQP header has been queued, otherwise the connection is over."""

    code: SaslCode
    additional_data: bytes | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionOpened(Event):
    """The peer's open (its limits are in force from now on)."""

    open: Open


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed(Event):
    """The connection is over: the peer closed it (``by_peer``), or we closed it because the peer
    broke the protocol or went idle (``error`` says why, as sent)."""

    error: Error | None
    by_peer: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionBegun(Event):
    """A session is mapped on ``channel`` (ours answered, or the peer's answered by us)."""

    channel: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionEnded(Event):
    channel: int
    error: Error | None
    by_peer: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkAttached(Event):
    """The peer attached ``link``. If we did not attach it first, answer with
    :meth:`Connection.accept_link` or :meth:`Connection.refuse_link`. ``role`` is ours."""

    link: LinkId
    role: Role
    remote: Attach
    answer_needed: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkDetached(Event):
    link: LinkId
    error: Error | None
    by_peer: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class CreditGranted(Event):
    """The peer gave our sending link ``credit`` (queued messages go out by themselves)."""

    link: LinkId
    credit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageReceived(Event):
    """A complete message on a receiving link; settle it with :meth:`Connection.settle`
    unless the sender already did (``settled``)."""

    link: LinkId
    delivery_id: int
    delivery_tag: bytes
    message: Message
    settled: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryUpdated(Event):
    """The peer's disposition of a message we sent (accepted, rejected...)."""

    link: LinkId
    delivery_id: int
    state: DeliveryState | None
    settled: bool
