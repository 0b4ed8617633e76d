"""DPS over AMQP (device-protocol.md §4), pure functions shared by the service endpoint and the
device client: link addresses, SASL PLAIN, message property names, operation types. The DPS
``TPM`` mechanism is a machine of its own, :mod:`.sasl_tpm`.

=============================  ==========================================================================
link address                   ``{idScope}/registrations/{registrationId}``, or the C SDK's
                               ``amqps://{host}/{idScope}/registrations/{registrationId}``
PLAIN initial response         ``authzid NUL authcid NUL password``; authcid is the address, the password
                               the SAS token (RFC 4616)
TPM                            see :mod:`.sasl_tpm`
request                        application property ``iotdps-operation-type`` = ``iotdps-register`` |
                               ``iotdps-get-operationstatus`` (+ ``iotdps-operation-id``,
                               ``iotdps-forceRegistration``); correlation-id echoed in the response
response                       a data section with the JSON; ``retry-after`` and ``Retry-After``
                               application properties (C/Node read one, .NET the other)
=============================  ==========================================================================
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

from ...errors import AmqpProtocolError

__all__ = [
    "API_VERSION_PROPERTY",
    "CLIENT_VERSION_PROPERTY",
    "FORCE_REGISTRATION",
    "OPERATION_ID",
    "OPERATION_TYPE",
    "RETRY_AFTER_NAMES",
    "Mechanism",
    "OperationType",
    "RegistrationAddress",
    "parse_plain",
    "parse_registration_address",
    "plain_response",
]

OPERATION_TYPE = "iotdps-operation-type"
OPERATION_ID = "iotdps-operation-id"
FORCE_REGISTRATION = "iotdps-forceRegistration"
#: The spellings the SDKs read (C and Node: lower case; .NET: ``Retry-After``).
RETRY_AFTER_NAMES = ("retry-after", "Retry-After")
API_VERSION_PROPERTY = "com.microsoft:api-version"
CLIENT_VERSION_PROPERTY = "com.microsoft:client-version"
_MAX_ID = 128


class Mechanism(enum.StrEnum):
    """The SASL mechanisms provisiond speaks."""

    TPM = "TPM"
    PLAIN = "PLAIN"
    EXTERNAL = "EXTERNAL"
    ANONYMOUS = "ANONYMOUS"


class OperationType(enum.StrEnum):
    REGISTER = "iotdps-register"
    GET_OPERATION_STATUS = "iotdps-get-operationstatus"


def _bad(message: str) -> AmqpProtocolError:
    return AmqpProtocolError(message, condition="amqp:not-found")


@dataclass(frozen=True, slots=True)
class RegistrationAddress:
    id_scope: str
    registration_id: str

    def __str__(self) -> str:
        return f"{self.id_scope}/registrations/{self.registration_id}"


def parse_registration_address(address: object) -> RegistrationAddress:
    """The scope and registration id of a link address (with or without ``amqps://host/``).

    :raises AmqpProtocolError: not a DPS registration address (``amqp:not-found``).
    """
    if not isinstance(address, str):
        raise _bad(f"The link address must be a string, not {type(address).__name__}.")
    return _parse_address(address)


@functools.lru_cache(maxsize=1024)
def _parse_address(address: str) -> RegistrationAddress:
    """:func:`parse_registration_address` of a string, remembered: a device's address is read
    from its SASL PLAIN user and again from each of its links."""
    text = address
    for scheme in ("amqps://", "amqp://", "wss://"):
        if text.lower().startswith(scheme):
            host_and_path = text[len(scheme) :]
            if "/" not in host_and_path:
                raise _bad(f"The link address {address[:200]!r} has no path.")
            text = host_and_path.split("/", 1)[1]
            break
    parts = text.strip("/").split("/")
    if len(parts) != 3 or parts[1].lower() != "registrations" or not parts[0] or not parts[2]:
        raise _bad(f"The link address {address[:200]!r} is not {{idScope}}/registrations/{{registrationId}}.")
    if len(parts[2]) > _MAX_ID or len(parts[0]) > _MAX_ID:
        raise _bad("The link address is too long.")
    return RegistrationAddress(parts[0], parts[2])


# --- PLAIN (RFC 4616) ----------------------------------------------------------------------------


def plain_response(username: str, password: str) -> bytes:
    """``NUL username NUL password`` (no authorization identity)."""
    return b"\x00" + username.encode("utf-8") + b"\x00" + password.encode("utf-8")


def parse_plain(response: bytes | None) -> tuple[str, str]:
    """The authentication identity and password of a PLAIN initial response.

    :raises AmqpProtocolError: not ``[authzid] NUL authcid NUL passwd`` in UTF-8.
    """
    parts = (response or b"").split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        raise AmqpProtocolError(
            "A PLAIN response is [authzid] NUL authcid NUL passwd.", condition="amqp:decode-error"
        )
    try:
        return parts[1].decode("utf-8"), parts[2].decode("utf-8")
    except UnicodeDecodeError:
        raise AmqpProtocolError("A PLAIN response is not UTF-8.", condition="amqp:decode-error") from None
