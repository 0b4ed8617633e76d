"""Deprovisioning (issue 12, item 5) over real HTTPS against a running ``provisiond serve``:
deleting a registration record, an individual enrollment or an enrollment group leaves the
identities in their hubs, as DPS does, unless ``?deprovision=disable|delete`` (CLI
``--deprovision``, ``registration deprovision``) disables or deletes them, together with the
records that named them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from provisiond.errors import NotFoundError
from provisiond.models import Deprovision
from provisiond.protocol.sas import derive_device_key
from tests._server import RunningServer
from tests.cli.test_manage import run
from tests.service.test_device_api import Device, assigned, enroll_symmetric, enroll_symmetric_group, uid


@pytest.fixture
def admin(server: RunningServer) -> Iterator[Any]:
    client = server.client()
    yield client
    client.close()


@pytest.fixture
def hub(admin: Any) -> Iterator[str]:
    """A built-in hub of this test's own, out of allocation (enrollments name it)."""
    host = f"{uid('dephub')}.example.local"
    admin.put(
        f"/admin/linkedHubs/{host}", {"hostName": host, "builtin": True, "applyAllocationPolicy": False}
    )
    yield host
    admin.delete(f"/admin/linkedHubs/{host}")


def _status(admin: Any, hub: str, device_id: str) -> str | None:
    """The identity's status in ``hub`` (``None``: there is none)."""
    try:
        found: dict[str, Any] = admin.get(f"/admin/linkedHubs/{hub}/devices/{device_id}")
    except NotFoundError:
        return None
    return str(found.get("status", "enabled"))


def _registered(server: RunningServer, admin: Any, hub: str) -> str:
    reg = uid("dep")
    key = enroll_symmetric(admin, reg, iotHubs=[hub], allocationPolicy="static")
    device = Device(server, reg)
    assert assigned(device.register(device.token(key)))["registrationState"]["assignedHub"] == hub
    device.close()
    assert _status(admin, hub, reg) == "enabled"
    return reg


def _record(admin: Any, reg: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = admin.get(f"/registrations/{reg}")
    except NotFoundError:
        return None
    return found


def test_by_default_deleting_leaves_the_identity_as_dps_does(
    server: RunningServer, admin: Any, hub: str
) -> None:
    reg = _registered(server, admin, hub)
    run(server, "registration", "delete", reg)
    assert _record(admin, reg) is None
    assert _status(admin, hub, reg) == "enabled"
    other = _registered(server, admin, hub)
    run(server, "enrollment", "delete", other)
    assert _record(admin, other) is None and _status(admin, hub, other) == "enabled"


def test_registration_deprovision_disables_or_deletes_the_identity(
    server: RunningServer, admin: Any, hub: str
) -> None:
    reg = _registered(server, admin, hub)
    assert "disabled in" in run(server, "registration", "deprovision", reg).stdout
    assert _record(admin, reg) is None
    assert _status(admin, hub, reg) == "disabled"
    # its enrollment is still there: the device registers afresh, its identity enabled again
    key = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    device = Device(server, reg)
    assert (
        assigned(device.register(device.token(key)))["registrationState"]["substatus"] == "initialAssignment"
    )
    device.close()
    assert _status(admin, hub, reg) == "enabled"
    gone = _registered(server, admin, hub)
    run(server, "registration", "deprovision", gone, "--delete")
    assert _record(admin, gone) is None and _status(admin, hub, gone) is None
    # over the service API, as any client would
    third = _registered(server, admin, hub)
    admin.delete(f"/registrations/{third}", deprovision=None)
    with server.http(headers={"Authorization": server.token()}) as http:
        fourth = _registered(server, admin, hub)
        r = http.delete(
            f"/registrations/{fourth}", params={"api-version": "2021-10-01", "deprovision": "DELETE"}
        )
        assert r.status_code == 204, r.text
        assert _status(admin, hub, fourth) is None
        bad = http.delete(
            f"/registrations/{third}", params={"api-version": "2021-10-01", "deprovision": "wipe"}
        )
        assert bad.status_code == 400 and "disable, delete" in bad.json()["message"]


def test_enrollment_delete_deprovisions_its_device(server: RunningServer, admin: Any, hub: str) -> None:
    reg = _registered(server, admin, hub)
    run(server, "enrollment", "delete", reg, "--deprovision", "delete")
    assert _record(admin, reg) is None and _status(admin, hub, reg) is None
    disabled = _registered(server, admin, hub)
    admin.enrollments.delete(disabled, deprovision=Deprovision.DISABLE)
    assert _status(admin, hub, disabled) == "disabled"


def test_group_delete_deprovisions_every_device(server: RunningServer, admin: Any, hub: str) -> None:
    gid = uid("depg")
    group_key = enroll_symmetric_group(admin, gid, iotHubs=[hub], allocationPolicy="static")
    devices = [uid("depd") for _ in range(3)]
    for reg in devices:
        device = Device(server, reg)
        assigned(device.register(device.token(derive_device_key(group_key, reg))))
        device.close()
    run(server, "group", "delete", gid, "--deprovision", "disable")
    for reg in devices:
        assert _record(admin, reg) is None
        assert _status(admin, hub, reg) == "disabled"
    # a group already deleted without --deprovision is swept the same way later
    again = uid("depg2")
    key = enroll_symmetric_group(admin, again, iotHubs=[hub], allocationPolicy="static")
    late = uid("depd")
    device = Device(server, late)
    assigned(device.register(device.token(derive_device_key(key, late))))
    device.close()
    run(server, "group", "delete", again)
    assert _record(admin, late) is not None
    run(server, "group", "delete", again, "--deprovision", "delete")
    assert _record(admin, late) is None and _status(admin, hub, late) is None
