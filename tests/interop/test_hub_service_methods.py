"""Direct methods from the official IoT Hub *service* SDKs, unmodified, through a built-in hub's
REST API (``POST /twins/{id}/methods``): the Node.js ``azure-iothub`` ``Client.invokeDeviceMethod``
(through ``tests/interop/node/hub_methods.js``) and the Python ``azure-iot-hub``
``IoTHubRegistryManager.invoke_device_method``. The device is paho over MQTT, answering with
the request's payload; a device that is not connected gives each SDK IoT Hub's 404
DeviceNotOnline, one that does not exist 404 DeviceNotFound (the Node.js SDK's
DeviceNotFoundError).

As in test_hub_service_sdk.py: the Node.js SDK connects to port 443 only, so the server serves
HTTPS on 443 of 127.0.0.1 (its first built-in hub is then ``localhost``); the CA is trusted
through ``NODE_EXTRA_CA_CERTS`` and ``REQUESTS_CA_BUNDLE``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisiond.service_client import ServiceClient
from tests._hub import HubPaho, provision_symmetric, uid
from tests._server import RunningServer, start_server, wait_for_free_ports
from tests.interop.test_node_sdk import NODE_DIR, node  # noqa: F401  (the fixture: node, after npm ci)

pytestmark = pytest.mark.interop

HTTPS_PORT = 443
NODE_TIMEOUT = 60


@pytest.fixture(scope="module")
def hub() -> Iterator[RunningServer]:
    if taken := wait_for_free_ports((HTTPS_PORT,), timeout=120):
        pytest.fail(f"port {taken} on 127.0.0.1 stayed in use: the Node.js service SDK only connects to 443")
    with tempfile.TemporaryDirectory(prefix="hub-service-methods-") as data_dir:
        running = start_server(Path(data_dir), port=HTTPS_PORT)
        yield running
        running.stop()
        assert "Traceback" not in running.log(), running.log()[-5000:]


class AnsweringDevice:
    """A provisioned device connected over MQTT that answers every method with status 200 and
    ``{"method": name, "echo": request payload}``, in a thread."""

    def __init__(self, server: RunningServer, admin: ServiceClient) -> None:
        self.device = provision_symmetric(server, admin)
        self.client = HubPaho(server, self.device, clean_session=True).connected()
        assert self.client.subscribe("$iothub/methods/POST/#", qos=0) == (0,)
        self.calls: list[tuple[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._answer, daemon=True)
        self._thread.start()

    def _answer(self) -> None:
        while not self._stop.is_set():
            try:
                topic, _, payload, _ = self.client.message(timeout=0.5)
            except Exception:  # queue.Empty: nothing yet
                continue
            name, _, query = topic[len("$iothub/methods/POST/") :].partition("/?")
            rid = dict(p.split("=", 1) for p in query.split("&"))["$rid"]
            request = json.loads(payload) if payload else None
            self.calls.append((name, request))
            reply = json.dumps({"method": name, "echo": request}).encode()
            self.client.publish(f"$iothub/methods/res/200/?$rid={rid}", reply)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()


@pytest.fixture()
def device(hub: RunningServer) -> Iterator[AnsweringDevice]:
    with hub.client() as admin:
        answering = AnsweringDevice(hub, admin)
    try:
        yield answering
    finally:
        answering.close()


def test_node_invoke_device_method(node: str, hub: RunningServer, device: AnsweringDevice) -> None:  # noqa: F811
    argv = [node, str(NODE_DIR / "hub_methods.js"), "--connection-string", hub.info["hubConnectionString"]]
    with hub.client() as admin:
        offline = provision_symmetric(hub, admin).device_id
    argv += ["--device-id", device.device.device_id, "--offline-id", offline, "--missing-id", uid("missing")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
    env["NODE_EXTRA_CA_CERTS"] = hub.ca_file
    done = subprocess.run(argv, cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=NODE_TIMEOUT)
    try:
        out: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"hub_methods.js printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    assert done.returncode == 0, (out, hub.log()[-4000:])
    assert out["result"] == {"status": 200, "payload": {"method": "echo", "echo": {"n": 1, "s": "two"}}}
    assert device.calls == [("echo", {"n": 1, "s": "two"})]
    assert out["offline"]["statusCode"] == 404 and "ErrorCode:DeviceNotOnline" in out["offline"]["body"], out
    assert out["missing"]["name"] == "DeviceNotFoundError" and out["missing"]["statusCode"] == 404, out


def test_python_invoke_device_method(
    hub: RunningServer, device: AnsweringDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    from azure.iot.hub import IoTHubRegistryManager
    from azure.iot.hub.models import CloudToDeviceMethod
    from msrest.exceptions import HttpOperationError

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", hub.ca_file)
    manager = IoTHubRegistryManager.from_connection_string(hub.info["hubConnectionString"])
    request = CloudToDeviceMethod(method_name="reboot", payload={"delay": 3}, response_timeout_in_seconds=10)
    result = manager.invoke_device_method(device.device.device_id, request)
    assert (result.status, result.payload) == (200, {"method": "reboot", "echo": {"delay": 3}})
    assert device.calls == [("reboot", {"delay": 3})]

    with hub.client() as admin:
        offline = provision_symmetric(hub, admin).device_id
    for device_id, code in ((offline, "DeviceNotOnline"), (uid("missing"), "DeviceNotFound")):
        with pytest.raises(HttpOperationError) as raised:
            manager.invoke_device_method(device_id, CloudToDeviceMethod(method_name="x"))
        assert raised.value.response.status_code == 404
        assert raised.value.response.headers["iothub-errorcode"] == code
