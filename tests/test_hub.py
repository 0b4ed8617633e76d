"""Hub backends: the interface a remote hub implements (one idempotent registry operation at a
time, outside any transaction), proven with the built-in hub over both stores; the sequence a
durable writer runs for an identity change (:func:`resolve_twin`, :func:`carry_out`); and the
built-in hub's transactional plan."""

from __future__ import annotations

import msgspec
import pytest

from provisiond import twin as tw
from provisiond.attestation.base import CertificateCredential, KeyCredential
from provisiond.errors import ConflictError, PreconditionFailedError
from provisiond.hub import (
    AuthenticationType,
    BuiltinHub,
    DeviceStatus,
    HubBackend,
    HubBackends,
    HubError,
    IdentityChange,
    IdentityRef,
    IdentitySpec,
    TransactionalHubBackend,
    Twin,
    TwinPlan,
    TwinSource,
    carry_out,
    resolve_twin,
)
from provisiond.models import (
    DeviceCapabilities,
    InitialTwin,
    InitialTwinProperties,
    LinkedHub,
    X509GroupAuthentication,
)
from provisiond.storage import Collection, Store

HUB_A = LinkedHub(host_name="A.hub", builtin=True)
HUB_B = LinkedHub(
    host_name="b.hub", builtin=True, x509_group_authentication=X509GroupAuthentication.CERTIFICATE_AUTHORITY
)
REMOTE = LinkedHub(host_name="remote.azure-devices.net", connection_string="HostName=remote;...")
INITIAL = InitialTwin(tags={"initial": 1}, properties=InitialTwinProperties(desired={"rate": 1}))
NOW = "2023-11-14T22:13:20.500000Z"
#: The twin a new identity gets from INITIAL.
INITIAL_TWIN = tw.initial({"initial": 1}, {"rate": 1}, now=NOW)


def spec(hub: LinkedHub = HUB_A, source: TwinSource = TwinSource.INITIAL, **extra: object) -> IdentitySpec:
    fields: dict[str, object] = {
        "hub": hub,
        "device_id": "Dev-1",
        "registration_id": "dev-1",
        "credential": KeyCredential("p", "s"),
        "capabilities": DeviceCapabilities(iot_edge=True),
        "twin": TwinPlan(source, INITIAL),
    }
    return IdentitySpec(**{**fields, **extra})  # type: ignore[arg-type]


@pytest.fixture
def builtin(store: Store) -> BuiltinHub:
    return BuiltinHub(store, clock=lambda: 1_700_000_000.5)


def test_the_builtin_hub_implements_both_interfaces(builtin: BuiltinHub) -> None:
    backend: HubBackend = builtin
    transactional: TransactionalHubBackend = builtin
    assert backend is transactional


async def test_one_operation_at_a_time(builtin: BuiltinHub) -> None:
    created = await builtin.put_identity(spec())
    assert (created.hub, created.device_id, created.twin, created.status) == (
        "a.hub",
        "Dev-1",
        Twin(),
        DeviceStatus.ENABLED,
    )
    assert created.authentication.type is AuthenticationType.SAS
    assert created.capabilities == DeviceCapabilities(iot_edge=True)
    assert created.created == created.updated == created.status_updated_time == NOW
    assert created.generation_id and created.etag
    await builtin.apply_twin("A.HUB", "Dev-1", INITIAL_TWIN)
    assert await builtin.read_twin("a.hub", "Dev-1") == INITIAL_TWIN
    assert await builtin.read_twin("a.hub", "dev-1") is None  # device ids are case-sensitive
    # An update in place keeps the twin and the generation; the credential and capabilities are
    # the spec's, and the identity's etag is new.
    updated = await builtin.put_identity(spec(credential=CertificateCredential("AB" * 32, from_group=False)))
    assert updated.twin == INITIAL_TWIN and updated.authentication.type is AuthenticationType.SELF_SIGNED
    assert updated.generation_id == created.generation_id and updated.etag != created.etag
    assert await builtin.disable_identity("a.hub", "Dev-1")
    stored = await builtin.get_identity("a.hub", "Dev-1")
    assert stored is not None and stored.status is DeviceStatus.DISABLED
    # Idempotent deletes; a twin for a missing identity is an error.
    assert await builtin.delete_identity("a.hub", "Dev-1")
    assert not await builtin.delete_identity("a.hub", "Dev-1")
    assert not await builtin.disable_identity("a.hub", "Dev-1")
    with pytest.raises(HubError, match="No device 'Dev-1'"):
        await builtin.apply_twin("a.hub", "Dev-1", INITIAL_TWIN)


async def test_a_hub_decides_how_group_certificates_authenticate(builtin: BuiltinHub) -> None:
    group_device = CertificateCredential("AB" * 32, from_group=True)
    in_a = await builtin.put_identity(spec(credential=group_device))
    in_b = await builtin.put_identity(spec(HUB_B, credential=group_device))
    assert in_a.authentication.type is AuthenticationType.SELF_SIGNED
    assert in_b.authentication.type is AuthenticationType.CERTIFICATE_AUTHORITY


DEVICE_DATA = tw.patch_reported(tw.initial({"device": "data"}, None, now=NOW), {"seen": 1}, now=NOW)


async def _moved_device(builtin: BuiltinHub) -> IdentityChange:
    await builtin.put_identity(spec())
    await builtin.apply_twin("a.hub", "Dev-1", DEVICE_DATA)
    return IdentityChange(put=spec(HUB_B, TwinSource.MIGRATE), remove=IdentityRef("a.hub", "Dev-1"))


async def test_a_move_carried_out_step_by_step_and_again(builtin: BuiltinHub) -> None:
    change = await _moved_device(builtin)
    twin = await resolve_twin(change, builtin, builtin, now=NOW)
    # Read before any write (a writer checkpoints it): the old identity's whole twin, its
    # reported properties and versions included.
    assert twin == DEVICE_DATA
    for _ in range(2):  # a retry after a crash ends in the same state
        moved = await carry_out(change, twin, builtin, builtin)
        assert moved.hub == "b.hub"
        assert await builtin.read_twin("b.hub", "Dev-1") == twin
        assert await builtin.get_identity("a.hub", "Dev-1") is None
    # Once the old identity is gone, the migration keeps what the new one has.
    assert await resolve_twin(change, builtin, builtin, now=NOW) is None


async def test_the_transactional_plan_commits_whole_or_not_at_all(store: Store, builtin: BuiltinHub) -> None:
    change = await _moved_device(builtin)
    planned = await builtin.plan(change, probably_new=True)
    assert [(c, type(w).__name__) for c, w in planned] == [
        (Collection.HUB_DEVICES, "Delete"),
        (Collection.HUB_DEVICES, "Write"),
    ]
    # The old identity changed after the plan read it: nothing of the plan is written.
    newer = tw.update_tags(DEVICE_DATA, {"device": "newer"}, now=NOW)
    await builtin.apply_twin("a.hub", "Dev-1", newer)
    with pytest.raises(PreconditionFailedError):
        await store.write_atomic(planned)
    assert await builtin.get_identity("b.hub", "Dev-1") is None
    # Planned again, it moves the newer data.
    await store.write_atomic(await builtin.plan(change, probably_new=True))
    assert await builtin.read_twin("b.hub", "Dev-1") == newer
    assert await builtin.get_identity("a.hub", "Dev-1") is None
    # A create planned on the guess that the identity is new fails when it exists.
    with pytest.raises(ConflictError):
        await store.write_atomic(await builtin.plan(IdentityChange(put=spec(HUB_B)), probably_new=True))
    assert await builtin.read_twin("b.hub", "Dev-1") == newer
    # Read first, the same change is an update in place: the initial twin replaces the tags and
    # desired properties as PUT /twins does (the reported ones stay, the versions go on).
    await store.write_atomic(await builtin.plan(IdentityChange(put=spec(HUB_B)), probably_new=False))
    reset = await builtin.read_twin("b.hub", "Dev-1")
    assert reset is not None
    assert (reset.tags, reset.desired, reset.reported) == ({"initial": 1}, {"rate": 1}, {"seen": 1})
    assert (reset.version, reset.desired_version) == (newer.version + 1, newer.desired_version + 1)


def test_remote_hubs_go_through_the_outbox(builtin: BuiltinHub) -> None:
    made: list[LinkedHub] = []

    def remote(hub: LinkedHub) -> HubBackend:
        made.append(hub)
        return builtin  # any HubBackend: only which one serves which hub is tested here

    backends = HubBackends(builtin, remote)
    assert backends.transactional(IdentityChange(put=spec())) is builtin
    assert backends.for_hub(None) is builtin and backends.for_hub(HUB_A) is builtin
    assert HubBackends.is_transactional(IdentityChange(put=spec()), {})
    assert not HubBackends.is_transactional(IdentityChange(put=spec(REMOTE)), {})
    moved = IdentityChange(put=spec(), remove=IdentityRef(REMOTE.host_name.lower(), "Dev-1"))
    assert not HubBackends.is_transactional(moved, {REMOTE.host_name.lower(): REMOTE})
    with pytest.raises(HubError, match="outbox"):
        backends.transactional(IdentityChange(put=spec(REMOTE)))
    # One backend per remote hub, made again when its link changes.
    backends.for_hub(REMOTE)
    backends.for_hub(REMOTE)
    backends.for_hub(msgspec.structs.replace(REMOTE, allocation_weight=7))
    assert len(made) == 2
