"""The AMQP endpoint against a real ``provisiond serve`` over TLS (and WebSockets):
python-qpid-proton as an independent AMQP 1.0 client (PLAIN, EXTERNAL, ANONYMOUS, a full
registration exchange, status requests, refusals), the project's own client for what is AMQP's
own (a refused SASL TPM exchange, the CLI, AMQP over WebSockets only), raw bytes for bad input,
and a bounded fuzz of the endpoint with mutated valid sessions. Every attestation and outcome on
every transport: test_registration_scenarios.py."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from proton import Message as ProtonMessage
from proton import SSLDomain
from proton.reactor import LinkOption
from proton.utils import BlockingConnection, LinkDetached, SendException

from provisiond import pki
from provisiond.cli import cli
from provisiond.device import ProvisioningDeviceClient, SecurityProvider, SymmetricKeySecurity
from provisiond.errors import ServiceResponseError
from provisiond.models import RegistrationStatus
from provisiond.protocol.amqp import dps
from provisiond.protocol.amqp.connection import Connection, ConnectionConfig, Side
from provisiond.protocol.amqp.events import (
    ConnectionOpened,
    Event,
    LinkAttached,
    LinkId,
    MessageReceived,
    SaslMechanismsReceived,
    SaslOutcomeReceived,
)
from provisiond.protocol.amqp.performatives import (
    Accepted,
    Data,
    Message,
    Properties,
    Role,
    SaslCode,
    Source,
    Target,
)
from provisiond.protocol.messages import RegistrationOperationStatus
from provisiond.protocol.sas import build_sas_token
from provisiond.service.amqp import AmqpEndpoint
from provisiond.service.context import ServiceContext
from provisiond.service.gateway import AMQP, DeviceGateway
from provisiond.service.guard import NO_GUARD
from provisiond.service.settings import Settings
from provisiond.service_client import ServiceClient
from tests._server import RunningServer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:proton.*")


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def admin(server: RunningServer) -> Iterator[ServiceClient]:
    with server.client() as client:
        yield client


def enroll_symmetric(admin: ServiceClient, reg: str) -> str:
    admin.put(f"/enrollments/{reg}", {"registrationId": reg, "attestation": {"type": "symmetricKey"}})
    key: str = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    return key


def enroll_x509(admin: ServiceClient, reg: str) -> pki.Issued:
    leaf = pki.make_device_cert(reg)
    pem = pki.certificate_pem(leaf.cert).decode()
    admin.put(
        f"/enrollments/{reg}",
        {
            "registrationId": reg,
            "attestation": {
                "type": "x509",
                "x509": {"clientCertificates": {"primary": {"certificate": pem}}},
            },
        },
    )
    return leaf


def token_for(server: RunningServer, reg: str, key: str) -> str:
    return build_sas_token(
        f"{server.id_scope}/registrations/{reg}", key, int(time.time()) + 600, key_name="registration"
    )


def amqp_url(server: RunningServer) -> str:
    return f"amqps://localhost:{server.info['amqpPort']}"


def proton_tls(server: RunningServer, client_cert: tuple[Path, Path] | None = None) -> SSLDomain:
    domain = SSLDomain(SSLDomain.MODE_CLIENT)
    domain.set_trusted_ca_db(server.ca_file)
    domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
    if client_cert is not None:
        domain.set_credentials(str(client_cert[0]), str(client_cert[1]), None)
    return domain


def proton_plain(server: RunningServer, reg: str, key: str) -> BlockingConnection:
    """python-qpid-proton connected over TLS, authenticated with SASL PLAIN as ``reg``."""
    return BlockingConnection(
        amqp_url(server),
        ssl_domain=proton_tls(server),
        sasl_enabled=True,
        allowed_mechs="PLAIN",
        user=f"{server.id_scope}/registrations/{reg}",
        password=token_for(server, reg, key),
        timeout=10,
    )


def register_message(reg: str, correlation_id: str, **properties: Any) -> ProtonMessage:
    return ProtonMessage(
        body=json.dumps({"registrationId": reg}).encode(),
        inferred=True,  # a data section, as the C and Node SDKs send
        correlation_id=correlation_id,
        properties={dps.OPERATION_TYPE: dps.OperationType.REGISTER.value, **properties},
    )


def exchange(conn: BlockingConnection, address: str, *messages: ProtonMessage) -> list[ProtonMessage]:
    """Attach a sender and a receiver on ``address``; send each message, read each answer."""
    sender = conn.create_sender(address)
    receiver = conn.create_receiver(address)
    answers = []
    for message in messages:
        sender.send(message)
        answers.append(receiver.receive(timeout=10))
        receiver.accept()
    return answers


def operation(answer: ProtonMessage) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(bytes(answer.body))  # type: ignore[arg-type]  # a memoryview
    return document


# --- python-qpid-proton, an independent AMQP 1.0 client ----------------------------------------


def test_proton_plain_registration_exchange(server: RunningServer, admin: ServiceClient) -> None:
    reg = uid("amqp-plain")
    key = enroll_symmetric(admin, reg)
    address = f"{server.id_scope}/registrations/{reg}"
    conn = proton_plain(server, reg, key)
    try:
        register = register_message(reg, "corr-1", **{dps.FORCE_REGISTRATION: False})
        sender = conn.create_sender(address)
        receiver = conn.create_receiver(address)
        sender.send(register)
        answer = receiver.receive(timeout=10)
        receiver.accept()
        assert answer.correlation_id == "corr-1"
        result = operation(answer)
        assert result["status"] == "assigned" and result["registrationState"]["deviceId"] == reg
        # A status request for that operation on the same links, with a new correlation id.
        status = ProtonMessage(
            body="iotdps-get-operationstatus",  # .NET sends an amqp-value
            correlation_id="corr-2",
            properties={
                dps.OPERATION_TYPE: dps.OperationType.GET_OPERATION_STATUS.value,
                dps.OPERATION_ID: result["operationId"],
            },
        )
        sender.send(status)
        again = receiver.receive(timeout=10)
        receiver.accept()
        assert again.correlation_id == "corr-2" and operation(again)["operationId"] == result["operationId"]
    finally:
        conn.close()
    assert f"registration {reg} assigned" in server.log() and "[amqp]" in server.log()


def test_proton_with_the_c_sdks_amqps_address_prefix(server: RunningServer, admin: ServiceClient) -> None:
    reg = uid("amqp-prefix")
    key = enroll_symmetric(admin, reg)
    resource = f"{server.id_scope}/registrations/{reg}"
    conn = proton_plain(server, reg, key)
    try:
        (answer,) = exchange(conn, f"amqps://localhost/{resource}", register_message(reg, "c"))
        assert operation(answer)["status"] == "assigned"
    finally:
        conn.close()


def test_proton_reads_max_message_size_on_both_links(server: RunningServer, admin: ServiceClient) -> None:
    """Every attach the service sends carries max-message-size, the one answering the device's
    receiving link too (the C SDK logs an error for an attach without it)."""
    reg = uid("amqp-attach")
    key = enroll_symmetric(admin, reg)
    address = f"{server.id_scope}/registrations/{reg}"
    conn = proton_plain(server, reg, key)
    try:
        sender = conn.create_sender(address)  # returns once the service's attach arrived
        receiver = conn.create_receiver(address)
        limit = 96 * 1024 + 8 * 1024  # the body limit and room for the message's other sections
        assert sender.link.remote_max_message_size == limit
        assert receiver.link.remote_max_message_size == limit
    finally:
        conn.close()


def test_an_answer_larger_than_the_devices_receiving_link_accepts_detaches_that_link(
    server: RunningServer, admin: ServiceClient
) -> None:
    """A device whose receiving link takes messages of at most 64 bytes: the register is
    accepted, its answer (larger) is not sent, and the link is detached with
    ``amqp:link:message-size-exceeded`` and a log line, not a traceback; the connection lives
    on (the device could attach again with a larger limit)."""

    class SmallMessages(LinkOption):
        def apply(self, link: Any) -> None:
            link.max_message_size = 64

    reg = uid("amqp-small")
    key = enroll_symmetric(admin, reg)
    address = f"{server.id_scope}/registrations/{reg}"
    conn = proton_plain(server, reg, key)
    try:
        sender = conn.create_sender(address)
        receiver = conn.create_receiver(address, options=SmallMessages())
        with pytest.raises(LinkDetached) as detached:  # while the send waits for its settlement
            sender.send(register_message(reg, "c"))
            receiver.receive(timeout=10)
        assert detached.value.condition == "amqp:link:message-size-exceeded"
        server.wait_for_log("an answer is not sent", "peer's limit of 64 bytes", "message-size-exceeded")
        again = conn.create_receiver(address, name="again")  # on the same connection and sender
        sender.send(register_message(reg, "d"))
        assert operation(again.receive(timeout=10))["status"] == "assigned"
    finally:
        conn.close()
    assert "Traceback" not in server.log()


def test_proton_external_with_a_client_certificate(
    server: RunningServer, admin: ServiceClient, tmp_path: Path
) -> None:
    reg = uid("amqp-ext")
    leaf = enroll_x509(admin, reg)
    cert, key = tmp_path / "dev.pem", tmp_path / "dev.key"
    cert.write_bytes(pki.certificate_pem(leaf.cert))
    key.write_bytes(pki.private_key_pem(leaf.key))
    conn = BlockingConnection(
        amqp_url(server),
        ssl_domain=proton_tls(server, (cert, key)),
        sasl_enabled=True,
        allowed_mechs="EXTERNAL",
        timeout=10,
    )
    try:
        (answer,) = exchange(conn, f"{server.id_scope}/registrations/{reg}", register_message(reg, "x"))
        result = operation(answer)
        assert result["status"] == "assigned" and result["registrationState"]["x509"]["certificateInfo"]
    finally:
        conn.close()


def test_proton_anonymous_without_a_credential_is_rejected(
    server: RunningServer, admin: ServiceClient
) -> None:
    reg = uid("amqp-anon")
    enroll_symmetric(admin, reg)
    address = f"{server.id_scope}/registrations/{reg}"
    conn = BlockingConnection(
        amqp_url(server),
        ssl_domain=proton_tls(server),
        sasl_enabled=True,
        allowed_mechs="ANONYMOUS",
        timeout=10,
    )
    try:
        sender = conn.create_sender(address)
        conn.create_receiver(address)
        with pytest.raises(SendException):
            sender.send(register_message(reg, "a"))
    finally:
        conn.close()
    server.wait_for_log(f"{reg} [amqp]: iotdps-register -> 401")


def test_proton_with_a_token_for_another_device_fails_sasl(
    server: RunningServer, admin: ServiceClient
) -> None:
    reg = uid("amqp-wrong")
    key = enroll_symmetric(admin, reg)
    with pytest.raises(Exception, match="(?i)auth|sasl"):
        BlockingConnection(
            amqp_url(server),
            ssl_domain=proton_tls(server),
            sasl_enabled=True,
            allowed_mechs="PLAIN",
            user=f"{server.id_scope}/registrations/{reg}",
            password=token_for(server, "someone-else", key),
            timeout=10,
        )
    server.wait_for_log("SASL PLAIN refused: The SAS token is for")


def test_proton_link_for_another_device_is_refused(server: RunningServer, admin: ServiceClient) -> None:
    reg = uid("amqp-other")
    key = enroll_symmetric(admin, reg)
    conn = proton_plain(server, reg, key)
    try:
        with pytest.raises(Exception, match="unauthorized|authenticated"):
            conn.create_sender(f"{server.id_scope}/registrations/not-{reg}")
    finally:
        conn.close()


# --- the project's own client ------------------------------------------------------------------


def endpoint_for(server: RunningServer, transport: str) -> str:
    return f"localhost:{server.info['amqpPort']}" if transport == "amqp" else f"localhost:{server.port}"


def register(server: RunningServer, security: SecurityProvider, transport: str, **kwargs: Any) -> Any:
    with ProvisioningDeviceClient.create(
        endpoint_for(server, transport),
        server.id_scope,
        security,
        transport,
        ca_file=server.ca_file,
        timeout=15,
    ) as client:
        return client.register(**kwargs)


def test_cli_device_register_over_amqp(server: RunningServer, admin: ServiceClient) -> None:
    reg = uid("cli-amqp")
    key = enroll_symmetric(admin, reg)
    for transport in ("amqp", "amqp-ws"):
        result = CliRunner().invoke(
            cli,
            ["device", "register", "--data-dir", str(server.data_dir), "--registration-id", reg,
             "--symmetric-key", key, "--transport", transport, "--json"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["status"] == "assigned"


def test_tpm_of_another_enrollment_fails_sasl(
    server: RunningServer, admin: ServiceClient, swtpm_factory: Any
) -> None:
    from provisiond.device.tpm import TpmSecurity

    reg = uid("tpm-other")
    with TpmSecurity(tcti=swtpm_factory().tcti, registration_id=reg) as stranger:
        with TpmSecurity(tcti=swtpm_factory().tcti) as enrolled:
            admin.put(
                f"/enrollments/{reg}",
                {
                    "registrationId": reg,
                    "attestation": {"type": "tpm", "tpm": {"endorsementKey": enrolled.endorsement_key_b64}},
                },
            )
        with pytest.raises(ServiceResponseError) as info:
            register(server, stranger, "amqp")
    assert info.value.status_code == 401 and "SASL TPM" in str(info.value)
    server.wait_for_log("SASL TPM refused")


# --- raw bytes ---------------------------------------------------------------------------------


def raw_tls(server: RunningServer) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=server.ca_file)
    sock = socket.create_connection(("127.0.0.1", server.info["amqpPort"]), timeout=10)
    return context.wrap_socket(sock, server_hostname="localhost")


def read_all(sock: ssl.SSLSocket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize(
    ("wire", "answer_prefix"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"AMQP\x03\x01\x00\x00", id="http"),
        pytest.param(b"AMQP\x02\x01\x00\x00", b"AMQP\x03\x01\x00\x00", id="tls-header"),
        pytest.param(
            b"AMQP\x00\x01\x00\x00" + b"\x00\x00\x00\x09\x02\x00\x00\x00\x40",
            b"AMQP\x00\x01\x00\x00",
            id="bad-frame",
        ),
    ],
)
def test_bad_input_is_answered_and_closed(server: RunningServer, wire: bytes, answer_prefix: bytes) -> None:
    with raw_tls(server) as sock:
        sock.sendall(wire)
        answer = read_all(sock)
    assert answer.startswith(answer_prefix)
    time.sleep(0.2)
    server.wait_for_log("closed:")
    assert "AMQP 127.0.0.1" in server.log()


def test_a_bad_frame_after_open_is_closed_with_decode_error(server: RunningServer) -> None:
    from provisiond.protocol.amqp.frames import Frame, FrameType, encode_frame
    from provisiond.protocol.amqp.performatives import Open

    wire = bytearray(b"AMQP\x00\x01\x00\x00")
    encode_frame(Frame(FrameType.AMQP, 0, Open(container_id="raw")), wire)
    with raw_tls(server) as sock:
        sock.sendall(bytes(wire))
        time.sleep(0.2)
        sock.sendall(b"\x00\x00\x00\x0c\x02\x00\x00\x00\x00\x53\x10\x45")  # open with no container id
        answer = read_all(sock)
    assert b"amqp:decode-error" in answer and b"Open.container_id is mandatory" in answer
    time.sleep(0.2)
    server.wait_for_log("Open.container_id is mandatory. (amqp:decode-error)")


def test_a_session_rule_broken_ends_the_session_with_a_log_line(server: RunningServer) -> None:
    """A transfer on a handle that was never attached ends the session with
    amqp:session:unattached-handle, as the specification says, and the log says why (it said
    nothing: the machine decided it at debug level)."""
    from provisiond.protocol.amqp.frames import Frame, FrameType, encode_frame
    from provisiond.protocol.amqp.performatives import Begin, Open, Transfer

    wire = bytearray(b"AMQP\x00\x01\x00\x00")
    encode_frame(Frame(FrameType.AMQP, 0, Open(container_id="raw")), wire)
    encode_frame(
        Frame(FrameType.AMQP, 0, Begin(next_outgoing_id=0, incoming_window=10, outgoing_window=10)), wire
    )
    encode_frame(Frame(FrameType.AMQP, 0, Transfer(handle=7, delivery_id=0, delivery_tag=b"t")), wire)
    with raw_tls(server) as sock:
        sock.sendall(bytes(wire))
        time.sleep(0.3)
        answer = sock.recv(65536)
    assert b"amqp:session:unattached-handle" in answer
    server.wait_for_log("ended session 0:")
    assert "(amqp:session:unattached-handle)" in server.log()


# --- the endpoint in process: pipelining and a fuzz of mutated sessions -------------------------


class _FakeStream:
    """A ByteStream that plays ``chunks`` and records what the endpoint sends."""

    def __init__(self, chunks: list[bytes], client_chain: list[bytes] | None = None) -> None:
        self._chunks = list(chunks)
        self.sent = bytearray()
        self.client_chain = client_chain or []
        self.peer = "fuzz"
        self.guard = NO_GUARD
        self.address: str | None = None

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await asyncio.sleep(0)
        return self._chunks.pop(0) if self._chunks else b""

    async def send(self, data: bytes) -> None:
        self.sent += data

    async def close(self) -> None:
        return None


class _StubTpm:
    async def challenge(self, registration_id: str, ek: bytes, srk: bytes | None) -> Any:
        class Blob:
            def marshal(self) -> bytes:
                return bytes(900)

        return Blob()

    async def authenticate(self, *args: Any, **kwargs: Any) -> None:
        return None


class _StubRegistrar:
    """Answers every request at once, as the registrar would for an assigned device."""

    tpm = _StubTpm()

    async def register(self, request: Any) -> RegistrationOperationStatus:
        return RegistrationOperationStatus(operation_id="op", status=RegistrationStatus.ASSIGNED)

    async def operation_status(self, request: Any, operation_id: str) -> RegistrationOperationStatus:
        return RegistrationOperationStatus(operation_id=operation_id, status=RegistrationStatus.ASSIGNING)


SCOPE = "0ne00AMQP00"
REG = "fuzz-device"


def _endpoint(tmp_path: Path, **settings: Any) -> AmqpEndpoint:
    ctx = ServiceContext(settings=Settings(data_dir=tmp_path, **settings), store=None, clock=time.time)  # type: ignore[arg-type]
    return AmqpEndpoint(DeviceGateway(ctx, _StubRegistrar()), AMQP)  # type: ignore[arg-type]


def _client_wire(mechanism: str | None, expiry: int | None = None) -> bytes:
    """What a device sends in a whole registration, recorded against a stand-in server (its
    PLAIN token expires in ten minutes unless ``expiry`` is given)."""
    clock = time.monotonic
    client = Connection(
        Side.CLIENT, ConnectionConfig(container_id="d", use_sasl=mechanism is not None), clock=clock
    )
    server = Connection(
        Side.SERVER,
        ConnectionConfig(container_id="s", sasl_mechanisms=tuple(m.value for m in dps.Mechanism)),
        clock=clock,
    )
    address = f"{SCOPE}/registrations/{REG}"
    links: dict[str, LinkId] = {}
    wire = bytearray()
    if mechanism is None:
        client.open()

    def on_client(event: Event) -> None:
        if isinstance(event, SaslMechanismsReceived):
            token = build_sas_token(address, "AAAA", expiry or int(time.time()) + 600)
            client.sasl_init(
                mechanism or "", dps.plain_response(address, token) if mechanism == "PLAIN" else None
            )
        elif isinstance(event, SaslOutcomeReceived):
            client.open()
        elif isinstance(event, ConnectionOpened):
            channel = client.begin()
            links["send"] = client.attach(channel, name="s", role=Role.SENDER, target=Target(address=address))
            links["recv"] = client.attach(
                channel, name="r", role=Role.RECEIVER, source=Source(address=address)
            )
            client.grant_credit(links["recv"], 5)
            for n, kind in enumerate((dps.OperationType.REGISTER, dps.OperationType.GET_OPERATION_STATUS)):
                client.send_message(
                    links["send"],
                    Message(
                        properties=Properties(correlation_id=f"c{n}"),
                        application_properties={dps.OPERATION_TYPE: kind.value, dps.OPERATION_ID: "op"},
                        body=(Data(json.dumps({"registrationId": REG}).encode()),),
                    ),
                )
        elif isinstance(event, MessageReceived):
            client.settle(event.link, event.delivery_id, Accepted())

    def on_server(event: Event) -> None:
        from provisiond.protocol.amqp.events import SaslInitReceived

        if isinstance(event, SaslInitReceived):
            server.sasl_outcome(SaslCode.OK)
        elif isinstance(event, ConnectionOpened):
            server.open()
        elif isinstance(event, LinkAttached) and event.answer_needed:
            server.accept_link(event.link)
            if event.role is Role.RECEIVER:
                server.grant_credit(event.link, 5)

    for _ in range(30):
        out = client.get_outbound_data()
        wire += out
        for source, sink, handler in (
            (out, server, on_server),
            (server.get_outbound_data(), client, on_client),
        ):
            events = sink.feed_bytes(source) if source else []
            while events:
                for event in events:
                    handler(event)
                events = sink.poll_events()
    client.close()
    wire += client.get_outbound_data()
    return bytes(wire)


@pytest.mark.parametrize("mechanism", [pytest.param("PLAIN", id="plain"), pytest.param(None, id="no-sasl")])
async def test_a_pipelined_session_is_answered_in_full(tmp_path: Path, mechanism: str | None) -> None:
    """The whole client side in one write (as if pipelined): both requests are answered."""
    stream = _FakeStream([_client_wire(mechanism)])
    await _endpoint(tmp_path)(stream)
    assert stream.sent.count(b'"operationId":"op"') == 2


#: Mutated device sessions replayed against the endpoint (reported in the issue).
ENDPOINT_FUZZ_SESSIONS = 5_000
#: The fuzz's PLAIN token expires then (2100-01-01): fixed, so that its seeds never change.
_FUZZ_EXPIRY = 4_102_444_800


async def test_fuzz_the_endpoint_with_mutated_sessions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The endpoint loop must end every mutated session by itself and never raise. The seed
    sessions are the same bytes in every run (the PLAIN token's expiry is fixed, far ahead), so
    every run tries the same mutations."""
    endpoint = _endpoint(tmp_path)
    seeds = [_client_wire("PLAIN", _FUZZ_EXPIRY), _client_wire(None), _client_wire("ANONYMOUS")]
    rng = random.Random(66)
    tried = answered = 0
    for _ in range(ENDPOINT_FUZZ_SESSIONS):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 5)):
            where = rng.randrange(len(data))
            op = rng.randrange(4)
            if op == 0:
                data[where] ^= 1 << rng.randrange(8)
            elif op == 1:
                data[where] = rng.choice((0x00, 0xFF, 0x40, 0x45, 0x53, 0xA1, 0xE0, 0xC0, 0x70))
            elif op == 2:
                del data[where : where + rng.randint(1, 8)]
            else:
                data[where:where] = rng.randbytes(rng.randint(1, 8))
        cuts = sorted(rng.sample(range(1, len(data)), k=min(4, len(data) - 1)))
        chunks = [bytes(data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        stream = _FakeStream(chunks)
        await asyncio.wait_for(endpoint(stream), 5)
        answered += b'"operationId"' in stream.sent
        tried += 1
    assert tried == ENDPOINT_FUZZ_SESSIONS
    assert answered > ENDPOINT_FUZZ_SESSIONS // 10  # the mutations reach the registration path
    with capsys.disabled():
        print(f"\n[amqp fuzz] endpoint: {tried} mutated sessions, {answered} answered a request")  # noqa: T201 (the report line)


def test_amqp_port_0_turns_tls_off_and_keeps_websockets(tmp_path: Path) -> None:
    from tests._server import start_server

    quiet = start_server(tmp_path / "no-amqp", "--amqp-port", "0")
    try:
        with quiet.client() as admin:
            reg = uid("ws-only")
            key = enroll_symmetric(admin, reg)
        result = register(quiet, SymmetricKeySecurity(registration_id=reg, symmetric_key=key), "amqp-ws")
        assert result.status is RegistrationStatus.ASSIGNED
    finally:
        quiet.stop()
    assert "AMQP over TLS is off (--amqp-port 0)" in quiet.log()


class _SilentStream(_FakeStream):
    """Plays its chunks, then keeps the connection open without sending anything."""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._chunks:
            return self._chunks.pop(0)
        await asyncio.Event().wait()
        return b""


async def test_a_connection_that_never_opens_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import provisiond.service.amqp as endpoint_module

    monkeypatch.setattr(endpoint_module, "HANDSHAKE_TIMEOUT", 0.2)
    stream = _SilentStream([b"AMQP\x03\x01\x00\x00"])
    with caplog.at_level("INFO", logger="provisiond.amqp"):
        await asyncio.wait_for(_endpoint(tmp_path)(stream), 5)
    assert stream.sent.startswith(b"AMQP\x03\x01\x00\x00")  # the mechanisms went out, then silence
    assert "the connection was not open within 0.2 s" in caplog.text


async def test_an_idle_connection_is_closed_with_resource_limit_exceeded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wire = _client_wire(None)
    opened = wire[: wire.index(b"\x00\x53\x11") - 8]  # header and open, up to the begin frame
    stream = _SilentStream([opened])
    with caplog.at_level("INFO", logger="provisiond.amqp"):
        await asyncio.wait_for(_endpoint(tmp_path, session_idle_timeout=0.3)(stream), 5)
    assert b"amqp:resource-limit-exceeded" in stream.sent
    assert "idle timeout" in caplog.text


def _opened_without_sasl(idle_timeout: float | None) -> bytes:
    """A device's AMQP header and open (no SASL), asking for heartbeats at half ``idle_timeout``."""
    client = Connection(
        Side.CLIENT,
        ConnectionConfig(container_id="d", use_sasl=False, idle_timeout=idle_timeout),
        clock=time.monotonic,
    )
    client.open()
    return client.get_outbound_data()


_EMPTY_FRAME = b"\x00\x00\x00\x08\x02\x00\x00\x00"


async def test_a_silent_device_gets_the_heartbeats_it_asked_for_then_the_idle_close(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The device's idle-time-out of 1 s asks for a frame every 0.5 s; our idle timeout of 1.6 s
    # closes the connection later. Each read waits for the earlier of the two deadlines.
    stream = _SilentStream([_opened_without_sasl(1.0)])
    with caplog.at_level("INFO", logger="provisiond.amqp"):
        await asyncio.wait_for(_endpoint(tmp_path, session_idle_timeout=1.6)(stream), 10)
    after_open = bytes(stream.sent).split(b"\x00\x53\x10", 1)[1]
    assert after_open.count(_EMPTY_FRAME) >= 2  # heartbeats, then the close
    assert b"amqp:resource-limit-exceeded" in after_open
    assert after_open.index(_EMPTY_FRAME) < after_open.index(b"amqp:resource-limit-exceeded")
    assert "idle timeout" in caplog.text


async def test_a_session_cancelled_while_reading_is_cancelled_not_timed_out(tmp_path: Path) -> None:
    # The read deadline cancels the task to interrupt a read; a cancellation from outside (the
    # server shutting down) must still end the session as a cancellation.
    waiting = asyncio.Event()

    class _Waiting(_SilentStream):
        async def receive(self, max_bytes: int = 65536) -> bytes:
            if not self._chunks:
                waiting.set()  # the session reads past its open: nothing more will come
            return await super().receive(max_bytes)

    stream = _Waiting([_opened_without_sasl(None)])
    task = asyncio.create_task(_endpoint(tmp_path, session_idle_timeout=0.5)(stream))
    await waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b"amqp:resource-limit-exceeded" not in stream.sent


async def test_a_stream_that_swallows_the_deadline_leaves_the_task_uncancelled(tmp_path: Path) -> None:
    # A stream whose read ends on cancellation rather than raising it (as a read that turns an
    # error into b"" might): the deadline's cancellation must not stay pending on the task.
    class _Swallowing(_SilentStream):
        async def receive(self, max_bytes: int = 65536) -> bytes:
            try:
                return await super().receive(max_bytes)
            except asyncio.CancelledError:
                return b""

    stream = _Swallowing([_opened_without_sasl(None)])
    task = asyncio.create_task(_endpoint(tmp_path, session_idle_timeout=0.3)(stream))
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done and task.exception() is None
    assert task.cancelling() == 0


async def test_a_request_whose_links_detach_in_the_same_read_is_answered_without_a_traceback(
    tmp_path: Path,
) -> None:
    """A device's request, then the detach of both its links, in one read: the machine reads
    the detaches before the request is answered, so there is no link left to settle it on or
    to answer it on; the session goes on (it used to end in LocalProtocolError)."""
    units = []
    wire = _client_wire("PLAIN")
    at = 0
    while at < len(wire):
        size = 8 if wire[at : at + 4] == b"AMQP" else int.from_bytes(wire[at : at + 4], "big")
        units.append(wire[at : at + size])
        at += size
    transfers = [i for i, unit in enumerate(units) if unit[8:11] == b"\x00\x53\x14"]
    from provisiond.protocol.amqp.frames import Frame, FrameType, encode_frame
    from provisiond.protocol.amqp.performatives import Close, Detach

    detaches = bytearray()
    for handle in (0, 1):
        encode_frame(Frame(FrameType.AMQP, 0, Detach(handle=handle, closed=True)), detaches)
    encode_frame(Frame(FrameType.AMQP, 0, Close()), detaches)
    first = transfers[0]
    for fast in (True, False):
        endpoint = _endpoint(tmp_path)
        endpoint.fast_path = fast
        stream = _FakeStream([*units[:first], units[first] + bytes(detaches)])
        await asyncio.wait_for(endpoint(stream), 5)
        assert stream.sent.endswith(b"\x00\x53\x18\x45")  # our close answers the device's


def test_a_blank_body_over_the_limit_is_refused_as_over_https(
    server: RunningServer, admin: ServiceClient
) -> None:
    """The registration body's size limit holds whatever the body holds: 100,000 spaces over
    AMQP were taken as no body (and the device assigned), where HTTPS answers 400007. The
    transfer is rejected (the SDKs' way to hear a 400 over AMQP) and nothing is registered."""
    from proton import Delivery
    from proton.utils import SendException

    reg = uid("amqp-blank")
    key = enroll_symmetric(admin, reg)
    conn = proton_plain(server, reg, key)
    blank = ProtonMessage(
        body=b" " * 100_000,
        inferred=True,
        correlation_id="big-1",
        properties={dps.OPERATION_TYPE: dps.OperationType.REGISTER.value},
    )
    try:
        sender = conn.create_sender(f"{server.id_scope}/registrations/{reg}")
        conn.create_receiver(f"{server.id_scope}/registrations/{reg}")
        with pytest.raises(SendException) as refused:
            sender.send(blank)
    finally:
        conn.close()
    assert refused.value.state == Delivery.REJECTED
    assert "400007" in server.log() and f"registration {reg} assigned" not in server.log()
