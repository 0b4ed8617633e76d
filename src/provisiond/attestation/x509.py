"""X.509 attestation checks, pure (no I/O; the time is passed in).

The TLS front accepts any client certificate and hands over the chain the device presented
(leaf first). These helpers parse it, walk it for enrollment-group candidates, and verify a
chain up to the certificate an enrollment names, with ``cryptography``'s verifier: signatures,
validity dates and CA constraints. The end-entity policy permits any extensions (device
certificates usually carry a CN and no SAN); CA certificates must assert basicConstraints CA.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification as xv
from cryptography.x509.oid import NameOID

from ..certificates import sha1_thumbprint
from ..errors import AuthenticationError, DpsCode

__all__ = [
    "PresentedChain",
    "common_name",
    "find_anchor",
    "is_ca",
    "match_individual",
    "parse_presented_chain",
    "verify_chain",
    "verify_self_signed",
]

_MAX_CHAIN = 8
_DER = Encoding.DER


def is_ca(cert: x509.Certificate) -> bool:
    """Whether the certificate asserts basicConstraints CA (only such can sign a device's)."""
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


@dataclass(frozen=True)
class PresentedChain:
    """The device's certificates, leaf first, as parsed from the TLS handshake."""

    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        return (self.leaf, *self.intermediates)


def parse_presented_chain(der_chain: Sequence[bytes]) -> PresentedChain:
    """Parse the DER chain from the TLS front.

    :raises AuthenticationError: no certificate, too many, or one that does not parse.
    """
    if not der_chain:
        raise AuthenticationError(
            "No client certificate was presented: X.509 devices must present their certificate "
            "(and its intermediates) in the TLS handshake.",
            error_code=DpsCode.X509_NO_CERTIFICATE,
        )
    if len(der_chain) > _MAX_CHAIN:
        raise AuthenticationError(
            f"The presented chain has {len(der_chain)} certificates; at most {_MAX_CHAIN}.",
            error_code=DpsCode.X509_CHAIN_INVALID,
        )
    try:
        certs = [x509.load_der_x509_certificate(der) for der in der_chain]
    except ValueError as exc:
        raise AuthenticationError(
            f"A presented certificate does not parse: {exc}", error_code=DpsCode.X509_CHAIN_INVALID
        ) from None
    return PresentedChain(certs[0], tuple(certs[1:]))


def _check_dates(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if cert.not_valid_after_utc < now:
        raise AuthenticationError(
            f"The {what} certificate {cert.subject.rfc4514_string()!r} expired on {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}.",
            error_code=DpsCode.X509_EXPIRED,
        )
    if cert.not_valid_before_utc > now:
        raise AuthenticationError(
            f"The {what} certificate {cert.subject.rfc4514_string()!r} is not valid before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}.",
            error_code=DpsCode.X509_EXPIRED,
        )


_CA_POLICY = xv.ExtensionPolicy.permit_all().require_present(
    x509.BasicConstraints, xv.Criticality.AGNOSTIC, None
)
_EE_POLICY = xv.ExtensionPolicy.permit_all()


def verify_chain(chain: PresentedChain, anchor: x509.Certificate, now: dt.datetime) -> None:
    """Verify that the leaf chains to ``anchor`` through the presented intermediates (which may
    include ``anchor`` itself or certificates above it; those are ignored).

    :raises AuthenticationError: expired or not-yet-valid certificates, or no valid path.
    """
    for i, cert in enumerate(chain.certificates):
        if cert == anchor:
            break
        _check_dates(cert, now, "device" if i == 0 else "intermediate")
    _check_dates(anchor, now, "enrollment's signing")
    verifier = (
        xv.PolicyBuilder()
        .store(xv.Store([anchor]))
        .time(now)
        .max_chain_depth(_MAX_CHAIN)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        verifier.verify(chain.leaf, list(chain.intermediates))
    except xv.VerificationError as exc:
        raise AuthenticationError(
            f"The presented certificate chain does not verify up to {anchor.subject.rfc4514_string()!r}: {exc}",
            error_code=DpsCode.X509_CHAIN_INVALID,
        ) from None


def verify_self_signed(cert: x509.Certificate, now: dt.datetime) -> None:
    """Check the dates of a leaf enrolled by its own certificate (matched by thumbprint; the TLS
    handshake proved the device holds its key)."""
    _check_dates(cert, now, "device")


T = TypeVar("T")


def match_individual(
    name: str, enrolled: Sequence[x509.Certificate], chain: PresentedChain, now: dt.datetime
) -> None:
    """Check a chain against an individual enrollment's certificates: the leaf itself (by
    thumbprint; the TLS handshake proved the key), or a CA certificate that signed it (in the
    chain, or the issuer of its topmost certificate), verified up to it.

    :raises AuthenticationError: neither, or the chain does not verify.
    """
    leaf_print = sha1_thumbprint(chain.leaf)
    for anchor in enrolled:
        if sha1_thumbprint(anchor) == leaf_print:
            verify_self_signed(chain.leaf, now)
            return
    for anchor in filter(is_ca, enrolled):
        if anchor in chain.intermediates or chain.certificates[-1].issuer == anchor.subject:
            verify_chain(chain, anchor, now)
            return
    raise AuthenticationError(
        f"The presented certificate (SHA-1 {leaf_print}) is not the certificate of the individual enrollment "
        f"{name!r}, nor signed by it.",
        error_code=DpsCode.X509_CHAIN_INVALID,
    )


def find_anchor(
    chain: PresentedChain, candidates: Sequence[tuple[T, x509.Certificate]]
) -> tuple[T, x509.Certificate] | None:
    """The first candidate (an enrollment group and its certificate) met walking the presented
    chain from the first intermediate up, then the CA that issued the topmost certificate; the
    first match decides. The chain is not verified here (see :func:`verify_chain`)."""
    for cert in chain.intermediates:
        for owner, anchor in candidates:
            if anchor == cert:
                return owner, anchor
    top = chain.certificates[-1]
    for owner, anchor in candidates:
        if top.issuer == anchor.subject and top != anchor and is_ca(anchor):
            return owner, anchor
    return None
