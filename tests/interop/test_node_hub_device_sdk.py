"""The official Node.js device SDK (``azure-iot-device`` 1.18 with ``azure-iot-device-mqtt``,
unmodified) against provisiond's built-in hub, over MQTT and MQTT over WebSockets, with a
symmetric key and with an X.509 certificate: the Node.js provisioning SDK registers the device
(``register.js``), then the device SDK (``hub_device.js``, one command a line) connects to the
assigned hub, sends messages, gets the twin, patches reported properties, receives a desired
patch (also one made while it was disconnected: the SDK's ``twin.get()`` after it reconnects
hands it to the ``properties.desired`` listener), answers a method invoked from the service side
and receives a cloud-to-device message.

The SDK hard-codes the ports (8883 for MQTT, 443 for WebSockets): the server runs on them on
127.0.0.1. The hub's host name does not resolve, so the device connects to ``localhost``: the
connection string's ``GatewayHostName`` with a key, the same field of the
``X509AuthenticationProvider``'s credentials with a certificate (the user name and the SAS token
keep the hub's name). The SDK trusts the server's CA through ``NODE_EXTRA_CA_CERTS``. The
service side is driven from the test process as a second node on the server's database.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisiond import pki
from provisiond.service_client import ServiceClient
from tests._server import RunningServer, start_server, wait_for_free_ports
from tests.interop._hub_service import ServiceSide, events_of
from tests.interop.test_node_sdk import NODE_DIR, node, run_sdk, write_credential

__all__ = ["node"]  # the fixture, shared with the provisioning SDK's tests

pytestmark = pytest.mark.interop

HTTPS_PORT, MQTT_PORT = 443, 8883
PORT_WAIT = 60.0
WAIT = 30.0  # the SDK's own operation timeouts are longer
SCRIPT = NODE_DIR / "hub_device.js"
METHODS = "reboot,again"
INITIAL_TWIN = {"tags": {"site": "lab"}, "properties": {"desired": {"interval": 5}}}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, node: str) -> Iterator[RunningServer]:
    if taken := wait_for_free_ports((HTTPS_PORT, MQTT_PORT), PORT_WAIT):
        pytest.fail(
            f"port(s) {taken} on 127.0.0.1 are in use: the Node.js device SDK only connects to 8883 "
            "(MQTT) and 443 (WebSockets), so stop whatever holds them",
            pytrace=False,
        )
    running = start_server(
        tmp_path_factory.mktemp("node-hub"), "--mqtt-port", str(MQTT_PORT), port=HTTPS_PORT
    )
    yield running
    running.stop()
    assert "Traceback" not in running.log(), running.log()[-5000:]


@pytest.fixture(scope="module")
def admin(hub: RunningServer) -> Iterator[ServiceClient]:
    with hub.client() as client:
        yield client


@pytest.fixture(scope="module")
def service(hub: RunningServer) -> Iterator[ServiceSide]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("REQUESTS_CA_BUNDLE", hub.ca_file)  # the service SDK's requests trust the server's CA
        side = ServiceSide(hub)
        yield side
        side.close()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class NodeDevice:
    """``hub_device.js`` as a child process: commands on its stdin, answers and events (one JSON
    object a line) read from its stdout by a thread into queues."""

    def __init__(self, node: str, hub: RunningServer, transport: str, host: str, device_id: str, **cred: str):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HUB_", "NODE_", "DPS_"))}
        env |= {
            "NODE_EXTRA_CA_CERTS": hub.ca_file,
            "HUB_TRANSPORT": transport,
            "HUB_HOST": host,
            "HUB_DEVICE_ID": device_id,
            "HUB_GATEWAY": "localhost",
            "HUB_METHODS": METHODS,
        }
        env |= cred
        self.process = subprocess.Popen(
            [node, str(SCRIPT)],
            cwd=NODE_DIR,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lines: list[str] = []
        self._ids = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            (self.events if "event" in obj else self.answers).put(obj)

    def call(self, op: str, **args: Any) -> Any:
        self._ids += 1
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"id": self._ids, "op": op, **args}) + "\n")
        self.process.stdin.flush()
        try:
            answer = self.answers.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(
                f"no answer to {op} from the SDK:\n{''.join(self.lines)}{self.stderr()}"
            ) from None
        assert answer["id"] == self._ids, answer
        assert answer["ok"], f"{op}: {answer['error']}\n{self.stderr()}"
        return answer["result"]

    def event(self, kind: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                got = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {kind} event from the SDK:\n{''.join(self.lines)}") from None
            if got["event"] == kind:
                return got

    def stderr(self) -> str:
        return (
            "" if self.process.poll() is None or self.process.stderr is None else self.process.stderr.read()
        )

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


def exercise(device: NodeDevice, service: ServiceSide, hub_name: str, device_id: str) -> None:
    """Everything item 8 of the issue lists, with one connected Node.js device client."""
    read_events = events_of(service, hub_name, device_id)
    device.call("open")

    # Telemetry, acknowledged once stored.
    device.call(
        "send",
        body='{"temperature": 21.5}',
        messageId="m-1",
        contentType="application/json",
        contentEncoding="utf-8",
        properties={"alert": "high"},
    )
    [event] = [e for e in read_events() if e.system_properties.get("message-id") == "m-1"]
    assert event.body == b'{"temperature": 21.5}' and event.properties == {"alert": "high"}
    assert event.system_properties["content-type"] == "application/json"
    assert event.system_properties["content-encoding"] == "utf-8"

    # The twin: the initial twin DPS applied, then a reported patch.
    twin = device.call("getTwin")
    assert twin["desired"]["interval"] == 5 and twin["desired"]["$version"] == 1
    assert device.event("desired")["patch"]["interval"] == 5  # the listener gets what is there
    device.call("patchReported", patch={"firmware": "1.2.3"})
    assert device.call("getTwin")["reported"]["firmware"] == "1.2.3"

    # A desired patch while connected.
    version = service.patch_desired(device_id, {"interval": 10})
    patch = device.event("desired")["patch"]
    while patch.get("$version") != version:  # the getTwin above fired the listener again
        patch = device.event("desired")["patch"]
    assert patch == {"interval": 10, "$version": version}

    # A method invoked from the service side (another node).
    result = service.run(
        service.broker.invoke_method(
            hub_name, device_id, "reboot", {"delay": 3}, response_timeout=15, connect_timeout=10
        )
    )
    assert (result.status, result.payload) == (200, {"echo": {"delay": 3}, "name": "reboot"})
    assert device.event("method") == {"event": "method", "name": "reboot", "payload": {"delay": 3}}

    # A cloud-to-device message.
    message_id = service.send_c2d(hub_name, device_id, b"hello device", color="blue")
    c2d = device.event("c2d")
    assert (c2d["data"], c2d["messageId"], c2d["properties"]) == (
        "hello device",
        message_id,
        {"color": "blue"},
    )

    # A desired patch made while the device was away: after it reconnects, the SDK's twin.get()
    # merges it and hands the desired section to the listener.
    device.call("close")
    service.wait_disconnected(device_id)
    version = service.patch_desired(device_id, {"mode": "eco"})
    device.call("open")
    twin = device.call("getTwin")
    assert twin["desired"]["mode"] == "eco" and twin["desired"]["$version"] == version
    patch = device.event("desired")["patch"]
    while patch.get("$version") != version:
        patch = device.event("desired")["patch"]
    assert patch["mode"] == "eco" and patch["interval"] == 10

    # Methods still reach it on the new connection.
    result = service.run(
        service.broker.invoke_method(
            hub_name, device_id, "again", None, response_timeout=15, connect_timeout=10
        )
    )
    assert result.status == 200
    assert device.event("method")["name"] == "again"
    # Each request reaches the device once (the next one the SDK sees is the next call's).
    service.run(
        service.broker.invoke_method(
            hub_name, device_id, "reboot", 1, response_timeout=15, connect_timeout=10
        )
    )
    assert device.event("method")["name"] == "reboot"
    device.call("close")


TRANSPORTS = ["mqtt", "mqtt-ws"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_symmetric_key_device(
    node: str, hub: RunningServer, admin: ServiceClient, service: ServiceSide, transport: str
) -> None:
    reg = uid(f"nodehub-{transport}")
    admin.put(
        f"/enrollments/{reg}",
        {"registrationId": reg, "attestation": {"type": "symmetricKey"}, "initialTwin": INITIAL_TWIN},
    )
    key = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    code, result = run_sdk(node, hub, transport, reg, key=key)
    assert code == 0 and result["status"] == "assigned", result
    hub_name, device_id = result["assignedHub"], result["deviceId"]
    assert hub_name == hub.info["builtinHub"]
    device = NodeDevice(node, hub, transport, hub_name, device_id, HUB_SYMMETRIC_KEY=key)
    try:
        exercise(device, service, hub_name, device_id)
    finally:
        device.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_x509_device(
    node: str, hub: RunningServer, admin: ServiceClient, service: ServiceSide, transport: str, tmp_path: Path
) -> None:
    reg = uid(f"nodehubx-{transport}")
    leaf = pki.make_device_cert(reg)
    admin.put(
        f"/enrollments/{reg}",
        {
            "registrationId": reg,
            "initialTwin": INITIAL_TWIN,
            "attestation": {
                "type": "x509",
                "x509": {
                    "clientCertificates": {
                        "primary": {"certificate": pki.certificate_pem(leaf.cert).decode()}
                    }
                },
            },
        },
    )
    cert, key = write_credential(leaf, tmp_path)
    code, result = run_sdk(node, hub, transport, reg, cert=cert, cert_key=key)
    assert code == 0 and result["status"] == "assigned", result
    hub_name, device_id = result["assignedHub"], result["deviceId"]
    device = NodeDevice(
        node, hub, transport, hub_name, device_id, HUB_CERT_FILE=str(cert), HUB_KEY_FILE=str(key)
    )
    try:
        exercise(device, service, hub_name, device_id)
    finally:
        device.close()
