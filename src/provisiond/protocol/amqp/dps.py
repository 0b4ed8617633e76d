"""DPS over AMQP (device-protocol.md §4), pure functions shared by the service endpoint and the
device client: link addresses, SASL PLAIN and the DPS ``TPM`` mechanism's byte layouts,
message property names, operation types.

=============================  ==========================================================================
link address                   ``{idScope}/registrations/{registrationId}``, or the C SDK's
                               ``amqps://{host}/{idScope}/registrations/{registrationId}``
PLAIN initial response         ``authzid NUL authcid NUL password``; authcid is the address, the password
                               the SAS token (RFC 4616)
TPM sasl-init                  ``0x00 ‖ idScope ‖ 0x00 ‖ registrationId ‖ 0x00 ‖ EK`` (raw TPM2B_PUBLIC)
TPM challenge #1 / response    ``0x00`` / ``0x00 ‖ SRK``
TPM blob challenges            ``ctrl ‖ chunk``, ctrl ``0x80 | seq`` (interim) or ``0xC0 | seq`` (final),
                               seq a 2-bit counter from 0; the client answers each interim one ``0x00``
                               and the final one ``0x00 ‖ SAS token``
request                        application property ``iotdps-operation-type`` = ``iotdps-register`` |
                               ``iotdps-get-operationstatus`` (+ ``iotdps-operation-id``,
                               ``iotdps-forceRegistration``); correlation-id echoed in the response
response                       a data section with the JSON; ``retry-after`` and ``Retry-After``
                               application properties (C/Node read one, .NET the other)
=============================  ==========================================================================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ...errors import AmqpProtocolError, LocalProtocolError

__all__ = [
    "API_VERSION_PROPERTY",
    "CLIENT_VERSION_PROPERTY",
    "FORCE_REGISTRATION",
    "MAX_TPM_CHUNKS",
    "OPERATION_ID",
    "OPERATION_TYPE",
    "RETRY_AFTER_NAMES",
    "TPM_CHUNK_SIZE",
    "Mechanism",
    "OperationType",
    "RegistrationAddress",
    "TpmChunk",
    "TpmInit",
    "chunk_activation_blob",
    "parse_plain",
    "parse_registration_address",
    "parse_tpm_chunk",
    "parse_tpm_init",
    "plain_response",
    "tpm_init_response",
]

OPERATION_TYPE = "iotdps-operation-type"
OPERATION_ID = "iotdps-operation-id"
FORCE_REGISTRATION = "iotdps-forceRegistration"
#: The spellings the SDKs read (C and Node: lower case; .NET: ``Retry-After``).
RETRY_AFTER_NAMES = ("retry-after", "Retry-After")
API_VERSION_PROPERTY = "com.microsoft:api-version"
CLIENT_VERSION_PROPERTY = "com.microsoft:client-version"
#: Blob bytes per SASL challenge: a challenge frame must fit 512 bytes (C caps data at 470).
TPM_CHUNK_SIZE = 400
#: The sequence number is 2 bits and .NET checks it, so a blob goes in 4 chunks at most.
MAX_TPM_CHUNKS = 4
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


# --- TPM -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TpmInit:
    id_scope: str
    registration_id: str
    endorsement_key: bytes


def tpm_init_response(id_scope: str, registration_id: str, endorsement_key: bytes) -> bytes:
    return b"\x00" + id_scope.encode() + b"\x00" + registration_id.encode() + b"\x00" + endorsement_key


def parse_tpm_init(response: bytes | None) -> TpmInit:
    """The scope, registration id and EK of a TPM sasl-init.

    :raises AmqpProtocolError: not ``0x00 scope 0x00 id 0x00 EK`` (chunked inits, which the C
        SDK sends for oversized keys only, are not supported).
    """
    data = response or b""
    if not data.startswith(b"\x00"):
        raise AmqpProtocolError(
            "A TPM sasl-init starts with 0x00 (a chunked init is not supported).",
            condition="amqp:decode-error",
        )
    parts = data[1:].split(b"\x00", 2)
    if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2]:
        raise AmqpProtocolError(
            "A TPM sasl-init is 0x00 scope 0x00 id 0x00 EK.", condition="amqp:decode-error"
        )
    try:
        scope, registration_id = parts[0].decode("ascii"), parts[1].decode("utf-8")
    except UnicodeDecodeError:
        raise AmqpProtocolError(
            "The scope or id of a TPM sasl-init is not text.", condition="amqp:decode-error"
        ) from None
    return TpmInit(scope, registration_id, parts[2])


@dataclass(frozen=True, slots=True)
class TpmChunk:
    final: bool
    sequence: int
    data: bytes


def chunk_activation_blob(blob: bytes, size: int = TPM_CHUNK_SIZE) -> list[bytes]:
    """The sasl-challenge payloads that carry ``blob``: ``ctrl ‖ chunk`` each.

    :raises LocalProtocolError: the blob needs more than :data:`MAX_TPM_CHUNKS` chunks.
    """
    chunks = [blob[i : i + size] for i in range(0, len(blob), size)] or [b""]
    if len(chunks) > MAX_TPM_CHUNKS:
        raise LocalProtocolError(
            f"A {len(blob)}-byte blob needs more than {MAX_TPM_CHUNKS} chunks of {size}."
        )
    last = len(chunks) - 1
    return [bytes([(0xC0 if n == last else 0x80) | n]) + chunk for n, chunk in enumerate(chunks)]


def parse_tpm_chunk(challenge: bytes) -> TpmChunk:
    """A blob chunk of a TPM sasl-challenge.

    :raises AmqpProtocolError: no control byte, or one without the presence bit (0x80).
    """
    if not challenge or not challenge[0] & 0x80:
        raise AmqpProtocolError(
            "A TPM blob challenge starts with a control byte 0x80|seq.", condition="amqp:decode-error"
        )
    return TpmChunk(bool(challenge[0] & 0x40), challenge[0] & 0x03, challenge[1:])
