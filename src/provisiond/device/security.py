"""Security providers: what a device proves itself with (device-protocol.md §5).

A :class:`SecurityProvider` knows the device's registration id and gives the transport one of
two things, depending on the attestation:

* a **SAS token** (:meth:`SecurityProvider.sas_token`) for key-based attestation: symmetric
  keys (:class:`SymmetricKeySecurity`, also group-derived keys) and, later, TPM;
* a **TLS client certificate** (:meth:`SecurityProvider.tls_client_certificate`) for X.509
  (:class:`X509Security`): an :class:`X509Credential` that loads itself into the
  :class:`ssl.SSLContext` every transport (HTTPS, MQTT, AMQP) builds.

Extension point for hardware-backed keys
----------------------------------------
Transports never read a private key: they call :meth:`X509Credential.load_into` on their
context. :class:`PemX509Credential` (software keys) hands the chain and the key to
:meth:`ssl.SSLContext.load_cert_chain` in anonymous memory files (Linux's memfd), or elsewhere
writes the chain and a one-time-encrypted copy of the key to a private temporary directory and
removes the files at once, so the plaintext key never touches the disk. A credential whose
key lives in an HSM, a TPM or a PKCS#11 token subclasses :class:`X509Credential` and implements
``load_into`` however its integration allows. Note that Python's :mod:`ssl` loads keys only from
PEM files through :meth:`~ssl.SSLContext.load_cert_chain`, so such an integration usually
relies on an OpenSSL provider or engine configured outside Python; the seam is here so that it
needs no change to the client or the transports.

cryptography (some 10 MiB of a process's memory) is imported by the X.509 code paths only,
when they first run: a key-attested device never loads it.

The TPM challenge (device-protocol.md §2.3) goes through :meth:`SecurityProvider.begin_registration`
(the ``tpm`` of the register body), :attr:`SecurityProvider.answers_challenges`,
:meth:`SecurityProvider.answer_challenge` and :meth:`SecurityProvider.complete_registration`;
:class:`provisiond.device.tpm.TpmSecurity` (the ``tpm`` extra) implements them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import ssl
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..errors import ConfigurationError
from ..protocol.messages import TpmAttestationRequest, TpmChallenge
from ..protocol.sas import build_sas_token, derive_device_key

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

    from .. import certificates
    from ..protocol.registration import RegistrationResult

__all__ = [
    "PemX509Credential",
    "SecurityProvider",
    "SymmetricKeySecurity",
    "X509Credential",
    "X509Security",
]

#: ``skn`` of device SAS tokens (NET, C and NODE send it; DOC-MQTT says it "should be set").
SAS_KEY_NAME = "registration"


class X509Credential(ABC):
    """A client certificate, its chain and a private key a TLS context can use."""

    @property
    @abstractmethod
    def certificate(self) -> x509.Certificate:
        """The leaf (device) certificate; its subject CN is the default registration id."""

    @property
    def chain(self) -> Sequence[x509.Certificate]:
        """The intermediates presented after the leaf, nearest first."""
        return ()

    @abstractmethod
    def load_into(self, ctx: ssl.SSLContext) -> None:
        """Make ``ctx`` present this certificate, its chain and prove possession of its key.

        :raises ConfigurationError: the credential cannot be loaded.
        """


class PemX509Credential(X509Credential):
    """A software key with its certificate and chain, held in memory."""

    def __init__(
        self,
        *,
        certificate: x509.Certificate,
        private_key: certificates.PrivateKey,
        chain: Sequence[x509.Certificate] = (),
    ) -> None:
        if _public_der(private_key.public_key()) != _public_der(certificate.public_key()):
            raise ConfigurationError(
                f"The private key does not belong to the certificate {_subject(certificate)!r}."
            )
        self._certificate = certificate
        self._key = private_key
        self._chain = tuple(c for c in chain if c != certificate)

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    @property
    def chain(self) -> Sequence[x509.Certificate]:
        return self._chain

    def load_into(self, ctx: ssl.SSLContext) -> None:
        from .. import certificates

        # load_cert_chain reads files only. Where the system has anonymous memory files (Linux's
        # memfd), the PEM goes into one: it never touches a disk, and nobody but this process
        # (and root) can open it. Elsewhere the key goes to disk encrypted under a password that
        # lives only in this frame, in a directory only we can read, and is removed at once
        # (the encryption's key derivation costs some milliseconds per load).
        chain_pem = certificates.certificate_pem(self._certificate, *self._chain)
        try:
            if _MEMFD:
                with (
                    _memory_file(chain_pem) as cert_file,
                    _memory_file(certificates.private_key_pem(self._key)) as key_file,
                ):
                    ctx.load_cert_chain(cert_file, key_file)
                return
            secret = secrets.token_urlsafe(24)
            with tempfile.TemporaryDirectory(prefix="provisiond-") as directory:
                cert_file = str(Path(directory, "chain.pem"))
                key_file = str(Path(directory, "key.pem"))
                _write_private(Path(cert_file), chain_pem)
                _write_private(Path(key_file), certificates.private_key_pem(self._key, secret))
                ctx.load_cert_chain(cert_file, key_file, password=secret)
        except ssl.SSLError as exc:
            raise ConfigurationError(f"The TLS library refused the client certificate: {exc}") from exc

    def __repr__(self) -> str:
        return f"<PemX509Credential {_subject(self._certificate)!r} chain={len(self._chain)}>"


class SecurityProvider(ABC):
    """What a device proves itself with; transports ask it for their part of the proof."""

    #: Whether :meth:`answer_challenge` can answer a TPM challenge (401 + authenticationKey).
    answers_challenges: ClassVar[bool] = False

    @property
    @abstractmethod
    def registration_id(self) -> str:
        """The device's registration id."""

    def sas_token(self, resource: str, expiry: int) -> str | None:
        """The ``SharedAccessSignature ...`` for ``resource`` (``{idScope}/registrations/{id}``,
        unencoded) valid until ``expiry`` (Unix seconds); None when the attestation uses none."""
        return None

    def tls_client_certificate(self) -> X509Credential | None:
        """The client certificate to present in the TLS handshake; None when there is none."""
        return None

    def answer_challenge(self, challenge: TpmChallenge) -> None:
        """Activate the TPM challenge's ``authenticationKey``, so that :meth:`sas_token` signs
        with the key it wraps. Called from a worker thread (TPM commands block)."""
        raise NotImplementedError(f"{type(self).__name__} cannot answer a TPM challenge")

    def begin_registration(self) -> TpmAttestationRequest | None:
        """Called when a registration starts: the ``tpm`` (EK and SRK) the register body
        carries, None for other attestations. (A TPM provider also forgets an earlier
        challenge's key here, so that the first register goes without a token.)"""
        return None

    def complete_registration(self, result: RegistrationResult) -> None:
        """Called with the assigned result, from a worker thread. (A TPM provider imports the
        hub key that ``registrationState.tpm.authenticationKey`` wraps.)"""
        return None


class SymmetricKeySecurity(SecurityProvider):
    """Symmetric key attestation: SAS tokens signed with the device's key.

    :param registration_id: the enrollment's (or, for a group, the device's chosen) id.
    :param symmetric_key: the base64 key (an individual enrollment's, or one derived from a
        group key by :meth:`from_group_key`).
    :raises ConfigurationError: the key is not base64.
    """

    def __init__(self, *, registration_id: str, symmetric_key: str) -> None:
        _check_registration_id(registration_id)
        try:
            base64.b64decode(symmetric_key, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(f"The symmetric key for {registration_id!r} is not base64.") from None
        self._registration_id = registration_id
        self._key = symmetric_key

    @classmethod
    def from_group_key(cls, *, registration_id: str, group_key: str) -> SymmetricKeySecurity:
        """The device key derived from an enrollment group's key (device-protocol.md §5.2)."""
        _check_registration_id(registration_id)
        try:
            base64.b64decode(group_key, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError("The group key is not base64.") from None
        return cls(
            registration_id=registration_id, symmetric_key=derive_device_key(group_key, registration_id)
        )

    @property
    def registration_id(self) -> str:
        return self._registration_id

    def sas_token(self, resource: str, expiry: int) -> str:
        return build_sas_token(resource, self._key, expiry, key_name=SAS_KEY_NAME)

    def __repr__(self) -> str:
        return f"<SymmetricKeySecurity registration_id={self._registration_id!r}>"


class X509Security(SecurityProvider):
    """X.509 attestation: the device presents its certificate (and chain) in the TLS handshake.

    :param credential: the certificate, chain and key (see :class:`X509Credential`).
    :param registration_id: defaults to the leaf's subject CN, which DPS requires it to equal.
    :raises ConfigurationError: no registration id was given and the leaf has no CN.
    """

    def __init__(self, *, credential: X509Credential, registration_id: str | None = None) -> None:
        if registration_id is None:
            registration_id = _common_name(credential.certificate)
        _check_registration_id(registration_id)
        self._credential = credential
        self._registration_id = registration_id

    @classmethod
    def from_pem_files(
        cls,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        *,
        chain_file: str | os.PathLike[str] | None = None,
        password: str | bytes | None = None,
        registration_id: str | None = None,
    ) -> X509Security:
        """From PEM files: ``cert_file`` holds the leaf, optionally followed by intermediates;
        ``chain_file`` adds more intermediates; ``key_file`` is the (optionally encrypted) key.

        :raises ConfigurationError: a file is unreadable, malformed, or the password is wrong.
        """
        from .. import certificates

        certs = _read_certificates(cert_file)
        if chain_file is not None:
            certs += [c for c in _read_certificates(chain_file) if c not in certs]
        try:
            key = certificates.load_private_key(_read(key_file), password)
        except (ValueError, TypeError) as exc:
            hint = " (wrong or missing password?)" if "password" in str(exc).lower() or password else ""
            raise ConfigurationError(f"Cannot load the private key in {key_file}{hint}: {exc}") from exc
        credential = PemX509Credential(certificate=certs[0], private_key=key, chain=certs[1:])
        return cls(credential=credential, registration_id=registration_id)

    @classmethod
    def from_pkcs12(
        cls,
        path: str | os.PathLike[str],
        password: str | bytes | None,
        *,
        registration_id: str | None = None,
    ) -> X509Security:
        """From a (password-protected) PKCS#12 file holding the key, the certificate and its chain.

        :raises ConfigurationError: unreadable, not PKCS#12, or the password is wrong.
        """
        from .. import certificates

        try:
            issued = certificates.load_pkcs12(_read(path), password)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"Cannot open {path}: {exc}") from exc
        return cls.from_issued(issued, registration_id=registration_id)

    @classmethod
    def from_issued(cls, issued: certificates.Issued, *, registration_id: str | None = None) -> X509Security:
        """From an in-memory :class:`provisiond.certificates.Issued` (certificate, key and chain)."""
        credential = PemX509Credential(certificate=issued.cert, private_key=issued.key, chain=issued.chain)
        return cls(credential=credential, registration_id=registration_id)

    @property
    def registration_id(self) -> str:
        return self._registration_id

    @property
    def certificate(self) -> x509.Certificate:
        return self._credential.certificate

    def tls_client_certificate(self) -> X509Credential:
        return self._credential

    def __repr__(self) -> str:
        return f"<X509Security registration_id={self._registration_id!r} credential={self._credential!r}>"


# --- helpers -------------------------------------------------------------------------------------


def _check_registration_id(registration_id: str) -> None:
    if not registration_id or not registration_id.strip():
        raise ValueError("The registration id must not be empty.")


def _read(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"Cannot read {path}: {exc.strerror or exc}") from exc


def _read_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    from .. import certificates

    try:
        certs = certificates.load_pem_chain(_read(path))
    except ValueError as exc:
        raise ConfigurationError(f"{path} holds no readable PEM certificate: {exc}") from exc
    if not certs:
        raise ConfigurationError(f"{path} holds no PEM certificate.")
    return certs


#: Whether anonymous memory files exist here (Linux) and /proc/self/fd can open them.
_MEMFD = hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path to ``data`` in an anonymous memory file, closed (and gone) on exit."""
    fd = os.memfd_create("provisiond-credential", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _public_der(key: PublicKeyTypes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def _common_name(cert: x509.Certificate) -> str:
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ConfigurationError(
            f"The certificate {_subject(cert)!r} has no common name (CN); give the registration id explicitly."
        )
    value = names[0].value
    return value.decode() if isinstance(value, bytes) else value
