"""The assignment decision on its own: pure functions, no store, no clock.

The tables of ``service/assignment.py``: where a device goes (:func:`choose_hub`), what its
record and its identity become (:func:`decide`, :data:`OUTCOMES`), and which twin an identity
ends with once the hub is read (:meth:`TwinPlan.resolve`)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from provisiond import twin as tw
from provisiond.attestation.base import KeyCredential, Match
from provisiond.errors import DpsCode
from provisiond.hub import AuthenticationType, HubDevice, IdentityRef, Twin, TwinPlan, TwinSource
from provisiond.hub.models import DeviceAuthentication
from provisiond.models import (
    AllocationPolicy,
    AttestationMechanism,
    AttestationType,
    CustomAllocationDefinition,
    EnrollmentGroup,
    IndividualEnrollment,
    InitialTwin,
    InitialTwinProperties,
    LinkedHub,
    ProvisioningStatus,
    RegistrationStatus,
    RegistrationSubstatus,
    ReprovisionPolicy,
    SymmetricKeyAttestation,
)
from provisiond.protocol.messages import SymmetricKeyRegistrationResult
from provisiond.service.assignment import (
    OUTCOMES,
    AskWebhook,
    Assign,
    Denied,
    Facts,
    NoHub,
    Placement,
    choose_hub,
    decide,
    fail_in_hub,
    webhook_request,
)
from provisiond.service.records import RegistrationRecord
from provisiond.service.webhook import AllocationResponse

HUB_A = LinkedHub(host_name="A.hub", builtin=True)
HUB_B = LinkedHub(host_name="b.hub", builtin=True)
LINKED = {"a.hub": HUB_A, "b.hub": HUB_B}
NOW = "2024-05-01T12:00:00.000000Z"
KEYS = SymmetricKeyAttestation(primary_key="cHJpbWFyeQ==", secondary_key="c2Vjb25kYXJ5")


def individual(**extra: Any) -> IndividualEnrollment:
    attestation = AttestationMechanism(type=AttestationType.SYMMETRIC_KEY, symmetric_key=KEYS)
    return IndividualEnrollment(registration_id="dev-1", attestation=attestation, **extra)


def match(enrollment: IndividualEnrollment | EnrollmentGroup | None = None) -> Match:
    return Match(
        enrollment=enrollment or individual(),
        attestation=AttestationType.SYMMETRIC_KEY,
        identity_credential=KeyCredential("k1", "k2"),
        symmetric_key=SymmetricKeyRegistrationResult(),
    )


def previous(status: RegistrationStatus = RegistrationStatus.ASSIGNED, **extra: Any) -> RegistrationRecord:
    fields: dict[str, Any] = {
        "registration_id": "Dev-1",
        "created_date_time_utc": "2020-01-01T00:00:00.000000Z",
        "status": status,
        "assigned_hub": "a.hub",
        "device_id": "dev-1",
        "substatus": RegistrationSubstatus.DEVICE_DATA_RESET,
        "operation_id": "old-op",
    }
    return RegistrationRecord(**{**fields, **extra})


def facts(m: Match | None = None, old: RegistrationRecord | None = None, **extra: Any) -> Facts:
    return Facts(
        registration_id="dev-1",
        record_id=old.registration_id if old else "dev-1",
        operation_id="op",
        now=NOW,
        match=m or match(),
        previous=old,
        payload=extra.pop("payload", None),
        **extra,
    )


# --- choosing the hub ------------------------------------------------------------------------


NEVER = ReprovisionPolicy(update_hub_assignment=False, migrate_device_data=True)


@pytest.mark.parametrize(
    ("enrollment", "old", "linked", "expected"),
    [
        pytest.param(individual(provisioning_status=ProvisioningStatus.DISABLED), None, LINKED, Denied(), id="disabled"),
        pytest.param(
            individual(iot_hubs=["b.hub"], reprovision_policy=NEVER), previous(), LINKED, Assign(HUB_A),
            id="never-stays-in-its-hub",
        ),
        pytest.param(
            individual(iot_hubs=["b.hub"], reprovision_policy=NEVER), previous(), {"b.hub": HUB_B}, Assign(HUB_B),
            id="never-moves-when-its-hub-is-unlinked",
        ),
        pytest.param(
            individual(iot_hubs=["b.hub"], reprovision_policy=NEVER), previous(RegistrationStatus.FAILED), LINKED,
            Assign(HUB_B), id="never-but-not-assigned-before",
        ),
        pytest.param(
            individual(iot_hubs=["b.hub"], allocation_policy=AllocationPolicy.STATIC), previous(), LINKED,
            Assign(HUB_B), id="reprovisioned-by-default",
        ),
        pytest.param(
            individual(allocation_policy=AllocationPolicy.STATIC), None, LINKED,
            NoHub(DpsCode.NO_HUB, "The static allocation policy needs the enrollment to name its IoT hub (iotHubs)."),
            id="static-without-a-hub",
        ),
        pytest.param(
            individual(iot_hubs=["gone.hub"]), None, LINKED,
            NoHub(DpsCode.NO_HUB, "None of the enrollment's IoT hubs (gone.hub) is linked to this service."),
            id="named-hub-not-linked",
        ),
        pytest.param(
            individual(allocation_policy=AllocationPolicy.CUSTOM, iot_hubs=["b.hub"]), None, LINKED,
            NoHub(
                DpsCode.NO_HUB,
                "The individual enrollment 'dev-1' uses custom allocation but has no "
                "customAllocationDefinition.webhookUrl.",
            ),
            id="custom-without-a-webhook",
        ),
        pytest.param(
            individual(
                allocation_policy=AllocationPolicy.CUSTOM,
                custom_allocation_definition=CustomAllocationDefinition(webhook_url="https://h/", api_version="x"),
            ),
            None, LINKED, AskWebhook("https://h/", [HUB_A, HUB_B]), id="custom-asks-the-webhook",
        ),
    ],
)  # fmt: skip
def test_choose_hub(
    enrollment: IndividualEnrollment,
    old: RegistrationRecord | None,
    linked: dict[str, LinkedHub],
    expected: Any,
) -> None:
    assert choose_hub(facts(match(enrollment), old), linked, AllocationPolicy.HASHED) == expected


def test_the_services_policy_applies_to_enrollments_without_one() -> None:
    only_a = individual(iot_hubs=["A.hub"])
    assert choose_hub(facts(match(only_a)), LINKED, AllocationPolicy.STATIC) == Assign(HUB_A)
    unnamed = individual()
    assert isinstance(choose_hub(facts(match(unnamed)), LINKED, AllocationPolicy.STATIC), NoHub)
    assert isinstance(choose_hub(facts(match(unnamed)), LINKED, None), Assign)  # hashed


def test_the_webhook_is_sent_the_enrollment_without_secrets_and_the_current_assignment() -> None:
    enrollment = individual(allocation_policy=AllocationPolicy.CUSTOM)
    sent = webhook_request(facts(match(enrollment), previous(), payload={"p": 1}), [HUB_A, HUB_B], None)
    assert sent.linked_hubs == ["A.hub", "b.hub"]
    assert sent.individual_enrollment is not None and sent.enrollment_group is None
    assert sent.individual_enrollment.attestation.symmetric_key is None
    context = sent.device_runtime_context
    assert (context.current_iot_hub_host_name, context.current_device_id) == ("a.hub", "dev-1")
    assert (context.symmetric_key, context.payload) == ({}, {"p": 1})
    not_assigned = webhook_request(
        facts(match(enrollment), previous(RegistrationStatus.FAILED)), [HUB_A], None
    )
    assert not_assigned.device_runtime_context.current_iot_hub_host_name is None


# --- deciding -------------------------------------------------------------------------------------


def test_outcomes_cover_every_placement_and_flag() -> None:
    assert set(OUTCOMES) == set(itertools.product(Placement, (True, False)))


@pytest.mark.parametrize(
    ("old", "hub", "device_id", "migrate", "substatus", "source", "remove", "probably_new"),
    [
        pytest.param(None, HUB_A, None, True, "initialAssignment", "initial", None, True, id="first"),
        pytest.param(
            previous(RegistrationStatus.FAILED), HUB_A, None, False, "initialAssignment", "initial", None, True,
            id="first-after-a-failure",
        ),
        pytest.param(previous(), HUB_A, None, True, "deviceDataReset", "keep", None, False, id="same-keeps-substatus"),
        pytest.param(
            previous(), HUB_B, None, True, "deviceDataMigrated", "migrate", IdentityRef("a.hub", "dev-1"), True,
            id="moved-migrate",
        ),
        pytest.param(
            previous(), HUB_B, None, False, "deviceDataReset", "reset", IdentityRef("a.hub", "dev-1"), True,
            id="moved-reset",
        ),
        pytest.param(
            previous(), HUB_A, "renamed", True, "deviceDataMigrated", "migrate", IdentityRef("a.hub", "dev-1"), True,
            id="new-device-id-is-a-move",
        ),
    ],
)  # fmt: skip
def test_decide_places_the_device(
    old: RegistrationRecord | None,
    hub: LinkedHub,
    device_id: str | None,
    migrate: bool,
    substatus: str,
    source: str,
    remove: IdentityRef | None,
    probably_new: bool,
) -> None:
    policy = ReprovisionPolicy(update_hub_assignment=True, migrate_device_data=migrate)
    enrollment = individual(
        reprovision_policy=policy, device_id=device_id, initial_twin=InitialTwin(tags={"t": 1})
    )
    decision = decide(facts(match(enrollment), old, payload={"p": 1}), Assign(hub))
    record, change = decision.record, decision.identity
    assert record.status is RegistrationStatus.ASSIGNED and record.substatus is RegistrationSubstatus(
        substatus
    )
    assert (record.assigned_hub, record.device_id) == (hub.host_name.lower(), device_id or "dev-1")
    assert (record.operation_id, record.payload, record.last_updated_date_time_utc) == ("op", {"p": 1}, NOW)
    assert record.registration_id == (old.registration_id if old else "dev-1")  # as first written
    assert record.created_date_time_utc == (old.created_date_time_utc if old else NOW)
    assert change is not None
    assert change.put.twin == TwinPlan(TwinSource(source), InitialTwin(tags={"t": 1}))
    assert (change.remove, change.probably_new) == (remove, probably_new)
    assert change.put.credential == KeyCredential("k1", "k2")


def test_the_webhooks_twin_and_payload_win() -> None:
    policy = ReprovisionPolicy(update_hub_assignment=True, migrate_device_data=True)
    enrollment = individual(reprovision_policy=policy, initial_twin=InitialTwin(tags={"from": "enrollment"}))
    answer = AllocationResponse(
        iot_hub_host_name="b.hub", initial_twin=InitialTwin(tags={"from": "hook"}), payload=7
    )
    decision = decide(facts(match(enrollment), previous(), payload={"p": 1}), Assign(HUB_B, custom=answer))
    assert decision.record.substatus is RegistrationSubstatus.DEVICE_DATA_MIGRATED
    assert decision.record.payload == 7
    assert decision.identity is not None
    assert decision.identity.put.twin == TwinPlan(TwinSource.INITIAL, InitialTwin(tags={"from": "hook"}))


def test_denied_and_failed_records() -> None:
    old = previous()
    denied = decide(facts(match(individual()), old), Denied()).record
    assert (denied.status, denied.assigned_hub, denied.device_id) == (
        RegistrationStatus.DISABLED,
        "a.hub",
        "dev-1",
    )
    assert (denied.error_code, denied.error_message) == (
        401101,
        "The individual enrollment 'dev-1' is disabled.",
    )
    failed = decide(facts(), NoHub(DpsCode.NO_HUB, "none")).record
    assert (failed.status, failed.error_code, failed.assigned_hub) == (
        RegistrationStatus.FAILED,
        400208,
        None,
    )
    assigned = decide(facts(payload=3), Assign(HUB_A))
    in_hub = fail_in_hub(assigned, "refused").record
    assert (in_hub.status, in_hub.error_code, in_hub.error_message) == (
        RegistrationStatus.FAILED,
        400209,
        "refused",
    )
    assert (in_hub.assigned_hub, in_hub.device_id, in_hub.substatus, in_hub.payload) == (None, None, None, 3)


# --- the twin once the hub is read ----------------------------------------------------------------


NOW = "2026-01-02T03:04:05.000000Z"
INITIAL = InitialTwin(tags={"initial": True}, properties=InitialTwinProperties(desired={"rate": 1}))
OWN = tw.patch_reported(tw.initial({"own": True}, {"rate": 5}, now=NOW), {"seen": 1}, now=NOW)
OLD = tw.initial({"old": True}, None, now=NOW)


def device(twin: Twin) -> HubDevice:
    return HubDevice(
        device_id="d", hub="h", authentication=DeviceAuthentication(type=AuthenticationType.SAS), twin=twin
    )


NEW = tw.initial({"initial": True}, {"rate": 1}, now=NOW)  # the initial twin of a new identity
OVER_OWN = tw.replace(OWN, {"initial": True}, {"rate": 1}, now=NOW)  # ... over an existing one


@pytest.mark.parametrize(
    ("source", "existing", "removed", "expected"),
    [
        (TwinSource.INITIAL, device(OWN), None, OVER_OWN),
        (TwinSource.INITIAL, None, None, NEW),
        (TwinSource.RESET, device(OWN), device(OLD), OVER_OWN),
        (TwinSource.RESET, None, device(OLD), NEW),
        (TwinSource.KEEP, device(OWN), None, None),
        (TwinSource.KEEP, None, None, NEW),
        (TwinSource.MIGRATE, device(OWN), device(OLD), OLD),
        (TwinSource.MIGRATE, None, device(OLD), OLD),
        (TwinSource.MIGRATE, device(OWN), None, None),
        (TwinSource.MIGRATE, None, None, NEW),
    ],
)
def test_twin_plan_resolves_against_the_hub(
    source: TwinSource, existing: HubDevice | None, removed: HubDevice | None, expected: Twin | None
) -> None:
    assert TwinPlan(source, INITIAL).resolve(existing, removed, now=NOW) == expected


def test_an_initial_twin_over_an_existing_identity_keeps_reported_and_counts_on() -> None:
    assert (OVER_OWN.tags, OVER_OWN.desired, OVER_OWN.reported) == (
        {"initial": True},
        {"rate": 1},
        {"seen": 1},
    )
    assert OVER_OWN.desired_version == OWN.desired_version + 1 and OVER_OWN.version == OWN.version + 1
    assert (NEW.version, NEW.desired_version, NEW.reported_version) == (1, 1, 1)
