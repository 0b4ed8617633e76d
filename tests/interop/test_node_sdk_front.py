"""The official Azure IoT Node.js provisioning device SDK through HAProxy terminating TLS on 443
in front of ``provisiond serve --front-port`` (docs/tls-front.md, samples/haproxy/haproxy.cfg):
an X.509 group device presenting an intermediate, over HTTPS and over MQTT and AMQP on
WebSockets, the transports that use port 443. Needs port 443 free and the haproxy binary.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from provisiond import pki
from provisiond.service_client import ServiceClient
from tests import factories
from tests._server import RunningServer, port_is_free
from tests.interop.test_node_sdk import HTTPS_PORT, _uid, node, provisioned, write_credential
from tests.service.test_front import Front, start_front, stop_front

pytestmark = pytest.mark.interop

__all__ = ["node"]  # the fixture, imported for this module's tests


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, node: str) -> Iterator[Front]:
    if not port_is_free(HTTPS_PORT):
        pytest.fail(
            f"port {HTTPS_PORT} on 127.0.0.1 is in use: the Node.js SDK only connects to 443, where "
            "HAProxy must listen",
            pytrace=False,
        )
    running = start_front(tmp_path_factory.mktemp("node-front"), port=HTTPS_PORT)
    yield running
    stop_front(running)


@pytest.fixture(scope="module")
def dps(front: Front) -> RunningServer:
    """provisiond behind HAProxy: the SDK reaches it as ``localhost`` (HAProxy on 443)."""
    return front.server


@pytest.fixture(scope="module")
def admin(dps: RunningServer) -> Iterator[ServiceClient]:
    client = dps.client()
    yield client
    client.close()


@pytest.mark.parametrize("transport", ["http", "mqtt-ws", "amqp-ws"])
def test_x509_group_with_intermediate_through_haproxy(
    node: str, dps: RunningServer, admin: ServiceClient, transport: str, tmp_path: Path
) -> None:
    root = pki.make_root_ca(_uid("Front Node Root"))
    inter = pki.make_intermediate_ca(_uid("Front Node Intermediate"), root)
    gid = _uid(f"front-{transport}-xg")
    admin.put(f"/enrollmentGroups/{gid}", factories.body(factories.x509_group(gid, root)))
    reg = _uid(f"front-{transport}-xd")
    cert, key = write_credential(pki.make_device_cert(reg, inter), tmp_path)
    for _ in range(2):  # a first registration, then the same device again
        result = provisioned(node, dps, transport, reg, cert=cert, cert_key=key)
        assert result["deviceId"] == reg
        assert result["x509"]["enrollmentGroupId"] == gid
