"""The official Python device SDK (``azure-iot-device`` 2.14, ``ProvisioningDeviceClient``)
against provisiond over MQTT and MQTT over WebSockets.

The SDK hard-codes the ports (8883 for MQTT, 443 for WebSockets) and forces TLS 1.2, so this
module runs one server on 127.0.0.1 with ``--mqtt-port 8883 --https-port 443``, reached as
``localhost`` and trusted through ``server_verification_cert``; it fails with a clear message
when another process holds one of those ports. The tests share that server and run in order.
"""

from __future__ import annotations

import gc
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.iot.device import X509, ProvisioningDeviceClient
from azure.iot.device import exceptions as sdk_exceptions
from azure.iot.device.common.evented_callback import EventedCallback

from provisiond import pki
from provisiond.protocol.sas import derive_device_key
from provisiond.service_client import ServiceClient
from tests._server import RunningServer, start_server, wait_for_free_ports

pytestmark = pytest.mark.interop

HTTPS_PORT, MQTT_PORT = 443, 8883
PORT_WAIT = 30.0  # seconds to wait for the fixed ports before failing
TRANSPORTS = [pytest.param(False, id="mqtt"), pytest.param(True, id="mqtt-ws")]


@pytest.fixture(scope="module")
def dps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """provisiond on 127.0.0.1:443 (HTTPS and WebSockets) and :8883 (MQTT)."""
    if taken := wait_for_free_ports((HTTPS_PORT, MQTT_PORT), PORT_WAIT):
        pytest.fail(
            f"port(s) {taken} on 127.0.0.1 are in use: the Python device SDK only connects to 8883 "
            "(MQTT) and 443 (WebSockets), so stop whatever holds them",
            pytrace=False,
        )
    running = start_server(
        tmp_path_factory.mktemp("sdk-mqtt"), "--mqtt-port", str(MQTT_PORT), port=HTTPS_PORT
    )
    yield running
    running.stop()


@pytest.fixture(scope="module", autouse=True)
def _collect_paho_sockets() -> Iterator[None]:
    """paho-mqtt 1.6 (inside the SDK) leaves its wake-up socket pair to the garbage collector
    when the SDK stops its loop from the loop's own thread; collect them here, quietly, rather
    than as unraisable ResourceWarnings at the end of the session."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture(scope="module")
def admin(dps: RunningServer) -> Iterator[ServiceClient]:
    with dps.client() as client:
        yield client


@pytest.fixture(scope="module")
def ca_pem(dps: RunningServer) -> str:
    return Path(dps.ca_file).read_text()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def pem(cert: Any) -> str:
    return pki.certificate_pem(cert).decode()


def assert_assigned(result: Any, dps: RunningServer, device_id: str) -> None:
    assert result.status == "assigned", result
    assert result.registration_state.assigned_hub == dps.info["builtinHub"]
    assert result.registration_state.device_id == device_id


def x509(cert: Path, key: Path) -> Any:
    return X509(str(cert), str(key))  # type: ignore[no-untyped-call]


def symmetric_client(dps: RunningServer, ca_pem: str, reg: str, key: str, websockets: bool) -> Any:
    return ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host="localhost",
        registration_id=reg,
        id_scope=dps.id_scope,
        symmetric_key=key,
        server_verification_cert=ca_pem,
        websockets=websockets,
    )


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_symmetric_key_individual(
    dps: RunningServer, admin: ServiceClient, ca_pem: str, websockets: bool
) -> None:
    reg = uid("py-sk")
    admin.put(
        f"/enrollments/{reg}",
        {"registrationId": reg, "deviceId": f"{reg}-dev", "attestation": {"type": "symmetricKey"}},
    )
    key = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    client = symmetric_client(dps, ca_pem, reg, key, websockets)
    client.provisioning_payload = {"model": "py-sdk"}
    start = time.monotonic()
    result = client.register()
    took = time.monotonic() - start
    assert_assigned(result, dps, f"{reg}-dev")
    assert took < 5, f"register() took {took:.2f} s; provisiond answers register with the terminal status"
    record = admin.get(f"/registrations/{reg}")
    assert record["status"] == "assigned" and record["payload"] == {"model": "py-sdk"}


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_symmetric_key_group(dps: RunningServer, admin: ServiceClient, ca_pem: str, websockets: bool) -> None:
    gid = uid("py-skg")
    admin.put(f"/enrollmentGroups/{gid}", {"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}})
    group_key = admin.post(f"/enrollmentGroups/{gid}/attestationmechanism")["symmetricKey"]["primaryKey"]
    reg = uid("py-gd")
    result = symmetric_client(dps, ca_pem, reg, derive_device_key(group_key, reg), websockets).register()
    assert_assigned(result, dps, reg)
    assert [r["registrationId"] for r in admin.post(f"/registrations/{gid}/query")] == [reg]


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_x509_individual(
    dps: RunningServer, admin: ServiceClient, ca_pem: str, websockets: bool, tmp_path: Path
) -> None:
    reg = uid("py-x")
    leaf = pki.make_device_cert(reg)
    pki.write_issued(leaf, tmp_path / "dev")
    admin.put(
        f"/enrollments/{reg}",
        {
            "registrationId": reg,
            "attestation": {
                "type": "x509",
                "x509": {"clientCertificates": {"primary": {"certificate": pem(leaf.cert)}}},
            },
        },
    )
    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host="localhost",
        registration_id=reg,
        id_scope=dps.id_scope,
        x509=x509(pki.cert_path(tmp_path / "dev"), pki.key_path(tmp_path / "dev")),
        server_verification_cert=ca_pem,
        websockets=websockets,
    )
    assert_assigned(client.register(), dps, reg)


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_x509_group_with_an_intermediate(
    dps: RunningServer, admin: ServiceClient, ca_pem: str, websockets: bool, tmp_path: Path
) -> None:
    root = pki.make_root_ca("SDK Root " + uid("r"))
    intermediate = pki.make_intermediate_ca("SDK Intermediate " + uid("i"), root)
    gid = uid("py-xg")
    admin.put(
        f"/enrollmentGroups/{gid}",
        {
            "enrollmentGroupId": gid,
            "attestation": {
                "type": "x509",
                "x509": {"signingCertificates": {"primary": {"certificate": pem(root.cert)}}},
            },
        },
    )
    reg = uid("py-xm")
    pki.write_issued(pki.make_device_cert(reg, intermediate), tmp_path / "dev", chain=True)
    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host="localhost",
        registration_id=reg,
        id_scope=dps.id_scope,
        # The cert file holds the leaf and the intermediate; the SDK presents both.
        x509=x509(pki.chain_path(tmp_path / "dev"), pki.key_path(tmp_path / "dev")),
        server_verification_cert=ca_pem,
        websockets=websockets,
    )
    assert_assigned(client.register(), dps, reg)
    assert [r["registrationId"] for r in admin.post(f"/registrations/{gid}/query")] == [reg]


def test_a_wrong_key_fails_with_the_services_401(
    dps: RunningServer, admin: ServiceClient, ca_pem: str
) -> None:
    """The documented choice: a well-formed token signed with the wrong key is attested at
    register (a 401 on the response topic, as DPS does), which this SDK raises as ClientError
    caused by ServiceError; it does not retry it."""
    reg = uid("py-bad")
    admin.put(f"/enrollments/{reg}", {"registrationId": reg, "attestation": {"type": "symmetricKey"}})
    wrong = derive_device_key("AAAAAAAAAAAAAAAAAAAAAA==", reg)
    client = symmetric_client(dps, ca_pem, reg, wrong, False)
    try:
        with pytest.raises(sdk_exceptions.ClientError) as info:
            client.register()
        assert "401" in str(info.value.__cause__)
    finally:
        # The SDK shuts its pipeline down only after a success; without this its timers keep
        # the interpreter waiting at exit.
        done = EventedCallback()  # type: ignore[no-untyped-call]
        client._pipeline.shutdown(callback=done)
        done.wait_for_completion()  # type: ignore[no-untyped-call]
