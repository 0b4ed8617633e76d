"""The service API over real HTTPS against a running ``provisiond serve``: what the service
SDKs see (the SAS header over TLS, connection.json, the log file), what devices see of the
enrollments it writes (X.509 over TLS), and the typed ServiceClient the CLI uses. The
operations themselves are tested in-process (test_service_api.py, test_admin_api.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from provisiond import pki
from provisiond.errors import ConflictError, DpsCode, NotFoundError, PreconditionFailedError
from provisiond.models import (
    BulkOperationMode,
    CertificateUpload,
    ProvisioningStatus,
    Right,
    ServiceSettingsPatch,
)
from provisiond.protocol.sas import derive_device_key
from provisiond.service_client import ServiceClient
from tests._hub_peer import HubPeer
from tests._server import RunningServer
from tests.factories import (
    body,
    key,
    pem,
    policy,
    root_ca,
    symmetric_enrollment,
    symmetric_group,
    uid,
    x509_enrollment,
)
from tests.service.test_device_api import Device, assigned
from tests.service.test_service_api import V, assert_error, sym
from tests.service.test_service_api_clients import certificate_forms


@pytest.fixture
def http(server: RunningServer) -> Any:
    with server.http(headers={"Authorization": server.token()}) as client:
        yield client


@pytest.fixture
def client(server: RunningServer) -> Any:
    with server.client() as typed:
        yield typed


def log_line(server: RunningServer, tracking_id: str) -> str:
    """The service's log line for ``tracking_id`` (the log is written as the answer goes out)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in server.log().splitlines() if tracking_id in line]
        if lines or time.monotonic() > deadline:
            assert lines, f"no log line with trackingId {tracking_id}:\n{server.log()[-3000:]}"
            return lines[-1]
        time.sleep(0.02)


@pytest.mark.parametrize("form", ["pem", "base64-der", "base64-pem", "base64-pem-wrapped"])
def test_individual_enrollment_certificate_forms(
    server: RunningServer, http: httpx.Client, form: str, tmp_path: Path
) -> None:
    reg = uid("cert")
    leaf = pki.make_device_cert(reg)
    r = http.put(
        f"/enrollments/{reg}", params=V, json=body(x509_enrollment(reg, certificate_forms(leaf)[form]))
    )
    assert r.status_code == 200, r.text
    info = r.json()["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
    # Stored as PEM, whatever form it arrived in, and the device registers with it over TLS.
    device = Device(server, reg, credential=leaf, tmp=tmp_path)
    assert assigned(device.register())["registrationState"]["x509"]["certificateInfo"] == info
    device.close()


def test_device_api_paths_are_case_insensitive_too(server: RunningServer, http: httpx.Client) -> None:
    reg = uid("CaseDev")
    http.put(f"/enrollments/{reg}", params=V, json=sym(reg))
    device_key = http.post(f"/enrollments/{reg}/attestationmechanism", params=V).json()["symmetricKey"][
        "primaryKey"
    ]
    device = Device(server, reg)
    r = device.http.put(
        f"/{server.id_scope.upper()}/Registrations/{reg}/Register",
        params={"api-version": "2021-06-01"},
        json={"registrationId": reg},
        headers={"Authorization": device.token(device_key)},
    )
    assert assigned(r)["registrationState"]["registrationId"] == reg
    device.close()


def test_unknown_paths_are_a_dps_404_with_a_log_line_and_known_ones_still_route(
    server: RunningServer, http: httpx.Client
) -> None:
    """The 404 of an unknown path is answered before the router (service/http.py UnknownPaths):
    the same DPS body, header and log line as before, for any method and odd bytes; and the
    paths that some route serves, in any case, with a trailing slash, or under the wrong method,
    still reach it."""
    for method, path, shown in (
        ("GET", "/nothing", "/nothing"),
        ("DELETE", "/enrollments/a/b/c", "/enrollments/a/b/c"),
        ("GET", "/%0a%1bodd%20path", "/%0a%1bodd%20path"),
        (
            "POST",
            f"/{server.id_scope}/registrations/x/unknown",
            f"/{server.id_scope}/registrations/x/unknown",
        ),
    ):
        r = http.request(method, path, params=V)
        assert r.status_code == 404 and r.headers["x-ms-error-code"] == "404000", r.text
        body = r.json()
        assert body["errorCode"] == 404000 and body["message"] == f"No such resource: {method} {shown}."
        line = log_line(server, body["trackingId"])
        assert "INFO provisiond.http:" in line and f"{method} {shown} -> 404 404000" in line
    reg = uid()
    http.put(f"/enrollments/{reg}", params=V, json=sym(reg)).raise_for_status()
    for path in (f"/enrollments/{reg}", f"/ENROLLMENTS/{reg}/", f"/Enrollments/{reg}/attestationMechanism"):
        method = "POST" if path.endswith("Mechanism") else "GET"
        assert http.request(method, path, params=V).status_code == 200, path
    assert http.get("/healthz").status_code == 200
    r = http.patch(f"/enrollments/{reg}", params=V, json={})
    assert r.status_code == 405 and r.json()["errorCode"] == 405000, r.text
    # A device path with a scope that is not ours still reaches the device API (its own 4xx).
    r = http.put("/0neNOTOURS/registrations/x/register", params=V, json={"registrationId": "x"})
    assert r.status_code != 404 or r.json()["errorCode"] != 404000, r.text


def test_service_sas_auth_over_tls(server: RunningServer, http: httpx.Client) -> None:
    reg = uid()
    with server.http() as anon:
        assert_error(anon.get(f"/enrollments/{reg}", params=V), 401, DpsCode.UNAUTHENTICATED, "missing")
        for token, code in (
            (server.token(ttl=-3600), DpsCode.TOKEN_EXPIRED),
            (server.token(key=key(b"f")), DpsCode.TOKEN_INVALID),
            (server.token(key_name="nobody"), DpsCode.UNKNOWN_POLICY),
        ):
            assert_error(
                anon.get(f"/enrollments/{reg}", params=V, headers={"Authorization": token}), 401, code
            )
    name = uid("reader")
    reader = http.put(
        f"/admin/sharedAccessPolicies/{name}", params=V, json=body(policy(name, Right.ENROLLMENT_READ))
    )
    token = server.token(key_name=name, key=reader.json()["primaryKey"])
    with server.http(headers={"Authorization": token}) as c:
        assert c.get(f"/enrollments/{reg}", params=V).status_code == 404  # authorized, just missing
        assert_error(c.put(f"/enrollments/{reg}", params=V, json=sym(reg)), 403, DpsCode.MISSING_RIGHT)
    http.delete(f"/admin/sharedAccessPolicies/{name}", params=V)


def test_client_errors_reach_the_service_log(server: RunningServer, http: httpx.Client) -> None:
    response = http.put("/enrollments/bad%20id", params=V, json=sym("bad id"))
    line = log_line(server, response.json()["trackingId"])
    assert "PUT /enrollments/bad%20id -> 400 400005" in line and "INFO" in line


def test_connection_json_has_the_stable_keys(server: RunningServer) -> None:
    assert set(server.info) >= {"idScope", "host", "httpsPort", "serviceConnectionString", "caCertificate"}
    assert server.info["serviceConnectionString"].startswith(
        f"HostName=localhost:{server.port};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey="
    )
    assert "BEGIN CERTIFICATE" in Path(server.ca_file).read_text()


# --- the typed client --------------------------------------------------------------------------


def test_typed_client_enrollments(client: ServiceClient) -> None:
    reg = uid("typed")
    created = client.enrollments.create(symmetric_enrollment(reg, device_id=f"{reg}-dev"))
    assert created.registration_id == reg and created.etag
    assert created.attestation.symmetric_key and created.attestation.symmetric_key.primary_key
    with pytest.raises(ConflictError) as conflict:
        client.enrollments.create(symmetric_enrollment(reg))
    assert conflict.value.error_code == DpsCode.ENROLLMENT_EXISTS and conflict.value.tracking_id
    disabled = client.enrollments.modify(
        reg, lambda e: msgspec.structs.replace(e, provisioning_status=ProvisioningStatus.DISABLED)
    )
    assert disabled.provisioning_status is ProvisioningStatus.DISABLED and disabled.etag != created.etag
    assert disabled.device_id == f"{reg}-dev"
    assert client.enrollments.attestation_mechanism(reg) == created.attestation
    assert [
        e.registration_id for e in client.enrollments.query(f"SELECT * WHERE registrationId = '{reg}'")
    ] == [reg]
    with pytest.raises(PreconditionFailedError):
        client.enrollments.delete(reg, if_match=created.etag)
    bulk = [symmetric_enrollment(uid("typed")) for _ in range(3)]
    assert client.enrollments.bulk(BulkOperationMode.CREATE, bulk).is_successful
    result = client.enrollments.bulk(BulkOperationMode.CREATE, bulk[:1])
    assert [(e.registration_id, e.error_code // 1000) for e in result.errors] == [
        (bulk[0].registration_id, 409)
    ]
    assert client.enrollments.bulk(BulkOperationMode.DELETE, [*bulk, disabled]).is_successful
    with pytest.raises(NotFoundError):
        client.enrollments.get(reg)


def test_typed_client_groups_and_registrations(server: RunningServer, client: ServiceClient) -> None:
    gid = uid("typedg")
    group = client.groups.create(symmetric_group(gid))
    assert group.attestation.symmetric_key and group.attestation.symmetric_key.primary_key
    assert list(client.registrations.query(gid)) == []
    device = Device(server, f"{gid}-d1")
    assigned(
        device.register(
            device.token(
                derive_device_key(group.attestation.symmetric_key.primary_key, device.registration_id)
            )
        )
    )
    device.close()
    [record] = client.registrations.query(gid, "*")
    assert record.registration_id == device.registration_id
    assert client.registrations.get(device.registration_id).assigned_hub == record.assigned_hub
    client.registrations.delete(device.registration_id, if_match=record.etag)
    client.groups.delete(gid)


def test_typed_client_admin(client: ServiceClient, tmp_path: Path, hub_peer: HubPeer) -> None:
    hub = client.hubs.put(hub_peer.linked_hub(allocation_weight=2, apply_allocation_policy=False))
    assert hub.connection_string is None and hub.allocation_weight == 2
    moved = client.hubs.modify(hub.host_name, lambda h: msgspec.structs.replace(h, location="westeurope"))
    assert moved.location == "westeurope" and moved.allocation_weight == 2
    assert hub.host_name in {h.host_name for h in client.hubs.list()}
    client.hubs.delete(hub.host_name)

    ca = root_ca()
    name = uid("typedca")
    uploaded = client.certificates.upload(name, CertificateUpload(certificate=pem(ca)))
    assert uploaded.is_verified is False
    code = client.certificates.generate_verification_code(name).verification_code
    assert code
    verified = client.certificates.verify(name, pem(pki.make_verification_cert(code, ca)))
    assert verified.is_verified is True and name in {c.name for c in client.certificates.list()}
    client.certificates.delete(name)

    pol = client.policies.put(policy(uid("typedpol"), Right.ENROLLMENT_READ))
    assert pol.primary_key and pol.rights == [Right.ENROLLMENT_READ]
    widened = client.policies.modify(
        pol.key_name, lambda p: msgspec.structs.replace(p, rights=[*(p.rights or []), Right.ENROLLMENT_WRITE])
    )
    assert (
        widened.rights == [Right.ENROLLMENT_READ, Right.ENROLLMENT_WRITE]
        and widened.primary_key == pol.primary_key
    )
    assert client.policies.get(pol.key_name).primary_key is None
    assert client.policies.get(pol.key_name, keys=True).primary_key == pol.primary_key
    client.policies.delete(pol.key_name)

    settings = client.settings.get()
    assert (
        client.settings.update(ServiceSettingsPatch(allocation_policy=settings.allocation_policy)) == settings
    )
