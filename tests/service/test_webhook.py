"""Custom allocation over real sockets: a webhook server in the test (plain HTTP, and HTTPS with
its own CA given to ``serve --webhook-ca-file``) records the AllocationRequests provisiond sends
and answers as each test tells it; devices register at the wire level (tests/service/test_device_api.py).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from provisiond import pki
from provisiond.protocol.sas import derive_device_key
from tests._server import RunningServer, start_server
from tests.service.test_device_api import Device, _builtin_hub, assigned, enroll_symmetric, uid

SECRET = "s3cr3t-function-key"

#: What a route answers: (status, body bytes, seconds to wait first).
Answer = tuple[int, bytes, float]


@dataclass
class Received:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> Any:
        return json.loads(self.raw)


@dataclass
class Hook:
    """A webhook server: routes by path, records every request."""

    server: ThreadingHTTPServer
    scheme: str
    routes: dict[str, Callable[[Received], Answer]] = field(default_factory=dict)
    received: dict[str, list[Received]] = field(default_factory=dict)

    def route(self, answer: Callable[[Received], Answer]) -> str:
        """A fresh path answering with ``answer``; its URL (with a function key in the query)."""
        path = f"/api/allocate-{uuid.uuid4().hex[:8]}"
        self.routes[path] = answer
        self.received[path] = []
        host, port = self.server.server_address[:2]
        name = "localhost" if self.scheme == "https" else host
        return f"{self.scheme}://{name}:{port}{path}?code={SECRET}"

    def requests(self, url: str) -> list[Received]:
        return self.received[urlsplit(url).path]


def start_hook(context: ssl.SSLContext | None = None) -> Hook:
    hook: Hook

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            parts = urlsplit(self.path)
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            got = Received(parts.path, parse_qs(parts.query), dict(self.headers.items()), raw)
            hook.received.setdefault(parts.path, []).append(got)
            answer = hook.routes.get(parts.path)
            status, body, delay = answer(got) if answer else (404, b"no such route", 0.0)
            time.sleep(delay)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a client that gave up (timeout) leaves a broken pipe: expected

    server = Server(("127.0.0.1", 0), Handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    hook = Hook(server, "https" if context else "http")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return hook


def answer_json(doc: Any, status: int = 200, delay: float = 0.0) -> Callable[[Received], Answer]:
    return lambda _: (status, json.dumps(doc).encode(), delay)


@pytest.fixture(scope="module")
def hook() -> Iterator[Hook]:
    running = start_hook()
    yield running
    running.server.shutdown()
    running.server.server_close()


@pytest.fixture
def admin(server: RunningServer) -> Any:
    client = server.client()
    yield client
    client.close()


@pytest.fixture
def hubs(admin: Any) -> Iterator[tuple[str, str]]:
    hub_a, hub_b = _builtin_hub(admin), _builtin_hub(admin)
    yield hub_a, hub_b
    admin.delete(f"/admin/linkedHubs/{hub_a}")
    admin.delete(f"/admin/linkedHubs/{hub_b}")


def custom(url: str) -> dict[str, Any]:
    return {
        "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"},
    }


def test_custom_allocation_assigns_where_the_webhook_says(
    server: RunningServer, admin: Any, hook: Hook, hubs: tuple[str, str]
) -> None:
    hub_a, hub_b = hubs

    def pick(got: Received) -> Answer:
        # First registration: hub B; a re-registration moves the device to the other hub.
        current = got.body["deviceRuntimeContext"].get("currentIotHubHostName")
        target = hub_a if current == hub_b else hub_b
        answer = {
            "iotHubHostName": target,
            "initialTwin": {
                "tags": {"from": "webhook", "hub": target},
                "properties": {"desired": {"rate": 7}},
            },
            "payload": {"hello": "device", "hub": target},
        }
        return 200, json.dumps(answer).encode(), 0.0

    url = hook.route(pick)
    reg = uid()
    key = enroll_symmetric(
        admin, reg, iotHubs=[hub_a, hub_b], initialTwin={"tags": {"from": "enrollment"}}, **custom(url)
    )
    device = Device(server, reg)
    body = assigned(
        device.register(device.token(key), body={"registrationId": reg, "payload": {"model": "m1"}})
    )
    state = body["registrationState"]
    assert state["assignedHub"] == hub_b and state["deviceId"] == reg
    assert state["payload"] == {"hello": "device", "hub": hub_b}
    assert admin.get(f"/registrations/{reg}")["payload"] == {"hello": "device", "hub": hub_b}
    # The webhook's initialTwin wins over the enrollment's.
    identity = admin.get(f"/admin/linkedHubs/{hub_b}/devices/{reg}")
    assert identity["twin"] == {"tags": {"from": "webhook", "hub": hub_b}, "desired": {"rate": 7}}

    # The AllocationRequest, as DPS sends it: the URL as given (the function key in the query).
    [first] = hook.requests(url)
    assert first.query == {"code": [SECRET]}
    assert first.headers["Content-Type"] == "application/json"
    request = first.body
    assert set(request) == {"individualEnrollment", "deviceRuntimeContext", "linkedHubs"}
    enrollment = request["individualEnrollment"]
    assert enrollment["registrationId"] == reg and enrollment["allocationPolicy"] == "custom"
    assert enrollment["attestation"] == {"type": "symmetricKey"}  # secrets stripped, as DPS does
    assert key.encode() not in first.raw
    assert request["deviceRuntimeContext"] == {
        "registrationId": reg,
        "symmetricKey": {},
        "payload": {"model": "m1"},
    }
    assert request["linkedHubs"] == [hub_a, hub_b]

    # Re-registration: the device's current hub and device id go to the webhook, which moves it;
    # its initialTwin replaces the twin (no migration).
    body = assigned(device.register(device.token(key)))
    state = body["registrationState"]
    assert state["assignedHub"] == hub_a and state["payload"] == {"hello": "device", "hub": hub_a}
    second = hook.requests(url)[1].body["deviceRuntimeContext"]
    assert second["currentIotHubHostName"] == hub_b and second["currentDeviceId"] == reg
    assert "payload" not in second
    identity = admin.get(f"/admin/linkedHubs/{hub_a}/devices/{reg}")
    assert identity["twin"] == {"tags": {"from": "webhook", "hub": hub_a}, "desired": {"rate": 7}}
    assert [d for d in admin.get(f"/admin/linkedHubs/{hub_b}/devices") if d["deviceId"] == reg] == []
    assert SECRET not in server.log()
    device.close()


def test_custom_allocation_for_a_group(
    server: RunningServer, admin: Any, hook: Hook, hubs: tuple[str, str]
) -> None:
    hub_a, _ = hubs
    url = hook.route(answer_json({"iotHubHostName": hub_a.upper()}))  # host names compare without case
    gid = uid("grp")
    admin.put(
        f"/enrollmentGroups/{gid}",
        {"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}, **custom(url)},
    )
    keys = admin.post(f"/enrollmentGroups/{gid}/attestationmechanism")["symmetricKey"]
    reg = uid()
    device = Device(server, reg)
    state = assigned(device.register(device.token(derive_device_key(keys["primaryKey"], reg))))[
        "registrationState"
    ]
    assert state["assignedHub"] == hub_a and "payload" not in state
    [got] = hook.requests(url)
    request = got.body
    assert "individualEnrollment" not in request
    assert request["enrollmentGroup"]["enrollmentGroupId"] == gid
    assert request["enrollmentGroup"]["attestation"] == {"type": "symmetricKey"}
    assert keys["primaryKey"].encode() not in got.raw and keys["secondaryKey"].encode() not in got.raw
    # No iotHubs in the group: every linked hub that takes part in allocation is a candidate.
    assert {hub_a, server.info["builtinHub"]} <= set(request["linkedHubs"])
    device.close()


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        pytest.param(
            lambda hubs: (500, b"boom: the allocation database is down " + SECRET.encode(), 0.0),
            "answered 500: boom: the allocation database is down",
            id="server-error",
        ),
        pytest.param(lambda hubs: (404, b"", 0.0), "answered 404: (no body)", id="not-found"),
        pytest.param(lambda hubs: (200, b"<html>not json", 0.0), "answered invalid JSON", id="bad-json"),
        pytest.param(
            lambda hubs: (200, b'{"iotHubHostName": 42}', 0.0),
            "answered an invalid AllocationResponse",
            id="wrong-type",
        ),
        pytest.param(lambda hubs: (200, b'{"payload": {}}', 0.0), "answered no iotHubHostName", id="no-hub"),
        pytest.param(
            lambda hubs: (200, b'{"iotHubHostName": "elsewhere.azure-devices.net"}', 0.0),
            "answered iotHubHostName 'elsewhere.azure-devices.net' which is not one of the candidate hubs: {a}, {b}",
            id="unknown-hub",
        ),
        pytest.param(
            lambda hubs: (
                200,
                json.dumps({"iotHubHostName": hubs[0], "initialTwin": {"tags": {"bad key": 1}}}).encode(),
                0.0,
            ),
            "answered an initialTwin beyond IoT Hub's limits: initialTwin.tags.bad key: twin keys cannot contain ' '",
            id="twin-key",
        ),
        pytest.param(
            lambda hubs: (
                200,
                b'{"iotHubHostName": "%s", "initialTwin": {"properties": {"desired": %s}}}'
                % (hubs[0].encode(), b'{"a":' * 12 + b"1" + b"}" * 12),
                0.0,
            ),
            "initialTwin.properties.desired.a.a.a.a.a.a.a.a.a.a.a: nested deeper than 10 levels",
            id="twin-depth",
        ),
        pytest.param(
            lambda hubs: (
                200,
                b'{"iotHubHostName": "%s", "initialTwin": {"properties": {"desired": %s}}}'
                % (hubs[0].encode(), b'{"a":' * 500 + b"1" + b"}" * 500),
                0.0,
            ),
            "JSON nested 503 levels deep (the limit is 64)",
            id="json-depth",
        ),
    ],
)
def test_webhook_failures_fail_the_registration_with_the_cause(
    server: RunningServer,
    admin: Any,
    hook: Hook,
    hubs: tuple[str, str],
    answer: Callable[[tuple[str, str]], Answer],
    words: str,
) -> None:
    url = hook.route(lambda _: answer(hubs))
    reg = uid()
    key = enroll_symmetric(admin, reg, iotHubs=list(hubs), **custom(url))
    device = Device(server, reg)
    r = device.register(device.token(key))
    assert_custom_failure(r.status_code, r.json(), url, words.format(a=hubs[0], b=hubs[1]))
    assert admin.get(f"/registrations/{reg}")["errorCode"] == 400207
    assert len(hook.requests(url)) == 1
    assert_logged_without_secret(server, reg)
    device.close()


def test_unreachable_webhook(server: RunningServer, admin: Any, hubs: tuple[str, str]) -> None:
    url = f"http://127.0.0.1:1/api/allocate?code={SECRET}"
    reg = uid()
    key = enroll_symmetric(admin, reg, iotHubs=list(hubs), **custom(url))
    device = Device(server, reg)
    r = device.register(device.token(key))
    assert_custom_failure(r.status_code, r.json(), url, "could not be reached")
    assert_logged_without_secret(server, reg)
    device.close()


def assert_custom_failure(status: int, body: dict[str, Any], url: str, words: str) -> None:
    assert status == 202, body
    assert body["status"] == "failed", body
    state = body["registrationState"]
    assert state["errorCode"] == 400207, state
    message = state["errorMessage"]
    redacted = url.split("?")[0] + "?[redacted]"
    assert message.startswith(f"Custom allocation webhook {redacted} "), message
    assert words in message, message
    assert SECRET not in message, message


def assert_logged_without_secret(server: RunningServer, reg: str) -> None:
    deadline = time.monotonic() + 2
    while f"registration {reg} failed" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.02)
    [line] = [line for line in server.log().splitlines() if f"registration {reg} failed" in line]
    assert "Custom allocation webhook" in line and "[redacted]" in line
    assert SECRET not in server.log()


def test_https_webhook_with_a_private_ca_and_a_timeout(tmp_path: Path) -> None:
    files = pki.ensure_dev_pki(tmp_path / "webhook")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(files.cert_file), str(files.key_file))
    hook = start_hook(context)
    server = start_server(
        tmp_path / "server", "--webhook-timeout", "1", "--webhook-ca-file", str(files.ca_file)
    )
    try:
        with server.client() as admin:
            builtin = server.info["builtinHub"]
            fine = hook.route(answer_json({"iotHubHostName": builtin, "payload": [1, 2]}))
            slow = hook.route(answer_json({"iotHubHostName": builtin}, delay=3.0))
            for url, expect in ((fine, None), (slow, "timed out after 1 s")):
                reg = uid()
                key = enroll_symmetric(admin, reg, **custom(url))
                device = Device(server, reg)
                started = time.monotonic()
                r = device.register(device.token(key))
                if expect is None:
                    assert assigned(r)["registrationState"]["payload"] == [1, 2]
                else:
                    assert time.monotonic() - started < 2.5
                    assert_custom_failure(r.status_code, r.json(), url, expect)
                    assert_logged_without_secret(server, reg)
                assert len(hook.requests(url)) == 1
                device.close()
    finally:
        server.stop()
        hook.server.shutdown()
        hook.server.server_close()


def test_https_webhook_with_an_unknown_ca_fails(
    server: RunningServer, admin: Any, hubs: tuple[str, str], tmp_path: Path
) -> None:
    files = pki.ensure_dev_pki(tmp_path / "webhook")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(files.cert_file), str(files.key_file))
    hook = start_hook(context)
    try:
        url = hook.route(answer_json({"iotHubHostName": hubs[0]}))
        reg = uid()
        key = enroll_symmetric(admin, reg, iotHubs=list(hubs), **custom(url))
        device = Device(server, reg)
        r = device.register(device.token(key))
        assert_custom_failure(r.status_code, r.json(), url, "could not be reached")
        assert "certificate" in r.json()["registrationState"]["errorMessage"].lower()
        device.close()
    finally:
        hook.server.shutdown()
        hook.server.server_close()
