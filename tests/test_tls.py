"""provisiond.tls over real TLS sockets on loopback: uvicorn with our context and protocol classes,
devices connecting with stdlib ssl, the app reporting what ``scope["extensions"]["tls"]`` holds."""

from __future__ import annotations

import base64
import gc
import http.client
import json
import logging
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from websockets.sync.client import connect as ws_connect

from provisiond import pki, tls
from provisiond.errors import ConfigurationError
from provisiond.service.guard import GuardedConnection
from provisiond.service.settings import ConnectionLimits


async def report_tls_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers every request (or WebSocket) with the TLS extension it was given, as JSON."""
    ext = scope.get("extensions", {}).get("tls")
    body = json.dumps(
        None
        if ext is None
        else {
            **ext,
            "client_cert_chain": [base64.b64encode(der).decode() for der in ext["client_cert_chain"]],
        }
    )
    if scope["type"] == "http":
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})
    elif scope["type"] == "websocket":
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": body})
        await send({"type": "websocket.close"})


@dataclass
class Pki:
    directory: Path
    device: pki.Issued  # under an intermediate whose root the server does not know
    self_signed: pki.Issued
    server_files: pki.ServerTlsFiles

    def client_context(self, credential: str | None = None, *, tls12_only: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.server_files.ca_file)
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default: the dev PKI must pass it
        if tls12_only:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if credential is not None:
            prefix = self.directory / credential
            chain = pki.chain_path(prefix)
            ctx.load_cert_chain(chain if chain.exists() else pki.cert_path(prefix), pki.key_path(prefix))
        return ctx


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("tls")
    root = pki.make_root_ca("Unknown Root")
    intermediate = pki.make_intermediate_ca("Device Intermediate", root)
    device = pki.make_device_cert("device-001", intermediate)
    self_signed = pki.make_device_cert("device-self-signed")
    pki.write_issued(device, directory / "device", chain=True)
    pki.write_issued(self_signed, directory / "self-signed")
    return Pki(directory, device, self_signed, pki.ensure_dev_pki(directory / "data"))


def ders(issued: pki.Issued) -> list[bytes]:
    return [pki.certificate_der(cert) for cert in issued.presented_chain]


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(("httptools", "auto"), id="httptools-uvloop"),
        pytest.param(("h11", "asyncio"), id="h11-asyncio"),
    ],
)
def port(request: pytest.FixtureRequest, certs: Pki) -> Iterator[int]:
    http_impl, loop = request.param
    config = tls.uvicorn_config(
        report_tls_app,
        host="127.0.0.1",
        port=0,
        cert_file=certs.server_files.cert_file,
        key_file=certs.server_files.key_file,
        http=http_impl,
        loop=loop,
        lifespan="off",
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{http_impl}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    thread.join(10)


def get_tls(port: int, ctx: ssl.SSLContext, requests: int = 1) -> list[dict[str, Any]]:
    """GET / ``requests`` times on one connection; the TLS extension the app saw each time."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        seen = []
        for _ in range(requests):
            conn.request("GET", "/")
            response = conn.getresponse()
            assert response.status == 200
            seen.append(decode(json.loads(response.read())))
        return seen
    finally:
        conn.close()


def decode(ext: dict[str, Any]) -> dict[str, Any]:
    return {**ext, "client_cert_chain": [base64.b64decode(der) for der in ext["client_cert_chain"]]}


def test_chain_to_an_unknown_root_reaches_the_app(port: int, certs: Pki) -> None:
    (ext,) = get_tls(port, certs.client_context("device"))
    assert ext["client_cert_chain"] == ders(certs.device)  # leaf first, then the intermediate
    assert len(ext["client_cert_chain"]) == 2
    assert ext["tls_version"] == 0x0304
    assert ext["cipher"]
    assert ext["session_reused"] is False


def test_self_signed_certificate_reaches_the_app(port: int, certs: Pki) -> None:
    (ext,) = get_tls(port, certs.client_context("self-signed"))
    assert ext["client_cert_chain"] == ders(certs.self_signed)


def test_no_certificate_gives_an_empty_chain(port: int, certs: Pki) -> None:
    (ext,) = get_tls(port, certs.client_context())
    assert ext["client_cert_chain"] == []


def test_tls12_only_client(port: int, certs: Pki) -> None:
    (ext,) = get_tls(port, certs.client_context("device", tls12_only=True))
    assert ext["tls_version"] == 0x0303
    assert ext["client_cert_chain"] == ders(certs.device)


def test_every_request_on_a_kept_alive_connection_gets_the_chain(port: int, certs: Pki) -> None:
    seen = get_tls(port, certs.client_context("device"), requests=3)
    assert [ext["client_cert_chain"] for ext in seen] == [ders(certs.device)] * 3


def test_websocket_scope_gets_the_chain(port: int, certs: Pki) -> None:
    with ws_connect(f"wss://127.0.0.1:{port}/ws", ssl=certs.client_context("device"), open_timeout=10) as ws:
        ext = decode(json.loads(ws.recv(timeout=10)))
    assert ext["client_cert_chain"] == ders(certs.device)


@pytest.mark.parametrize("tls12_only", [False, True], ids=["tls1.3", "tls1.2"])
def test_resumed_session_keeps_the_whole_chain(port: int, certs: Pki, tls12_only: bool) -> None:
    ctx = certs.client_context("device", tls12_only=tls12_only)

    def fetch(session: ssl.SSLSession | None) -> tuple[dict[str, Any], ssl.SSLSession | None]:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as sock,
        ):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return decode(json.loads(data.partition(b"\r\n\r\n")[2])), sock.session

    first, session = fetch(None)
    again, _ = fetch(session)
    assert again["session_reused"] is True
    assert again["client_cert_chain"] == first["client_cert_chain"] == ders(certs.device)


def live_connections() -> int:
    return sum(type(o) is GuardedConnection for o in gc.get_objects())


def test_a_closed_connection_is_freed_without_the_garbage_collector(port: int, certs: Pki) -> None:
    """A connection's objects (its guard, TLS transport, HTTP protocol, requests, the app's TLS
    wrapper) form no reference cycle once it is closed: they go when the last reference does,
    not at the next run of the cyclic garbage collector (whose full runs walk the whole heap of
    a busy server). With the collector off, the count of live connections comes back down."""
    ctx = certs.client_context("device")
    gc.collect()
    gc.disable()
    try:
        before = live_connections()
        for _ in range(5):
            get_tls(port, ctx)
        deadline = time.monotonic() + 10
        while live_connections() > before and time.monotonic() < deadline:
            time.sleep(0.05)  # the server's side of the close runs in its thread
        assert live_connections() <= before, (
            f"{live_connections() - before} connections left for the collector"
        )
    finally:
        gc.enable()


def test_verify_mode_of_a_server_context_is_read_only(certs: Pki) -> None:
    ctx = tls.server_context(certs.server_files.cert_file, certs.server_files.key_file)
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    with pytest.raises(RuntimeError, match="verify_mode"):
        ctx.verify_mode = ssl.CERT_REQUIRED


def test_peer_chain_on_an_sslsocket(certs: Pki) -> None:
    server_ctx = tls.server_context(certs.server_files.cert_file, certs.server_files.key_file)
    server_sock, client_sock = socket.socketpair()
    seen: list[bytes] = []

    def serve() -> None:
        with server_ctx.wrap_socket(server_sock, server_side=True) as conn:
            seen.extend(tls.peer_chain(conn))
            conn.sendall(b"k")

    thread = threading.Thread(target=serve)
    thread.start()
    client_ctx = certs.client_context("device")
    client_ctx.check_hostname = False
    with client_ctx.wrap_socket(client_sock) as conn:
        assert conn.recv(1) == b"k"
    thread.join(10)
    assert seen == ders(certs.device)


def test_unreadable_server_files_are_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot load the server certificate"):
        tls.server_context(tmp_path / "missing.pem", tmp_path / "missing.key")


def test_selfcheck_script_passes() -> None:
    """The stdlib-only check that CI also runs on every supported Python."""
    script = Path(__file__).with_name("_tls_selfcheck.py")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the guard under both HTTP implementations (uvloop + httptools, asyncio + h11) -----------------

#: Small deadlines for the guard tests (seconds; bytes/s).
SMALL = ConnectionLimits(
    tls_handshake_timeout=0.5,
    first_request_timeout=0.5,
    header_timeout=0.5,
    keep_alive_timeout=0.5,
    min_receive_rate=100,
    min_receive_rate_grace=0.5,
)


async def body_length_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body and answers its length."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = str(size).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(("httptools", "auto"), id="httptools-uvloop"),
        pytest.param(("h11", "asyncio"), id="h11-asyncio"),
    ],
)
def guarded(request: pytest.FixtureRequest, certs: Pki) -> Iterator[int]:
    http_impl, loop = request.param
    config = tls.uvicorn_config(
        body_length_app,
        host="127.0.0.1",
        port=0,
        cert_file=certs.server_files.cert_file,
        key_file=certs.server_files.key_file,
        http=http_impl,
        loop=loop,
        lifespan="off",
        log_level="warning",
        access_log=False,
        limits=SMALL,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-guarded-{http_impl}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    thread.join(10)


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` within 5 s (reading and dropping what it sends)."""
    sock.settimeout(5)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLEOFError):
        pass
    except TimeoutError:
        return False
    return True


def exchange(sock: ssl.SSLSocket, request: bytes) -> bytes:
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        body += sock.recv(65536)
    return body


def test_the_guard_under_both_http_implementations(
    guarded: int, certs: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = certs.client_context("device")

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", guarded), timeout=5)
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1")

    with caplog.at_level(logging.DEBUG, logger="provisiond.connections"):
        with socket.create_connection(("127.0.0.1", guarded), timeout=5) as raw:  # no handshake
            assert closed_by_server(raw)
        with connect() as sock:  # silence after the handshake
            assert closed_by_server(sock)
        with connect() as sock:  # a body under the rate, after a request with a body answered in full
            assert exchange(sock, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello") == b"5"
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n")
            try:
                for _ in range(20):
                    sock.sendall(b"x")
                    time.sleep(0.1)
            except OSError:  # ssl.SSLEOFError: closed while the test still wrote
                pass
            else:
                assert closed_by_server(sock)
        with connect() as sock:  # half a request line after a response
            assert exchange(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b"0"
            sock.sendall(b"GET /hal")
            assert closed_by_server(sock)
        with connect() as sock:  # idle after a response
            assert exchange(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b"0"
            assert closed_by_server(sock)
    for words in (
        "TLS handshake not finished within 0.5 s",
        "no complete request head within 0.5 s",
        "under 100 bytes/s (--min-receive-rate)",
        "request head not complete 0.5 s after its first byte",
        "idle 0.5 s after a response",
    ):
        assert words in caplog.text
