"""A development PKI built on ``cryptography``: CAs, server and device certificates, PKCS#12.

Everything here is a pure function unless its name says it writes or reads files
(``write_*``, ``read_*``, ``ensure_dev_pki``). The certificates follow the rules that strict
verifiers apply, so they work with Python 3.13's default client context
(``VERIFY_X509_STRICT``) and with ``cryptography``'s verifier:

* every certificate has a SubjectKeyIdentifier and an AuthorityKeyIdentifier;
* CA certificates have critical BasicConstraints(ca=True) and KeyUsage(keyCertSign, cRLSign);
* server certificates have a SubjectAlternativeName (DNS and IP) and ExtendedKeyUsage serverAuth;
* device certificates have ExtendedKeyUsage clientAuth and no SAN (as DPS devices usually do).

An :class:`Issued` keeps a certificate, its key and its *chain*: the intermediate CA
certificates between it and the root, nearest first, root excluded. That is what a TLS peer
presents after its own certificate, so ``issued.presented_chain`` is exactly what a device sends.

On disk a credential is a *prefix* ``DIR/NAME``: ``NAME.pem`` (the certificate alone),
``NAME.key`` (PKCS#8 PEM, mode 0600) and, when it has intermediates or was asked for,
``NAME-chain.pem`` (the certificate followed by its intermediates).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .certificates import (
    Issued,
    PrivateKey,
    certificate_der,
    certificate_info,
    certificate_pem,
    load_certificate,
    load_pem_chain,
    load_pkcs12,
    load_private_key,
    private_key_pem,
)
from .errors import ConfigurationError

try:  # POSIX only; elsewhere concurrent first starts are simply not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]  # the module is optional on non-POSIX systems

__all__ = [
    "IPAddress",
    "Issued",
    "KeyType",
    "PrivateKey",
    "ServerTlsFiles",
    "cert_path",
    "certificate_der",
    "certificate_info",
    "certificate_names",
    "certificate_pem",
    "chain_path",
    "ensure_dev_pki",
    "generate_key",
    "key_path",
    "load_certificate",
    "load_pem_chain",
    "load_pkcs12",
    "load_private_key",
    "make_device_cert",
    "make_intermediate_ca",
    "make_root_ca",
    "make_server_cert",
    "make_verification_cert",
    "private_key_pem",
    "read_issued",
    "to_pkcs12",
    "write_certificates",
    "write_issued",
    "write_private_bytes",
    "write_private_key",
]

logger = logging.getLogger(__name__)

KeyType: TypeAlias = Literal["ec", "rsa"]
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Certificates start this long before "now", so that a peer whose clock is a little behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)
#: ``ensure_dev_pki`` renews the server certificate when it expires within this margin.
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True, slots=True)
class ServerTlsFiles:
    """The files :func:`ensure_dev_pki` keeps: give ``cert_file``/``key_file`` to the TLS server
    and ``ca_file`` to clients that should trust it."""

    ca_file: Path
    cert_file: Path
    key_file: Path


# --- keys and building blocks ------------------------------------------------------------------


def generate_key(key_type: KeyType = "ec") -> PrivateKey:
    """A new ECDSA P-256 key (fast handshakes, the default) or an RSA 2048 key."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r} (expected 'ec' or 'rsa')")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _builder(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    issuer: Issued | None,
    *,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
    days: int,
) -> x509.CertificateBuilder:
    """Subject, issuer, serial, validity, SKI and AKI: the part every certificate shares."""
    start = not_before if not_before is not None else _utcnow() - CLOCK_SKEW
    end = not_after if not_after is not None else start + CLOCK_SKEW + dt.timedelta(days=days)
    if end <= start:
        raise ValueError("not_after must be later than not_before")
    issuer_public_key = public_key if issuer is None else issuer.key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key), critical=False)
    )


def _leaf_key_usage(key: PrivateKey) -> x509.KeyUsage:
    # RSA keys may also be used for RSA key transport (TLS 1.2 without ECDHE).
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(key, rsa.RSAPrivateKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _sign(builder: x509.CertificateBuilder, signer: PrivateKey) -> x509.Certificate:
    return builder.sign(signer, hashes.SHA256())


def _chain_below(issuer: Issued) -> tuple[x509.Certificate, ...]:
    """The chain of a certificate that ``issuer`` signs: empty under a root, else issuer + its chain."""
    return () if issuer.is_self_signed else (issuer.cert, *issuer.chain)


# --- certificates ------------------------------------------------------------------------------


def make_root_ca(
    cn: str, *, key_type: KeyType = "ec", days: int = 3650, path_length: int | None = None
) -> Issued:
    """A self-signed root CA. ``path_length=None`` allows any number of intermediates below it."""
    key = generate_key(key_type)
    builder = (
        _builder(_name(cn), key.public_key(), None, not_before=None, not_after=None, days=days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
    )
    return Issued(_sign(builder, key), key)


def make_intermediate_ca(
    cn: str,
    issuer: Issued,
    *,
    key_type: KeyType = "ec",
    days: int = 1825,
    path_length: int | None = 0,
) -> Issued:
    """An intermediate CA signed by ``issuer``. ``path_length=0``: it signs leaves only."""
    key = generate_key(key_type)
    builder = (
        _builder(_name(cn), key.public_key(), issuer, not_before=None, not_after=None, days=days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
    )
    return Issued(_sign(builder, issuer.key), key, _chain_below(issuer))


def make_server_cert(
    issuer: Issued,
    hostnames: Sequence[str],
    ips: Iterable[str | IPAddress] = (),
    *,
    key_type: KeyType = "ec",
    days: int = 365,
) -> Issued:
    """A TLS server certificate for ``hostnames`` (DNS SANs) and ``ips`` (IP SANs).

    Host names that parse as IP addresses go to the IP SANs. The subject CN is the first name.
    """
    dns: list[str] = []
    addresses: list[IPAddress] = []
    for name in hostnames:
        try:
            addresses.append(ipaddress.ip_address(name))
        except ValueError:
            dns.append(name)
    addresses.extend(ipaddress.ip_address(ip) if isinstance(ip, str) else ip for ip in ips)
    dns = list(dict.fromkeys(dns))
    addresses = list(dict.fromkeys(addresses))
    if not dns and not addresses:
        raise ValueError("a server certificate needs at least one host name or IP address")
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    sans += [x509.IPAddress(address) for address in addresses]
    key = generate_key(key_type)
    cn = dns[0] if dns else str(addresses[0])
    builder = (
        _builder(_name(cn), key.public_key(), issuer, not_before=None, not_after=None, days=days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(key), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    return Issued(_sign(builder, issuer.key), key, _chain_below(issuer))


def make_device_cert(
    cn: str,
    issuer: Issued | None = None,
    *,
    key_type: KeyType = "ec",
    days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """A device (TLS client) certificate whose subject CN is the registration id.

    Self-signed when ``issuer`` is None (individual enrollments). ``not_before``/``not_after``
    override the validity (``days`` counts from ``not_before``), e.g. to make expired certificates.
    """
    key = generate_key(key_type)
    builder = (
        _builder(_name(cn), key.public_key(), issuer, not_before=not_before, not_after=not_after, days=days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(key), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if issuer is None:
        return Issued(_sign(builder, key), key)
    return Issued(_sign(builder, issuer.key), key, _chain_below(issuer))


def make_verification_cert(code: str, ca: Issued, *, key_type: KeyType = "ec", days: int = 30) -> Issued:
    """The proof-of-possession certificate for ``ca``: its subject CN is the verification code."""
    key = generate_key(key_type)
    builder = (
        _builder(_name(code), key.public_key(), ca, not_before=None, not_after=None, days=days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(key), critical=True)
    )
    return Issued(_sign(builder, ca.key), key, _chain_below(ca))


# --- information and parsing -------------------------------------------------------------------


# --- PKCS#12 -----------------------------------------------------------------------------------


def to_pkcs12(issued: Issued, password: str | bytes, *, friendly_name: str | None = None) -> bytes:
    """A password-protected PKCS#12 file holding the key, the certificate and its chain."""
    secret = password.encode() if isinstance(password, str) else password
    if not secret:
        raise ValueError("a PKCS#12 export needs a non-empty password")
    cn = issued.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = friendly_name if friendly_name is not None else (str(cn[0].value) if cn else None)
    return pkcs12.serialize_key_and_certificates(
        name.encode() if name else None,
        issued.key,
        issued.cert,
        list(issued.chain) or None,
        serialization.BestAvailableEncryption(secret),
    )


# --- files -------------------------------------------------------------------------------------


def cert_path(prefix: Path) -> Path:
    """``DIR/NAME`` -> ``DIR/NAME.pem`` (names may contain dots, so no ``with_suffix``)."""
    return prefix.with_name(prefix.name + ".pem")


def key_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".key")


def chain_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + "-chain.pem")


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write to a temporary file beside ``path`` and rename it over, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_certificates(path: Path, certs: Sequence[x509.Certificate]) -> Path:
    """Write ``certs`` as PEM (mode 0644) and return ``path``."""
    _write_atomic(path, certificate_pem(*certs), 0o644)
    return path


def write_private_bytes(path: Path, data: bytes) -> Path:
    """Write secret ``data`` (a PKCS#12 file, say) with mode 0600 and return ``path``."""
    _write_atomic(path, data, 0o600)
    return path


def write_private_key(path: Path, key: PrivateKey, password: str | bytes | None = None) -> Path:
    """Write ``key`` as PKCS#8 PEM with mode 0600 and return ``path``."""
    _write_atomic(path, private_key_pem(key, password), 0o600)
    return path


def write_issued(issued: Issued, prefix: Path, *, chain: bool | None = None) -> list[Path]:
    """Write ``PREFIX.pem``, ``PREFIX.key`` and, if wanted, ``PREFIX-chain.pem``; return the paths.

    ``chain=None`` writes the chain file only when there are intermediates.
    """
    written = [
        write_certificates(cert_path(prefix), [issued.cert]),
        write_private_key(key_path(prefix), issued.key),
    ]
    if chain or (chain is None and issued.chain):
        written.append(write_certificates(chain_path(prefix), issued.presented_chain))
    return written


def read_issued(prefix: Path) -> Issued:
    """Read a credential written by :func:`write_issued` (``PREFIX-chain.pem`` is optional).

    :raises ConfigurationError: a file is missing or unreadable.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_path(prefix).read_bytes())
        key = load_private_key(key_path(prefix).read_bytes())
        chain: tuple[x509.Certificate, ...] = ()
        if chain_path(prefix).exists():
            chain = tuple(c for c in load_pem_chain(chain_path(prefix).read_bytes()) if c != cert)
    except FileNotFoundError as exc:
        raise ConfigurationError(f"{exc.filename}: no such file") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"cannot read the credential {prefix}: {exc}") from exc
    if cert.public_key() != key.public_key():
        raise ConfigurationError(f"{key_path(prefix)} is not the key of {cert_path(prefix)}")
    return Issued(cert, key, chain)


# --- the service's own development PKI ---------------------------------------------------------

_DEV_CA_CN = "provisiond development server CA"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise concurrent first starts (several workers) on ``directory/.lock``."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(directory / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _server_cert_is_usable(
    ca: Issued, cert_file: Path, key_file: Path, names: set[str], addresses: set[IPAddress], now: dt.datetime
) -> bool:
    try:
        certs = load_pem_chain(cert_file.read_bytes())
        key = load_private_key(key_file.read_bytes())
    except (OSError, ValueError, TypeError):
        return False
    cert = certs[0]
    try:
        cert.verify_directly_issued_by(ca.cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    have_names = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    have_addresses = set(san.get_values_for_type(x509.IPAddress))
    missing = (names - have_names) | {str(a) for a in addresses - have_addresses}
    if missing:
        logger.info("server certificate lacks %s; issuing a new one", ", ".join(sorted(missing)))
        return False
    if cert.not_valid_after_utc - RENEW_BEFORE < now:
        logger.info("server certificate expires on %s; issuing a new one", cert.not_valid_after_utc)
        return False
    return cert.public_key() == key.public_key()


def certificate_names(cert_file: Path) -> tuple[str, ...]:
    """The host names and IP addresses the first certificate of ``cert_file`` (PEM) covers, in
    its SubjectAlternativeName (none when it has none)."""
    cert = load_pem_chain(cert_file.read_bytes())[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    names = [name.lower() for name in san.get_values_for_type(x509.DNSName)]
    return (*names, *(str(address) for address in san.get_values_for_type(x509.IPAddress)))


def ensure_dev_pki(
    data_dir: Path,
    hostnames: Sequence[str] = (),
    *,
    key_type: KeyType = "ec",
    now: dt.datetime | None = None,
) -> ServerTlsFiles:
    """Make sure ``data_dir/pki`` holds a server CA and a server certificate; return their files.

    The first call creates ``ca.pem``/``ca.key`` and ``server-chain.pem`` (server certificate then
    the CA)/``server.key``. Later calls reuse them and issue a new server certificate only when
    one of the host names (localhost, 127.0.0.1, ::1, this machine's name, plus ``hostnames``) is
    missing from its SAN, when it expires within 30 days, or when it is unreadable.
    An existing CA is never replaced, because clients may trust it.

    :raises ConfigurationError: the CA files exist but cannot be read, or the CA has expired.
    """
    now = now if now is not None else _utcnow()
    pki_dir = data_dir / "pki"
    pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = ServerTlsFiles(
        ca_file=pki_dir / "ca.pem", cert_file=pki_dir / "server-chain.pem", key_file=pki_dir / "server.key"
    )
    requested = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *hostnames]
    names: set[str] = set()
    addresses: set[IPAddress] = set()
    for name in filter(None, requested):
        try:
            addresses.add(ipaddress.ip_address(name))
        except ValueError:
            names.add(name.lower())

    with _locked(pki_dir):
        ca_prefix = pki_dir / "ca"
        if cert_path(ca_prefix).exists() or key_path(ca_prefix).exists():
            ca = read_issued(ca_prefix)
            if ca.cert.not_valid_after_utc < now:
                raise ConfigurationError(
                    f"the development CA {files.ca_file} expired on {ca.cert.not_valid_after_utc:%Y-%m-%d}; "
                    f"delete {pki_dir} to make a new one (clients must then trust the new ca.pem)"
                )
        else:
            logger.info("creating the development server CA in %s", pki_dir)
            ca = make_root_ca(_DEV_CA_CN, key_type=key_type, days=3650, path_length=0)
            write_private_key(key_path(ca_prefix), ca.key)
            write_certificates(cert_path(ca_prefix), [ca.cert])

        if not _server_cert_is_usable(ca, files.cert_file, files.key_file, names, addresses, now):
            ordered = sorted(names, key=lambda n: (n != "localhost", n))
            server = make_server_cert(ca, ordered, sorted(addresses, key=str), key_type=key_type)
            # Other starters wait on the lock, so nobody reads the pair while it is being replaced.
            write_private_key(files.key_file, server.key)
            write_certificates(files.cert_file, [server.cert, ca.cert])
            logger.info(
                "issued the server certificate %s for %s",
                files.cert_file,
                ", ".join([*ordered, *(str(a) for a in sorted(addresses, key=str))]),
            )
    return files
