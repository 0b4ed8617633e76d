"""The HTTPS transport's own HTTP/1.1 client (provisiond.device._http) against a scripted TLS
server on loopback that reads raw request bytes and writes raw answers: the bytes it sends,
one keep-alive connection for the register and the polls, a connection the service closed
replaced, chunked and close-delimited answers, and each failure as the error it means.

Also the shared, per-process parts the client's CPU and memory depend on (docs/performance.md,
"The device client"): one trust-only TLS context per CA file, no worker-thread hop for a
provider with nothing to do after the registration, one thread pool for every sync client's
loop, and an ``import provisiond.device`` that loads neither httpx nor, for a key-attested
device, cryptography."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import tracemalloc
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from provisiond import pki
from provisiond.device import (
    AsyncProvisioningDeviceClient,
    HttpsTransport,
    ProvisioningDeviceClient,
    RegistrationResult,
    RetryPolicy,
    SymmetricKeySecurity,
    X509Security,
)
from provisiond.device.transport import client_ssl_context
from provisiond.errors import RemoteProtocolError, TimeoutError, TransportError
from provisiond.protocol.sas import parse_sas_token, verify_signature

KEY = "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0wMTIzNDU2Nzg5"
SCOPE = "0ne00000042"
REG = "dev:1"
FAST = RetryPolicy(initial_backoff=0.05, max_backoff=0.1, total_timeout=20)


def body(status: str, operation: str = "op/1") -> bytes:
    doc: dict[str, Any] = {"operationId": operation, "status": status}
    if status != "assigning":
        doc["registrationState"] = {
            "registrationId": REG,
            "status": status,
            "assignedHub": "hub",
            "deviceId": REG,
        }
    return json.dumps(doc).encode()


def answer(status: int, payload: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return (
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{head}".encode()
        + (
            b""
            if any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers)
            else f"Content-Length: {len(payload)}\r\n".encode()
        )
        + b"\r\n"
        + payload
    )


# What the script does with request n (1-based) on connection c (1-based): bytes to write, then
# whether to close; None: write nothing and keep reading (or wait, if nothing comes).
Script = Callable[[int, int], tuple[bytes, bool] | None]


@dataclass
class ScriptedHttps:
    script: Script
    requests: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # (connection, head, body)
    connections: int = 0
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        self.connections += 1
        connection = self.connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                payload = await reader.readexactly(length)
                self.requests.append((connection, head, payload))
                step = self.script(len(self.requests), connection)
                if step is None:
                    continue
                data, close = step
                writer.write(data)
                await writer.drain()
                if close:
                    return
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2)


@pytest.fixture
async def scripted(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    files = pki.ensure_dev_pki(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(files.cert_file, files.key_file)
    servers: list[asyncio.Server] = []
    started: list[ScriptedHttps] = []

    async def start(dps: ScriptedHttps, *, wait: float = 5) -> AsyncProvisioningDeviceClient:
        started.append(dps)
        server = await asyncio.start_server(dps.handle, "127.0.0.1", 0, ssl=ctx)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        security = SymmetricKeySecurity(registration_id=REG, symmetric_key=KEY)
        transport = HttpsTransport(
            host=f"localhost:{port}",
            id_scope=SCOPE,
            security=security,
            ca_file=files.ca_file,
            timeout=wait,
        )
        return AsyncProvisioningDeviceClient(security=security, transport=transport, retry=FAST)

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()
    handlers = [task for dps in started for task in dps.handlers]
    if handlers:
        await asyncio.wait(handlers, timeout=5)


def headers_of(head: bytes) -> dict[str, str]:
    lines = head.decode().split("\r\n")[1:]
    return {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines if line)}


async def test_register_and_poll_go_on_one_keep_alive_connection_with_dps_requests(
    scripted: Callable[..., Any],
) -> None:
    dps = ScriptedHttps(
        lambda n, c: (
            (answer(202, body("assigning"), "Retry-After: 0"), False)
            if n == 1
            else (answer(200, body("assigned")), False)
        )
    )
    async with await scripted(dps) as client:
        result = await client.register({"a": 1}, force=True)
    assert result.device_id == REG and result.assigned_hub == "hub"
    assert dps.connections == 1
    (c1, put, put_body), (c2, get, get_body) = dps.requests
    assert c1 == c2 == 1
    quoted = quote(REG, safe="")
    assert put.startswith(
        f"PUT /{SCOPE}/registrations/{quoted}/register?api-version=2021-06-01&forceRegistration=true HTTP/1.1\r\n".encode()
    )
    assert get.startswith(
        f"GET /{SCOPE}/registrations/{quoted}/operations/op%2F1?api-version=2021-06-01 HTTP/1.1\r\n".encode()
    )
    assert json.loads(put_body) == {"registrationId": REG, "payload": {"a": 1}}
    assert get_body == b""
    for head in (put, get):
        headers = headers_of(head)
        assert headers["host"].startswith("localhost:")
        assert headers["accept"] == "application/json"
        assert headers["content-type"] == "application/json; charset=utf-8"
        assert headers["user-agent"].startswith("provisiond-device/")
        token = parse_sas_token(headers["authorization"])
        assert token.resource == f"{SCOPE}/registrations/{REG}" and token.key_name == "registration"
        assert verify_signature(token, KEY)
    assert headers_of(put)["content-length"] == str(len(put_body))
    assert "content-length" not in headers_of(get) and "transfer-encoding" not in headers_of(get)


async def test_a_connection_the_service_closed_while_the_flow_slept_is_replaced(
    scripted: Callable[..., Any],
) -> None:
    # The register's answer, then the service hangs up (an idle timeout, no Connection: close).
    dps = ScriptedHttps(
        lambda n, c: (
            (answer(202, body("assigning"), "Retry-After: 0.3"), True)
            if n == 1
            else (answer(200, body("assigned")), False)
        )
    )
    async with await scripted(dps) as client:
        assert (await client.register()).device_id == REG
    assert [c for c, _, _ in dps.requests] == [1, 2]


async def test_a_kept_connection_that_fails_before_any_answer_is_retried_once_on_a_new_one(
    scripted: Callable[..., Any],
) -> None:
    # The poll reaches the old connection, which closes without a byte of an answer.
    def script(n: int, c: int) -> tuple[bytes, bool] | None:
        if n == 1:
            return answer(202, body("assigning"), "Retry-After: 0"), False
        if c == 1:
            return b"", True
        return answer(200, body("assigned")), False

    dps = ScriptedHttps(script)
    async with await scripted(dps) as client:
        assert (await client.register()).device_id == REG
    assert [c for c, _, _ in dps.requests] == [1, 1, 2]


async def test_chunked_and_close_delimited_answers(scripted: Callable[..., Any]) -> None:
    document = body("assigned")
    chunked = (
        b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (document[:10], document[10:]))
        + b"0\r\n\r\n"
    )
    dps = ScriptedHttps(lambda n, c: (answer(200, chunked, "Transfer-Encoding: chunked"), False))
    async with await scripted(dps) as client:
        assert (await client.register()).device_id == REG

    # HTTP/1.1 without a length: the body ends when the service closes the connection.
    delimited = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + document
    dps = ScriptedHttps(lambda n, c: (delimited, True))
    async with await scripted(dps) as client:
        assert (await client.register()).device_id == REG


async def test_a_service_that_hangs_up_on_a_new_connection_is_a_transport_error(
    scripted: Callable[..., Any],
) -> None:
    dps = ScriptedHttps(lambda n, c: (b"", True))
    client = await scripted(dps)
    with pytest.raises(TransportError, match=r"The exchange with localhost:\d+ failed") as info:
        await client.register()
    await client.close()
    assert type(info.value) is TransportError
    assert len(dps.requests) == 1  # a new connection is not retried


async def test_an_answer_that_is_not_http_is_a_transport_error(scripted: Callable[..., Any]) -> None:
    dps = ScriptedHttps(lambda n, c: (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", True))
    client = await scripted(dps)
    with pytest.raises(TransportError, match="RemoteProtocolError"):
        await client.register()
    await client.close()


@pytest.mark.parametrize("status", [600, 999])
async def test_a_status_beyond_599_is_the_services_protocol_error(
    scripted: Callable[..., Any], status: int
) -> None:
    """HTTP's parser takes any three digits; a status HTTP does not have is the service's
    error (RemoteProtocolError), not the client's own misuse (LocalProtocolError, as it was)."""
    dps = ScriptedHttps(lambda n, c: (answer(status, body("assigned")), True))
    client = await scripted(dps)
    with pytest.raises(RemoteProtocolError, match=f"status {status}, not an HTTP status"):
        await client.register()
    await client.close()


async def test_no_answer_is_a_timeout_error(scripted: Callable[..., Any]) -> None:
    dps = ScriptedHttps(lambda n, c: None)
    client = await scripted(dps, wait=0.5)
    with pytest.raises(TimeoutError, match="did not answer in time"):
        await client.register()
    await client.close()


# --- the shared, per-process parts -------------------------------------------------------------


def test_clients_without_a_client_certificate_share_one_tls_context_per_ca_file(tmp_path: Path) -> None:
    files = pki.ensure_dev_pki(tmp_path / "a")
    security = SymmetricKeySecurity(registration_id="d1", symmetric_key=KEY)
    first = client_ssl_context(ca_file=files.ca_file, security=security)
    assert client_ssl_context(ca_file=str(files.ca_file)) is first
    assert first.verify_mode is ssl.CERT_REQUIRED and first.check_hostname
    # another CA in the same file: a new context, that trusts the new CA
    other = pki.ensure_dev_pki(tmp_path / "b")
    files.ca_file.write_bytes(other.ca_file.read_bytes() + b"\n")
    second = client_ssl_context(ca_file=files.ca_file)
    assert second is not first
    # a device certificate is loaded into a context of its own, every time
    root = pki.make_root_ca("test root")
    x509 = X509Security.from_issued(pki.make_device_cert("x1", root))
    assert client_ssl_context(ca_file=files.ca_file, security=x509) is not second
    assert client_ssl_context(ca_file=files.ca_file, security=x509) is not client_ssl_context(
        ca_file=files.ca_file, security=x509
    )


class _CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.submitted = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


class _RecordingSecurity(SymmetricKeySecurity):
    completed_in: list[str] = []

    def complete_registration(self, result: RegistrationResult) -> None:
        self.completed_in.append(threading.current_thread().name)


async def test_no_worker_thread_hop_unless_the_provider_completes_the_registration(
    scripted: Callable[..., Any],
) -> None:
    executor = _CountingExecutor()
    asyncio.get_running_loop().set_default_executor(executor)
    dps = ScriptedHttps(lambda n, c: (answer(200, body("assigned")), False))
    client = await scripted(dps)
    # resolving "localhost" is the executor's work, the same for both providers
    await client.register()
    await client.close()
    resolutions = executor.submitted
    client = await scripted(dps)
    recording = _RecordingSecurity(registration_id=REG, symmetric_key=KEY)
    recording.completed_in.clear()
    client.security = recording
    await client.register()
    await client.close()
    assert executor.submitted == 2 * resolutions + 1  # the overridden complete_registration, on a worker
    assert recording.completed_in and recording.completed_in[-1] != threading.current_thread().name


def test_the_sync_clients_loops_share_one_thread_pool(tmp_path: Path) -> None:
    from provisiond.device import MockTransport
    from provisiond.protocol.registration import Reply

    def assigned(request: Any) -> Reply:
        return Reply(status=200, body=body("assigned"))

    recording = _RecordingSecurity(registration_id=REG, symmetric_key=KEY)
    recording.completed_in.clear()
    for _ in range(2):
        with ProvisioningDeviceClient.create("unused:1", SCOPE, recording, MockTransport(assigned)) as client:
            client.register()
    assert len(recording.completed_in) == 2
    assert all(name.startswith("provisiond-device-worker") for name in recording.completed_in)


def test_importing_the_device_client_loads_neither_httpx_nor_cryptography() -> None:
    code = (
        "import sys, provisiond.device; "
        "print(sorted(m for m in ('httpx', 'cryptography') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_x509_credential_loads_without_writing_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device whose temporary directory is missing or read-only still loads its certificate
    and key (into memory files), and the handshake presents them."""
    if not hasattr(os, "memfd_create"):
        pytest.skip("no memfd on this system: the encrypted temporary file is used")
    root = pki.make_root_ca("memfd root")
    intermediate = pki.make_intermediate_ca("memfd intermediate", root)
    security = X509Security.from_issued(pki.make_device_cert("memfd-device", intermediate))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    files = pki.ensure_dev_pki(tmp_path / "pki")
    server.load_cert_chain(files.cert_file, files.key_file)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cadata=pki.certificate_pem(root.cert).decode())
    # a handshake in memory: the server verifies the chain the client presents
    _, tls_server = _handshake(client_ssl_context(ca_file=files.ca_file, security=security), server)
    presented = tls_server.getpeercert()
    assert presented and dict(item[0] for item in presented["subject"])["commonName"] == "memfd-device"


async def test_a_kept_connection_holds_no_large_tls_buffer(scripted: Callable[..., Any]) -> None:
    """After its register the client keeps its connection for the polls: what it holds then is
    the TLS state and the answer, not a preallocated read buffer (asyncio's TLS transport
    zero-fills 256 KiB per connection). Counted: memory allocated under the client's frames (the
    scripted server runs in this process too)."""
    dps = ScriptedHttps(lambda n, c: (answer(200, body("assigned")), False))
    client = await scripted(dps)
    await client.register()  # warm: the shared TLS context, imports, the event loop's own state
    await client.close()
    client = await scripted(dps)
    mine = [tracemalloc.Filter(True, "*provisiond/device/*", all_frames=True)]
    tracemalloc.start(64)
    try:
        before = tracemalloc.take_snapshot().filter_traces(mine)
        await client.register()
        after = tracemalloc.take_snapshot().filter_traces(mine)
    finally:
        tracemalloc.stop()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    await client.close()
    assert dps.connections == 2
    assert held < 64 * 1024, f"the open connection holds {held} bytes"


async def test_a_proxy_the_environment_names_is_used_as_before(
    scripted: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """HTTPS_PROXY reaches the service through the proxy's CONNECT tunnel (the transport hands
    such a setup to httpx, which reads the environment as it always did)."""
    tunnels: list[bytes] = []
    pipes: set[asyncio.Task[None]] = set()

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.close()

    async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        tunnels.append(head.split(b"\r\n")[0])
        port = int(head.split()[1].rpartition(b":")[2])
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        for task in (pipe(reader, up_writer), pipe(up_reader, writer)):
            pipes.add(asyncio.ensure_future(task))

    proxy = await asyncio.start_server(tunnel, "127.0.0.1", 0)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}")
    dps = ScriptedHttps(lambda n, c: (answer(200, body("assigned")), False))
    client = await scripted(dps)
    try:
        assert (await client.register()).device_id == REG
    finally:
        await client.close()
        proxy.close()
        await proxy.wait_closed()
        if pipes:
            await asyncio.wait(pipes, timeout=5)
    port = client.transport.host.rpartition(":")[2]  # type: ignore[attr-defined]
    assert tunnels == [f"CONNECT localhost:{port} HTTP/1.1".encode()]
    # httpcore sets ALPN on the context it uses: not on the one other clients (MQTT, AMQP) share
    files = pki.ensure_dev_pki(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(files.cert_file, files.key_file)
    server.set_alpn_protocols(["http/1.1", "mqtt"])
    tls_client, _ = _handshake(client_ssl_context(ca_file=files.ca_file), server)
    assert tls_client.selected_alpn_protocol() is None


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake in memory (server name ``localhost``): the client's and the server's ends."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_client = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (tls_client, tls_server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return tls_client, tls_server
