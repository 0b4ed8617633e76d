"""The admin API (linked hubs and their identities, CA certificates, shared access policies,
service settings) in-process, over both storage backends."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from provisiond import pki
from provisiond.errors import DpsCode
from provisiond.models import Right
from tests._hub_peer import HubPeer
from tests._inprocess import SERVICE_API as V
from tests._inprocess import InProcess
from tests.factories import body, linked_hub, pem, policy, symmetric_enrollment, uid
from tests.service.test_service_api import assert_error


@pytest.fixture
def http(service: InProcess) -> httpx.AsyncClient:
    return service.http


def certificate_forms(issued: pki.Issued) -> dict[str, str]:
    """A certificate as the service clients send it: PEM, base64 of DER, base64 of PEM."""
    as_pem = pki.certificate_pem(issued.cert)
    return {
        "pem": as_pem.decode(),
        "base64-der": base64.b64encode(pki.certificate_der(issued.cert)).decode(),
        "base64-pem": base64.b64encode(as_pem).decode(),
    }


# --- linked hubs ---------------------------------------------------------------------------------


async def test_linked_hubs(service: InProcess, http: httpx.AsyncClient, hub_peer: HubPeer) -> None:
    hubs = (await http.get("/admin/linkedHubs", params=V)).json()
    assert hubs == [
        {
            "hostName": service.settings.first_builtin_hub,
            "allocationWeight": 1,
            "applyAllocationPolicy": True,
            "builtin": True,
            "etag": hubs[0]["etag"],
        }
    ]
    hub = hub_peer.linked_hub(allocation_weight=5)
    host = hub.host_name
    path = f"/admin/linkedHubs/{host}"
    no_cs = {"hostName": host}
    assert_error(await http.put(path, params=V, json=no_cs), 400, DpsCode.INVALID_BODY, "connectionString")
    r = await http.put(path, params=V, json=body(hub))
    created = r.json()
    assert created["allocationWeight"] == 5 and created["applyAllocationPolicy"] is True
    assert "connectionString" not in created and "builtin" not in created
    assert r.headers["etag"] == created["etag"]
    # the etag rules of every admin record
    assert_error(await http.put(path, params=V, json=body(hub)), 409, DpsCode.CONFLICT, "already exists")
    stale = {"If-Match": '"stale"'}
    assert_error(await http.put(path, params=V, json=no_cs, headers=stale), 412, DpsCode.PRECONDITION_FAILED)
    too_heavy = {"hostName": host, "allocationWeight": 5000}
    assert_error(
        await http.put(path, params=V, json=too_heavy, headers={"If-Match": "*"}),
        400,
        words="allocationWeight",
    )
    # an update without a connection string keeps the stored one (and the hub stays external)
    updated = await http.put(
        path,
        params=V,
        json={"hostName": host, "location": "westeurope", "builtin": True, "caCertificate": hub_peer.ca_pem},
        headers={"If-Match": created["etag"]},
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["location"] == "westeurope" and "builtin" not in updated.json()
    assert updated.json()["allocationWeight"] == 1  # not given: the default, as on create
    stored = await service.management.hubs.get(host)
    assert stored.connection_string is None  # reads never show it ...
    assert (await service.app.state.ctx.linked_hubs())[
        host.lower()
    ].connection_string == hub.connection_string
    # the URL and the body name one hub; host names are DNS names
    assert_error(await http.put(path, params=V, json={"hostName": "other.example.net"}), 400, words="differs")
    assert_error(
        await http.put("/admin/linkedHubs/not_a_host", params=V, json={"hostName": "not_a_host"}),
        400,
        DpsCode.INVALID_ID,
        "host name",
    )
    bad_auth = {"hostName": host, "x509GroupAuthentication": "thumbprint"}
    assert_error(
        await http.put(path, params=V, json=bad_auth, headers={"If-Match": "*"}),
        400,
        words="x509GroupAuthentication",
    )
    # the built-in hub stays linked; others go
    assert_error(
        await http.delete(f"/admin/linkedHubs/{service.settings.first_builtin_hub}", params=V),
        400,
        words="built-in",
    )
    assert_error(await http.delete(path, params=V, headers=stale), 412, DpsCode.PRECONDITION_FAILED)
    assert (await http.delete(path, params=V)).status_code == 204
    assert_error(await http.get(path, params=V), 404, DpsCode.LINKED_HUB_NOT_FOUND)
    assert_error(await http.delete(path, params=V), 404, DpsCode.LINKED_HUB_NOT_FOUND)


async def test_further_builtin_hubs_need_no_connection_string(http: httpx.AsyncClient) -> None:
    hub = linked_hub(f"{uid('idhub')}.example.local", builtin=True, apply_allocation_policy=False)
    created = (await http.put(f"/admin/linkedHubs/{hub.host_name}", params=V, json=body(hub))).json()
    assert created["builtin"] is True and created["applyAllocationPolicy"] is False


async def test_admin_writes_drop_the_registration_paths_copy(
    service: InProcess, http: httpx.AsyncClient, hub_peer: HubPeer
) -> None:
    """The registration path reuses settings and linked hubs for up to a second; an admin write
    on this node drops that copy at once (ServiceContext.invalidate), whatever the clock says."""
    ctx = service.app.state.ctx
    forever = 3600.0
    before = await ctx.linked_hubs(max_age=forever)
    hub = hub_peer.linked_hub()
    await http.put(f"/admin/linkedHubs/{hub.host_name}", params=V, json=body(hub))
    assert set(await ctx.linked_hubs(max_age=forever)) == {*before, hub.host_name.lower()}
    await http.delete(f"/admin/linkedHubs/{hub.host_name}", params=V)
    assert set(await ctx.linked_hubs(max_age=forever)) == set(before)
    assert (await ctx.service_settings(max_age=forever)).allocation_policy.value == "hashed"
    await http.patch("/admin/settings", params=V, json={"allocationPolicy": "geoLatency"})
    assert (await ctx.service_settings(max_age=forever)).allocation_policy.value == "geoLatency"


# --- the identities of the built-in hubs ---------------------------------------------------------


async def test_hub_identities(service: InProcess, http: httpx.AsyncClient) -> None:
    hub = service.settings.first_builtin_hub
    reg = uid("ident")
    created = (await http.put(f"/enrollments/{reg}", params=V, json=body(symmetric_enrollment(reg)))).json()
    await service.register(reg, created["attestation"]["symmetricKey"]["primaryKey"])
    [listed] = (await http.get(f"/admin/linkedHubs/{hub}/devices", params=V)).json()
    assert listed["deviceId"] == reg and listed["registrationId"] == reg
    assert listed["authentication"] == {"type": "sas", "symmetricKey": {}}, "device keys are secrets"
    one = await http.get(f"/admin/linkedHubs/{hub}/devices/{reg}", params=V)
    assert one.json() == listed and one.headers["etag"].startswith('"')
    assert_error(
        await http.get("/admin/linkedHubs/nohub.example.net/devices", params=V),
        404,
        DpsCode.LINKED_HUB_NOT_FOUND,
    )
    assert_error(
        await http.get(f"/admin/linkedHubs/{hub}/devices/{uid()}", params=V),
        404,
        DpsCode.HUB_DEVICE_NOT_FOUND,
    )
    stale = {"If-Match": '"stale"'}
    assert_error(await http.delete(f"/admin/linkedHubs/{hub}/devices/{reg}", params=V, headers=stale), 412)
    assert (await http.delete(f"/admin/linkedHubs/{hub}/devices/{reg}", params=V)).status_code == 204
    assert_error(  # the same 404001 as a read of a device the hub lacks
        await http.delete(f"/admin/linkedHubs/{hub}/devices/{reg}", params=V),
        404,
        DpsCode.HUB_DEVICE_NOT_FOUND,
    )
    # the registration record stays: the device's next registration creates the identity again
    assert (await http.get(f"/registrations/{reg}", params=V)).json()["assignedHub"] == hub


# --- CA certificates -----------------------------------------------------------------------------


async def test_ca_certificate_proof_of_possession(http: httpx.AsyncClient) -> None:
    ca = pki.make_root_ca("PoP Root " + uid())
    name = uid("ca")
    path = f"/admin/certificates/{name}"
    created = (await http.put(path, params=V, json={"certificate": pem(ca)})).json()
    assert created["isVerified"] is False and created["subject"].startswith("CN=PoP Root")
    assert [c["name"] for c in (await http.get("/admin/certificates", params=V)).json()] == [name]
    assert_error(
        await http.post(f"{path}/verify", params=V, json={"certificate": pem(ca)}),
        400,
        words="generateVerificationCode",
    )
    code = (await http.post(f"{path}/generateVerificationCode", params=V)).json()["verificationCode"]
    assert (await http.get(path, params=V)).json()["verificationCode"] == code
    # A certificate with the right CN signed by another CA is refused; so is the wrong CN.
    impostor = pki.make_verification_cert(code, pki.make_root_ca("Impostor"))
    assert_error(
        await http.post(f"{path}/verify", params=V, json={"certificate": pem(impostor)}),
        400,
        DpsCode.VERIFICATION_SIGNATURE,
        "not signed",
    )
    wrong_cn = pki.make_verification_cert("WRONG", ca)
    assert_error(
        await http.post(f"{path}/verify", params=V, json={"certificate": pem(wrong_cn)}),
        400,
        DpsCode.VERIFICATION_CODE_MISMATCH,
        "verification code",
    )
    assert (await http.get(path, params=V)).json()["isVerified"] is False
    verified = await http.post(
        f"{path}/verify", params=V, json={"certificate": pem(pki.make_verification_cert(code, ca))}
    )
    assert verified.status_code == 200, verified.text
    assert verified.json()["isVerified"] is True and "verificationCode" not in verified.json()
    assert verified.headers["etag"] == verified.json()["etag"]
    leaf = pki.make_device_cert("not-a-ca", ca)
    assert_error(
        await http.put(f"/admin/certificates/{uid('ca')}", params=V, json={"certificate": pem(leaf)}),
        400,
        words="not a CA",
    )
    # replacing it starts unverified again; a missing one cannot be replaced; delete
    replaced = await http.put(path, params=V, json={"certificate": pem(ca)}, headers={"If-Match": "*"})
    assert replaced.json()["isVerified"] is False
    assert_error(await http.put(path, params=V, json={"certificate": pem(ca)}), 409, DpsCode.CONFLICT)
    missing = f"/admin/certificates/{uid('ca')}"
    assert_error(
        await http.put(missing, params=V, json={"certificate": pem(ca)}, headers={"If-Match": "*"}),
        412,
        DpsCode.PRECONDITION_FAILED,
    )
    assert_error(
        await http.put("/admin/certificates/bad name", params=V, json={"certificate": pem(ca)}),
        400,
        DpsCode.INVALID_ID,
    )
    assert (await http.delete(path, params=V)).status_code == 204
    assert_error(await http.get(path, params=V), 404, DpsCode.CA_NOT_FOUND)
    assert_error(await http.delete(path, params=V), 404, DpsCode.NOT_FOUND)
    assert_error(await http.post(f"{path}/generateVerificationCode", params=V), 404, DpsCode.CA_NOT_FOUND)


@pytest.mark.parametrize("form", ["base64-der", "base64-pem"])
async def test_ca_certificate_upload_and_verify_accept_every_form(http: httpx.AsyncClient, form: str) -> None:
    ca = pki.make_root_ca("Forms CA " + uid())
    name = uid("ca")
    created = await http.put(
        f"/admin/certificates/{name}", params=V, json={"certificate": certificate_forms(ca)[form]}
    )
    assert created.status_code == 200, created.text
    assert created.json()["sha256Thumbprint"] == pki.certificate_info(ca.cert)["sha256Thumbprint"]
    code = (await http.post(f"/admin/certificates/{name}/generateVerificationCode", params=V)).json()[
        "verificationCode"
    ]
    proof = certificate_forms(pki.make_verification_cert(code, ca))[form]
    verified = await http.post(f"/admin/certificates/{name}/verify", params=V, json={"certificate": proof})
    assert verified.status_code == 200, verified.text
    assert verified.json()["isVerified"] is True
    assert_error(
        await http.put(f"/admin/certificates/{uid('ca')}", params=V, json={"certificate": "%%%"}),
        400,
        DpsCode.INVALID_BODY,
        "certificate is not an X.509 certificate",
    )


# --- shared access policies ----------------------------------------------------------------------


async def test_policies_cannot_lock_everyone_out(service: InProcess, http: httpx.AsyncClient) -> None:
    owner = "/admin/sharedAccessPolicies/provisioningserviceowner"
    [listed] = (await http.get("/admin/sharedAccessPolicies", params=V)).json()
    assert listed["keyName"] == "provisioningserviceowner" and "primaryKey" not in listed
    keys = (await http.post(f"{owner}/listKeys", params=V)).json()
    assert keys["primaryKey"] == service.owner_key and set(keys["rights"]) == {r.value for r in Right}
    assert_error(await http.delete(owner, params=V), 409, DpsCode.CONFLICT, "no policy")
    demoted = {"keyName": "provisioningserviceowner", "rights": ["EnrollmentRead"]}
    assert_error(
        await http.put(owner, params=V, json=demoted, headers={"If-Match": "*"}), 409, words="no policy"
    )
    # with a second administrator, the owner may go
    admin = policy(uid("admin"), Right.SERVICE_CONFIG)
    await http.put(f"/admin/sharedAccessPolicies/{admin.key_name}", params=V, json=body(admin))
    assert (await http.put(owner, params=V, json=demoted, headers={"If-Match": "*"})).status_code == 200
    assert_error(await http.get("/admin/settings", params=V), 403, DpsCode.MISSING_RIGHT)


async def test_policy_keys_and_validation(http: httpx.AsyncClient) -> None:
    name = uid("pol")
    path = f"/admin/sharedAccessPolicies/{name}"
    given = base64.b64encode(b"p" * 32).decode()
    created = await http.put(
        path,
        params=V,
        json={
            "keyName": name,
            "rights": ["EnrollmentWrite", "EnrollmentRead", "EnrollmentRead"],
            "primaryKey": given,
        },
    )
    assert created.json()["rights"] == ["EnrollmentRead", "EnrollmentWrite"]
    assert created.json()["primaryKey"] == given and created.json()["secondaryKey"]
    shown = (await http.get(path, params=V)).json()
    assert "primaryKey" not in shown and shown["etag"] == created.json()["etag"]
    # an update without keys keeps them
    kept = await http.put(
        path,
        params=V,
        json={"keyName": name, "rights": ["EnrollmentRead"]},
        headers={"If-Match": shown["etag"]},
    )
    assert (
        kept.json()["primaryKey"] == given and kept.json()["secondaryKey"] == created.json()["secondaryKey"]
    )
    other = uid("pol")
    cases: list[tuple[str, dict[str, Any], str]] = [
        (name, {"keyName": "other", "rights": ["EnrollmentRead"]}, "differs"),
        (other, {"keyName": other, "rights": []}, "rights must list"),
        ("bad name!", {"keyName": "bad name!", "rights": ["EnrollmentRead"]}, "Invalid policy name"),
    ]
    for target, doc, words in cases:
        r = await http.put(
            f"/admin/sharedAccessPolicies/{target}", params=V, json=doc, headers={"If-Match": "*"}
        )
        assert_error(r, 400, words=words)
    short = {"keyName": name, "rights": ["EnrollmentRead"], "secondaryKey": base64.b64encode(b"s").decode()}
    assert_error(
        await http.put(path, params=V, json=short, headers={"If-Match": "*"}), 400, words="secondaryKey"
    )
    assert (await http.delete(path, params=V)).status_code == 204
    assert_error(await http.get(path, params=V), 404, DpsCode.POLICY_NOT_FOUND)
    assert_error(await http.delete(path, params=V), 404, DpsCode.POLICY_NOT_FOUND)


# --- settings ------------------------------------------------------------------------------------


async def test_settings(service: InProcess, http: httpx.AsyncClient) -> None:
    settings = (await http.get("/admin/settings", params=V)).json()
    assert settings == {
        "idScope": service.id_scope,
        "allocationPolicy": "hashed",
        "serviceOperationsHostName": "localhost",
        "deviceProvisioningHostName": "localhost",
    }
    assert_error(
        await http.patch("/admin/settings", params=V, json={"idScope": "bad"}), 400, words="ID scope"
    )
    assert_error(
        await http.patch("/admin/settings", params=V, json={"allocationPolicy": "custom"}),
        400,
        words="custom",
    )
    changed = await http.patch(
        "/admin/settings", params=V, json={"idScope": "0ne00000ABC", "allocationPolicy": "static"}
    )
    assert changed.json() == {**settings, "idScope": "0ne00000ABC", "allocationPolicy": "static"}
    assert (await http.get("/admin/settings", params=V)).json() == changed.json()
    assert_error(await http.delete("/admin/settings", params=V), 405, DpsCode.METHOD_NOT_ALLOWED)
