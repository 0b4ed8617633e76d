"""Several `provisiond serve` nodes on one PostgreSQL database serve the same data: the service
keeps no state of its own outside the database."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from tests._server import start_server

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
