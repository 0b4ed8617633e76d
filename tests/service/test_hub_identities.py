"""The identities provisiond creates in its built-in hubs, as DPS creates them in IoT hubs
(issue 9, items 5 and 6), over real HTTPS against a running ``provisiond serve``:

* every X.509 device, individual or group, is ``selfSigned`` with the SHA-256 thumbprint of the
  certificate it presented; CA-authenticated group devices are a linked hub's explicit option;
* an identity that has to be created gets the enrollment's current initial twin, whatever
  registration record survives;
* deleting an individual enrollment deletes its registration record (a group's stay).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes

from provisiond import pki
from provisiond.protocol.sas import derive_device_key
from tests._server import RunningServer
from tests.service.test_device_api import Device, assigned, enroll_symmetric, pem, uid


@pytest.fixture
def admin(server: RunningServer) -> Any:
    client = server.client()
    yield client
    client.close()


@pytest.fixture
def builtin_hub(admin: Any) -> Iterator[Callable[..., str]]:
    """Makes further built-in hubs, out of allocation (only enrollments that name them use
    them), and unlinks them afterwards (the session's server is shared)."""
    made: list[str] = []

    def make(**options: Any) -> str:
        host = f"{uid('idhub')}.example.local"
        admin.put(
            f"/admin/linkedHubs/{host}",
            {"hostName": host, "builtin": True, "applyAllocationPolicy": False, **options},
        )
        made.append(host)
        return host

    yield make
    for host in made:
        admin.delete(f"/admin/linkedHubs/{host}")


def x509_group(admin: Any, gid: str, root: pki.Issued, hub: str | None = None) -> None:
    body: dict[str, Any] = {
        "enrollmentGroupId": gid,
        "attestation": {
            "type": "x509",
            "x509": {"signingCertificates": {"primary": {"certificate": pem(root.cert)}}},
        },
    }
    if hub is not None:
        body.update(iotHubs=[hub], allocationPolicy="static")
    admin.put(f"/enrollmentGroups/{gid}", body)


def identity(admin: Any, hub: str, device_id: str) -> dict[str, Any]:
    found: dict[str, Any] = admin.get(f"/admin/linkedHubs/{hub}/devices/{device_id}")
    return found


# --- 5. X.509 identities -------------------------------------------------------------------------


def test_x509_devices_are_self_signed_with_the_sha256_thumbprint_of_what_they_presented(
    server: RunningServer, admin: Any, tmp_path: Path
) -> None:
    root = pki.make_root_ca(uid("Id Root"))
    inter = pki.make_intermediate_ca(uid("Id Intermediate"), root)
    gid = uid("idg")
    x509_group(admin, gid, root)
    reg = uid("idx")
    leaf = pki.make_device_cert(reg, inter)
    device = Device(server, reg, credential=leaf, tmp=tmp_path)
    state = assigned(device.register())["registrationState"]
    device.close()
    # What the official end-to-end tests assert (docs/service-api.md): selfSigned, and the
    # thumbprint is the leaf's SHA-256, upper-case hex, in both slots.
    sha256 = leaf.cert.fingerprint(hashes.SHA256()).hex().upper()
    assert identity(admin, state["assignedHub"], reg)["authentication"] == {
        "type": "selfSigned",
        "x509Thumbprint": {"primaryThumbprint": sha256, "secondaryThumbprint": sha256},
    }


def test_certificate_authority_group_devices_are_a_linked_hubs_option(
    server: RunningServer, admin: Any, tmp_path: Path, builtin_hub: Callable[..., str]
) -> None:
    hub = builtin_hub(x509GroupAuthentication="certificateAuthority")
    assert admin.get(f"/admin/linkedHubs/{hub}")["x509GroupAuthentication"] == "certificateAuthority"
    root = pki.make_root_ca(uid("CA Root"))
    gid = uid("cag")
    x509_group(admin, gid, root, hub)
    reg = uid("cax")
    device = Device(server, reg, credential=pki.make_device_cert(reg, root), tmp=tmp_path)
    assert assigned(device.register())["registrationState"]["assignedHub"] == hub
    device.close()
    assert identity(admin, hub, reg)["authentication"] == {"type": "certificateAuthority"}
    # Individual X.509 devices stay self-signed there: the option is about groups.
    single = uid("cai")
    leaf = pki.make_device_cert(single)
    admin.put(
        f"/enrollments/{single}",
        {
            "registrationId": single,
            "iotHubs": [hub],
            "allocationPolicy": "static",
            "attestation": {
                "type": "x509",
                "x509": {"clientCertificates": {"primary": {"certificate": pem(leaf.cert)}}},
            },
        },
    )
    device = Device(server, single, credential=leaf, tmp=tmp_path)
    assigned(device.register())
    device.close()
    assert identity(admin, hub, single)["authentication"]["type"] == "selfSigned"
    # The option is validated like any field.
    with server.http(headers={"Authorization": server.token()}) as http:
        r = http.put(
            f"/admin/linkedHubs/{hub}",
            params={"api-version": "2021-10-01"},
            json={"hostName": hub, "x509GroupAuthentication": "thumbprint"},
            headers={"If-Match": "*"},
        )
    assert r.status_code == 400 and "x509GroupAuthentication" in r.json()["message"]


# --- 6. the initial twin whenever the identity has to be created ---------------------------------


TWIN_A = {"tags": {"generation": "A"}, "properties": {"desired": {"rate": 1}}}
TWIN_B = {"tags": {"generation": "B"}, "properties": {"desired": {"rate": 2}}}
HUB_TWIN_A = {"tags": {"generation": "A"}, "desired": {"rate": 1}}
HUB_TWIN_B = {"tags": {"generation": "B"}, "desired": {"rate": 2}}


def test_individual_reenrolled_after_its_identity_was_deleted_gets_the_new_twin(
    server: RunningServer, admin: Any, builtin_hub: Callable[..., str]
) -> None:
    hub = builtin_hub()
    reg = uid("twin-i")
    key = enroll_symmetric(admin, reg, initialTwin=TWIN_A, iotHubs=[hub], allocationPolicy="static")
    device = Device(server, reg)
    assigned(device.register(device.token(key)))
    assert identity(admin, hub, reg)["twin"] == HUB_TWIN_A
    admin.delete(f"/enrollments/{reg}")
    admin.delete(f"/admin/linkedHubs/{hub}/devices/{reg}")
    key = enroll_symmetric(admin, reg, initialTwin=TWIN_B, iotHubs=[hub], allocationPolicy="static")
    state = assigned(device.register(device.token(key)))["registrationState"]
    device.close()
    assert state["substatus"] == "initialAssignment"
    assert identity(admin, hub, reg)["twin"] == HUB_TWIN_B


def test_group_device_whose_record_survived_gets_the_new_twin_when_its_identity_is_created(
    server: RunningServer, admin: Any, builtin_hub: Callable[..., str]
) -> None:
    hub = builtin_hub()
    gid = uid("twin-g")
    group = {"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}, "iotHubs": [hub]}
    admin.put(f"/enrollmentGroups/{gid}", {**group, "initialTwin": TWIN_A, "allocationPolicy": "static"})
    keys = admin.post(f"/enrollmentGroups/{gid}/attestationmechanism")["symmetricKey"]
    reg = uid("twin-gd")
    device = Device(server, reg)
    token = device.token(derive_device_key(keys["primaryKey"], reg))
    assigned(device.register(token))
    assert identity(admin, hub, reg)["twin"] == HUB_TWIN_A
    # Deleting a group keeps its devices' registration records, as DPS does.
    admin.delete(f"/enrollmentGroups/{gid}")
    assert admin.get(f"/registrations/{reg}")["assignedHub"] == hub
    admin.delete(f"/admin/linkedHubs/{hub}/devices/{reg}")
    admin.put(
        f"/enrollmentGroups/{gid}",
        {
            **group,
            "initialTwin": TWIN_B,
            "allocationPolicy": "static",
            "attestation": {"type": "symmetricKey", "symmetricKey": keys},
        },
    )
    # The surviving record says "assigned to this hub": the identity must still be created, and
    # with the group's current initial twin, not with none.
    assigned(device.register(token))
    device.close()
    assert identity(admin, hub, reg)["twin"] == HUB_TWIN_B


def test_deleting_an_individual_enrollment_deletes_its_registration_record(
    server: RunningServer, admin: Any, builtin_hub: Callable[..., str]
) -> None:
    hub = builtin_hub()
    reg = uid("rec")
    key = enroll_symmetric(admin, reg, initialTwin=TWIN_A, iotHubs=[hub], allocationPolicy="static")
    device = Device(server, reg)
    assigned(device.register(device.token(key)))
    assert admin.get(f"/enrollments/{reg}")["registrationState"]["status"] == "assigned"
    admin.delete(f"/enrollments/{reg}")
    with server.http(headers={"Authorization": server.token()}) as http:
        gone = http.get(f"/registrations/{reg}", params={"api-version": "2021-10-01"})
    assert gone.status_code == 404 and gone.json()["errorCode"] == 404202
    # The hub identity stays (deprovisioning it is a separate step, as with DPS) ...
    assert identity(admin, hub, reg)["twin"] == HUB_TWIN_A
    # ... and the device, enrolled again, registers anew over it: an initial assignment that
    # applies the new enrollment's initial twin.
    key = enroll_symmetric(admin, reg, initialTwin=TWIN_B, iotHubs=[hub], allocationPolicy="static")
    state = assigned(device.register(device.token(key)))["registrationState"]
    device.close()
    assert state["substatus"] == "initialAssignment" and state["assignedHub"] == hub
    assert identity(admin, hub, reg)["twin"] == HUB_TWIN_B
