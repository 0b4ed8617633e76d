"""What an unauthenticated peer can do to a connection, over real sockets against ``provisiond
serve`` with small deadlines (configured through the PROVISIOND_* variables): a TLS handshake
that never ends, silence after it, half a request line, a head or body or packet trickled byte
by byte, an MQTT session with keep-alive 0 that stays silent, a refused CONNECT whose peer never
answers the TLS close. Each must end in a closed connection and one log line naming the flag,
while real devices still register on every transport under the same deadlines.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from provisiond.device import ProvisioningDeviceClient, SymmetricKeySecurity
from provisiond.models import RegistrationStatus
from provisiond.protocol.mqtt import Connack, Connect, ConnectReturnCode, decode_packet, encode_packet
from provisiond.protocol.sas import build_sas_token
from provisiond.service_client import ServiceClient
from tests._server import RunningServer, start_server

#: The deadlines of this module's server (seconds; the rate in bytes/s).
LIMITS = {
    "PROVISIOND_TLS_HANDSHAKE_TIMEOUT": "1",
    "PROVISIOND_FIRST_REQUEST_TIMEOUT": "1",
    "PROVISIOND_HEADER_TIMEOUT": "1",
    "PROVISIOND_KEEP_ALIVE_TIMEOUT": "1",
    "PROVISIOND_MIN_RECEIVE_RATE": "100",
    "PROVISIOND_MIN_RECEIVE_RATE_GRACE": "1",
    "PROVISIOND_SESSION_IDLE_TIMEOUT": "2",
}
#: How long a test waits for the server to close a connection: well past the deadlines above,
#: well short of the old behaviour (never, or asyncio's 30 s TLS close and 60 s handshake).
WAIT = 8.0
AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
AMQP_SASL_HEADER = b"AMQP\x03\x01\x00\x00"


@pytest.fixture(scope="module")
def dps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("deadlines"), "--log-level", "debug", env=LIMITS)
    yield running
    running.stop()
    assert "Traceback" not in running.log()


@pytest.fixture(scope="module")
def admin(dps: RunningServer) -> Iterator[ServiceClient]:
    with dps.client() as client:
        yield client


def uid(prefix: str = "dl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def port_of(dps: RunningServer, listener: str) -> int:
    return {"HTTPS": dps.port, "MQTT": int(dps.info["mqttPort"]), "AMQP": int(dps.info["amqpPort"])}[listener]


def tls_connect(dps: RunningServer, listener: str) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=dps.ca_file)
    raw = socket.create_connection(("127.0.0.1", port_of(dps, listener)), timeout=WAIT)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def local(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def assert_closed(sock: socket.socket) -> bytes:
    """Read until the server closes ``sock`` (it must within WAIT s); what it sent before."""
    sock.settimeout(WAIT)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (ConnectionResetError, ssl.SSLEOFError):
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {WAIT} s") from None
    return got


def read_response(sock: socket.socket) -> bytes:
    """One HTTP response (head and a Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def trickle(sock: socket.socket, data: bytes, every: float) -> bool:
    """Send ``data`` a byte at a time, ``every`` seconds apart; False once the server closed."""
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            return False
        time.sleep(every)
    return True


LISTENERS = [pytest.param(name, id=name.lower()) for name in ("HTTPS", "MQTT", "AMQP")]
FIRST = {"HTTPS": "request head", "MQTT": "CONNECT", "AMQP": "protocol header"}


# --- the TLS handshake -----------------------------------------------------------------------------


def client_hello() -> bytes:
    """The bytes a TLS client opens with."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("sent", [pytest.param(0, id="nothing"), pytest.param(40, id="half-a-client-hello")])
def test_a_tls_handshake_that_never_ends_is_closed(dps: RunningServer, listener: str, sent: int) -> None:
    with socket.create_connection(("127.0.0.1", port_of(dps, listener)), timeout=WAIT) as sock:
        sock.sendall(client_hello()[:sent])
        assert assert_closed(sock) == b""
        dps.wait_for_log(
            listener, local(sock), "TLS handshake not finished within 1 s (--tls-handshake-timeout)"
        )


# --- the first request -----------------------------------------------------------------------------


@pytest.mark.parametrize("listener", LISTENERS)
def test_silence_after_the_handshake_is_closed(dps: RunningServer, listener: str) -> None:
    with tls_connect(dps, listener) as sock:
        assert assert_closed(sock) == b""
        dps.wait_for_log(
            listener,
            local(sock),
            f"no complete {FIRST[listener]} within 1 s",
            "(--first-request-timeout)",
        )


@pytest.mark.parametrize(
    ("listener", "start"),
    [
        pytest.param("HTTPS", b"PUT /0ne0000/registrations/dev-1/regis", id="https-request-line"),
        pytest.param("MQTT", b"\x10\x30\x00\x04MQTT\x04", id="mqtt-connect"),
        pytest.param("AMQP", AMQP_SASL_HEADER[:5], id="amqp-header"),
    ],
)
def test_half_a_first_request_is_closed(dps: RunningServer, listener: str, start: bytes) -> None:
    with tls_connect(dps, listener) as sock:
        sock.sendall(start)
        assert assert_closed(sock) == b""
        dps.wait_for_log(listener, local(sock), f"no complete {FIRST[listener]} within 1 s")


def test_a_request_head_a_byte_at_a_time_is_closed(dps: RunningServer) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nUser-Agent: slow\r\n\r\n"
    with tls_connect(dps, "HTTPS") as sock:
        assert not trickle(sock, head, every=0.25) or assert_closed(sock) == b""
        dps.wait_for_log("HTTPS", local(sock), "no complete request head within 1 s")


def test_half_a_request_line_on_a_kept_alive_connection_is_closed(dps: RunningServer) -> None:
    with tls_connect(dps, "HTTPS") as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        response = read_response(sock)
        assert response.startswith(b"HTTP/1.1 200") and response.endswith(b'{"status":"ok"}')
        sock.sendall(b"GET /heal")
        assert assert_closed(sock) == b""
        dps.wait_for_log(
            "HTTPS", local(sock), "request head not complete 1 s after its first byte (--header-timeout)"
        )


def test_an_idle_kept_alive_connection_is_closed(dps: RunningServer) -> None:
    with tls_connect(dps, "HTTPS") as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        assert assert_closed(sock) == b""
        dps.wait_for_log("HTTPS", local(sock), "idle 1 s after a response (--keep-alive-timeout)")


# --- the minimum receive rate ------------------------------------------------------------------------


def test_a_trickled_body_is_closed_under_the_minimum_rate(dps: RunningServer) -> None:
    body = json.dumps({"registrationId": "slow-body", "payload": "x" * 400}).encode()
    head = (
        f"PUT /{dps.id_scope}/registrations/slow-body/register?api-version=2021-06-01 HTTP/1.1\r\n"
        f"Host: localhost\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with tls_connect(dps, "HTTPS") as sock:
        sock.sendall(head + body[:20])
        assert not trickle(sock, body[20:], every=0.1) or assert_closed(sock) == b""
        dps.wait_for_log("HTTPS", local(sock), "while more was due, under 100 bytes/s (--min-receive-rate)")


def test_a_body_above_the_minimum_rate_is_answered(dps: RunningServer) -> None:
    """A slow but steady body (about 1 KB/s, ten times the minimum) gets its answer: a 401, since
    the request carries no credential."""
    body = json.dumps({"registrationId": "steady-body", "payload": "x" * 2500}).encode()
    head = (
        f"PUT /{dps.id_scope}/registrations/steady-body/register?api-version=2021-06-01 HTTP/1.1\r\n"
        f"Host: localhost\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with tls_connect(dps, "HTTPS") as sock:
        sock.sendall(head)
        for offset in range(0, len(body), 100):
            sock.sendall(body[offset : offset + 100])
            time.sleep(0.1)
        response = read_response(sock)
    assert response.startswith(b"HTTP/1.1 401"), response[:200]


def mqtt_connect(
    dps: RunningServer, reg: str, *, password: bytes | None = None, keep_alive: int = 0
) -> bytes:
    """A CONNECT in DPS's form; the default password is a well-formed SAS token signed with a key
    nobody enrolled (the CONNECT does not check signatures, the registrar does)."""
    if password is None:
        key = base64.b64encode(uuid.uuid4().bytes).decode()
        password = build_sas_token(
            f"{dps.id_scope}/registrations/{reg}", key, int(time.time()) + 600
        ).encode()
    return encode_packet(
        Connect(
            client_id=reg,
            username=f"{dps.id_scope}/registrations/{reg}/api-version=2019-03-31",
            password=password,
            keep_alive=keep_alive,
        )
    )


def read_packet(sock: socket.socket) -> Any:
    data = b""
    while True:
        data += sock.recv(65536)
        try:
            return decode_packet(memoryview(data))[1]
        except Exception:  # InsufficientData: more to read
            continue


def test_a_trickled_mqtt_packet_is_closed_under_the_minimum_rate(dps: RunningServer) -> None:
    with tls_connect(dps, "MQTT") as sock:
        sock.sendall(mqtt_connect(dps, uid()))
        assert read_packet(sock) == Connack()
        # A PUBLISH announcing 1,000 bytes, its topic then trickled.
        sock.sendall(b"\x32\xe8\x07")
        assert not trickle(
            sock, b"\x00\x40$dps/registrations/PUT/iotdps-register/?$rid=1" * 20, every=0.1
        ) or (assert_closed(sock) == b"")
        dps.wait_for_log("MQTT", local(sock), "under 100 bytes/s (--min-receive-rate)")


def test_a_trickled_amqp_frame_is_closed_under_the_minimum_rate(dps: RunningServer) -> None:
    with tls_connect(dps, "AMQP") as sock:
        sock.sendall(AMQP_SASL_HEADER)
        assert sock.recv(8) == AMQP_SASL_HEADER
        sock.sendall(b"\x00\x00\x03\xe8\x02\x01\x00\x00")  # a SASL frame of 1,000 bytes
        assert not trickle(sock, bytes(992), every=0.1) or assert_closed(sock) is not None
        dps.wait_for_log("AMQP", local(sock), "under 100 bytes/s (--min-receive-rate)")


def test_a_trickled_mqtt_packet_over_websockets_is_closed_under_the_minimum_rate(dps: RunningServer) -> None:
    """The guard reaches the MQTT session behind a WebSocket upgrade on the HTTPS port."""
    ctx = ssl.create_default_context(cafile=dps.ca_file)
    with ws_connect(
        f"wss://localhost:{dps.port}/$iothub/websocket", ssl=ctx, subprotocols=["mqtt"], open_timeout=WAIT
    ) as ws:
        peer = "{}:{}".format(*ws.socket.getsockname()[:2])
        ws.send(mqtt_connect(dps, uid(), keep_alive=60))
        assert Connack() == decode_packet(memoryview(ws.recv(WAIT)))[1]  # type: ignore[arg-type]
        ws.send(b"\x32\xe8\x07")
        deadline, closed = time.monotonic() + WAIT, False
        try:
            while time.monotonic() < deadline:
                ws.send(b"\x00")  # seven bytes a frame, four times a second
                time.sleep(0.25)
        except ConnectionClosed:
            closed = True
        assert closed, "the server kept the trickling WebSocket open"
        dps.wait_for_log("HTTPS", peer, "under 100 bytes/s (--min-receive-rate)")


# --- MQTT sessions -----------------------------------------------------------------------------------


class TlsWire:
    """A TLS client over a plain socket (ssl.SSLObject), so that the test sees the server's TLS
    close (close_notify) and its TCP close apart, and can leave the TLS close unanswered."""

    def __init__(self, dps: RunningServer, listener: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port_of(dps, listener)), timeout=WAIT)
        ctx = ssl.create_default_context(cafile=dps.ca_file)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self._in, self._out, server_hostname="localhost")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._in.write(self.sock.recv(65536))
        self._flush()

    def _flush(self) -> None:
        if data := self._out.read():
            self.sock.sendall(data)

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def read_until_tls_close(self) -> bytes:
        """Application bytes up to the server's close_notify (which is not answered)."""
        got = b""
        while True:
            try:
                data = self.tls.read(65536)
                if not data:  # the close_notify (SSLObject reads it as b"")
                    return got
                got += data
            except ssl.SSLWantReadError:
                data = self.sock.recv(65536)
                if not data:
                    return got
                self._in.write(data)
            except ssl.SSLZeroReturnError:
                return got

    def close(self) -> None:
        self.sock.close()


def test_a_refused_connect_with_keep_alive_0_closes_the_connection(dps: RunningServer) -> None:
    """CONNACK 4 for a password that is no SAS token, then the TLS close, then, although the
    device never answers the TLS close, the TCP connection: within the TLS close timeout (here
    1 s, the handshake's), not asyncio's 30 s."""
    wire = TlsWire(dps, "MQTT")
    try:
        reg = uid()
        wire.send(mqtt_connect(dps, reg, password=b"hunter2", keep_alive=0))
        connack = decode_packet(memoryview(wire.read_until_tls_close()))[1]
        assert connack == Connack(return_code=ConnectReturnCode.BAD_USERNAME_OR_PASSWORD)
        assert assert_closed(wire.sock) == b""  # the TCP close (FIN or reset), unanswered TLS close or not
        dps.wait_for_log("MQTT", local(wire.sock), "CONNECT refused with return code 4")
    finally:
        wire.close()


def test_a_silent_session_with_keep_alive_0_is_closed(dps: RunningServer) -> None:
    """Keep-alive 0 (the C SDK's) after an accepted CONNECT is bounded by --session-idle-timeout."""
    reg = uid()
    with tls_connect(dps, "MQTT") as sock:
        sock.sendall(mqtt_connect(dps, reg, keep_alive=0))
        assert read_packet(sock) == Connack()
        assert assert_closed(sock) == b""
        dps.wait_for_log("MQTT", reg, "closed: nothing received within the idle timeout (2 s)")


def test_a_session_whose_keep_alive_is_longer_is_closed_at_the_idle_timeout(dps: RunningServer) -> None:
    reg = uid()
    with tls_connect(dps, "MQTT") as sock:
        sock.sendall(mqtt_connect(dps, reg, keep_alive=3600))
        assert read_packet(sock) == Connack()
        assert assert_closed(sock) == b""
        dps.wait_for_log("MQTT", reg, "closed: nothing received within the idle timeout (2 s)")


# --- devices still register under these deadlines ----------------------------------------------------


@pytest.mark.parametrize("transport", ["https", "mqtt", "amqp", "mqtt-ws", "amqp-ws"])
def test_devices_register_under_the_deadlines(
    dps: RunningServer, admin: ServiceClient, transport: str
) -> None:
    reg = uid("ok")
    admin.put(f"/enrollments/{reg}", {"registrationId": reg, "attestation": {"type": "symmetricKey"}})
    key = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    port = {"mqtt": dps.info["mqttPort"], "amqp": dps.info["amqpPort"]}.get(transport, dps.port)
    with ProvisioningDeviceClient.create(
        f"localhost:{port}",
        dps.id_scope,
        SymmetricKeySecurity(registration_id=reg, symmetric_key=key),
        transport,
        ca_file=dps.ca_file,
        timeout=15,
    ) as client:
        result = client.register()
    assert result.status is RegistrationStatus.ASSIGNED
