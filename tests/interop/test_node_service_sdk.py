"""The official Azure IoT Node.js provisioning *service* SDK against a running provisiond.

The SDK (``azure-iot-provisioning-service``, version pinned in ``tests/interop/node/package.json``)
runs unmodified through ``tests/interop/node/service_api.js``: it creates an enrollment group and
reads its attestation mechanism (a path the SDK spells in lower case,
``/enrollmentgroups/{id}/attestationmechanism``), creates an X.509 individual enrollment whose
certificate is base64 of PEM text, and queries both collections with ``{"query": "*"}``. Only
the host name and the trusted CA change from what it does against Azure: the SDK always connects
to port 443 (its connection string takes no port), so this module serves HTTPS on 443 of
127.0.0.1, waiting a while if another test run holds it, and passes connection.json's connection
string as it is.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisiond import pki
from tests._server import RunningServer, start_server, wait_for_free_ports
from tests.interop.test_node_sdk import NODE_DIR, node  # noqa: F401  (the fixture: node, after npm ci)

pytestmark = pytest.mark.interop

SCRIPT = NODE_DIR / "service_api.js"
HTTPS_PORT = 443
NODE_TIMEOUT = 60


@pytest.fixture(scope="module")
def dps(tmp_path_factory: pytest.TempPathFactory, node: str) -> Iterator[RunningServer]:  # noqa: F811
    """provisiond with HTTPS on 127.0.0.1:443, reached as ``localhost``."""
    taken = wait_for_free_ports((HTTPS_PORT,), timeout=120)
    if taken:
        pytest.fail(
            f"port {HTTPS_PORT} on 127.0.0.1 stayed in use: the Node.js service SDK only connects to 443",
            pytrace=False,
        )
    running = start_server(tmp_path_factory.mktemp("node-service-sdk"), port=HTTPS_PORT)
    yield running
    running.stop()


def run_service_sdk(node: str, dps: RunningServer, **args: str) -> tuple[int, dict[str, Any]]:  # noqa: F811
    # On 443, connection.json's connection string names the host as Azure's do (no port).
    argv = [node, str(SCRIPT), "--connection-string", dps.connection_string]
    for name, value in args.items():
        argv += [f"--{name.replace('_', '-')}", value]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
    env["NODE_EXTRA_CA_CERTS"] = dps.ca_file
    done = subprocess.run(argv, cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=NODE_TIMEOUT)
    try:
        printed: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        pytest.fail(
            f"service_api.js printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
            f"\n--- provisiond log ---\n{dps.log()[-4000:]}"
        )
    return done.returncode, printed


def test_group_attestation_mechanism_base64_pem_certificate_and_star_queries(
    node: str,  # noqa: F811
    dps: RunningServer,
    tmp_path: Path,
) -> None:
    gid = f"node-svc-grp-{uuid.uuid4().hex[:10]}"
    rid = f"node-svc-x509-{uuid.uuid4().hex[:10]}"
    leaf = pki.make_device_cert(rid)
    pem_file = tmp_path / "leaf.pem"
    pem_file.write_bytes(pki.certificate_pem(leaf.cert))

    code, out = run_service_sdk(node, dps, group_id=gid, registration_id=rid, certificate_file=str(pem_file))
    assert code == 0, f"{out}\n--- provisiond log ---\n{dps.log()[-4000:]}"

    # The group, and its attestation mechanism through the SDK's lower-case path.
    assert out["group"]["enrollmentGroupId"] == gid
    mechanism = out["groupMechanism"]
    assert mechanism["type"] == "symmetricKey" and mechanism["symmetricKey"]["primaryKey"]
    # The create answered with the generated keys, as DPS does.
    assert out["group"]["attestation"] == mechanism

    # The individual enrollment from base64 of PEM: stored as the certificate it is.
    info = out["enrollment"]["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
    assert info["subjectName"] == f"CN={rid}"
    assert info["sha256Thumbprint"] == pki.certificate_info(leaf.cert)["sha256Thumbprint"]
    stored = out["mechanism"]["x509"]["clientCertificates"]["primary"]["certificate"]
    assert stored == pki.certificate_pem(leaf.cert).decode()

    # {"query": "*"}: every record, page after page (10 a page).
    assert rid in out["enrollmentIds"]
    assert gid in out["groupIds"]
