"""The built-in hub's service REST API over real HTTPS against a running ``provisiond serve``
(issue 11, items 1 and 7): addressing in connection.json, identities, twins, queries,
statistics, IoT Hub's shared access policies and error bodies, as the official service SDKs
call them (iothub.md §3)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from provisiond import pki
from provisiond.certificates import sha1_thumbprint
from provisiond.hub.registry import HubRegistry
from tests._hub import HubPaho, Provisioned, server_store
from tests._hub_service import HubService, iothub_error, parse_connection_string
from tests._server import RunningServer


def uid(prefix: str = "hubapi") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def hub(server: RunningServer) -> Iterator[HubService]:
    client = HubService(server.info["hubConnectionString"], ca_file=server.ca_file, port=server.port)
    yield client
    client.close()


@pytest.fixture
def admin(server: RunningServer) -> Iterator[Any]:
    client = server.client()
    yield client
    client.close()


def test_connection_json_names_the_hub_and_its_owner_connection_string(server: RunningServer) -> None:
    info = server.info
    # a new database's first built-in hub is --host (localhost here)
    assert info["builtinHub"] == info["host"] == "localhost"
    fields = parse_connection_string(info["hubConnectionString"])
    assert fields["HostName"] == f"localhost:{server.port}"  # not 443: host:port, as the DPS one
    assert fields["SharedAccessKeyName"] == "iothubowner"
    assert info["builtinHubs"][0] == {
        "hostName": "localhost",
        "connectionString": info["hubConnectionString"],
    }
    # the server certificate covers the hub's name
    pem = (server.data_dir / "pki" / "server-chain.pem").read_bytes()
    cert = x509.load_pem_x509_certificates(pem)[0]
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)


def test_identity_lifecycle(hub: HubService) -> None:
    device_id = uid()
    created = hub.request("PUT", f"/devices/{device_id}", json={"deviceId": device_id})
    assert created.status_code == 200, created.text  # 200, never 201: azure-iot-hub takes 200 only
    device = created.json()
    assert device["deviceId"] == device_id and device["status"] == "enabled"
    assert device["connectionState"] == "Disconnected"
    assert device["authentication"]["type"] == "sas"
    keys = device["authentication"]["symmetricKey"]
    assert keys["primaryKey"] and keys["secondaryKey"] and keys["primaryKey"] != keys["secondaryKey"]
    assert device["generationId"] and device["etag"]
    assert created.headers["etag"] == f'"{device["etag"]}"'
    assert device["lastActivityTime"] == "0001-01-01T00:00:00Z"  # IoT Hub's "never"

    assert hub.request("GET", f"/devices/{device_id}").json() == device
    # a create of an existing id is a 409 DeviceAlreadyExists
    assert iothub_error(hub.request("PUT", f"/devices/{device_id}", json={"deviceId": device_id})) == (
        409,
        "DeviceAlreadyExists",
    )
    # listed with and without the trailing slash (azure-iothub's Registry.list sends /devices/)
    for path in ("/devices", "/devices/"):
        listed = hub.request("GET", path, params={"top": "1000"})
        assert listed.status_code == 200
        assert device_id in {d["deviceId"] for d in listed.json()}

    # update on a stale etag: 412; on the etag: disabled, same generation, new etag
    disabled = {**device, "status": "disabled", "statusReason": "maintenance"}
    stale = hub.request("PUT", f"/devices/{device_id}", json=disabled, headers={"If-Match": '"AAAA"'})
    assert iothub_error(stale) == (412, "PreconditionFailed")
    updated = hub.request(
        "PUT", f"/devices/{device_id}", json=disabled, headers={"If-Match": f'"{device["etag"]}"'}
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["status"] == "disabled" and updated.json()["statusReason"] == "maintenance"
    assert updated.json()["generationId"] == device["generationId"]
    assert updated.json()["etag"] != device["etag"]
    assert updated.json()["authentication"] == device["authentication"]  # keys kept

    # If-Match: "*" (quoted, as both official service SDKs send it) is the wildcard too
    quoted = hub.request("PUT", f"/devices/{device_id}", json=disabled, headers={"If-Match": '"*"'})
    assert quoted.status_code == 200, quoted.text
    twin_star = hub.request(
        "PATCH", f"/twins/{device_id}", json={"tags": {"a": 1}}, headers={"If-Match": '"*"'}
    )
    assert twin_star.status_code == 200, twin_star.text

    # delete on a stale etag: 412; with *: 204; then 404 DeviceNotFound
    assert iothub_error(
        hub.request("DELETE", f"/devices/{device_id}", headers={"If-Match": f'"{device["etag"]}"'})
    ) == (412, "PreconditionFailed")
    deleted = hub.request("DELETE", f"/devices/{device_id}", headers={"If-Match": "*"})
    assert deleted.status_code == 204 and deleted.content == b""
    assert iothub_error(hub.request("GET", f"/devices/{device_id}")) == (404, "DeviceNotFound")
    assert iothub_error(hub.request("DELETE", f"/devices/{device_id}", headers={"If-Match": "*"})) == (
        404,
        "DeviceNotFound",
    )


def test_identities_with_given_keys_and_x509(hub: HubService) -> None:
    device_id = uid()
    keys = {"primaryKey": "A" * 43 + "=", "secondaryKey": "B" * 43 + "="}
    body = {"deviceId": device_id, "authentication": {"type": "sas", "symmetricKey": keys}}
    assert (
        hub.request("PUT", f"/devices/{device_id}", json=body).json()["authentication"]["symmetricKey"]
        == keys
    )
    x509_id = uid()
    thumbprint = "AB" * 32
    body = {
        "deviceId": x509_id,
        "authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": thumbprint}},
    }
    made = hub.request("PUT", f"/devices/{x509_id}", json=body)
    assert made.status_code == 200, made.text
    assert made.json()["authentication"]["x509Thumbprint"]["primaryThumbprint"] == thumbprint
    # bad input: IoT Hub's 400s, never a traceback
    for bad in (
        {"deviceId": "other-id"},
        {"authentication": {"type": "sas", "symmetricKey": {"primaryKey": "not base64!"}}},
        {"status": "sleeping"},
    ):
        status, _ = iothub_error(hub.request("PUT", f"/devices/{uid()}", json=bad))
        assert status == 400, bad
    status, _ = iothub_error(hub.request("PUT", f"/devices/{'x' * 200}", json={}))
    assert status == 400


def test_twin_patch_replace_and_etags(hub: HubService) -> None:
    device_id = uid()
    assert hub.request("PUT", f"/devices/{device_id}", json={"deviceId": device_id}).status_code == 200
    twin = hub.request("GET", f"/twins/{device_id}").json()
    assert twin["deviceId"] == device_id and twin.get("tags", {}) == {}
    assert twin["properties"]["desired"]["$version"] == 1
    assert twin["properties"]["reported"]["$version"] == 1
    etag = twin["etag"]

    patch = {"tags": {"site": "lab", "floor": 2}, "properties": {"desired": {"interval": 5, "mode": "eco"}}}
    patched = hub.request("PATCH", f"/twins/{device_id}", json=patch, headers={"If-Match": f'"{etag}"'})
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["tags"] == {"site": "lab", "floor": 2}
    assert body["properties"]["desired"]["interval"] == 5
    assert body["properties"]["desired"]["$version"] == 2
    assert body["version"] > twin["version"] and body["etag"] != etag
    assert patched.headers["etag"] == f'"{body["etag"]}"'
    # the old etag is stale now
    stale = hub.request("PATCH", f"/twins/{device_id}", json=patch, headers={"If-Match": f'"{etag}"'})
    assert iothub_error(stale) == (412, "PreconditionFailed")
    # null deletes a member
    nulled = hub.request(
        "PATCH",
        f"/twins/{device_id}",
        json={"properties": {"desired": {"mode": None}}},
        headers={"If-Match": "*"},
    ).json()
    assert "mode" not in nulled["properties"]["desired"] and nulled["properties"]["desired"]["$version"] == 3
    # the service cannot write reported properties
    status, _ = iothub_error(
        hub.request("PATCH", f"/twins/{device_id}", json={"properties": {"reported": {"x": 1}}})
    )
    assert status == 400
    # replace: tags and desired become what is sent
    replaced = hub.request(
        "PUT", f"/twins/{device_id}", json={"tags": {"only": True}, "properties": {"desired": {"b": 1}}}
    ).json()
    assert replaced["tags"] == {"only": True}
    assert {k: v for k, v in replaced["properties"]["desired"].items() if not k.startswith("$")} == {"b": 1}
    assert iothub_error(hub.request("GET", f"/twins/{uid()}")) == (404, "DeviceNotFound")
    assert iothub_error(hub.request("PATCH", f"/twins/{uid()}", json=patch)) == (404, "DeviceNotFound")


def test_a_refused_twin_key_cannot_forge_a_log_line(hub: HubService, server: RunningServer) -> None:
    """The 400 for a twin key with a newline quotes the key in the log line: its control
    characters are escaped, so the key cannot start a line of its own (it forged "ERROR ...")."""
    device_id = uid()
    assert hub.request("PUT", f"/devices/{device_id}", json={"deviceId": device_id}).status_code == 200
    forged = "x\n2026-12-06 03:30:00,000 ERROR provisiond.http: FORGED " + device_id + "\n"
    refused = hub.request("PATCH", f"/twins/{device_id}", json={"tags": {forged: 1}})
    assert refused.status_code == 400, refused.text
    line = server.wait_for_log(f"PATCH /twins/{device_id} -> 400", "FORGED")
    assert "x\\n2026-12-06 03:30:00,000 ERROR" in line  # one line, the newline escaped
    assert not any(text.startswith("2026-12-06 03:30:00,000 ERROR") for text in server.log().splitlines())


def test_query_with_where_and_paging(hub: HubService) -> None:
    site = uid("site")
    ids = sorted(uid() for _ in range(3))
    for device_id in ids:
        assert hub.request("PUT", f"/devices/{device_id}", json={"deviceId": device_id}).status_code == 200
        hub.request("PATCH", f"/twins/{device_id}", json={"tags": {"site": site}})
    query = {"query": f"SELECT * FROM devices WHERE tags.site = '{site}'"}
    everything = hub.request("POST", "/devices/query", json=query)
    assert everything.status_code == 200, everything.text
    assert everything.headers["x-ms-item-type"] == "twin"
    assert "x-ms-continuation" not in everything.headers  # the last page
    assert sorted(t["deviceId"] for t in everything.json()) == ids
    assert all(t["tags"]["site"] == site for t in everything.json())

    seen: list[str] = []
    continuation = ""
    for _ in range(5):
        page = hub.request(
            "POST",
            "/devices/query",
            json=query,
            headers={"x-ms-max-item-count": "2", "x-ms-continuation": continuation},
        )
        assert page.status_code == 200 and len(page.json()) <= 2
        seen += [t["deviceId"] for t in page.json()]
        continuation = page.headers.get("x-ms-continuation", "")
        if not continuation:
            break
    assert sorted(seen) == ids

    one = {"query": f"SELECT * FROM devices WHERE deviceId = '{ids[1]}'"}
    assert [t["deviceId"] for t in hub.request("POST", "/devices/query", json=one).json()] == [ids[1]]
    status, name = iothub_error(
        hub.request("POST", "/devices/query", json={"query": "SELECT * FROM nowhere"})
    )
    assert status == 400
    status, _ = iothub_error(hub.request("POST", "/devices/query", json={"nope": 1}))
    assert status == 400


def test_statistics(hub: HubService) -> None:
    before = hub.request("GET", "/statistics/devices").json()
    device_id = uid()
    hub.request("PUT", f"/devices/{device_id}", json={"deviceId": device_id, "status": "disabled"})
    after = hub.request("GET", "/statistics/devices").json()
    assert after["totalDeviceCount"] == before["totalDeviceCount"] + 1
    assert after["disabledDeviceCount"] == before["disabledDeviceCount"] + 1
    assert after["enabledDeviceCount"] == before["enabledDeviceCount"]
    assert "connectedDeviceCount" in hub.request("GET", "/statistics/service").json()


def test_authorization_by_the_hubs_policies(server: RunningServer, hub: HubService, admin: Any) -> None:
    device_id = uid()
    assert iothub_error(hub.request("GET", f"/devices/{device_id}", token="")) == (
        401,
        "IotHubUnauthorizedAccess",
    )
    forged = hub.token(key="A" * 43 + "=")
    assert iothub_error(hub.request("GET", "/devices", token=forged))[0] == 401
    assert iothub_error(hub.request("GET", "/devices", token=hub.token(ttl=-600)))[0] == 401
    unknown = hub.token(key_name="nobody")
    assert iothub_error(hub.request("GET", "/devices", token=unknown))[0] == 401
    # DPS's owner policy is not the hub's
    assert iothub_error(hub.request("GET", "/devices", token=server.token()))[0] == 401

    hub_name = server.info["builtinHub"]
    policies = {p["keyName"]: p for p in admin.get(f"/admin/linkedHubs/{hub_name}/sharedAccessPolicies")}
    assert set(policies) >= {"iothubowner", "service", "device", "registryRead", "registryReadWrite"}
    assert all("primaryKey" not in p for p in policies.values())  # keys stay secret in lists

    def client(name: str) -> HubService:
        keys = admin.post(f"/admin/linkedHubs/{hub_name}/sharedAccessPolicies/{name}/listKeys")
        text = f"HostName={hub.host_name};SharedAccessKeyName={name};SharedAccessKey={keys['primaryKey']}"
        return HubService(text, ca_file=server.ca_file, port=server.port)

    assert hub.request("PUT", f"/devices/{device_id}", json={}).status_code == 200
    reader, service, device, writer = (
        client(n) for n in ("registryRead", "service", "device", "registryReadWrite")
    )
    try:
        assert reader.request("GET", f"/devices/{device_id}").status_code == 200
        assert reader.request("GET", f"/twins/{device_id}").status_code == 200
        assert iothub_error(reader.request("PUT", f"/devices/{uid()}", json={})) == (
            401,
            "IotHubUnauthorizedAccess",
        )
        assert iothub_error(reader.request("PATCH", f"/twins/{device_id}", json={"tags": {"a": 1}}))[0] == 401
        # ServiceConnect: twins and queries, not the identity registry
        assert service.request("PATCH", f"/twins/{device_id}", json={"tags": {"a": 1}}).status_code == 200
        assert (
            service.request("POST", "/devices/query", json={"query": "SELECT * FROM devices"}).status_code
            == 200
        )
        assert iothub_error(service.request("GET", f"/devices/{device_id}"))[0] == 401
        assert iothub_error(device.request("GET", "/devices"))[0] == 401
        assert writer.request("DELETE", f"/devices/{device_id}", headers={"If-Match": "*"}).status_code == 204
    finally:
        for c in (reader, service, device, writer):
            c.close()

    # a policy the operator adds works at once, and stops when deleted
    name = uid("ops")
    made = admin.put(
        f"/admin/linkedHubs/{hub_name}/sharedAccessPolicies/{name}",
        {"keyName": name, "rights": ["RegistryRead"]},
    )
    assert made["primaryKey"] and made["rights"] == ["RegistryRead"]
    added = client(name)
    try:
        assert added.request("GET", "/devices").status_code == 200
        admin.delete(f"/admin/linkedHubs/{hub_name}/sharedAccessPolicies/{name}")
        assert iothub_error(added.request("GET", "/devices"))[0] == 401
    finally:
        added.close()


def test_other_paths_and_versions(hub: HubService, server: RunningServer) -> None:
    # not served: IoT Hub's 400 InvalidOperation, not DPS's 404
    for method, path in (
        ("GET", f"/devices/{uid()}/modules"),
        ("POST", "/devices"),
        ("POST", "/jobs/v2/import"),
    ):
        response = hub.request(method, path)
        if path.startswith("/jobs"):
            assert response.status_code == 404  # not under the hub's prefixes
        else:
            assert iothub_error(response) == (400, "InvalidOperation"), path
    # no api-version
    response = hub.http.get("/devices", headers={"Host": hub.host_name, "Authorization": hub.token()})
    assert iothub_error(response)[0] == 400
    # a body that is not JSON
    device_id = uid()
    response = hub.http.put(
        f"/devices/{device_id}",
        params={"api-version": "2021-04-12"},
        content=b"{nope",
        headers={"Host": hub.host_name, "Authorization": hub.token(), "Content-Type": "application/json"},
    )
    assert iothub_error(response)[0] == 400
    assert "Traceback" not in server.log()


def test_the_admin_api_creates_identities_that_the_hub_serves(
    server: RunningServer, hub: HubService, admin: Any
) -> None:
    hub_name = server.info["builtinHub"]
    device_id = uid()
    created = admin.put(f"/admin/linkedHubs/{hub_name}/devices/{device_id}", {"deviceId": device_id})
    assert created["authentication"]["symmetricKey"]["primaryKey"]
    assert hub.request("GET", f"/devices/{device_id}").json()["etag"] == created["etag"]
    shown = admin.get(f"/admin/linkedHubs/{hub_name}/devices/{device_id}")
    assert shown["deviceId"] == device_id
    admin.delete(f"/admin/linkedHubs/{hub_name}/devices/{device_id}")
    assert hub.request("GET", f"/devices/{device_id}").status_code == 404


def test_several_hubs_are_told_apart_by_host(server: RunningServer, admin: Any) -> None:
    """A second built-in hub has its own policies and identities; the request's Host picks it."""
    other = f"{uid('hub2')}.example.local"
    admin.put(
        f"/admin/linkedHubs/{other}", {"hostName": other, "builtin": True, "applyAllocationPolicy": False}
    )
    try:
        keys = admin.post(f"/admin/linkedHubs/{other}/sharedAccessPolicies/iothubowner/listKeys")
        text = f"HostName={other}:{server.port};SharedAccessKeyName=iothubowner;SharedAccessKey={keys['primaryKey']}"
        second = HubService(text, ca_file=server.ca_file, port=server.port)
        first = HubService(server.info["hubConnectionString"], ca_file=server.ca_file, port=server.port)
        try:
            device_id = uid()
            assert second.request("PUT", f"/devices/{device_id}", json={}).status_code == 200
            assert second.request("GET", f"/devices/{device_id}").status_code == 200
            assert iothub_error(first.request("GET", f"/devices/{device_id}")) == (404, "DeviceNotFound")
            # the first hub's token does not open the second hub
            wrong = first.request("GET", f"/devices/{device_id}", host=f"{other}:{server.port}")
            assert iothub_error(wrong)[0] == 401
        finally:
            first.close()
            second.close()
    finally:
        admin.delete(f"/admin/linkedHubs/{other}")


def test_identities_made_through_the_api_connect_and_hear_of_service_writes(
    server: RunningServer, hub: HubService
) -> None:
    """The REST API and the device side meet: an identity the API created connects over MQTT
    with its generated key, a desired patch through the API reaches it with its version, a
    disable drops it and refuses it, and a delete drops it."""
    device_id = uid()
    made = hub.request("PUT", f"/devices/{device_id}", json={"deviceId": device_id}).json()
    device = Provisioned(
        hub=server.info["builtinHub"],
        device_id=device_id,
        key=made["authentication"]["symmetricKey"]["primaryKey"],
    )
    connected_before = hub.request("GET", "/statistics/service").json()["connectedDeviceCount"]
    client = HubPaho(server, device, clean_session=True).connected()
    try:
        # the connection state is the identity's, and counted (the registry's index column)
        assert (
            hub.request("GET", "/statistics/service").json()["connectedDeviceCount"] == connected_before + 1
        )
        query = {
            "query": f"SELECT * FROM devices WHERE deviceId = '{device_id}' AND connectionState = 'Connected'"
        }
        assert len(hub.request("POST", "/devices/query", json=query).json()) == 1
        assert client.subscribe("$iothub/twin/PATCH/properties/desired/#") == (1,)
        patched = hub.request("PATCH", f"/twins/{device_id}", json={"properties": {"desired": {"rate": 7}}})
        assert patched.status_code == 200
        topic, qos, payload, _ = client.message()
        assert topic == "$iothub/twin/PATCH/properties/desired/?$version=2" and qos == 1
        assert json.loads(payload) == {"rate": 7, "$version": 2}
        assert hub.request("GET", f"/devices/{device_id}").json()["connectionState"] == "Connected"

        # disabled through the API: the connection is closed, a new one refused (rc 3, as IoT Hub)
        current = hub.request("GET", f"/devices/{device_id}").json()
        disabled = hub.request(
            "PUT", f"/devices/{device_id}", json={**current, "status": "disabled"}, headers={"If-Match": "*"}
        )
        assert disabled.status_code == 200
        assert client.next("disconnect")
    finally:
        client.close()
    refused = HubPaho(server, device, clean_session=True)
    try:
        assert refused.connack()[0] != 0
    finally:
        refused.close()

    current = hub.request("GET", f"/devices/{device_id}").json()
    enabled = hub.request(
        "PUT", f"/devices/{device_id}", json={**current, "status": "enabled"}, headers={"If-Match": "*"}
    )
    assert enabled.status_code == 200
    again = HubPaho(server, device, clean_session=True).connected()
    try:
        assert hub.request("DELETE", f"/devices/{device_id}", headers={"If-Match": "*"}).status_code == 204
        assert again.next("disconnect")
    finally:
        again.close()


def test_x509_identities_made_through_the_api_connect_with_their_certificate(
    server: RunningServer, hub: HubService, tmp_path: Path
) -> None:
    """A selfSigned identity the API created, with the SHA-1 thumbprint in lower case (as users
    copy it from openssl), connects with that certificate; another certificate is refused."""
    device_id = uid("x509")
    leaf = pki.make_device_cert(device_id)
    pki.write_issued(leaf, tmp_path / "leaf")
    body = {
        "deviceId": device_id,
        "authentication": {
            "type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": sha1_thumbprint(leaf.cert).lower()},
        },
    }
    assert hub.request("PUT", f"/devices/{device_id}", json=body).status_code == 200
    device = Provisioned(
        hub=server.info["builtinHub"],
        device_id=device_id,
        cert=pki.cert_path(tmp_path / "leaf"),
        key_file=pki.key_path(tmp_path / "leaf"),
    )
    client = HubPaho(server, device, clean_session=True).connected()
    client.close()
    other = pki.make_device_cert(device_id)
    pki.write_issued(other, tmp_path / "other")
    impostor = Provisioned(
        hub=device.hub,
        device_id=device_id,
        cert=pki.cert_path(tmp_path / "other"),
        key_file=pki.key_path(tmp_path / "other"),
    )
    refused = HubPaho(server, impostor, clean_session=True)
    try:
        assert refused.connack()[0] != 0
    finally:
        refused.close()


async def test_a_desired_version_nobody_announces_holds_later_patches_back_briefly(
    server: RunningServer, hub: HubService
) -> None:
    """A desired write that notifies nobody (DPS's re-provisioning, a notifier that died before
    its signal) leaves a gap in the versions a session sees: the next patch goes out anyway, in
    its turn, once the gap wait is over."""
    device_id = uid()
    made = hub.request("PUT", f"/devices/{device_id}", json={"deviceId": device_id}).json()
    device = Provisioned(
        hub=server.info["builtinHub"],
        device_id=device_id,
        key=made["authentication"]["symmetricKey"]["primaryKey"],
    )
    client = await asyncio.to_thread(lambda: HubPaho(server, device, clean_session=True).connected())
    try:
        assert await asyncio.to_thread(client.subscribe, "$iothub/twin/PATCH/properties/desired/#") == (1,)
        async with server_store(server) as store:
            _, silent = await HubRegistry(store).patch_desired(device.hub, device_id, {"silent": 1})
        assert silent == 2
        patched = await asyncio.to_thread(
            hub.request, "PATCH", f"/twins/{device_id}", json={"properties": {"desired": {"loud": 1}}}
        )
        assert patched.status_code == 200
        topic, _, payload, _ = await asyncio.to_thread(client.message)
        assert topic == "$iothub/twin/PATCH/properties/desired/?$version=3"
        assert json.loads(payload) == {"loud": 1, "$version": 3}
    finally:
        client.close()
