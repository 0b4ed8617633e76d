"""provisiond behind a TLS-terminating HAProxy (docs/tls-front.md): ``serve --front-port`` with
``--trusted-front``, HAProxy started from samples/haproxy/haproxy.cfg itself (so the documented
configuration is the tested one), devices over real TLS sockets to HAProxy, and direct plain
connections to the front port, from a trusted address and from an untrusted one (127.0.0.2).

The tests that need HAProxy skip when its binary is missing (.ci/run installs it)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from provisiond import pki
from provisiond.device import ProvisioningDeviceClient, X509Security
from provisiond.models import RegistrationStatus
from provisiond.protocol.sas import build_sas_token, derive_device_key
from provisiond.service.front import CERT_HEADER, CHAIN_HEADER, MAX_CHAIN_BYTES, chain_from_headers
from tests import factories
from tests._server import RunningServer, free_port, start_server
from tests.factories import uid

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "haproxy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


@dataclass
class Front:
    server: RunningServer
    haproxy: subprocess.Popen[bytes]
    port: int  # HAProxy's TLS port
    front_port: int  # provisiond's plain port
    work: Path

    @property
    def scope(self) -> str:
        return self.server.id_scope


def _wait_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


def start_front(work: Path, *extra: str, sample: Path = SAMPLE, port: int | None = None) -> Front:
    """provisiond with its front port trusted from 127.0.0.1, and HAProxy from ``sample``
    (skips the test when the haproxy binary is missing)."""
    if HAPROXY is None:
        pytest.skip("haproxy is not installed (.ci/run installs it)")
    front_port, port = free_port(), port or free_port()
    server = start_server(
        work / "data", "--front-port", str(front_port), "--trusted-front", "127.0.0.1", *extra
    )
    pki_dir = server.data_dir / "pki"
    pem = work / "haproxy.pem"
    pem.write_bytes((pki_dir / "server-chain.pem").read_bytes() + (pki_dir / "server.key").read_bytes())
    env = {
        **os.environ,
        "DPS_BIND": f"127.0.0.1:{port}",
        "DPS_CERT": str(pem),
        "DPS_VERIFY_CA": str(pki_dir / "ca.pem"),
        "PROVISIOND_FRONT": f"127.0.0.1:{front_port}",
    }
    log = open(work / "haproxy.log", "ab")
    haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(sample)], stdout=log, stderr=log, env=env)
    log.close()
    try:
        _wait_port(port, haproxy, "haproxy")
    except RuntimeError:
        server.stop()
        raise
    return Front(server, haproxy, port, front_port, work)


def stop_front(front: Front) -> None:
    front.haproxy.send_signal(signal.SIGTERM)
    try:
        front.haproxy.wait(10)
    except subprocess.TimeoutExpired:
        front.haproxy.kill()
    front.server.stop()


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    running = start_front(tmp_path_factory.mktemp("front"))
    yield running
    stop_front(running)


@pytest.fixture(scope="module")
def admin(front: Front) -> Iterator[Any]:
    client = front.server.client()
    yield client
    client.close()


# --- a device, over TLS to HAProxy (or plain to the front port) ---------------------------------


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    session: ssl.SSLSession | None = None
    resumed: bool = False


def _parse(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, (json.loads(body) if body.strip() else {})


def _request(scope: str, reg: str, token: str | None, headers: dict[str, str] | None = None) -> bytes:
    body = json.dumps({"registrationId": reg}).encode()
    lines = [
        f"PUT /{scope}/registrations/{reg}/register?api-version=2021-06-01 HTTP/1.1",
        "Host: localhost",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if token:
        lines.append(f"Authorization: {token}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _read_all(sock: socket.socket | ssl.SSLSocket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def device_context(
    front: Front, credential: pki.Issued | None = None, version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """A device's TLS client context: trusts the server's CA, presents ``credential`` (with its
    chain), speaks ``version`` only if given."""
    context = ssl.create_default_context(cafile=front.server.ca_file)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    if credential is not None:
        prefix = front.work / uuid.uuid4().hex
        pki.write_issued(credential, prefix, chain=True)
        context.load_cert_chain(str(pki.chain_path(prefix)), str(pki.key_path(prefix)))
    return context


def register_tls(
    front: Front,
    reg: str,
    *,
    token: str | None = None,
    credential: pki.Issued | None = None,
    context: ssl.SSLContext | None = None,
    session: ssl.SSLSession | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One registration over a new TLS connection to HAProxy (offering ``session`` to resume)."""
    context = context or device_context(front, credential)
    raw = socket.create_connection(("127.0.0.1", front.port), timeout=10)
    with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(_request(front.scope, reg, token, headers))
        status, body = _parse(_read_all(tls))
        return Answer(status, body, tls.session, tls.session_reused)


def plain(front: Front, request: bytes, *, source: str = "127.0.0.1") -> bytes:
    """``request`` sent straight to provisiond's front port from ``source``; all it answered."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    with sock:
        sock.connect(("127.0.0.1", front.front_port))
        sock.sendall(request)
        return _read_all(sock)


def device_token(front: Front, reg: str, key: str) -> str:
    return build_sas_token(
        f"{front.scope}/registrations/{reg}", key, int(time.time()) + 3600, key_name="registration"
    )


def assigned(answer: Answer) -> dict[str, Any]:
    assert answer.status == 202, answer.body
    assert answer.body["status"] == "assigned", answer.body
    state: dict[str, Any] = answer.body["registrationState"]
    return state


def x509_group(admin: Any, root: pki.Issued) -> str:
    gid = uid("fxg")
    admin.put(f"/enrollmentGroups/{gid}", factories.body(factories.x509_group(gid, root)))
    return gid


def x509_individual(admin: Any, device: pki.Issued, reg: str) -> None:
    admin.put(f"/enrollments/{reg}", factories.body(factories.x509_enrollment(reg, device)))


# --- through HAProxy -----------------------------------------------------------------------------


def test_symmetric_key_individual_and_group_through_haproxy(front: Front, admin: Any) -> None:
    reg = uid("fs")
    admin.put(f"/enrollments/{reg}", {"registrationId": reg, "attestation": {"type": "symmetricKey"}})
    key = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    assert assigned(register_tls(front, reg, token=device_token(front, reg, key)))["registrationId"] == reg
    gid = uid("fsg")
    admin.put(f"/enrollmentGroups/{gid}", {"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}})
    group_key = admin.post(f"/enrollmentGroups/{gid}/attestationmechanism")["symmetricKey"]["primaryKey"]
    member = uid("fsm")
    token = device_token(front, member, derive_device_key(group_key, member))
    state = assigned(register_tls(front, member, token=token))
    assert state["symmetricKey"]["enrollmentGroupId"] == gid


def test_x509_individual_through_haproxy(front: Front, admin: Any) -> None:
    reg = uid("fxi")
    device = pki.make_device_cert(reg)
    x509_individual(admin, device, reg)
    state = assigned(register_tls(front, reg, credential=device))
    assert state["registrationId"] == reg
    assert state["x509"]["certificateInfo"]["subjectName"] == f"CN={reg}"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"])
def test_x509_group_with_an_intermediate_registers_and_registers_again(
    front: Front, admin: Any, version: ssl.TLSVersion
) -> None:
    """The device offers its session back on the second connection: behind HAProxy 2.6 a
    resumed session loses the intermediates, so the sample config turns resumption off and the
    second registration is a full handshake that succeeds as the first did."""
    root = pki.make_root_ca(uid("Front Root"))
    inter = pki.make_intermediate_ca(uid("Front Intermediate"), root)
    gid = x509_group(admin, root)
    reg = uid("fxg")
    device = pki.make_device_cert(reg, inter)
    context = device_context(front, device, version)
    first = register_tls(front, reg, context=context)
    assert assigned(first)["x509"]["enrollmentGroupId"] == gid
    again = register_tls(front, reg, context=context, session=first.session)
    assert assigned(again)["x509"]["enrollmentGroupId"] == gid, "re-registration behind HAProxy"
    assert not again.resumed


def test_no_client_certificate_is_no_certificate(front: Front, admin: Any) -> None:
    reg = uid("fxn")
    x509_individual(admin, pki.make_device_cert(reg), reg)
    answer = register_tls(front, reg)
    assert answer.status == 401, answer.body
    assert answer.body["errorCode"] == 401000 and "No credential" in answer.body["message"], answer.body


def test_forged_certificate_headers_from_a_device_are_stripped(front: Front, admin: Any) -> None:
    """A device without a certificate names an enrolled device's certificate (and a chain) in
    the headers HAProxy sets: HAProxy drops them, so provisiond sees no certificate."""
    reg = uid("fxf")
    victim = pki.make_device_cert(reg)
    x509_individual(admin, victim, reg)
    forged = {
        "X-Provisiond-Client-Cert": base64.b64encode(pki.certificate_der(victim.cert)).decode(),
        "X-Provisiond-Client-Chain": "",
    }
    answer = register_tls(front, reg, headers=forged)
    assert answer.status == 401, answer.body
    assert answer.body["errorCode"] == 401000 and "No credential" in answer.body["message"], answer.body


# --- straight to the front port ------------------------------------------------------------------


def test_a_connection_from_an_untrusted_address_is_closed_at_accept(front: Front, admin: Any) -> None:
    reg = uid("fxu")
    victim = pki.make_device_cert(reg)
    x509_individual(admin, victim, reg)
    request = _request(
        front.scope,
        reg,
        None,
        {"X-Provisiond-Client-Cert": base64.b64encode(pki.certificate_der(victim.cert)).decode()},
    )
    try:
        answer = plain(front, request, source="127.0.0.2")
    except ConnectionResetError:
        answer = b""
    assert answer == b""
    front.server.wait_for_log("127.0.0.2", "refused: not a trusted front")
    # The same request from the trusted address is honoured: the header is all it takes there.
    status, body = _parse(plain(front, request))
    assert status == 202 and body["status"] == "assigned", body


def _b64(*ders: bytes) -> str:
    return base64.b64encode(b"".join(ders)).decode()


_LEAF = pki.certificate_der(pki.make_device_cert("malformed-leaf").cert)

MALFORMED = {
    "not base64": ({"X-Provisiond-Client-Cert": "not*base64"}, "not base64"),
    "not DER": ({"X-Provisiond-Client-Cert": base64.b64encode(b"hello").decode()}, "not DER"),
    "truncated DER": ({"X-Provisiond-Client-Cert": _b64(_LEAF[:-10])}, "ends inside"),
    "two leaves": ({"X-Provisiond-Client-Cert": _b64(_LEAF, _LEAF)}, "not 1"),
    "chain without leaf": ({"X-Provisiond-Client-Chain": _b64(_LEAF)}, "without"),
    "too many": (
        {"X-Provisiond-Client-Cert": _b64(_LEAF), "X-Provisiond-Client-Chain": _b64(*[_LEAF] * 9)},
        "at most",
    ),
    "too large": (
        {
            "X-Provisiond-Client-Cert": _b64(
                b"\x30\x83" + (MAX_CHAIN_BYTES).to_bytes(3, "big") + bytes(MAX_CHAIN_BYTES)
            )
        },
        "longer than",
    ),
    "bad X-Forwarded-For": ({"X-Forwarded-For": "10.0.0.1, not-an-address"}, "not an address"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_front_headers_are_400(front: Front, case: str) -> None:
    headers, words = MALFORMED[case]
    status, body = _parse(plain(front, _request(front.scope, uid("fbad"), None, headers)))
    assert status == 400, body
    assert body["errorCode"] == 400000 and words in body["message"], body
    front.server.wait_for_log("malformed header", words)


def test_the_same_header_twice_is_400(front: Front) -> None:
    leaf = _b64(_LEAF)
    request = _request(
        front.scope, uid("fdup"), None, {"X-Provisiond-Client-Cert": leaf, "x-provisiond-client-cert": leaf}
    )
    status, body = _parse(plain(front, request))
    assert status == 400 and "more than once" in body["message"], body


def test_the_rightmost_forwarded_address_is_the_client() -> None:
    chain, client = chain_from_headers(
        [(b"x-forwarded-for", b"6.6.6.6, 10.0.0.7"), (b"x-forwarded-for", b"192.0.2.9")]
    )
    assert (chain, client) == ([], "192.0.2.9")
    leaf = pki.certificate_der(pki.make_device_cert("r").cert)
    chain, _ = chain_from_headers(
        [(CERT_HEADER, base64.b64encode(leaf)), (CHAIN_HEADER, base64.b64encode(leaf))]
    )
    assert chain == [leaf]  # a front that repeats the leaf in the chain: once


def test_client_address_is_the_devices_not_a_forged_one(tmp_path: Path) -> None:
    """With a limit of 2 failed attestations per source address, two failures through HAProxy
    and one on provisiond's own HTTPS port, each naming another address in X-Forwarded-For,
    all count against 127.0.0.1: HAProxy's address for the device, not the forged ones."""
    running = start_front(tmp_path, "--failed-attestation-limit", "2")
    try:
        for n in (1, 2):
            answer = register_tls(
                running,
                uid("fff"),
                token="SharedAccessSignature sr=x&sig=y&se=1",
                headers={"X-Forwarded-For": f"198.51.100.{n}"},
            )
            assert answer.status == 401, answer.body
        context = ssl.create_default_context(cafile=running.server.ca_file)
        with context.wrap_socket(
            socket.create_connection(("127.0.0.1", running.server.port), timeout=10),
            server_hostname="localhost",
        ) as tls:
            tls.sendall(
                _request(
                    running.scope,
                    uid("fff"),
                    "SharedAccessSignature sr=x&sig=y&se=1",
                    {"X-Forwarded-For": "198.51.100.3"},
                )
            )
            status, body = _parse(_read_all(tls))
        assert status == 429, body
        assert "from 127.0.0.1" in body["message"], body
    finally:
        stop_front(running)


@pytest.mark.parametrize(
    ("trusted", "words"),
    [([], "--front-port needs --trusted-front"), (["--trusted-front", "0.0.0.0/0"], "trusts every address")],
    ids=["missing", "everyone"],
)
def test_front_port_needs_a_trusted_front(tmp_path: Path, trusted: list[str], words: str) -> None:
    command = ["serve", "--data-dir", str(tmp_path), "--front-port", str(free_port()), *trusted]
    result = subprocess.run(
        [sys.executable, "-m", "provisiond", *command],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")},
    )
    assert result.returncode == 2
    assert words in result.stderr, result.stderr


@pytest.mark.parametrize("transport", ["https", "mqtt-ws", "amqp-ws"])
def test_device_client_registers_through_haproxy(front: Front, admin: Any, transport: str) -> None:
    """provisiond's own device client, an X.509 group device with an intermediate, through
    HAProxy: over HTTPS, and over MQTT and AMQP on WebSockets (the upgrade request carries the
    headers, so the session gets the chain as on provisiond's own TLS)."""
    root = pki.make_root_ca(uid("Client Root"))
    gid = x509_group(admin, root)
    reg = uid("fdc")
    security = X509Security.from_issued(
        pki.make_device_cert(reg, pki.make_intermediate_ca(uid("Client I"), root))
    )
    with ProvisioningDeviceClient.create(
        f"localhost:{front.port}", front.scope, security, transport, ca_file=front.server.ca_file, timeout=20
    ) as client:
        result = client.register()
    assert result.status == RegistrationStatus.ASSIGNED, result
    assert result.registration_state is not None
    assert result.registration_state.x509 is not None
    assert result.registration_state.x509.enrollment_group_id == gid
    assert result.device_id == reg


def test_every_worker_serves_the_front_port(tmp_path: Path) -> None:
    """``--workers 2``: each worker listens on the front port (SO_REUSEPORT) with the same
    trusted list; an untrusted source is closed at accept by whichever worker takes it."""
    front_port = free_port()
    running = start_server(
        tmp_path, "--workers", "2", "--front-port", str(front_port), "--trusted-front", "127.0.0.1"
    )
    try:
        deadline = time.monotonic() + 30
        while running.log().count("serving plain HTTP for the trusted front") < 2:
            assert time.monotonic() < deadline, running.log()[-3000:]
            time.sleep(0.1)
        running.wait_for_log(
            "Trusted front", f"http://127.0.0.1:{front_port}", "from 127.0.0.1 only"
        )  # the banner
        fake = Front(running, None, 0, front_port, tmp_path)  # type: ignore[arg-type]  # no HAProxy here
        for _ in range(8):
            answer = plain(fake, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200"), answer
        try:
            assert plain(fake, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.2") == b""
        except ConnectionResetError:
            pass
    finally:
        running.stop()
