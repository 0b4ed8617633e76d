"""CA certificates and their proof of possession (Azure: provisioningServices/certificates):
upload (unverified unless said otherwise), a fresh verification code, and the verification
certificate whose subject CN is that code, signed by the CA's key."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ... import certificates
from ...errors import DpsCode, InvalidBodyError, InvalidIdError, RequestError
from ...models import CaCertificate, CertificateUpload
from ...storage import Collection, Record, Store, WriteMode, utc_now
from ..enrollments import load_certificate
from ._base import delete_record, get_or_404, put_record

__all__ = ["CaCertificates", "validate_name"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-._]{0,63}$")


def validate_name(value: str, what: str) -> str:
    """``value`` if it is a name for an admin record (CA certificate, policy).

    :raises InvalidIdError: it is not.
    """
    if not _NAME.match(value):
        raise InvalidIdError(
            f"Invalid {what} {value[:80]!r}: use 1-64 characters from A-Z, a-z, 0-9 and '-._'."
        )
    return value


def _present(record: Record) -> CaCertificate:
    return msgspec.structs.replace(msgspec.json.decode(record.doc, type=CaCertificate), etag=record.etag)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


class CaCertificates:
    """List, get, upload, delete, and verify CA certificates."""

    def __init__(self, store: Store, invalidate: Callable[[], None]) -> None:
        self._store = store
        self._invalidate = invalidate

    async def list(self) -> list[CaCertificate]:
        return [_present(r) for r in await self._store.query_all(Collection.CA_CERTIFICATES)]

    async def get(self, name: str) -> CaCertificate:
        """:raises NotFoundError: 404205."""
        return _present(await self._get_record(name))

    async def _get_record(self, name: str) -> Record:
        return await get_or_404(self._store, Collection.CA_CERTIFICATES, name, DpsCode.CA_NOT_FOUND)

    async def upload(
        self, name: str, upload: CertificateUpload, *, if_match: str | None = None
    ) -> CaCertificate:
        """Store the CA certificate ``upload`` carries as ``name`` (a replacement starts
        unverified again unless ``isVerified``); If-Match as for every admin record (``None``:
        the upload's own ``etag``).

        :raises InvalidIdError: a bad name. :raises InvalidBodyError: not a certificate, or
            not a CA's. :raises ConflictError, PreconditionFailedError: the etag rules.
        """
        validate_name(name, "certificate name")
        cert = load_certificate(upload.certificate, "certificate")
        if not _is_ca(cert):
            raise InvalidBodyError(
                "The certificate is not a CA certificate (BasicConstraints CA:TRUE is missing)."
            )
        info = certificates.certificate_info(cert)
        now = utc_now()
        doc = CaCertificate(
            name=name,
            certificate=cert.public_bytes(Encoding.PEM).decode("ascii"),
            is_verified=upload.is_verified,
            subject=str(info["subjectName"]),
            thumbprint=str(info["sha1Thumbprint"]),
            sha256_thumbprint=str(info["sha256Thumbprint"]),
            expiry=str(info["notAfterUtc"]),
            created=now,
            updated=now,
        )
        record = await put_record(
            self._store,
            Collection.CA_CERTIFICATES,
            name,
            msgspec.json.encode(doc),
            if_match or upload.etag,
            invalidate=self._invalidate,
        )
        return _present(record)

    async def delete(self, name: str, *, if_match: str | None = None) -> None:
        """:raises NotFoundError: 404000. :raises PreconditionFailedError: 412000."""
        try:
            await delete_record(
                self._store, Collection.CA_CERTIFICATES, name, if_match, not_found=DpsCode.NOT_FOUND
            )
        finally:
            self._invalidate()

    async def generate_verification_code(self, name: str) -> CaCertificate:
        """A fresh proof-of-possession code for ``name`` (in ``verificationCode``).

        :raises NotFoundError: 404205.
        """
        record = await self._get_record(name)
        ca = msgspec.json.decode(record.doc, type=CaCertificate)
        code = secrets.token_hex(24).upper()
        return await self._rewrite(name, record, msgspec.structs.replace(ca, verification_code=code))

    async def verify(self, name: str, certificate: str) -> CaCertificate:
        """Mark ``name`` verified with the proof-of-possession ``certificate`` (PEM, base64 of
        DER or base64 of PEM): its subject CN is the verification code, and the CA signed it.

        :raises NotFoundError: 404205. :raises RequestError: no code was generated.
        :raises InvalidBodyError: 400011, another CN; 400012, another signer.
        """
        record = await self._get_record(name)
        ca_doc = msgspec.json.decode(record.doc, type=CaCertificate)
        proof = load_certificate(certificate, "certificate")
        if not ca_doc.verification_code:
            raise RequestError(
                f"No verification code was generated for {name!r}; call generateVerificationCode first."
            )
        assert ca_doc.certificate is not None
        ca = certificates.load_pem_chain(ca_doc.certificate)[0]
        cns = proof.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else ""
        if cn != ca_doc.verification_code:
            raise InvalidBodyError(
                f"The verification certificate's subject CN {cn[:80]!r} is not the verification code of {name!r}.",
                error_code=DpsCode.VERIFICATION_CODE_MISMATCH,
            )
        try:
            proof.verify_directly_issued_by(ca)
        except Exception as exc:  # InvalidSignature, ValueError, TypeError: no common base
            raise InvalidBodyError(
                f"The verification certificate was not signed by CA certificate {name!r}: {exc or 'bad signature'}.",
                error_code=DpsCode.VERIFICATION_SIGNATURE,
            ) from None
        return await self._rewrite(
            name, record, msgspec.structs.replace(ca_doc, is_verified=True, verification_code=None)
        )

    async def _rewrite(self, name: str, record: Record, ca: CaCertificate) -> CaCertificate:
        """Store ``ca`` as ``name`` over ``record``, on its etag."""
        doc = msgspec.structs.replace(ca, updated=utc_now(), etag=None)
        updated = await self._store.write(
            Collection.CA_CERTIFICATES,
            name,
            msgspec.json.encode(doc),
            mode=WriteMode.UPDATE,
            if_match=record.etag,
        )
        return _present(updated)
