"""Certificates at run time: parse what clients send (PEM, base64 DER, base64 of PEM, PKCS#12,
private keys), describe certificates as DPS does (``X509CertificateInfo``, thumbprints), and
serialise them. Used by the service (enrollments, CA certificates, X.509 attestation) and by the
device client; the development PKI that *makes* certificates is :mod:`provisiond.pki`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

__all__ = [
    "Issued",
    "PrivateKey",
    "certificate_der",
    "certificate_info",
    "certificate_pem",
    "is_self_signed",
    "load_certificate",
    "load_pem_chain",
    "load_pkcs12",
    "load_private_key",
    "private_key_pem",
    "sha1_thumbprint",
    "sha256_thumbprint",
]

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate with its private key and the intermediates between it and the root.

    ``chain`` holds CA certificates only, nearest first, never the root (nor the certificate itself).
    """

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def presented_chain(self) -> list[x509.Certificate]:
        """The certificate followed by its intermediates: what a TLS peer sends."""
        return [self.cert, *self.chain]

    @property
    def is_self_signed(self) -> bool:
        return is_self_signed(self.cert)


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --- information and parsing -------------------------------------------------------------------


def _format_name(name: x509.Name) -> str:
    # Most specific first, as RFC 4514 and .NET's X500DistinguishedName.Name (which DPS uses) print it,
    # with .NET's ", " separator.
    return ", ".join(rdn.rfc4514_string() for rdn in reversed(name.rdns))


def _iso_z(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def certificate_info(cert: x509.Certificate) -> dict[str, str | int]:
    """DPS's ``X509CertificateInfo`` for ``cert``.

    Thumbprints and the serial number are upper-case hex; the serial is its DER content octets
    (a leading ``00`` when the top bit is set), as .NET prints it. Names are most-specific first,
    ``CN=leaf, O=org``.
    """
    serial = cert.serial_number
    serial_bytes = serial.to_bytes(max(1, (serial.bit_length() + 8) // 8), "big", signed=True)
    return {
        "subjectName": _format_name(cert.subject),
        "sha1Thumbprint": sha1_thumbprint(cert),
        "sha256Thumbprint": sha256_thumbprint(cert),
        "issuerName": _format_name(cert.issuer),
        "notBeforeUtc": _iso_z(cert.not_valid_before_utc),
        "notAfterUtc": _iso_z(cert.not_valid_after_utc),
        "serialNumber": serial_bytes.hex().upper(),
        "version": cert.version.value + 1,
    }


def load_pem_chain(text: str | bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM text, in file order.

    :raises ValueError: the text holds no certificate or a malformed one.
    """
    data = text.encode("ascii") if isinstance(text, str) else text
    return x509.load_pem_x509_certificates(data)


def load_certificate(text: str) -> x509.Certificate:
    """The one certificate in ``text``, in any of the three forms DPS's clients send: PEM text,
    base64 of DER, or base64 of PEM text (the official C service client always sends that, and
    so do many Node.js users). Whitespace and line breaks inside the base64 are ignored.

    :raises ValueError: none of the three forms, a malformed certificate (its extensions
        included: one that cannot be read would fail every registration that meets it), or more
        than one.
    """
    data = text.strip().encode("utf-8", "replace")
    if not data.startswith(b"-----BEGIN"):
        try:
            data = base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("neither PEM text nor base64 (of DER or of PEM text)") from None
        if not data.lstrip().startswith(b"-----BEGIN"):
            return _with_readable_extensions(x509.load_der_x509_certificate(data))  # DER may end in any byte
    certs = x509.load_pem_x509_certificates(data)
    if len(certs) != 1:
        raise ValueError(f"{len(certs)} certificates where one was expected")
    return _with_readable_extensions(certs[0])


def _with_readable_extensions(cert: x509.Certificate) -> x509.Certificate:
    """``cert``, once its extensions parse. :raises ValueError: they do not (one twice, say)."""
    try:
        cert.extensions  # noqa: B018  # parsed here, and cached by cryptography
    except x509.DuplicateExtension as exc:
        raise ValueError(f"the certificate has the extension {exc.oid.dotted_string} twice") from None
    return cert


def load_private_key(data: bytes, password: str | bytes | None = None) -> PrivateKey:
    """An EC or RSA private key from PEM (PKCS#8 or traditional).

    :raises ValueError: not a key, or the wrong (or a missing) password.
    :raises TypeError: a key of another type (DSA, Ed25519, ...).
    """
    secret = password.encode() if isinstance(password, str) else password
    try:
        key = serialization.load_pem_private_key(data, secret)
    except TypeError as exc:  # cryptography's way to say "encrypted, but no password" and vice versa
        raise ValueError(str(exc)) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"unsupported key type {type(key).__name__} (expected EC or RSA)")
    return key


def certificate_der(cert: x509.Certificate) -> bytes:
    """The certificate's DER encoding (what TLS carries and thumbprints hash)."""
    return cert.public_bytes(serialization.Encoding.DER)


def certificate_pem(*certs: x509.Certificate) -> bytes:
    """The certificates as concatenated PEM blocks."""
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def private_key_pem(key: PrivateKey, password: str | bytes | None = None) -> bytes:
    """The key as PKCS#8 PEM, encrypted when a password is given."""
    encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    if password:
        encryption = serialization.BestAvailableEncryption(
            password.encode() if isinstance(password, str) else password
        )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def sha1_thumbprint(cert: x509.Certificate) -> str:
    """Upper-case hex SHA-1 of the DER certificate (DPS's ``sha1Thumbprint``)."""
    return hashlib.sha1(certificate_der(cert)).hexdigest().upper()


def sha256_thumbprint(cert: x509.Certificate) -> str:
    """Upper-case hex SHA-256 of the DER certificate (DPS's ``sha256Thumbprint``; IoT Hub's
    selfSigned identities created by DPS carry it)."""
    return hashlib.sha256(certificate_der(cert)).hexdigest().upper()


# --- PKCS#12 -----------------------------------------------------------------------------------


def load_pkcs12(data: bytes, password: str | bytes | None) -> Issued:
    """Read back a PKCS#12 file made by :func:`to_pkcs12` (or any with one EC/RSA key and certificate).

    :raises ValueError: wrong password, not PKCS#12, or no key/certificate inside.
    :raises TypeError: the key is neither EC nor RSA.
    """
    secret = password.encode() if isinstance(password, str) else password
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, secret)
    except ValueError as exc:
        raise ValueError("cannot open the PKCS#12 data: wrong password or not a PKCS#12 file") from exc
    if cert is None or key is None:
        raise ValueError("the PKCS#12 file holds no certificate with its private key")
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"unsupported key type {type(key).__name__} (expected EC or RSA)")
    chain = tuple(c for c in extra if c != cert and not is_self_signed(c))
    return Issued(cert, key, chain)
