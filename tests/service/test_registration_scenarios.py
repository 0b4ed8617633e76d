"""One registration scenario suite for the five device transports (HTTPS, MQTT, MQTT over
WebSockets, AMQP, AMQP over WebSockets): provisiond's own device client against a real
``provisiond serve`` over TLS on loopback, every scenario on every transport. The device gateway
(provisiond.service.gateway) promises that a request means the same on all of them: the same
attestation, statuses, error bodies, retry-after and log lines. A recording transport keeps the
replies as the client saw them off the wire (status, body, retry-after).

What is truly one transport's (topics and QoS, AMQP frames and SASL outcomes, WebSocket
subprotocols, CONNECT refusals, HTTP headers, fuzz) stays in test_device_api.py,
test_mqtt_endpoint.py, test_amqp_endpoint.py and tests/device/.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from provisiond import pki
from provisiond.device import (
    AsyncProvisioningDeviceClient,
    RegistrationResult,
    RetryPolicy,
    SecurityProvider,
    SymmetricKeySecurity,
    Transport,
    X509Security,
)
from provisiond.errors import RegistrationFailedError, ServiceResponseError
from provisiond.models import RegistrationStatus, RegistrationSubstatus
from provisiond.protocol.messages import decode_operation_status
from provisiond.protocol.registration import Reply, Request, SendPoll, SendRegister
from provisiond.protocol.sas import build_sas_token
from provisiond.service_client import ServiceClient
from tests._server import RunningServer, start_server
from tests._swtpm import Swtpm
from tests.service.test_webhook import Hook, answer_json, start_hook

TRANSPORTS = [pytest.param(name, id=name) for name in ("https", "mqtt", "mqtt-ws", "amqp", "amqp-ws")]
#: The assignment budget of this module's server: a webhook slower than this makes the device poll.
BUDGET = 0.3


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def pem(cert: Any) -> str:
    return pki.certificate_pem(cert).decode()


@pytest.fixture(scope="module")
def dps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("scenarios"), "--assignment-budget", str(BUDGET))
    yield running
    running.stop()
    assert "Traceback" not in running.log() and "internal error" not in running.log()


@pytest.fixture(scope="module")
def admin(dps: RunningServer) -> Iterator[ServiceClient]:
    with dps.client() as client:
        yield client


@pytest.fixture(scope="module")
def hook() -> Iterator[Hook]:
    running = start_hook()
    yield running
    running.server.shutdown()
    running.server.server_close()


def endpoint(server: RunningServer, transport: str) -> str:
    ports = {"https": server.port, "mqtt": server.info["mqttPort"], "amqp": server.info["amqpPort"]}
    return f"localhost:{ports.get(transport, server.port)}"  # the WebSockets share the HTTPS port


class Recording(Transport):
    """The client's transport, keeping every request and the reply it got off the wire."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.exchanges: list[tuple[Request, Reply]] = []

    async def send(self, request: Request) -> Reply:
        reply = await self.inner.send(request)
        self.exchanges.append((request, reply))
        return reply

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Device:
    """A device with one credential, registering over one transport."""

    server: RunningServer
    security: SecurityProvider
    transport: str
    exchanges: list[tuple[Request, Reply]] = field(default_factory=list)

    async def register(self, *, retry: RetryPolicy | None = None, **kwargs: Any) -> RegistrationResult:
        inner = AsyncProvisioningDeviceClient.create(
            endpoint(self.server, self.transport),
            self.server.id_scope,
            self.security,
            self.transport,
            ca_file=self.server.ca_file,
            timeout=15,
        ).transport
        recording = Recording(inner)
        try:
            async with AsyncProvisioningDeviceClient(
                security=self.security, transport=recording, retry=retry or RetryPolicy(total_timeout=30)
            ) as client:
                return await client.register(**kwargs)
        finally:
            self.exchanges += recording.exchanges


def enroll_symmetric(admin: ServiceClient, reg: str, **extra: Any) -> str:
    admin.put(
        f"/enrollments/{reg}", {"registrationId": reg, "attestation": {"type": "symmetricKey"}, **extra}
    )
    key: str = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    return key


def symmetric_group(admin: ServiceClient, **extra: Any) -> tuple[str, str]:
    gid = uid("grp")
    admin.put(
        f"/enrollmentGroups/{gid}",
        {"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}, **extra},
    )
    key: str = admin.post(f"/enrollmentGroups/{gid}/attestationmechanism")["symmetricKey"]["primaryKey"]
    return gid, key


def x509_group(admin: ServiceClient) -> tuple[str, pki.Issued]:
    """An X.509 group whose signing certificate is a root; its devices' certificates are issued
    by an intermediate under it (returned), which the devices present with their leaf."""
    root = pki.make_root_ca("Scenario Root " + uid("r"))
    intermediate = pki.make_intermediate_ca("Scenario Intermediate " + uid("i"), root)
    gid = uid("xg")
    admin.put(
        f"/enrollmentGroups/{gid}",
        {
            "enrollmentGroupId": gid,
            "attestation": {
                "type": "x509",
                "x509": {"signingCertificates": {"primary": {"certificate": pem(root.cert)}}},
            },
        },
    )
    return gid, intermediate


async def refused(device: Device, status: int, code: int, words: str) -> ServiceResponseError:
    """Register, expect DPS's error with ``status`` and ``code``; the error names the service's
    message, errorCode and trackingId, and the service logged it under that tracking id."""
    with pytest.raises(ServiceResponseError) as info:
        await device.register(retry=RetryPolicy(max_attempts=1))
    exc = info.value
    assert (exc.status_code, exc.error_code) == (status, code), exc
    assert words.lower() in exc.body["message"].lower(), exc.body
    assert exc.tracking_id and exc.tracking_id in str(exc) and str(code) in str(exc)
    assert exc.body["message"].rstrip(".") in str(exc)
    device.server.wait_for_log(exc.tracking_id, f"-> {status} {code}")
    return exc


# --- symmetric key -----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_symmetric_key_individual(dps: RunningServer, admin: ServiceClient, transport: str) -> None:
    reg = uid("sk")
    key = enroll_symmetric(
        admin,
        reg,
        deviceId=f"{reg}-dev",
        initialTwin={"tags": {"t": transport}, "properties": {"desired": {"r": 5}}},
    )
    device = Device(dps, SymmetricKeySecurity(registration_id=reg, symmetric_key=key), transport)
    result = await device.register(payload={"model": transport})
    assert (result.status, result.device_id, result.assigned_hub) == (
        RegistrationStatus.ASSIGNED,
        f"{reg}-dev",
        dps.info["builtinHub"],
    )
    assert result.substatus is RegistrationSubstatus.INITIAL_ASSIGNMENT
    # Assigned within the request: one register, answered 202 with the terminal result.
    [(request, reply)] = device.exchanges
    assert isinstance(request, SendRegister) and reply.retry_after is None
    assert reply.status == (200 if transport.startswith("amqp") else 202)  # AMQP answers carry no status
    record = admin.get(f"/registrations/{reg}")
    assert record["status"] == "assigned" and record["payload"] == {"model": transport}
    identity = admin.get(f"/admin/linkedHubs/{result.assigned_hub}/devices/{reg}-dev")
    assert identity["authentication"]["type"] == "sas" and identity["twin"] == {
        "tags": {"t": transport},
        "desired": {"r": 5},
    }
    dps.wait_for_log(f"registration {reg} assigned to", f"[{transport}]")
    # Registering again (forceRegistration or not: DPS and provisiond re-run the assignment
    # anyway) keeps the hub and the device, under a new operation.
    again = await device.register(force=True)
    assert (again.assigned_hub, again.device_id) == (result.assigned_hub, result.device_id)
    assert again.operation_id != result.operation_id


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_symmetric_key_group(dps: RunningServer, admin: ServiceClient, transport: str) -> None:
    gid, group_key = symmetric_group(admin)
    reg = uid("skg")
    result = await Device(
        dps, SymmetricKeySecurity.from_group_key(registration_id=reg, group_key=group_key), transport
    ).register()
    state = result.registration_state
    assert result.device_id == reg and state is not None and state.symmetric_key is not None
    assert state.symmetric_key.enrollment_group_id == gid
    assert [r["registrationId"] for r in admin.post(f"/registrations/{gid}/query")] == [reg]
    # The group key itself is not a device's key.
    other = uid("skg")
    await refused(
        Device(dps, SymmetricKeySecurity(registration_id=other, symmetric_key=group_key), transport),
        401,
        401002,
        "no symmetric-key enrollment group",
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_wrong_key_and_an_unknown_id_are_refused(
    dps: RunningServer, admin: ServiceClient, transport: str
) -> None:
    reg = uid("skw")
    enroll_symmetric(admin, reg)
    wrong = SymmetricKeySecurity.from_group_key(registration_id=reg, group_key="AAAAAAAA")
    await refused(
        Device(dps, wrong, transport), 401, 401002, "not signed with a key of the individual enrollment"
    )
    stranger = SymmetricKeySecurity(registration_id=uid("nobody"), symmetric_key="AAAAAAAA")
    await refused(Device(dps, stranger, transport), 401, 401002, "no individual enrollment is named")
    with pytest.raises(LookupError):  # a refused attestation writes nothing
        admin.get(f"/registrations/{reg}")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_disabled_enrollment_or_group_ends_the_registration_disabled(
    dps: RunningServer, admin: ServiceClient, transport: str
) -> None:
    reg = uid("skd")
    key = enroll_symmetric(admin, reg, provisioningStatus="disabled")
    gid, group_key = symmetric_group(admin, provisioningStatus="disabled")
    member = uid("skdg")
    devices = [
        (SymmetricKeySecurity(registration_id=reg, symmetric_key=key), f"individual enrollment {reg!r}"),
        (SymmetricKeySecurity.from_group_key(registration_id=member, group_key=group_key), f"group {gid!r}"),
    ]
    for security, named in devices:
        with pytest.raises(RegistrationFailedError) as info:
            await Device(dps, security, transport).register()
        assert info.value.status is RegistrationStatus.DISABLED
        state = info.value.result.registration_state
        assert info.value.error_code == 401101 and state.error_code == 401101
        assert named in state.error_message and state.assigned_hub is None
    assert admin.get(f"/registrations/{reg}")["status"] == "disabled"


# --- X.509 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_x509_individual(dps: RunningServer, admin: ServiceClient, transport: str) -> None:
    reg = uid("x")
    leaf = pki.make_device_cert(reg)
    admin.put(
        f"/enrollments/{reg}",
        {
            "registrationId": reg,
            "attestation": {
                "type": "x509",
                "x509": {"clientCertificates": {"primary": {"certificate": pem(leaf.cert)}}},
            },
        },
    )
    result = await Device(dps, X509Security.from_issued(leaf), transport).register()
    state = result.registration_state
    assert result.device_id == reg and state is not None and state.x509 is not None
    info = state.x509.certificate_info
    assert info is not None and info.subject_name == f"CN={reg}" and state.x509.enrollment_group_id is None
    identity = admin.get(f"/admin/linkedHubs/{result.assigned_hub}/devices/{reg}")
    assert identity["authentication"]["type"] == "selfSigned"
    assert identity["authentication"]["x509Thumbprint"]["primaryThumbprint"] == info.sha256_thumbprint
    # Another self-signed certificate with the same CN is not this enrollment's.
    impostor = X509Security.from_issued(pki.make_device_cert(reg))
    await refused(
        Device(dps, impostor, transport), 401, 401011, "not the certificate of the individual enrollment"
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_x509_group_with_an_intermediate(
    dps: RunningServer, admin: ServiceClient, transport: str
) -> None:
    gid, intermediate = x509_group(admin)
    reg = uid("xm")
    result = await Device(
        dps, X509Security.from_issued(pki.make_device_cert(reg, intermediate)), transport
    ).register()
    state = result.registration_state
    assert result.device_id == reg and state is not None and state.x509 is not None
    assert state.x509.enrollment_group_id == gid
    signer = state.x509.signing_certificate_info
    assert signer is not None and signer.subject_name.startswith("CN=Scenario Root")
    leaf = state.x509.certificate_info
    assert leaf is not None
    identity = admin.get(f"/admin/linkedHubs/{result.assigned_hub}/devices/{reg}")
    assert identity["authentication"] == {  # as DPS creates group devices
        "type": "selfSigned",
        "x509Thumbprint": {
            "primaryThumbprint": leaf.sha256_thumbprint,
            "secondaryThumbprint": leaf.sha256_thumbprint,
        },
    }
    # Without the intermediate the service cannot tie the leaf to the group.
    bare = pki.make_device_cert(uid("xm"), intermediate)
    await refused(
        Device(dps, X509Security.from_issued(pki.Issued(bare.cert, bare.key)), transport),
        401,
        401011,
        "no X.509 enrollment group",
    )


# --- polls, status lookup, rate limits --------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_slow_assignment_is_polled_until_assigned(
    dps: RunningServer, admin: ServiceClient, hook: Hook, transport: str
) -> None:
    """A custom allocation webhook slower than the assignment budget: the register answers
    'assigning' with retry-after 1, the device polls ('assigning' while the webhook works), and
    the last poll brings the result with the webhook's payload."""
    hub = dps.info["builtinHub"]
    url = hook.route(answer_json({"iotHubHostName": hub, "payload": {"slow": transport}}, delay=BUDGET + 1.2))
    reg = uid("slow")
    key = enroll_symmetric(
        admin,
        reg,
        allocationPolicy="custom",
        customAllocationDefinition={"webhookUrl": url, "apiVersion": "2021-10-01"},
    )
    device = Device(dps, SymmetricKeySecurity(registration_id=reg, symmetric_key=key), transport)
    result = await device.register(payload={"from": transport})
    assert result.status is RegistrationStatus.ASSIGNED and result.payload == {"slow": transport}
    answers = [(request, reply, decode_operation_status(reply.body)) for request, reply in device.exchanges]
    (first, first_reply, first_status), *polls = answers
    assert isinstance(first, SendRegister) and first_status.status is RegistrationStatus.ASSIGNING
    assert first_reply.retry_after == 1
    assert polls and all(isinstance(request, SendPoll) for request, _, _ in polls)
    assert all(request.operation_id == first_status.operation_id for request, _, _ in polls)  # type: ignore[union-attr]
    assert [status.status for _, _, status in polls][-1] is RegistrationStatus.ASSIGNED
    assert all(
        reply.retry_after == 1 for _, reply, status in polls if status.status is RegistrationStatus.ASSIGNING
    )
    assert [r.body["deviceRuntimeContext"]["payload"] for r in hook.requests(url)] == [{"from": transport}]
    dps.wait_for_log(f"registration {reg} is taking longer than {BUDGET:g} s", f"[{transport}]")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_status_lookup_shows_the_record_of_a_registration(
    dps: RunningServer, admin: ServiceClient, transport: str
) -> None:
    """DPS's status lookup (POST /{idScope}/registrations/{id}) exists over HTTPS only; it shows
    the record that a registration over any transport left."""
    reg = uid("look")
    key = enroll_symmetric(admin, reg)
    resource = f"{dps.id_scope}/registrations/{reg}"
    token = build_sas_token(resource, key, int(time.time()) + 600, key_name="registration")
    with dps.http(headers={"Authorization": token}) as http:
        before = http.post(f"/{resource}", params={"api-version": "2021-06-01"}, json={"registrationId": reg})
        assert before.status_code == 404 and before.json()["errorCode"] == 404202
        result = await Device(
            dps, SymmetricKeySecurity(registration_id=reg, symmetric_key=key), transport
        ).register()
        lookup = http.post(f"/{resource}", params={"api-version": "2021-06-01"}, json={"registrationId": reg})
    assert lookup.status_code == 200, lookup.text
    record = lookup.json()
    assert (record["status"], record["assignedHub"], record["deviceId"]) == (
        "assigned",
        result.assigned_hub,
        reg,
    )


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server that takes one request a minute per device (after attestation)."""
    running = start_server(tmp_path_factory.mktemp("limited"), "--device-rate-limit", "1")
    yield running
    running.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_over_the_device_rate_limit_the_answer_is_429_with_retry_after(
    limited: RunningServer, transport: str
) -> None:
    with limited.client() as admin:
        reg = uid("rate")
        key = enroll_symmetric(admin, reg)
    device = Device(limited, SymmetricKeySecurity(registration_id=reg, symmetric_key=key), transport)
    assert (await device.register()).status is RegistrationStatus.ASSIGNED
    exc = await refused(device, 429, 429001, "per-device limit")
    request, reply = device.exchanges[-1]
    assert isinstance(request, SendRegister) and reply.status == 429
    assert reply.retry_after is not None and 1 <= reply.retry_after <= 60
    assert json.loads(reply.body)["trackingId"] == exc.tracking_id


# --- TPM ---------------------------------------------------------------------------------------


def hub_primary_key(server: RunningServer, hub: str, device_id: str) -> bytes:
    from tests.device.test_tpm import hub_primary_key as read

    return read(server, hub, device_id)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tpm(
    dps: RunningServer, admin: ServiceClient, transport: str, swtpm_factory: Callable[[], Swtpm]
) -> None:
    """HTTPS answers the EK/SRK with the challenge; AMQP runs it in SASL; DPS has no TPM over
    MQTT. Either way the result wraps the hub identity's key for the TPM, which then signs what
    the hub verifies."""
    if transport.startswith("mqtt"):
        pytest.skip("DPS has no TPM attestation over MQTT (the service refuses a body with tpm)")
    from provisiond.device.tpm import TpmSecurity

    reg = uid("tpm")
    with TpmSecurity(tcti=swtpm_factory().tcti, registration_id=reg) as security:
        admin.put(
            f"/enrollments/{reg}",
            {
                "registrationId": reg,
                "attestation": {"type": "tpm", "tpm": {"endorsementKey": security.endorsement_key_b64}},
            },
        )
        device = Device(dps, security, transport)
        result = await device.register()
        state = result.registration_state
        assert (
            result.device_id == reg
            and state is not None
            and state.tpm is not None
            and state.tpm.authentication_key
        )
        key = hub_primary_key(dps, result.assigned_hub or "", reg)
        data = f"{result.assigned_hub}/devices/{reg}\n1900000000".encode()
        assert security.sign(data) == hmac.new(key, data, hashlib.sha256).digest()
        again = await device.register()  # a fresh challenge
        assert again.operation_id != result.operation_id
    challenges = [reply.status for request, reply in device.exchanges if reply.status == 401]
    assert challenges == ([401, 401] if transport == "https" else [])  # AMQP's challenge is in SASL
    dps.wait_for_log(f"registration {reg} assigned to", f"[{transport}]")
