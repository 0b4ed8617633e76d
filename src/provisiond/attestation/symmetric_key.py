"""Symmetric-key attestation on the service side: a device's SAS token, checked against the
keys of its enrollment (individual) or the keys derived from its group's (group)."""

from __future__ import annotations

from ..errors import AuthenticationError, DpsCode
from ..models import AttestationType, IndividualEnrollment
from ..protocol.messages import SymmetricKeyRegistrationResult
from ..protocol.sas import SasToken, derive_device_key, parse_sas_token, verify_signature
from .base import Credential, EnrollmentSource, Evidence, KeyCredential, Match, require_type

__all__ = ["SymmetricKeyAttestor", "check_device_token", "matches_any", "matches_group"]


def check_device_token(
    authorization: str | None, id_scope: str, registration_id: str, *, now: int, clock_skew: int
) -> SasToken:
    """Parse a device's SAS token and check what can be checked without a key: its audience
    (``{idScope}/registrations/{registrationId}``) and its expiry.

    :raises AuthenticationError: missing, malformed, expired, or for another device or scope.
    """
    if not authorization:
        raise AuthenticationError(
            "No credential: send a SharedAccessSignature token (symmetric key or TPM), or present the "
            "device certificate in the TLS handshake (X.509).",
            error_code=DpsCode.UNAUTHENTICATED,
        )
    token = parse_sas_token(authorization)
    expected = f"{id_scope}/registrations/{registration_id}".lower()
    if token.resource.lower() != expected:
        raise AuthenticationError(
            f"The SAS token is for {token.resource[:200]!r}, not {id_scope}/registrations/{registration_id}: "
            "check the ID scope and the registration id.",
            error_code=DpsCode.TOKEN_AUDIENCE,
        )
    if token.expiry + clock_skew < now:
        raise AuthenticationError(
            f"The SAS token expired {now - token.expiry} s ago (se={token.expiry}).",
            error_code=DpsCode.TOKEN_EXPIRED,
        )
    return token


def matches_any(token: SasToken, keys: list[str | None]) -> bool:
    """Whether the token was signed with one of ``keys`` (primary, secondary)."""
    return any(verify_signature(token, key) for key in keys if key)


def matches_group(token: SasToken, group_keys: list[str | None], registration_id: str) -> bool:
    """Whether the token was signed with a device key derived from one of the group's keys."""
    return matches_any(
        token, [derive_device_key(key, registration_id) if key else None for key in group_keys]
    )


class SymmetricKeyAttestor:
    """Symmetric-key attestation: the token must be signed with the individual enrollment's
    keys, or with the key derived from a symmetric-key group's (the group of the device's last
    registration is tried first: a re-registration costs one HMAC)."""

    type = AttestationType.SYMMETRIC_KEY
    credentials: tuple[Credential, ...] = (Credential.SAS_TOKEN,)

    def __init__(self, enrollments: EnrollmentSource, *, clock_skew: int) -> None:
        self._enrollments = enrollments
        self._clock_skew = clock_skew

    def parse(self, evidence: Evidence) -> SasToken:
        return check_device_token(
            evidence.authorization,
            evidence.id_scope,
            evidence.registration_id,
            now=int(evidence.now),
            clock_skew=self._clock_skew,
        )

    async def individual(
        self, parsed: SasToken, evidence: Evidence, enrollment: IndividualEnrollment
    ) -> Match:
        name = enrollment.registration_id
        require_type(enrollment, self.type, "a symmetric key", DpsCode.TOKEN_INVALID)
        keys = enrollment.attestation.symmetric_key
        if keys is None or not matches_any(parsed, [keys.primary_key, keys.secondary_key]):
            raise AuthenticationError(
                f"The SAS token was not signed with a key of the individual enrollment {name!r}.",
                error_code=DpsCode.TOKEN_INVALID,
            )
        return Match(
            enrollment=enrollment,
            attestation=self.type,
            identity_credential=KeyCredential(keys.primary_key, keys.secondary_key),
            symmetric_key=SymmetricKeyRegistrationResult(),
        )

    async def group(self, parsed: SasToken, evidence: Evidence) -> Match:
        reg_id = evidence.registration_id
        hint = evidence.last_group
        groups = await self._enrollments.groups(self.type)
        if hint:
            groups.sort(key=lambda g: g.enrollment_group_id.lower() != hint.lower())
        for group in groups:
            keys = group.attestation.symmetric_key
            if keys is None:
                continue
            derived = [
                derive_device_key(key, reg_id) if key else None
                for key in (keys.primary_key, keys.secondary_key)
            ]
            if matches_any(parsed, derived):  # the device keys, derived once: they become its identity's
                return Match(
                    enrollment=group,
                    attestation=self.type,
                    identity_credential=KeyCredential(*derived),
                    symmetric_key=SymmetricKeyRegistrationResult(
                        enrollment_group_id=group.enrollment_group_id
                    ),
                )
        raise AuthenticationError(
            f"No individual enrollment is named {reg_id!r}, and no symmetric-key enrollment group's derived key "
            "signed the SAS token.",
            error_code=DpsCode.TOKEN_INVALID,
        )
