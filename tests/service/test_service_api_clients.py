"""The service API as the official service clients use it (issue 9), in-process over both
storage backends: the certificate forms they send, the paths they spell, the query they send,
the keys they read back from a PUT, the log lines an operator needs, and IoT Hub's twin limits
on initial twins. What they see over real TLS is in test_service_api_tls.py.

Where DPS's behaviour comes from (SDK sources and Microsoft's docs) is in docs/service-api.md.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import httpx
import pytest

from provisiond import pki
from provisiond.errors import DpsCode
from tests._inprocess import SERVICE_API as V
from tests._inprocess import InProcess
from tests.factories import body, key, symmetric_group, uid, x509_enrollment
from tests.service.test_service_api import assert_error, sym

__all__ = ["certificate_forms", "nested", "x509_individual"]

SYMMETRIC = {"attestation": {"type": "symmetricKey"}}


@pytest.fixture
def http(service: InProcess) -> httpx.AsyncClient:
    return service.http


def x509_individual(reg: str, certificate: str) -> dict[str, Any]:
    doc: dict[str, Any] = body(x509_enrollment(reg, certificate))
    return doc


# --- 1. certificates: PEM, base64 of DER, base64 of PEM -------------------------------------


def certificate_forms(issued: pki.Issued) -> dict[str, str]:
    pem = pki.certificate_pem(issued.cert)
    der = pki.certificate_der(issued.cert)
    b64_pem = base64.b64encode(pem).decode()
    return {
        "pem": pem.decode(),
        "base64-der": base64.b64encode(der).decode(),
        # What the official C service client always sends (provisioning_sc_x509_attestation.c).
        "base64-pem": b64_pem,
        "base64-pem-wrapped": "\n".join(b64_pem[i : i + 64] for i in range(0, len(b64_pem), 64)),
    }


@pytest.mark.parametrize("form", ["pem", "base64-der", "base64-pem", "base64-pem-wrapped"])
async def test_individual_enrollment_certificate_forms_are_stored_as_pem(
    http: httpx.AsyncClient, form: str
) -> None:
    reg = uid("cert")
    leaf = pki.make_device_cert(reg)
    r = await http.put(
        f"/enrollments/{reg}", params=V, json=x509_individual(reg, certificate_forms(leaf)[form])
    )
    assert r.status_code == 200, r.text
    info = r.json()["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
    assert info["sha256Thumbprint"] == pki.certificate_info(leaf.cert)["sha256Thumbprint"]
    mech = (await http.post(f"/enrollments/{reg}/attestationmechanism", params=V)).json()
    assert (
        mech["x509"]["clientCertificates"]["primary"]["certificate"]
        == pki.certificate_pem(leaf.cert).decode()
    )


async def test_group_signing_certificate_as_base64_of_pem(http: httpx.AsyncClient) -> None:
    root = pki.make_root_ca("B64 Root " + uid())
    gid = uid("b64g")
    group = {
        "enrollmentGroupId": gid,
        "attestation": {
            "type": "x509",
            "x509": {
                "signingCertificates": {"primary": {"certificate": certificate_forms(root)["base64-pem"]}}
            },
        },
    }
    r = await http.put(f"/enrollmentGroups/{gid}", params=V, json=group)
    assert r.status_code == 200, r.text
    subject = r.json()["attestation"]["x509"]["signingCertificates"]["primary"]["info"]["subjectName"]
    assert subject.startswith("CN=B64 Root")


@pytest.mark.parametrize(
    ("certificate", "words"),
    [
        pytest.param("not a certificate!", "neither PEM text nor base64", id="junk"),
        pytest.param(base64.b64encode(b"hello").decode(), "is not an X.509 certificate", id="base64-of-junk"),
        pytest.param("two", "2 certificates where one was expected", id="two-pems"),
    ],
)
async def test_bad_certificates_name_the_field(http: httpx.AsyncClient, certificate: str, words: str) -> None:
    reg = uid("bad")
    if certificate == "two":
        certificate = pki.certificate_pem(
            pki.make_device_cert(reg).cert, pki.make_device_cert(reg).cert
        ).decode()
    r = await http.put(f"/enrollments/{reg}", params=V, json=x509_individual(reg, certificate))
    data = assert_error(r, 400, DpsCode.INVALID_BODY, words)
    assert "attestation.x509.clientCertificates.primary.certificate" in data["message"]
    assert (await http.get(f"/enrollments/{reg}", params=V)).status_code == 404


# --- 2. paths are case-insensitive, as DPS's are --------------------------------------------


async def test_paths_are_case_insensitive_and_keep_the_parameters_case(
    service: InProcess, http: httpx.AsyncClient
) -> None:
    gid = uid("CaseGrp")
    r = await http.put(f"/enrollmentgroups/{gid}", params=V, json={"enrollmentGroupId": gid, **SYMMETRIC})
    assert r.status_code == 200
    # What the Node.js service SDK sends for getEnrollmentGroupAttestationMechanism.
    mech = await http.post(f"/enrollmentgroups/{gid}/attestationmechanism", params=V)
    assert mech.status_code == 200, mech.text
    assert mech.json()["symmetricKey"]["primaryKey"]
    reg = uid("CaseReg")
    assert (await http.put(f"/ENROLLMENTS/{reg}", params=V, json=sym(reg))).status_code == 200
    assert (await http.get(f"/Enrollments/{reg}", params=V)).json()["registrationId"] == reg
    assert (await http.post(f"/ENROLLMENTS/{reg}/AttestationMechanism", params=V)).status_code == 200
    assert (await http.get("/ADMIN/SETTINGS", params=V)).json()["idScope"] == service.id_scope
    # Path parameters keep the case the client sent (here echoed in the 404 message).
    missing = "No-Such-ENROLLMENT"
    assert_error(
        await http.get(f"/ENROLLMENTS/{missing}", params=V), 404, DpsCode.ENROLLMENT_NOT_FOUND, f"'{missing}'"
    )
    # The C service SDK posts bulk operations to "/enrollments/" (a trailing slash).
    bulk = await http.post(
        "/enrollments/", params=V, json={"mode": "create", "enrollments": [sym(uid("slash"))]}
    )
    assert bulk.status_code == 200 and bulk.json() == {"isSuccessful": True, "errors": []}
    # Unknown paths and methods are still 404 and 405.
    assert_error(await http.get("/enrollmentz/x", params=V), 404, DpsCode.NOT_FOUND)
    assert_error(await http.patch(f"/ENROLLMENTS/{reg}", params=V, json={}), 405, DpsCode.METHOD_NOT_ALLOWED)


# --- 3. {"query": "*"} means every record ------------------------------------------------------


async def test_star_query_on_every_query_endpoint(service: InProcess, http: httpx.AsyncClient) -> None:
    tag = uid("star")
    regs = [f"{tag}-{i}" for i in range(3)]
    await http.post("/enrollments", params=V, json={"mode": "create", "enrollments": [sym(r) for r in regs]})
    gid = f"{tag}-group"
    await http.put(f"/enrollmentGroups/{gid}", params=V, json=body(symmetric_group(gid)))
    for spec in ({"query": "*"}, {"query": "SELECT *"}):
        found = await http.post(
            "/enrollments/query", params=V, json=spec, headers={"x-ms-max-item-count": "10000"}
        )
        assert found.status_code == 200, found.text
        assert set(regs) == {e["registrationId"] for e in found.json()}
        groups = await http.post(
            "/enrollmentGroups/query", params=V, json=spec, headers={"x-ms-max-item-count": "10000"}
        )
        assert [g["enrollmentGroupId"] for g in groups.json()] == [gid]
    # The registrations of a group (the Node.js sample queries them with "*" too).
    keys = (await http.post(f"/enrollmentGroups/{gid}/attestationmechanism", params=V)).json()["symmetricKey"]
    device = f"{tag}-device"
    await service.register_in_group(keys["primaryKey"], device)
    records = await http.post(f"/registrations/{gid}/query", params=V, json={"query": "*"})
    assert records.status_code == 200, records.text
    assert [s["registrationId"] for s in records.json()] == [device]


# --- 4. symmetric keys in the answer to a PUT --------------------------------------------------


@pytest.mark.parametrize("kind", ["enrollments", "enrollmentGroups"])
async def test_put_answers_carry_the_keys_reads_do_not(http: httpx.AsyncClient, kind: str) -> None:
    id_field = "registrationId" if kind == "enrollments" else "enrollmentGroupId"
    rid = uid("keys")
    created = (await http.put(f"/{kind}/{rid}", params=V, json={id_field: rid, **SYMMETRIC})).json()
    mech = (await http.post(f"/{kind}/{rid}/attestationmechanism", params=V)).json()
    # create: the generated keys are in the answer (what older official clients read)
    assert created["attestation"] == mech and len(mech["symmetricKey"]["primaryKey"]) == 88
    # GET and query: no keys
    got = (await http.get(f"/{kind}/{rid}", params=V)).json()
    assert got["attestation"] == {"type": "symmetricKey"}
    spec = {"query": f"SELECT * FROM {kind} WHERE {id_field} = '{rid}'"}
    [queried] = (await http.post(f"/{kind}/query", params=V, json=spec)).json()
    assert queried["attestation"] == {"type": "symmetricKey"}
    # update from what GET showed (no keys in it): the answer shows the kept keys
    updated = (
        await http.put(
            f"/{kind}/{rid}",
            params=V,
            json={**got, "provisioningStatus": "disabled"},
            headers={"If-Match": got["etag"]},
        )
    ).json()
    assert updated["provisioningStatus"] == "disabled" and updated["attestation"] == mech
    # update with keys given: they are the answer's
    given = key(b"g")
    changed = {**got, "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": given}}}
    again = (await http.put(f"/{kind}/{rid}", params=V, json=changed, headers={"If-Match": "*"})).json()
    assert again["attestation"]["symmetricKey"] == {
        "primaryKey": given,
        "secondaryKey": mech["symmetricKey"]["secondaryKey"],
    }


async def test_put_answer_of_an_x509_enrollment_has_no_certificate(http: httpx.AsyncClient) -> None:
    reg = uid("x509ans")
    leaf = pki.make_device_cert(reg)
    r = await http.put(
        f"/enrollments/{reg}", params=V, json=x509_individual(reg, pki.certificate_pem(leaf.cert).decode())
    )
    assert set(r.json()["attestation"]["x509"]["clientCertificates"]["primary"]) == {"info"}


# --- 9. every 4xx is logged with its tracking id, method and path -------------------------------


async def test_every_client_error_is_logged(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="provisiond.http")
    cases = [
        (await http.get("/nowhere/at/ALL", params=V), "GET /nowhere/at/ALL -> 404 404000"),
        (await http.delete("/admin/settings", params=V), "DELETE /admin/settings -> 405 405000"),
        (
            await http.put("/enrollments/bad%20id", params=V, json=sym("bad id")),
            "PUT /enrollments/bad%20id -> 400 400005",
        ),
        # a path with a line break cannot forge a log line: it stays percent-encoded
        (await http.get("/x%0A2026 fake line", params=V), "GET /x%0A2026%20fake%20line -> 404 404000"),
        (await http.get(f"/enrollmentGroups/{uid()}/x", params=V), "-> 404 404000"),
        (await http.put(f"/enrollments/{uid()}", params=V, json=sym("mismatch")), "-> 400 400004"),
    ]
    for response, expected in cases:
        tracking_id = response.json()["trackingId"]
        [record] = [r for r in caplog.records if tracking_id in r.getMessage()]
        assert expected in record.getMessage(), record.getMessage()
        assert record.levelno == logging.INFO


# --- B4. initial twins keep IoT Hub's twin limits --------------------------------------------


def nested(levels: int) -> dict[str, Any]:
    """``levels`` objects below the root: {"l1": {"l2": ... {"lN": {"leaf": 1}}}}."""
    doc: dict[str, Any] = {"leaf": 1}
    for level in range(levels, 0, -1):
        doc = {f"l{level}": doc}
    return doc


async def test_initial_twin_limits_on_put(service: InProcess, http: httpx.AsyncClient) -> None:
    reg = uid("twin")
    # Ten levels (IoT Hub's maximum) are accepted, and the device registers with that twin.
    deepest = {"tags": nested(10), "properties": {"desired": nested(10)}}
    created = (await http.put(f"/enrollments/{reg}", params=V, json=sym(reg, initialTwin=deepest))).json()
    state = await service.register(reg, created["attestation"]["symmetricKey"]["primaryKey"])
    twin = (await http.get(f"/admin/linkedHubs/{state['assignedHub']}/devices/{reg}", params=V)).json()[
        "twin"
    ]
    assert twin == {"tags": nested(10), "desired": nested(10)}
    cases = [
        (
            {"tags": nested(11)},
            "initialTwin.tags.l1.l2.l3.l4.l5.l6.l7.l8.l9.l10.l11: nested deeper than 10 levels",
        ),
        (
            {"properties": {"desired": {"a.b": 1}}},
            "initialTwin.properties.desired.a.b: twin keys cannot contain '.'",
        ),
        ({"tags": {"$version": 1}}, "cannot contain '$'"),
        ({"tags": {"big": "x" * 4096, "bigger": "y" * 4096}}, "initialTwin.tags is 8201 bytes"),
        ({"properties": {"desired": {"n": 2**53}}}, "integers must lie within"),
    ]
    for twin_doc, words in cases:
        other = uid("twin")
        r = await http.put(f"/enrollments/{other}", params=V, json=sym(other, initialTwin=twin_doc))
        assert_error(r, 400, DpsCode.INVALID_BODY, words)
        assert (await http.get(f"/enrollments/{other}", params=V)).status_code == 404
    # 960 levels (JSON that Python's own encoder cannot even produce): refused before it is
    # decoded, by the JSON nesting bound every body passes, and nothing was stored that could
    # break a registration or a query.
    other = uid("twin")
    deep = '{"a":' * 960 + "1" + "}" * 960
    raw = f'{{"registrationId": "{other}", "attestation": {{"type": "symmetricKey"}}, "initialTwin": {{"tags": {deep}}}}}'
    r = await http.put(
        f"/enrollments/{other}", params=V, content=raw, headers={"Content-Type": "application/json"}
    )
    assert_error(r, 400, DpsCode.INVALID_BODY, "nested 962 levels deep (the limit is 64)")
    assert (await http.get(f"/enrollments/{other}", params=V)).status_code == 404
    assert (await http.post("/enrollments/query", params=V, json={"query": "*"})).status_code == 200


async def test_initial_twin_limits_in_bulk_fail_only_that_item(http: httpx.AsyncClient) -> None:
    good, bad = uid("bulk-twin"), uid("bulk-twin")
    items = [sym(good, initialTwin={"tags": nested(3)}), sym(bad, initialTwin={"tags": nested(11)})]
    result = (await http.post("/enrollments", params=V, json={"mode": "create", "enrollments": items})).json()
    assert result["isSuccessful"] is False
    [error] = result["errors"]
    assert error["registrationId"] == bad and error["errorCode"] == DpsCode.INVALID_BODY
    assert "nested deeper than 10 levels" in error["errorStatus"]
    assert (await http.get(f"/enrollments/{good}", params=V)).status_code == 200
    assert (await http.get(f"/enrollments/{bad}", params=V)).status_code == 404
