"""The device client over MQTT and MQTT over WebSockets: against the session's real ``provisiond
serve`` (what is MQTT's own: refusing CONNACKs as typed errors, connect errors, the CLI), and
against a scripted MQTT server on loopback TLS for what provisiond never answers by itself
(assigning and polls, 429 with retry-after, refusing CONNACKs, stale answers, keep-alive pings).
Every attestation and outcome on every transport: tests/service/test_registration_scenarios.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from provisiond import pki
from provisiond.cli import cli
from provisiond.device import (
    AsyncProvisioningDeviceClient,
    MqttTransport,
    RegistrationResult,
    RetryPolicy,
    SecurityProvider,
    SymmetricKeySecurity,
)
from provisiond.errors import (
    ConnectError,
    RemoteProtocolError,
    ServiceResponseError,
    TimeoutError,
)
from provisiond.models import RegistrationStatus
from provisiond.protocol.mqtt import (
    Connect,
    ConnectReturnCode,
    MqttConnection,
    Publish,
    Role,
    State,
    SubackReturnCode,
    Subscribe,
)
from provisiond.protocol.topics import RequestKind, parse_request_topic, parse_username, response_topic
from provisiond.service_client import ServiceClient
from tests._server import RunningServer

TRANSPORTS = [pytest.param("mqtt", id="mqtt"), pytest.param("mqtt-ws", id="mqtt-ws")]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def endpoint(server: RunningServer, transport: str) -> str:
    return f"localhost:{server.info['mqttPort'] if transport == 'mqtt' else server.port}"


@pytest.fixture(scope="module")
def admin(server: RunningServer) -> Iterator[ServiceClient]:
    with server.client() as client:
        yield client


def enroll_symmetric(admin: ServiceClient, reg: str, **extra: Any) -> str:
    admin.put(
        f"/enrollments/{reg}", {"registrationId": reg, "attestation": {"type": "symmetricKey"}, **extra}
    )
    key: str = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    return key


async def register_async(
    server: RunningServer, security: SecurityProvider, transport: str, **kwargs: Any
) -> RegistrationResult:
    async with AsyncProvisioningDeviceClient.create(
        endpoint(server, transport), server.id_scope, security, transport, ca_file=server.ca_file
    ) as client:
        return await client.register(**kwargs)


# --- against provisiond ----------------------------------------------------------------------------


class _Token(SecurityProvider):
    """A provider that sends whatever token it is given (or none)."""

    def __init__(self, registration_id: str, token: str | None) -> None:
        self._id, self._token = registration_id, token

    @property
    def registration_id(self) -> str:
        return self._id

    def sas_token(self, resource: str, expiry: int) -> str | None:
        return self._token


@pytest.mark.parametrize(
    ("token", "code", "words"),
    [
        pytest.param("hunter2", 4, "bad user name or password", id="garbage-token"),
        pytest.param(None, 5, "not authorized", id="no-credential"),
    ],
)
async def test_refusing_connacks_are_typed_errors(
    server: RunningServer, admin: ServiceClient, token: str | None, code: int, words: str
) -> None:
    reg = uid("mr")
    enroll_symmetric(admin, reg)
    with pytest.raises(ServiceResponseError) as info:
        await register_async(server, _Token(reg, token), "mqtt")
    assert info.value.status_code == 401
    assert f"CONNACK return code {code}" in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_untrusted_certificate_and_closed_port_are_connect_errors(
    server: RunningServer, transport: str, tmp_path: Path
) -> None:
    other_ca = pki.make_root_ca("Not The Service CA")
    (tmp_path / "ca.pem").write_bytes(pki.certificate_pem(other_ca.cert))
    security = SymmetricKeySecurity(registration_id=uid("mc"), symmetric_key="AAAA")
    client = AsyncProvisioningDeviceClient.create(
        endpoint(server, transport), server.id_scope, security, transport, ca_file=tmp_path / "ca.pem"
    )
    with pytest.raises(ConnectError, match="certificate verify failed"):
        await client.register()
    await client.close()
    closed = AsyncProvisioningDeviceClient.create("localhost:1", server.id_scope, security, transport)
    with pytest.raises(ConnectError, match="Cannot connect to"):
        await closed.register()
    await closed.close()


def device_register(server: RunningServer, *args: Any) -> Result:
    return CliRunner().invoke(
        cli,
        ["device", "register", "--data-dir", str(server.data_dir), *map(str, args)],
        env={
            "PROVISIOND_DATA_DIR": None,
            "PROVISIOND_KEY_PASSWORD": None,
            "PROVISIOND_PKCS12_PASSWORD": None,
        },
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cli_device_register(server: RunningServer, admin: ServiceClient, transport: str) -> None:
    reg = uid("mcli")
    key = enroll_symmetric(admin, reg)
    result = device_register(
        server, "--transport", transport, "--registration-id", reg, "--symmetric-key", key, "--json"
    )
    assert result.exit_code == 0, (result.output, result.exception)
    doc = json.loads(result.output)
    assert doc["status"] == "assigned" and doc["deviceId"] == reg


# --- against a scripted MQTT server ----------------------------------------------------------------

Answer = tuple[int, dict[str, Any], int | None]  # status, body, retry-after
DEVICE = SymmetricKeySecurity(registration_id="dev-1", symmetric_key="AAAA")


@dataclass
class ScriptedDps:
    """An MQTT 3.1.1 server on loopback TLS that answers requests from a script."""

    script: Callable[[RequestKind, int], Answer | None]  # None: do not answer
    connack: ConnectReturnCode = ConnectReturnCode.ACCEPTED
    delay: float = 0.0  # seconds before each answer (the connection keeps being read meanwhile)
    requests: list[tuple[RequestKind, str, float]] = field(default_factory=list)
    connects: list[Connect] = field(default_factory=list)
    pings: int = 0
    port: int = 0
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        machine = MqttConnection(Role.SERVER, clock=time.monotonic)
        try:
            while machine.state is not State.CLOSED and (data := await reader.read(65536)):
                pending = machine.feed_bytes(data)
                while pending:
                    packet = pending.pop(0)
                    if isinstance(packet, Connect):
                        self.connects.append(packet)
                        if self.connack is ConnectReturnCode.ACCEPTED:
                            machine.accept()
                            pending += machine.feed_bytes(b"")
                        else:
                            machine.refuse(self.connack, "scripted")
                    elif isinstance(packet, Subscribe):
                        machine.grant(packet, [SubackReturnCode.GRANTED_QOS_1])
                    elif isinstance(packet, Publish):
                        machine.acknowledge(packet)
                        request = parse_request_topic(packet.topic)
                        self.requests.append((request.kind, request.rid, time.monotonic()))
                        answer = self.script(request.kind, len(self.requests))
                        if answer is not None:
                            status, body, retry_after = answer
                            topic = response_topic(status, request.rid, retry_after)
                            asyncio.get_running_loop().call_later(
                                self.delay, self._answer, machine, writer, topic, json.dumps(body).encode()
                            )
                    elif packet.packet_type.name == "PINGREQ":
                        self.pings += 1
                writer.write(machine.get_outbound_data())
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2)  # TLS close_notify needs the loop

    @staticmethod
    def _answer(machine: MqttConnection, writer: asyncio.StreamWriter, topic: str, body: bytes) -> None:
        if machine.state is State.CONNECTED and not writer.is_closing():
            machine.publish(topic, body)
            writer.write(machine.get_outbound_data())


@pytest.fixture
async def scripted(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    files = pki.ensure_dev_pki(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(files.cert_file, files.key_file)
    servers: list[asyncio.Server] = []
    started: list[ScriptedDps] = []

    async def start(dps: ScriptedDps) -> MqttTransport:
        started.append(dps)
        server = await asyncio.start_server(dps.handle, "127.0.0.1", 0, ssl=ctx)
        servers.append(server)
        dps.port = server.sockets[0].getsockname()[1]
        return MqttTransport(
            host=f"localhost:{dps.port}",
            id_scope="0ne00000001",
            security=DEVICE,
            ca_file=files.ca_file,
            timeout=2,
        )

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()
    handlers = [task for dps in started for task in dps.handlers]
    if handlers:  # let every connection finish closing (TLS close_notify) before the loop ends
        await asyncio.wait(handlers, timeout=5)


def assigned(operation: str = "op-1") -> dict[str, Any]:
    return {
        "operationId": operation,
        "status": "assigned",
        "registrationState": {
            "registrationId": "dev-1",
            "assignedHub": "hub",
            "deviceId": "dev-1",
            "status": "assigned",
        },
    }


FAST = RetryPolicy(initial_backoff=0.1, max_backoff=0.2, total_timeout=20)


async def test_throttled_then_assigning_then_polled_on_one_connection(scripted: Callable[..., Any]) -> None:
    def script(kind: RequestKind, n: int) -> Answer:
        if n == 1:
            return 429, {"errorCode": 429001, "message": "slow down"}, 1
        if n == 2:
            return 202, {"operationId": "op-1", "status": "assigning"}, 1
        return 200, assigned(), None

    dps = ScriptedDps(script)
    transport = await scripted(dps)
    client = AsyncProvisioningDeviceClient(security=DEVICE, transport=transport, retry=FAST)
    start = time.monotonic()
    result = await client.register()
    await client.close()
    assert result.status is RegistrationStatus.ASSIGNED and result.assigned_hub == "hub"
    kinds = [kind for kind, _, _ in dps.requests]
    assert kinds == [RequestKind.REGISTER, RequestKind.REGISTER, RequestKind.STATUS]
    times = [t - start for _, _, t in dps.requests]
    assert times[1] - times[0] >= 0.95  # the retry waited at least the retry-after
    assert times[2] - times[1] >= 0.95  # the poll waited the assigning answer's retry-after
    assert len({rid for _, rid, _ in dps.requests}) == 3 and len(dps.connects) == 1
    connect = dps.connects[0]
    assert connect.client_id == "dev-1" and connect.clean_session and connect.keep_alive == 60
    username = parse_username(connect.username or "")
    assert (username.id_scope, username.registration_id, username.api_version) == (
        "0ne00000001",
        "dev-1",
        "2021-06-01",
    )
    assert (connect.password or b"").startswith(
        b"SharedAccessSignature sr=0ne00000001%2Fregistrations%2Fdev-1"
    )


@pytest.mark.parametrize(
    ("code", "status"),
    [
        pytest.param(ConnectReturnCode.SERVER_UNAVAILABLE, 503, id="server-unavailable-is-retried"),
        pytest.param(ConnectReturnCode.IDENTIFIER_REJECTED, 400, id="identifier-rejected"),
    ],
)
async def test_refusing_connack_statuses(
    scripted: Callable[..., Any], code: ConnectReturnCode, status: int
) -> None:
    dps = ScriptedDps(lambda kind, n: (200, assigned(), None), connack=code)
    transport = await scripted(dps)
    client = AsyncProvisioningDeviceClient(
        security=DEVICE,
        transport=transport,
        retry=RetryPolicy(max_attempts=2, initial_backoff=0.1),
    )
    with pytest.raises(ServiceResponseError) as info:
        await client.register()
    await client.close()
    assert info.value.status_code == status and f"CONNACK return code {int(code)}" in str(info.value)
    assert len(dps.connects) == (2 if status == 503 else 1)


async def test_no_answer_times_out_and_a_late_answer_is_dropped(scripted: Callable[..., Any]) -> None:
    dps = ScriptedDps(lambda kind, n: None if n == 1 else (200, assigned(), None))
    transport = await scripted(dps)
    client = AsyncProvisioningDeviceClient(security=DEVICE, transport=transport, retry=FAST)
    with pytest.raises(TimeoutError, match=r"did not answer request \$rid=1 within 2 s"):
        await client.register()
    assert (await client.register()).status is RegistrationStatus.ASSIGNED  # a new connection
    await client.close()
    assert len(dps.connects) == 2


async def test_a_malformed_answer_is_a_remote_protocol_error(scripted: Callable[..., Any]) -> None:
    dps = ScriptedDps(lambda kind, n: (202, {"status": "assigned"}, None))  # no operationId
    transport = await scripted(dps)
    client = AsyncProvisioningDeviceClient(security=DEVICE, transport=transport, retry=FAST)
    with pytest.raises(RemoteProtocolError, match="not a registration operation status"):
        await client.register()
    await client.close()


async def test_the_client_pings_while_it_waits(scripted: Callable[..., Any]) -> None:
    dps = ScriptedDps(lambda kind, n: (200, assigned(), None), delay=2.6)
    transport = await scripted(dps)
    transport.keep_alive, transport.timeout = 1, 5
    client = AsyncProvisioningDeviceClient(security=DEVICE, transport=transport, retry=FAST)
    assert (await client.register()).status is RegistrationStatus.ASSIGNED
    await client.close()
    assert dps.pings >= 2 and len(dps.connects) == 1


async def test_an_idle_connection_is_replaced(scripted: Callable[..., Any]) -> None:
    def script(kind: RequestKind, n: int) -> Answer:
        if n == 1:
            return 202, {"operationId": "op-1", "status": "assigning"}, 2
        return 200, assigned(), None

    dps = ScriptedDps(script)
    transport = await scripted(dps)
    transport.keep_alive = 1
    client = AsyncProvisioningDeviceClient(security=DEVICE, transport=transport, retry=FAST)
    result = await client.register()
    await client.close()
    assert result.status is RegistrationStatus.ASSIGNED
    # The flow slept 2 s between the register and the poll: the connection had idled past its
    # 1 s keep-alive, so the poll went on a new connection, not on one the server may have dropped.
    assert len(dps.connects) == 2 and [c.keep_alive for c in dps.connects] == [1, 1]
