"""The official IoT Hub *service* SDKs against a built-in hub's service REST API, unmodified:
the Node.js ``azure-iothub`` Registry (version pinned in ``tests/interop/node/package.json``,
driven through ``tests/interop/node/hub_registry.js``) and the Python ``azure-iot-hub``
``IoTHubRegistryManager`` (2.7, the dev extra).

Both take the hub's connection string from connection.json (``hubConnectionString``) as it is.
The Node.js SDK connects to port 443 only (its connection string's HostName is taken as a host
name), so this module serves HTTPS on 443 of 127.0.0.1, waiting a while if another test run
holds it; the server's host (and so its first built-in hub) is ``localhost``. The CA is trusted
through ``NODE_EXTRA_CA_CERTS`` and ``REQUESTS_CA_BUNDLE`` (msrest uses requests).
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests._server import RunningServer, start_server, wait_for_free_ports
from tests.interop.test_node_sdk import NODE_DIR, node  # noqa: F401  (the fixture: node, after npm ci)

pytestmark = pytest.mark.interop

SCRIPT = NODE_DIR / "hub_registry.js"
HTTPS_PORT = 443
NODE_TIMEOUT = 60


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def hub() -> Iterator[RunningServer]:
    """provisiond with HTTPS on 127.0.0.1:443; its first built-in hub is ``localhost``."""
    taken = wait_for_free_ports((HTTPS_PORT,), timeout=120)
    if taken:
        pytest.fail(
            f"port {HTTPS_PORT} on 127.0.0.1 stayed in use: the Node.js service SDK only connects to 443",
            pytrace=False,
        )
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="hub-service-sdk-") as data_dir:
        running = start_server(Path(data_dir), port=HTTPS_PORT)
        yield running
        running.stop()
        assert "Traceback" not in running.log(), running.log()[-5000:]


def test_connection_string_on_443_names_the_hub_without_a_port(hub: RunningServer) -> None:
    assert hub.info["hubConnectionString"].startswith("HostName=localhost;SharedAccessKeyName=iothubowner;")


def test_node_registry(node: str, hub: RunningServer) -> None:  # noqa: F811
    device_id, tag = uid("node-hub"), uid("tag")
    argv = [node, str(SCRIPT), "--connection-string", hub.info["hubConnectionString"]]
    argv += ["--device-id", device_id, "--tag", tag]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
    env["NODE_EXTRA_CA_CERTS"] = hub.ca_file
    done = subprocess.run(argv, cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=NODE_TIMEOUT)
    try:
        out: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        pytest.fail(
            f"hub_registry.js printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    assert done.returncode == 0, (out, hub.log()[-4000:])

    assert out["created"]["deviceId"] == device_id
    assert out["created"]["authentication"]["symmetricKey"]["primaryKey"]
    assert out["got"]["etag"] == out["created"]["etag"]
    assert device_id in out["listedIds"]
    assert out["updatedTwin"]["tags"] == {"tag": tag}
    assert out["updatedTwin"]["desired"]["rate"] == 5
    assert out["updatedTwin"]["etag"] != out["twinEtag"]
    # the SDK maps 412 to its InvalidEtagError and the 404 body's DeviceNotFound to its error class
    assert out["staleEtagError"]["name"] == "InvalidEtagError", out["staleEtagError"]
    # two pages of one twin each, in device id order
    assert out["queried"] == [
        {"deviceId": device_id, "tags": {"tag": tag}},
        {"deviceId": f"{device_id}-2", "tags": {"tag": tag}},
    ]
    assert out["pages"] == 2
    assert out["disabled"]["status"] == "disabled"
    assert out["statistics"]["totalDeviceCount"] >= 1
    assert out["statistics"]["disabledDeviceCount"] >= 1
    assert out["deletedError"]["name"] == "DeviceNotFoundError", out["deletedError"]


def test_python_registry_manager(hub: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from azure.iot.hub import IoTHubRegistryManager
    from azure.iot.hub.models import QuerySpecification, Twin, TwinProperties
    from msrest.exceptions import HttpOperationError

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", hub.ca_file)
    manager = IoTHubRegistryManager.from_connection_string(hub.info["hubConnectionString"])
    device_id, tag = uid("py-hub"), uid("tag")
    primary, secondary = "P" * 43 + "=", "S" * 43 + "="

    created = manager.create_device_with_sas(device_id, primary, secondary, "enabled")
    assert created.device_id == device_id and created.status == "enabled"
    assert created.authentication.symmetric_key.primary_key == primary
    device = manager.get_device(device_id)
    assert device.etag == created.etag and device.connection_state == "Disconnected"
    assert device_id in {d.device_id for d in manager.get_devices(1000)}

    twin = manager.update_twin(
        device_id,
        Twin(tags={"tag": tag}, properties=TwinProperties(desired={"rate": 5})),
        twin_etag(manager, device_id),
    )
    assert twin.tags == {"tag": tag} and twin.properties.desired["rate"] == 5
    got = manager.get_twin(device_id)
    assert got.etag == twin.etag and got.properties.desired["$version"] == 2
    with pytest.raises(HttpOperationError) as stale:
        manager.update_twin(device_id, Twin(tags={"x": 1}), "AAAAAAAAAAE=")
    assert stale.value.response.status_code == 412

    spec = QuerySpecification(query=f"SELECT * FROM devices WHERE tags.tag = '{tag}'")
    second = f"{device_id}-2"
    manager.create_device_with_sas(second, primary, secondary, "enabled")
    manager.update_twin(second, Twin(tags={"tag": tag}))  # etag "*" (quoted) by default
    page = manager.query_iot_hub(spec, None, 1)
    assert page.type == "twin" and [t.device_id for t in page.items] == [device_id]
    assert page.continuation_token
    last = manager.query_iot_hub(spec, page.continuation_token, 1)
    assert [t.device_id for t in last.items] == [second] and last.continuation_token is None
    manager.delete_device(second)

    updated = manager.update_device_with_sas(device_id, device.etag, primary, secondary, "disabled")
    assert updated.status == "disabled" and updated.etag != device.etag
    statistics = manager.get_device_registry_statistics()
    assert statistics.total_device_count >= 1 and statistics.disabled_device_count >= 1

    manager.delete_device(device_id)
    with pytest.raises(HttpOperationError) as missing:
        manager.get_device(device_id)
    assert missing.value.response.status_code == 404
    assert missing.value.response.headers["iothub-errorcode"] == "DeviceNotFound"


def twin_etag(manager: Any, device_id: str) -> str:
    etag: str = manager.get_twin(device_id).etag
    return etag
