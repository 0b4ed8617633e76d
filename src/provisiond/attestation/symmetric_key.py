"""Symmetric-key attestation on the service side: a device's SAS token, checked against the
keys of its enrollment (individual) or the keys derived from its group's (group). Pure."""

from __future__ import annotations

from ..errors import AuthenticationError, DpsCode
from ..protocol.sas import SasToken, derive_device_key, parse_sas_token, verify_signature

__all__ = ["check_device_token", "matches_any", "matches_group"]


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
    return any(verify_signature(token, derive_device_key(key, registration_id)) for key in group_keys if key)
