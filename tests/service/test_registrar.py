"""The registrar in-process: no child process, no sockets, a real store (SQLite in tmp_path and
PostgreSQL, the ``store`` fixture) and a clock the tests move.

Two tables: matching (which enrollment a credential proves, and every way it can fail) and
reprovisioning (never / migrate / reset across two built-in hubs, the initial twin when an
identity is created, an identity re-created when it was deleted). The wire shapes and the
transports are tested over real sockets elsewhere (tests/service/test_device_api.py and the
MQTT and AMQP endpoint suites); the pure decision on its own is in test_assignment.py.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from provisiond import certificates, pki
from provisiond import twin as tw
from provisiond.errors import AuthenticationError, ConflictError, InvalidBodyError, TpmChallengeRequired
from provisiond.hub import AuthenticationType, BuiltinHub, HubDevice, Twin
from provisiond.models import (
    AllocationPolicy,
    CertificateUpload,
    CustomAllocationDefinition,
    EnrollmentGroup,
    IndividualEnrollment,
    InitialTwin,
    InitialTwinProperties,
    ProvisioningStatus,
    RegistrationStatus,
    RegistrationSubstatus,
    ReprovisionPolicy,
)
from provisiond.protocol.messages import (
    DeviceRegistration,
    RegistrationOperationStatus,
    TpmAttestationRequest,
)
from provisiond.protocol.sas import build_sas_token, derive_device_key
from provisiond.service.app import initialize
from provisiond.service.context import ServiceContext
from provisiond.service.registrar import DeviceRequest, Registrar
from provisiond.service.settings import Settings
from provisiond.service.webhook import AllocationRequest, AllocationResponse, WebhookError
from provisiond.storage import Collection, Store
from tests import factories
from tests._soft_tpm import SoftTpm

KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()
GROUP_KEY = base64.b64encode(b"g" * 32).decode()


def uid(prefix: str = "d") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class FakeClock:
    """Unix seconds that move only when a test says so (starting now: certificates are made
    with real validity dates)."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Webhook:
    """A custom allocation webhook stand-in: answers what it is told, and records the calls."""

    answer: AllocationResponse | WebhookError | None = None
    calls: list[AllocationRequest] = field(default_factory=list)
    release: asyncio.Event | None = None

    async def allocate(
        self, url: str, request: AllocationRequest, candidates: Sequence[str]
    ) -> AllocationResponse:
        self.calls.append(request)
        if self.release is not None:
            await self.release.wait()
        if isinstance(self.answer, WebhookError):
            raise self.answer
        assert self.answer is not None
        return self.answer

    async def aclose(self) -> None:
        pass


@dataclass
class World:
    store: Store
    ctx: ServiceContext
    registrar: Registrar
    clock: FakeClock
    webhook: Webhook
    scope: str
    builtin_hub: str

    # --- set-up through the management layer, as the service API does it -------------------------

    async def link_hub(self, host: str, **options: Any) -> str:
        hub = factories.linked_hub(host, builtin=True, apply_allocation_policy=False, **options)
        await self.ctx.management.hubs.put(host, hub)
        return host

    async def unlink_hub(self, host: str) -> None:
        await self.ctx.management.hubs.delete(host)

    async def enroll(self, enrollment: IndividualEnrollment | EnrollmentGroup) -> None:
        """Create the enrollment, or replace it (If-Match: *)."""
        if isinstance(enrollment, IndividualEnrollment):
            operations: Any = self.ctx.management.enrollments
            url_id = enrollment.registration_id
        else:
            operations = self.ctx.management.groups
            url_id = enrollment.enrollment_group_id
        try:
            await operations.put(url_id, enrollment)
        except ConflictError:
            await operations.put(url_id, enrollment, if_match="*")

    async def identity(self, hub: str, device_id: str) -> HubDevice | None:
        return await BuiltinHub(self.store).get_identity(hub, device_id)

    # --- the device's side -----------------------------------------------------------------------

    def token(self, reg_id: str, key: str, *, ttl: int = 3600, scope: str | None = None) -> str:
        resource = f"{scope or self.scope}/registrations/{reg_id}"
        return build_sas_token(resource, key, int(self.clock()) + ttl, key_name="registration")

    def request(
        self, reg_id: str, *, scope: str | None = None, payload: Any = None, **kw: Any
    ) -> DeviceRequest:
        tpm = kw.pop("tpm", None)
        body = DeviceRegistration(registration_id=reg_id, payload=payload, tpm=tpm)
        return DeviceRequest(id_scope=scope or self.scope, registration_id=reg_id, body=body, **kw)

    async def register(self, reg_id: str, **kw: Any) -> RegistrationOperationStatus:
        return await self.registrar.register(self.request(reg_id, **kw))


@pytest.fixture
async def world(store: Store, tmp_path: Path) -> AsyncIterator[World]:
    settings = Settings(data_dir=tmp_path)
    service = await initialize(store, settings)
    clock = FakeClock(time.time())
    ctx = ServiceContext(settings=settings, store=store, clock=clock)
    webhook = Webhook()
    registrar = Registrar(ctx, webhook=webhook)
    assert service.id_scope is not None
    yield World(store, ctx, registrar, clock, webhook, service.id_scope, settings.first_builtin_hub)


def symmetric(reg_id: str, **extra: Any) -> IndividualEnrollment:
    return factories.symmetric_enrollment(reg_id, primary_key=KEY_A, secondary_key=KEY_B, **extra)


def symmetric_group(gid: str, **extra: Any) -> EnrollmentGroup:
    return factories.symmetric_group(gid, primary_key=GROUP_KEY, **extra)


def chain_of(issued: pki.Issued) -> list[bytes]:
    return [certificates.certificate_der(c) for c in issued.presented_chain]


def twin(gen: str) -> InitialTwin:
    return InitialTwin(tags={"gen": gen}, properties=InitialTwinProperties(desired={"gen": gen}))


def hub_twin(gen: str) -> Twin:
    """A twin whose tags and desired properties say ``gen`` (compare with :func:`sections`)."""
    return tw.initial({"gen": gen}, {"gen": gen}, now="2026-01-01T00:00:00.000000Z")


def sections(twin: Twin) -> tuple[dict[str, object], dict[str, object]]:
    return twin.tags, twin.desired


async def denied(world: World, reg_id: str, code: int, words: str, **kw: Any) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as caught:
        await world.register(reg_id, **kw)
    assert caught.value.error_code == code, caught.value.message
    assert words.lower() in caught.value.message.lower(), caught.value.message
    assert await world.store.get(Collection.REGISTRATIONS, reg_id) is None  # nothing written
    return caught.value


# --- matching: symmetric keys ----------------------------------------------------------------------


async def test_an_individual_enrollment_wins_over_a_group_that_would_match(world: World) -> None:
    gid, reg = uid("g"), uid()
    await world.enroll(symmetric_group(gid))
    await world.enroll(symmetric(reg))
    # The group's derived key would match, but the individual enrollment decides.
    await denied(
        world,
        reg,
        401002,
        "not signed with a key of the individual enrollment",
        authorization=world.token(reg, derive_device_key(GROUP_KEY, reg)),
    )
    result = await world.register(reg, authorization=world.token(reg, KEY_A))
    assert result.status is RegistrationStatus.ASSIGNED
    state = result.registration_state
    assert state is not None and state.symmetric_key is not None
    assert state.symmetric_key.enrollment_group_id is None
    identity = await world.identity(world.builtin_hub, reg)
    assert identity is not None and identity.authentication.symmetric_key is not None
    assert identity.authentication.symmetric_key.primary_key == KEY_A


async def test_a_group_device_proves_its_derived_key_and_gets_derived_keys_in_the_hub(world: World) -> None:
    gid, reg = uid("g"), uid()
    await world.enroll(symmetric_group(gid))
    keys = (await world.ctx.management.groups.attestation_mechanism(gid)).symmetric_key
    assert keys is not None and keys.primary_key == GROUP_KEY and keys.secondary_key is not None
    # Signed with the key derived from the group's secondary key (the service made that one).
    token = world.token(reg, derive_device_key(keys.secondary_key, reg))
    state = (await world.register(reg, authorization=token)).registration_state
    assert state is not None and state.symmetric_key is not None
    assert state.symmetric_key.enrollment_group_id == gid
    identity = await world.identity(world.builtin_hub, reg)
    assert identity is not None and identity.authentication.symmetric_key is not None
    assert identity.authentication.symmetric_key.primary_key == derive_device_key(GROUP_KEY, reg)
    assert identity.authentication.symmetric_key.secondary_key == derive_device_key(keys.secondary_key, reg)


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        pytest.param("wrong-key", 401002, "not signed with a key", id="wrong-key"),
        pytest.param("expired", 401003, "expired", id="expired-token"),
        pytest.param("token-scope", 401004, "check the ID scope", id="token-for-another-scope"),
        pytest.param("request-scope", 401004, "is not this service's", id="request-for-another-scope"),
        pytest.param("no-credential", 401000, "No credential", id="no-credential"),
        pytest.param(
            "x509-enrollment", 401002, "uses x509 attestation, not a symmetric key", id="other-type"
        ),
    ],
)
async def test_symmetric_key_denials(world: World, case: str, code: int, words: str) -> None:
    reg = uid()
    if case == "x509-enrollment":
        await world.enroll(factories.x509_enrollment(reg, pki.make_device_cert(reg)))
    else:
        await world.enroll(symmetric(reg))
    kw: dict[str, Any] = {"authorization": world.token(reg, KEY_A)}
    if case == "wrong-key":
        kw["authorization"] = world.token(reg, base64.b64encode(b"w" * 32).decode())
    elif case == "expired":
        token = world.token(reg, KEY_A, ttl=10)
        world.clock.advance(10 + world.ctx.settings.clock_skew + 1)
        kw["authorization"] = token
    elif case == "token-scope":
        kw["authorization"] = world.token(reg, KEY_A, scope="0neOTHER")
    elif case == "request-scope":
        kw["scope"] = "0neOTHER"
    elif case == "no-credential":
        kw = {}
    await denied(world, reg, code, words, **kw)


async def test_a_token_within_the_clock_skew_is_accepted(world: World) -> None:
    reg = uid()
    await world.enroll(symmetric(reg))
    token = world.token(reg, KEY_A, ttl=10)
    world.clock.advance(10 + world.ctx.settings.clock_skew)
    assert (await world.register(reg, authorization=token)).status is RegistrationStatus.ASSIGNED


async def test_a_malformed_request_is_refused_before_attestation(world: World) -> None:
    reg = uid()
    await world.enroll(symmetric(reg))
    request = world.request(reg, authorization=world.token(reg, KEY_A))
    other = DeviceRequest(
        id_scope=request.id_scope,
        registration_id=reg,
        body=DeviceRegistration(registration_id="someone-else"),
        authorization=request.authorization,
    )
    with pytest.raises(InvalidBodyError, match="differs"):
        await world.registrar.register(other)


@pytest.mark.parametrize("which", ["individual", "group", "individual-over-enabled-group"])
async def test_a_disabled_enrollment_denies_with_a_record(world: World, which: str) -> None:
    reg, gid = uid(), uid("g")
    disabled = ProvisioningStatus.DISABLED
    if which == "group":
        await world.enroll(symmetric_group(gid, provisioning_status=disabled))
        token = world.token(reg, derive_device_key(GROUP_KEY, reg))
        label = f"enrollment group {gid!r}"
    else:
        if which == "individual-over-enabled-group":
            await world.enroll(symmetric_group(gid))
        await world.enroll(symmetric(reg, provisioning_status=disabled))
        token = world.token(reg, KEY_A)
        label = f"individual enrollment {reg!r}"
    result = await world.register(reg, authorization=token)
    state = result.registration_state
    assert result.status is RegistrationStatus.DISABLED and state is not None
    assert (state.error_code, state.error_message) == (401101, f"The {label} is disabled.")
    assert state.assigned_hub is None
    assert await world.identity(world.builtin_hub, reg) is None


# --- matching: X.509 -------------------------------------------------------------------------------


@dataclass
class Pki:
    root: pki.Issued
    intermediate: pki.Issued


@pytest.fixture(scope="module")
def ca() -> Pki:
    root = pki.make_root_ca(uid("Registrar Root"))
    return Pki(root, pki.make_intermediate_ca(uid("Registrar Intermediate"), root))


async def test_x509_an_individual_enrollment_wins_over_the_group_of_its_chain(world: World, ca: Pki) -> None:
    gid, reg = uid("xg"), uid("x")
    leaf = pki.make_device_cert(reg, ca.intermediate)
    await world.enroll(factories.x509_group(gid, ca.root))
    group_result = await world.register(reg, client_chain=chain_of(leaf))
    state = group_result.registration_state
    assert state is not None and state.x509 is not None
    assert state.x509.enrollment_group_id == gid
    assert state.x509.signing_certificate_info is not None
    assert state.x509.signing_certificate_info.sha1_thumbprint == certificates.sha1_thumbprint(ca.root.cert)
    await world.enroll(factories.x509_enrollment(reg, leaf))
    individual = await world.register(reg, client_chain=chain_of(leaf))
    state = individual.registration_state
    assert state is not None and state.x509 is not None and state.x509.enrollment_group_id is None
    # Either way the identity is selfSigned with the SHA-256 thumbprint of the presented leaf.
    identity = await world.identity(world.builtin_hub, reg)
    assert identity is not None and identity.authentication.type is AuthenticationType.SELF_SIGNED
    assert identity.authentication.x509_thumbprint is not None
    assert identity.authentication.x509_thumbprint.primary_thumbprint == certificates.sha256_thumbprint(
        leaf.cert
    )


async def test_x509_groups_match_by_the_chain_through_verified_ca_certificates_only(
    world: World, ca: Pki
) -> None:
    gid, reg, name = uid("xg"), uid("x"), uid("ca")
    leaf = pki.make_device_cert(reg, ca.intermediate)
    cas = world.ctx.management.certificates
    await cas.upload(name, CertificateUpload(certificate=factories.pem(ca.intermediate)))
    await world.enroll(factories.x509_group(gid, ca_reference=name))
    await denied(world, reg, 401011, f"not verified: {name} (group {gid})", client_chain=chain_of(leaf))
    # Proof of possession, as an operator gives it.
    code = (await cas.generate_verification_code(name)).verification_code
    assert code is not None
    await cas.verify(name, factories.pem(pki.make_verification_cert(code, ca.intermediate)))
    state = (await world.register(reg, client_chain=chain_of(leaf))).registration_state
    assert state is not None and state.x509 is not None and state.x509.enrollment_group_id == gid


async def test_x509_denials(world: World, ca: Pki) -> None:
    reg = uid("x")
    await world.enroll(factories.x509_group(uid("xg"), ca.root))
    other = pki.make_device_cert(uid("someone"), ca.intermediate)
    await denied(world, reg, 401010, "is not the registration id", client_chain=chain_of(other))
    stranger = pki.make_device_cert(reg, pki.make_root_ca(uid("Stranger")))
    await denied(world, reg, 401011, "no X.509 enrollment group", client_chain=chain_of(stranger))
    leaf = pki.make_device_cert(reg, ca.intermediate, days=1)
    world.clock.advance(2 * 86400)  # the certificate expires while the clock runs
    await denied(world, reg, 401012, "expired", client_chain=chain_of(leaf))


# --- matching: TPM ---------------------------------------------------------------------------------


def tpm_enrollment(reg_id: str, device: SoftTpm) -> IndividualEnrollment:
    return factories.tpm_enrollment(reg_id, device.ek_b64)


def tpm_keys(device: SoftTpm) -> TpmAttestationRequest:
    return TpmAttestationRequest(endorsement_key=device.ek_b64, storage_root_key=device.srk_b64)


async def challenge(world: World, reg: str, device: SoftTpm) -> bytes:
    """The first register: the challenge, activated in the (software) TPM."""
    with pytest.raises(TpmChallengeRequired) as caught:
        await world.register(reg, tpm=tpm_keys(device))
    assert caught.value.key_name == "registration"
    return device.activate(caught.value.authentication_key)


async def test_tpm_challenge_then_answer_and_the_identity_key_wrapped_for_the_tpm(world: World) -> None:
    reg, device = uid("t"), SoftTpm("a")
    await world.enroll(tpm_enrollment(reg, device))
    key = await challenge(world, reg, device)
    token = world.token(reg, base64.b64encode(key).decode())
    result = await world.register(reg, authorization=token, tpm=tpm_keys(device))
    state = result.registration_state
    assert result.status is RegistrationStatus.ASSIGNED and state is not None and state.tpm is not None
    assert state.tpm.authentication_key is not None
    # The result wraps the identity's primary key for this TPM, and for it only.
    hub_key = device.activate(state.tpm.authentication_key)
    identity = await world.identity(world.builtin_hub, reg)
    assert identity is not None and identity.authentication.symmetric_key is not None
    assert identity.authentication.symmetric_key.primary_key == base64.b64encode(hub_key).decode()
    with pytest.raises(ValueError):
        SoftTpm("b").activate(state.tpm.authentication_key)
    # A poll may present the token again; a second register may not (single use).
    polled = await world.registrar.operation_status(
        world.request(reg, authorization=token), result.operation_id
    )
    assert polled.status is RegistrationStatus.ASSIGNED
    await denied_after_write(world, reg, 401022, "already used", authorization=token)


async def denied_after_write(world: World, reg: str, code: int, words: str, **kw: Any) -> None:
    with pytest.raises(AuthenticationError) as caught:
        await world.register(reg, **kw)
    assert caught.value.error_code == code and words in caught.value.message, caught.value.message


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        pytest.param("not-enrolled", 401020, "No individual enrollment", id="not-enrolled"),
        pytest.param("other-ek", 401021, "endorsement key is not the one", id="another-tpm"),
        pytest.param("other-type", 401020, "not TPM", id="symmetric-key-enrollment"),
        pytest.param("expired", 401022, "expired 1 s ago", id="challenge-expired"),
        pytest.param("no-challenge", 401022, "No TPM challenge is pending", id="no-challenge"),
        pytest.param(
            "wrong-key", 401002, "not signed with the key of the pending", id="token-of-another-key"
        ),
    ],
)
async def test_tpm_denials(world: World, case: str, code: int, words: str) -> None:
    reg, device = uid("t"), SoftTpm("a")
    if case == "other-type":
        await world.enroll(symmetric(reg))
    elif case != "not-enrolled":
        await world.enroll(tpm_enrollment(reg, SoftTpm("b") if case == "other-ek" else device))
    if case in ("not-enrolled", "other-ek", "other-type"):
        await denied(world, reg, code, words, tpm=tpm_keys(device))
        return
    key = b"w" * 32 if case in ("no-challenge", "wrong-key") else b""
    if case != "no-challenge":
        activated = await challenge(world, reg, device)
        key = key or activated
    if case == "expired":
        world.clock.advance(300 + 1)
    await denied(world, reg, code, words, authorization=world.token(reg, base64.b64encode(key).decode()))


async def test_a_malformed_endorsement_key_is_a_bad_request_not_a_failed_attestation(world: World) -> None:
    reg = uid("t")
    with pytest.raises(InvalidBodyError, match="tpm.endorsementKey"):
        await world.register(reg, tpm=TpmAttestationRequest(endorsement_key="bm90IGFuIEVL"))


# --- reprovisioning --------------------------------------------------------------------------------

POLICIES = {
    "never": ReprovisionPolicy(update_hub_assignment=False, migrate_device_data=False),
    "migrate": ReprovisionPolicy(update_hub_assignment=True, migrate_device_data=True),
    "reset": ReprovisionPolicy(update_hub_assignment=True, migrate_device_data=False),
}


@pytest.mark.parametrize(
    ("policy", "moves", "substatus", "twin_after"),
    [
        pytest.param("never", False, RegistrationSubstatus.INITIAL_ASSIGNMENT, "device", id="never"),
        pytest.param("migrate", True, RegistrationSubstatus.DEVICE_DATA_MIGRATED, "device", id="migrate"),
        pytest.param("reset", True, RegistrationSubstatus.DEVICE_DATA_RESET, "2", id="reset"),
    ],
)
async def test_reprovisioning_across_two_built_in_hubs(
    world: World, policy: str, moves: bool, substatus: RegistrationSubstatus, twin_after: str
) -> None:
    hub_a, hub_b = await world.link_hub(f"{uid('a')}.hub"), await world.link_hub(f"{uid('b')}.hub")
    reg = uid()
    base = symmetric(reg, reprovision_policy=POLICIES[policy], allocation_policy=None)
    await world.enroll(msgspec.structs.replace(base, iot_hubs=[hub_a], initial_twin=twin("1")))
    first = await world.register(reg, authorization=world.token(reg, KEY_A))
    state = first.registration_state
    assert state is not None and (state.assigned_hub, state.substatus) == (
        hub_a,
        RegistrationSubstatus.INITIAL_ASSIGNMENT,
    )
    identity = await world.identity(hub_a, reg)
    assert identity is not None and sections(identity.twin) == sections(
        hub_twin("1")
    )  # the initial twin on creation
    await world.registrar.hubs.builtin.apply_twin(hub_a, reg, hub_twin("device"))  # the device's data
    await world.enroll(msgspec.structs.replace(base, iot_hubs=[hub_b], initial_twin=twin("2")))
    again = await world.register(reg, authorization=world.token(reg, KEY_A))
    state = again.registration_state
    assert state is not None and (state.assigned_hub, state.substatus) == (
        hub_b if moves else hub_a,
        substatus,
    )
    landed = await world.identity(hub_b if moves else hub_a, reg)
    assert landed is not None and sections(landed.twin) == sections(hub_twin(twin_after))
    if moves:
        assert await world.identity(hub_a, reg) is None  # the old identity is removed


@pytest.mark.parametrize("migrate", [True, False], ids=["migrate-flag", "reset-flag"])
async def test_never_reprovisioned_devices_move_when_their_hub_is_unlinked(
    world: World, migrate: bool
) -> None:
    hub_a, hub_b = await world.link_hub(f"{uid('a')}.hub"), await world.link_hub(f"{uid('b')}.hub")
    reg = uid()
    never = ReprovisionPolicy(update_hub_assignment=False, migrate_device_data=migrate)
    await world.enroll(
        symmetric(reg, iot_hubs=[hub_a, hub_b], reprovision_policy=never, initial_twin=twin("1"))
    )
    state = (await world.register(reg, authorization=world.token(reg, KEY_A))).registration_state
    assert state is not None and state.assigned_hub is not None
    old = state.assigned_hub
    new = hub_b if old == hub_a else hub_a
    await world.registrar.hubs.builtin.apply_twin(old, reg, hub_twin("device"))
    await world.unlink_hub(old)
    state = (await world.register(reg, authorization=world.token(reg, KEY_A))).registration_state
    assert state is not None and state.assigned_hub == new
    expected = (
        RegistrationSubstatus.DEVICE_DATA_MIGRATED if migrate else RegistrationSubstatus.DEVICE_DATA_RESET
    )
    assert state.substatus is expected
    moved = await world.identity(new, reg)
    assert moved is not None and sections(moved.twin) == sections(hub_twin("device" if migrate else "1"))
    assert await world.identity(old, reg) is None


async def test_an_identity_deleted_from_its_hub_is_created_again_with_the_current_initial_twin(
    world: World,
) -> None:
    reg = uid()
    await world.enroll(symmetric(reg, initial_twin=twin("1")))
    first = await world.register(reg, authorization=world.token(reg, KEY_A))
    assert first.registration_state is not None
    hub = first.registration_state.assigned_hub
    assert hub is not None
    assert await world.registrar.hubs.builtin.delete_identity(hub, reg)
    await world.enroll(symmetric(reg, initial_twin=twin("2")))
    again = await world.register(reg, authorization=world.token(reg, KEY_A))
    state = again.registration_state
    # Same hub, same device: the record's substatus stays, and the identity is created anew.
    assert state is not None and (state.assigned_hub, state.substatus) == (
        hub,
        first.registration_state.substatus,
    )
    identity = await world.identity(hub, reg)
    assert identity is not None and sections(identity.twin) == sections(hub_twin("2"))


async def test_a_kept_identity_keeps_its_twin(world: World) -> None:
    reg = uid()
    await world.enroll(symmetric(reg, initial_twin=twin("1")))
    hub = (await world.register(reg, authorization=world.token(reg, KEY_A))).registration_state
    assert hub is not None and hub.assigned_hub is not None
    await world.registrar.hubs.builtin.apply_twin(hub.assigned_hub, reg, hub_twin("device"))
    await world.enroll(symmetric(reg, initial_twin=twin("2")))
    await world.register(reg, authorization=world.token(reg, KEY_A))
    identity = await world.identity(hub.assigned_hub, reg)
    assert identity is not None and sections(identity.twin) == sections(hub_twin("device"))


async def test_concurrent_registrations_of_one_id_make_one_identity_and_one_record(world: World) -> None:
    reg = uid()
    await world.enroll(symmetric(reg))
    results = await asyncio.gather(
        *(world.register(reg, authorization=world.token(reg, KEY_A)) for _ in range(8))
    )
    assert {r.status for r in results} == {RegistrationStatus.ASSIGNED}
    record = await world.store.get(Collection.REGISTRATIONS, reg)
    assert record is not None
    winners = {r.operation_id for r in results}
    assert len(winners) >= 1 and msgspec.json.decode(record.doc)["operationId"] in winners
    devices = await world.store.query_all(Collection.HUB_DEVICES, filters={"hub": world.builtin_hub})
    assert [msgspec.json.decode(d.doc)["registrationId"] for d in devices].count(reg) == 1


async def test_concurrent_re_registrations_of_one_id_keep_one_identity_and_one_record(world: World) -> None:
    """Re-registrations racing on one device (PostgreSQL writes each as one conditional
    statement, several in one transaction): every one is answered, and the record and the
    identity are one winner's, whole."""
    reg = uid()
    await world.enroll(symmetric(reg))
    first = await world.register(reg, authorization=world.token(reg, KEY_A))
    assert first.status is RegistrationStatus.ASSIGNED and first.registration_state is not None
    results = await asyncio.gather(
        *(world.register(reg, authorization=world.token(reg, KEY_A)) for _ in range(8))
    )
    assert {r.status for r in results} == {RegistrationStatus.ASSIGNED}
    record = await world.store.get(Collection.REGISTRATIONS, reg)
    assert record is not None
    stored = msgspec.json.decode(record.doc)
    assert stored["operationId"] in {r.operation_id for r in results}
    assert stored["createdDateTimeUtc"] == first.registration_state.created_date_time_utc
    devices = await world.store.query_all(Collection.HUB_DEVICES, filters={"hub": world.builtin_hub})
    assert [msgspec.json.decode(d.doc)["registrationId"] for d in devices].count(reg) == 1


# --- custom allocation -----------------------------------------------------------------------------


def custom(url: str) -> dict[str, Any]:
    definition = CustomAllocationDefinition(webhook_url=url, api_version="2021-10-01")
    return {"allocation_policy": AllocationPolicy.CUSTOM, "custom_allocation_definition": definition}


async def test_custom_allocation_takes_the_webhooks_hub_payload_and_twin(world: World) -> None:
    hub_a, hub_b = await world.link_hub(f"{uid('a')}.hub"), await world.link_hub(f"{uid('b')}.hub")
    reg = uid()
    await world.enroll(symmetric(reg, iot_hubs=[hub_a, hub_b], **custom("https://hook/x?code=s")))
    world.webhook.answer = AllocationResponse(
        iot_hub_host_name=hub_b.upper(), initial_twin=twin("hook"), payload={"p": 1}
    )
    result = await world.register(reg, authorization=world.token(reg, KEY_A), payload={"from": "device"})
    state = result.registration_state
    assert state is not None and (state.assigned_hub, state.payload) == (hub_b, {"p": 1})
    [call] = world.webhook.calls
    assert call.linked_hubs == [hub_a, hub_b] and call.device_runtime_context.payload == {"from": "device"}
    assert (
        call.individual_enrollment is not None
        and call.individual_enrollment.attestation.symmetric_key is None
    )
    identity = await world.identity(hub_b, reg)
    assert identity is not None and sections(identity.twin) == sections(hub_twin("hook"))
    world.webhook.answer = WebhookError(
        "Custom allocation webhook https://hook/x?[redacted] answered 500: no"
    )
    failed = await world.register(reg, authorization=world.token(reg, KEY_A))
    assert failed.status is RegistrationStatus.FAILED and failed.registration_state is not None
    assert failed.registration_state.error_code == 400207
    assert world.webhook.calls[1].device_runtime_context.current_iot_hub_host_name == hub_b


async def test_a_slow_webhook_answers_assigning_and_the_background_task_finishes(world: World) -> None:
    reg = uid()
    await world.enroll(symmetric(reg, **custom("https://hook/")))
    # The webhook answers only when the test says so: the request cannot but run out of budget.
    hook = Webhook(AllocationResponse(iot_hub_host_name=world.builtin_hub), release=asyncio.Event())
    settings = dataclasses.replace(world.ctx.settings, assignment_budget=0.05)
    registrar = Registrar(
        ServiceContext(settings=settings, store=world.store, clock=world.clock), webhook=hook
    )
    first = await registrar.register(world.request(reg, authorization=world.token(reg, KEY_A)))
    assert first.status is RegistrationStatus.ASSIGNING
    assert hook.release is not None
    hook.release.set()
    poll = world.request(reg, authorization=world.token(reg, KEY_A))
    for _ in range(500):
        status = await registrar.operation_status(poll, first.operation_id)
        if status.status is not RegistrationStatus.ASSIGNING:
            break
        await asyncio.sleep(0.01)
    assert status.status is RegistrationStatus.ASSIGNED and status.operation_id == first.operation_id
