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

Pending challenges live behind a :class:`~provisiond.attestation.base.ChallengeStore`, which
the service keeps in its database (``service/sources.py``), never in a node's memory, so that
the answer may reach another node than the challenge did: one challenge per registration id (a
new challenge replaces an older one), an expiry in the challenge (:data:`CHALLENGE_TTL`), and
single use by a write conditional on the version read, which only one of two racing registers
can win.

On ``assigned`` the result carries ``registrationState.tpm.authenticationKey``: a second blob,
made the same way for the same EK and SRK, that wraps the key of the device's identity in the
IoT hub (:meth:`TpmProof.wrap`); the device imports it and signs its hub SAS tokens in the TPM.

As an :class:`~provisiond.attestation.base.Attestor`, :class:`TpmAttestor` checks the TPM keys
of a first register (it issues the challenge and raises
:class:`~provisiond.errors.TpmChallengeRequired`) and the SAS token of the second one, for the
individual TPM enrollments; TPM enrollment groups do not exist (as in DPS).

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
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import AuthenticationError, DpsCode, InvalidBodyError, TpmChallengeRequired, TpmFormatError
from ..models import AttestationType, IndividualEnrollment, TpmAttestation
from ..protocol import tpm
from ..protocol.messages import TpmAttestationRequest, TpmRegistrationResult
from ..protocol.sas import SasToken, verify_signature
from .base import (
    ChallengeStore,
    Credential,
    EnrollmentSource,
    Evidence,
    KeyCredential,
    Match,
    PendingChallenge,
    require_type,
)
from .symmetric_key import check_device_token

__all__ = [
    "CHALLENGE_TTL",
    "KEY_NAME",
    "TpmAttestor",
    "TpmKeys",
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
#: What a TPM device is told with its challenge.
CHALLENGE_MESSAGE = "Activate the authenticationKey in the TPM, then register again with a SAS token signed by the imported key."


Random = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class TpmProof:
    """A device proved it holds this EK (and SRK): what the registrar needs afterwards."""

    endorsement_key: tpm.PublicArea
    storage_root_key: tpm.PublicArea

    def wrap(self, key: bytes, *, random: Random = secrets.token_bytes) -> str:
        """A base64 activation blob that gives ``key`` to this TPM only (the hub key of
        ``registrationState.tpm.authenticationKey``)."""
        return tpm.make_activation_blob(self.endorsement_key, self.storage_root_key, key, random=random).b64()


@dataclass(frozen=True, slots=True)
class TpmKeys:
    """The EK and SRK a device sent for a challenge, raw and parsed."""

    endorsement_key: bytes
    storage_root_key: bytes
    ek: tpm.PublicArea
    srk: tpm.PublicArea


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


def _keys(endorsement_key: bytes, storage_root_key: bytes | None) -> TpmKeys:
    """Parse the keys of a challenge request.

    :raises InvalidBodyError: the EK or SRK is malformed, or the SRK is missing.
    """
    ek = _ek(endorsement_key, "tpm.endorsementKey")
    if not storage_root_key:
        raise InvalidBodyError(
            "tpm.storageRootKey is required: the activation blob is bound to the TPM's storage root key."
        )
    return TpmKeys(endorsement_key, storage_root_key, ek, _srk(storage_root_key, "tpm.storageRootKey"))


def _describe(ek: bytes) -> str:
    return f"the TPM whose EK-derived registration id is {tpm.registration_id(ek)!r}"


class TpmAttestor:
    """Issues TPM challenges and verifies the answers; the challenges are in ``challenges``.

    :param clock: Unix seconds (``time.time``), for expiry.
    :param clock_skew: seconds a token may be past its expiry.
    :param ttl: seconds a challenge stays valid.
    :param random: random bytes (``secrets.token_bytes``), for keys and blobs.
    """

    type = AttestationType.TPM
    credentials: tuple[Credential, ...] = (Credential.SAS_TOKEN, Credential.TPM_KEYS)

    def __init__(
        self,
        enrollments: EnrollmentSource,
        challenges: ChallengeStore,
        *,
        clock: Callable[[], float],
        clock_skew: int = 60,
        ttl: float = CHALLENGE_TTL,
        random: Random = secrets.token_bytes,
    ) -> None:
        self._enrollments = enrollments
        self._challenges = challenges
        self._clock = clock
        self._clock_skew = clock_skew
        self._ttl = ttl
        self._random = random

    # --- as an attestor ---------------------------------------------------------------------

    def parse(self, evidence: Evidence) -> SasToken | TpmKeys:
        if evidence.credential is Credential.SAS_TOKEN:
            return check_device_token(
                evidence.authorization,
                evidence.id_scope,
                evidence.registration_id,
                now=int(evidence.now),
                clock_skew=self._clock_skew,
            )
        assert evidence.tpm is not None
        return _keys(*request_keys(evidence.tpm))

    async def individual(
        self, parsed: SasToken | TpmKeys, evidence: Evidence, enrollment: IndividualEnrollment
    ) -> Match:
        if isinstance(parsed, TpmKeys):
            self._check_enrollment(enrollment)
            blob = await self._issue(evidence.registration_id, parsed, enrollment)
            raise TpmChallengeRequired(CHALLENGE_MESSAGE, authentication_key=blob.b64(), key_name=KEY_NAME)
        proof = await self.authenticate(
            parsed,
            evidence.registration_id,
            enrollment=enrollment,
            presented=evidence.tpm,
            consume=evidence.registering,
        )
        hub_key, secondary = self._random(KEY_BYTES), self._random(KEY_BYTES)
        return Match(
            enrollment=enrollment,
            attestation=self.type,
            identity_credential=KeyCredential(
                *(base64.b64encode(k).decode("ascii") for k in (hub_key, secondary))
            ),
            # The identity's key, wrapped for this TPM (only a register's result carries it).
            tpm=TpmRegistrationResult(authentication_key=proof.wrap(hub_key, random=self._random))
            if evidence.registering
            else None,
        )

    async def group(self, parsed: SasToken | TpmKeys, evidence: Evidence) -> Match:
        raise self._not_enrolled(evidence.registration_id)

    # --- the two rounds (also the AMQP SASL mechanism's) -------------------------------------

    async def challenge(
        self, registration_id: str, endorsement_key: bytes, storage_root_key: bytes | None
    ) -> tpm.ActivationBlob:
        """Check the device's EK (and SRK) against its enrollment, store a fresh pending key,
        and return the activation blob that wraps it.

        :raises InvalidBodyError: the EK or SRK is malformed, or the SRK is missing.
        :raises AuthenticationError: no TPM enrollment for ``registration_id``, or another EK.
        """
        keys = _keys(endorsement_key, storage_root_key)
        enrollment = await self._enrollment(registration_id)
        return await self._issue(registration_id, keys, enrollment)

    async def _issue(
        self, registration_id: str, keys: TpmKeys, enrollment: IndividualEnrollment
    ) -> tpm.ActivationBlob:
        self._check_keys(enrollment, keys.endorsement_key, keys.storage_root_key)
        key = self._random(KEY_BYTES)
        blob = tpm.make_activation_blob(keys.ek, keys.srk, key, random=self._random)
        now = self._clock()
        pending = PendingChallenge(
            endorsement_key=base64.b64encode(keys.endorsement_key).decode("ascii"),
            storage_root_key=base64.b64encode(keys.storage_root_key).decode("ascii"),
            key=base64.b64encode(key).decode("ascii"),
            issued=now,
            expires=now + self._ttl,
        )
        await self._challenges.issue(registration_id, pending)
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
        issued = await self._challenges.read(registration_id)
        again = "register without a SAS token (with tpm.endorsementKey and tpm.storageRootKey) for a new challenge"
        if issued is None:
            raise AuthenticationError(
                f"No TPM challenge is pending for {registration_id!r}: {again}.",
                error_code=DpsCode.TPM_CHALLENGE_INVALID,
            )
        pending = issued.challenge
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
            # Another register used it, or a new challenge replaced it, in between: refused.
            if pending.used or not await self._challenges.use(registration_id, issued):
                raise AuthenticationError(used, error_code=DpsCode.TPM_CHALLENGE_INVALID)
        return TpmProof(tpm.endorsement_key(ek), tpm.storage_root_key(srk))

    # --- enrollments ---------------------------------------------------------------------------

    async def _enrollment(self, registration_id: str) -> IndividualEnrollment:
        enrollment = await self._enrollments.individual(registration_id)
        if enrollment is None:
            raise self._not_enrolled(registration_id)
        self._check_enrollment(enrollment)
        return enrollment

    @staticmethod
    def _not_enrolled(registration_id: str) -> AuthenticationError:
        return AuthenticationError(
            f"No individual enrollment is named {registration_id!r}; TPM attestation needs an individual "
            "enrollment with the device's endorsement key (`provisiond tpm ek` prints it).",
            error_code=DpsCode.TPM_NOT_ENROLLED,
        )

    @staticmethod
    def _check_enrollment(enrollment: IndividualEnrollment) -> None:
        require_type(enrollment, AttestationType.TPM, "TPM", DpsCode.TPM_NOT_ENROLLED)
        if enrollment.attestation.tpm is None:
            raise AuthenticationError(
                f"The individual enrollment {enrollment.registration_id!r} has no TPM endorsement key.",
                error_code=DpsCode.TPM_NOT_ENROLLED,
            )

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
