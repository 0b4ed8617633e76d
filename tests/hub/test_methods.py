"""Direct methods, service side, over real TLS against ``provisiond serve``: the hub REST API's
``POST /twins/{id}/methods`` (as the service SDKs call it, with the hub's policies and IoT Hub's
error body), the admin call ``POST /admin/linkedHubs/{hub}/devices/{id}/methods`` and
``provisiond hub invoke-method`` reach a device connected over MQTT (paho as the device), with
IoT Hub's request body, answer, bounds and errors (404103 not online, 504101 timed out, 400 out
of bounds)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from provisiond.cli import cli
from provisiond.service_client import ServiceClient
from tests._hub import HubPaho, Provisioned, provision_symmetric, uid
from tests._hub_service import HubService, iothub_error
from tests._server import RunningServer

INVOKE = "/admin/linkedHubs/{hub}/devices/{device}/methods"
_ENV: dict[str, str | None] = {"PROVISIOND_CONNECTION_STRING": None, "PROVISIOND_DATA_DIR": None}


@pytest.fixture()
def admin(server: RunningServer) -> Iterator[ServiceClient]:
    with server.client() as client:
        yield client


@pytest.fixture()
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as executor:
        yield executor


def invoke(server: RunningServer, device: Provisioned, body: Any, **kwargs: Any) -> httpx.Response:
    with server.http() as http:
        return http.post(
            INVOKE.format(hub=device.hub, device=device.device_id),
            params={"api-version": "2021-04-12"},
            content=body if isinstance(body, bytes) else json.dumps(body).encode(),
            headers={"Authorization": server.token(), "Content-Type": "application/json"},
            timeout=60,
            **kwargs,
        )


def answer_one(client: HubPaho, status: int, respond: Any = None) -> tuple[str, Any]:
    """Take one method request and answer it with ``status`` and ``respond`` (the request's
    payload back when None); return the method name and the request payload."""
    topic, _, payload, _ = client.message()
    assert topic.startswith("$iothub/methods/POST/"), topic
    name, _, query = topic[len("$iothub/methods/POST/") :].partition("/?")
    rid = dict(p.split("=", 1) for p in query.split("&"))["$rid"]
    request = json.loads(payload) if payload else None
    reply = {"echo": request} if respond is None else respond
    client.publish(f"$iothub/methods/res/{status}/?$rid={rid}", json.dumps(reply).encode())
    return name, request


def connected_device(server: RunningServer, admin: ServiceClient) -> tuple[Provisioned, HubPaho]:
    device = provision_symmetric(server, admin)
    client = HubPaho(server, device, clean_session=True).connected()
    assert client.subscribe("$iothub/methods/POST/#", qos=0) == (0,)
    return device, client


def test_a_method_is_invoked_and_the_device_answer_returned(
    server: RunningServer, admin: ServiceClient, pool: ThreadPoolExecutor
) -> None:
    device, client = connected_device(server, admin)
    try:
        body = {"methodName": "reboot", "payload": {"delay": 3}, "responseTimeoutInSeconds": 10}
        pending: Future[httpx.Response] = pool.submit(invoke, server, device, body)
        assert answer_one(client, 201) == ("reboot", {"delay": 3})
        response = pending.result()
    finally:
        client.close()
    assert response.status_code == 200, response.text
    assert response.json() == {"status": 201, "payload": {"echo": {"delay": 3}}}


def test_a_device_that_is_not_connected_is_not_online(server: RunningServer, admin: ServiceClient) -> None:
    device = provision_symmetric(server, admin)
    response = invoke(server, device, {"methodName": "reboot"})
    assert response.status_code == 404, response.text
    # IoT Hub's 404103 DeviceNotOnline, in a DPS body like every admin answer: not a bare 404000
    assert response.json()["errorCode"] == 404103 and response.headers["x-ms-error-code"] == "404103"
    assert "it is not connected" in response.json()["message"]
    missing = invoke(server, Provisioned(device.hub, uid("ghost")), {"methodName": "reboot"})
    assert missing.status_code == 404 and "does not exist" in missing.json()["message"], missing.text
    assert missing.json()["errorCode"] == 404001, missing.text


def test_a_device_that_does_not_answer_in_time_times_out(server: RunningServer, admin: ServiceClient) -> None:
    device, client = connected_device(server, admin)
    try:
        response = invoke(server, device, {"methodName": "slow", "responseTimeoutInSeconds": 5})
        topic, _, _, _ = client.message()  # the request did reach the device
    finally:
        client.close()
    assert topic.startswith("$iothub/methods/POST/slow/?$rid=")
    assert response.status_code == 504, response.text


def test_a_device_that_connects_within_the_connect_timeout_answers(
    server: RunningServer, admin: ServiceClient, pool: ThreadPoolExecutor
) -> None:
    device = provision_symmetric(server, admin)
    body = {"methodName": "wake", "payload": "hi", "connectTimeoutInSeconds": 30}
    pending: Future[httpx.Response] = pool.submit(invoke, server, device, body)
    client = HubPaho(server, device, clean_session=True).connected()
    try:
        assert client.subscribe("$iothub/methods/POST/#", qos=0) == (0,)
        assert answer_one(client, 200, {"awake": True}) == ("wake", "hi")
        response = pending.result()
    finally:
        client.close()
    assert response.status_code == 200 and response.json() == {"status": 200, "payload": {"awake": True}}


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        ({"payload": 1}, "methodName is required"),
        ({"methodName": "a/b"}, "not a method name"),
        ({"methodName": "x" * 129}, "not a method name"),
        ({"methodName": "m", "responseTimeoutInSeconds": 4}, "between 5 and 300"),
        ({"methodName": "m", "responseTimeoutInSeconds": 301}, "between 5 and 300"),
        ({"methodName": "m", "connectTimeoutInSeconds": -1}, "between 0 and 300"),
        ({"methodName": "m", "responseTimeoutInSeconds": "ten"}, "Invalid method invocation"),
        ({"methodName": "m", "payload": "x" * (128 * 1024)}, "limit is 131072"),
    ],
)
def test_a_bad_invocation_is_a_400(server: RunningServer, admin: ServiceClient, body: Any, why: str) -> None:
    device, client = connected_device(server, admin)
    try:
        response = invoke(server, device, body)
    finally:
        client.close()
    assert response.status_code == 400, response.text
    assert why in response.json()["message"]


def test_invoke_method_needs_the_service_config_right(server: RunningServer, admin: ServiceClient) -> None:
    device = provision_symmetric(server, admin)
    with server.http() as http:
        response = http.post(
            INVOKE.format(hub=device.hub, device=device.device_id),
            params={"api-version": "2021-04-12"},
            json={"methodName": "reboot"},
        )
    assert response.status_code == 401, response.text


def test_the_cli_invokes_a_method_and_prints_the_answer(
    server: RunningServer, admin: ServiceClient, pool: ThreadPoolExecutor
) -> None:
    device, client = connected_device(server, admin)
    args = ["hub", "invoke-method", device.device_id, "--mn", "getInfo", "--mp", '{"verbose": true}']
    try:
        pending = pool.submit(
            CliRunner().invoke, cli, [*args, "--timeout", "10", "--data-dir", str(server.data_dir)], env=_ENV
        )
        assert answer_one(client, 200, {"fw": "1.2"}) == ("getInfo", {"verbose": True})
        result = pending.result()
    finally:
        client.close()
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"status": 200, "payload": {"fw": "1.2"}}

    offline = CliRunner().invoke(
        cli,
        ["hub", "invoke-method", device.device_id, "--mn", "x", "--data-dir", str(server.data_dir)],
        env=_ENV,
    )
    assert offline.exit_code == 1 and "it is not connected" in str(offline.exception), offline.output
    assert getattr(offline.exception, "error_code", None) == 404103, "as invoke-method --help promises"


# --- the hub's REST API: POST /twins/{id}/methods ----------------------------------------------


@pytest.fixture()
def hub(server: RunningServer) -> Iterator[HubService]:
    client = HubService(server.info["hubConnectionString"], ca_file=server.ca_file, port=server.port)
    client.http.timeout = httpx.Timeout(60)
    try:
        yield client
    finally:
        client.close()


def test_the_hub_rest_api_invokes_a_method(
    server: RunningServer, admin: ServiceClient, hub: HubService, pool: ThreadPoolExecutor
) -> None:
    device, client = connected_device(server, admin)
    try:
        body = {"methodName": "getInfo", "payload": [1, "two"], "responseTimeoutInSeconds": 10}
        pending = pool.submit(hub.request, "POST", f"/twins/{device.device_id}/methods", json=body)
        assert answer_one(client, 200, {"fw": "1.2"}) == ("getInfo", [1, "two"])
        response = pending.result()
        assert response.status_code == 200, response.text
        assert response.json() == {"status": 200, "payload": {"fw": "1.2"}}

        slow = hub.request(
            "POST",
            f"/twins/{device.device_id}/methods",
            json={"methodName": "slow", "responseTimeoutInSeconds": 5},
        )
        assert client.message()[0].startswith("$iothub/methods/POST/slow/")
        assert iothub_error(slow) == (504, "GatewayTimeout")
    finally:
        client.close()
    bad = hub.request(
        "POST", f"/twins/{device.device_id}/methods", json={"methodName": "m", "responseTimeoutInSeconds": 1}
    )
    assert iothub_error(bad) == (400, "ArgumentInvalid")


def test_the_hub_rest_api_errors_are_iot_hubs(
    server: RunningServer, admin: ServiceClient, hub: HubService
) -> None:
    device = provision_symmetric(server, admin)
    path = f"/twins/{device.device_id}/methods"
    offline = hub.request("POST", path, json={"methodName": "reboot"})
    assert iothub_error(offline) == (404, "DeviceNotOnline")
    missing = hub.request("POST", f"/twins/{uid('ghost')}/methods", json={"methodName": "reboot"})
    assert iothub_error(missing) == (404, "DeviceNotFound")
    assert iothub_error(hub.request("POST", path, json={"methodName": "reboot"}, token="")) == (
        401,
        "IotHubUnauthorizedAccess",
    )
    # ServiceConnect is the right it takes: registryRead's key does not do
    keys = admin.post(f"/admin/linkedHubs/{device.hub}/sharedAccessPolicies/registryRead/listKeys")
    reader = hub.token(key_name="registryRead", key=keys["primaryKey"])
    assert iothub_error(hub.request("POST", path, json={"methodName": "reboot"}, token=reader))[0] == 401
    keys = admin.post(f"/admin/linkedHubs/{device.hub}/sharedAccessPolicies/service/listKeys")
    service = hub.token(key_name="service", key=keys["primaryKey"])
    assert iothub_error(hub.request("POST", path, json={"methodName": "reboot"}, token=service)) == (
        404,
        "DeviceNotOnline",
    )
