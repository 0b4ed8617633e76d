"""The MQTT and AMQP device transports pointed at something that does not speak their protocol
(the HTTPS port, a TCP echo server, a TLS server that echoes or hangs up): the error says it
could not connect, or that the peer is not an MQTT (AMQP) server and what it sent instead, never
a codec detail such as "A PUBACK packet has the reserved flags"."""

from __future__ import annotations

import os
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisiond import pki
from provisiond.device import ProvisioningDeviceClient, SymmetricKeySecurity, TransportKind
from provisiond.errors import ConnectError, RemoteProtocolError
from tests._server import RunningServer

KEY = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTAxMjM="
STREAMS = [TransportKind.MQTT, TransportKind.AMQP]


class _Peer(socketserver.ThreadingTCPServer):
    """A loopback server that echoes, or hangs up once the client has spoken; over TLS when
    given a context."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, *, echo: bool, tls: ssl.SSLContext | None, ca_file: Path) -> None:
        peer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                if peer.tls is not None:
                    conn = peer.tls.wrap_socket(conn, server_side=True)
                while data := conn.recv(65536):  # hanging up: after the client's first bytes
                    if not peer.echo:
                        break
                    conn.sendall(data)
                conn.close()

        self.echo, self.tls, self.ca_file = echo, tls, ca_file
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"localhost:{self.server_address[1]}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context and the CA file that trusts it."""
    files = pki.ensure_dev_pki(tmp_path_factory.mktemp("peer-pki"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert_file, files.key_file)
    return context, files.ca_file


@pytest.fixture
def peer(request: pytest.FixtureRequest, tls: tuple[ssl.SSLContext, Path]) -> Iterator[_Peer]:
    """``request.param``: (echo, over TLS)."""
    echo, over_tls = request.param
    server = _Peer(echo=echo, tls=tls[0] if over_tls else None, ca_file=tls[1])
    yield server
    server.shutdown()
    server.server_close()


def _register(endpoint: str, transport: TransportKind, ca_file: Path | str) -> None:
    security = SymmetricKeySecurity(registration_id="wrong-peer", symmetric_key=KEY)
    with ProvisioningDeviceClient.create(
        endpoint, "0ne00000000", security, transport, ca_file=ca_file, timeout=20
    ) as client:
        client.register()


@pytest.mark.parametrize("transport", ["mqtt", "amqp"])
def test_the_https_port_is_not_an_mqtt_or_amqp_server(server: RunningServer, transport: str) -> None:
    """``device register --transport mqtt`` aimed at the HTTPS port, as a new user might."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "provisiond",
            "device",
            "register",
            "--data-dir",
            str(server.data_dir),
            "--endpoint",
            f"localhost:{server.port}",
            "--transport",
            transport,
            "--registration-id",
            "wrong-port",
            "--symmetric-key",
            KEY,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    scheme, name = ("mqtts", "MQTT") if transport == "mqtt" else ("amqps", "AMQP")
    expected = f"Error: {scheme}://localhost:{server.port} is not an {name} server. "
    assert proc.stderr.startswith(expected), proc.stderr
    assert "b'HTTP/1.1 400 Bad Request" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr  # no traceback


@pytest.mark.parametrize("peer", [(True, False)], indirect=True)
@pytest.mark.parametrize("transport", STREAMS)
def test_a_plain_tcp_echo_server_cannot_be_connected_to(peer: _Peer, transport: TransportKind) -> None:
    with pytest.raises(ConnectError, match=f"Cannot connect to {transport.value}s://localhost:"):
        _register(peer.endpoint, transport, peer.ca_file)


@pytest.mark.parametrize("peer", [(True, True)], indirect=True)
def test_a_tls_echo_server_is_not_an_mqtt_server(peer: _Peer) -> None:
    """Over TLS the echo returns our own CONNECT: not a CONNACK."""
    with pytest.raises(RemoteProtocolError) as refused:
        _register(peer.endpoint, TransportKind.MQTT, peer.ca_file)
    assert refused.value.message.startswith(
        f"mqtts://{peer.endpoint} is not an MQTT server. The server's first bytes b'\\x10"
    )
    assert refused.value.message.endswith("are not a CONNACK packet.")


@pytest.mark.parametrize("peer", [(False, True)], indirect=True)
@pytest.mark.parametrize(
    ("transport", "words"),
    [
        (TransportKind.MQTT, "closed the connection instead of answering the MQTT CONNECT"),
        (TransportKind.AMQP, "closed the connection instead of sending an AMQP protocol header"),
    ],
)
def test_a_tls_server_that_hangs_up_cannot_be_connected_to(
    peer: _Peer, transport: TransportKind, words: str
) -> None:
    with pytest.raises(ConnectError, match=words):
        _register(peer.endpoint, transport, peer.ca_file)
