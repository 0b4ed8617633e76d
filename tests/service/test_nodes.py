"""Several `provisiond serve` nodes on one PostgreSQL database serve the same data: the service
keeps no state of its own outside the database."""

from __future__ import annotations

import collections
import shutil
import uuid
from pathlib import Path

import pytest

from provisiond.protocol.sas import derive_device_key
from tests._server import RunningServer, start_server
from tests.service.test_device_api import Device, assigned

pytestmark = pytest.mark.postgres

V = {"api-version": "2021-10-01"}


def test_two_nodes_share_one_postgres_database(postgres_db_url: str, tmp_path: Path) -> None:
    first = start_server(tmp_path / "node1", "--db", postgres_db_url)
    # The second node gets the same TLS identity (a real deployment would share a certificate too).
    (tmp_path / "node2").mkdir()
    shutil.copytree(tmp_path / "node1" / "pki", tmp_path / "node2" / "pki")
    second = start_server(tmp_path / "node2", "--db", postgres_db_url)
    try:
        # Both nodes agree on what the database holds: one ID scope, one owner key.
        assert first.id_scope == second.id_scope
        assert first.connection_string.split(";")[1:] == second.connection_string.split(";")[1:]
        reg = f"node-{uuid.uuid4().hex[:8]}"
        with (
            first.http(headers={"Authorization": first.token()}) as one,
            second.http(headers={"Authorization": second.token()}) as two,
        ):
            created = one.put(
                f"/enrollments/{reg}",
                params=V,
                json={"registrationId": reg, "attestation": {"type": "symmetricKey"}},
            )
            assert created.status_code == 200, created.text
            seen = two.get(f"/enrollments/{reg}", params=V)
            assert seen.status_code == 200 and seen.json()["etag"] == created.json()["etag"]
            # An update through node 2 with node 1's etag works once; node 1's stale retry is a 412.
            body = {**created.json(), "provisioningStatus": "disabled"}
            etag = created.json()["etag"]
            assert (
                two.put(f"/enrollments/{reg}", params=V, json=body, headers={"If-Match": etag}).status_code
                == 200
            )
            assert (
                one.put(f"/enrollments/{reg}", params=V, json=body, headers={"If-Match": etag}).status_code
                == 412
            )
            assert one.get(f"/enrollments/{reg}", params=V).json()["provisioningStatus"] == "disabled"
            # A policy made on one node authenticates on the other.
            policy = one.put(
                "/admin/sharedAccessPolicies/shared-reader",
                params=V,
                json={"keyName": "shared-reader", "rights": ["EnrollmentRead"]},
            )
            assert policy.status_code == 200, policy.text
            token = second.token(key_name="shared-reader", key=policy.json()["primaryKey"])
            assert (
                two.get(f"/enrollments/{reg}", params=V, headers={"Authorization": token}).status_code == 200
            )
            assert one.delete(f"/enrollments/{reg}", params=V).status_code == 204
            assert two.get(f"/enrollments/{reg}", params=V).status_code == 404
    finally:
        first.stop()
        second.stop()


def test_geolatency_on_two_nodes_in_different_regions(postgres_db_url: str, tmp_path: Path) -> None:
    """Each node allocates to the candidate hubs nearest its own ``--region``, by the same rule
    on one database; hubs at the same distance share by weight."""
    first = start_server(tmp_path / "eu", "--db", postgres_db_url, "--region", "West Europe")
    (tmp_path / "us").mkdir()
    shutil.copytree(tmp_path / "eu" / "pki", tmp_path / "us" / "pki")
    second = start_server(tmp_path / "us", "--db", postgres_db_url, "--region", "eastus2")
    try:
        assert "region West Europe: an Azure region" in first.log()
        tag = uuid.uuid4().hex[:8]
        hubs = {
            "ams": ("westeurope", 1),
            "ams2": ("west-europe", 1),
            "dub": ("northeurope", 1000),  # heavy but farther: never chosen from West Europe
            "va": ("eastus", 1),
        }
        with first.http(headers={"Authorization": first.token()}) as admin:
            for name, (location, weight) in hubs.items():
                host = f"{name}-{tag}.example.local"
                r = admin.put(
                    f"/admin/linkedHubs/{host}",
                    params=V,
                    json={
                        "hostName": host,
                        "builtin": True,
                        "location": location,
                        "allocationWeight": weight,
                        "applyAllocationPolicy": False,
                    },
                )
                assert r.status_code == 200, r.text
            gid = f"geo-{tag}"
            r = admin.put(
                f"/enrollmentGroups/{gid}",
                params=V,
                json={
                    "enrollmentGroupId": gid,
                    "attestation": {"type": "symmetricKey"},
                    "allocationPolicy": "geoLatency",
                    "iotHubs": [f"{name}-{tag}.example.local" for name in hubs],
                },
            )
            assert r.status_code == 200, r.text
            group_key = admin.post(f"/enrollmentGroups/{gid}/attestationmechanism", params=V).json()[
                "symmetricKey"
            ]["primaryKey"]

        def register(node: RunningServer, reg: str) -> str:
            device = Device(node, reg)
            state = assigned(device.register(device.token(derive_device_key(group_key, reg))))
            device.close()
            hub: str = state["registrationState"]["assignedHub"]
            return hub.split("-", 1)[0]

        europe = collections.Counter(register(first, f"geo-eu-{tag}-{i}") for i in range(20))
        assert set(europe) <= {"ams", "ams2"} and len(europe) == 2  # the tie shared between both
        assert {register(second, f"geo-us-{tag}-{i}") for i in range(4)} == {"va"}
        # the same device through the other node: the same rule moves it to that node's nearest
        assert register(first, f"geo-us-{tag}-0") in {"ams", "ams2"}
    finally:
        first.stop()
        second.stop()
