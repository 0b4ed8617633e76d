"""The official Azure IoT Node.js provisioning device SDK against a running provisiond.

The SDK (``azure-iot-provisioning-device`` and its transports, versions pinned in
``tests/interop/node/package.json``) runs unmodified through ``tests/interop/node/register.js``.
Only two things change from what it does against Azure: the host name (``localhost``) and the
trusted CA, which the SDK takes from Node's ``NODE_EXTRA_CA_CERTS``. The SDK always connects to
the standard ports (HTTPS 443, MQTT 8883, AMQP 5671, WebSockets 443), so this module serves them
on 127.0.0.1 and fails if another process holds one of them.

``npm ci`` runs once when ``tests/interop/node/node_modules`` is missing (``.ci/run`` does it
ahead of ``make test``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisiond import pki
from provisiond.protocol.sas import derive_device_key
from provisiond.service_client import ServiceClient
from tests._server import RunningServer, port_is_free, start_server

pytestmark = pytest.mark.interop

NODE_DIR = Path(__file__).parent / "node"
SCRIPT = NODE_DIR / "register.js"
SERVICE_SCRIPT = NODE_DIR / "service.js"
HTTPS_PORT, MQTT_PORT, AMQP_PORT = 443, 8883, 5671
NODE_TIMEOUT = 60  # seconds for one registration (the SDK's own operation timeout is 30 s)

#: Every transport of the SDK (WebSocket variants on the HTTPS port, path /$iothub/websocket).
TRANSPORTS = ["http", "mqtt", "mqtt-ws", "amqp", "amqp-ws"]


@pytest.fixture(scope="session")
def node() -> str:
    """The ``node`` binary, after ``npm ci`` if the SDK is not installed yet."""
    node_bin, npm_bin = shutil.which("node"), shutil.which("npm")
    if node_bin is None or npm_bin is None:
        pytest.fail(
            "the Node.js SDK interop tests need node and npm on PATH "
            "(apt-get install nodejs npm; .ci/run does it)",
            pytrace=False,
        )
    wanted = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    if not all((NODE_DIR / "node_modules" / name).is_dir() for name in wanted):
        try:
            done = subprocess.run(
                [npm_bin, "ci", "--no-audit", "--no-fund"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=300,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"npm ci in {NODE_DIR} did not finish within 300 s", pytrace=False)
        if done.returncode != 0:
            pytest.fail(f"npm ci in {NODE_DIR} failed:\n{done.stdout}\n{done.stderr}", pytrace=False)
    return node_bin


@pytest.fixture(scope="module")
def dps(tmp_path_factory: pytest.TempPathFactory, node: str) -> Iterator[RunningServer]:
    """provisiond on the standard ports of 127.0.0.1, reached as ``localhost``."""
    taken = [port for port in (HTTPS_PORT, MQTT_PORT, AMQP_PORT) if not port_is_free(port)]
    if taken:
        pytest.fail(
            f"port(s) {taken} on 127.0.0.1 are in use: the Node.js SDK only connects to the "
            "standard ports 443/8883/5671, so stop whatever holds them",
            pytrace=False,
        )
    running = start_server(
        tmp_path_factory.mktemp("node-sdk"),
        "--mqtt-port",
        str(MQTT_PORT),
        "--amqp-port",
        str(AMQP_PORT),
        port=HTTPS_PORT,
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def admin(dps: RunningServer) -> Iterator[ServiceClient]:
    client = dps.client()
    yield client
    client.close()


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def run_sdk(
    node: str,
    dps: RunningServer,
    transport: str,
    registration_id: str,
    *,
    key: str | None = None,
    cert: Path | None = None,
    cert_key: Path | None = None,
    trust_ca: bool = True,
) -> tuple[int, dict[str, Any]]:
    """Provision with the Node.js SDK; return its exit code and the JSON it printed."""
    args = [
        node,
        str(SCRIPT),
        "--transport",
        transport,
        "--host",
        "localhost",
        "--id-scope",
        dps.id_scope,
        "--registration-id",
        registration_id,
    ]
    if key is not None:
        args += ["--attestation", "symmetric", "--key", key]
    else:
        assert cert is not None and cert_key is not None
        args += ["--attestation", "x509", "--cert", str(cert), "--cert-key", str(cert_key)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPS_", "NODE_"))}
    if trust_ca:
        env["NODE_EXTRA_CA_CERTS"] = dps.ca_file
    done = subprocess.run(args, cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=NODE_TIMEOUT)
    try:
        printed: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        pytest.fail(
            f"register.js printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
            f"\n--- provisiond log ---\n{dps.log()[-4000:]}"
        )
    return done.returncode, printed


def provisioned(
    node: str, dps: RunningServer, transport: str, registration_id: str, **credential: Any
) -> dict[str, Any]:
    code, result = run_sdk(node, dps, transport, registration_id, **credential)
    assert code == 0, f"{result}\n--- provisiond log ---\n{dps.log()[-4000:]}"
    assert result["status"] == "assigned", result
    assert result["registrationId"] == registration_id
    assert result["assignedHub"] == dps.info["builtinHub"]
    # The service's log line for the assignment names the transport that carried it.
    tag = "https" if transport == "http" else transport
    line = dps.wait_for_log(f"registration {registration_id} assigned to ")
    assert line.endswith(f"[{tag}]"), line
    return result


def write_credential(issued: pki.Issued, directory: Path) -> tuple[Path, Path]:
    """The device's PEM certificate file (its intermediates after it) and key file."""
    prefix = directory / uuid.uuid4().hex
    pki.write_issued(issued, prefix, chain=True)
    return pki.chain_path(prefix), pki.key_path(prefix)


def pem(issued: pki.Issued) -> str:
    return pki.certificate_pem(issued.cert).decode()


# --- symmetric key -----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_symmetric_key_individual(
    node: str, dps: RunningServer, admin: ServiceClient, transport: str
) -> None:
    reg = _uid(f"node-{transport}-sk")
    admin.put(
        f"/enrollments/{reg}",
        {"registrationId": reg, "attestation": {"type": "symmetricKey"}, "deviceId": f"dev-{reg}"},
    )
    key = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    result = provisioned(node, dps, transport, reg, key=key)
    assert result["deviceId"] == f"dev-{reg}"
    assert admin.get(f"/registrations/{reg}")["deviceId"] == f"dev-{reg}"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_symmetric_key_group(node: str, dps: RunningServer, admin: ServiceClient, transport: str) -> None:
    gid = _uid(f"node-{transport}-skg")
    admin.put(f"/enrollmentGroups/{gid}", {"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}})
    group_key = admin.post(f"/enrollmentGroups/{gid}/attestationmechanism")["symmetricKey"]["primaryKey"]
    reg = _uid(f"node-{transport}-skd")
    result = provisioned(node, dps, transport, reg, key=derive_device_key(group_key, reg))
    assert result["deviceId"] == reg
    assert result["symmetricKey"] == {"enrollmentGroupId": gid}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_symmetric_key_surfaces_the_service_error(
    node: str, dps: RunningServer, admin: ServiceClient, transport: str
) -> None:
    reg = _uid(f"node-{transport}-bad")
    admin.put(f"/enrollments/{reg}", {"registrationId": reg, "attestation": {"type": "symmetricKey"}})
    wrong = derive_device_key("AAAA", reg)
    code, error = run_sdk(node, dps, transport, reg, key=wrong)
    assert code == 1, error
    if transport == "http":
        # The SDK maps HTTP 401 to UnauthorizedError and, not finding IoT Hub's "Message" field in
        # the body, makes the whole body its message: "Error: {provisiond's error body}".
        assert error["name"] == "UnauthorizedError", error
        assert "401002" in error["message"], error
        assert f"not signed with a key of the individual enrollment '{reg}'" in error["message"], error
        body = json.loads(error["responseBody"])
    elif transport.startswith("mqtt"):
        # provisiond accepts the CONNECT and answers the register publish with 401 and its error
        # body: the SDK's UnauthorizedError says "incoming message failure" and carries the parsed
        # body as `result`.
        assert error["name"] == "UnauthorizedError", error
        body = error["result"]
    else:
        # SASL PLAIN succeeds; the register message is rejected with amqp:unauthorized-access and
        # the error body as description. The SDK hands that AMQP error object itself to the caller.
        assert error["condition"] == "amqp:unauthorized-access", error
        body = json.loads(error["description"])
    assert body["errorCode"] == 401002, error
    assert f"not signed with a key of the individual enrollment '{reg}'" in body["message"], error
    assert body["trackingId"] in dps.log()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_server_not_trusted_without_its_ca(
    node: str, dps: RunningServer, admin: ServiceClient, transport: str
) -> None:
    reg = _uid(f"node-{transport}-ca")
    admin.put(f"/enrollments/{reg}", {"registrationId": reg, "attestation": {"type": "symmetricKey"}})
    key = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    code, error = run_sdk(node, dps, transport, reg, key=key, trust_ca=False)
    assert code == 1, error
    if transport.startswith("amqp"):
        # The SDK's AMQP layer drops the TLS error and reports only that rhea disconnected.
        assert error == {"name": "NotConnectedError", "message": "rhea: connection disconnected"}, error
    else:
        assert "self-signed certificate in certificate chain" in json.dumps(error), error
    assert f"registration {reg}" not in dps.log()


# --- X.509 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_x509_individual_self_signed(
    node: str, dps: RunningServer, admin: ServiceClient, transport: str, tmp_path: Path
) -> None:
    reg = _uid(f"node-{transport}-x")
    leaf = pki.make_device_cert(reg)
    admin.put(
        f"/enrollments/{reg}",
        {
            "registrationId": reg,
            "attestation": {
                "type": "x509",
                "x509": {"clientCertificates": {"primary": {"certificate": pem(leaf)}}},
            },
        },
    )
    cert, key = write_credential(leaf, tmp_path)
    result = provisioned(node, dps, transport, reg, cert=cert, cert_key=key)
    assert result["deviceId"] == reg
    assert result["x509"]["certificateInfo"]["subjectName"] == f"CN={reg}"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_x509_group_with_intermediate(
    node: str, dps: RunningServer, admin: ServiceClient, transport: str, tmp_path: Path
) -> None:
    root = pki.make_root_ca(_uid("Node Root"))
    inter = pki.make_intermediate_ca(_uid("Node Intermediate"), root)
    gid = _uid(f"node-{transport}-xg")
    admin.put(
        f"/enrollmentGroups/{gid}",
        {
            "enrollmentGroupId": gid,
            "attestation": {
                "type": "x509",
                "x509": {"signingCertificates": {"primary": {"certificate": pem(root)}}},
            },
        },
    )
    reg = _uid(f"node-{transport}-xd")
    device = pki.make_device_cert(reg, inter)
    assert [c.subject for c in device.presented_chain] == [device.cert.subject, inter.cert.subject]
    cert, key = write_credential(device, tmp_path)  # leaf + intermediate in one PEM, as `cert`
    result = provisioned(node, dps, transport, reg, cert=cert, cert_key=key)
    assert result["deviceId"] == reg
    assert result["x509"]["enrollmentGroupId"] == gid
    assert result["x509"]["signingCertificateInfo"]["subjectName"] == root.cert.subject.rfc4514_string()


def test_connection_json_on_port_443_serves_every_client(node: str, dps: RunningServer) -> None:
    """On 443, connection.json names the service as Azure does (``localhost``,
    ``HostName=localhost;``): the Node.js service SDK, which takes the whole HostName as the
    host name to resolve, works with the connection string as it is, and so do the official
    Python service SDK and provisiond's own CLI and clients."""
    cs = dps.connection_string
    assert dps.info["globalEndpoint"] == "localhost"
    assert cs.startswith("HostName=localhost;SharedAccessKeyName=provisioningserviceowner;")

    reg = _uid("node-svc")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPS_", "NODE_"))}
    env |= {"NODE_EXTRA_CA_CERTS": dps.ca_file, "DPS_CONNECTION_STRING": cs, "DPS_REGISTRATION_ID": reg}
    done = subprocess.run(
        [node, str(SERVICE_SCRIPT)],
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert json.loads(done.stdout)["registrationId"] == reg

    from azure.iot.deviceprovisioning import DeviceProvisioningClient

    with DeviceProvisioningClient.from_connection_string(cs, connection_verify=dps.ca_file) as sdk:
        assert sdk.enrollment.get(id=reg)["registrationId"] == reg

    def provisiond(*args: str) -> str:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")}
        ran = subprocess.run(
            [sys.executable, "-m", "provisiond", *args, "--data-dir", str(dps.data_dir)],
            env=clean,
            capture_output=True,
            text=True,
            timeout=NODE_TIMEOUT,
        )
        assert ran.returncode == 0, ran.stderr
        return ran.stdout

    key = json.loads(provisiond("enrollment", "keys", reg, "--json"))["symmetricKey"]["primaryKey"]
    result = json.loads(
        provisiond("device", "register", "--registration-id", reg, "--symmetric-key", key, "--json")
    )
    assert result["status"] == "assigned"
    assert provisiond("policy", "connection-string", "provisioningserviceowner").strip() == cs
