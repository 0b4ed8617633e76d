"""The service API as the official service clients use it (issue 9), over real HTTPS against a
running ``provisiond serve``: the certificate forms they send, the paths they spell, the query
they send, the keys they read back from a PUT, the log lines an operator needs, and IoT Hub's
twin limits on initial twins.

Where DPS's behaviour comes from (SDK sources and Microsoft's docs) is in docs/service-api.md.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx
import pytest

from provisiond import pki
from provisiond.protocol.sas import derive_device_key
from tests._server import RunningServer
from tests.service.test_device_api import Device, assigned
from tests.service.test_service_api import V, assert_error, sym, uid


@pytest.fixture
def http(server: RunningServer) -> Any:
    with server.http(headers={"Authorization": server.token()}) as client:
        yield client


SYMMETRIC = {"attestation": {"type": "symmetricKey"}}


def x509_individual(reg: str, certificate: str) -> dict[str, Any]:
    return {
        "registrationId": reg,
        "attestation": {
            "type": "x509",
            "x509": {"clientCertificates": {"primary": {"certificate": certificate}}},
        },
    }


def log_line(server: RunningServer, tracking_id: str) -> str:
    """The service's log line for ``tracking_id`` (the log is written as the answer goes out)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in server.log().splitlines() if tracking_id in line]
        if lines or time.monotonic() > deadline:
            assert lines, f"no log line with trackingId {tracking_id}:\n{server.log()[-3000:]}"
            return lines[-1]
        time.sleep(0.02)


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
def test_individual_enrollment_certificate_forms(
    server: RunningServer, http: httpx.Client, form: str, tmp_path: Any
) -> None:
    reg = uid("cert")
    leaf = pki.make_device_cert(reg)
    r = http.put(f"/enrollments/{reg}", params=V, json=x509_individual(reg, certificate_forms(leaf)[form]))
    assert r.status_code == 200, r.text
    info = r.json()["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
    assert info["sha256Thumbprint"] == pki.certificate_info(leaf.cert)["sha256Thumbprint"]
    # Stored as PEM, whatever form it arrived in, and the device registers with it.
    mech = http.post(f"/enrollments/{reg}/attestationmechanism", params=V).json()
    assert (
        mech["x509"]["clientCertificates"]["primary"]["certificate"]
        == pki.certificate_pem(leaf.cert).decode()
    )
    device = Device(server, reg, credential=leaf, tmp=tmp_path)
    assert assigned(device.register())["registrationState"]["x509"]["certificateInfo"] == info
    device.close()


def test_group_signing_certificate_as_base64_of_pem(http: httpx.Client) -> None:
    root = pki.make_root_ca("B64 Root " + uid())
    gid = uid("b64g")
    body = {
        "enrollmentGroupId": gid,
        "attestation": {
            "type": "x509",
            "x509": {
                "signingCertificates": {"primary": {"certificate": certificate_forms(root)["base64-pem"]}}
            },
        },
    }
    r = http.put(f"/enrollmentGroups/{gid}", params=V, json=body)
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
def test_bad_certificates_name_the_field(http: httpx.Client, certificate: str, words: str) -> None:
    reg = uid("bad")
    if certificate == "two":
        certificate = pki.certificate_pem(
            pki.make_device_cert(reg).cert, pki.make_device_cert(reg).cert
        ).decode()
    r = http.put(f"/enrollments/{reg}", params=V, json=x509_individual(reg, certificate))
    body = assert_error(r, 400, 400004, words)
    assert "attestation.x509.clientCertificates.primary.certificate" in body["message"]
    assert http.get(f"/enrollments/{reg}", params=V).status_code == 404


@pytest.mark.parametrize("form", ["base64-der", "base64-pem"])
def test_ca_certificate_upload_and_verify_accept_every_form(http: httpx.Client, form: str) -> None:
    ca = pki.make_root_ca("Forms CA " + uid())
    name = uid("ca")
    created = http.put(
        f"/admin/certificates/{name}", params=V, json={"certificate": certificate_forms(ca)[form]}
    )
    assert created.status_code == 200, created.text
    assert created.json()["sha256Thumbprint"] == pki.certificate_info(ca.cert)["sha256Thumbprint"]
    code = http.post(f"/admin/certificates/{name}/generateVerificationCode", params=V).json()[
        "verificationCode"
    ]
    proof = certificate_forms(pki.make_verification_cert(code, ca))[form]
    verified = http.post(f"/admin/certificates/{name}/verify", params=V, json={"certificate": proof})
    assert verified.status_code == 200, verified.text
    assert verified.json()["isVerified"] is True
    assert_error(
        http.put(f"/admin/certificates/{uid('ca')}", params=V, json={"certificate": "%%%"}),
        400,
        400004,
        "certificate is not an X.509 certificate",
    )


# --- 2. paths are case-insensitive, as DPS's are --------------------------------------------


def test_paths_are_case_insensitive_and_keep_the_parameters_case(
    server: RunningServer, http: httpx.Client
) -> None:
    gid = uid("CaseGrp")
    assert (
        http.put(
            f"/enrollmentgroups/{gid}", params=V, json={"enrollmentGroupId": gid, **SYMMETRIC}
        ).status_code
        == 200
    )
    # What the Node.js service SDK sends for getEnrollmentGroupAttestationMechanism.
    mech = http.post(f"/enrollmentgroups/{gid}/attestationmechanism", params=V)
    assert mech.status_code == 200, mech.text
    assert mech.json()["symmetricKey"]["primaryKey"]
    reg = uid("CaseReg")
    assert http.put(f"/ENROLLMENTS/{reg}", params=V, json=sym(reg)).status_code == 200
    assert http.get(f"/Enrollments/{reg}", params=V).json()["registrationId"] == reg
    assert http.post(f"/ENROLLMENTS/{reg}/AttestationMechanism", params=V).status_code == 200
    assert http.get("/ADMIN/SETTINGS", params=V).json()["idScope"] == server.id_scope
    # Path parameters keep the case the client sent (here echoed in the 404 message).
    missing = "No-Such-ENROLLMENT"
    assert_error(http.get(f"/ENROLLMENTS/{missing}", params=V), 404, 404201, f"'{missing}'")
    # The C service SDK posts bulk operations to "/enrollments/" (a trailing slash).
    bulk = http.post("/enrollments/", params=V, json={"mode": "create", "enrollments": [sym(uid("slash"))]})
    assert bulk.status_code == 200 and bulk.json() == {"isSuccessful": True, "errors": []}
    # Unknown paths and methods are still 404 and 405.
    assert_error(http.get("/enrollmentz/x", params=V), 404, 404000)
    assert_error(http.patch(f"/ENROLLMENTS/{reg}", params=V, json={}), 405, 405000)


def test_device_api_paths_are_case_insensitive_too(server: RunningServer, http: httpx.Client) -> None:
    reg = uid("CaseDev")
    http.put(f"/enrollments/{reg}", params=V, json=sym(reg))
    key = http.post(f"/enrollments/{reg}/attestationmechanism", params=V).json()["symmetricKey"]["primaryKey"]
    device = Device(server, reg)
    r = device.http.put(
        f"/{server.id_scope.upper()}/Registrations/{reg}/Register",
        params={"api-version": "2021-06-01"},
        json={"registrationId": reg},
        headers={"Authorization": device.token(key)},
    )
    assert assigned(r)["registrationState"]["registrationId"] == reg
    device.close()


# --- 3. {"query": "*"} means every record ------------------------------------------------------


def test_star_query_on_every_query_endpoint(server: RunningServer, http: httpx.Client) -> None:
    tag = uid("star")
    regs = [f"{tag}-{i}" for i in range(3)]
    http.post("/enrollments", params=V, json={"mode": "create", "enrollments": [sym(r) for r in regs]})
    gid = f"{tag}-group"
    http.put(f"/enrollmentGroups/{gid}", params=V, json={"enrollmentGroupId": gid, **SYMMETRIC})
    for spec in ({"query": "*"}, {"query": "SELECT *"}):
        found = http.post("/enrollments/query", params=V, json=spec, headers={"x-ms-max-item-count": "10000"})
        assert found.status_code == 200, found.text
        assert set(regs) <= {e["registrationId"] for e in found.json()}
        groups = http.post(
            "/enrollmentGroups/query", params=V, json=spec, headers={"x-ms-max-item-count": "10000"}
        )
        assert gid in {g["enrollmentGroupId"] for g in groups.json()}
    # The registrations of a group (the Node.js sample queries them with "*" too).
    keys = http.post(f"/enrollmentGroups/{gid}/attestationmechanism", params=V).json()["symmetricKey"]
    device = Device(server, f"{tag}-device")
    assigned(device.register(device.token(derive_device_key(keys["primaryKey"], device.registration_id))))
    device.close()
    records = http.post(f"/registrations/{gid}/query", params=V, json={"query": "*"})
    assert records.status_code == 200, records.text
    assert [s["registrationId"] for s in records.json()] == [device.registration_id]


# --- 4. symmetric keys in the answer to a PUT --------------------------------------------------


@pytest.mark.parametrize("kind", ["enrollments", "enrollmentGroups"])
def test_put_answers_carry_the_keys_reads_do_not(http: httpx.Client, kind: str) -> None:
    id_field = "registrationId" if kind == "enrollments" else "enrollmentGroupId"
    rid = uid("keys")
    created = http.put(f"/{kind}/{rid}", params=V, json={id_field: rid, **SYMMETRIC}).json()
    mech = http.post(f"/{kind}/{rid}/attestationmechanism", params=V).json()
    # create: the generated keys are in the answer (what older official clients read)
    assert created["attestation"] == mech and len(mech["symmetricKey"]["primaryKey"]) == 88
    # GET and query: no keys
    got = http.get(f"/{kind}/{rid}", params=V).json()
    assert got["attestation"] == {"type": "symmetricKey"}
    spec = {"query": f"SELECT * FROM {kind} WHERE {id_field} = '{rid}'"}
    [queried] = http.post(f"/{kind}/query", params=V, json=spec).json()
    assert queried["attestation"] == {"type": "symmetricKey"}
    # update from what GET showed (no keys in it): the answer shows the kept keys
    updated = http.put(
        f"/{kind}/{rid}",
        params=V,
        json={**got, "provisioningStatus": "disabled"},
        headers={"If-Match": got["etag"]},
    ).json()
    assert updated["provisioningStatus"] == "disabled" and updated["attestation"] == mech
    # update with keys given: they are the answer's
    given = base64.b64encode(b"g" * 32).decode()
    body = {**got, "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": given}}}
    again = http.put(f"/{kind}/{rid}", params=V, json=body, headers={"If-Match": "*"}).json()
    assert again["attestation"]["symmetricKey"] == {
        "primaryKey": given,
        "secondaryKey": mech["symmetricKey"]["secondaryKey"],
    }


def test_put_answer_of_an_x509_enrollment_has_no_certificate(http: httpx.Client) -> None:
    reg = uid("x509ans")
    leaf = pki.make_device_cert(reg)
    created = http.put(
        f"/enrollments/{reg}", params=V, json=x509_individual(reg, pki.certificate_pem(leaf.cert).decode())
    ).json()
    assert set(created["attestation"]["x509"]["clientCertificates"]["primary"]) == {"info"}


# --- 9. every 4xx is logged with its tracking id, method and path -------------------------------


def test_every_client_error_is_logged(server: RunningServer, http: httpx.Client) -> None:
    cases = [
        (http.get("/nowhere/at/ALL", params=V), "GET /nowhere/at/ALL -> 404 404000"),
        (http.delete("/admin/settings", params=V), "DELETE /admin/settings -> 405 405000"),
        (
            http.put("/enrollments/bad%20id", params=V, json=sym("bad id")),
            "PUT /enrollments/bad%20id -> 400 400005",
        ),
        # a path with a line break cannot forge a log line: it stays percent-encoded
        (http.get("/x%0A2026 fake line", params=V), "GET /x%0A2026%20fake%20line -> 404 404000"),
    ]
    for response, expected in cases:
        body = response.json()
        line = log_line(server, body["trackingId"])
        assert expected in line, line
        assert "INFO" in line


# --- B4. initial twins keep IoT Hub's twin limits --------------------------------------------


def nested(levels: int) -> dict[str, Any]:
    """``levels`` objects below the root: {"l1": {"l2": ... {"lN": {"leaf": 1}}}}."""
    doc: dict[str, Any] = {"leaf": 1}
    for level in range(levels, 0, -1):
        doc = {f"l{level}": doc}
    return doc


def test_initial_twin_limits_on_put(server: RunningServer, http: httpx.Client) -> None:
    reg = uid("twin")
    # Ten levels (IoT Hub's maximum) are accepted, and the device registers with that twin.
    deepest = {"tags": nested(10), "properties": {"desired": nested(10)}}
    http.put(f"/enrollments/{reg}", params=V, json=sym(reg, initialTwin=deepest))
    key = http.post(f"/enrollments/{reg}/attestationmechanism", params=V).json()["symmetricKey"]["primaryKey"]
    device = Device(server, reg)
    hub = assigned(device.register(device.token(key)))["registrationState"]["assignedHub"]
    device.close()
    twin = http.get(f"/admin/linkedHubs/{hub}/devices/{reg}", params=V).json()["twin"]
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
        assert_error(
            http.put(f"/enrollments/{other}", params=V, json=sym(other, initialTwin=twin_doc)),
            400,
            400004,
            words,
        )
        assert http.get(f"/enrollments/{other}", params=V).status_code == 404
    # 960 levels (JSON that Python's own encoder cannot even produce): refused before it is
    # decoded, by the JSON nesting bound every body passes, and nothing was stored that could
    # break a registration or a query.
    other = uid("twin")
    deep = '{"a":' * 960 + "1" + "}" * 960
    body = f'{{"registrationId": "{other}", "attestation": {{"type": "symmetricKey"}}, "initialTwin": {{"tags": {deep}}}}}'
    r = http.put(
        f"/enrollments/{other}", params=V, content=body, headers={"Content-Type": "application/json"}
    )
    assert_error(r, 400, 400004, "nested 962 levels deep (the limit is 64)")
    assert http.get(f"/enrollments/{other}", params=V).status_code == 404
    assert http.post("/enrollments/query", params=V, json={"query": "*"}).status_code == 200


def test_initial_twin_limits_in_bulk_fail_only_that_item(http: httpx.Client) -> None:
    good, bad = uid("bulk-twin"), uid("bulk-twin")
    items = [sym(good, initialTwin={"tags": nested(3)}), sym(bad, initialTwin={"tags": nested(11)})]
    result = http.post("/enrollments", params=V, json={"mode": "create", "enrollments": items}).json()
    assert result["isSuccessful"] is False
    [error] = result["errors"]
    assert error["registrationId"] == bad and error["errorCode"] == 400004
    assert "nested deeper than 10 levels" in error["errorStatus"]
    assert http.get(f"/enrollments/{good}", params=V).status_code == 200
    assert http.get(f"/enrollments/{bad}", params=V).status_code == 404
