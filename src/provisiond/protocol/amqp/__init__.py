"""AMQP 1.0 (OASIS), sans-io, shared by the service endpoint and the device client.

* :mod:`.types` / :mod:`.values`: the type system codec (Part 1);
* :mod:`.frames`, :mod:`.performatives`: protocol headers, frames, performatives, SASL frames,
  message sections (Parts 2, 3, 5);
* :mod:`.state`: the state machines as tables; :mod:`.connection`, :mod:`.session`: the
  machines themselves (:class:`Connection`, both roles); :mod:`.events`: what they report;
* :mod:`.dps`: DPS's conventions on top (addresses, SASL PLAIN bytes, property names);
  :mod:`.sasl_tpm`: DPS's SASL ``TPM`` mechanism, one machine per role.
"""

from __future__ import annotations

from .connection import Connection, ConnectionConfig
from .events import (
    ConnectionClosed,
    ConnectionOpened,
    CreditGranted,
    DeliveryUpdated,
    Event,
    LinkAttached,
    LinkDetached,
    LinkId,
    MessageReceived,
    ProtocolHeaderReceived,
    SaslChallengeReceived,
    SaslInitReceived,
    SaslMechanismsReceived,
    SaslOutcomeReceived,
    SaslResponseReceived,
    SessionBegun,
    SessionEnded,
)
from .performatives import Error, ErrorCondition, Message, Role, SaslCode
from .session import SessionLimits
from .state import Side

__all__ = [
    "Connection",
    "ConnectionClosed",
    "ConnectionConfig",
    "ConnectionOpened",
    "CreditGranted",
    "DeliveryUpdated",
    "Error",
    "ErrorCondition",
    "Event",
    "LinkAttached",
    "LinkDetached",
    "LinkId",
    "Message",
    "MessageReceived",
    "ProtocolHeaderReceived",
    "Role",
    "SaslChallengeReceived",
    "SaslCode",
    "SaslInitReceived",
    "SaslMechanismsReceived",
    "SaslOutcomeReceived",
    "SaslResponseReceived",
    "SessionBegun",
    "SessionEnded",
    "SessionLimits",
    "Side",
]
