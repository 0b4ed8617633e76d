"""The official DPS service SDK for Python (azure-iot-deviceprovisioning) against a running server.

Only the host (with its port) and the trusted CA change from what it does against Azure.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.iot.deviceprovisioning import DeviceProvisioningClient

from provisiond.models import DeviceRegistrationState, RegistrationStatus, RegistrationSubstatus
from provisiond.storage import Collection, WriteMode, open_store
from tests._server import RunningServer

pytestmark = pytest.mark.interop


@pytest.fixture
def sdk(server: RunningServer) -> Any:
    client = DeviceProvisioningClient.from_connection_string(
        server.connection_string, connection_verify=server.ca_file
    )
    yield client
    client.close()


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_individual_enrollment_lifecycle(sdk: Any) -> None:
    reg = _uid("sdk")
    created = sdk.enrollment.create_or_update(
        id=reg,
        enrollment={"registrationId": reg, "attestation": {"type": "symmetricKey"}, "deviceId": "dev-" + reg},
    )
    assert created["registrationId"] == reg and created["etag"]
    with pytest.raises(ResourceExistsError):
        sdk.enrollment.create_or_update(
            id=reg, enrollment={"registrationId": reg, "attestation": {"type": "symmetricKey"}}
        )
    got = sdk.enrollment.get(id=reg)
    got["provisioningStatus"] = "disabled"
    updated = sdk.enrollment.create_or_update(id=reg, enrollment=got, if_match=got["etag"])
    assert updated["provisioningStatus"] == "disabled" and updated["etag"] != created["etag"]
    with pytest.raises(HttpResponseError) as stale:
        sdk.enrollment.create_or_update(id=reg, enrollment=got, if_match=created["etag"])
    assert stale.value.status_code == 412
    mech = sdk.enrollment.get_attestation_mechanism(id=reg)
    assert mech["symmetricKey"]["primaryKey"]
    found = list(
        sdk.enrollment.query(
            query_specification={"query": f"SELECT * FROM enrollments WHERE registrationId = '{reg}'"}
        )
    )
    assert [e["registrationId"] for e in found] == [reg]
    result = sdk.enrollment.run_bulk_operation(
        bulk_operation={
            "mode": "create",
            "enrollments": [{"registrationId": _uid("bulk"), "attestation": {"type": "symmetricKey"}}],
        }
    )
    assert result["isSuccessful"] is True
    sdk.enrollment.delete(id=reg, if_match=updated["etag"])
    with pytest.raises(ResourceNotFoundError):
        sdk.enrollment.get(id=reg)


def test_query_pages_through_the_sdk(sdk: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    ids = [f"page-{tag}-{i:02d}" for i in range(12)]
    sdk.enrollment.run_bulk_operation(
        bulk_operation={
            "mode": "create",
            "enrollments": [
                {"registrationId": i, "attestation": {"type": "symmetricKey"}, "deviceId": tag} for i in ids
            ],
        }
    )
    found = list(
        sdk.enrollment.query(
            query_specification={"query": f"SELECT * FROM enrollments WHERE deviceId = '{tag}'"}, top=5
        )
    )
    assert sorted(e["registrationId"] for e in found) == ids


def test_enrollment_group_lifecycle(sdk: Any) -> None:
    gid = _uid("sdkgrp")
    created = sdk.enrollment_group.create_or_update(
        id=gid, enrollment_group={"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}}
    )
    got = sdk.enrollment_group.get(id=gid)
    assert got["etag"] == created["etag"]
    got["provisioningStatus"] = "disabled"
    updated = sdk.enrollment_group.create_or_update(id=gid, enrollment_group=got, if_match=got["etag"])
    assert updated["provisioningStatus"] == "disabled"
    mechanism = sdk.enrollment_group.get_attestation_mechanism(id=gid)
    assert mechanism["symmetricKey"]["secondaryKey"]
    # DPS answers a create with the generated keys (and so does provisiond), reads without them.
    assert created["attestation"] == mechanism and got["attestation"] == {"type": "symmetricKey"}
    assert updated["attestation"] == mechanism
    groups = list(sdk.enrollment_group.query(query_specification={"query": "SELECT * FROM enrollmentGroups"}))
    assert gid in {g["enrollmentGroupId"] for g in groups}
    # The query the SDK's own recorded tests send, and the one of Microsoft's service SDK samples.
    for every in ("SELECT *", "*"):
        assert gid in {
            g["enrollmentGroupId"] for g in sdk.enrollment_group.query(query_specification={"query": every})
        }
    sdk.enrollment_group.delete(id=gid)
    with pytest.raises(ResourceNotFoundError):
        sdk.enrollment_group.get(id=gid)


def _write_registration(db: Path, reg: str, group: str) -> None:
    """Registration records are written by device registration (a later issue); until then the
    test writes one through the store, into the database the server is using."""

    async def write() -> None:
        store = open_store(f"sqlite:///{db}")
        await store.open()
        try:
            state = DeviceRegistrationState(
                registration_id=reg,
                assigned_hub="builtin-hub.provisiond.local",
                device_id=reg,
                status=RegistrationStatus.ASSIGNED,
                substatus=RegistrationSubstatus.INITIAL_ASSIGNMENT,
            )
            await store.write(
                Collection.REGISTRATIONS,
                reg,
                msgspec.json.encode(state),
                index={"device_id": reg, "status": "assigned", "enrollment_group_id": group.lower()},
                mode=WriteMode.CREATE,
            )
        finally:
            await store.close()

    asyncio.run(write())


def test_registration_records(sdk: Any, server: RunningServer) -> None:
    gid = _uid("sdkreg")
    sdk.enrollment_group.create_or_update(
        id=gid, enrollment_group={"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}}
    )
    reg = _uid("device")
    _write_registration(server.data_dir / "provisiond.db", reg, gid)
    state = sdk.device_registration_state.get(id=reg)
    assert state["registrationId"] == reg and state["status"] == "assigned" and state["etag"]
    assert state["assignedHub"] == "builtin-hub.provisiond.local"
    listed = list(sdk.device_registration_state.query(id=gid))
    assert [s["registrationId"] for s in listed] == [reg]
    sdk.device_registration_state.delete(id=reg, if_match=state["etag"])
    with pytest.raises(ResourceNotFoundError):
        sdk.device_registration_state.get(id=reg)
