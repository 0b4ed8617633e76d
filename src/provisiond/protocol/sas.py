"""Shared access signature (SAS) tokens: build, parse and verify. Pure: the clock is passed in.

One format serves the service API (``sr`` = the service host, ``skn`` = a policy name) and the
device API (``sr`` = ``{idScope}/registrations/{registrationId}``, ``skn`` = ``registration`` or
absent)::

    SharedAccessSignature sr={url-encoded resource}&sig={url-encoded base64 HMAC}&se={expiry}[&skn={name}]

``sig`` = base64(HMAC-SHA256(base64decode(key), "{url-encoded sr}\\n{se}")). The SDKs disagree on
how they URL-encode ``sr`` (``quote``, ``quote_plus``, .NET ``WebUtility.UrlEncode``, or not at
all), so verification tries the resource as it appeared in the token, then its canonical
encodings, comparing each signature in constant time.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, quote_plus, unquote, unquote_plus, unquote_to_bytes, urlencode

from ..errors import AuthenticationError, InvalidBodyError

__all__ = [
    "SasToken",
    "build_sas_token",
    "check_key",
    "derive_device_key",
    "generate_key",
    "parse_sas_token",
    "percent_decoded",
    "sign",
    "signed_sas_token",
    "verify_signature",
]

_PREFIX = "SharedAccessSignature "
#: A symmetric key's size in bytes: what DPS and IoT Hub accept (DPS generates the largest).
MIN_KEY_BYTES, MAX_KEY_BYTES = 16, 64
_MAX_TOKEN_LENGTH = 4096


@dataclass(frozen=True, slots=True)
class SasToken:
    """A parsed token. ``resource`` is URL-decoded; ``raw_resource`` is as it appeared."""

    resource: str
    raw_resource: str
    signature: str
    expiry: int
    key_name: str | None


def sign(key: str | bytes, resource_encoded: str, expiry: int) -> str:
    """The base64 HMAC-SHA256 signature of ``"{resource_encoded}\\n{expiry}"`` under ``key``
    (a base64 string, or raw key bytes)."""
    raw_key = base64.b64decode(key, validate=True) if isinstance(key, str) else key
    digest = hmac.digest(raw_key, f"{resource_encoded}\n{expiry}".encode(), "sha256")
    return base64.b64encode(digest).decode("ascii")


def build_sas_token(resource: str, key: str | bytes, expiry: int, *, key_name: str | None = None) -> str:
    """A SAS token for ``resource`` (unencoded) valid until ``expiry`` (Unix seconds)."""
    raw_key = base64.b64decode(key, validate=True) if isinstance(key, str) else key
    return signed_sas_token(
        resource,
        expiry,
        lambda message: hmac.digest(raw_key, message, "sha256"),
        key_name=key_name,
    )


def signed_sas_token(
    resource: str, expiry: int, signer: Callable[[bytes], bytes], *, key_name: str | None = None
) -> str:
    """A SAS token whose HMAC-SHA256 ``signer`` computes over ``"{encoded sr}\\n{expiry}"``
    (a key that never leaves a TPM or an HSM)."""
    encoded = quote(resource, safe="")
    signature = base64.b64encode(signer(f"{encoded}\n{expiry}".encode())).decode("ascii")
    fields = {"sig": signature, "se": str(expiry)}
    if key_name:
        fields["skn"] = key_name
    # sr is already encoded; encode sig/se/skn only.
    return f"{_PREFIX}sr={encoded}&{urlencode(fields, quote_via=quote)}"


def derive_device_key(group_key: str, registration_id: str) -> str:
    """An enrollment-group device key: base64(HMAC-SHA256(base64decode(group_key), registration_id))."""
    mac = _keyed(group_key).copy()
    mac.update(registration_id.encode("utf-8"))
    return base64.b64encode(mac.digest()).decode("ascii")


@functools.lru_cache(maxsize=256)
def _keyed(key: str) -> hmac.HMAC:
    """An HMAC-SHA256 keyed with base64-encoded ``key``, to be copied: a group's key derives
    every device key of the group, and a copy costs about half of keying anew (decoding
    the key and fetching the digest included)."""
    return hmac.new(base64.b64decode(key), digestmod=hashlib.sha256)


def parse_sas_token(token: str) -> SasToken:
    """Parse a token (with or without the ``SharedAccessSignature`` prefix). The last
    :data:`_PARSED` tokens parsed are remembered: an MQTT or AMQP device's token is parsed when
    its CONNECT or SASL PLAIN is checked, and again when it registers.

    :raises AuthenticationError: the token is malformed (the message says how).
    """
    if len(token) > _MAX_TOKEN_LENGTH:
        raise AuthenticationError("The SAS token is too long.")
    return _parse(token)


#: How many parsed tokens :func:`parse_sas_token` remembers.
_PARSED = 1024


@functools.lru_cache(maxsize=_PARSED)
def _parse(token: str) -> SasToken:
    text = token.strip()
    if text.startswith(_PREFIX) or text.lower().startswith(_PREFIX.lower()):
        text = text[len(_PREFIX) :]
    else:
        raise AuthenticationError("The authorization is not a SharedAccessSignature token.")
    raw: dict[str, str] = {}
    for part in text.split("&"):
        name, sep, value = part.partition("=")
        if not sep:
            raise AuthenticationError(f"The SAS token has a malformed field {name[:32]!r}.")
        raw[name.strip()] = value.strip()
    resource, signature, expiry_text = raw.get("sr"), raw.get("sig"), raw.get("se")
    if not (resource and signature and expiry_text):
        missing = [name for name in ("sr", "sig", "se") if not raw.get(name)]
        raise AuthenticationError(f"The SAS token lacks {', '.join(missing)}.")
    try:
        expiry = int(expiry_text)
    except ValueError:
        raise AuthenticationError("The SAS token's expiry (se) is not an integer.") from None
    # As a query parser reads it ("+" a space, %XX decoded); an empty skn is no key name.
    skn = unquote_plus(raw["skn"]) if raw.get("skn") else None
    return SasToken(
        resource=percent_decoded(resource.replace("+", " ")),
        raw_resource=resource,
        signature=percent_decoded(signature),
        expiry=expiry,
        key_name=skn,
    )


def percent_decoded(text: str) -> str:
    """``urllib.parse.unquote(text)``, for about half its cost on the ASCII text a token is:
    ``unquote`` splits its argument into ASCII and other runs with a regular expression and
    decodes each ASCII run as UTF-8, which for ASCII text is the one run, whole."""
    if "%" not in text:
        return text
    if text.isascii():
        return unquote_to_bytes(text).decode("utf-8", "replace")
    return unquote(text)


def verify_signature(token: SasToken, key: str | bytes) -> bool:
    """Whether the token was signed with ``key``: over ``sr`` as the token carries it (what
    every official SDK signs), else over one of the other encodings the SDKs use. Each
    signature is compared in constant time; which encoding matched is no secret (the client
    chose it), so the first match ends the search."""
    try:
        expected = base64.b64decode(token.signature, validate=True)
        raw_key = base64.b64decode(key, validate=True) if isinstance(key, str) else key
    except (binascii.Error, ValueError):
        return False
    tail = f"\n{token.expiry}"

    def signed_over(encoded: str) -> bool:
        return hmac.compare_digest(hmac.digest(raw_key, (encoded + tail).encode(), "sha256"), expected)

    if signed_over(token.raw_resource):
        return True
    others = {quote(token.resource, safe=""), quote_plus(token.resource), token.resource}
    others.discard(token.raw_resource)
    return any(signed_over(encoded) for encoded in others)


def generate_key(size: int = MAX_KEY_BYTES) -> str:
    """A new symmetric key: ``size`` random bytes, base64 (DPS generates 64, IoT Hub's policy
    keys are 32)."""
    return base64.b64encode(secrets.token_bytes(size)).decode("ascii")


def check_key(value: str, field: str) -> str:
    """``value`` if it is a symmetric key DPS and IoT Hub accept (base64 of 16 to 64 bytes).

    :raises InvalidBodyError: it is not (400004, the message names ``field``).
    """
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBodyError(f"{field} is not valid base64.") from None
    if not MIN_KEY_BYTES <= len(raw) <= MAX_KEY_BYTES:
        raise InvalidBodyError(
            f"{field} must decode to {MIN_KEY_BYTES}-{MAX_KEY_BYTES} bytes, not {len(raw)}."
        )
    return value
