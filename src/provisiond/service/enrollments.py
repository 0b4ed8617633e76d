"""Individual enrollments and enrollment groups: validation, secrets, and the stored form.

Both kinds share one implementation, parametrized by :class:`EnrollmentKind`. What is stored is
the full document (secrets included); what the API shows of it is DPS's choice (:class:`Shown`):
GET and query strip the secrets (symmetric keys, certificate PEMs), the answer to a PUT shows
the symmetric keys, ``attestationmechanism`` returns everything.

Writes are read-modify-write friendly: a GET strips secrets, so a PUT that omits symmetric keys
or certificate PEMs keeps the stored ones instead of silently rotating them (keys are generated
only when the enrollment is new, or when the attestation type changes).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .. import certificates
from ..attestation import tpm as tpm_attestation
from ..errors import DpsCode, InvalidBodyError, InvalidIdError
from ..hub.registry import DEVICE_ID_RULE, is_device_id
from ..models import (
    AllocationPolicy,
    AttestationMechanism,
    AttestationType,
    EnrollmentGroup,
    IndividualEnrollment,
    IndividualEnrollmentBody,
    ProvisioningStatus,
    SymmetricKeyAttestation,
    X509Attestation,
    X509CertificateInfo,
    X509Certificates,
    X509CertificateWithInfo,
)
from ..protocol.sas import check_key, generate_key
from ..storage import Collection, Record
from ..twin_limits import check_initial_twin

__all__ = [
    "GROUP",
    "INDIVIDUAL",
    "EnrollmentKind",
    "Shown",
    "check_key",
    "generate_key",
    "load_certificate",
    "prepare",
    "strip_secrets",
    "present",
    "validate_id",
]

E = TypeVar("E", IndividualEnrollment, EnrollmentGroup)

# DPS: case-insensitive, up to 128 characters, alphanumerics and "-._:", starting with an
# alphanumeric, ending with an alphanumeric or "-".
_ID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9\-._:]{0,126}[A-Za-z0-9\-])?$")


@dataclass(frozen=True)
class EnrollmentKind(Generic[E]):
    collection: Collection
    model: type[E]
    #: What a client's body decodes as (read-only fields it may send are not checked).
    body: type[E]
    id_field: str
    label: str
    not_found_code: DpsCode

    def id_of(self, enrollment: E) -> str:
        value: str = getattr(
            enrollment, "registration_id" if self.model is IndividualEnrollment else "enrollment_group_id"
        )
        return value


INDIVIDUAL: EnrollmentKind[IndividualEnrollment] = EnrollmentKind(
    Collection.ENROLLMENTS,
    IndividualEnrollment,
    IndividualEnrollmentBody,
    "registrationId",
    "individual enrollment",
    DpsCode.ENROLLMENT_NOT_FOUND,
)
GROUP: EnrollmentKind[EnrollmentGroup] = EnrollmentKind(
    Collection.ENROLLMENT_GROUPS,
    EnrollmentGroup,
    EnrollmentGroup,
    "enrollmentGroupId",
    "enrollment group",
    DpsCode.GROUP_NOT_FOUND,
)


def validate_id(value: str, what: str) -> str:
    """Check an id against DPS's rules.

    :raises InvalidIdError: with the rule it breaks.
    """
    if not _ID.match(value):
        raise InvalidIdError(
            f"Invalid {what} {value[:140]!r}: use 1-128 characters from A-Z, a-z, 0-9 and '-._:', "
            "starting with a letter or digit and ending with a letter, digit or '-'."
        )
    return value


def load_certificate(text: str, field: str) -> x509.Certificate:
    """The certificate a request carries in ``field`` (PEM, base64 of DER or base64 of PEM:
    :func:`provisiond.certificates.load_certificate`).

    :raises InvalidBodyError: naming the field and what is wrong.
    """
    try:
        return certificates.load_certificate(text)
    except ValueError as exc:
        raise InvalidBodyError(
            f"{field} is not an X.509 certificate (PEM, base64 of DER, or base64 of PEM): {exc}"
        ) from None


def _prepare_certificate(
    new: X509CertificateWithInfo | None, old: X509CertificateWithInfo | None, field: str
) -> X509CertificateWithInfo | None:
    if new is None:
        return None
    if new.certificate:
        cert = load_certificate(new.certificate, f"{field}.certificate")
        pem = cert.public_bytes(Encoding.PEM).decode("ascii")
        return X509CertificateWithInfo(
            certificate=pem, info=msgspec.convert(certificates.certificate_info(cert), X509CertificateInfo)
        )
    # No PEM: a read-modify-write of a record whose GET stripped it. Keep the stored one when
    # the info names the same certificate.
    if old is not None and old.certificate and new.info is not None and old.info is not None:
        if new.info.sha1_thumbprint.upper() == old.info.sha1_thumbprint.upper():
            return old
    raise InvalidBodyError(f"{field}.certificate is required (PEM, base64 of DER, or base64 of PEM).")


def _prepare_x509(
    new: X509Attestation | None, old: X509Attestation | None, individual: bool
) -> X509Attestation:
    if new is None:
        raise InvalidBodyError("attestation.x509 is required when attestation.type is x509.")
    old = old or X509Attestation()
    if individual:
        if new.signing_certificates or new.ca_references:
            raise InvalidBodyError(
                "An individual enrollment takes attestation.x509.clientCertificates; signingCertificates "
                "and caReferences belong to enrollment groups."
            )
        certs, old_certs, name = new.client_certificates, old.client_certificates, "clientCertificates"
    else:
        if new.client_certificates:
            raise InvalidBodyError(
                "An enrollment group takes attestation.x509.signingCertificates or caReferences, "
                "not clientCertificates."
            )
        certs, old_certs, name = new.signing_certificates, old.signing_certificates, "signingCertificates"
    if certs is None or (certs.primary is None and certs.secondary is None):
        if (
            not individual
            and new.ca_references
            and (new.ca_references.primary or new.ca_references.secondary)
        ):
            return X509Attestation(ca_references=new.ca_references)
        raise InvalidBodyError(f"attestation.x509.{name}.primary is required.")
    prepared = X509Certificates(
        primary=_prepare_certificate(
            certs.primary, old_certs.primary if old_certs else None, f"attestation.x509.{name}.primary"
        ),
        secondary=_prepare_certificate(
            certs.secondary, old_certs.secondary if old_certs else None, f"attestation.x509.{name}.secondary"
        ),
    )
    if prepared.primary is None:
        raise InvalidBodyError(f"attestation.x509.{name}.primary is required.")
    if individual:
        return X509Attestation(client_certificates=prepared)
    return X509Attestation(signing_certificates=prepared, ca_references=new.ca_references)


def _prepare_attestation(
    new: AttestationMechanism, old: AttestationMechanism | None, individual: bool
) -> AttestationMechanism:
    same_type = old is not None and old.type is new.type
    match new.type:
        case AttestationType.SYMMETRIC_KEY:
            keys = new.symmetric_key or SymmetricKeyAttestation()
            stored = old.symmetric_key if (same_type and old is not None) else None
            primary = keys.primary_key or (stored.primary_key if stored else None) or generate_key()
            secondary = keys.secondary_key or (stored.secondary_key if stored else None) or generate_key()
            check_key(primary, "attestation.symmetricKey.primaryKey")
            check_key(secondary, "attestation.symmetricKey.secondaryKey")
            return AttestationMechanism(
                type=new.type,
                symmetric_key=SymmetricKeyAttestation(primary_key=primary, secondary_key=secondary),
            )
        case AttestationType.TPM:
            if not individual:
                raise InvalidBodyError(
                    "Enrollment groups do not support TPM attestation; use individual enrollments."
                )
            if new.tpm is None or not new.tpm.endorsement_key:
                raise InvalidBodyError(
                    "attestation.tpm.endorsementKey is required when attestation.type is tpm."
                )
            # The EK must be an RSA-2048 endorsement key (TPM2B_PUBLIC), the SRK a storage key.
            return AttestationMechanism(type=new.type, tpm=tpm_attestation.check_enrollment(new.tpm))
        case AttestationType.X509:
            stored_x509 = old.x509 if (same_type and old is not None) else None
            return AttestationMechanism(type=new.type, x509=_prepare_x509(new.x509, stored_x509, individual))
        case AttestationType.NONE:
            raise InvalidBodyError(
                "attestation.type 'none' cannot authenticate a device; use tpm, x509 or symmetricKey."
            )
    raise AssertionError(new.type)  # pragma: no cover - msgspec admits only enum members


def _check_allocation(
    enrollment: IndividualEnrollment | EnrollmentGroup, linked_hubs: Mapping[str, object]
) -> None:
    hubs = enrollment.iot_hubs or []
    for hub in [*hubs, *([enrollment.iot_hub_host_name] if enrollment.iot_hub_host_name else [])]:
        if hub.lower() not in linked_hubs:
            raise InvalidBodyError(
                f"The IoT hub {hub[:256]!r} is not linked to this service; link it first (provisiond hub add)."
            )
    policy = enrollment.allocation_policy
    if policy is AllocationPolicy.CUSTOM and enrollment.custom_allocation_definition is None:
        raise InvalidBodyError(
            "A CustomAllocationDefinition is required when the allocation policy is set to 'Custom'."
        )
    if policy is AllocationPolicy.STATIC and len(set(hubs)) > 1:
        raise InvalidBodyError("The static allocation policy needs exactly one IoT hub in iotHubs.")


def prepare(
    kind: EnrollmentKind[E],
    enrollment: E,
    url_id: str,
    existing: Record | None,
    *,
    linked_hubs: Mapping[str, object],
) -> tuple[bytes, dict[str, str | None]]:
    """Validate ``enrollment`` (the PUT body for ``url_id``) and return the document to store and
    its index columns. ``existing`` is the stored record, when there is one.

    :raises InvalidIdError, InvalidBodyError: what is wrong, naming the field.
    """
    validate_id(url_id, kind.id_field)
    body_id = kind.id_of(enrollment)
    if body_id.lower() != url_id.lower():
        raise InvalidBodyError(
            f"{kind.id_field} {body_id[:140]!r} in the body differs from {url_id!r} in the URL."
        )
    old = msgspec.json.decode(existing.doc, type=kind.model) if existing is not None else None
    attestation = _prepare_attestation(
        enrollment.attestation, old.attestation if old else None, kind is INDIVIDUAL
    )
    _check_allocation(enrollment, linked_hubs)
    if enrollment.initial_twin is not None:  # what the hub will be given must fit IoT Hub's limits
        twin = enrollment.initial_twin
        check_initial_twin(twin.tags, twin.properties.desired if twin.properties else None)
    if isinstance(enrollment, IndividualEnrollment) and enrollment.device_id is not None:
        if not is_device_id(enrollment.device_id):  # the hub's rule: wider than DPS's ids
            raise InvalidIdError(f"Invalid deviceId {enrollment.device_id[:140]!r}: {DEVICE_ID_RULE}.")
    doc = msgspec.structs.replace(
        enrollment,
        attestation=attestation,
        etag=None,
        created_date_time_utc=None,
        last_updated_date_time_utc=None,
        provisioning_status=enrollment.provisioning_status or ProvisioningStatus.ENABLED,
        **({"registration_state": None} if kind is INDIVIDUAL else {}),
    )
    index: dict[str, str | None] = {
        "provisioning_status": doc.provisioning_status.value if doc.provisioning_status else None,
        "attestation_type": attestation.type.value.lower(),
        "iot_hub_host_name": doc.iot_hub_host_name.lower() if doc.iot_hub_host_name else None,
    }
    if isinstance(doc, IndividualEnrollment):
        index["device_id"] = doc.device_id
    return msgspec.json.encode(doc), index


class Shown(enum.Enum):
    """How much of an enrollment's attestation an answer shows, as DPS does (docs/service-api.md,
    "Secrets"): reads (GET, query, the custom allocation webhook) show no secret; the answer to a
    create or update (PUT) shows the symmetric keys, generated or given, but no certificate PEM;
    ``attestationmechanism`` shows everything."""

    READ = "read"
    WRITE = "write"
    ALL = "all"


def strip_secrets(attestation: AttestationMechanism, shown: Shown = Shown.READ) -> AttestationMechanism:
    """The attestation as ``shown``: symmetric keys removed for reads (``symmetricKey`` left
    out entirely, as DPS answers ``{"type": "symmetricKey"}``), certificate PEMs removed unless
    everything is shown (their ``info`` stays)."""
    if shown is Shown.ALL:
        return attestation
    if attestation.symmetric_key is not None:
        return (
            attestation if shown is Shown.WRITE else msgspec.structs.replace(attestation, symmetric_key=None)
        )
    if attestation.x509 is not None:
        x = attestation.x509

        def strip(certs: X509Certificates | None) -> X509Certificates | None:
            if certs is None:
                return None
            return X509Certificates(
                primary=X509CertificateWithInfo(info=certs.primary.info) if certs.primary else None,
                secondary=X509CertificateWithInfo(info=certs.secondary.info) if certs.secondary else None,
            )

        return msgspec.structs.replace(
            attestation,
            x509=X509Attestation(
                client_certificates=strip(x.client_certificates),
                signing_certificates=strip(x.signing_certificates),
                ca_references=x.ca_references,
            ),
        )
    return attestation


def present(
    kind: EnrollmentKind[E], record: Record, *, shown: Shown = Shown.READ, extra: dict[str, Any] | None = None
) -> E:
    """The API form of a stored record: etag and timestamps from the store, secrets as
    ``shown``; ``extra`` sets further fields (``registration_state``)."""
    doc = msgspec.json.decode(record.doc, type=kind.model)
    return msgspec.structs.replace(
        doc,
        etag=record.etag,
        created_date_time_utc=record.created,
        last_updated_date_time_utc=record.updated,
        attestation=strip_secrets(doc.attestation, shown),
        **(extra or {}),
    )
