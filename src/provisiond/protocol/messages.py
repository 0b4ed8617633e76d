"""The device registration messages of DPS (device API), shared by the service and the device
client so that both encode and decode them from one declaration.

Wire shapes (device-protocol.md §1.2):

- request ``DeviceRegistration``: ``{"registrationId", "tpm"?: {"endorsementKey", "storageRootKey"},
  "payload"?}``. The SDKs differ: Python sends ``"payload": null``, .NET over MQTT/AMQP sends no
  ``registrationId`` at all, so every field is optional here and the transport supplies the id.
- response ``RegistrationOperationStatus``: ``{"operationId", "status", "registrationState"?}``.
- ``DeviceRegistrationResult``: what the device learns (hub, device id, status, substatus,
  payload, and per attestation: ``x509``, ``symmetricKey``, ``tpm``): the service API's
  ``DeviceRegistrationState`` plus the attestation's parts.
- TPM challenge (401 body): ``{"message", "authenticationKey", "keyName"}``.
- error (``ProvisioningServiceErrorDetails``): ``{"errorCode", "trackingId", "message",
  "timestampUtc"}``, what every transport answers a refused request with.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..models import DeviceRegistrationState, RegistrationStatus, X509CertificateInfo
from . import bounded_json

__all__ = [
    "DeviceRegistration",
    "DeviceRegistrationResult",
    "ErrorDetails",
    "RegistrationOperationStatus",
    "SymmetricKeyRegistrationResult",
    "TpmAttestationRequest",
    "TpmChallenge",
    "TpmRegistrationResult",
    "X509RegistrationResult",
    "decode_operation_status",
    "encode",
    "error_body",
]


class _Message(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    pass


class TpmAttestationRequest(_Message):
    endorsement_key: str
    storage_root_key: str | None = None


class DeviceRegistration(_Message):
    """The register (and status lookup) request body."""

    registration_id: str | None = None
    tpm: TpmAttestationRequest | None = None
    payload: Any = None
    csr: str | None = None


class X509RegistrationResult(_Message):
    certificate_info: X509CertificateInfo | None = None
    enrollment_group_id: str | None = None
    signing_certificate_info: X509CertificateInfo | None = None


class SymmetricKeyRegistrationResult(_Message):
    enrollment_group_id: str | None = None


class TpmRegistrationResult(_Message):
    authentication_key: str | None = None


class DeviceRegistrationResult(DeviceRegistrationState, kw_only=True):
    """The registration record as the device API shows it: the service API's fields
    (:class:`~provisiond.models.DeviceRegistrationState`, declared once there), then what the
    attestation adds."""

    x509: X509RegistrationResult | None = None
    symmetric_key: SymmetricKeyRegistrationResult | None = None
    tpm: TpmRegistrationResult | None = None


class RegistrationOperationStatus(_Message):
    operation_id: str
    status: RegistrationStatus
    registration_state: DeviceRegistrationResult | None = None


class TpmChallenge(_Message):
    authentication_key: str
    key_name: str = "registration"
    message: str | None = None


class ErrorDetails(_Message):
    """DPS's ``ProvisioningServiceErrorDetails``: the body of every refusal, on every transport
    (HTTPS body, MQTT response payload, AMQP rejection description) and on the service API."""

    error_code: int
    tracking_id: str
    message: str
    timestamp_utc: str


_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """JSON bytes of a message (camelCase, unset fields omitted)."""
    return _encoder.encode(message)


def error_body(error_code: int, tracking_id: str, message: str, timestamp_utc: str) -> bytes:
    """The JSON of an :class:`ErrorDetails` (keys in DPS's order)."""
    return _encoder.encode(
        ErrorDetails(
            error_code=int(error_code), tracking_id=tracking_id, message=message, timestamp_utc=timestamp_utc
        )
    )


def decode_operation_status(body: bytes) -> RegistrationOperationStatus:
    """Decode a register/poll answer.

    :raises msgspec.ValidationError, msgspec.DecodeError: the caller maps these to its own error.
    """
    return bounded_json.decode(body, RegistrationOperationStatus, max_depth=bounded_json.REPLY_MAX_DEPTH)
