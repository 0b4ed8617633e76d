"""Hostile input against a real ``provisiond serve`` on loopback TLS.

* Deeply nested JSON (a 2 KB body nested 1,000 levels) is a 400 with errorCode 400004 on every
  transport (HTTPS, MQTT, AMQP, and both over WebSockets) and on the service and admin API, decided
  before any attestation, never a traceback; JSON nested within the limit still registers.
* The rate limits cannot be turned against a device: a stranger who names its registration id
  spends the stranger's source-address budget of failed attestations, not the device's own
  budget, on every transport. The source address of HTTPS requests is the client's (never
  X-Forwarded-For on the TLS port): these tests play several sources from loopback addresses.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from provisiond.device import ProvisioningDeviceClient, RetryPolicy, SecurityProvider, SymmetricKeySecurity
from provisiond.errors import NotFoundError, ServiceResponseError, ThrottledError
from provisiond.protocol import tpm
from provisiond.protocol.bounded_json import MAX_DEPTH
from provisiond.protocol.sas import build_sas_token
from provisiond.service.throttle import RateLimiter, source_key
from provisiond.service_client import ServiceClient
from tests._server import RunningServer, start_server
from tests._tpm_keys import software_ek

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

V = {"api-version": "2021-06-01"}
TRANSPORTS = ("https", "mqtt", "mqtt-ws", "amqp", "amqp-ws")
NESTED = b"[" * 1000 + b"]" * 1000  # 2 KB, 1,000 levels


def uid(prefix: str = "h") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def admin(server: RunningServer) -> Iterator[ServiceClient]:
    with server.client() as client:
        yield client


def enroll(admin: ServiceClient, reg: str) -> str:
    admin.put(f"/enrollments/{reg}", {"registrationId": reg, "attestation": {"type": "symmetricKey"}})
    key: str = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    return key


def device_token(server: RunningServer, reg: str, key: str) -> str:
    return build_sas_token(
        f"{server.id_scope}/registrations/{reg}", key, int(time.time()) + 600, key_name="registration"
    )


def endpoint(server: RunningServer, transport: str) -> str:
    port = {"mqtt": server.info["mqttPort"], "amqp": server.info["amqpPort"]}.get(transport, server.port)
    return f"localhost:{port}"


def register(server: RunningServer, reg: str, key: str, transport: str, payload: Any = None) -> Any:
    """The project's device client, one attempt (no retries), over ``transport``."""
    return register_as(
        server, SymmetricKeySecurity(registration_id=reg, symmetric_key=key), transport, payload
    )


def register_as(
    server: RunningServer, security: SecurityProvider, transport: str, payload: Any = None
) -> Any:
    with ProvisioningDeviceClient.create(
        endpoint(server, transport),
        server.id_scope,
        security,
        transport,
        ca_file=server.ca_file,
        timeout=15,
        retry=RetryPolicy(max_attempts=1),
    ) as client:
        return client.register(payload)


def assert_error(r: httpx.Response, status: int, code: int, words: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["errorCode"] == code and r.headers["x-ms-error-code"] == str(code), body
    assert words in body["message"], body["message"]
    return body


def no_tracebacks(server: RunningServer) -> None:
    log = server.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


# --- deeply nested JSON ---------------------------------------------------------------------------


def test_nested_json_on_https_device_endpoints_is_400004_before_attestation(server: RunningServer) -> None:
    reg = uid()
    body = b'{"registrationId":"' + reg.encode() + b'","payload":' + NESTED + b"}"
    with server.http() as http:
        for method, path in (
            ("PUT", f"/{server.id_scope}/registrations/{reg}/register"),
            ("POST", f"/{server.id_scope}/registrations/{reg}"),
        ):
            r = http.request(
                method, path, params=V, content=body, headers={"Content-Type": "application/json"}
            )  # no credential at all: the body is refused first
            error = assert_error(r, 400, 400004, "nested 1001 levels deep")
            assert f"limit is {MAX_DEPTH}" in error["message"]
    assert f"/registrations/{reg}/register -> 400 400004" in server.log()
    no_tracebacks(server)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nested_json_over_every_transport_is_400004(
    server: RunningServer, admin: ServiceClient, transport: str
) -> None:
    """The device client sends the payload verbatim (msgspec.Raw); the key is the device's own,
    and the answer is still the 400, decided before attestation."""
    reg = uid(transport)
    key = enroll(admin, reg)
    with pytest.raises(ServiceResponseError) as info:
        register(server, reg, key, transport, payload=msgspec.Raw(NESTED))
    assert info.value.status_code == 400 and info.value.error_code == 400004
    assert "nested 1001 levels deep" in info.value.body["message"]
    with pytest.raises(NotFoundError):  # nothing was attested, nothing written
        admin.get(f"/registrations/{reg}")
    no_tracebacks(server)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_json_nested_within_the_limit_registers(
    server: RunningServer, admin: ServiceClient, transport: str
) -> None:
    reg = uid(transport)
    key = enroll(admin, reg)
    inner = MAX_DEPTH - 2  # the body object and the payload's own object around the list
    payload = {"deep": json.loads("[" * inner + "]" * inner)}
    result = register(server, reg, key, transport, payload=payload)
    assert result.device_id == reg and result.payload == payload


def test_nested_json_on_the_service_and_admin_api_is_400004(server: RunningServer) -> None:
    headers = {"Authorization": server.token(), "Content-Type": "application/json"}
    reg = uid("svc")
    twin = b'{"registrationId":"' + reg.encode() + b'","attestation":{"type":"symmetricKey"},'
    twin += b'"initialTwin":{"tags":{"a":' + NESTED + b"}}}"
    requests = [
        ("PUT", f"/enrollments/{reg}", twin),
        ("PUT", f"/enrollmentGroups/{uid()}", twin),
        ("POST", "/enrollments/query", b'{"query":' + NESTED + b"}"),
        ("POST", f"/registrations/{reg}/query", b'{"query":' + NESTED + b"}"),  # a group made below
        ("POST", "/enrollments", b'{"mode":"create","enrollments":' + NESTED + b"}"),
        ("PATCH", "/admin/settings", b'{"allocationPolicy":' + NESTED + b"}"),
        ("PUT", "/admin/linkedHubs/h.example.net", b'{"hostName":' + NESTED + b"}"),
        ("PUT", "/admin/sharedAccessPolicies/p", b'{"keyName":"p","rights":' + NESTED + b"}"),
        ("PUT", "/admin/certificates/c", b'{"certificate":' + NESTED + b"}"),
    ]
    with server.http() as http:
        group = {"enrollmentGroupId": reg, "attestation": {"type": "symmetricKey"}}
        assert http.put(f"/enrollmentGroups/{reg}", params=V, json=group, headers=headers).status_code == 200
        for method, path, body in requests:
            r = http.request(method, path, params=V, content=body, headers=headers)
            assert_error(r, 400, 400004, "nested")
        assert http.get(f"/enrollments/{reg}", params=V, headers=headers).status_code == 404  # not written
    no_tracebacks(server)


def test_a_body_cut_short_by_a_hang_up_is_one_log_line(server: RunningServer) -> None:
    """The client announces 100 bytes, sends 8 and goes away: a 400 logged with the cause
    (nobody is left to read it), not an internal error."""
    reg = uid("hangup")
    context = ssl.create_default_context(cafile=server.ca_file)
    request = (
        f"PUT /{server.id_scope}/registrations/{reg}/register?api-version=2021-06-01 HTTP/1.1\r\n"
        f"Host: localhost\r\nContent-Length: 100\r\n\r\n" + '{"regist'
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(request)
    words = f"/registrations/{reg}/register -> 400 400004: The client closed the connection after 8 bytes"
    deadline = time.monotonic() + 10
    while words not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert words in server.log() and "(of 100 announced)" in server.log()
    no_tracebacks(server)


def test_a_service_token_names_a_host_the_server_certificate_covers(server: RunningServer) -> None:
    """``sr`` may name --host or any name of the server's certificate (the development PKI's
    covers 127.0.0.1), and nothing else, whatever Host header comes with it."""
    from provisiond.service_client import ConnectionString

    cs = ConnectionString.parse(server.connection_string)
    expiry = int(time.time()) + 300

    def token(host: str) -> str:
        return build_sas_token(host, cs.key, expiry, key_name=cs.key_name)

    with server.http() as http:
        ok = http.get(
            "/enrollments/nobody", params=V, headers={"Authorization": token(f"127.0.0.1:{server.port}")}
        )
        assert ok.status_code == 404, ok.text  # authenticated: there is no such enrollment
        forged = http.get(
            "/enrollments/nobody",
            params=V,
            headers={"Authorization": token("evil.example"), "Host": "evil.example"},
        )
        assert_error(forged, 401, 401004, "not this service")


def _raw_https(server: RunningServer, chunks: list[bytes]) -> bytes:
    """Send ``chunks`` on a new TLS connection and read until the server closes it."""
    context = ssl.create_default_context(cafile=server.ca_file)
    answer = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            try:
                for chunk in chunks:
                    sock.sendall(chunk)
            except OSError:
                pass  # closed while we still sent: the answer is already on its way
            while data := sock.recv(65536):
                answer += data
    return answer


def test_a_request_head_over_64_kib_is_431_and_the_connection_closed(server: RunningServer) -> None:
    """httptools holds a head whole until it is complete, and uvicorn bounds it only in time:
    without a bound a peer made the server hold 256 MB of headers. Over 64 KiB of head is a
    431 with DPS's body (before any handler runs) and a log line; 60 KiB still passes."""
    header = b"X-Filler: " + b"a" * 30_000 + b"\r\n"
    answer = _raw_https(server, [b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n", *[header] * 100, b"\r\n"])
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), answer[:300]
    assert b"x-ms-error-code: 431000" in head
    error = json.loads(body)
    assert error["errorCode"] == 431000 and "65536-byte limit" in error["message"]
    assert "request -> 431 431000" in server.log() and error["trackingId"] in server.log()
    fits = b"X-Filler: " + b"a" * 20_000 + b"\r\n"
    answer = _raw_https(
        server, [b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + fits * 3 + b"\r\n"]
    )
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    no_tracebacks(server)


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"PUT /x HTTP/1.1\r\nHost: l\r\nContent-Length: -5\r\n\r\n", id="negative-length"),
        pytest.param(
            b"PUT /x HTTP/1.1\r\nHost: l\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", id="two-lengths"
        ),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="http2-preface"),
        pytest.param(b"GET /a\x00b HTTP/1.1\r\nHost: l\r\n\r\n", id="nul-in-path"),
    ],
)
def test_what_the_http_parser_refuses_is_a_dps_400(server: RunningServer, head: bytes) -> None:
    """Requests httptools cannot parse get DPS's body (400000) and a log line with the peer and
    the tracking id, not uvicorn's plain-text answer and anonymous warning."""
    answer = _raw_https(server, [head])
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400 ") and b"x-ms-error-code: 400000" in status, answer[:300]
    error = json.loads(body)
    assert error["errorCode"] == 400000 and error["message"].startswith("The request is malformed: ")
    server.wait_for_log("request -> 400 400000", error["trackingId"])
    no_tracebacks(server)


def test_a_tpm_register_with_an_unusable_srk_is_400004(server: RunningServer, admin: ServiceClient) -> None:
    """The EK is public: anyone may send a TPM device's EK with a storage root key whose modulus
    is even. It is refused as malformed before the activation blob is made (that failed in
    OpenSSL: a 500 with a traceback)."""
    reg = uid("tpm-srk")
    ek = software_ek(7)
    admin.put(
        f"/enrollments/{reg}",
        {"registrationId": reg, "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}},
    )
    modulus = int.from_bytes(tpm.endorsement_key(base64.b64decode(ek)).unique, "big") ^ 1  # even
    srk = dataclasses.replace(tpm.SRK_TEMPLATE, unique=modulus.to_bytes(256, "big")).tpm2b()
    body = {
        "registrationId": reg,
        "tpm": {"endorsementKey": ek, "storageRootKey": base64.b64encode(srk).decode()},
    }
    with server.http() as http:
        r = http.put(f"/{server.id_scope}/registrations/{reg}/register", params=V, json=body)
    assert_error(r, 400, 400004, "modulus is even")
    no_tracebacks(server)


# --- rate limits: strangers cannot lock a device out ----------------------------------------------

DEVICE_LIMIT = 4  # requests a minute per attested device
FAILURE_LIMIT = 6  # failed attestations a minute per source address


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path / "limited",
        "--device-rate-limit",
        str(DEVICE_LIMIT),
        "--failed-attestation-limit",
        str(FAILURE_LIMIT),
    )
    yield running
    running.stop()
    no_tracebacks(running)


def https_register(
    http: httpx.Client, server: RunningServer, reg: str, token: str | None, source: str | None = None
) -> httpx.Response:
    """A register over ``http``, or from ``source`` (a loopback address) on a connection of its own."""
    headers = {"Authorization": token} if token else {}
    if source is None:
        return http.put(
            f"/{server.id_scope}/registrations/{reg}/register",
            params=V,
            json={"registrationId": reg},
            headers=headers,
        )
    verify = ssl.create_default_context(cafile=server.ca_file)
    with server.http(transport=httpx.HTTPTransport(local_address=source, verify=verify)) as own:
        return own.put(
            f"/{server.id_scope}/registrations/{reg}/register",
            params=V,
            json={"registrationId": reg},
            headers=headers,
        )


def test_strangers_naming_a_device_do_not_spend_its_budget(limited: RunningServer) -> None:
    with limited.client() as admin:
        reg = uid("victim")
        key = enroll(admin, reg)
    wrong = device_token(limited, reg, "AAAA" * 11)
    with limited.http() as http:
        statuses = []
        for n in range(3 * DEVICE_LIMIT):  # several strangers, each until it is refused
            source = f"127.51.100.{n // (FAILURE_LIMIT + 1)}"
            statuses.append(https_register(http, limited, reg, wrong if n % 2 else None, source).status_code)
        assert set(statuses) <= {401, 429} and statuses.count(401) >= DEVICE_LIMIT
        # The device itself still has its whole budget, on every transport.
        r = https_register(http, limited, reg, device_token(limited, reg, key), "127.0.113.9")
        assert r.status_code == 202 and r.json()["status"] == "assigned", r.text
    for transport in ("mqtt", "amqp", "mqtt-ws"):
        assert register(limited, reg, key, transport).device_id == reg
    # Its own requests are what it spends: the next one is over the per-device limit.
    with pytest.raises(ServiceResponseError) as info:
        register(limited, reg, key, "amqp-ws")
    assert info.value.status_code == 429 and info.value.error_code == 429001


def test_a_source_over_its_failure_budget_is_refused_before_attestation(limited: RunningServer) -> None:
    with limited.client() as admin:
        reg, other = uid("target"), uid("bystander")
        key, other_key = enroll(admin, reg), enroll(admin, other)
    wrong = device_token(limited, reg, "AAAA" * 11)
    attacker = "127.0.2.77"
    with limited.http() as http:
        for _ in range(FAILURE_LIMIT):
            assert https_register(http, limited, reg, wrong, attacker).status_code == 401
        r = https_register(http, limited, reg, wrong, attacker)
        assert_error(r, 429, 429003, f"Too many failed attestations from {attacker}")
        assert int(r.headers["retry-after"]) >= 1
        # Refused before attestation: even a valid credential from that source waits.
        r = https_register(http, limited, other, device_token(limited, other, other_key), attacker)
        assert_error(r, 429, 429003, "per source address")
        # Another source, the same devices: attested as usual.
        r = https_register(http, limited, reg, device_token(limited, reg, key), "127.0.2.78")
        assert r.status_code == 202, r.text
    assert f"-> 429 429003: Too many failed attestations from {attacker}" in limited.log()


def test_failures_over_mqtt_and_amqp_count_against_their_source_address(limited: RunningServer) -> None:
    """The stream's peer address reaches the registrar: wrong keys over MQTT and AMQP spend
    127.0.0.1's budget, which then holds over every transport from that address."""
    with limited.client() as admin:
        reg = uid("streams")
        key = enroll(admin, reg)
    for n in range(FAILURE_LIMIT):
        with pytest.raises(ServiceResponseError) as info:
            register(limited, reg, "AAAA" * 11, ("mqtt", "amqp", "mqtt-ws", "amqp-ws")[n % 4])
        assert info.value.status_code == 401
    for transport in TRANSPORTS:
        with pytest.raises(ServiceResponseError) as info:
            register(limited, reg, key, transport)
        assert info.value.status_code == 429 and info.value.error_code == 429003, transport
    with limited.http() as http:  # the same device from another address
        r = https_register(http, limited, reg, device_token(limited, reg, key), "127.0.113.10")
        assert r.status_code == 202, r.text


def test_failed_tpm_attestation_in_amqp_sasl_counts_against_the_source(
    limited: RunningServer, swtpm_factory: Any
) -> None:
    """Over AMQP, TPM attestation happens in SASL, outside the registrar: its failures spend the
    source's budget too, and a source over it is refused with the sys-temp outcome."""
    from provisiond.device.tpm import TpmSecurity

    reg = uid("tpm")
    with TpmSecurity(tcti=swtpm_factory().tcti, registration_id=reg) as stranger:
        with TpmSecurity(tcti=swtpm_factory().tcti) as enrolled, limited.client() as admin:
            tpm = {"type": "tpm", "tpm": {"endorsementKey": enrolled.endorsement_key_b64}}
            admin.put(f"/enrollments/{reg}", {"registrationId": reg, "attestation": tpm})
        for _ in range(FAILURE_LIMIT):
            with pytest.raises(ServiceResponseError) as info:
                register_as(limited, stranger, "amqp")
            assert "outcome auth" in str(info.value)
        with pytest.raises(ServiceResponseError) as info:
            register_as(limited, stranger, "amqp")
        assert "outcome sys_temp" in str(info.value)
    # The close's log line follows the refusal the device already has: wait for it.
    limited.wait_for_log("SASL TPM refused: Too many failed attestations from 127.0.0.1")
    with limited.http() as http:  # the same source over HTTPS
        r = https_register(http, limited, uid(), None)
        assert_error(r, 429, 429003, "Too many failed attestations from 127.0.0.1")


# --- the limiter's own rules (a clock passed in) ---------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_source_budget_refills_and_memory_is_bounded() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock, failures_per_minute=2, max_keys=50)
    limiter.failed("10.0.0.1")
    limiter.failed("10.0.0.1")
    with pytest.raises(Exception) as info:
        limiter.admit("10.0.0.1")
    assert getattr(info.value, "retry_after", None) == 30
    limiter.admit("10.0.0.2")  # another source
    clock.now += 30
    limiter.admit("10.0.0.1")  # one failure refilled
    for n in range(10_000):  # a flood of distinct sources keeps at most max_keys buckets
        limiter.failed(f"10.1.{n // 256}.{n % 256}")
    assert limiter._sources is not None and len(limiter._sources) == 50


def test_the_node_rate_is_shared_among_its_workers() -> None:
    """Each of a node's workers admits its share of ``--rate-limit``: a burst of one second's
    share, then the share a second; the refusal names the node's limit."""
    clock = Clock()
    limiter = RateLimiter(clock=clock, global_per_second=10, workers=2)
    for _ in range(5):
        limiter.admit(None)
    with pytest.raises(ThrottledError) as info:
        limiter.admit(None)
    assert (info.value.error_code, info.value.retry_after) == (429002, 1)
    assert "10 device requests a second" in info.value.message
    clock.now += 0.2  # one request's worth at 5 a second
    limiter.admit(None)
    with pytest.raises(ThrottledError):
        limiter.admit(None)


def test_a_rate_under_one_a_second_admits_a_request_every_so_often() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock, global_per_second=0.5)
    limiter.admit(None)
    with pytest.raises(ThrottledError) as info:
        limiter.admit(None)
    assert info.value.retry_after == 2
    clock.now += 2
    limiter.admit(None)


def test_two_workers_each_admit_half_the_node_rate(tmp_path: Path) -> None:
    """``serve --workers 2 --rate-limit 0.2``: each worker admits one request at once and then
    one every 10 s (half the node's 0.2 a second), so six requests arriving together on new
    connections get at most two through, and the others a Retry-After of about 10 s (5 s, were
    each worker to admit the node's whole rate)."""
    running = start_server(tmp_path, "--workers", "2", "--rate-limit", "0.2")
    try:
        answers = []
        for _ in range(6):
            with running.http(headers={"Connection": "close"}) as http:
                answers.append(
                    http.put(
                        f"/{running.id_scope}/registrations/nobody/register",
                        params=V,
                        json={"registrationId": "nobody"},
                    )
                )
        admitted = [r for r in answers if r.status_code == 401]  # attested, and failed
        refused = [r for r in answers if r.status_code == 429]
        assert len(admitted) + len(refused) == 6 and 1 <= len(admitted) <= 2, [r.text for r in answers]
        for r in refused:
            assert_error(r, 429, 429002, "over its limit of 0.2 device requests a second")
            assert 8 <= int(r.headers["retry-after"]) <= 10, r.headers
        no_tracebacks(running)
    finally:
        running.stop()


def test_source_keys() -> None:
    assert source_key("192.0.2.1") == "192.0.2.1"
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert source_key(None) is None and source_key("") is None
