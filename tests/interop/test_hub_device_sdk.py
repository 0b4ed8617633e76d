"""The official Python device SDK's hub client (``azure-iot-device`` 2.14, ``IoTHubDeviceClient``)
against provisiond's built-in hub, unmodified, over MQTT and MQTT over WebSockets, with a
symmetric key and with an X.509 certificate: provision (with the SDK's
``ProvisioningDeviceClient`` and with provisiond's own device client), then connect to the
assigned hub, send messages, get the twin, patch reported properties, receive a desired patch
(also one made while it was disconnected, after it reconnects), answer a method invoked from
the service side, receive a cloud-to-device message.

The SDK hard-codes the ports (8883 for MQTT, 443 for WebSockets): this module runs one server
on 127.0.0.1 with ``--mqtt-port 8883 --https-port 443``. The hub's host name does not resolve,
so the SDK is told to connect to ``localhost`` (``gateway_hostname``: the TLS host; the user
name and the SAS token keep the hub's name), and trusts the server's CA through
``server_verification_cert``. The service side (a desired patch, a method, a cloud-to-device
message) is driven from the test process as a second node on the server's database, through the
hub's broker.
"""

from __future__ import annotations

import gc
import queue
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.iot.device import X509, IoTHubDeviceClient, Message, MethodResponse, ProvisioningDeviceClient

from provisiond import pki
from provisiond.device import ProvisioningDeviceClient as OwnClient
from provisiond.device import X509Security
from provisiond.service_client import ServiceClient
from tests._server import RunningServer, start_server, wait_for_free_ports
from tests.interop._hub_service import ServiceSide, events_of

pytestmark = [
    pytest.mark.interop,
    # paho-mqtt 1.6 inside the SDK leaves its wake-up socket pair to the garbage collector, which
    # may run in the middle of a test: those sockets (and only those) are not this test's failure.
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in. <socket\.socket:pytest.PytestUnraisableExceptionWarning"
    ),
]

HTTPS_PORT, MQTT_PORT = 443, 8883
PORT_WAIT = 60.0
WAIT = 15.0
TRANSPORTS = [pytest.param(False, id="mqtt"), pytest.param(True, id="mqtt-ws")]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    if taken := wait_for_free_ports((HTTPS_PORT, MQTT_PORT), PORT_WAIT):
        pytest.fail(
            f"port(s) {taken} on 127.0.0.1 are in use: the Python device SDK only connects to 8883 "
            "(MQTT) and 443 (WebSockets), so stop whatever holds them",
            pytrace=False,
        )
    running = start_server(tmp_path_factory.mktemp("sdk-hub"), "--mqtt-port", str(MQTT_PORT), port=HTTPS_PORT)
    yield running
    running.stop()
    assert "Traceback" not in running.log(), running.log()[-5000:]


@pytest.fixture(scope="module", autouse=True)
def _collect_paho_sockets() -> Iterator[None]:
    """paho-mqtt 1.6 (inside the SDK) leaves sockets to the garbage collector: collect them
    here, quietly, rather than as unraisable ResourceWarnings at the end of the session."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture(scope="module")
def admin(hub: RunningServer) -> Iterator[ServiceClient]:
    with hub.client() as client:
        yield client


@pytest.fixture(scope="module")
def ca_pem(hub: RunningServer) -> str:
    return Path(hub.ca_file).read_text()


@pytest.fixture(scope="module")
def service(hub: RunningServer) -> Iterator[ServiceSide]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("REQUESTS_CA_BUNDLE", hub.ca_file)  # the service SDK's requests trust the server's CA
        side = ServiceSide(hub)
        yield side
        side.close()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


INITIAL_TWIN = {"tags": {"site": "lab"}, "properties": {"desired": {"interval": 5}}}


def provision_symmetric(
    admin: ServiceClient, hub: RunningServer, ca_pem: str, websockets: bool
) -> tuple[str, str, str]:
    """An individual symmetric-key enrollment, registered with the SDK's ProvisioningDeviceClient."""
    reg = uid("hubsdk")
    admin.put(
        f"/enrollments/{reg}",
        {"registrationId": reg, "attestation": {"type": "symmetricKey"}, "initialTwin": INITIAL_TWIN},
    )
    key: str = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    result = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host="localhost",
        registration_id=reg,
        id_scope=hub.id_scope,
        symmetric_key=key,
        server_verification_cert=ca_pem,
        websockets=websockets,
    ).register()
    assert result.status == "assigned", result
    state = result.registration_state
    return state.assigned_hub, state.device_id, key


def provision_x509(admin: ServiceClient, hub: RunningServer, tmp: Path) -> tuple[str, str, Path]:
    """An individual X.509 enrollment, registered with provisiond's own device client."""
    reg = uid("hubx509")
    leaf = pki.make_device_cert(reg)
    pki.write_issued(leaf, tmp / reg)
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
    security = X509Security.from_issued(leaf)
    with OwnClient.create(f"localhost:{HTTPS_PORT}", hub.id_scope, security, ca_file=hub.ca_file) as client:
        result = client.register()
    assert result.assigned_hub and result.device_id
    return result.assigned_hub, result.device_id, tmp / reg


class Received:
    """What the SDK's handlers received, in arrival order."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue()

    def handler(self, kind: str) -> Callable[[Any], None]:
        return lambda value: self.queue.put((kind, value))

    def next(self, kind: str) -> Any:
        deadline = time.monotonic() + WAIT
        while True:
            got, value = self.queue.get(timeout=max(0.01, deadline - time.monotonic()))
            if got == kind:
                return value


def exercise(
    client: Any, service: ServiceSide, hub_name: str, device_id: str, store_reader: Callable[[], list[Any]]
) -> None:
    """Everything item 8 of the issue lists, with one connected IoTHubDeviceClient."""
    received = Received()
    client.on_twin_desired_properties_patch_received = received.handler("desired")
    client.on_message_received = received.handler("c2d")

    def on_method(request: Any) -> None:
        received.queue.put(("method", request))
        client.send_method_response(
            MethodResponse.create_from_method_request(
                request, 200, {"echo": request.payload, "name": request.name}
            )
        )

    client.on_method_request_received = on_method
    client.connect()
    try:
        # Telemetry, acknowledged once stored.
        message = Message(
            '{"temperature": 21.5}',
            message_id="m-1",
            content_encoding="utf-8",
            content_type="application/json",
        )
        message.custom_properties["alert"] = "high"
        client.send_message(message)
        [event] = [e for e in store_reader() if e.system_properties.get("message-id") == "m-1"]
        assert event.body == b'{"temperature": 21.5}' and event.properties == {"alert": "high"}
        assert event.system_properties["content-type"] == "application/json"

        # The twin: the initial twin DPS applied, then a reported patch.
        twin = client.get_twin()
        assert twin["desired"]["interval"] == 5 and twin["desired"]["$version"] == 1
        client.patch_twin_reported_properties({"firmware": "1.2.3"})
        assert client.get_twin()["reported"]["firmware"] == "1.2.3"

        # On connect the SDK read the twin and handed its desired section to the handler.
        assert received.next("desired") == {"interval": 5, "$version": 1}
        # A desired patch while connected.
        version = service.patch_desired(device_id, {"interval": 10})
        patch = received.next("desired")
        assert patch == {"interval": 10, "$version": version}

        # A method invoked from the service side (another node).
        result = service.run(
            service.broker.invoke_method(
                hub_name, device_id, "reboot", {"delay": 3}, response_timeout=15, connect_timeout=5
            )
        )
        assert (result.status, result.payload) == (200, {"echo": {"delay": 3}, "name": "reboot"})
        assert received.next("method").name == "reboot"

        # A cloud-to-device message.
        message_id = service.send_c2d(hub_name, device_id, b"hello device", color="blue")
        c2d = received.next("c2d")
        assert (c2d.data, c2d.message_id, c2d.custom_properties) == (
            b"hello device",
            message_id,
            {"color": "blue"},
        )

        # A desired patch made while the device was away: the SDK reads the twin when it comes
        # back and hands the whole desired section to the handler (its $version changed).
        client.disconnect()
        service.wait_disconnected(device_id)
        version = service.patch_desired(device_id, {"mode": "eco"})
        client.connect()
        patch = received.next("desired")
        assert patch["mode"] == "eco" and patch["interval"] == 10 and patch["$version"] == version

        # The subscriptions survived the reconnect (the SDK does not subscribe again).
        result = service.run(
            service.broker.invoke_method(
                hub_name, device_id, "again", None, response_timeout=15, connect_timeout=5
            )
        )
        assert result.status == 200
    finally:
        client.shutdown()


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_symmetric_key_device(
    hub: RunningServer, admin: ServiceClient, ca_pem: str, service: ServiceSide, websockets: bool
) -> None:
    hub_name, device_id, key = provision_symmetric(admin, hub, ca_pem, websockets)
    assert hub_name == hub.info["builtinHub"]
    client = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=key,
        hostname=hub_name,
        device_id=device_id,
        server_verification_cert=ca_pem,
        gateway_hostname="localhost",
        websockets=websockets,
    )
    exercise(client, service, hub_name, device_id, events_of(service, hub_name, device_id))


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_x509_device(
    hub: RunningServer,
    admin: ServiceClient,
    ca_pem: str,
    service: ServiceSide,
    websockets: bool,
    tmp_path: Path,
) -> None:
    hub_name, device_id, prefix = provision_x509(admin, hub, tmp_path)
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(str(pki.cert_path(prefix)), str(pki.key_path(prefix))),  # type: ignore[no-untyped-call]
        hostname=hub_name,
        device_id=device_id,
        server_verification_cert=ca_pem,
        gateway_hostname="localhost",
        websockets=websockets,
    )
    exercise(client, service, hub_name, device_id, events_of(service, hub_name, device_id))
