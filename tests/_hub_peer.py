"""A remote IoT hub's registry read, served over TLS on loopback for the tests that link a hub
by its connection string (provisiond checks the credential then: ``GET /statistics/devices``).

This is the part of IoT Hub's service REST API the link check reads, with IoT Hub's SAS rules
(``sr`` the hub's host name, ``skn`` a policy, HMAC-SHA256 with its key) and IoT Hub's 401 body.
It stands in for a second ``provisiond serve`` (tests/service/test_hub_linking.py links one
too) where a test needs a hub of its own that answers in IoT Hub's words, and lets a test see
the requests it got. The hub is ``127.0.0.2`` at the peer's port, its TLS certificate issued by
a private CA (``caCertificate``).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from provisiond import pki
from provisiond.errors import AuthenticationError
from provisiond.models import LinkedHub
from provisiond.protocol.sas import parse_sas_token, verify_signature
from tests.factories import key, pem

#: The stand-in hub's host name: a loopback address of its own (the served hubs are named
#: ``localhost`` and the like), which its certificate covers.
HOST = "127.0.0.2"
POLICY = "registryReadWrite"


@dataclass
class HubPeer:
    port: int
    ca_pem: str
    policy_key: str
    #: (method, path, Authorization header) of every request, in order.
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    devices: int = 3

    def connection_string(self, key_value: str | None = None, *, policy: str = POLICY) -> str:
        return (
            f"HostName={HOST}:{self.port};SharedAccessKeyName={policy};"
            f"SharedAccessKey={key_value or self.policy_key}"
        )

    def linked_hub(self, **fields: Any) -> LinkedHub:
        fields.setdefault("connection_string", self.connection_string())
        fields.setdefault("ca_certificate", self.ca_pem)
        return LinkedHub(host_name=HOST, **fields)

    def body(self, **fields: Any) -> dict[str, Any]:
        """The admin API's body linking this hub."""
        return {
            "hostName": HOST,
            "connectionString": self.connection_string(),
            "caCertificate": self.ca_pem,
            **fields,
        }


def _unauthorized(handler: BaseHTTPRequestHandler) -> None:
    """IoT Hub's 401: the error code in a header and in the body's Message."""
    body = json.dumps(
        {
            "Message": "ErrorCode:IotHubUnauthorizedAccess;Unauthorized",
            "ExceptionMessage": f"Tracking ID:peer0000-G:0-TimeStamp:{time.strftime('%m/%d/%Y %H:%M:%S')}",
        }
    ).encode()
    handler.send_response(401)
    handler.send_header("Content-Type", "application/json; charset=utf-8")
    handler.send_header("iothub-errorcode", "IotHubUnauthorizedAccess")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _serve(peer: HubPeer, certificate: Path, private_key: Path) -> tuple[ThreadingHTTPServer, int]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            authorization = self.headers.get("Authorization", "")
            peer.requests.append(("GET", self.path, authorization))
            try:
                token = parse_sas_token(authorization)
            except AuthenticationError:
                _unauthorized(self)
                return
            if (
                token.resource.lower() != HOST
                or token.key_name != POLICY
                or token.expiry < time.time()
                or not verify_signature(token, peer.policy_key)
            ):
                _unauthorized(self)
                return
            if self.path.split("?", 1)[0] != "/statistics/devices":
                self.send_error(404)
                return
            body = json.dumps(
                {
                    "totalDeviceCount": peer.devices,
                    "enabledDeviceCount": peer.devices,
                    "disabledDeviceCount": 0,
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((HOST, 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, private_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    return server, server.server_address[1]


@pytest.fixture(scope="session")
def hub_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubPeer]:
    directory = tmp_path_factory.mktemp("hubpeer")
    ca = pki.make_root_ca("hub peer test CA")
    leaf = pki.make_server_cert(ca, [HOST])
    pki.write_issued(leaf, directory / "server", chain=False)
    peer = HubPeer(0, pem(ca), key(b"p"))
    server, peer.port = _serve(peer, pki.cert_path(directory / "server"), pki.key_path(directory / "server"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield peer
    server.shutdown()
    server.server_close()
