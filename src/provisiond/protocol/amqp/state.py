"""The AMQP 1.0 state machines as tables: SASL (Part 5 §5.3.2), connection (Part 2 §2.4.6),
session (§2.5.5) and link (§2.6.3). :mod:`.connection` and :mod:`.session` hold the logic; every
state change they make is a lookup here.

Rule 1 (h11's): everything that decides *whether* a performative may be sent or received in a
state lives in this file; the logic modules only act on the result.

Rule 2: a key is ``(Direction, what)``; ``what`` is a performative class or
:class:`~provisiond.protocol.amqp.frames.ProtocolHeader`. Each SASL performative is sent by one
role only, so the SASL table has one row set per role; the others are the same for both roles.

A pair missing from a table is a protocol violation: the peer's (``AmqpProtocolError`` with
``amqp:illegal-state``, the connection is closed with it) or ours (``LocalProtocolError``: the
application called an operation in the wrong state).
"""

from __future__ import annotations

import enum
from typing import TypeAlias, TypeVar

from ..._enums import IdentityEnum
from ...errors import AmqpProtocolError, LocalProtocolError
from .frames import ProtocolHeader
from .performatives import (
    Attach,
    Begin,
    Close,
    Detach,
    End,
    Open,
    SaslChallenge,
    SaslInit,
    SaslMechanisms,
    SaslOutcome,
    SaslResponse,
)

__all__ = [
    "CONNECTION_TRANSITIONS",
    "LINK_TRANSITIONS",
    "SASL_TRANSITIONS",
    "SESSION_FRAMES_DISCARDED",
    "SESSION_FRAMES_PROCESSED",
    "SESSION_TRANSITIONS",
    "ConnectionState",
    "Direction",
    "LinkState",
    "SaslState",
    "SessionState",
    "Side",
    "transition",
]


class Side(IdentityEnum):
    """Which end of the TCP connection we are (h11's CLIENT/SERVER)."""

    CLIENT = "client"
    SERVER = "server"


class Direction(IdentityEnum):
    SENT = "sent"
    RECEIVED = "received"


SENT, RECEIVED = Direction.SENT, Direction.RECEIVED


class SaslState(IdentityEnum):
    AWAIT_HEADER = "await-header"
    AWAIT_MECHANISMS = "await-mechanisms"  # client
    AWAIT_INIT = "await-init"  # server
    DECIDING = "deciding"  # the application must send the next SASL frame
    AWAIT_CHALLENGE = "await-challenge"  # client: a challenge or the outcome comes next
    AWAIT_RESPONSE = "await-response"  # server
    DONE = "done"


Key: TypeAlias = tuple[Direction, type]

#: Per role: the server offers mechanisms when the header arrives, the client picks one (init),
#: the server challenges as often as the mechanism needs and ends with the outcome.
SASL_TRANSITIONS: dict[Side, dict[SaslState, dict[Key, SaslState]]] = {
    Side.SERVER: {
        SaslState.AWAIT_HEADER: {(RECEIVED, ProtocolHeader): SaslState.AWAIT_INIT},
        SaslState.AWAIT_INIT: {(RECEIVED, SaslInit): SaslState.DECIDING},
        SaslState.DECIDING: {
            (SENT, SaslChallenge): SaslState.AWAIT_RESPONSE,
            (SENT, SaslOutcome): SaslState.DONE,
        },
        SaslState.AWAIT_RESPONSE: {(RECEIVED, SaslResponse): SaslState.DECIDING},
    },
    Side.CLIENT: {
        SaslState.AWAIT_HEADER: {(RECEIVED, ProtocolHeader): SaslState.AWAIT_MECHANISMS},
        SaslState.AWAIT_MECHANISMS: {(RECEIVED, SaslMechanisms): SaslState.DECIDING},
        SaslState.DECIDING: {
            (SENT, SaslInit): SaslState.AWAIT_CHALLENGE,
            (SENT, SaslResponse): SaslState.AWAIT_CHALLENGE,
        },
        SaslState.AWAIT_CHALLENGE: {
            (RECEIVED, SaslChallenge): SaslState.DECIDING,
            (RECEIVED, SaslOutcome): SaslState.DONE,
        },
    },
}


class ConnectionState(IdentityEnum):
    """Part 2 §2.4.6, from the AMQP protocol header on (SASL, if any, is over by then)."""

    START = "start"
    HDR_RCVD = "hdr-rcvd"
    HDR_SENT = "hdr-sent"
    HDR_EXCH = "hdr-exch"
    OPEN_PIPE = "open-pipe"
    OC_PIPE = "oc-pipe"
    OPEN_RCVD = "open-rcvd"
    OPEN_SENT = "open-sent"
    CLOSE_PIPE = "close-pipe"
    OPENED = "opened"
    CLOSE_RCVD = "close-rcvd"
    CLOSE_SENT = "close-sent"
    END = "end"


CONNECTION_TRANSITIONS: dict[ConnectionState, dict[Key, ConnectionState]] = {
    ConnectionState.START: {
        (SENT, ProtocolHeader): ConnectionState.HDR_SENT,
        (RECEIVED, ProtocolHeader): ConnectionState.HDR_RCVD,
    },
    ConnectionState.HDR_RCVD: {(SENT, ProtocolHeader): ConnectionState.HDR_EXCH},
    ConnectionState.HDR_SENT: {
        (RECEIVED, ProtocolHeader): ConnectionState.HDR_EXCH,
        (SENT, Open): ConnectionState.OPEN_PIPE,
    },
    ConnectionState.HDR_EXCH: {
        (RECEIVED, Open): ConnectionState.OPEN_RCVD,
        (SENT, Open): ConnectionState.OPEN_SENT,
    },
    ConnectionState.OPEN_PIPE: {
        (RECEIVED, ProtocolHeader): ConnectionState.OPEN_SENT,
        (SENT, Close): ConnectionState.OC_PIPE,
    },
    ConnectionState.OC_PIPE: {(RECEIVED, ProtocolHeader): ConnectionState.CLOSE_PIPE},
    ConnectionState.CLOSE_PIPE: {(RECEIVED, Open): ConnectionState.CLOSE_SENT},
    ConnectionState.OPEN_RCVD: {(SENT, Open): ConnectionState.OPENED},
    ConnectionState.OPEN_SENT: {
        (RECEIVED, Open): ConnectionState.OPENED,
        (SENT, Close): ConnectionState.CLOSE_PIPE,
    },
    ConnectionState.OPENED: {
        (RECEIVED, Close): ConnectionState.CLOSE_RCVD,
        (SENT, Close): ConnectionState.CLOSE_SENT,
    },
    ConnectionState.CLOSE_RCVD: {(SENT, Close): ConnectionState.END},
    ConnectionState.CLOSE_SENT: {(RECEIVED, Close): ConnectionState.END},
}

#: Where the peer's session and link frames are processed, and where they are dropped unread
#: (we sent close and wait for the peer's).
SESSION_FRAMES_PROCESSED = frozenset({ConnectionState.OPENED})
SESSION_FRAMES_DISCARDED = frozenset({ConnectionState.CLOSE_SENT, ConnectionState.CLOSE_PIPE})


class SessionState(IdentityEnum):
    UNMAPPED = "unmapped"
    BEGIN_SENT = "begin-sent"
    BEGIN_RCVD = "begin-rcvd"
    MAPPED = "mapped"
    END_SENT = "end-sent"
    END_RCVD = "end-rcvd"
    ENDED = "ended"


SESSION_TRANSITIONS: dict[SessionState, dict[Key, SessionState]] = {
    SessionState.UNMAPPED: {
        (SENT, Begin): SessionState.BEGIN_SENT,
        (RECEIVED, Begin): SessionState.BEGIN_RCVD,
    },
    SessionState.BEGIN_SENT: {
        (RECEIVED, Begin): SessionState.MAPPED,
        (SENT, End): SessionState.END_SENT,
    },
    SessionState.BEGIN_RCVD: {(SENT, Begin): SessionState.MAPPED},
    SessionState.MAPPED: {
        (SENT, End): SessionState.END_SENT,
        (RECEIVED, End): SessionState.END_RCVD,
    },
    SessionState.END_SENT: {(RECEIVED, End): SessionState.ENDED},
    SessionState.END_RCVD: {(SENT, End): SessionState.ENDED},
}


class LinkState(IdentityEnum):
    DETACHED = "detached"
    ATTACH_SENT = "attach-sent"
    ATTACH_RCVD = "attach-rcvd"
    ATTACHED = "attached"
    DETACH_SENT = "detach-sent"
    DETACH_RCVD = "detach-rcvd"
    GONE = "gone"


LINK_TRANSITIONS: dict[LinkState, dict[Key, LinkState]] = {
    LinkState.DETACHED: {
        (SENT, Attach): LinkState.ATTACH_SENT,
        (RECEIVED, Attach): LinkState.ATTACH_RCVD,
    },
    LinkState.ATTACH_SENT: {
        (RECEIVED, Attach): LinkState.ATTACHED,
        (SENT, Detach): LinkState.DETACH_SENT,
    },
    LinkState.ATTACH_RCVD: {(SENT, Attach): LinkState.ATTACHED},
    LinkState.ATTACHED: {
        (SENT, Detach): LinkState.DETACH_SENT,
        (RECEIVED, Detach): LinkState.DETACH_RCVD,
    },
    LinkState.DETACH_SENT: {(RECEIVED, Detach): LinkState.GONE},
    LinkState.DETACH_RCVD: {(SENT, Detach): LinkState.GONE},
}

S = TypeVar("S", bound=enum.Enum)


def transition(table: dict[S, dict[Key, S]], state: S, direction: Direction, what: type, where: str) -> S:
    """The state after ``what`` was sent or received in ``state``.

    :raises AmqpProtocolError: the peer sent ``what`` where it may not (``amqp:illegal-state``).
    :raises LocalProtocolError: we were about to send it where we may not.
    """
    new = table.get(state, {}).get((direction, what))
    if new is None:
        text = f"{'Sending' if direction is SENT else 'Receiving'} {what.__name__} is not allowed in the {where} state {state.value!r}."
        if direction is SENT:
            raise LocalProtocolError(text)
        raise AmqpProtocolError(text, condition="amqp:illegal-state")
    return new
