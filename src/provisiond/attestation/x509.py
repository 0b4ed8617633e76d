"""X.509 attestation: the checks, pure (no I/O; the time is passed in), and the attestor.

The TLS front accepts any client certificate and hands over the chain the device presented
(leaf first). These helpers parse it, walk it for enrollment-group candidates, and verify a
chain up to the certificate an enrollment names, with ``cryptography``'s verifier: signatures,
validity dates and CA constraints. The end-entity policy permits any extensions (device
certificates usually carry a CN and no SAN); CA certificates must assert basicConstraints CA.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification as xv
from cryptography.x509.oid import NameOID

from .. import certificates
from ..certificates import sha1_thumbprint
from ..errors import AuthenticationError, DpsCode
from ..models import (
    AttestationType,
    CaCertificate,
    EnrollmentGroup,
    IndividualEnrollment,
    X509CertificateInfo,
)
from ..protocol.messages import X509RegistrationResult
from .base import CaSource, CertificateCredential, Credential, EnrollmentSource, Evidence, Match

__all__ = [
    "PresentedChain",
    "PresentedDevice",
    "X509Attestor",
    "common_name",
    "find_anchor",
    "is_ca",
    "match_individual",
    "parse_presented_chain",
    "verify_chain",
    "verify_self_signed",
]

_MAX_CHAIN = 8
#: The most certificates a device may present (the trusted front's header parser applies it too).
MAX_CHAIN = _MAX_CHAIN
_DER = Encoding.DER


def is_ca(cert: x509.Certificate) -> bool:
    """Whether the certificate asserts basicConstraints CA (only such can sign a device's); an
    enrolled certificate whose extensions cannot be read (one twice, say: enrolled before that
    was refused) signs nothing."""
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
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


def _signs_certificates(policy: object, cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
    """A CA certificate whose keyUsage is given must allow keyCertSign (RFC 5280 4.2.1.3): the
    verifier's own CA policy checks it, and the permissive one below would not."""
    if usage is not None and not usage.key_cert_sign:
        raise ValueError(f"{cert.subject.rfc4514_string()!r} is a CA whose keyUsage lacks keyCertSign")


# Permissive, as device PKIs often are (no authority key identifier, say), but basicConstraints
# must be there and a CA's keyUsage, when given, must allow signing certificates.
_CA_POLICY = (
    xv.ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, xv.Criticality.AGNOSTIC, None)
    .may_be_present(x509.KeyUsage, xv.Criticality.AGNOSTIC, _signs_certificates)
)
_EE_POLICY = xv.ExtensionPolicy.permit_all()


def verify_chain(chain: PresentedChain, anchor: x509.Certificate, now: dt.datetime) -> None:
    """Verify that the leaf chains to ``anchor`` through the presented intermediates (which may
    include ``anchor`` itself or certificates above it; those are ignored).

    A path above the leaf that verified once is remembered (:class:`_VerifiedPaths`): a device
    presenting the same intermediates for the same anchor then has only its own link checked
    (its signature by the same issuer, its dates and extensions), one signature instead of
    two or more.

    :raises AuthenticationError: expired or not-yet-valid certificates, or no valid path.
    """
    for i, cert in enumerate(chain.certificates):
        if cert == anchor:
            break
        _check_dates(cert, now, "device" if i == 0 else "intermediate")
    _check_dates(anchor, now, "enrollment's signing")
    issuer = _VERIFIED_PATHS.issuer(anchor, chain.intermediates)
    if issuer is not None:
        try:
            _verifier(issuer, now).verify(chain.leaf, [])
            return
        except xv.VerificationError:
            pass  # the whole path is verified again below, and its error is the one reported
    try:
        verified = _verifier(anchor, now).verify(chain.leaf, list(chain.intermediates))
    except xv.VerificationError as exc:
        raise AuthenticationError(
            f"The presented certificate chain does not verify up to {anchor.subject.rfc4514_string()!r}: "
            f"{_reason(exc)}",
            error_code=DpsCode.X509_CHAIN_INVALID,
        ) from None
    _VERIFIED_PATHS.remember(anchor, chain.intermediates, verified.chain)


def _verifier(anchor: x509.Certificate, now: dt.datetime) -> xv.ClientVerifier:
    return (
        xv.PolicyBuilder()
        .store(xv.Store([anchor]))
        .time(now)
        .max_chain_depth(_MAX_CHAIN)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )


#: Extensions of a CA certificate whose checks depend on the certificates below it: a path
#: with any of them is never remembered (the leaf must be checked against them every time).
_LEAF_DEPENDENT = (x509.NameConstraints, x509.PolicyConstraints, x509.InhibitAnyPolicy)


class _VerifiedPaths:
    """Paths above a leaf that verified: for an anchor and the intermediates a device presented,
    the certificate that issued that device's leaf in the verified path. Whatever the verifier
    checks above the leaf (the intermediates' signatures, CA constraints, path lengths, key
    usages) depends only on those certificates, not on the leaf, except name and policy
    constraints; paths with those are not kept. So another leaf below the same issuer, with the
    same intermediates presented, needs only its own link verified, with the issuer as the trust
    anchor. Dates are checked on every call by :func:`verify_chain` (a path verified once
    does not outlive its certificates), and a leaf whose short check fails gets the full one.
    At most ``size`` paths, the oldest dropped first; content-addressed, so shared by every
    store and event loop of the process."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._issuers: dict[tuple[x509.Certificate, tuple[x509.Certificate, ...]], x509.Certificate] = {}

    def issuer(
        self, anchor: x509.Certificate, intermediates: tuple[x509.Certificate, ...]
    ) -> x509.Certificate | None:
        return self._issuers.get((anchor, intermediates))

    def remember(
        self,
        anchor: x509.Certificate,
        intermediates: tuple[x509.Certificate, ...],
        path: Sequence[x509.Certificate],
    ) -> None:
        """``path``: the verified path, leaf first, anchor last."""
        if len(path) < 3:  # the leaf's issuer is the anchor: nothing to save
            return
        for cert in path[1:]:
            try:
                extensions = cert.extensions
            except (ValueError, x509.DuplicateExtension):  # extensions the Python API cannot read
                return
            for extension in _LEAF_DEPENDENT:
                try:
                    extensions.get_extension_for_class(extension)
                except x509.ExtensionNotFound:
                    continue
                return
        key = (anchor, intermediates)
        if key not in self._issuers and len(self._issuers) >= self._size:
            del self._issuers[next(iter(self._issuers))]
        self._issuers[key] = path[1]


_VERIFIED_PATHS = _VerifiedPaths()


#: The verifier's words for a key or signature algorithm it refuses are followed by a debug
#: dump of the algorithm's parameters (a DSA prime of any size the peer chose): said plainly.
_FORBIDDEN = {
    "Forbidden public key algorithm": "a certificate's public key algorithm is not allowed (RSA of at "
    "least 2048 bits, or EC on P-256, P-384 or P-521)",
    "Forbidden signature algorithm": "a certificate's signature algorithm is not allowed",
}
_MAX_REASON = 300


def _reason(exc: xv.VerificationError) -> str:
    """Why a chain does not verify, for the error and the log line, bounded in length."""
    text = str(exc)
    for words, plain in _FORBIDDEN.items():
        if words in text:
            return plain
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON] + "..."


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


# --- the attestor ----------------------------------------------------------------------------------


class PresentedDevice(msgspec.Struct, frozen=True):
    """A presented chain whose leaf names the registration id, described as DPS reports it."""

    chain: PresentedChain
    info: X509CertificateInfo
    sha256_thumbprint: str


def _info(cert: x509.Certificate) -> X509CertificateInfo:
    return msgspec.convert(certificates.certificate_info(cert), X509CertificateInfo)


# Enrollments' certificates (a group's signing certificate, a CA certificate) are the same PEM on
# every registration of their devices: parsed and described once (pure functions of the PEM).
@functools.lru_cache(maxsize=256)
def _enrolled_certificate(pem: str) -> x509.Certificate:
    return certificates.load_pem_chain(pem)[0]


@functools.lru_cache(maxsize=256)
def _enrolled_info(cert: x509.Certificate) -> X509CertificateInfo:
    return _info(cert)


class X509Attestor:
    """X.509 attestation: the leaf's CN is the registration id; an individual enrollment matches
    the leaf (or a CA certificate of its chain), else the chain is walked from the first
    intermediate up for a group (its signing certificate, or a verified CA certificate it
    references), and verified up to what matched."""

    type = AttestationType.X509
    credentials: tuple[Credential, ...] = (Credential.CERTIFICATE,)

    def __init__(self, enrollments: EnrollmentSource, cas: CaSource) -> None:
        self._enrollments = enrollments
        self._cas = cas

    def parse(self, evidence: Evidence) -> PresentedDevice:
        chain = parse_presented_chain(evidence.client_chain)
        cn = common_name(chain.leaf)
        if cn is None or cn.lower() != evidence.registration_id.lower():
            raise AuthenticationError(
                f"The device certificate's subject CN {cn!r} is not the registration id {evidence.registration_id!r}.",
                error_code=DpsCode.X509_CN_MISMATCH,
            )
        return PresentedDevice(chain, _info(chain.leaf), certificates.sha256_thumbprint(chain.leaf))

    async def individual(
        self, parsed: PresentedDevice, evidence: Evidence, enrollment: IndividualEnrollment
    ) -> Match:
        x509_att = enrollment.attestation.x509
        if enrollment.attestation.type is not AttestationType.X509 or x509_att is None:
            raise AuthenticationError(
                f"The individual enrollment {enrollment.registration_id!r} uses "
                f"{enrollment.attestation.type.value} attestation, not X.509.",
                error_code=DpsCode.X509_CHAIN_INVALID,
            )
        certs = x509_att.client_certificates
        enrolled = (
            [c.certificate for c in (certs.primary, certs.secondary) if c and c.certificate] if certs else []
        )
        match_individual(
            enrollment.registration_id,
            [certificates.load_pem_chain(pem)[0] for pem in enrolled],
            parsed.chain,
            evidence.moment,
        )
        return Match(
            enrollment=enrollment,
            attestation=self.type,
            identity_credential=CertificateCredential(parsed.sha256_thumbprint, from_group=False),
            x509=X509RegistrationResult(certificate_info=parsed.info),
        )

    async def group(self, parsed: PresentedDevice, evidence: Evidence) -> Match:
        group, anchor = await self._find_group(parsed.chain)
        verify_chain(parsed.chain, anchor, evidence.moment)
        return Match(
            enrollment=group,
            attestation=self.type,
            identity_credential=CertificateCredential(parsed.sha256_thumbprint, from_group=True),
            x509=X509RegistrationResult(
                certificate_info=parsed.info,
                enrollment_group_id=group.enrollment_group_id,
                signing_certificate_info=_enrolled_info(anchor),
            ),
        )

    async def _find_group(self, chain: PresentedChain) -> tuple[EnrollmentGroup, x509.Certificate]:
        groups = await self._enrollments.groups(self.type)
        referenced = [name for group in groups for name in _ca_references(group)]
        cas = await self._cas.ca_certificates(referenced) if referenced else {}
        unverified: list[str] = []
        candidates: list[tuple[EnrollmentGroup, x509.Certificate]] = []
        for group in groups:
            pems = _group_anchors(group, cas, unverified)
            candidates += [(group, _enrolled_certificate(pem)) for pem in pems]
        found = find_anchor(chain, candidates)
        if found is not None:
            return found
        hint = f" (CA certificates not verified: {', '.join(unverified)})" if unverified else ""
        raise AuthenticationError(
            f"No individual enrollment is named {common_name(chain.leaf)!r}, and no X.509 enrollment group's "
            f"certificate is in, or signed, the presented chain of {len(chain.certificates)} certificate(s){hint}.",
            error_code=DpsCode.X509_CHAIN_INVALID,
        )


def _ca_references(group: EnrollmentGroup) -> list[str]:
    refs = group.attestation.x509.ca_references if group.attestation.x509 else None
    return [name for name in (refs.primary, refs.secondary) if name] if refs else []


def _group_anchors(group: EnrollmentGroup, cas: dict[str, CaCertificate], unverified: list[str]) -> list[str]:
    """The PEM certificates a group's devices may chain to: its signing certificates and the
    verified CA certificates it references (unverified ones are noted for the error message)."""
    x509_att = group.attestation.x509
    if x509_att is None:
        return []
    pems: list[str] = []
    signing = x509_att.signing_certificates
    if signing is not None:
        pems += [c.certificate for c in (signing.primary, signing.secondary) if c and c.certificate]
    for name in _ca_references(group):
        ca = cas.get(name.lower())
        if ca is not None and ca.certificate:
            if ca.is_verified:
                pems.append(ca.certificate)
            else:
                unverified.append(f"{ca.name} (group {group.enrollment_group_id})")
    return pems
