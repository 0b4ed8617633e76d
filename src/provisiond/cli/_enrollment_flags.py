"""From command-line flags to typed enrollment documents (:mod:`provisiond.models`): the flags
individual enrollments and groups share, and the attestation each kind's flags ask for.

Nothing here talks to the service; :mod:`provisiond.cli.manage` sends what is built here
through the typed clients of :mod:`provisiond.service_client`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import click
import msgspec

from ..models import (
    AllocationPolicy,
    AttestationMechanism,
    AttestationType,
    CustomAllocationDefinition,
    DeviceCapabilities,
    EnrollmentGroup,
    IndividualEnrollment,
    InitialTwin,
    ProvisioningStatus,
    ReprovisionPolicy,
    SymmetricKeyAttestation,
    TpmAttestation,
    X509Attestation,
    X509CaReferences,
    X509Certificates,
    X509CertificateWithInfo,
)
from ..service_client import EnrollmentsClient, ServiceClient
from ._common import load_json_arg, read_certificate_file, with_options

__all__ = [
    "DEFAULT_WEBHOOK_API_VERSION",
    "ENROLLMENTS",
    "GROUPS",
    "EnumChoice",
    "Kind",
    "Reprovision",
    "apply_common_flags",
    "common_enrollment_options",
    "group_attestation",
    "individual_attestation",
]

F = TypeVar("F", bound=Callable[..., Any])
E = TypeVar("E", IndividualEnrollment, EnrollmentGroup)
M = TypeVar("M", bound=enum.Enum)

#: The custom allocation webhook API version Azure's portal proposes (the request payload format).
DEFAULT_WEBHOOK_API_VERSION = "2019-03-31"


class EnumChoice(click.Choice, Generic[M]):  # type: ignore[type-arg]
    """A choice among enum members, spelled by their wire value; the command gets the member."""

    def __init__(self, *members: M) -> None:
        self.members = {str(m.value): m for m in members}
        super().__init__(list(self.members))

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, enum.Enum):
            return value
        return self.members[str(super().convert(value, param, ctx))]


# --- the two kinds -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind(Generic[E]):
    """Individual enrollments or enrollment groups: their model, their typed client, and what
    the commands call them."""

    model: type[E]
    label: str
    collection: str
    #: The query fields --where can name (for the help text).
    where_fields: str
    operations: Callable[[ServiceClient], EnrollmentsClient[E]]

    def new(self, id: str) -> E:
        """An empty document for ``id`` (symmetric key attestation, the service's default)."""
        attestation = AttestationMechanism(type=AttestationType.SYMMETRIC_KEY)
        if self.model is IndividualEnrollment:
            return IndividualEnrollment(registration_id=id, attestation=attestation)  # type: ignore[return-value]
        return EnrollmentGroup(enrollment_group_id=id, attestation=attestation)  # type: ignore[return-value]


ENROLLMENTS: Kind[IndividualEnrollment] = Kind(
    IndividualEnrollment,
    "individual enrollment",
    "enrollments",
    "registrationId, deviceId, provisioningStatus, attestation.type, iotHubHostName",
    lambda client: client.enrollments,
)
GROUPS: Kind[EnrollmentGroup] = Kind(
    EnrollmentGroup,
    "enrollment group",
    "enrollmentGroups",
    "enrollmentGroupId, provisioningStatus, attestation.type, iotHubHostName",
    lambda client: client.groups,
)


# --- the flags both kinds share ------------------------------------------------------------------


class Reprovision(enum.Enum):
    """--reprovision: what happens to a device that provisions again (a reprovision policy)."""

    NEVER = "never"
    RESET = "reset"
    MIGRATE = "migrate"

    @property
    def policy(self) -> ReprovisionPolicy:
        return ReprovisionPolicy(
            update_hub_assignment=self is not Reprovision.NEVER,
            migrate_device_data=self is Reprovision.MIGRATE,
        )


def common_enrollment_options(*, create: bool) -> Callable[[F], F]:
    """The flags individual enrollments and groups share. On create, the help of a flag says
    what leaving it out gives; on update, leaving a flag out keeps the stored value (the update
    commands' help says so once), so create's defaults are not shown there."""

    def default(text: str) -> str:
        return f" [default: {text}]" if create else ""

    webhook_version = (
        default(DEFAULT_WEBHOOK_API_VERSION)
        if create
        else f" (a new --webhook-url without it gets {DEFAULT_WEBHOOK_API_VERSION})"
    )
    options = [
        click.option(
            "--hub",
            "hubs",
            multiple=True,
            metavar="HOST",
            help="IoT hub the device may be assigned to (repeatable; sets iotHubs; must be linked: "
            "`provisiond hub list`).",
        ),
        click.option(
            "--allocation-policy",
            type=EnumChoice(
                AllocationPolicy.HASHED,
                AllocationPolicy.STATIC,
                AllocationPolicy.GEO_LATENCY,
                AllocationPolicy.CUSTOM,
            ),
            help="How a hub is chosen" + default("the service's") + ".",
        ),
        click.option(
            "--webhook-url",
            metavar="URL",
            help="Custom allocation webhook (implies --allocation-policy custom).",
        ),
        click.option(
            "--webhook-api-version",
            metavar="V",
            help=f"API version sent to the custom allocation webhook{webhook_version}.",
        ),
        click.option(
            "--disabled/--enabled",
            "disabled",
            default=None,
            help=f"Provisioning status{default('enabled')}.",
        ),
        click.option("--edge/--no-edge", default=None, help="The device is an IoT Edge device."),
        click.option(
            "--initial-twin",
            metavar="JSON|@FILE",
            help='Initial twin: {"tags": {...}, "properties": {"desired": {...}}}, inline or @file.',
        ),
        click.option(
            "--reprovision",
            type=EnumChoice(*Reprovision),
            help="On re-provisioning: never move the device, move it and reset its twin, or move it "
            f"and migrate its data{default('migrate')}.",
        ),
    ]

    def decorator(func: F) -> F:
        return with_options(func, options)

    return decorator


def _initial_twin(value: str) -> InitialTwin:
    twin = load_json_arg(value, "--initial-twin")
    try:
        return msgspec.convert(twin, InitialTwin)
    except msgspec.ValidationError as exc:
        raise click.BadParameter(str(exc), param_hint="--initial-twin") from None


def apply_common_flags(
    doc: E,
    *,
    hubs: Sequence[str] = (),
    allocation_policy: AllocationPolicy | None = None,
    webhook_url: str | None = None,
    webhook_api_version: str | None = None,
    disabled: bool | None = None,
    edge: bool | None = None,
    initial_twin: str | None = None,
    reprovision: Reprovision | None = None,
) -> E:
    """``doc`` with the fields the common flags give."""
    changes: dict[str, Any] = {}
    if hubs:
        changes["iot_hubs"] = list(dict.fromkeys(hubs))
    if webhook_api_version and not webhook_url:
        if doc.custom_allocation_definition is None:
            raise click.UsageError("--webhook-api-version needs --webhook-url.")
        changes["custom_allocation_definition"] = msgspec.structs.replace(
            doc.custom_allocation_definition, api_version=webhook_api_version
        )
    if webhook_url:
        changes["custom_allocation_definition"] = CustomAllocationDefinition(
            webhook_url=webhook_url, api_version=webhook_api_version or DEFAULT_WEBHOOK_API_VERSION
        )
        if allocation_policy is None:
            allocation_policy = AllocationPolicy.CUSTOM
    if allocation_policy is not None:
        changes["allocation_policy"] = allocation_policy
    if disabled is not None:
        changes["provisioning_status"] = (
            ProvisioningStatus.DISABLED if disabled else ProvisioningStatus.ENABLED
        )
    if edge is not None:
        changes["capabilities"] = DeviceCapabilities(iot_edge=edge)
    if initial_twin is not None:
        changes["initial_twin"] = _initial_twin(initial_twin)
    if reprovision is not None:
        changes["reprovision_policy"] = reprovision.policy
    return msgspec.structs.replace(doc, **changes)


# --- attestation ---------------------------------------------------------------------------------


def _one_kind(chosen: Mapping[AttestationType, tuple[str, bool]]) -> AttestationType | None:
    """The one attestation type whose flags were given (None for none).

    :raises click.UsageError: flags of several were given.
    """
    kinds = [type_ for type_, (_, wanted) in chosen.items() if wanted]
    if len(kinds) > 1:
        raise click.UsageError(f"Choose one attestation: {' or '.join(chosen[k][0] for k in kinds)}.")
    return kinds[0] if kinds else None


def _same_type(existing: AttestationMechanism | None, type_: AttestationType) -> AttestationMechanism | None:
    """The existing attestation when it has ``type_``."""
    return existing if existing is not None and existing.type is type_ else None


_SYMMETRIC_FLAGS = "a symmetric key (--symmetric-key/--primary-key/--secondary-key)"


def _symmetric(primary_key: str | None, secondary_key: str | None) -> AttestationMechanism:
    # Omitted keys: the service keeps the stored ones (same type) or generates new ones.
    return AttestationMechanism(
        type=AttestationType.SYMMETRIC_KEY,
        symmetric_key=SymmetricKeyAttestation(
            primary_key=primary_key or None, secondary_key=secondary_key or None
        ),
    )


def _certificate(path: Path, flag: str) -> X509CertificateWithInfo:
    return X509CertificateWithInfo(certificate=read_certificate_file(path, flag))


def individual_attestation(
    existing: AttestationMechanism | None,
    *,
    symmetric_key: bool = False,
    primary_key: str | None = None,
    secondary_key: str | None = None,
    x509_cert: Path | None = None,
    x509_secondary: Path | None = None,
    tpm_ek: str | None = None,
    tpm_srk: str | None = None,
) -> AttestationMechanism | None:
    """The attestation an individual enrollment's flags ask for, or ``None`` when they name
    none (create: the caller uses a symmetric key; update: keeps what is stored).

    On update, what the flags leave out is kept from ``existing`` when the type stays the same
    (e.g. ``--x509-cert`` alone keeps the stored secondary certificate).
    """
    kind = _one_kind(
        {
            AttestationType.SYMMETRIC_KEY: (
                _SYMMETRIC_FLAGS,
                bool(symmetric_key or primary_key or secondary_key),
            ),
            AttestationType.X509: ("X.509 (--x509-cert/--x509-secondary)", bool(x509_cert or x509_secondary)),
            AttestationType.TPM: ("TPM (--tpm-ek/--tpm-srk)", bool(tpm_ek or tpm_srk)),
        }
    )
    if kind is AttestationType.SYMMETRIC_KEY:
        return _symmetric(primary_key, secondary_key)
    if kind is AttestationType.X509:
        same = _same_type(existing, AttestationType.X509)
        old = (same.x509.client_certificates if same and same.x509 else None) or X509Certificates()
        primary = _certificate(x509_cert, "--x509-cert") if x509_cert else old.primary
        if primary is None:
            raise click.UsageError("X.509 attestation needs --x509-cert (the device's certificate).")
        secondary = _certificate(x509_secondary, "--x509-secondary") if x509_secondary else old.secondary
        certificates = X509Certificates(primary=primary, secondary=secondary)
        return AttestationMechanism(type=kind, x509=X509Attestation(client_certificates=certificates))
    if kind is AttestationType.TPM:
        same = _same_type(existing, AttestationType.TPM)
        old_tpm = same.tpm if same else None
        ek = tpm_ek or (old_tpm.endorsement_key if old_tpm else None)
        if not ek:
            raise click.UsageError("TPM attestation needs --tpm-ek (the endorsement key, base64).")
        srk = tpm_srk or (old_tpm.storage_root_key if old_tpm else None) or None
        return AttestationMechanism(type=kind, tpm=TpmAttestation(endorsement_key=ek, storage_root_key=srk))
    return None


def group_attestation(
    existing: AttestationMechanism | None,
    *,
    symmetric_key: bool = False,
    primary_key: str | None = None,
    secondary_key: str | None = None,
    ca_cert: Path | None = None,
    ca_ref: str | None = None,
) -> AttestationMechanism | None:
    """The attestation an enrollment group's flags ask for, or ``None`` when they name none.

    ``--ca-cert`` and ``--ca-ref`` may be combined (both are X.509); on update a stored
    secondary signing certificate or CA reference is kept.
    """
    kind = _one_kind(
        {
            AttestationType.SYMMETRIC_KEY: (
                _SYMMETRIC_FLAGS,
                bool(symmetric_key or primary_key or secondary_key),
            ),
            AttestationType.X509: ("X.509 (--ca-cert/--ca-ref)", bool(ca_cert or ca_ref)),
        }
    )
    if kind is AttestationType.SYMMETRIC_KEY:
        return _symmetric(primary_key, secondary_key)
    if kind is not AttestationType.X509:
        return None
    same = _same_type(existing, AttestationType.X509)
    old = (same.x509 if same else None) or X509Attestation()
    x509 = X509Attestation()
    if ca_cert:
        old_secondary = old.signing_certificates.secondary if old.signing_certificates else None
        signing = X509Certificates(primary=_certificate(ca_cert, "--ca-cert"), secondary=old_secondary)
        x509 = msgspec.structs.replace(x509, signing_certificates=signing)
    if ca_ref:
        old_secondary_ref = old.ca_references.secondary if old.ca_references else None
        refs = X509CaReferences(primary=ca_ref, secondary=old_secondary_ref or None)
        x509 = msgspec.structs.replace(x509, ca_references=refs)
    return AttestationMechanism(type=kind, x509=x509)
