"""The official Node.js service SDK (``azure-iothub``'s Registry, pinned in
``tests/interop/node/package.json``, driven through ``tests/interop/node/hub_read.js``) reads
what provisiond's hub writer wrote into a remote hub (issue 12, item 7).

The remote hub is a second ``provisiond serve`` whose built-in hub serves IoT Hub's REST API;
the Node.js SDK connects to port 443 only, so that one serves HTTPS on 127.0.0.1:443 with the
host (and hub) ``localhost``; the registering provisiond's host is ``127.0.0.1``, so that its
own built-in hub has another name.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisiond.protocol.sas import build_sas_token
from tests._server import RunningServer, start_server, wait_for_free_ports
from tests.interop.test_node_sdk import NODE_DIR, node  # noqa: F401  (the fixture: node, after npm ci)
from tests.service.test_device_api import enroll_symmetric, uid

pytestmark = pytest.mark.interop

HTTPS_PORT = 443
TWIN = {"tags": {"line": "7"}, "properties": {"desired": {"interval": 15}}}


@pytest.fixture(scope="module")
def peer() -> Iterator[RunningServer]:
    taken = wait_for_free_ports((HTTPS_PORT,), timeout=120)
    if taken:
        pytest.fail(
            f"port {HTTPS_PORT} on 127.0.0.1 stayed in use (the Node.js SDK connects to 443)", pytrace=False
        )
    with tempfile.TemporaryDirectory(prefix="hub-writer-sdk-") as data_dir:
        running = start_server(Path(data_dir), port=HTTPS_PORT)
        yield running
        running.stop()


def test_node_service_sdk_reads_what_the_writer_wrote(
    node: str,  # noqa: F811
    peer: RunningServer,
    tmp_path: Path,
) -> None:
    dps = start_server(tmp_path / "dps", "--host", "127.0.0.1")
    try:
        hub = peer.info["builtinHub"]
        with dps.client() as admin:
            admin.put(
                f"/admin/linkedHubs/{hub}",
                {
                    "hostName": hub,
                    "connectionString": peer.info["hubConnectionString"],
                    "caCertificate": Path(peer.ca_file).read_text(),
                    "applyAllocationPolicy": False,
                },
            )
            keys = {}
            for _ in range(3):
                reg = uid()
                keys[reg] = enroll_symmetric(
                    admin, reg, iotHubs=[hub], allocationPolicy="static", initialTwin=TWIN
                )
        with httpx.Client(
            base_url=f"https://127.0.0.1:{dps.port}",
            verify=ssl.create_default_context(cafile=dps.ca_file),
            timeout=30,
        ) as http:
            for reg, key in keys.items():
                token = build_sas_token(
                    f"{dps.id_scope}/registrations/{reg}", key, 2_000_000_000, key_name="registration"
                )
                r = http.put(
                    f"/{dps.id_scope}/registrations/{reg}/register",
                    params={"api-version": "2021-06-01"},
                    json={"registrationId": reg},
                    headers={"Authorization": token},
                )
                assert r.status_code == 202 and r.json()["status"] == "assigned", r.text
    finally:
        dps.stop()

    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
    env["NODE_EXTRA_CA_CERTS"] = peer.ca_file
    argv = [node, str(NODE_DIR / "hub_read.js"), "--connection-string", peer.info["hubConnectionString"]]
    argv += ["--device-ids", ",".join(keys)]
    done = subprocess.run(argv, cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=60)
    try:
        out: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"hub_read.js printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    assert done.returncode == 0, out
    for reg, key in keys.items():
        read = out["devices"][reg]
        assert read["device"]["deviceId"] == reg and read["device"]["status"] == "enabled"
        assert read["device"]["authentication"]["type"] == "sas"
        assert read["device"]["authentication"]["symmetricKey"]["primaryKey"] == key
        assert read["twin"]["tags"] == TWIN["tags"]
        assert read["twin"]["desired"]["interval"] == 15
