"""The DPS service REST API over real HTTPS on loopback, against a running `provisiond serve`."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisiond import pki
from tests._server import RunningServer
from tests._tpm_keys import software_ek

V = {"api-version": "2021-10-01"}


def uid(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def http(server: RunningServer) -> Any:
    with server.http(headers={"Authorization": server.token()}) as client:
        yield client


def sym(reg_id: str, **extra: Any) -> dict[str, Any]:
    return {"registrationId": reg_id, "attestation": {"type": "symmetricKey"}, **extra}


def assert_error(
    response: httpx.Response, status: int, code: int | None = None, words: str = ""
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) >= {"errorCode", "trackingId", "message", "timestampUtc"}
    assert body["errorCode"] // 1000 == status
    assert response.headers["x-ms-error-code"] == str(body["errorCode"])
    if code is not None:
        assert body["errorCode"] == code
    assert words.lower() in body["message"].lower(), body["message"]
    return body


# --- individual enrollments ------------------------------------------------------------------


def test_create_get_generates_keys_and_strips_them(http: httpx.Client) -> None:
    reg = uid()
    r = http.put(
        f"/enrollments/{reg}", params=V, json=sym(reg, deviceId="dev-a", initialTwin={"tags": {"a": 1}})
    )
    assert r.status_code == 200, r.text
    created = r.json()
    assert created["registrationId"] == reg
    assert created["deviceId"] == "dev-a"
    assert created["provisioningStatus"] == "enabled"
    assert created["etag"].startswith('"') and r.headers["etag"] == created["etag"]
    assert created["createdDateTimeUtc"].endswith("Z")
    assert created["initialTwin"] == {"tags": {"a": 1}}
    assert "registrationState" not in created and "iotHubHostName" not in created, "nulls are omitted"
    mech = http.post(f"/enrollments/{reg}/attestationmechanism", params=V).json()
    assert mech["type"] == "symmetricKey"
    assert len(base64.b64decode(mech["symmetricKey"]["primaryKey"])) == 64
    assert mech["symmetricKey"]["primaryKey"] != mech["symmetricKey"]["secondaryKey"]
    # DPS answers the create with the generated keys (official clients read them there) ...
    assert created["attestation"] == mech
    # ... and reads without them: no symmetricKey at all, as DPS answers.
    got = http.get(f"/enrollments/{reg.upper()}", params=V).json()
    assert got["registrationId"] == reg and got["etag"] == created["etag"]
    assert got["attestation"] == {"type": "symmetricKey"}, "secrets must be stripped from reads"


def test_etag_rules(http: httpx.Client) -> None:
    reg = uid()
    first = http.put(f"/enrollments/{reg}", params=V, json=sym(reg)).json()
    keys = http.post(f"/enrollments/{reg}/attestationmechanism", params=V).json()
    # A second create without If-Match is a conflict.
    assert_error(http.put(f"/enrollments/{reg}", params=V, json=sym(reg)), 409, 409201, "already exists")
    # Update with the etag (header) works, keeps the keys a GET stripped, and changes the etag.
    body = {**first, "provisioningStatus": "disabled"}
    second = http.put(f"/enrollments/{reg}", params=V, json=body, headers={"If-Match": first["etag"]})
    assert second.status_code == 200, second.text
    assert second.json()["provisioningStatus"] == "disabled"
    assert second.json()["etag"] != first["etag"]
    assert second.json()["createdDateTimeUtc"] == first["createdDateTimeUtc"]
    assert http.post(f"/enrollments/{reg}/attestationmechanism", params=V).json() == keys
    # A stale etag is a 412, in the header or in the body.
    assert_error(
        http.put(f"/enrollments/{reg}", params=V, json=body, headers={"If-Match": first["etag"]}), 412
    )
    assert_error(http.put(f"/enrollments/{reg}", params=V, json=body), 412)
    # If-Match: * updates whatever is there.
    assert (
        http.put(f"/enrollments/{reg}", params=V, json=sym(reg), headers={"If-Match": "*"}).status_code == 200
    )
    # Delete: stale etag 412, then the right one 204, then 404.
    current = http.get(f"/enrollments/{reg}", params=V).json()["etag"]
    assert_error(http.delete(f"/enrollments/{reg}", params=V, headers={"If-Match": first["etag"]}), 412)
    assert http.delete(f"/enrollments/{reg}", params=V, headers={"If-Match": current}).status_code == 204
    assert_error(http.get(f"/enrollments/{reg}", params=V), 404, 404201, reg)
    assert_error(http.delete(f"/enrollments/{reg}", params=V), 404)
    # Updating something that does not exist is a 412 (RFC 7232), not a silent create.
    assert_error(http.put(f"/enrollments/{reg}", params=V, json=sym(reg), headers={"If-Match": current}), 412)


def test_supplied_keys_and_key_validation(http: httpx.Client) -> None:
    reg = uid()
    key = base64.b64encode(b"k" * 32).decode()
    body = {
        "registrationId": reg,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key}},
    }
    assert http.put(f"/enrollments/{reg}", params=V, json=body).status_code == 200
    mech = http.post(f"/enrollments/{reg}/attestationmechanism", params=V).json()
    assert mech["symmetricKey"]["primaryKey"] == key and mech["symmetricKey"]["secondaryKey"]
    bad = {
        "registrationId": uid(),
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "!!"}},
    }
    assert_error(http.put(f"/enrollments/{bad['registrationId']}", params=V, json=bad), 400, 400004, "base64")


def test_x509_individual_enrollment_reports_certificate_info(http: httpx.Client) -> None:
    reg = uid("x509")
    device = pki.make_device_cert(reg)
    pem = pki.certificate_pem(device.cert).decode()
    body = {
        "registrationId": reg,
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": pem}}}},
    }
    created = http.put(f"/enrollments/{reg}", params=V, json=body).json()
    info = created["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
    assert info["subjectName"] == f"CN={reg}"
    assert len(info["sha1Thumbprint"]) == 40 and len(info["sha256Thumbprint"]) == 64
    assert "certificate" not in created["attestation"]["x509"]["clientCertificates"]["primary"]
    # Read-modify-write without the PEM keeps the certificate.
    again = http.put(f"/enrollments/{reg}", params=V, json=created, headers={"If-Match": created["etag"]})
    assert again.status_code == 200, again.text
    mech = http.post(f"/enrollments/{reg}/attestationmechanism", params=V).json()
    assert "BEGIN CERTIFICATE" in mech["x509"]["clientCertificates"]["primary"]["certificate"]
    junk = {
        "registrationId": reg,
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": "nope"}}}},
    }
    assert_error(http.put(f"/enrollments/{uid()}", params=V, json={**junk, "registrationId": "zz"}), 400)


def test_tpm_enrollment_and_group_tpm_refused(http: httpx.Client) -> None:
    reg = uid("tpm")
    ek = software_ek()
    body = {"registrationId": reg, "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}}
    assert (
        http.put(f"/enrollments/{reg}", params=V, json=body).json()["attestation"]["tpm"]["endorsementKey"]
        == ek
    )
    gid = uid("g")
    group = {"enrollmentGroupId": gid, "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}}
    assert_error(http.put(f"/enrollmentGroups/{gid}", params=V, json=group), 400, 400004, "TPM")


# --- validation: every bad input is a 400 and writes nothing ----------------------------------


@pytest.mark.parametrize(
    ("body", "words"),
    [
        pytest.param(b"{not json", "not valid JSON", id="malformed-json"),
        pytest.param(b"", "empty", id="empty-body"),
        pytest.param(
            b'{"registrationId": 5, "attestation": {"type": "symmetricKey"}}',
            "registrationId",
            id="wrong-type",
        ),
        pytest.param(
            b'{"registrationId": "REG", "attestation": {"type": "rsa"}}', "attestation.type", id="bad-enum"
        ),
        pytest.param(b'{"registrationId": "REG"}', "attestation", id="missing-attestation"),
        pytest.param(
            b'{"registrationId": "REG", "attestation": {"type": "symmetricKey"}, "capabilities": {"iotEdge": "yes"}}',
            "iotEdge",
            id="nested-wrong-type",
        ),
        pytest.param(
            b'{"registrationId": "other", "attestation": {"type": "symmetricKey"}}',
            "differs",
            id="id-mismatch",
        ),
        pytest.param(
            b'{"registrationId": "REG", "attestation": {"type": "symmetricKey"}, "iotHubs": ["nohub.example.net"]}',
            "not linked",
            id="unlinked-hub",
        ),
        pytest.param(
            b'{"registrationId": "REG", "attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom"}',
            "CustomAllocationDefinition",
            id="custom-without-webhook",
        ),
    ],
)
def test_bad_bodies_are_400_and_write_nothing(http: httpx.Client, body: bytes, words: str) -> None:
    reg = uid()
    payload = body.replace(b"REG", reg.encode())
    r = http.put(
        f"/enrollments/{reg}", params=V, content=payload, headers={"Content-Type": "application/json"}
    )
    assert_error(r, 400, words=words)
    assert http.get(f"/enrollments/{reg}", params=V).status_code == 404


@pytest.mark.parametrize("bad_id", ["-leading", "trailing.", "has space", "x" * 129, "semi;colon"])
def test_invalid_ids(http: httpx.Client, bad_id: str) -> None:
    r = http.put(f"/enrollments/{bad_id}", params=V, json=sym(bad_id))
    assert_error(r, 400, 400005, "Invalid registrationId")


def test_oversized_body_is_refused(http: httpx.Client) -> None:
    reg = uid()
    body = sym(reg, initialTwin={"tags": {"blob": "x" * (100 * 1024)}})
    assert_error(http.put(f"/enrollments/{reg}", params=V, json=body), 400, 400007, "limit")
    assert http.get(f"/enrollments/{reg}", params=V).status_code == 404


def test_api_version_rules(http: httpx.Client) -> None:
    reg = uid()
    assert_error(http.get(f"/enrollments/{reg}"), 400, 400001, "api-version")
    assert_error(http.get(f"/enrollments/{reg}", params={"api-version": "2017-11-15"}), 400, 400001)
    assert_error(http.get(f"/enrollments/{reg}", params={"api-version": "banana"}), 400, 400001)
    for version in ("2018-09-01-preview", "2019-03-31", "2021-10-01", "2025-07-01-preview"):
        assert http.get(f"/enrollments/{reg}", params={"api-version": version}).status_code == 404


def test_unknown_path_and_method(http: httpx.Client) -> None:
    assert_error(http.get("/nothing/here", params=V), 404)
    assert_error(http.patch(f"/enrollments/{uid()}", params=V, json={}), 405)


# --- query and paging ------------------------------------------------------------------------


def test_query_filters_and_pages(http: httpx.Client) -> None:
    tag = uuid.uuid4().hex[:8]
    for i in range(7):
        reg = f"q-{tag}-{i}"
        status = "disabled" if i % 2 else "enabled"
        assert (
            http.put(
                f"/enrollments/{reg}",
                params=V,
                json=sym(reg, provisioningStatus=status, deviceId=f"d-{tag}-{i}"),
            ).status_code
            == 200
        )
    q = f"SELECT * FROM enrollments WHERE deviceId = 'd-{tag}-3'"
    found = http.post("/enrollments/query", params=V, json={"query": q}).json()
    assert [e["registrationId"] for e in found] == [f"q-{tag}-3"]
    q = f"select * from enrollments where deviceId = 'd-{tag}-3' and provisioningStatus = 'Disabled'"
    assert len(http.post("/enrollments/query", params=V, json={"query": q}).json()) == 1
    q = f"SELECT * FROM enrollments WHERE deviceId = 'd-{tag}-3' AND provisioningStatus = 'enabled'"
    assert http.post("/enrollments/query", params=V, json={"query": q}).json() == []
    # Paging over every disabled enrollment with this tag's device ids: page size 2, no duplicates.
    seen: list[str] = []
    continuation = None
    pages = 0
    while True:
        headers = {"x-ms-max-item-count": "2"}
        if continuation:
            headers["x-ms-continuation"] = continuation
        r = http.post(
            "/enrollments/query",
            params=V,
            json={"query": "SELECT * FROM enrollments WHERE provisioningStatus = 'disabled'"},
            headers=headers,
        )
        assert r.status_code == 200 and r.headers["x-ms-item-type"] == "Enrollment"
        assert len(r.json()) <= 2
        seen += [e["registrationId"] for e in r.json()]
        pages += 1
        continuation = r.headers.get("x-ms-continuation")
        if not continuation:
            break
    assert len(seen) == len(set(seen))
    assert {f"q-{tag}-{i}" for i in (1, 3, 5)} <= set(seen)
    assert pages >= 2


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("DELETE FROM enrollments", "Unsupported query"),
        ("SELECT * FROM enrollments WHERE secretKey = 'x'", "Cannot filter on"),
        ("SELECT * FROM enrollments WHERE deviceId > 'x'", "WHERE clause"),
    ],
)
def test_bad_queries(http: httpx.Client, query: str, words: str) -> None:
    assert_error(http.post("/enrollments/query", params=V, json={"query": query}), 400, 400008, words)


def test_bad_continuation_token(http: httpx.Client) -> None:
    r = http.post(
        "/enrollments/query",
        params=V,
        json={"query": "SELECT * FROM enrollments"},
        headers={"x-ms-continuation": "%%%garbage"},
    )
    assert_error(r, 400)


# --- bulk ------------------------------------------------------------------------------------


def test_bulk_modes(http: httpx.Client) -> None:
    ids = [uid("b") for _ in range(4)]
    r = http.post("/enrollments", params=V, json={"mode": "create", "enrollments": [sym(i) for i in ids]})
    assert r.json() == {"isSuccessful": True, "errors": []}
    # create again: every item conflicts, the batch reports each one.
    r = http.post(
        "/enrollments", params=V, json={"mode": "create", "enrollments": [sym(ids[0]), sym(uid("b"))]}
    ).json()
    assert r["isSuccessful"] is False
    assert [(e["registrationId"], e["errorCode"] // 1000) for e in r["errors"]] == [(ids[0], 409)]
    # update (upsert) changes them without etags
    r = http.post(
        "/enrollments",
        params=V,
        json={"mode": "update", "enrollments": [sym(i, provisioningStatus="disabled") for i in ids]},
    )
    assert r.json()["isSuccessful"] is True
    assert http.get(f"/enrollments/{ids[1]}", params=V).json()["provisioningStatus"] == "disabled"
    # updateIfMatchETag: a stale etag fails only that item
    current = http.get(f"/enrollments/{ids[2]}", params=V).json()["etag"]
    items = [sym(ids[2], etag=current), sym(ids[3], etag='"stale"')]
    r = http.post("/enrollments", params=V, json={"mode": "updateIfMatchETag", "enrollments": items}).json()
    assert [(e["registrationId"], e["errorCode"] // 1000) for e in r["errors"]] == [(ids[3], 412)]
    # an invalid item is reported and the valid ones still go in
    bad = sym("bad id!")
    new = uid("b")
    r = http.post("/enrollments", params=V, json={"mode": "create", "enrollments": [bad, sym(new)]}).json()
    assert [e["registrationId"] for e in r["errors"]] == ["bad id!"]
    assert http.get(f"/enrollments/{new}", params=V).status_code == 200
    # delete
    r = http.post("/enrollments", params=V, json={"mode": "delete", "enrollments": [sym(i) for i in ids]})
    assert r.json()["isSuccessful"] is True
    assert http.get(f"/enrollments/{ids[0]}", params=V).status_code == 404


# --- enrollment groups -----------------------------------------------------------------------


def test_group_lifecycle(http: httpx.Client) -> None:
    gid = uid("grp")
    body = {
        "enrollmentGroupId": gid,
        "attestation": {"type": "symmetricKey"},
        "reprovisionPolicy": {"updateHubAssignment": False, "migrateDeviceData": False},
    }
    created = http.put(f"/enrollmentGroups/{gid}", params=V, json=body).json()
    assert created["enrollmentGroupId"] == gid and created["reprovisionPolicy"] == {
        "updateHubAssignment": False,
        "migrateDeviceData": False,
    }
    assert_error(
        http.put(
            f"/enrollmentGroups/{gid.upper()}", params=V, json={**body, "enrollmentGroupId": gid.upper()}
        ),
        409,
    )
    assert http.post(f"/enrollmentGroups/{gid}/attestationmechanism", params=V).json()["symmetricKey"][
        "primaryKey"
    ]
    found = http.post(
        "/enrollmentGroups/query",
        params=V,
        json={"query": f"SELECT * FROM enrollmentGroups WHERE enrollmentGroupId = '{gid}'"},
    )
    assert [g["enrollmentGroupId"] for g in found.json()] == [gid]
    assert found.headers["x-ms-item-type"] == "EnrollmentGroup"
    r = http.post(
        "/enrollmentGroups",
        params=V,
        json={"mode": "create", "enrollmentGroups": [{**body, "enrollmentGroupId": uid("grp")}]},
    )
    assert r.json()["isSuccessful"] is True
    assert http.delete(f"/enrollmentGroups/{gid}", params=V).status_code == 204
    assert_error(http.get(f"/enrollmentGroups/{gid}", params=V), 404, 404203)


def test_x509_group_with_ca_reference_and_signing_certificate(http: httpx.Client) -> None:
    root = pki.make_root_ca("Test Root " + uid())
    gid = uid("xg")
    pem = pki.certificate_pem(root.cert).decode()
    body = {
        "enrollmentGroupId": gid,
        "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": pem}}}},
    }
    created = http.put(f"/enrollmentGroups/{gid}", params=V, json=body).json()
    assert created["attestation"]["x509"]["signingCertificates"]["primary"]["info"]["subjectName"].startswith(
        "CN=Test Root"
    )
    gid2 = uid("xg")
    ref = {
        "enrollmentGroupId": gid2,
        "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "myca"}}},
    }
    assert http.put(f"/enrollmentGroups/{gid2}", params=V, json=ref).json()["attestation"]["x509"][
        "caReferences"
    ] == {"primary": "myca"}
    wrong = {
        "enrollmentGroupId": gid2,
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": pem}}}},
    }
    assert_error(
        http.put(f"/enrollmentGroups/{uid()}", params=V, json={**wrong, "enrollmentGroupId": "zz"}), 400
    )


# --- registration records --------------------------------------------------------------------


def test_registration_records_missing(http: httpx.Client) -> None:
    assert_error(http.get(f"/registrations/{uid()}", params=V), 404, 404202)
    assert_error(http.delete(f"/registrations/{uid()}", params=V), 404, 404202)
    assert_error(http.post(f"/registrations/{uid()}/query", params=V), 404, 404203)


# --- authentication --------------------------------------------------------------------------


def test_service_sas_auth_failures(server: RunningServer) -> None:
    reg = uid()
    with server.http() as anon:
        assert_error(anon.get(f"/enrollments/{reg}", params=V), 401, 401000, "missing")
        assert_error(
            anon.get(f"/enrollments/{reg}", params=V, headers={"Authorization": "Bearer x"}),
            401,
            words="SharedAccessSignature",
        )
        expired = server.token(ttl=-3600)
        assert_error(
            anon.get(f"/enrollments/{reg}", params=V, headers={"Authorization": expired}),
            401,
            401003,
            "expired",
        )
        forged = server.token(key=base64.b64encode(b"f" * 32).decode())
        assert_error(
            anon.get(f"/enrollments/{reg}", params=V, headers={"Authorization": forged}),
            401,
            401002,
            "signature",
        )
        unknown = server.token(key_name="nobody")
        assert_error(
            anon.get(f"/enrollments/{reg}", params=V, headers={"Authorization": unknown}),
            401,
            401005,
            "nobody",
        )
        import time

        from provisiond.protocol.sas import build_sas_token

        cs_key = server.connection_string.split("SharedAccessKey=", 1)[1]
        other = build_sas_token(
            "other.example.net", cs_key, int(time.time()) + 600, key_name="provisioningserviceowner"
        )
        assert_error(
            anon.get(f"/enrollments/{reg}", params=V, headers={"Authorization": other}),
            401,
            401004,
            "not this service",
        )


def test_rights_are_enforced_per_operation(server: RunningServer, http: httpx.Client) -> None:
    name = uid("reader")
    r = http.put(
        f"/admin/sharedAccessPolicies/{name}", params=V, json={"keyName": name, "rights": ["EnrollmentRead"]}
    )
    assert r.status_code == 200, r.text
    key = r.json()["primaryKey"]
    reader = server.token(key_name=name, key=key)
    reg = uid()
    with server.http(headers={"Authorization": reader}) as c:
        assert c.get(f"/enrollments/{reg}", params=V).status_code == 404  # authorized, just missing
        assert_error(c.put(f"/enrollments/{reg}", params=V, json=sym(reg)), 403, 403001, "EnrollmentWrite")
        assert_error(c.get(f"/registrations/{reg}", params=V), 403, words="RegistrationStatusRead")
        assert_error(c.get("/admin/settings", params=V), 403, words="ServiceConfig")
    # The reader could not write: nothing was created.
    assert http.get(f"/enrollments/{reg}", params=V).status_code == 404


# --- admin API -------------------------------------------------------------------------------


def test_linked_hubs(http: httpx.Client) -> None:
    hubs = http.get("/admin/linkedHubs", params=V).json()
    builtin = [h for h in hubs if h.get("builtin")]
    assert len(builtin) == 1 and builtin[0]["applyAllocationPolicy"] is True
    host = f"{uid('hub')}.azure-devices.net"
    cs = f"HostName={host};SharedAccessKeyName=iothubowner;SharedAccessKey={base64.b64encode(b'k' * 32).decode()}"
    assert_error(
        http.put(f"/admin/linkedHubs/{host}", params=V, json={"hostName": host}),
        400,
        words="connectionString",
    )
    created = http.put(
        f"/admin/linkedHubs/{host}",
        params=V,
        json={"hostName": host, "connectionString": cs, "allocationWeight": 5},
    ).json()
    assert created["allocationWeight"] == 5 and "connectionString" not in created
    assert_error(
        http.put(
            f"/admin/linkedHubs/{host}",
            params=V,
            json={"hostName": host, "allocationWeight": 5000},
            headers={"If-Match": "*"},
        ),
        400,
        words="allocationWeight",
    )
    # Enrollments can now name it.
    reg = uid()
    assert (
        http.put(
            f"/enrollments/{reg}", params=V, json=sym(reg, iotHubs=[host], allocationPolicy="static")
        ).status_code
        == 200
    )
    assert_error(http.delete(f"/admin/linkedHubs/{builtin[0]['hostName']}", params=V), 400, words="built-in")
    assert http.delete(f"/admin/linkedHubs/{host}", params=V).status_code == 204


def test_ca_certificate_proof_of_possession(http: httpx.Client) -> None:
    ca = pki.make_root_ca("PoP Root " + uid())
    name = uid("ca")
    pem = pki.certificate_pem(ca.cert).decode()
    created = http.put(f"/admin/certificates/{name}", params=V, json={"certificate": pem}).json()
    assert created["isVerified"] is False and created["subject"].startswith("CN=PoP Root")
    assert_error(
        http.post(f"/admin/certificates/{name}/verify", params=V, json={"certificate": pem}),
        400,
        words="generateVerificationCode",
    )
    code = http.post(f"/admin/certificates/{name}/generateVerificationCode", params=V).json()[
        "verificationCode"
    ]
    # A certificate with the right CN signed by another CA is refused; so is the wrong CN.
    impostor = pki.make_verification_cert(code, pki.make_root_ca("Impostor"))
    assert_error(
        http.post(
            f"/admin/certificates/{name}/verify",
            params=V,
            json={"certificate": pki.certificate_pem(impostor.cert).decode()},
        ),
        400,
        400012,
        "not signed",
    )
    wrong_cn = pki.make_verification_cert("WRONG", ca)
    assert_error(
        http.post(
            f"/admin/certificates/{name}/verify",
            params=V,
            json={"certificate": pki.certificate_pem(wrong_cn.cert).decode()},
        ),
        400,
        400011,
        "verification code",
    )
    assert http.get(f"/admin/certificates/{name}", params=V).json()["isVerified"] is False
    proof = pki.make_verification_cert(code, ca)
    verified = http.post(
        f"/admin/certificates/{name}/verify",
        params=V,
        json={"certificate": pki.certificate_pem(proof.cert).decode()},
    )
    assert verified.status_code == 200, verified.text
    assert verified.json()["isVerified"] is True
    leaf = pki.make_device_cert("not-a-ca", ca)
    assert_error(
        http.put(
            f"/admin/certificates/{uid('ca')}",
            params=V,
            json={"certificate": pki.certificate_pem(leaf.cert).decode()},
        ),
        400,
        words="not a CA",
    )


def test_policies_cannot_lock_everyone_out(http: httpx.Client) -> None:
    policies = http.get("/admin/sharedAccessPolicies", params=V).json()
    assert all("primaryKey" not in p for p in policies)
    assert "provisioningserviceowner" in {p["keyName"] for p in policies}
    keys = http.post("/admin/sharedAccessPolicies/provisioningserviceowner/listKeys", params=V).json()
    assert keys["primaryKey"] and set(keys["rights"]) == {
        "ServiceConfig",
        "EnrollmentRead",
        "EnrollmentWrite",
        "RegistrationStatusRead",
        "RegistrationStatusWrite",
    }
    others = [
        p for p in policies if "ServiceConfig" in p["rights"] and p["keyName"] != "provisioningserviceowner"
    ]
    if not others:
        assert_error(
            http.delete("/admin/sharedAccessPolicies/provisioningserviceowner", params=V),
            409,
            words="no policy",
        )


def test_settings(http: httpx.Client, server: RunningServer) -> None:
    settings = http.get("/admin/settings", params=V).json()
    assert settings["idScope"] == server.id_scope and settings["allocationPolicy"] == "hashed"
    assert_error(http.patch("/admin/settings", params=V, json={"idScope": "bad"}), 400, words="ID scope")
    assert_error(
        http.patch("/admin/settings", params=V, json={"allocationPolicy": "custom"}), 400, words="custom"
    )
    assert (
        http.patch("/admin/settings", params=V, json={"allocationPolicy": "hashed"}).json()[
            "allocationPolicy"
        ]
        == "hashed"
    )


def test_connection_json_has_the_stable_keys(server: RunningServer) -> None:
    assert set(server.info) >= {"idScope", "host", "httpsPort", "serviceConnectionString", "caCertificate"}
    assert server.info["serviceConnectionString"].startswith(
        f"HostName=localhost:{server.port};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey="
    )
    assert "BEGIN CERTIFICATE" in Path(server.ca_file).read_text()
