"""The device client without a network: MockTransport, httpx.MockTransport under HttpsTransport,
security providers, and a TLS handshake in memory to see what an X.509 device presents."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from provisiond import errors, pki, tls
from provisiond.device import (
    AsyncProvisioningDeviceClient,
    HttpsTransport,
    MockTransport,
    ProvisioningDeviceClient,
    RegistrationResult,
    RetryPolicy,
    SecurityProvider,
    SymmetricKeySecurity,
    TransportKind,
    X509Security,
    derive_device_key,
)
from provisiond.errors import ConfigurationError, ConnectError, RegistrationFailedError, ServiceResponseError
from provisiond.models import RegistrationStatus
from provisiond.protocol.registration import Reply, Request, SendPoll, SendRegister
from provisiond.protocol.sas import parse_sas_token, verify_signature

KEY = "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0wMTIzNDU2Nzg5"  # base64
GROUP_KEY = "Z3JvdXAta2V5LWZvci10ZXN0cy1vbmx5LWFiY2RlZmdoaWo="
SCOPE = "0ne00000001"


def status_body(status: str, operation_id: str = "op-1", **state: Any) -> bytes:
    doc: dict[str, Any] = {"operationId": operation_id, "status": status}
    if status != "assigning":
        doc["registrationState"] = {"registrationId": "dev-1", "status": status, **state}
    return json.dumps(doc).encode()


def assigning_then_assigned(request: Request) -> Reply:
    """A DPS-like service: register answers assigning, the poll answers assigned."""
    if isinstance(request, SendRegister):
        return Reply(status=202, body=status_body("assigning", "op-9"), retry_after=0)
    assert request.operation_id == "op-9"
    return Reply(
        status=200,
        body=status_body("assigned", "op-9", assignedHub="hub.local", deviceId="dev-1", payload={"echo": 1}),
    )


def security() -> SymmetricKeySecurity:
    return SymmetricKeySecurity(registration_id="dev-1", symmetric_key=KEY)


# --- the clients over MockTransport --------------------------------------------------------------


async def test_sync_and_async_clients_give_the_same_result() -> None:
    async with AsyncProvisioningDeviceClient(
        security=security(), transport=MockTransport(assigning_then_assigned)
    ) as client:
        async_result = await client.register({"echo": 1})

    def blocking() -> RegistrationResult:
        with ProvisioningDeviceClient.create(
            "unused:1", SCOPE, security(), MockTransport(assigning_then_assigned)
        ) as client:
            return client.register({"echo": 1})

    # In a worker thread, and from a thread whose loop is running: the facade has its own loop.
    sync_result = await asyncio.to_thread(blocking)
    assert sync_result == async_result
    assert async_result.status is RegistrationStatus.ASSIGNED and async_result.assigned_hub == "hub.local"
    assert async_result.payload == {"echo": 1} and async_result.operation_id == "op-9"


async def test_mock_transport_takes_an_async_handler_and_sees_the_requests() -> None:
    seen: list[Request] = []

    async def handler(request: Request) -> Reply:
        seen.append(request)
        return assigning_then_assigned(request)

    client = AsyncProvisioningDeviceClient(security=security(), transport=MockTransport(handler))
    await client.register(force=True)
    await client.close()
    register, poll = seen
    assert isinstance(register, SendRegister) and register.force and register.body.payload is None
    assert poll == SendPoll(registration_id="dev-1", operation_id="op-9")


def test_errors_are_the_same_from_both_clients() -> None:
    body = json.dumps({"errorCode": 401002, "trackingId": "t-1", "message": "Bad key"}).encode()
    transport = MockTransport(lambda request: Reply(status=401, body=body))
    with (
        pytest.raises(ServiceResponseError) as sync_info,
        ProvisioningDeviceClient.create("unused:1", SCOPE, security(), transport) as client,
    ):
        client.register()
    with pytest.raises(ServiceResponseError) as async_info:
        asyncio.run(AsyncProvisioningDeviceClient(security=security(), transport=transport).register())
    assert str(sync_info.value) == str(async_info.value)
    assert "Bad key" in str(sync_info.value) and "401002" in str(sync_info.value)

    failed = status_body("failed", errorCode=400208, errorMessage="No hub to assign")
    with (
        pytest.raises(RegistrationFailedError, match="No hub to assign") as info,
        ProvisioningDeviceClient.create(
            "unused:1", SCOPE, security(), MockTransport(lambda r: Reply(status=202, body=failed))
        ) as client,
    ):
        client.register()
    assert info.value.status is RegistrationStatus.FAILED and info.value.error_code == 400208


def test_transport_errors_are_thrown_into_the_flow_and_retried_when_the_policy_says_so() -> None:
    calls: list[Request] = []

    def flaky(request: Request) -> Reply:
        calls.append(request)
        if len(calls) == 1:
            raise ConnectError("connection refused")
        return Reply(status=202, body=status_body("assigned", assignedHub="h", deviceId="dev-1"))

    policy = RetryPolicy(retry_transport_errors=True, initial_backoff=0.1)
    client = AsyncProvisioningDeviceClient(
        security=security(), transport=MockTransport(flaky), retry=policy, random=lambda: 0.0
    )
    assert asyncio.run(client.register()).device_id == "dev-1"
    assert len(calls) == 2

    calls.clear()
    with pytest.raises(ConnectError):
        asyncio.run(
            AsyncProvisioningDeviceClient(security=security(), transport=MockTransport(flaky)).register()
        )


def test_the_sync_client_runs_in_the_calling_thread_and_leaves_nothing_running() -> None:
    before = set(threading.enumerate())
    client = ProvisioningDeviceClient.create(
        "unused:1", SCOPE, security(), MockTransport(assigning_then_assigned)
    )
    assert client.register().device_id == "dev-1"
    assert client.register().device_id == "dev-1"  # its loop serves every call
    assert set(threading.enumerate()) - before == set(), "a plain thread's call needs no other thread"
    client.close()


def test_the_sync_client_works_from_a_thread_that_runs_an_event_loop() -> None:
    before = set(threading.enumerate())
    client = ProvisioningDeviceClient.create(
        "unused:1", SCOPE, security(), MockTransport(assigning_then_assigned)
    )

    async def notebook_cell() -> str | None:
        return client.register().device_id

    assert asyncio.run(notebook_cell()) == "dev-1"
    assert client.register().device_id == "dev-1"  # then from the plain thread, on the same loop
    client.close()
    assert not [
        t for t in set(threading.enumerate()) - before if t.is_alive() and t.name == "provisiond-device"
    ]


def test_an_unclosed_sync_client_does_not_keep_the_interpreter_alive() -> None:
    answer = status_body("assigned", assignedHub="h", deviceId="dev-1")
    code = "\n".join(
        [
            "from provisiond.device import MockTransport, ProvisioningDeviceClient, SymmetricKeySecurity",
            "from provisiond.protocol.registration import Reply",
            f"security = SymmetricKeySecurity(registration_id='dev-1', symmetric_key='{KEY}')",
            f"transport = MockTransport(lambda r: Reply(status=200, body={answer!r}))",
            f"client = ProvisioningDeviceClient.create('x:1', '{SCOPE}', security, transport)",
            "print(client.register().status.value)",  # and exit without closing it
        ]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "assigned"


def test_create_picks_transports_by_name_or_instance(tmp_path: Path) -> None:
    client = AsyncProvisioningDeviceClient.create("localhost:8443", SCOPE, security(), "HTTPS")
    assert isinstance(client.transport, HttpsTransport) and client.transport.host == "localhost:8443"
    mock = MockTransport(assigning_then_assigned)
    assert AsyncProvisioningDeviceClient.create("x:1", SCOPE, security(), mock).transport is mock
    with pytest.raises(ValueError, match="Unknown transport 'smtp'"):
        AsyncProvisioningDeviceClient.create("localhost:8443", SCOPE, security(), "smtp")
    with pytest.raises(ValueError, match="not an endpoint"):
        AsyncProvisioningDeviceClient.create("localhost:8443/path", SCOPE, security(), TransportKind.HTTPS)
    with pytest.raises(ConfigurationError, match="CA certificates"):
        AsyncProvisioningDeviceClient.create(
            "localhost:8443", SCOPE, security(), ca_file=tmp_path / "missing.pem"
        )


def test_public_names_live_in_provisiond_device() -> None:
    assert ProvisioningDeviceClient.__module__ == "provisiond.device"
    assert RetryPolicy.__module__ == "provisiond.device"
    assert "provisiond.device.HttpsTransport" in repr(HttpsTransport)


# --- HttpsTransport on httpx.MockTransport -------------------------------------------------------


async def test_https_transport_maps_requests_to_the_dps_device_api() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.method == "PUT":
            return httpx.Response(202, content=status_body("assigning", "op/1"), headers={"Retry-After": "0"})
        return httpx.Response(
            200,
            content=status_body("assigned", "op/1", assignedHub="h", deviceId="d"),
            headers={"retry-after": "x"},
        )

    transport = HttpsTransport(
        host="https://dps.example:8443/",
        id_scope=SCOPE,
        security=SymmetricKeySecurity(registration_id="dev:1", symmetric_key=KEY),
        http_transport=httpx.MockTransport(handler),
        api_version="2019-03-31",
    )
    async with AsyncProvisioningDeviceClient(
        security=SymmetricKeySecurity(registration_id="dev:1", symmetric_key=KEY), transport=transport
    ) as client:
        result = await client.register({"a": 1}, force=True)
    assert result.device_id == "d"

    put, get = requests
    assert put.url.host == "dps.example" and put.url.port == 8443
    assert (
        put.url.raw_path
        == f"/{SCOPE}/registrations/dev%3A1/register?api-version=2019-03-31&forceRegistration=true".encode()
    )
    assert json.loads(put.content) == {"registrationId": "dev:1", "payload": {"a": 1}}
    assert put.headers["content-type"] == "application/json; charset=utf-8"
    assert put.headers["accept"] == "application/json"
    assert put.headers["user-agent"].startswith("provisiond-device/")
    assert (
        get.url.raw_path
        == f"/{SCOPE}/registrations/dev%3A1/operations/op%2F1?api-version=2019-03-31".encode()
    )
    for request in requests:
        token = parse_sas_token(request.headers["authorization"])
        assert token.resource == f"{SCOPE}/registrations/dev:1" and token.key_name == "registration"
        assert verify_signature(token, KEY)
        assert 3500 < token.expiry - time.time() <= 3600


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        pytest.param(httpx.ConnectError("refused"), errors.ConnectError, id="connect"),
        pytest.param(httpx.ConnectTimeout("slow"), errors.TimeoutError, id="connect-timeout"),
        pytest.param(httpx.ReadTimeout("slow"), errors.TimeoutError, id="read-timeout"),
        pytest.param(httpx.RemoteProtocolError("garbled"), errors.TransportError, id="protocol"),
        pytest.param(httpx.ReadError("reset"), errors.TransportError, id="read"),
    ],
)
async def test_https_transport_translates_httpx_errors_once(
    raised: Exception, expected: type[Exception]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise raised

    transport = HttpsTransport(
        host="dps.example", id_scope=SCOPE, security=security(), http_transport=httpx.MockTransport(handler)
    )
    client = AsyncProvisioningDeviceClient(security=security(), transport=transport)
    with pytest.raises(expected) as info:
        await client.register()
    await client.close()
    assert type(info.value) is expected and info.value.__cause__ is raised
    assert "dps.example" in str(info.value)


def test_https_transport_validates_its_configuration() -> None:
    with pytest.raises(ValueError, match="not both"):
        HttpsTransport(
            host="h",
            id_scope=SCOPE,
            security=security(),
            ca_file="x",
            ssl_context=ssl.create_default_context(),
        )
    for host in ("", "h/p", "h:99999", "ftp://h"):
        with pytest.raises(ValueError):
            HttpsTransport(host=host, id_scope=SCOPE, security=security())
    with pytest.raises(ValueError):
        HttpsTransport(host="h", id_scope="a/b", security=security())


# --- security providers --------------------------------------------------------------------------


def test_symmetric_key_sas_token_verifies() -> None:
    token_text = security().sas_token(f"{SCOPE}/registrations/dev-1", 2_000_000_000)
    assert token_text.startswith("SharedAccessSignature ")
    token = parse_sas_token(token_text)
    assert token.raw_resource == quote(f"{SCOPE}/registrations/dev-1", safe="")
    assert token.expiry == 2_000_000_000 and token.key_name == "registration"
    assert verify_signature(token, KEY) and not verify_signature(token, GROUP_KEY)
    assert security().tls_client_certificate() is None
    assert KEY not in repr(security())


def test_group_key_derivation() -> None:
    device = SymmetricKeySecurity.from_group_key(registration_id="dev-7", group_key=GROUP_KEY)
    derived = derive_device_key(GROUP_KEY, "dev-7")
    token = parse_sas_token(device.sas_token(f"{SCOPE}/registrations/dev-7", 2_000_000_000))
    assert verify_signature(token, derived) and not verify_signature(token, GROUP_KEY)
    # The same derivation as the SDK samples: base64(HMAC-SHA256(b64decode(group), id)).
    expected = base64.b64encode(
        hmac.new(base64.b64decode(GROUP_KEY), b"dev-7", hashlib.sha256).digest()
    ).decode()
    assert derived == expected


def test_symmetric_key_validation() -> None:
    with pytest.raises(ConfigurationError, match="not base64"):
        SymmetricKeySecurity(registration_id="d", symmetric_key="not base64!")
    with pytest.raises(ConfigurationError, match="not base64"):
        SymmetricKeySecurity.from_group_key(registration_id="d", group_key="###")
    with pytest.raises(ValueError):
        SymmetricKeySecurity(registration_id=" ", symmetric_key=KEY)
    with pytest.raises(TypeError):
        SymmetricKeySecurity("d", KEY)  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def chain() -> dict[str, pki.Issued]:
    root = pki.make_root_ca("Unit Root")
    intermediate = pki.make_intermediate_ca("Unit Intermediate", root)
    return {
        "root": root,
        "intermediate": intermediate,
        "leaf": pki.make_device_cert("unit-dev-1", intermediate),
    }


def _presented(security: SecurityProvider) -> list[bytes]:
    """Handshake in memory with a server that accepts any client certificate; return what the
    client presented (DER, leaf first)."""
    server_pki = pki.make_server_cert(pki.make_root_ca("Unit Server CA"), ["localhost"])
    with tempfile.TemporaryDirectory() as tmp:
        pki.write_issued(server_pki, Path(tmp) / "server", chain=True)
        server_ctx = tls.server_context(
            pki.chain_path(Path(tmp) / "server"), pki.key_path(Path(tmp) / "server")
        )
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    credential = security.tls_client_certificate()
    assert credential is not None
    credential.load_into(client_ctx)
    wires = [ssl.MemoryBIO() for _ in range(4)]
    client = client_ctx.wrap_bio(wires[0], wires[1], server_hostname="localhost")
    server = server_ctx.wrap_bio(wires[2], wires[3], server_side=True)
    done: set[int] = set()
    for _ in range(20):
        for end in (client, server):
            if id(end) not in done:
                try:
                    end.do_handshake()
                    done.add(id(end))
                except ssl.SSLWantReadError:
                    pass
        wires[2].write(wires[1].read())
        wires[0].write(wires[3].read())
        if len(done) == 2:
            break
    return tls.peer_chain(server)


def test_x509_from_pem_files_presents_the_full_chain(tmp_path: Path, chain: dict[str, pki.Issued]) -> None:
    leaf = chain["leaf"]
    pki.write_issued(leaf, tmp_path / "dev", chain=True)
    from_chain_file = X509Security.from_pem_files(
        pki.chain_path(tmp_path / "dev"), pki.key_path(tmp_path / "dev")
    )
    assert from_chain_file.registration_id == "unit-dev-1"
    expected = [pki.certificate_der(c) for c in leaf.presented_chain]
    assert len(expected) == 2
    assert _presented(from_chain_file) == expected

    separate = X509Security.from_pem_files(
        pki.cert_path(tmp_path / "dev"),
        pki.key_path(tmp_path / "dev"),
        chain_file=pki.chain_path(tmp_path / "dev"),  # starts with the leaf again: deduplicated
        registration_id="explicit-id",
    )
    assert separate.registration_id == "explicit-id"
    assert _presented(separate) == expected


def test_x509_encrypted_key_and_wrong_password(tmp_path: Path, chain: dict[str, pki.Issued]) -> None:
    leaf = chain["leaf"]
    (tmp_path / "dev.pem").write_bytes(pki.certificate_pem(*leaf.presented_chain))
    (tmp_path / "dev.key").write_bytes(pki.private_key_pem(leaf.key, "pw"))
    assert X509Security.from_pem_files(
        tmp_path / "dev.pem", tmp_path / "dev.key", password="pw"
    ).registration_id
    with pytest.raises(ConfigurationError, match="password"):
        X509Security.from_pem_files(tmp_path / "dev.pem", tmp_path / "dev.key", password="nope")
    with pytest.raises(ConfigurationError, match="password"):
        X509Security.from_pem_files(tmp_path / "dev.pem", tmp_path / "dev.key")


def test_x509_from_pkcs12(tmp_path: Path, chain: dict[str, pki.Issued]) -> None:
    leaf = chain["leaf"]
    (tmp_path / "dev.pfx").write_bytes(pki.to_pkcs12(leaf, "s3cret"))
    device = X509Security.from_pkcs12(tmp_path / "dev.pfx", "s3cret")
    assert device.registration_id == "unit-dev-1"
    assert _presented(device) == [pki.certificate_der(c) for c in leaf.presented_chain]
    with pytest.raises(ConfigurationError, match="wrong password"):
        X509Security.from_pkcs12(tmp_path / "dev.pfx", "wrong")
    with pytest.raises(ConfigurationError, match="Cannot read"):
        X509Security.from_pkcs12(tmp_path / "missing.pfx", "s3cret")


def test_x509_rejects_mismatched_keys_and_missing_cn(tmp_path: Path, chain: dict[str, pki.Issued]) -> None:
    other = pki.make_device_cert("other")
    pki.write_issued(chain["leaf"], tmp_path / "dev")
    (tmp_path / "other.key").write_bytes(pki.private_key_pem(other.key))
    with pytest.raises(ConfigurationError, match="does not belong"):
        X509Security.from_pem_files(pki.cert_path(tmp_path / "dev"), tmp_path / "other.key")
    (tmp_path / "empty.pem").write_text("no certificate here\n")
    with pytest.raises(ConfigurationError, match="no PEM certificate|no readable"):
        X509Security.from_pem_files(tmp_path / "empty.pem", pki.key_path(tmp_path / "dev"))

    no_cn = pki.make_device_cert("placeholder")
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "No CN Inc")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "No CN Inc")]))
        .public_key(no_cn.key.public_key())
        .serial_number(1)
        .not_valid_before(no_cn.cert.not_valid_before_utc)
        .not_valid_after(no_cn.cert.not_valid_after_utc)
        .sign(no_cn.key, hashes.SHA256())
    )
    issued = pki.Issued(cert, no_cn.key)
    with pytest.raises(ConfigurationError, match="no common name"):
        X509Security.from_issued(issued)
    assert X509Security.from_issued(issued, registration_id="given").registration_id == "given"
