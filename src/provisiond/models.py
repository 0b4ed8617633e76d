"""The DPS data models, field for field (service API 2021-10-01), as msgspec structs.

Structs decode JSON with type checking (a wrong type is a 400 that names the field) and encode
camelCase with unset fields omitted, which is exactly DPS's wire shape. Read-only fields are
accepted on input and overwritten by the service. Unknown fields are ignored, as DPS does.

Enums hold the wire spelling as their value; code compares enum members, never strings.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

__all__ = [
    "AllocationPolicy",
    "AttestationMechanism",
    "AttestationType",
    "BulkEnrollmentGroupOperation",
    "BulkEnrollmentOperation",
    "BulkEnrollmentOperationBody",
    "BulkEnrollmentOperationError",
    "BulkEnrollmentOperationResult",
    "BulkOperationMode",
    "CaCertificate",
    "CertificateUpload",
    "CustomAllocationDefinition",
    "Deprovision",
    "DeviceCapabilities",
    "DeviceRegistrationState",
    "EnrollmentGroup",
    "IndividualEnrollment",
    "IndividualEnrollmentBody",
    "InitialTwin",
    "HubTier",
    "HubWriterReport",
    "WriterCounts",
    "LinkedHub",
    "ProvisioningStatus",
    "QuerySpecification",
    "RegistrationStatus",
    "RegistrationSubstatus",
    "ReprovisionPolicy",
    "Right",
    "ServiceSettings",
    "ServiceSettingsPatch",
    "SharedAccessPolicy",
    "SymmetricKeyAttestation",
    "TpmAttestation",
    "X509Attestation",
    "X509CaReferences",
    "X509CertificateInfo",
    "X509CertificateWithInfo",
    "X509Certificates",
    "X509GroupAuthentication",
]


class _Model(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    """Base of every wire model: camelCase names, unset (None) fields omitted."""


class ProvisioningStatus(enum.Enum):
    ENABLED = "enabled"
    DISABLED = "disabled"


class AttestationType(enum.Enum):
    NONE = "none"
    TPM = "tpm"
    X509 = "x509"
    SYMMETRIC_KEY = "symmetricKey"


class AllocationPolicy(enum.Enum):
    HASHED = "hashed"
    GEO_LATENCY = "geoLatency"
    STATIC = "static"
    CUSTOM = "custom"


class RegistrationStatus(enum.Enum):
    UNASSIGNED = "unassigned"
    ASSIGNING = "assigning"
    ASSIGNED = "assigned"
    FAILED = "failed"
    DISABLED = "disabled"


class RegistrationSubstatus(enum.Enum):
    INITIAL_ASSIGNMENT = "initialAssignment"
    DEVICE_DATA_MIGRATED = "deviceDataMigrated"
    DEVICE_DATA_RESET = "deviceDataReset"
    REPROVISIONED_TO_INITIAL_ASSIGNMENT = "reprovisionedToInitialAssignment"


class X509GroupAuthentication(enum.Enum):
    """How a linked hub authenticates the devices of X.509 enrollment groups (IoT Hub's
    ``authentication.type``). DPS creates them ``selfSigned`` with the leaf's thumbprint;
    ``certificateAuthority`` is provisiond's opt-in per linked hub."""

    SELF_SIGNED = "selfSigned"
    CERTIFICATE_AUTHORITY = "certificateAuthority"


class HubTier(enum.Enum):
    """An IoT hub's pricing tier. It sets the hub's throttle on identity registry operations
    (create, get, list, update, delete), per unit: 100 a minute on F1, B1, B2, S1 and S2, 5,000 a
    minute on B3 and S3 (IoT Hub's "quotas and throttling"), and how many units it can have."""

    F1 = "F1"
    B1 = "B1"
    B2 = "B2"
    B3 = "B3"
    S1 = "S1"
    S2 = "S2"
    S3 = "S3"

    @property
    def registry_operations_per_minute(self) -> int:
        """Per unit."""
        return 5000 if self in (HubTier.B3, HubTier.S3) else 100

    @property
    def max_units(self) -> int:
        if self is HubTier.F1:
            return 1
        return 10 if self in (HubTier.B3, HubTier.S3) else 200


class Deprovision(enum.Enum):
    """What deleting an enrollment, a group's devices or a registration record does to the
    identities they created in their hubs (provisiond's option; DPS leaves them)."""

    DISABLE = "disable"
    DELETE = "delete"


class BulkOperationMode(enum.Enum):
    CREATE = "create"
    UPDATE = "update"
    UPDATE_IF_MATCH_ETAG = "updateIfMatchETag"
    DELETE = "delete"


class Right(enum.Enum):
    """The rights of a shared access policy (DPS's names)."""

    SERVICE_CONFIG = "ServiceConfig"
    ENROLLMENT_READ = "EnrollmentRead"
    ENROLLMENT_WRITE = "EnrollmentWrite"
    REGISTRATION_STATUS_READ = "RegistrationStatusRead"
    REGISTRATION_STATUS_WRITE = "RegistrationStatusWrite"


# --- attestation ---------------------------------------------------------------------------------


class TpmAttestation(_Model):
    endorsement_key: str
    storage_root_key: str | None = None


class SymmetricKeyAttestation(_Model):
    primary_key: str | None = None
    secondary_key: str | None = None


class X509CertificateInfo(_Model):
    subject_name: str
    sha1_thumbprint: str
    sha256_thumbprint: str
    issuer_name: str
    not_before_utc: str
    not_after_utc: str
    serial_number: str
    version: int


class X509CertificateWithInfo(_Model):
    certificate: str | None = None
    info: X509CertificateInfo | None = None


class X509Certificates(_Model):
    primary: X509CertificateWithInfo | None = None
    secondary: X509CertificateWithInfo | None = None


class X509CaReferences(_Model):
    primary: str | None = None
    secondary: str | None = None


class X509Attestation(_Model):
    client_certificates: X509Certificates | None = None
    signing_certificates: X509Certificates | None = None
    ca_references: X509CaReferences | None = None


class AttestationMechanism(_Model):
    type: AttestationType
    tpm: TpmAttestation | None = None
    x509: X509Attestation | None = None
    symmetric_key: SymmetricKeyAttestation | None = None


# --- enrollments ---------------------------------------------------------------------------------


class DeviceCapabilities(msgspec.Struct, rename="camel", kw_only=True):
    # Not omit_defaults: DPS always writes iotEdge.
    iot_edge: bool = False


class InitialTwinProperties(_Model):
    desired: dict[str, Any] | None = None


class InitialTwin(_Model):
    tags: dict[str, Any] | None = None
    properties: InitialTwinProperties | None = None


class ReprovisionPolicy(msgspec.Struct, rename="camel", kw_only=True):
    # Both fields are required in the spec; DPS fills the defaults and always writes them.
    update_hub_assignment: bool = True
    migrate_device_data: bool = True


class CustomAllocationDefinition(_Model):
    webhook_url: str
    api_version: str


class DeviceRegistrationState(_Model):
    """A registration record (read-only to the service API)."""

    registration_id: str
    created_date_time_utc: str | None = None
    assigned_hub: str | None = None
    device_id: str | None = None
    status: RegistrationStatus | None = None
    substatus: RegistrationSubstatus | None = None
    error_code: int | None = None
    error_message: str | None = None
    last_updated_date_time_utc: str | None = None
    etag: str | None = None
    payload: Any = None


class _EnrollmentCommon(_Model):
    attestation: AttestationMechanism
    capabilities: DeviceCapabilities | None = None
    iot_hub_host_name: str | None = None
    initial_twin: InitialTwin | None = None
    etag: str | None = None
    provisioning_status: ProvisioningStatus | None = None
    reprovision_policy: ReprovisionPolicy | None = None
    created_date_time_utc: str | None = None
    last_updated_date_time_utc: str | None = None
    allocation_policy: AllocationPolicy | None = None
    iot_hubs: list[str] | None = None
    custom_allocation_definition: CustomAllocationDefinition | None = None
    credential_policy_name: str | None = None


class IndividualEnrollment(_EnrollmentCommon, kw_only=True):
    registration_id: str
    device_id: str | None = None
    registration_state: DeviceRegistrationState | None = None
    optional_device_information: dict[str, Any] | None = None


class EnrollmentGroup(_EnrollmentCommon, kw_only=True):
    enrollment_group_id: str


class QuerySpecification(_Model):
    query: str


class IndividualEnrollmentBody(IndividualEnrollment, kw_only=True):
    """An individual enrollment as a client sends it. ``registrationState`` is read-only
    (DPS's specification marks it so, and its examples send ``{}``): whatever a client puts there
    is accepted, then dropped, never checked against the registration record's shape."""

    registration_state: Any = None


class BulkEnrollmentOperation(_Model):
    enrollments: list[IndividualEnrollment]
    mode: BulkOperationMode


class BulkEnrollmentOperationBody(_Model):
    """:class:`BulkEnrollmentOperation` as a client sends it (see :class:`IndividualEnrollmentBody`)."""

    enrollments: list[IndividualEnrollmentBody]
    mode: BulkOperationMode


class BulkEnrollmentGroupOperation(_Model):
    enrollment_groups: list[EnrollmentGroup]
    mode: BulkOperationMode


class BulkEnrollmentOperationError(_Model):
    error_code: int
    error_status: str
    registration_id: str | None = None
    enrollment_group_id: str | None = None


class BulkEnrollmentOperationResult(msgspec.Struct, rename="camel", kw_only=True):
    # Not omit_defaults: isSuccessful must appear even when false.
    is_successful: bool
    errors: list[BulkEnrollmentOperationError] = msgspec.field(default_factory=list)


# --- management plane (Azure keeps these in ARM; provisiond serves them under /admin) ------------


class LinkedHub(_Model):
    """An IoT hub devices can be assigned to.

    ``connectionString`` is how provisiond reaches the hub's identity registry (secret: stripped
    from reads). ``builtin`` marks the hub provisiond itself serves. ``x509GroupAuthentication``
    (default ``selfSigned``, as DPS) says how X.509 group devices are created in this hub.
    ``location`` places it for geoLatency allocation (:mod:`provisiond.regions`). A remote hub's
    write budget is ``writeBudgetPerSecond``, else what its ``tier`` and ``units`` allow
    (:meth:`registry_write_budget`); ``caCertificate`` (PEM) is what its TLS certificate must
    chain to, instead of the system's trust store.
    """

    host_name: str
    connection_string: str | None = None
    allocation_weight: int | None = None
    apply_allocation_policy: bool | None = None
    builtin: bool | None = None
    location: str | None = None
    x509_group_authentication: X509GroupAuthentication | None = None
    tier: HubTier | None = None
    units: int | None = None
    write_budget_per_second: float | None = None
    ca_certificate: str | None = None
    etag: str | None = None

    def registry_write_budget(self) -> float | None:
        """Registry operations a second provisiond may spend on this hub: the explicit
        ``writeBudgetPerSecond``, else the tier's throttle times its units; ``None``: no budget
        (the hub's 429s and their Retry-After pace the writes)."""
        if self.write_budget_per_second is not None:
            return self.write_budget_per_second
        if self.tier is None:
            return None
        return self.tier.registry_operations_per_minute * (self.units or 1) / 60


class WriterCounts(msgspec.Struct, kw_only=True, rename="camel"):
    """The hub writer's counts for one hub: registry calls made, identities written
    (registrations finished 'assigned'), throttled answers (429), items retried after a
    transient failure, items failed for good, deprovisioning items done, and the bulk registry
    calls (``POST /devices``, up to 100 new identities each) among the calls. One node's are
    :class:`provisiond.service.hub_figures.WriterFigures`; their sum, :class:`HubWriterReport`."""

    calls: int = 0
    written: int = 0
    throttled: int = 0
    retried: int = 0
    failed: int = 0
    removed: int = 0
    bulk_calls: int = 0

    def add(self, other: WriterCounts) -> None:
        for name in WriterCounts.__struct_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class HubWriterReport(WriterCounts, kw_only=True, rename="camel"):
    """``GET /admin/linkedHubs/{hub}/writer``: the hub writer's figures for one hub, summed
    over the nodes since their figures were first stored (they survive restarts); kept by
    :mod:`provisiond.service.hub_figures`."""

    hub: str
    #: The write budget in force (calls a second; ``None``: unpaced).
    budget_per_second: float | None
    #: Outbox items not yet done for this hub (registrations 'assigning', deprovisioning),
    #: whether a writer holds them now or they wait for their turn.
    queued: int
    nodes: int = 0


class CaCertificate(_Model):
    """A CA certificate registered for proof of possession (Azure: provisioningServices/certificates)."""

    name: str
    certificate: str | None = None
    is_verified: bool | None = None
    verification_code: str | None = None
    subject: str | None = None
    thumbprint: str | None = None
    sha256_thumbprint: str | None = None
    expiry: str | None = None
    created: str | None = None
    updated: str | None = None
    etag: str | None = None


class CertificateUpload(_Model):
    """The body of a CA certificate upload (``PUT /admin/certificates/{name}``) and of its proof
    of possession (``POST .../verify``, where only ``certificate`` counts): PEM, base64 of DER or
    base64 of PEM."""

    certificate: str
    is_verified: bool = False
    etag: str | None = None


class SharedAccessPolicy(_Model):
    key_name: str
    rights: list[Right] | None = None
    primary_key: str | None = None
    secondary_key: str | None = None
    etag: str | None = None


class ServiceSettings(_Model):
    """The service's own settings (Azure: properties of the provisioningServices resource)."""

    id_scope: str | None = None
    allocation_policy: AllocationPolicy | None = None
    service_operations_host_name: str | None = None
    device_provisioning_host_name: str | None = None
    etag: str | None = None


class ServiceSettingsPatch(_Model):
    """A change of the service settings (``PATCH /admin/settings``): the fields given are set."""

    id_scope: str | None = None
    allocation_policy: AllocationPolicy | None = None
