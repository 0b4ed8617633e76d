"""TPM attestation on the service side: the challenge, and the answer to it.

Theory of operation
-------------------
A TPM device has no secret the service knows. It proves that it holds the private part of
the endorsement key (EK) an operator enrolled, in two rounds (device-protocol.md §2.3, §5.5):

1. **Challenge** (:meth:`TpmAttestor.challenge`). The device sends its EK and SRK (public
   parts, TPM2B_PUBLIC) without a credential. The service checks the EK against the individual
   enrollment of that registration id (and the SRK, when the enrollment names one), makes a
   fresh 32-byte HMAC key, wraps it in an activation blob that only that TPM can open
   (:func:`provisiond.protocol.tpm.make_activation_blob`), stores the key as the registration
   id's *pending challenge*, and answers 401 with the blob (HTTPS: ``authenticationKey``;
   AMQP: SASL challenges).
2. **Answer** (:meth:`TpmAttestor.authenticate`). The device activates the blob in its TPM and
   signs a SAS token with TPM2_HMAC under the imported key. The service verifies the token with
   the pending key. The register that does so *uses* the challenge: a second register with the
   same key is refused (single use), while polls and status lookups of that registration may
   still present it until it expires.

Pending challenges live in the database (``Collection.TPM_CHALLENGES``), never in a node's
memory, so that the answer may reach another node than the challenge did: one record per
registration id (a new challenge replaces an older one), an expiry in the document
(:data:`CHALLENGE_TTL`), and single use by a conditional write on the record's etag, which only
one of two racing registers can win.

On ``assigned`` the result carries ``registrationState.tpm.authenticationKey``: a second blob,
made the same way for the same EK and SRK, that wraps the key of the device's identity in the
IoT hub (:meth:`TpmProof.wrap`); the device imports it and signs its hub SAS tokens in the TPM.

AMQP (SASL mechanism ``TPM``, device-protocol.md §4.1) reuses this module as it is: after
sasl-init (scope, registration id, EK) and the SRK, call :meth:`TpmAttestor.challenge` and send
``blob.marshal()`` in chunks; when the SAS token arrives, parse it with
:func:`provisiond.attestation.symmetric_key.check_device_token` and call
:meth:`TpmAttestor.authenticate` with ``consume=False`` (the register message that follows on
the link goes through the registrar with the same token, which uses the challenge).
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from ..errors import (
    AuthenticationError,
    DpsCode,
    InvalidBodyError,
    NotFoundError,
    PreconditionFailedError,
    TpmFormatError,
)
from ..models import AttestationType, IndividualEnrollment, TpmAttestation
from ..protocol import tpm
from ..protocol.messages import TpmAttestationRequest
from ..protocol.sas import SasToken, verify_signature
from ..storage import Collection, Store, WriteMode

__all__ = [
    "CHALLENGE_TTL",
    "KEY_NAME",
    "TpmAttestor",
    "TpmProof",
    "check_enrollment",
    "request_keys",
]

log = logging.getLogger("provisiond.attestation.tpm")

#: Seconds a challenge may be answered (and its key presented by polls) after it was issued.
CHALLENGE_TTL = 300.0
#: The ``keyName`` of the challenge: the ``skn`` the SDKs put in their SAS tokens.
KEY_NAME = "registration"
#: Bytes of the HMAC keys the service makes (the identity key and the hub key).
KEY_BYTES = 32


Random = Callable[[int], bytes]


class _Pending(msgspec.Struct, rename="camel", kw_only=True):
    """The stored form of a pending challenge."""

    endorsement_key: str
    storage_root_key: str
    key: str
    issued: float
    expires: float
    used: bool = False


@dataclass(frozen=True, slots=True)
class TpmProof:
    """A device proved it holds this EK (and SRK): what the registrar needs afterwards."""

    endorsement_key: tpm.PublicArea
    storage_root_key: tpm.PublicArea

    def wrap(self, key: bytes, *, random: Random = secrets.token_bytes) -> str:
        """A base64 activation blob that gives ``key`` to this TPM only (the hub key of
        ``registrationState.tpm.authenticationKey``)."""
        return tpm.make_activation_blob(self.endorsement_key, self.storage_root_key, key, random=random).b64()


def _b64(value: str, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBodyError(f"{field} is not valid base64.") from None


def _ek(raw: bytes, field: str) -> tpm.PublicArea:
    try:
        return tpm.endorsement_key(raw, field)
    except TpmFormatError as exc:
        raise InvalidBodyError(exc.message) from None


def _srk(raw: bytes, field: str) -> tpm.PublicArea:
    try:
        return tpm.storage_root_key(raw, field)
    except TpmFormatError as exc:
        raise InvalidBodyError(exc.message) from None


def check_enrollment(attestation: TpmAttestation) -> TpmAttestation:
    """Validate an enrollment's TPM attestation: the EK must be a TPM2B_PUBLIC of an RSA-2048
    endorsement key, the SRK (optional) one of an RSA-2048 storage key.

    :raises InvalidBodyError: what is wrong, naming the field.
    """
    field = "attestation.tpm.endorsementKey"
    _ek(_b64(attestation.endorsement_key, field), field)
    if attestation.storage_root_key:
        field = "attestation.tpm.storageRootKey"
        _srk(_b64(attestation.storage_root_key, field), field)
        return attestation
    return TpmAttestation(endorsement_key=attestation.endorsement_key)


def request_keys(request: TpmAttestationRequest) -> tuple[bytes, bytes | None]:
    """The raw EK and SRK of a register body's ``tpm``.

    :raises InvalidBodyError: not base64.
    """
    ek = _b64(request.endorsement_key, "tpm.endorsementKey")
    srk = _b64(request.storage_root_key, "tpm.storageRootKey") if request.storage_root_key else None
    return ek, srk


def _describe(ek: bytes) -> str:
    return f"the TPM whose EK-derived registration id is {tpm.registration_id(ek)!r}"


class TpmAttestor:
    """Issues TPM challenges and verifies the answers; all state is in ``store``.

    :param clock: Unix seconds (``time.time``), for expiry.
    :param ttl: seconds a challenge stays valid.
    :param random: random bytes (``secrets.token_bytes``), for keys and blobs.
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        ttl: float = CHALLENGE_TTL,
        random: Random = secrets.token_bytes,
    ) -> None:
        self._store = store
        self._clock = clock
        self._ttl = ttl
        self._random = random

    async def challenge(
        self, registration_id: str, endorsement_key: bytes, storage_root_key: bytes | None
    ) -> tpm.ActivationBlob:
        """Check the device's EK (and SRK) against its enrollment, store a fresh pending key,
        and return the activation blob that wraps it.

        :raises InvalidBodyError: the EK or SRK is malformed, or the SRK is missing.
        :raises AuthenticationError: no TPM enrollment for ``registration_id``, or another EK.
        """
        ek = _ek(endorsement_key, "tpm.endorsementKey")
        if not storage_root_key:
            raise InvalidBodyError(
                "tpm.storageRootKey is required: the activation blob is bound to the TPM's storage root key."
            )
        srk = _srk(storage_root_key, "tpm.storageRootKey")
        enrollment = await self._enrollment(registration_id)
        self._check_keys(enrollment, endorsement_key, storage_root_key)
        key = self._random(KEY_BYTES)
        blob = tpm.make_activation_blob(ek, srk, key, random=self._random)
        now = self._clock()
        pending = _Pending(
            endorsement_key=base64.b64encode(endorsement_key).decode("ascii"),
            storage_root_key=base64.b64encode(storage_root_key).decode("ascii"),
            key=base64.b64encode(key).decode("ascii"),
            issued=now,
            expires=now + self._ttl,
        )
        # Upsert: a new challenge replaces the registration id's older one.
        await self._store.write(Collection.TPM_CHALLENGES, registration_id, msgspec.json.encode(pending))
        log.info("TPM challenge issued for %s (valid %g s)", registration_id, self._ttl)
        return blob

    async def authenticate(
        self,
        token: SasToken,
        registration_id: str,
        *,
        enrollment: IndividualEnrollment | None = None,
        presented: TpmAttestationRequest | None = None,
        consume: bool,
    ) -> TpmProof:
        """Verify a SAS token signed by the TPM with the key of the pending challenge.

        :param token: parsed, with audience and expiry already checked
            (:func:`~provisiond.attestation.symmetric_key.check_device_token`).
        :param enrollment: the individual enrollment, if the caller has read it already.
        :param presented: the ``tpm`` of the request body, when it has one (must be the EK and
            SRK that were challenged).
        :param consume: use the challenge (a register): refused if it was used already.
        :raises AuthenticationError: no pending challenge, expired, used, another EK, or a
            token not signed with the pending key.
        """
        if enrollment is None:
            enrollment = await self._enrollment(registration_id)
        record = await self._store.get(Collection.TPM_CHALLENGES, registration_id)
        again = "register without a SAS token (with tpm.endorsementKey and tpm.storageRootKey) for a new challenge"
        if record is None:
            raise AuthenticationError(
                f"No TPM challenge is pending for {registration_id!r}: {again}.",
                error_code=DpsCode.TPM_CHALLENGE_INVALID,
            )
        pending = msgspec.json.decode(record.doc, type=_Pending)
        now = self._clock()
        if now > pending.expires:
            raise AuthenticationError(
                f"The TPM challenge for {registration_id!r} expired {now - pending.expires:.0f} s ago "
                f"(challenges are valid {pending.expires - pending.issued:g} s): {again}.",
                error_code=DpsCode.TPM_CHALLENGE_INVALID,
            )
        ek = base64.b64decode(pending.endorsement_key)
        srk = base64.b64decode(pending.storage_root_key)
        if presented is not None:
            presented_ek, presented_srk = request_keys(presented)
            if presented_ek != ek or (presented_srk is not None and presented_srk != srk):
                raise AuthenticationError(
                    f"The request carries another endorsement or storage root key than the TPM challenge for "
                    f"{registration_id!r} was made for: {again}.",
                    error_code=DpsCode.TPM_KEY_MISMATCH,
                )
        self._check_keys(enrollment, ek, srk)
        if not verify_signature(token, pending.key):
            raise AuthenticationError(
                f"The SAS token was not signed with the key of the pending TPM challenge for {registration_id!r}: "
                "the TPM did not activate this challenge (a newer challenge replaces older ones), or the token "
                "was signed with another key.",
                error_code=DpsCode.TOKEN_INVALID,
            )
        if consume:
            used = (
                f"The TPM challenge for {registration_id!r} was already used by a registration; each challenge "
                f"is single use: {again}."
            )
            if pending.used:
                raise AuthenticationError(used, error_code=DpsCode.TPM_CHALLENGE_INVALID)
            try:
                await self._store.write(
                    Collection.TPM_CHALLENGES,
                    registration_id,
                    msgspec.json.encode(msgspec.structs.replace(pending, used=True)),
                    mode=WriteMode.UPDATE,
                    if_match=record.etag,
                )
            except (PreconditionFailedError, NotFoundError):
                # Another register used it, or a new challenge replaced it, in between.
                raise AuthenticationError(used, error_code=DpsCode.TPM_CHALLENGE_INVALID) from None
        return TpmProof(tpm.endorsement_key(ek), tpm.storage_root_key(srk))

    async def _enrollment(self, registration_id: str) -> IndividualEnrollment:
        record = await self._store.get(Collection.ENROLLMENTS, registration_id)
        if record is None:
            raise AuthenticationError(
                f"No individual enrollment is named {registration_id!r}; TPM attestation needs an individual "
                "enrollment with the device's endorsement key (`provisiond tpm ek` prints it).",
                error_code=DpsCode.TPM_NOT_ENROLLED,
            )
        enrollment = msgspec.json.decode(record.doc, type=IndividualEnrollment)
        if enrollment.attestation.type is not AttestationType.TPM or enrollment.attestation.tpm is None:
            raise AuthenticationError(
                f"The individual enrollment {enrollment.registration_id!r} uses "
                f"{enrollment.attestation.type.value} attestation, not TPM.",
                error_code=DpsCode.TPM_NOT_ENROLLED,
            )
        return enrollment

    @staticmethod
    def _check_keys(enrollment: IndividualEnrollment, ek: bytes, srk: bytes) -> None:
        enrolled = enrollment.attestation.tpm
        assert enrolled is not None
        name = enrollment.registration_id
        enrolled_ek = base64.b64decode(enrolled.endorsement_key)
        if ek != enrolled_ek:
            raise AuthenticationError(
                f"The endorsement key is not the one of the individual enrollment {name!r}: the device is "
                f"{_describe(ek)}, the enrollment's EK is {_describe(enrolled_ek)}.",
                error_code=DpsCode.TPM_KEY_MISMATCH,
            )
        if enrolled.storage_root_key and srk != base64.b64decode(enrolled.storage_root_key):
            raise AuthenticationError(
                f"The storage root key is not the one of the individual enrollment {name!r} (the enrollment names "
                "an SRK; the device's TPM has another one, e.g. after a TPM clear).",
                error_code=DpsCode.TPM_KEY_MISMATCH,
            )
