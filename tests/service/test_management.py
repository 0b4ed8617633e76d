"""The management layer on its own: typed operations over a real store (both backends), with
no HTTP in between. The REST API's tests (test_service_api.py, test_admin_api.py) show the same
rules on the wire; these pin what a console or the CLI relies on when it calls the layer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from provisiond import pki
from provisiond.errors import (
    ConflictError,
    DpsCode,
    InvalidBodyError,
    NotFoundError,
    PreconditionFailedError,
    RequestError,
)
from provisiond.hub import IdentityRef
from provisiond.hub.outbox import ItemKind, OutboxItem, removal_key
from provisiond.models import (
    BulkOperationMode,
    CertificateUpload,
    Deprovision,
    DeviceRegistrationState,
    IndividualEnrollment,
    ProvisioningStatus,
    RegistrationStatus,
    Right,
    ServiceSettingsPatch,
)
from provisiond.service.app import initialize
from provisiond.service.management import Management
from provisiond.service.settings import Settings
from provisiond.storage import Collection, Store
from tests._hub_peer import HubPeer
from tests.factories import (
    key,
    pem,
    policy,
    root_ca,
    symmetric_enrollment,
    symmetric_group,
)

SRC = Path(__file__).resolve().parent.parent.parent / "src"


@pytest.fixture
async def invalidated() -> list[str]:
    return []


@pytest.fixture
async def management(store: Store, tmp_path: Path, invalidated: list[str]) -> Management:
    settings = Settings(data_dir=tmp_path)
    await initialize(store, settings)
    return Management(
        store, builtin_hub=settings.first_builtin_hub, invalidate=lambda: invalidated.append("x")
    )


async def _record(store: Store, registration_id: str, group_id: str | None = None) -> None:
    """A registration record as the registrar writes one (the layer only reads and deletes them)."""
    state = DeviceRegistrationState(
        registration_id=registration_id,
        status=RegistrationStatus.ASSIGNED,
        assigned_hub="builtin-hub.provisiond.local",
    )
    index = {"status": "assigned", "enrollment_group_id": group_id.lower() if group_id else None}
    await store.write(Collection.REGISTRATIONS, registration_id, msgspec.json.encode(state), index=index)


# --- enrollments -------------------------------------------------------------------------------


async def test_put_follows_dps_etag_rules(management: Management) -> None:
    enrollments = management.enrollments
    created = await enrollments.create(symmetric_enrollment("dev-1"))
    assert (
        created.etag and created.attestation.symmetric_key and created.attestation.symmetric_key.primary_key
    )
    with pytest.raises(ConflictError) as exists:
        await enrollments.create(symmetric_enrollment("DEV-1"))
    assert exists.value.error_code == DpsCode.ENROLLMENT_EXISTS
    # an etag in the document counts as If-Match, as DPS reads the body's etag
    updated = await enrollments.put("dev-1", msgspec.structs.replace(created, device_id="d1"))
    assert updated.device_id == "d1" and updated.etag != created.etag
    assert updated.attestation == created.attestation, "keys a read would strip are kept"
    with pytest.raises(PreconditionFailedError) as stale:
        await enrollments.put("dev-1", created)
    assert (
        stale.value.error_code == DpsCode.ETAG_MISMATCH and "(it does not exist)" not in stale.value.message
    )
    with pytest.raises(PreconditionFailedError) as missing:
        await enrollments.put("dev-2", symmetric_enrollment("dev-2"), if_match=created.etag)
    assert "(it does not exist)" in missing.value.message
    assert (await enrollments.put("dev-1", symmetric_enrollment("dev-1"), if_match=" * ")).device_id is None
    with pytest.raises(InvalidBodyError, match="differs"):
        await enrollments.put("dev-1", symmetric_enrollment("dev-3"), if_match="*")
    assert (await enrollments.get("Dev-1")).attestation.symmetric_key is None, "reads strip the keys"


async def test_modify_reads_again_when_another_writer_got_in_between(management: Management) -> None:
    enrollments = management.enrollments
    await enrollments.create(symmetric_enrollment("dev-1"))
    calls = 0

    async def other_writer() -> None:
        current = await enrollments.get("dev-1")
        await enrollments.put(
            "dev-1", msgspec.structs.replace(current, device_id="from-elsewhere"), if_match="*"
        )

    seen: list[IndividualEnrollment] = []

    def disable(enrollment: IndividualEnrollment) -> IndividualEnrollment:
        nonlocal calls
        calls += 1
        seen.append(enrollment)
        return msgspec.structs.replace(enrollment, provisioning_status=ProvisioningStatus.DISABLED)

    # The other writer writes between our read and our write, once: our first write fails on
    # its etag, the second (on a fresh read) keeps the other writer's change.
    original_put = enrollments.put
    interfered = False

    async def put_after_interference(*args: object, **kwargs: object) -> IndividualEnrollment:
        nonlocal interfered
        if not interfered:
            interfered = True
            await other_writer()
        return await original_put(*args, **kwargs)  # type: ignore[arg-type]

    enrollments.put = put_after_interference  # type: ignore[method-assign]
    try:
        result = await enrollments.modify("dev-1", disable)
    finally:
        del enrollments.put
    assert calls == 2 and seen[1].device_id == "from-elsewhere"
    assert result.provisioning_status is ProvisioningStatus.DISABLED and result.device_id == "from-elsewhere"


async def test_modify_gives_up_when_the_record_keeps_changing(management: Management) -> None:
    enrollments = management.enrollments
    await enrollments.create(symmetric_enrollment("busy"))
    original_put = enrollments.put

    async def always_second(
        id: str, enrollment: IndividualEnrollment, *, if_match: str | None = None
    ) -> IndividualEnrollment:
        await original_put(id, symmetric_enrollment(id), if_match="*")  # someone else, every time
        return await original_put(id, enrollment, if_match=if_match)

    enrollments.put = always_second  # type: ignore[method-assign]
    try:
        with pytest.raises(PreconditionFailedError):
            await enrollments.modify("busy", lambda e: e)
    finally:
        del enrollments.put


async def test_set_provisioning_status_keeps_the_secrets(management: Management) -> None:
    groups = management.groups
    created = await groups.create(symmetric_group("g1", primary_key=key(b"p")))
    disabled = await groups.set_provisioning_status("g1", ProvisioningStatus.DISABLED)
    assert disabled.provisioning_status is ProvisioningStatus.DISABLED
    assert await groups.attestation_mechanism("g1") == created.attestation
    with pytest.raises(NotFoundError) as missing:
        await groups.set_provisioning_status("nope", ProvisioningStatus.ENABLED)
    assert missing.value.error_code == DpsCode.GROUP_NOT_FOUND


async def test_query_pages_and_contradictions(management: Management) -> None:
    enrollments = management.enrollments
    for i in range(5):
        await enrollments.create(symmetric_enrollment(f"q-{i}", device_id="same" if i % 2 else None))
    first = await enrollments.query("SELECT * FROM enrollments WHERE deviceId = 'same'", size=1)
    second = await enrollments.query(
        "SELECT * FROM enrollments WHERE deviceId = 'same'", continuation=first.continuation
    )
    assert [e.registration_id for e in [*first.items, *second.items]] == ["q-1", "q-3"]
    assert first.size == 1 and second.size == 100 and second.continuation is None
    nothing = await enrollments.query("SELECT * WHERE deviceId = 'a' AND deviceId = 'b'")
    assert nothing.items == [] and nothing.continuation is None
    assert len((await enrollments.query()).items) == 5


async def test_individual_delete_takes_its_record_a_groups_does_not(
    store: Store, management: Management
) -> None:
    await management.enrollments.create(symmetric_enrollment("solo"))
    await _record(store, "solo")
    assert (await management.enrollments.get("solo")).registration_state is not None
    await management.enrollments.delete("solo")
    with pytest.raises(NotFoundError):
        await management.registrations.get("solo")
    await management.groups.create(symmetric_group("g"))
    await _record(store, "g-dev", group_id="g")
    assert [s.registration_id for s in (await management.registrations.query("g")).items] == ["g-dev"]
    await management.groups.delete("g")
    assert (await management.registrations.get("g-dev")).status is RegistrationStatus.ASSIGNED


async def test_bulk_reports_each_item(store: Store, management: Management) -> None:
    enrollments = management.enrollments
    items = [symmetric_enrollment("b-1"), symmetric_enrollment("bad id"), symmetric_enrollment("B-1")]
    result = await enrollments.bulk(BulkOperationMode.CREATE, items)
    assert [(e.registration_id, e.error_code) for e in result.errors] == [
        ("bad id", DpsCode.INVALID_ID),
        ("B-1", DpsCode.INVALID_BODY),
    ]
    await _record(store, "b-1")
    assert (await enrollments.bulk(BulkOperationMode.DELETE, [symmetric_enrollment("b-1")])).is_successful
    with pytest.raises(NotFoundError):
        await management.registrations.get("b-1")


# --- the admin records -------------------------------------------------------------------------


async def test_admin_writes_drop_cached_copies(
    management: Management, invalidated: list[str], hub_peer: HubPeer
) -> None:
    hub = hub_peer.linked_hub(apply_allocation_policy=False)
    ca = root_ca()
    writes = [
        management.hubs.put(hub.host_name, hub),
        management.hubs.delete(hub.host_name),
        management.certificates.upload("ca", CertificateUpload(certificate=pem(ca))),
        management.certificates.delete("ca"),
        management.policies.put("p", policy("p", Right.ENROLLMENT_READ)),
        management.policies.delete("p"),
        management.settings.update(ServiceSettingsPatch(id_scope="0ne00000001")),
    ]
    for count, write in enumerate(writes, 1):
        await write
        assert len(invalidated) == count
    # enrollments are not cached: their writes drop nothing
    await management.enrollments.create(symmetric_enrollment())
    assert len(invalidated) == len(writes)


async def test_builtin_hub_stays_and_policies_keep_an_administrator(management: Management) -> None:
    with pytest.raises(RequestError, match="built-in hub"):
        await management.hubs.delete("LOCALHOST")
    with pytest.raises(ConflictError):
        await management.policies.delete("provisioningserviceowner")
    owner = await management.policies.get("provisioningserviceowner", keys=True)
    demoted = msgspec.structs.replace(owner, rights=[Right.ENROLLMENT_READ])
    with pytest.raises(ConflictError):
        await management.policies.put("provisioningserviceowner", demoted)
    assert (await management.policies.get("provisioningserviceowner")).primary_key is None


async def test_hub_put_keeps_the_connection_string(
    store: Store, management: Management, hub_peer: HubPeer
) -> None:
    hub = hub_peer.linked_hub(allocation_weight=3)
    created = await management.hubs.put(hub.host_name, hub)
    assert created.connection_string is None
    changed = await management.hubs.put(hub.host_name, msgspec.structs.replace(created, location="north"))
    assert changed.location == "north" and changed.allocation_weight == 3
    record = await store.get(Collection.LINKED_HUBS, hub.host_name)
    assert record is not None and hub.connection_string and hub.connection_string.encode() in record.doc
    with pytest.raises(ConflictError):
        await management.hubs.put(hub.host_name, msgspec.structs.replace(hub, etag=None))


async def test_ca_verification(management: Management) -> None:
    ca = root_ca()
    await management.certificates.upload("root", CertificateUpload(certificate=pem(ca)))
    code = (await management.certificates.generate_verification_code("root")).verification_code
    assert code is not None
    verified = await management.certificates.verify("root", pem(pki.make_verification_cert(code, ca)))
    assert verified.is_verified and verified.verification_code is None
    with pytest.raises(RequestError, match="generateVerificationCode"):
        await management.certificates.verify("root", pem(pki.make_verification_cert(code, ca)))


async def test_registration_record_deletes_on_its_etag(store: Store, management: Management) -> None:
    await _record(store, "r1")
    state = await management.registrations.get("R1")
    assert state.registration_id == "r1" and state.etag and state.created_date_time_utc
    with pytest.raises(PreconditionFailedError) as stale:
        await management.registrations.delete("r1", if_match='"stale"')
    assert stale.value.error_code == DpsCode.ETAG_MISMATCH
    await management.registrations.delete("r1", if_match=state.etag)
    with pytest.raises(NotFoundError) as gone:
        await management.registrations.delete("r1")
    assert gone.value.error_code == DpsCode.REGISTRATION_NOT_FOUND


# --- layering ----------------------------------------------------------------------------------


def test_the_management_layer_knows_nothing_of_http() -> None:
    """A console or a CLI can import it without the web framework or the HTTP plumbing."""
    code = (
        "import sys, provisiond.service.management as m; "
        "bad = sorted(n for n in sys.modules if n.split('.')[0] == 'starlette' "
        "or n in ('provisiond.service.http', 'provisiond.service.context', 'provisiond.service.app')); "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)}, timeout=60
    )
    assert done.returncode == 0, f"provisiond.service.management imports {done.stdout.strip()}{done.stderr}"


async def test_deprovisioning_in_a_remote_hub_commits_an_outbox_item_with_the_deletion(
    store: Store, management: Management, hub_peer: HubPeer
) -> None:
    """A remote hub's removal is an item of the hub writer's outbox, committed in the
    transaction that deletes the record (the writer then disables the identity in the hub)."""
    hub = hub_peer.linked_hub(apply_allocation_policy=False)
    await management.hubs.put(hub.host_name, hub)
    state = DeviceRegistrationState(
        registration_id="r-remote",
        device_id="r-remote",
        status=RegistrationStatus.ASSIGNED,
        assigned_hub=hub.host_name,
    )
    await store.write(
        Collection.REGISTRATIONS, "r-remote", msgspec.json.encode(state), index={"status": "assigned"}
    )
    await management.registrations.delete("r-remote", deprovision=Deprovision.DISABLE)
    with pytest.raises(NotFoundError):
        await management.registrations.get("r-remote")
    item = await store.get(Collection.HUB_OUTBOX, removal_key(IdentityRef(hub.host_name.lower(), "r-remote")))
    assert item is not None
    queued = msgspec.json.decode(item.doc, type=OutboxItem)
    assert queued.kind is ItemKind.DISABLE and queued.target == IdentityRef(hub.host_name.lower(), "r-remote")
