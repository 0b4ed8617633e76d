"""The device API over real HTTPS, at the wire level (raw requests, as any SDK sends them):
the statuses and headers, the error cases with their status, errorCode and message, X.509 chain
errors, hub assignment, reprovisioning and idempotent concurrent registration.

What every transport must answer alike (each attestation, disabled enrollments, polls, rate
limits, TPM) runs on all five in test_registration_scenarios.py; the project's own device client
is tested in tests/device/.
"""

from __future__ import annotations

import base64
import datetime as dt
import ssl
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisiond import pki
from provisiond.protocol.sas import build_sas_token, derive_device_key
from tests._hub_peer import HubPeer
from tests._server import RunningServer, start_server

V = {"api-version": "2021-06-01"}


def uid(prefix: str = "d") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def pem(cert: Any) -> str:
    return pki.certificate_pem(cert).decode()


class Device:
    """Raw HTTPS calls to the device API, as a device would make them."""

    def __init__(
        self,
        server: RunningServer,
        registration_id: str,
        *,
        credential: pki.Issued | None = None,
        tmp: Path | None = None,
    ) -> None:
        self.server = server
        self.registration_id = registration_id
        ctx = ssl.create_default_context(cafile=server.ca_file)
        if credential is not None:
            assert tmp is not None
            prefix = tmp / uuid.uuid4().hex
            pki.write_issued(credential, prefix, chain=True)
            ctx.load_cert_chain(str(pki.chain_path(prefix)), str(pki.key_path(prefix)))
        self.http = httpx.Client(base_url=server.base_url, verify=ctx, timeout=10)

    def token(self, key: str, *, ttl: int = 3600, resource: str | None = None) -> str:
        resource = resource or f"{self.server.id_scope}/registrations/{self.registration_id}"
        return build_sas_token(resource, key, int(time.time()) + ttl, key_name="registration")

    def register(
        self,
        token: str | None = None,
        *,
        scope: str | None = None,
        body: Any = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        headers = {"Authorization": token} if token else {}
        payload = body if body is not None else {"registrationId": self.registration_id}
        return self.http.put(
            f"/{scope or self.server.id_scope}/registrations/{self.registration_id}/register",
            params=params or V,
            json=payload,
            headers=headers,
        )

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def admin(server: RunningServer) -> Any:
    client = server.client()
    yield client
    client.close()


def assert_denied(
    r: httpx.Response, status: int, code: int, words: str, server: RunningServer | None = None
) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["errorCode"] == code, body
    assert words.lower() in body["message"].lower(), body["message"]
    assert r.headers["x-ms-error-code"] == str(code)
    if server is not None:  # the log line names the cause under the same tracking id
        deadline = time.monotonic() + 2
        while body["trackingId"] not in server.log() and time.monotonic() < deadline:
            time.sleep(0.02)
        line = next(line for line in server.log().splitlines() if body["trackingId"] in line)
        assert str(code) in line


def enroll_symmetric(admin: Any, reg: str, **extra: Any) -> str:
    admin.put(
        f"/enrollments/{reg}", {"registrationId": reg, "attestation": {"type": "symmetricKey"}, **extra}
    )
    key: str = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    return key


def assigned(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 202, r.text
    body: dict[str, Any] = r.json()
    assert body["status"] == "assigned", body
    assert body["operationId"] and body["registrationState"]["assignedHub"]
    return body


# --- symmetric key ---------------------------------------------------------------------------


def test_symmetric_key_individual_assigns_in_one_round_trip(server: RunningServer, admin: Any) -> None:
    reg = uid()
    key = enroll_symmetric(
        admin,
        reg,
        deviceId="the-device",
        initialTwin={"tags": {"site": "a"}, "properties": {"desired": {"rate": 5}}},
    )
    device = Device(server, reg)
    body = assigned(device.register(device.token(key)))
    state = body["registrationState"]
    assert state["deviceId"] == "the-device" and state["substatus"] == "initialAssignment"
    assert state["assignedHub"] == server.info["builtinHub"]
    # Polling the operation answers 200 with the same terminal result.
    poll = device.http.get(
        f"/{server.id_scope}/registrations/{reg}/operations/{body['operationId']}",
        params=V,
        headers={"Authorization": device.token(key)},
    )
    assert poll.status_code == 200 and poll.json()["status"] == "assigned"
    # The hub identity has SAS authentication with the enrollment's keys and the initial twin.
    identity = admin.get(f"/admin/linkedHubs/{state['assignedHub']}/devices/the-device")
    assert identity["authentication"]["type"] == "sas" and identity["registrationId"] == reg
    assert identity["twin"] == {"tags": {"site": "a"}, "desired": {"rate": 5}}
    # The registration record is visible through the service API, and in the enrollment.
    assert admin.get(f"/registrations/{reg}")["status"] == "assigned"
    assert admin.get(f"/enrollments/{reg}")["registrationState"]["deviceId"] == "the-device"
    # The status lookup answers the record.
    lookup = device.http.post(
        f"/{server.id_scope}/registrations/{reg}",
        params=V,
        json={"registrationId": reg},
        headers={"Authorization": device.token(key)},
    )
    assert lookup.status_code == 200 and lookup.json()["assignedHub"] == state["assignedHub"]
    device.close()


def test_group_writes_reach_the_next_registration_at_once(server: RunningServer, admin: Any) -> None:
    """The registration path keeps a copy of the enrollment groups (up to a second old); a
    group written through this node drops it, so the next registration sees the change."""
    gid, key = uid("g"), base64.b64encode(b"k" * 32).decode()
    group = {
        "enrollmentGroupId": gid,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}},
    }

    def register() -> httpx.Response:
        device = Device(server, uid())
        try:
            return device.register(device.token(derive_device_key(key, device.registration_id)))
        finally:
            device.close()

    admin.put(f"/enrollmentGroups/{gid}", group)
    assert assigned(register())["registrationState"]["symmetricKey"]["enrollmentGroupId"] == gid
    admin.put(f"/enrollmentGroups/{gid}", {**group, "provisioningStatus": "disabled"}, if_match="*")
    assert register().json()["status"] == "disabled"
    admin.delete(f"/enrollmentGroups/{gid}")
    assert_denied(register(), 401, 401002, "no symmetric-key enrollment group")
    admin.put(f"/enrollmentGroups/{gid}", group)
    assigned(register())


def test_secondary_key_and_token_without_skn(server: RunningServer, admin: Any) -> None:
    reg = uid()
    enroll_symmetric(admin, reg)
    secondary = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["secondaryKey"]
    device = Device(server, reg)
    token = build_sas_token(f"{server.id_scope}/registrations/{reg}", secondary, int(time.time()) + 60)
    assert "skn" not in token
    assigned(device.register(token, body={"payload": None, "registrationId": reg}))
    device.close()


def test_net_style_body_without_registration_id(server: RunningServer, admin: Any) -> None:
    reg = uid()
    key = enroll_symmetric(admin, reg)
    device = Device(server, reg)
    assigned(device.register(device.token(key), body={"payload": {"model": "x"}}))
    assert admin.get(f"/registrations/{reg}")["payload"] == {"model": "x"}
    device.close()


@pytest.mark.parametrize(
    ("case", "status", "code", "words"),
    [
        pytest.param("unknown-id", 401, 401002, "no individual enrollment", id="unknown-registration-id"),
        pytest.param("wrong-key", 401, 401002, "not signed with a key", id="wrong-key"),
        pytest.param("expired", 401, 401003, "expired", id="expired-token"),
        pytest.param("other-id", 401, 401004, "not ", id="token-for-another-id"),
        pytest.param("other-scope", 401, 401004, "ID scope", id="another-scope"),
        pytest.param("no-credential", 401, 401000, "No credential", id="no-credential"),
        pytest.param("garbage-token", 401, 401000, "SharedAccessSignature", id="malformed-token"),
    ],
)
def test_symmetric_key_denials(
    server: RunningServer, admin: Any, case: str, status: int, code: int, words: str
) -> None:
    reg = uid()
    key = enroll_symmetric(admin, reg)
    device = Device(server, reg if case != "unknown-id" else uid("nobody"))
    wrong = enroll_symmetric(admin, uid())
    token, scope = {
        "unknown-id": (device.token(key), None),
        "wrong-key": (device.token(wrong), None),
        "expired": (device.token(key, ttl=-600), None),
        "other-id": (device.token(key, resource=f"{server.id_scope}/registrations/{uid()}"), None),
        "other-scope": (device.token(key, resource=f"0ne00000000/registrations/{reg}"), "0ne00000000"),
        "no-credential": (None, None),
        "garbage-token": ("Bearer abc", None),
    }[case]
    assert_denied(device.register(token, scope=scope), status, code, words, server)
    if case != "unknown-id":
        assert_error_free_record(admin, reg)
    device.close()


def assert_error_free_record(admin: Any, reg: str) -> None:
    """A denied attestation writes nothing."""
    from provisiond.errors import NotFoundError

    with pytest.raises(NotFoundError):
        admin.get(f"/registrations/{reg}")


def test_no_hub_available_fails_with_400208(server: RunningServer, admin: Any) -> None:
    reg = uid()
    key = enroll_symmetric(admin, reg, allocationPolicy="static")
    device = Device(server, reg)
    r = device.register(device.token(key))
    assert r.status_code == 202 and r.json()["status"] == "failed"
    state = r.json()["registrationState"]
    assert state["errorCode"] == 400208 and "static" in state["errorMessage"]
    assert admin.get(f"/registrations/{reg}")["status"] == "failed"
    device.close()


def test_a_hub_that_cannot_take_identities_answers_assigning(
    server: RunningServer, admin: Any, hub_peer: HubPeer
) -> None:
    """A linked remote hub whose registry refuses writes with a 5xx (this peer serves only the
    link check's read): the registration is recorded 'assigning' and its identity write waits
    in the outbox, retried (tests/service/test_hub_writer.py has the rest)."""
    host = hub_peer.linked_hub().host_name
    admin.put(f"/admin/linkedHubs/{host}", hub_peer.body())
    reg = uid()
    key = enroll_symmetric(admin, reg, iotHubs=[host], allocationPolicy="static")
    device = Device(server, reg)
    r = device.register(device.token(key))
    assert r.status_code == 202 and r.json()["status"] == "assigning", r.text
    assert admin.get(f"/registrations/{reg}")["status"] == "assigning"
    device.close()
    admin.delete(f"/admin/linkedHubs/{host}")


@pytest.mark.parametrize(
    ("body", "params", "code", "words"),
    [
        pytest.param(b"{nope", V, 400004, "not valid JSON", id="malformed-json"),
        pytest.param(b'{"registrationId": 7}', V, 400004, "registrationId", id="wrong-type"),
        pytest.param(b'{"registrationId": "someone-else"}', V, 400004, "differs", id="id-mismatch"),
        pytest.param(b"{}", {}, 400001, "api-version", id="no-api-version"),
    ],
)
def test_bad_requests(
    server: RunningServer, admin: Any, body: bytes, params: dict[str, str], code: int, words: str
) -> None:
    reg = uid()
    key = enroll_symmetric(admin, reg)
    device = Device(server, reg)
    r = device.http.put(
        f"/{server.id_scope}/registrations/{reg}/register",
        params=params,
        content=body,
        headers={"Authorization": device.token(key), "Content-Type": "application/json"},
    )
    assert_denied(r, 400, code, words)
    device.close()


def test_invalid_registration_id(server: RunningServer) -> None:
    device = Device(server, "bad.id.")
    assert_denied(device.register("SharedAccessSignature sr=x&sig=y&se=1"), 400, 400005, "registrationId")
    device.close()


# --- X.509 -----------------------------------------------------------------------------------


def test_x509_group_with_intermediate_and_chain_errors(
    server: RunningServer, admin: Any, tmp_path: Path
) -> None:
    root = pki.make_root_ca("Group Root " + uid())
    inter = pki.make_intermediate_ca("Group Intermediate " + uid(), root)
    gid = uid("xg")
    admin.put(
        f"/enrollmentGroups/{gid}",
        {
            "enrollmentGroupId": gid,
            "attestation": {
                "type": "x509",
                "x509": {"signingCertificates": {"primary": {"certificate": pem(root.cert)}}},
            },
        },
    )
    reg = uid("x")
    device = Device(server, reg, credential=pki.make_device_cert(reg, inter), tmp=tmp_path)
    state = assigned(device.register())["registrationState"]
    assert state["x509"]["enrollmentGroupId"] == gid
    assert state["x509"]["signingCertificateInfo"]["subjectName"].startswith("CN=Group Root")
    identity = admin.get(f"/admin/linkedHubs/{state['assignedHub']}/devices/{reg}")
    # As DPS creates group devices: self-signed, with the leaf's SHA-256 thumbprint.
    leaf_sha256 = state["x509"]["certificateInfo"]["sha256Thumbprint"]
    assert identity["authentication"] == {
        "type": "selfSigned",
        "x509Thumbprint": {"primaryThumbprint": leaf_sha256, "secondaryThumbprint": leaf_sha256},
    }
    device.close()
    # CN that differs from the registration id.
    other = Device(server, uid("x"), credential=pki.make_device_cert(uid("cn"), inter), tmp=tmp_path)
    assert_denied(other.register(), 401, 401010, "not the registration id", server)
    other.close()
    # A leaf that only claims the intermediate's name: signed by another key, does not verify.
    forger_root = pki.make_root_ca(inter.cert.subject.rfc4514_string().removeprefix("CN="))
    forged_inter = pki.make_intermediate_ca(
        inter.cert.subject.rfc4514_string().removeprefix("CN="), forger_root
    )
    reg2 = uid("x")
    forged = pki.Issued(
        pki.make_device_cert(reg2, forged_inter).cert,
        pki.make_device_cert(reg2, forged_inter).key,
        (inter.cert,),
    )
    forged = pki.make_device_cert(reg2, forged_inter)
    forged = pki.Issued(forged.cert, forged.key, (inter.cert,))  # presents the real intermediate
    bad = Device(server, reg2, credential=forged, tmp=tmp_path)
    assert_denied(bad.register(), 401, 401011, "does not verify", server)
    bad.close()
    # An expired device certificate.
    reg3 = uid("x")
    old = pki.make_device_cert(
        reg3,
        inter,
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=30),
        not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1),
    )
    expired = Device(server, reg3, credential=old, tmp=tmp_path)
    assert_denied(expired.register(), 401, 401012, "expired", server)
    expired.close()
    # A chain no group knows.
    stranger_root = pki.make_root_ca("Stranger " + uid())
    reg4 = uid("x")
    stranger = Device(
        server,
        reg4,
        credential=pki.make_device_cert(reg4, pki.make_intermediate_ca("Stranger I", stranger_root)),
        tmp=tmp_path,
    )
    assert_denied(stranger.register(), 401, 401011, "no X.509 enrollment group", server)
    stranger.close()


def test_x509_group_on_intermediate_via_verified_ca_and_disabled_override(
    server: RunningServer, admin: Any, tmp_path: Path
) -> None:
    root = pki.make_root_ca("CA Root " + uid())
    inter = pki.make_intermediate_ca("CA Intermediate " + uid(), root)
    name = uid("ca")
    admin.put(f"/admin/certificates/{name}", {"certificate": pem(inter.cert)})
    gid = uid("xg")
    admin.put(
        f"/enrollmentGroups/{gid}",
        {
            "enrollmentGroupId": gid,
            "attestation": {"type": "x509", "x509": {"caReferences": {"primary": name}}},
        },
    )
    reg = uid("x")
    device = Device(server, reg, credential=pki.make_device_cert(reg, inter), tmp=tmp_path)
    # Not verified yet: refused, and the message says why.
    assert_denied(device.register(), 401, 401011, "not verified")
    code = admin.post(f"/admin/certificates/{name}/generateVerificationCode")["verificationCode"]
    admin.post(
        f"/admin/certificates/{name}/verify",
        {"certificate": pem(pki.make_verification_cert(code, inter).cert)},
    )
    assert assigned(device.register())["registrationState"]["x509"]["enrollmentGroupId"] == gid
    # A disabled individual enrollment for one device of an enabled group denies that device.
    leaf = pki.make_device_cert(uid("x"), inter)
    reg2 = leaf.cert.subject.rfc4514_string().removeprefix("CN=")
    admin.put(
        f"/enrollments/{reg2}",
        {
            "registrationId": reg2,
            "provisioningStatus": "disabled",
            "attestation": {
                "type": "x509",
                "x509": {"clientCertificates": {"primary": {"certificate": pem(leaf.cert)}}},
            },
        },
    )
    blocked = Device(server, reg2, credential=leaf, tmp=tmp_path)
    assert blocked.register().json()["status"] == "disabled"
    device.close()
    blocked.close()


# --- allocation, reprovisioning, idempotency -------------------------------------------------


def _builtin_hub(admin: Any, weight: int = 1) -> str:
    host = f"{uid('hub')}.example.local"
    admin.put(f"/admin/linkedHubs/{host}", {"hostName": host, "builtin": True, "allocationWeight": weight})
    return host


def test_reprovision_policies(server: RunningServer, admin: Any) -> None:
    hub_a, hub_b = _builtin_hub(admin), _builtin_hub(admin)
    twin = {"tags": {"gen": 1}}
    cases = {
        "never": ({"updateHubAssignment": False, "migrateDeviceData": False}, hub_a, "initialAssignment"),
        "migrate": ({"updateHubAssignment": True, "migrateDeviceData": True}, hub_b, "deviceDataMigrated"),
        "reset": ({"updateHubAssignment": True, "migrateDeviceData": False}, hub_b, "deviceDataReset"),
    }
    for policy, expected_hub, substatus in cases.values():
        reg = uid()
        key = enroll_symmetric(
            admin, reg, iotHubs=[hub_a], allocationPolicy="static", reprovisionPolicy=policy, initialTwin=twin
        )
        device = Device(server, reg)
        assert assigned(device.register(device.token(key)))["registrationState"]["assignedHub"] == hub_a
        current = admin.get(f"/enrollments/{reg}")
        admin.put(
            f"/enrollments/{reg}",
            {**current, "iotHubs": [hub_b], "initialTwin": {"tags": {"gen": 2}}},
            if_match=current["etag"],
        )
        state = assigned(device.register(device.token(key)))["registrationState"]
        assert (state["assignedHub"], state["substatus"]) == (expected_hub, substatus)
        if expected_hub == hub_b:
            moved = admin.get(f"/admin/linkedHubs/{hub_b}/devices/{reg}")
            assert moved["twin"]["tags"] == ({"gen": 1} if substatus == "deviceDataMigrated" else {"gen": 2})
            assert [d["deviceId"] for d in admin.get(f"/admin/linkedHubs/{hub_a}/devices")].count(reg) == 0
        device.close()
    admin.delete(f"/admin/linkedHubs/{hub_a}")
    admin.delete(f"/admin/linkedHubs/{hub_b}")


def test_hashed_allocation_is_deterministic_and_weighted(tmp_path: Path) -> None:
    server = start_server(tmp_path / "hashed")
    try:
        with server.client() as admin:
            # Only the two hubs of this test take part in allocation.
            builtin = server.info["builtinHub"]
            hub = admin.get(f"/admin/linkedHubs/{builtin}")
            admin.put(
                f"/admin/linkedHubs/{builtin}", {**hub, "applyAllocationPolicy": False}, if_match=hub["etag"]
            )
            light, heavy = _builtin_hub(admin, 1), _builtin_hub(admin, 3)
            gid = uid("grp")
            admin.put(
                f"/enrollmentGroups/{gid}",
                {"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}},
            )
            gkey = admin.post(f"/enrollmentGroups/{gid}/attestationmechanism")["symmetricKey"]["primaryKey"]
            counts = {light: 0, heavy: 0}
            for i in range(80):
                device = Device(server, f"hashed-{i}")
                first = assigned(
                    device.register(device.token(derive_device_key(gkey, device.registration_id)))
                )
                again = assigned(
                    device.register(device.token(derive_device_key(gkey, device.registration_id)))
                )
                hub_name = first["registrationState"]["assignedHub"]
                assert again["registrationState"]["assignedHub"] == hub_name
                counts[hub_name] += 1
                device.close()
            assert counts[heavy] > counts[light] > 0, counts
    finally:
        server.stop()


def test_concurrent_registrations_of_one_id_make_one_identity_and_record(
    server: RunningServer, admin: Any
) -> None:
    reg = uid()
    key = enroll_symmetric(admin, reg)

    def register_once(_: int) -> dict[str, Any]:
        device = Device(server, reg)
        try:
            return assigned(device.register(device.token(key)))
        finally:
            device.close()

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(register_once, range(24)))
    assert {r["registrationState"]["deviceId"] for r in results} == {reg}
    record = admin.get(f"/registrations/{reg}")
    assert record["status"] == "assigned"
    hub = record["assignedHub"]
    identities = [d for d in admin.get(f"/admin/linkedHubs/{hub}/devices") if d.get("registrationId") == reg]
    assert len(identities) == 1
    assert "Traceback" not in server.log()
