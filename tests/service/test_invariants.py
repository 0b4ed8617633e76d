"""Invariants under hostile input, against a real ``provisiond serve`` on loopback TLS.

Malformed, truncated, nested, oversized and wrongly typed bodies, headers, query strings, paths,
MQTT packets and AMQP messages, sent to every endpoint (device, service and admin API over HTTPS;
the device API over MQTT and AMQP, over TLS and over WebSockets), must never produce

* a 5xx (an HTTP status, an MQTT response topic's status, an AMQP rejection's errorCode),
* an error answer that is not DPS's error body (``errorCode``, ``message``, ``trackingId``),
* a traceback or an "internal error" in the server's log,
* a connection the server keeps open past its deadline (MQTT: the connect timeout, or 1.5 times
  the keep-alive) or after the client went away (the server's open sockets are counted).

Inputs are generated from fixed seeds (a failure names its seed and case to replay), bounded in
count, and sent from a few threads so that the module takes seconds.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import socket
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import psycopg
import pytest

from provisiond.errors import InsufficientData
from provisiond.protocol import tpm
from provisiond.protocol.amqp.performatives import Message
from provisiond.protocol.mqtt import Publish, decode_packet
from tests._server import start_server
from tests._tpm_keys import software_ek
from tests.service._hostile import (
    CLOSE_WITHIN,
    Channel,
    Dps,
    amqp_exchange,
    amqp_message,
    connections,
    hostile_body,
    http_request,
    mqtt_session,
    mutate_bytes,
    text,
)

V = "2021-10-01"
#: --mqtt-connect-timeout of this module's servers; the MQTT cases ask for a keep-alive of 1 s
#: (the server closes 1.5 s after the last packet). Far above both: ``CLOSE_WITHIN``.
CONNECT_TIMEOUT = 0.5
THREADS = 12


# --- the server and its fixtures ------------------------------------------------------------------


def serve(data_dir: Path, *extra: str) -> Iterator[Dps]:
    """A server with an enrolled symmetric-key device, a group and a TPM device; afterwards,
    the checks that span the whole module: no connection left open, nothing bad in the log."""
    server = start_server(data_dir, "--mqtt-connect-timeout", str(CONNECT_TIMEOUT), *extra)
    try:
        with server.client() as admin:
            reg, group = f"inv-{uuid.uuid4().hex[:8]}", f"inv-g-{uuid.uuid4().hex[:8]}"
            admin.put(f"/enrollments/{reg}", {"registrationId": reg, "attestation": {"type": "symmetricKey"}})
            key = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
            admin.put(
                f"/enrollmentGroups/{group}",
                {"enrollmentGroupId": group, "attestation": {"type": "symmetricKey"}},
            )
            tpm_reg, ek_b64 = f"inv-tpm-{uuid.uuid4().hex[:8]}", software_ek(3)
            tpm_attestation = {"type": "tpm", "tpm": {"endorsementKey": ek_b64}}
            admin.put(f"/enrollments/{tpm_reg}", {"registrationId": tpm_reg, "attestation": tpm_attestation})
        ek = base64.b64decode(ek_b64)
        srk = dataclasses.replace(tpm.SRK_TEMPLATE, unique=tpm.endorsement_key(ek).unique).tpm2b()
        yield Dps(server, reg, key, group, tpm_reg, ek, srk)
        # Every connection of the module is closed on the client side by now: the server must
        # let go of all of them (a session that missed the close would hold its socket).
        deadline = time.monotonic() + CLOSE_WITHIN
        while connections(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not connections(server), "the server holds connections nobody uses"
    finally:
        server.stop()
    lines = server.log().splitlines()
    bad = [
        n for n, line in enumerate(lines) if any(w in line for w in ("Traceback", "internal error", "-> 5"))
    ]
    assert not bad, "the server log has errors:\n" + "\n--\n".join(
        "\n".join(lines[max(0, n - 1) : n + 12]) for n in bad[:3]
    )


@pytest.fixture(scope="module")
def dps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dps]:
    """The server on its embedded default, SQLite."""
    yield from serve(tmp_path_factory.mktemp("invariants"))


@pytest.fixture(scope="module")
def dps_postgres(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Dps]:
    """The server on PostgreSQL (a database of its own), for what reaches the store."""
    dbname = f"invariants_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {dbname}")
    try:
        yield from serve(
            tmp_path_factory.mktemp("invariants-pg"),
            "--db",
            urlsplit(postgres_url)._replace(path=f"/{dbname}").geturl(),
        )
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n[invariants] {line}")  # noqa: T201 (the report line)


# --- HTTPS ------------------------------------------------------------------------------------------


def endpoints(t: Dps) -> list[tuple[str, str, Any]]:
    """(method, path, a valid body or None) for every route of the service."""
    reg, group = t.reg, t.group
    enrollment = {
        "registrationId": "{id}",
        "attestation": {"type": "symmetricKey"},
        "initialTwin": {"tags": {}},
    }
    group_doc = {"enrollmentGroupId": "{id}", "attestation": {"type": "symmetricKey"}}
    query = {"query": "SELECT * FROM enrollments WHERE provisioningStatus = 'enabled'"}
    device_body = {"registrationId": reg, "payload": {"a": [1, {"b": None}]}}
    keys = {
        "endorsementKey": base64.b64encode(t.ek).decode(),
        "storageRootKey": base64.b64encode(t.srk).decode(),
    }
    return [
        ("PUT", f"/{t.scope}/registrations/{reg}/register", device_body),
        ("PUT", f"/{t.scope}/registrations/{t.tpm_reg}/register", {"registrationId": t.tpm_reg, "tpm": keys}),
        ("GET", f"/{t.scope}/registrations/{reg}/operations/{uuid.uuid4()}", None),
        ("POST", f"/{t.scope}/registrations/{reg}", device_body),
        ("PUT", "/enrollments/{id}", enrollment),
        ("GET", f"/enrollments/{reg}", None),
        ("DELETE", "/enrollments/{id}", None),
        ("POST", f"/enrollments/{reg}/attestationmechanism", None),
        ("POST", "/enrollments/query", query),
        ("POST", "/enrollments", {"mode": "create", "enrollments": [enrollment]}),
        ("PUT", "/enrollmentGroups/{id}", group_doc),
        ("GET", f"/enrollmentGroups/{group}", None),
        ("POST", "/enrollmentGroups/query", query),
        ("POST", "/enrollmentGroups", {"mode": "update", "enrollmentGroups": [group_doc]}),
        ("GET", f"/registrations/{reg}", None),
        ("DELETE", "/registrations/{id}", None),
        ("POST", f"/registrations/{group}/query", query),
        ("GET", "/admin/settings", None),
        ("PATCH", "/admin/settings", {"allocationPolicy": "hashed"}),
        ("GET", "/admin/linkedHubs", None),
        (
            "PUT",
            "/admin/linkedHubs/{id}.example.net",
            {"hostName": "{id}.example.net", "allocationWeight": 1},
        ),
        ("GET", "/admin/linkedHubs/builtin-hub.provisiond.local/devices", None),
        ("GET", f"/admin/linkedHubs/builtin-hub.provisiond.local/devices/{reg}", None),
        ("GET", "/admin/certificates", None),
        (
            "PUT",
            "/admin/certificates/{id}",
            {"certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"},
        ),
        ("POST", "/admin/certificates/{id}/generateVerificationCode", None),
        ("POST", "/admin/certificates/{id}/verify", {"certificate": "x"}),
        ("GET", "/admin/sharedAccessPolicies", None),
        ("PUT", "/admin/sharedAccessPolicies/{id}", {"keyName": "{id}", "rights": ["EnrollmentRead"]}),
        ("POST", "/admin/sharedAccessPolicies/{id}/listKeys", None),
        ("GET", "/healthz", None),
    ]


def hostile_tpm_keys(t: Dps, rng: random.Random) -> dict[str, str]:
    """The enrolled EK and an SRK (or the other way round), one of them damaged: a flipped bit
    in the modulus (often its lowest or highest), or bytes changed anywhere."""
    ek, srk = t.ek, t.srk
    damaged = bytearray(srk if rng.random() < 0.7 else ek)
    if rng.random() < 0.6:
        bit = rng.choice([0, 0, 2047, rng.randrange(2048)])  # of the modulus, the last 256 bytes
        damaged[len(damaged) - 1 - bit // 8] ^= 1 << (bit % 8)
    else:
        damaged = bytearray(mutate_bytes(bytes(damaged), rng))
    if len(damaged) and bytes(damaged[:8]) == ek[:8] and rng.random() < 0.5:
        ek = bytes(damaged)
    else:
        srk = bytes(damaged)
    return {"endorsementKey": base64.b64encode(ek).decode(), "storageRootKey": base64.b64encode(srk).decode()}


def hostile_query(rng: random.Random) -> str:
    params = []
    choice = rng.randrange(15)
    if choice >= 5:
        params.append("api-version=" + V)
    elif choice == 1:
        params.append("api-version=" + quote(text(rng), safe=""))
    elif choice == 2:
        params.append(rng.choice(["api-version=%ZZ", "api-version", "api-version=&api-version=" + V, "%"]))
    elif choice == 3:
        params += ["api-version=" + V, "forceRegistration=" + quote(text(rng), safe="")]
    elif choice == 4:
        params.append("api-version=" + V + "&" + quote(text(rng), safe="=&"))
    return "&".join(params)


def hostile_headers(t: Dps, path: str, rng: random.Random) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    device = "/registrations/" in path and path.startswith(f"/{t.scope}")
    auth = rng.randrange(12)
    if auth >= 4:
        token = t.device_token() if device else t.server.token()
        headers.append((b"Authorization", token.encode()))
    elif auth == 1:
        token = t.device_token() if device else t.server.token()
        headers.append(
            (b"Authorization", mutate_bytes(token.encode(), rng).replace(b"\r", b"").replace(b"\n", b""))
        )
    elif auth == 2:
        headers.append((b"Authorization", text(rng, 200).encode("utf-8", "replace").replace(b"\x00", b"")))
    elif auth == 3:
        headers.append(
            (
                b"Authorization",
                b"SharedAccessSignature sr=" + bytes(rng.randrange(128, 256) for _ in range(8)),
            )
        )
    extra = rng.randrange(8)
    if extra == 0:
        headers.append((b"If-Match", rng.choice([b"*", b'"x"', b"W/", b'"', b"\xff", b"*, *"])))
    elif extra == 1:
        headers.append(
            (b"x-ms-continuation", rng.choice([b"", b"abc", b"eyJ9", b"\xff\xfe", b"%%%", b"A" * 2000]))
        )
    elif extra == 2:
        headers.append(
            (b"x-ms-max-item-count", rng.choice([b"-1", b"0", b"99999999999999999999", b"x", b"1e3", b""]))
        )
    elif extra == 3:
        headers.append(
            (b"Content-Type", rng.choice([b"text/plain", b"application/json; charset=latin-1", b"\xff"]))
        )
    return headers


def check_http(status: int, headers: dict[str, str], body: bytes, case: str) -> None:
    assert status < 500, f"{case}: {status} {body[:300]!r}"
    if status >= 400 and body[:1] == b"{":  # our answers (uvicorn answers bad HTTP in plain text)
        error = json.loads(body)
        if status == 401 and "authenticationKey" in error:
            return  # a TPM challenge: DPS's shape for it, not an error body
        assert {"errorCode", "message", "trackingId"} <= set(error), f"{case}: {body[:300]!r}"
        assert error["errorCode"] // 1000 == status, f"{case}: {body[:300]!r}"


@pytest.mark.parametrize(
    ("backend", "seed"),
    [
        *(("sqlite", seed) for seed in range(4)),
        *(pytest.param("postgres", seed, marks=pytest.mark.postgres) for seed in range(4, 6)),
    ],
)
def test_https_endpoints_never_fail_on_hostile_requests(
    request: pytest.FixtureRequest, backend: str, seed: int, capsys: pytest.CaptureFixture[str]
) -> None:
    dps: Dps = request.getfixturevalue("dps" if backend == "sqlite" else "dps_postgres")
    rng = random.Random(seed)
    cases: list[tuple[str, str, list[tuple[bytes, bytes]], bytes]] = []
    for method, path, valid in endpoints(dps) * 8:
        name = rng.choice([f"inv-{rng.randrange(10**6)}", f"inv-{rng.randrange(10**6)}", text(rng)]) or "x"
        path = path.replace("{id}", quote(name, safe=""))
        if valid is not None:
            valid = json.loads(json.dumps(valid).replace("{id}", json.dumps(name)[1:-1]))
        if rng.random() < 0.1:
            path = path.replace("/", "/" + quote(text(rng, 8), safe=""), 1)
        body = hostile_body(valid or {}, rng) if valid is not None or rng.random() < 0.3 else b""
        headers = hostile_headers(dps, path, rng)
        if valid is not None and "tpm" in valid:  # the TPM challenge: no credential, keys damaged
            headers = [h for h in headers if h[0] != b"Authorization"]
            for _ in range(8):
                body = json.dumps({**valid, "tpm": hostile_tpm_keys(dps, rng)}).encode()
                cases.append((method, f"{path}?api-version={V}", headers, body))
        query = hostile_query(rng)
        cases.append((method, path + ("?" + query if query else ""), headers, body))

    def run(case: tuple[str, str, list[tuple[bytes, bytes]], bytes]) -> None:
        method, url, headers, body = case
        status, response_headers, payload = http_request(dps.server, method, url, headers, body)
        seen[status] += 1
        check_http(
            status, response_headers, payload, f"seed {seed}: {method} {url[:200]} {headers} {body[:200]!r}"
        )

    seen: Counter[int] = Counter()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(run, cases))
    report(
        capsys, f"https ({backend}) seed {seed}: {len(cases)} requests, statuses {dict(sorted(seen.items()))}"
    )


@pytest.mark.parametrize("seed", range(2))
def test_https_bodies_cut_short_by_a_hang_up(dps: Dps, seed: int) -> None:
    """The client announces more body than it sends, then goes away: the request ends with a
    log line, not a traceback (the module's teardown reads the log)."""
    rng = random.Random(100 + seed)
    context = ssl.create_default_context(cafile=dps.server.ca_file)

    def run(case: tuple[str, str, bytes]) -> None:
        method, path, body = case
        announced = len(body) + rng.randrange(1, 5000)
        head = (
            f"{method} {path}?api-version={V} HTTP/1.1\r\nHost: localhost:{dps.server.port}\r\n"
            f"Authorization: {dps.server.token() if not path.startswith('/' + dps.scope) else ''}\r\n"
            f"Content-Length: {announced}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", dps.server.port), timeout=CLOSE_WITHIN) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(head + body)

    cases = []
    for method, path, valid in endpoints(dps) * 2:
        if valid is not None:
            cases.append(
                (method, path.replace("{id}", f"inv-{rng.randrange(10**6)}"), json.dumps(valid).encode())
            )
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(run, cases))


# --- MQTT -------------------------------------------------------------------------------------------


def check_mqtt_answer(packet: Any, case: str) -> None:
    if not isinstance(packet, Publish):
        return
    status = int(packet.topic.split("/")[3])
    assert status < 500, f"{case}: {packet.topic} {packet.payload[:300]!r}"
    answer = json.loads(packet.payload)
    if status >= 400:
        assert {"errorCode", "message", "trackingId"} <= set(answer), f"{case}: {packet.payload[:300]!r}"
        assert answer["errorCode"] // 1000 == status, f"{case}: {packet.payload[:300]!r}"


@pytest.mark.parametrize("transport", ["mqtt", "mqtt-ws"])
def test_mqtt_never_fails_and_closes_every_connection_by_its_deadline(
    dps: Dps, transport: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server closes each connection itself (the client never does): at once for broken
    input, else when the connect timeout or the keep-alive of the CONNECT lapses."""
    rng = random.Random(7)
    sessions = [mqtt_session(dps, rng) for _ in range(240 if transport == "mqtt" else 80)]

    def run(numbered: tuple[int, bytes]) -> None:
        n, data = numbered
        case = f"{transport} session {n}: {data[:300]!r}"
        channel = Channel(dps, "mqttPort", "mqtt" if transport == "mqtt-ws" else None, random.Random(n))
        try:
            try:
                channel.send(data)
            except OSError:
                return  # closed while we sent: broken input refused early
            buffer = b""
            while True:
                try:
                    chunk = channel.receive(CLOSE_WITHIN)
                except TimeoutError:
                    raise AssertionError(f"{case}: still open {CLOSE_WITHIN} s after the last byte") from None
                if not chunk:
                    break
                buffer += chunk
                while True:
                    try:
                        rest, packet = decode_packet(memoryview(buffer))
                    except InsufficientData:
                        break
                    buffer = bytes(rest)
                    check_mqtt_answer(packet, case)
                    if isinstance(packet, Publish):
                        seen[packet.topic.split("/")[3]] += 1
            assert not buffer, f"{case}: the server sent a truncated packet {buffer[:100]!r}"
        finally:
            channel.close()

    seen: Counter[str] = Counter()
    with ThreadPoolExecutor(24) as pool:
        list(pool.map(run, enumerate(sessions)))
    report(
        capsys,
        f"{transport}: {len(sessions)} sessions, all closed by the server; answers {dict(sorted(seen.items()))}",
    )


# --- AMQP -------------------------------------------------------------------------------------------


def test_amqp_never_fails(dps: Dps, capsys: pytest.CaptureFixture[str]) -> None:
    """Every request is answered (a message, or a rejection carrying DPS's error body) or its
    link refused, never with a 5xx or amqp:internal-error."""
    rng = random.Random(11)
    cases = []
    for n in range(120):
        messages = [amqp_message(dps, rng, m) for m in range(rng.randrange(1, 4))]
        cases.append((n, messages, rng.random() < 0.15, random.Random(n)))

    def run(case: tuple[int, list[Message], bool, random.Random]) -> None:
        n, messages, hostile_sasl, case_rng = case
        what = f"amqp session {n}: {messages}"[:2000]
        outcome = amqp_exchange(dps, case_rng, messages, hostile_sasl=hostile_sasl)
        assert outcome.closed_with not in ("amqp:internal-error",), what
        for rejection in outcome.rejections:
            assert rejection.error is not None, what
            assert str(rejection.error.condition) != "amqp:internal-error", f"{what}: {rejection}"
            error = json.loads(rejection.error.description or "")
            assert {"errorCode", "message", "trackingId"} <= set(error), f"{what}: {rejection}"
            assert error["errorCode"] < 500000, f"{what}: {rejection}"
        for answer in outcome.answers:
            assert json.loads(answer.data or b"")["status"], what
        seen["answered"] += len(outcome.answers)
        seen.update(str(r.error.condition) for r in outcome.rejections if r.error)

    seen: Counter[str] = Counter()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(run, cases))
    report(capsys, f"amqp: {len(cases)} connections; {dict(seen)}")


@pytest.mark.parametrize("transport", ["amqp", "amqp-ws"])
def test_amqp_mutated_sessions_leave_no_trace(dps: Dps, transport: str) -> None:
    """Recorded client sessions, mutated and replayed as bytes: the server answers or closes;
    whatever it does, no traceback and no connection kept after the client left (teardown)."""
    rng = random.Random(13)
    recorded = [
        amqp_exchange(dps, rng, [amqp_message(dps, rng, n) for n in range(2)], hostile_sasl=False).wire
        for _ in range(4)
    ]
    sessions = [mutate_bytes(rng.choice(recorded), rng) for _ in range(80)]

    def run(numbered: tuple[int, bytes]) -> None:
        n, data = numbered
        channel = Channel(dps, "amqpPort", "AMQPWSB10" if transport == "amqp-ws" else None, random.Random(n))
        try:
            channel.send(data)
            while channel.receive(0.5):  # an incomplete session waits for more: the client leaves
                pass
        except OSError:
            pass
        finally:
            channel.close()

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(run, enumerate(sessions)))
