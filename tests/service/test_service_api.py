"""The DPS service REST API in-process (``create_app`` through an ASGI transport), over both
storage backends: every operation, its etag rules, validation, query and paging, bulk, and
the service SAS authentication. What the SDKs see over real TLS is in test_service_api_tls.py.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import httpx
import pytest

from provisiond import pki
from provisiond.errors import DpsCode
from provisiond.models import AllocationPolicy, Right
from provisiond.protocol.sas import build_sas_token
from tests._inprocess import SERVICE_API as V
from tests._inprocess import InProcess
from tests._tpm_keys import software_ek
from tests.factories import (
    body,
    key,
    linked_hub,
    pem,
    policy,
    symmetric_enrollment,
    symmetric_group,
    tpm_enrollment,
    uid,
    x509_enrollment,
    x509_group,
)

__all__ = ["V", "assert_error", "sym", "uid"]


def sym(reg_id: str, **extra: Any) -> dict[str, Any]:
    """The JSON of a symmetric key individual enrollment, with ``extra`` (camelCase) fields."""
    doc: dict[str, Any] = body(symmetric_enrollment(reg_id))
    return {**doc, **extra}


def assert_error(
    response: httpx.Response, status: int, code: int | None = None, words: str = ""
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    data: dict[str, Any] = response.json()
    assert set(data) >= {"errorCode", "trackingId", "message", "timestampUtc"}
    assert data["errorCode"] // 1000 == status
    assert response.headers["x-ms-error-code"] == str(data["errorCode"])
    if code is not None:
        assert data["errorCode"] == code
    assert words.lower() in data["message"].lower(), data["message"]
    return data


@pytest.fixture
def http(service: InProcess) -> httpx.AsyncClient:
    return service.http


# --- individual enrollments ------------------------------------------------------------------


async def test_create_get_generates_keys_and_strips_them(http: httpx.AsyncClient) -> None:
    reg = uid()
    r = await http.put(
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
    mech = (await http.post(f"/enrollments/{reg}/attestationmechanism", params=V)).json()
    assert mech["type"] == "symmetricKey"
    assert len(base64.b64decode(mech["symmetricKey"]["primaryKey"])) == 64
    assert mech["symmetricKey"]["primaryKey"] != mech["symmetricKey"]["secondaryKey"]
    # DPS answers the create with the generated keys (official clients read them there) ...
    assert created["attestation"] == mech
    # ... and reads without them: no symmetricKey at all, as DPS answers.
    got = (await http.get(f"/enrollments/{reg.upper()}", params=V)).json()
    assert got["registrationId"] == reg and got["etag"] == created["etag"]
    assert got["attestation"] == {"type": "symmetricKey"}, "secrets must be stripped from reads"


async def test_etag_rules(http: httpx.AsyncClient) -> None:
    reg = uid()
    first = (await http.put(f"/enrollments/{reg}", params=V, json=sym(reg))).json()
    keys = (await http.post(f"/enrollments/{reg}/attestationmechanism", params=V)).json()
    # A second create without If-Match is a conflict.
    assert_error(
        await http.put(f"/enrollments/{reg}", params=V, json=sym(reg)),
        409,
        DpsCode.ENROLLMENT_EXISTS,
        "already exists",
    )
    # Update with the etag (header) works, keeps the keys a GET stripped, and changes the etag.
    changed = {**first, "provisioningStatus": "disabled"}
    second = await http.put(
        f"/enrollments/{reg}", params=V, json=changed, headers={"If-Match": first["etag"]}
    )
    assert second.status_code == 200, second.text
    assert second.json()["provisioningStatus"] == "disabled"
    assert second.json()["etag"] != first["etag"]
    assert second.json()["createdDateTimeUtc"] == first["createdDateTimeUtc"]
    assert (await http.post(f"/enrollments/{reg}/attestationmechanism", params=V)).json() == keys
    # A stale etag is a 412, in the header or in the body.
    stale = {"If-Match": first["etag"]}
    assert_error(await http.put(f"/enrollments/{reg}", params=V, json=changed, headers=stale), 412)
    assert_error(await http.put(f"/enrollments/{reg}", params=V, json=changed), 412)
    # If-Match: * updates whatever is there.
    star = await http.put(f"/enrollments/{reg}", params=V, json=sym(reg), headers={"If-Match": "*"})
    assert star.status_code == 200
    # Delete: stale etag 412, then the right one 204, then 404.
    current = (await http.get(f"/enrollments/{reg}", params=V)).json()["etag"]
    assert_error(await http.delete(f"/enrollments/{reg}", params=V, headers=stale), 412)
    assert (
        await http.delete(f"/enrollments/{reg}", params=V, headers={"If-Match": current})
    ).status_code == 204
    assert_error(await http.get(f"/enrollments/{reg}", params=V), 404, DpsCode.ENROLLMENT_NOT_FOUND, reg)
    assert_error(await http.delete(f"/enrollments/{reg}", params=V), 404)
    # Updating something that does not exist is a 412 (RFC 7232), not a silent create.
    assert_error(
        await http.put(f"/enrollments/{reg}", params=V, json=sym(reg), headers={"If-Match": current}), 412
    )


async def test_supplied_keys_and_key_validation(http: httpx.AsyncClient) -> None:
    reg = uid()
    given = key()
    enrollment = symmetric_enrollment(reg, primary_key=given)
    assert (await http.put(f"/enrollments/{reg}", params=V, json=body(enrollment))).status_code == 200
    mech = (await http.post(f"/enrollments/{reg}/attestationmechanism", params=V)).json()
    assert mech["symmetricKey"]["primaryKey"] == given and mech["symmetricKey"]["secondaryKey"]
    bad = symmetric_enrollment(primary_key="!!")
    assert_error(
        await http.put(f"/enrollments/{bad.registration_id}", params=V, json=body(bad)),
        400,
        DpsCode.INVALID_BODY,
        "base64",
    )


async def test_x509_individual_enrollment_reports_certificate_info(http: httpx.AsyncClient) -> None:
    reg = uid("x509")
    enrollment = x509_enrollment(reg, pki.make_device_cert(reg))
    created = (await http.put(f"/enrollments/{reg}", params=V, json=body(enrollment))).json()
    info = created["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
    assert info["subjectName"] == f"CN={reg}"
    assert len(info["sha1Thumbprint"]) == 40 and len(info["sha256Thumbprint"]) == 64
    assert "certificate" not in created["attestation"]["x509"]["clientCertificates"]["primary"]
    # Read-modify-write without the PEM keeps the certificate.
    again = await http.put(
        f"/enrollments/{reg}", params=V, json=created, headers={"If-Match": created["etag"]}
    )
    assert again.status_code == 200, again.text
    mech = (await http.post(f"/enrollments/{reg}/attestationmechanism", params=V)).json()
    assert "BEGIN CERTIFICATE" in mech["x509"]["clientCertificates"]["primary"]["certificate"]
    junk = body(x509_enrollment("zz", "nope"))
    assert_error(await http.put(f"/enrollments/{uid()}", params=V, json=junk), 400)


async def test_tpm_enrollment_and_group_tpm_refused(http: httpx.AsyncClient) -> None:
    reg = uid("tpm")
    ek = software_ek()
    created = await http.put(f"/enrollments/{reg}", params=V, json=body(tpm_enrollment(reg, ek)))
    assert created.json()["attestation"]["tpm"]["endorsementKey"] == ek
    gid = uid("g")
    group = {"enrollmentGroupId": gid, "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}}
    assert_error(
        await http.put(f"/enrollmentGroups/{gid}", params=V, json=group), 400, DpsCode.INVALID_BODY, "TPM"
    )


# --- validation: every bad input is a 400 and writes nothing ----------------------------------


@pytest.mark.parametrize(
    ("payload", "words"),
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
async def test_bad_bodies_are_400_and_write_nothing(
    http: httpx.AsyncClient, payload: bytes, words: str
) -> None:
    reg = uid()
    r = await http.put(
        f"/enrollments/{reg}",
        params=V,
        content=payload.replace(b"REG", reg.encode()),
        headers={"Content-Type": "application/json"},
    )
    assert_error(r, 400, words=words)
    assert (await http.get(f"/enrollments/{reg}", params=V)).status_code == 404


@pytest.mark.parametrize("bad_id", ["-leading", "trailing.", "has space", "x" * 129, "semi;colon"])
async def test_invalid_ids(http: httpx.AsyncClient, bad_id: str) -> None:
    r = await http.put(f"/enrollments/{bad_id}", params=V, json=sym(bad_id))
    assert_error(r, 400, DpsCode.INVALID_ID, "Invalid registrationId")


async def test_oversized_body_is_refused(http: httpx.AsyncClient) -> None:
    reg = uid()
    oversized = sym(reg, initialTwin={"tags": {"blob": "x" * (100 * 1024)}})
    assert_error(
        await http.put(f"/enrollments/{reg}", params=V, json=oversized), 400, DpsCode.BODY_TOO_LARGE, "limit"
    )
    assert (await http.get(f"/enrollments/{reg}", params=V)).status_code == 404


async def test_api_version_rules(http: httpx.AsyncClient) -> None:
    reg = uid()
    assert_error(await http.get(f"/enrollments/{reg}"), 400, DpsCode.API_VERSION, "api-version")
    assert_error(await http.get(f"/enrollments/{reg}", params={"api-version": "2017-11-15"}), 400, 400001)
    assert_error(await http.get(f"/enrollments/{reg}", params={"api-version": "banana"}), 400, 400001)
    for version in ("2018-09-01-preview", "2019-03-31", "2021-10-01", "2025-07-01-preview"):
        assert (await http.get(f"/enrollments/{reg}", params={"api-version": version})).status_code == 404


async def test_unknown_path_and_method(http: httpx.AsyncClient) -> None:
    assert_error(await http.get("/nothing/here", params=V), 404)
    assert_error(await http.patch(f"/enrollments/{uid()}", params=V, json={}), 405)


# --- query and paging ------------------------------------------------------------------------


async def test_query_filters_and_pages(http: httpx.AsyncClient) -> None:
    tag = uuid.uuid4().hex[:8]
    for i in range(7):
        reg = f"q-{tag}-{i}"
        status = "disabled" if i % 2 else "enabled"
        r = await http.put(
            f"/enrollments/{reg}", params=V, json=sym(reg, provisioningStatus=status, deviceId=f"d-{tag}-{i}")
        )
        assert r.status_code == 200
    q = f"SELECT * FROM enrollments WHERE deviceId = 'd-{tag}-3'"
    found = (await http.post("/enrollments/query", params=V, json={"query": q})).json()
    assert [e["registrationId"] for e in found] == [f"q-{tag}-3"]
    q = f"select * from enrollments where deviceId = 'd-{tag}-3' and provisioningStatus = 'Disabled'"
    assert len((await http.post("/enrollments/query", params=V, json={"query": q})).json()) == 1
    q = f"SELECT * FROM enrollments WHERE deviceId = 'd-{tag}-3' AND provisioningStatus = 'enabled'"
    assert (await http.post("/enrollments/query", params=V, json={"query": q})).json() == []
    # Contradicting conditions match nothing (and say the page size).
    q = f"SELECT * FROM enrollments WHERE deviceId = 'd-{tag}-3' AND deviceId = 'd-{tag}-4'"
    none = await http.post("/enrollments/query", params=V, json={"query": q})
    assert none.json() == [] and none.headers["x-ms-max-item-count"] == "100"
    # Paging over every disabled enrollment: page size 2, no duplicates.
    seen: list[str] = []
    continuation = None
    pages = 0
    while True:
        headers = {"x-ms-max-item-count": "2"}
        if continuation:
            headers["x-ms-continuation"] = continuation
        r = await http.post(
            "/enrollments/query",
            params=V,
            json={"query": "SELECT * FROM enrollments WHERE provisioningStatus = 'disabled'"},
            headers=headers,
        )
        assert r.status_code == 200 and r.headers["x-ms-item-type"] == "Enrollment"
        assert r.headers["x-ms-max-item-count"] == "2" and len(r.json()) <= 2
        seen += [e["registrationId"] for e in r.json()]
        pages += 1
        continuation = r.headers.get("x-ms-continuation")
        if not continuation:
            break
    assert len(seen) == len(set(seen))
    assert {f"q-{tag}-{i}" for i in (1, 3, 5)} == set(seen)
    assert pages >= 2


@pytest.mark.parametrize(
    ("header", "applied"), [("0", "100"), ("-5", "100"), ("", "100"), ("20000", "10000")]
)
async def test_page_size_is_bounded(http: httpx.AsyncClient, header: str, applied: str) -> None:
    r = await http.post(
        "/enrollments/query", params=V, json={"query": "*"}, headers={"x-ms-max-item-count": header}
    )
    assert r.status_code == 200 and r.headers["x-ms-max-item-count"] == applied
    assert_error(
        await http.post(
            "/enrollments/query", params=V, json={"query": "*"}, headers={"x-ms-max-item-count": "ten"}
        ),
        400,
        DpsCode.BAD_REQUEST,
        "not an integer",
    )


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("DELETE FROM enrollments", "Unsupported query"),
        ("SELECT * FROM enrollments WHERE secretKey = 'x'", "Cannot filter on"),
        ("SELECT * FROM enrollments WHERE deviceId > 'x'", "WHERE clause"),
        ("", "Unsupported query"),
        # blanks the WHERE clause's pattern backtracked over quadratically (8 s of CPU for 2,000)
        ("SELECT * FROM enrollments WHERE a" + " " * 2000 + "=", "WHERE clause"),
        ("SELECT * FROM enrollments WHERE a = " + " " * 2000 + "x", "WHERE clause"),
    ],
)
async def test_bad_queries(http: httpx.AsyncClient, query: str, words: str) -> None:
    r = await http.post("/enrollments/query", params=V, json={"query": query})
    assert_error(r, 400, DpsCode.INVALID_QUERY, words)


async def test_empty_query_body_means_every_record(http: httpx.AsyncClient) -> None:
    reg = uid("all")
    await http.put(f"/enrollments/{reg}", params=V, json=sym(reg))
    r = await http.post("/enrollments/query", params=V)
    assert r.status_code == 200 and [e["registrationId"] for e in r.json()] == [reg]


async def test_bad_continuation_token(http: httpx.AsyncClient) -> None:
    r = await http.post(
        "/enrollments/query",
        params=V,
        json={"query": "SELECT * FROM enrollments"},
        headers={"x-ms-continuation": "%%%garbage"},
    )
    assert_error(r, 400)


async def test_a_read_only_registration_state_in_a_body_is_ignored(http: httpx.AsyncClient) -> None:
    """DPS's specification marks ``registrationState`` read-only and its examples send ``{}``:
    whatever a client puts there is dropped, on a PUT and in a bulk call."""
    for state in ({}, {"registrationId": "someone", "status": "someNewStatus", "errorCode": "x"}):
        reg = uid("rostate")
        r = await http.put(f"/enrollments/{reg}", params=V, json=sym(reg, registrationState=state))
        assert r.status_code == 200, r.text
        assert "registrationState" not in r.json()
        bulk = {"mode": "update", "enrollments": [sym(reg, registrationState=state)]}
        assert (await http.post("/enrollments", params=V, json=bulk)).json()["isSuccessful"] is True
        assert "registrationState" not in (await http.get(f"/enrollments/{reg}", params=V)).json()


async def test_device_ids_follow_iot_hubs_rule(service: InProcess) -> None:
    """An enrollment's deviceId may use every character IoT Hub allows in a device id (wider
    than DPS's registration ids), and the device is created in the hub under it."""
    http = service.http
    reg, device_id = uid("devid"), f"plant+3@line#4(a)=x$'{uuid.uuid4().hex[:6]}"
    created = await http.put(f"/enrollments/{reg}", params=V, json=sym(reg, deviceId=device_id))
    assert created.status_code == 200 and created.json()["deviceId"] == device_id, created.text
    state = await service.register(reg, created.json()["attestation"]["symmetricKey"]["primaryKey"])
    assert state["deviceId"] == device_id
    hub = state["assignedHub"]
    identity = await http.get(f"/admin/linkedHubs/{hub}/devices", params=V)
    assert device_id in {d["deviceId"] for d in identity.json()}, identity.text
    for bad in ("with/slash", "with space", "x" * 129, "é"):
        other = uid("devid")
        r = await http.put(f"/enrollments/{other}", params=V, json=sym(other, deviceId=bad))
        assert_error(r, 400, DpsCode.INVALID_ID, "Invalid deviceId")


# --- bulk ------------------------------------------------------------------------------------


async def test_bulk_modes(http: httpx.AsyncClient) -> None:
    ids = [uid("b") for _ in range(4)]
    r = await http.post(
        "/enrollments", params=V, json={"mode": "create", "enrollments": [sym(i) for i in ids]}
    )
    assert r.json() == {"isSuccessful": True, "errors": []}
    # create again: every item conflicts, the batch reports each one.
    again = {"mode": "create", "enrollments": [sym(ids[0]), sym(uid("b"))]}
    r = (await http.post("/enrollments", params=V, json=again)).json()
    assert r["isSuccessful"] is False
    assert [(e["registrationId"], e["errorCode"] // 1000) for e in r["errors"]] == [(ids[0], 409)]
    # update (upsert) changes them without etags
    update = {"mode": "update", "enrollments": [sym(i, provisioningStatus="disabled") for i in ids]}
    assert (await http.post("/enrollments", params=V, json=update)).json()["isSuccessful"] is True
    assert (await http.get(f"/enrollments/{ids[1]}", params=V)).json()["provisioningStatus"] == "disabled"
    # updateIfMatchETag: a stale etag fails only that item
    current = (await http.get(f"/enrollments/{ids[2]}", params=V)).json()["etag"]
    items = [sym(ids[2], etag=current), sym(ids[3], etag='"stale"')]
    r = (
        await http.post("/enrollments", params=V, json={"mode": "updateIfMatchETag", "enrollments": items})
    ).json()
    assert [(e["registrationId"], e["errorCode"] // 1000) for e in r["errors"]] == [(ids[3], 412)]
    # an invalid item, and an id twice, are reported and the valid ones still go in
    new = uid("b")
    items = [sym("bad id!"), sym(new), sym(new.upper())]
    r = (await http.post("/enrollments", params=V, json={"mode": "create", "enrollments": items})).json()
    assert [(e["registrationId"], e["errorCode"]) for e in r["errors"]] == [
        ("bad id!", DpsCode.INVALID_ID),
        (new.upper(), DpsCode.INVALID_BODY),
    ]
    assert "more than once" in r["errors"][1]["errorStatus"]
    assert (await http.get(f"/enrollments/{new}", params=V)).status_code == 200
    # delete
    r = await http.post(
        "/enrollments", params=V, json={"mode": "delete", "enrollments": [sym(i) for i in ids]}
    )
    assert r.json()["isSuccessful"] is True
    assert (await http.get(f"/enrollments/{ids[0]}", params=V)).status_code == 404


async def test_bulk_operations_refuse_a_deprovision_option(http: httpx.AsyncClient) -> None:
    """?deprovision is an option of single deletes: on a bulk call it is refused (400000),
    and nothing is deleted, rather than ignored while the caller believes it happened."""
    reg = uid("bulkdep")
    assert (await http.put(f"/enrollments/{reg}", params=V, json=sym(reg))).status_code == 200
    for path in ("/enrollments", "/enrollmentGroups"):
        r = await http.post(
            path,
            params={**V, "deprovision": "delete"},
            json={"mode": "delete", "enrollments": [sym(reg)], "enrollmentGroups": []},
        )
        assert_error(r, 400, DpsCode.BAD_REQUEST)
        assert "bulk operation takes no deprovision option" in r.json()["message"]
    assert (await http.get(f"/enrollments/{reg}", params=V)).status_code == 200


async def test_bulk_delete_of_individual_enrollments_deletes_their_records(service: InProcess) -> None:
    http = service.http
    regs = [uid("bulkrec") for _ in range(2)]
    for reg in regs:
        created = (await http.put(f"/enrollments/{reg}", params=V, json=sym(reg))).json()
        await service.register(reg, created["attestation"]["symmetricKey"]["primaryKey"])
    items = [body(symmetric_enrollment(r)) for r in regs]
    result = await http.post("/enrollments", params=V, json={"mode": "delete", "enrollments": items})
    assert result.json() == {"isSuccessful": True, "errors": []}
    for reg in regs:
        assert_error(await http.get(f"/registrations/{reg}", params=V), 404, DpsCode.REGISTRATION_NOT_FOUND)


# --- enrollment groups -----------------------------------------------------------------------


async def test_group_lifecycle(http: httpx.AsyncClient) -> None:
    gid = uid("grp")
    group = body(symmetric_group(gid))
    group["reprovisionPolicy"] = {"updateHubAssignment": False, "migrateDeviceData": False}
    created = (await http.put(f"/enrollmentGroups/{gid}", params=V, json=group)).json()
    assert created["enrollmentGroupId"] == gid and created["reprovisionPolicy"] == {
        "updateHubAssignment": False,
        "migrateDeviceData": False,
    }
    assert_error(
        await http.put(
            f"/enrollmentGroups/{gid.upper()}", params=V, json={**group, "enrollmentGroupId": gid.upper()}
        ),
        409,
    )
    mech = await http.post(f"/enrollmentGroups/{gid}/attestationmechanism", params=V)
    assert mech.json()["symmetricKey"]["primaryKey"]
    found = await http.post(
        "/enrollmentGroups/query",
        params=V,
        json={"query": f"SELECT * FROM enrollmentGroups WHERE enrollmentGroupId = '{gid}'"},
    )
    assert [g["enrollmentGroupId"] for g in found.json()] == [gid]
    assert found.headers["x-ms-item-type"] == "EnrollmentGroup"
    other = {**group, "enrollmentGroupId": uid("grp")}
    r = await http.post("/enrollmentGroups", params=V, json={"mode": "create", "enrollmentGroups": [other]})
    assert r.json()["isSuccessful"] is True
    bad = {**group, "enrollmentGroupId": "bad id!"}
    r = await http.post("/enrollmentGroups", params=V, json={"mode": "create", "enrollmentGroups": [bad]})
    assert r.json()["errors"][0]["enrollmentGroupId"] == "bad id!"
    stale = {"If-Match": '"stale"'}
    assert_error(
        await http.delete(f"/enrollmentGroups/{gid}", params=V, headers=stale), 412, DpsCode.ETAG_MISMATCH
    )
    assert (await http.delete(f"/enrollmentGroups/{gid}", params=V)).status_code == 204
    assert_error(await http.get(f"/enrollmentGroups/{gid}", params=V), 404, DpsCode.GROUP_NOT_FOUND)


async def test_x509_group_with_ca_reference_and_signing_certificate(http: httpx.AsyncClient) -> None:
    root = pki.make_root_ca("Test Root " + uid())
    gid = uid("xg")
    created = (await http.put(f"/enrollmentGroups/{gid}", params=V, json=body(x509_group(gid, root)))).json()
    subject = created["attestation"]["x509"]["signingCertificates"]["primary"]["info"]["subjectName"]
    assert subject.startswith("CN=Test Root")
    gid2 = uid("xg")
    ref = await http.put(
        f"/enrollmentGroups/{gid2}", params=V, json=body(x509_group(gid2, ca_reference="myca"))
    )
    assert ref.json()["attestation"]["x509"]["caReferences"] == {"primary": "myca"}
    wrong = body(x509_enrollment("zz", root))
    wrong = {"enrollmentGroupId": "zz", "attestation": wrong["attestation"]}
    assert_error(await http.put(f"/enrollmentGroups/{uid()}", params=V, json=wrong), 400)


# --- registration records --------------------------------------------------------------------


async def test_registration_records_missing(http: httpx.AsyncClient) -> None:
    assert_error(await http.get(f"/registrations/{uid()}", params=V), 404, DpsCode.REGISTRATION_NOT_FOUND)
    assert_error(await http.delete(f"/registrations/{uid()}", params=V), 404, DpsCode.REGISTRATION_NOT_FOUND)
    assert_error(await http.post(f"/registrations/{uid()}/query", params=V), 404, DpsCode.GROUP_NOT_FOUND)


async def test_registration_records_of_a_group(service: InProcess) -> None:
    http = service.http
    gid = uid("recs")
    created = (await http.put(f"/enrollmentGroups/{gid}", params=V, json=body(symmetric_group(gid)))).json()
    group_key = created["attestation"]["symmetricKey"]["primaryKey"]
    devices = [f"{gid}-dev-{i}" for i in range(3)]
    for device in devices:
        await service.register_in_group(group_key, device)
    everything = await http.post(f"/registrations/{gid}/query", params=V)
    assert everything.headers["x-ms-item-type"] == "DeviceRegistration"
    assert sorted(s["registrationId"] for s in everything.json()) == devices
    one = await http.post(
        f"/registrations/{gid}/query",
        params=V,
        json={"query": f"SELECT * WHERE registrationId = '{devices[1]}'"},
    )
    assert [s["registrationId"] for s in one.json()] == [devices[1]]
    other_group = {"query": "SELECT * FROM registrations WHERE enrollmentGroupId = 'another'"}
    assert (await http.post(f"/registrations/{gid}/query", params=V, json=other_group)).json() == []
    paged = await http.post(f"/registrations/{gid}/query", params=V, headers={"x-ms-max-item-count": "2"})
    assert len(paged.json()) == 2 and paged.headers["x-ms-continuation"]
    # one record: GET with its etag, DELETE on it (a stale one is a 412)
    state = await http.get(f"/registrations/{devices[0]}", params=V)
    assert state.json()["assignedHub"] == service.settings.first_builtin_hub
    assert state.headers["etag"] == state.json()["etag"]
    stale = {"If-Match": '"stale"'}
    assert_error(
        await http.delete(f"/registrations/{devices[0]}", params=V, headers=stale), 412, DpsCode.ETAG_MISMATCH
    )
    fresh = {"If-Match": state.json()["etag"]}
    assert (await http.delete(f"/registrations/{devices[0]}", params=V, headers=fresh)).status_code == 204
    # deleting a group keeps its devices' records, as DPS does
    assert (await http.delete(f"/enrollmentGroups/{gid}", params=V)).status_code == 204
    assert (await http.get(f"/registrations/{devices[1]}", params=V)).status_code == 200


async def test_deleting_an_individual_enrollment_deletes_its_registration_record(service: InProcess) -> None:
    http = service.http
    reg = uid("rec")
    created = (await http.put(f"/enrollments/{reg}", params=V, json=sym(reg))).json()
    await service.register(reg, created["attestation"]["symmetricKey"]["primaryKey"])
    shown = (await http.get(f"/enrollments/{reg}", params=V)).json()
    assert shown["registrationState"]["status"] == "assigned"
    [queried] = (
        await http.post(
            "/enrollments/query", params=V, json={"query": f"SELECT * WHERE registrationId = '{reg}'"}
        )
    ).json()
    assert queried["registrationState"] == shown["registrationState"]
    assert (await http.delete(f"/enrollments/{reg}", params=V)).status_code == 204
    assert_error(await http.get(f"/registrations/{reg}", params=V), 404, DpsCode.REGISTRATION_NOT_FOUND)


# --- authentication --------------------------------------------------------------------------


async def test_service_sas_auth_failures(service: InProcess) -> None:
    reg = uid()
    path = f"/enrollments/{reg}"
    async with service.client() as anon:
        assert_error(await anon.get(path, params=V), 401, DpsCode.UNAUTHENTICATED, "missing")
        assert_error(
            await anon.get(path, params=V, headers={"Authorization": "Bearer x"}),
            401,
            words="SharedAccessSignature",
        )
        cases = [
            (service.token(ttl=-3600), DpsCode.TOKEN_EXPIRED, "expired"),
            (service.token(key=key(b"f")), DpsCode.TOKEN_INVALID, "signature"),
            (service.token(key_name="nobody"), DpsCode.UNKNOWN_POLICY, "nobody"),
            (service.token(resource="other.example.net"), DpsCode.TOKEN_AUDIENCE, "not this service"),
        ]
        for token, code, words in cases:
            assert_error(await anon.get(path, params=V, headers={"Authorization": token}), 401, code, words)
        # the Host header the client sends does not make its token's sr this service's: a token
        # made for another service that shares a key (a staging copy of the database) is refused
        for host in ("other.example.net", "other.example.net:1234"):
            replayed = await anon.get(
                path, params=V, headers={"Authorization": service.token(resource=host), "Host": host}
            )
            assert_error(replayed, 401, DpsCode.TOKEN_AUDIENCE, "not this service")
        # the secondary key signs too, and a resource that is a path prefix of the request
        secondary = (
            await service.management.policies.get("provisioningserviceowner", keys=True)
        ).secondary_key
        assert secondary is not None
        for token in (service.token(key=secondary), service.token(resource="localhost/enrollments")):
            assert (await anon.get(path, params=V, headers={"Authorization": token})).status_code == 404
        no_skn = build_sas_token("localhost", service.owner_key, int(time.time()) + 60)
        assert_error(await anon.get(path, params=V, headers={"Authorization": no_skn}), 401, words="skn")


async def test_rights_are_enforced_per_operation(service: InProcess) -> None:
    http = service.http
    name = uid("reader")
    r = await http.put(
        f"/admin/sharedAccessPolicies/{name}", params=V, json=body(policy(name, Right.ENROLLMENT_READ))
    )
    assert r.status_code == 200, r.text
    reader = service.token(key_name=name, key=r.json()["primaryKey"])
    reg = uid()
    async with service.client(reader) as c:
        assert (await c.get(f"/enrollments/{reg}", params=V)).status_code == 404  # authorized, just missing
        assert_error(
            await c.put(f"/enrollments/{reg}", params=V, json=sym(reg)),
            403,
            DpsCode.MISSING_RIGHT,
            "EnrollmentWrite",
        )
        assert_error(await c.get(f"/registrations/{reg}", params=V), 403, words="RegistrationStatusRead")
        assert_error(await c.delete(f"/registrations/{reg}", params=V), 403, words="RegistrationStatusWrite")
        assert_error(await c.get("/admin/settings", params=V), 403, words="ServiceConfig")
    # The reader could not write: nothing was created.
    assert (await http.get(f"/enrollments/{reg}", params=V)).status_code == 404


# --- the admin API's link to enrollments -----------------------------------------------------


async def test_enrollments_may_name_linked_hubs_only(http: httpx.AsyncClient) -> None:
    hub = linked_hub(f"{uid('named')}.example.local", builtin=True, allocation_weight=5)
    reg = uid()
    static = sym(reg, iotHubs=[hub.host_name], allocationPolicy=AllocationPolicy.STATIC.value)
    assert_error(
        await http.put(f"/enrollments/{reg}", params=V, json=static), 400, DpsCode.INVALID_BODY, "not linked"
    )
    assert (await http.put(f"/admin/linkedHubs/{hub.host_name}", params=V, json=body(hub))).status_code == 200
    # a hub linked a moment ago counts at once
    assert (await http.put(f"/enrollments/{reg}", params=V, json=static)).status_code == 200
    two = sym(uid(), iotHubs=[hub.host_name, "localhost"], allocationPolicy="static")
    assert_error(
        await http.put(f"/enrollments/{two['registrationId']}", params=V, json=two), 400, words="exactly one"
    )


async def test_created_pem_is_what_the_certificate_says(http: httpx.AsyncClient) -> None:
    reg = uid("pemform")
    leaf = pki.make_device_cert(reg)
    r = await http.put(f"/enrollments/{reg}", params=V, json=body(x509_enrollment(reg, pem(leaf))))
    assert r.status_code == 200, r.text
    mech = (await http.post(f"/enrollments/{reg}/attestationmechanism", params=V)).json()
    assert mech["x509"]["clientCertificates"]["primary"]["certificate"] == pem(leaf)
