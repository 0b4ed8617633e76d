"""Assignment as a pure decision: no I/O, no clock, no randomness (all passed in).

Theory of operation
-------------------
Given what the registrar knows (:class:`Facts`: the attestation's :class:`Match`, the device's
previous registration record, the request's payload, the time and the operation id), two
functions decide a registration:

1. :func:`choose_hub`, with the linked hubs and the service's default allocation policy: a
   disabled enrollment denies (:class:`Denied`); a device already assigned whose enrollment says
   ``updateHubAssignment: false`` stays in its hub while that hub is linked; otherwise the
   allocation policy chooses among the candidates (``allocation.py``), except ``custom``, which
   asks the enrollment's webhook (:class:`AskWebhook`, with the request the registrar POSTs:
   :func:`webhook_request`). No hub is a :class:`NoHub` with DPS's errorCode.
2. :func:`decide`, with that choice (the webhook's answer turned into :class:`Assign`): the
   record to write (status, substatus, hub, device id, errorCode) and the
   :class:`~provisiond.hub.IdentityChange` that goes with it (the identity to put, the twin it
   gets, the old identity to remove). Where the device lands, compared with its previous
   assignment (:class:`Placement`), and the enrollment's ``migrateDeviceData`` decide the
   substatus and the twin (:data:`OUTCOMES`).

The decision does not read the hub: whether the identity exists, and the old identity's twin
for a migration, are the hub backend's to find (:meth:`~provisiond.hub.TwinPlan.resolve`), in
the registration's transaction for the built-in hub, in its writer for a remote one.

DPS's three reprovisioning policies map onto the two flags of ``reprovisionPolicy``:

========================================  ===================  ==================
policy (DPS portal)                        updateHubAssignment  migrateDeviceData
========================================  ===================  ==================
re-provision and migrate data (default)    true                 true
re-provision and reset to initial config   true                 false
never re-provision                         false                (either)
========================================  ===================  ==================

A device under "never" moves only when its hub is no longer linked (or its individual
enrollment names another device id); ``migrateDeviceData`` then decides as for the others.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import msgspec

from ..allocation import AllocationError, allocate, candidate_hubs
from ..attestation.base import Match
from ..errors import DpsCode
from ..hub import IdentityChange, IdentityRef, IdentitySpec, TwinPlan, TwinSource
from ..models import (
    AllocationPolicy,
    AttestationType,
    EnrollmentGroup,
    IndividualEnrollment,
    LinkedHub,
    ProvisioningStatus,
    RegistrationStatus,
    RegistrationSubstatus,
    ReprovisionPolicy,
)
from ..protocol.messages import TpmAttestationRequest
from .enrollments import strip_secrets
from .records import RegistrationRecord
from .webhook import AllocationRequest, AllocationResponse, DeviceRuntimeContext

__all__ = [
    "OUTCOMES",
    "Assign",
    "AskWebhook",
    "Decision",
    "Denied",
    "Facts",
    "HubChoice",
    "NoHub",
    "Placement",
    "choose_hub",
    "decide",
    "fail_in_hub",
    "webhook_request",
]


class Facts(msgspec.Struct, frozen=True, kw_only=True):
    """What a registration's decision starts from."""

    #: As the request spells it (the device id of an identity without one in its enrollment).
    registration_id: str
    #: As the stored record spells it (the id it was first written with; else as the request).
    record_id: str
    operation_id: str
    #: The record's timestamps (ISO 8601 UTC, as the store writes them).
    now: str
    match: Match
    previous: RegistrationRecord | None
    #: The device's ``payload``.
    payload: Any = None

    @property
    def assigned_before(self) -> RegistrationRecord | None:
        """The previous record, if it says the device is assigned."""
        old = self.previous
        return old if old is not None and old.is_assigned else None


# --- choosing the hub ---------------------------------------------------------------------------


class Denied(msgspec.Struct, frozen=True):
    """The enrollment is disabled."""


class NoHub(msgspec.Struct, frozen=True):
    """No hub: the record fails with ``code``."""

    code: DpsCode
    message: str


class Assign(msgspec.Struct, frozen=True):
    hub: LinkedHub
    #: The custom allocation webhook's answer (its payload and initial twin apply).
    custom: AllocationResponse | None = None


class AskWebhook(msgspec.Struct, frozen=True):
    url: str
    candidates: Sequence[LinkedHub]


HubChoice: TypeAlias = Denied | NoHub | Assign | AskWebhook


def choose_hub(
    facts: Facts,
    linked: Mapping[str, LinkedHub],
    default_policy: AllocationPolicy | None,
    *,
    region: str | None = None,
) -> HubChoice:
    """Where the device goes, or why it goes nowhere (see the module docstring).

    :param linked: every linked hub, keyed by lower-cased host name.
    :param default_policy: the service's allocation policy (for enrollments without one).
    :param region: the region of the node deciding (``serve --region``; geoLatency).
    """
    match = facts.match
    enrollment = match.enrollment
    if enrollment.provisioning_status is ProvisioningStatus.DISABLED:
        return Denied()
    old = facts.assigned_before
    reprovision = enrollment.reprovision_policy or ReprovisionPolicy()
    if old is not None and not reprovision.update_hub_assignment and old.assigned_hub in linked:
        return Assign(linked[old.assigned_hub or ""])
    named = enrollment.iot_hubs or ([enrollment.iot_hub_host_name] if enrollment.iot_hub_host_name else [])
    policy = enrollment.allocation_policy or default_policy or AllocationPolicy.HASHED
    candidates = candidate_hubs(named, linked)
    if policy is AllocationPolicy.CUSTOM and candidates:
        definition = enrollment.custom_allocation_definition
        if definition is None or not definition.webhook_url:
            return NoHub(
                DpsCode.NO_HUB,
                f"The {match.label} uses custom allocation but has no customAllocationDefinition.webhookUrl.",
            )
        return AskWebhook(definition.webhook_url, candidates)
    try:
        return Assign(allocate(policy, facts.registration_id, candidates, named=named, region=region))
    except AllocationError as exc:
        return NoHub(DpsCode.NO_HUB, str(exc))


def webhook_request(
    facts: Facts, candidates: Sequence[LinkedHub], tpm: TpmAttestationRequest | None
) -> AllocationRequest:
    """What the custom allocation webhook is sent (service-api.md §8): the enrollment without
    its secrets, the device's runtime context (its current assignment, its attestation, its
    payload) and the candidate hubs. ``tpm``: the request body's."""
    match = facts.match
    enrollment = match.enrollment
    stripped = msgspec.structs.replace(enrollment, attestation=strip_secrets(enrollment.attestation))
    old = facts.assigned_before
    return AllocationRequest(
        individual_enrollment=stripped if isinstance(stripped, IndividualEnrollment) else None,
        enrollment_group=stripped if isinstance(stripped, EnrollmentGroup) else None,
        device_runtime_context=DeviceRuntimeContext(
            registration_id=facts.registration_id,
            current_iot_hub_host_name=old.assigned_hub if old else None,
            current_device_id=old.device_id if old else None,
            x509=match.x509,
            symmetric_key={} if match.attestation is AttestationType.SYMMETRIC_KEY else None,
            tpm=tpm,
            payload=facts.payload,
        ),
        linked_hubs=[hub.host_name for hub in candidates],
    )


# --- deciding ---------------------------------------------------------------------------------


class Placement(enum.Enum):
    """Where the device lands, compared with its previous assignment."""

    FIRST = "first"  # it was not assigned (no record, or one that did not end assigned)
    SAME = "same"  # the hub and the device id it had
    MOVED = "moved"  # another hub, or another device id


#: (placement, ``reprovisionPolicy.migrateDeviceData``) -> (substatus, the twin the identity
#: gets); a substatus of ``None`` keeps the one the device had.
OUTCOMES: Mapping[tuple[Placement, bool], tuple[RegistrationSubstatus | None, TwinSource]] = {
    (Placement.FIRST, True): (RegistrationSubstatus.INITIAL_ASSIGNMENT, TwinSource.INITIAL),
    (Placement.FIRST, False): (RegistrationSubstatus.INITIAL_ASSIGNMENT, TwinSource.INITIAL),
    (Placement.SAME, True): (None, TwinSource.KEEP),
    (Placement.SAME, False): (None, TwinSource.KEEP),
    (Placement.MOVED, True): (RegistrationSubstatus.DEVICE_DATA_MIGRATED, TwinSource.MIGRATE),
    (Placement.MOVED, False): (RegistrationSubstatus.DEVICE_DATA_RESET, TwinSource.RESET),
}


class Decision(msgspec.Struct, frozen=True):
    """The record to write, and the identity change that commits with it (none unless the
    record says ``assigned``)."""

    record: RegistrationRecord
    identity: IdentityChange | None = None


def _base(facts: Facts) -> RegistrationRecord:
    """The record's fields every outcome shares."""
    match, old = facts.match, facts.previous
    return RegistrationRecord(
        registration_id=facts.record_id,
        created_date_time_utc=(old.created_date_time_utc if old else None) or facts.now,
        last_updated_date_time_utc=facts.now,
        operation_id=facts.operation_id,
        enrollment_group_id=match.group.enrollment_group_id if match.group else None,
        attestation_type=match.attestation,
        x509=match.x509,
        symmetric_key=match.symmetric_key,
        payload=facts.payload,
    )


def _placement(old: RegistrationRecord | None, hub: LinkedHub, device_id: str) -> Placement:
    if old is None:
        return Placement.FIRST
    if old.assigned_hub != hub.host_name.lower() or old.device_id != device_id:
        return Placement.MOVED
    return Placement.SAME


def decide(facts: Facts, choice: Denied | NoHub | Assign) -> Decision:
    """The registration's outcome (see the module docstring)."""
    base = _base(facts)
    if isinstance(choice, Denied):
        old = facts.previous
        return Decision(
            msgspec.structs.replace(
                base,
                status=RegistrationStatus.DISABLED,
                assigned_hub=old.assigned_hub if old else None,
                device_id=old.device_id if old else None,
                error_code=DpsCode.ENROLLMENT_DISABLED,
                error_message=f"The {facts.match.label} is disabled.",
            )
        )
    if isinstance(choice, NoHub):
        return Decision(
            msgspec.structs.replace(
                base, status=RegistrationStatus.FAILED, error_code=choice.code, error_message=choice.message
            )
        )
    return _assign(facts, base, choice)


def _assign(facts: Facts, base: RegistrationRecord, choice: Assign) -> Decision:
    match, hub, custom = facts.match, choice.hub, choice.custom
    enrollment = match.enrollment
    old = facts.assigned_before
    device_id = (match.individual.device_id if match.individual else None) or facts.registration_id
    placement = _placement(old, hub, device_id)
    migrate = (enrollment.reprovision_policy or ReprovisionPolicy()).migrate_device_data
    substatus, source = OUTCOMES[placement, migrate]
    initial = enrollment.initial_twin
    if custom is not None:
        base = msgspec.structs.replace(base, payload=custom.payload)
        if custom.initial_twin is not None:  # replaces the twin, whatever the reprovisioning says
            source, initial = TwinSource.INITIAL, custom.initial_twin
    moved_from = IdentityRef(old.assigned_hub or "", old.device_id) if old and old.device_id else None
    change = IdentityChange(
        put=IdentitySpec(
            hub=hub,
            device_id=device_id,
            registration_id=facts.registration_id,
            credential=match.identity_credential,
            capabilities=enrollment.capabilities,
            twin=TwinPlan(source, initial),
        ),
        remove=moved_from if placement is Placement.MOVED else None,
        probably_new=placement is not Placement.SAME,
    )
    record = msgspec.structs.replace(
        base,
        status=RegistrationStatus.ASSIGNED,
        substatus=substatus or (old.substatus if old else None) or RegistrationSubstatus.INITIAL_ASSIGNMENT,
        assigned_hub=hub.host_name.lower(),
        device_id=device_id,
        tpm=match.tpm,
    )
    return Decision(record, change)


def fail_in_hub(decision: Decision, message: str) -> Decision:
    """The decision turned into a failure because the hub did not take the identity (400209)."""
    record = msgspec.structs.replace(
        decision.record,
        status=RegistrationStatus.FAILED,
        substatus=None,
        assigned_hub=None,
        device_id=None,
        tpm=None,
        error_code=DpsCode.HUB_FAILED,
        error_message=message,
    )
    return Decision(record)
