"""DPS's SASL TPM mechanism (provisiond.protocol.amqp.sasl_tpm): the service's and the device's
machines run against each other with no I/O, directly and inside the AMQP connection machines;
every byte layout the SDKs use; and what each side refuses."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from provisiond.errors import AmqpProtocolError, LocalProtocolError
from provisiond.protocol.amqp.connection import Connection
from provisiond.protocol.amqp.events import (
    Event,
    SaslChallengeReceived,
    SaslInitReceived,
    SaslMechanismsReceived,
    SaslOutcomeReceived,
    SaslResponseReceived,
)
from provisiond.protocol.amqp.performatives import SaslCode
from provisiond.protocol.amqp.sasl_tpm import (
    CHUNK_SIZE,
    FIRST_CHALLENGE,
    MAX_CHUNKS,
    ActivateBlob,
    ClientState,
    MakeBlob,
    Respond,
    SendChallenge,
    ServerState,
    TokenReceived,
    TpmInit,
    TpmSaslClient,
    TpmSaslServer,
)
from tests.protocol.test_amqp_connection import DeviceLikeClient, DpsLikeServer, make_pair

SCOPE, REG = "0ne00000001", "tpm-device"
EK, SRK = b"\x01\x3a" + bytes(range(256)) + b"ek", b"\x01\x18" + bytes(range(255, -1, -1)) + b"srk"
TOKEN = "SharedAccessSignature sr=0ne00000001%2fregistrations%2ftpm-device&sig=abc&se=1&skn=registration"


def exchange(blob: bytes, token: str = TOKEN) -> tuple[TpmSaslServer, TpmSaslClient, list[bytes], bytes]:
    """Run both machines to the end; return them, the challenges the server sent, and the blob
    the client received."""
    server, client = TpmSaslServer(), TpmSaslClient(SCOPE, REG, EK, SRK)
    challenges = [server.receive_init(client.initial_response())]
    received = b""
    while True:
        step = client.receive_challenge(challenges[-1])
        if isinstance(step, ActivateBlob):
            received = step.blob
            answer = server.receive_response(client.send_token(token))
            assert answer == TokenReceived(token)
            return server, client, challenges, received
        reply = server.receive_response(step.data)
        if isinstance(reply, MakeBlob):
            assert reply == MakeBlob(TpmInit(SCOPE, REG, EK), SRK)
            challenges.append(server.send_blob(blob))
        else:
            assert isinstance(reply, SendChallenge)
            challenges.append(reply.data)


@pytest.mark.parametrize(
    "size", [1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE, MAX_CHUNKS * CHUNK_SIZE]
)
def test_the_two_roles_carry_a_blob_in_chunks_and_the_token_back(size: int) -> None:
    blob = os.urandom(size)
    server, client, challenges, received = exchange(blob)
    assert received == blob
    chunks = challenges[1:]
    assert len(chunks) == -(-size // CHUNK_SIZE)
    # ctrl = 0x80 | seq for interim chunks, 0xC0 | seq for the last; no chunk over CHUNK_SIZE.
    assert [c[0] for c in chunks] == [0x80 | n for n in range(len(chunks) - 1)] + [0xC0 | (len(chunks) - 1)]
    assert all(len(c) <= CHUNK_SIZE + 1 for c in chunks)
    assert (server.state, client.state) == (ServerState.DONE, ClientState.DONE)
    assert (server.init, server.storage_root_key) == (TpmInit(SCOPE, REG, EK), SRK)


def test_the_byte_layouts_are_the_sdks() -> None:
    """C (prov_sasl_tpm.c), .NET (SaslTpmHandler.cs) and Node (sasl_tpm.ts) all send these."""
    client = TpmSaslClient(SCOPE, REG, EK, SRK)
    assert client.initial_response() == b"\x00" + SCOPE.encode() + b"\x00" + REG.encode() + b"\x00" + EK
    assert client.receive_challenge(FIRST_CHALLENGE) == Respond(b"\x00" + SRK)
    assert client.receive_challenge(b"\x80" + b"a" * 10) == Respond(b"\x00")
    assert client.receive_challenge(b"\xc1" + b"b") == ActivateBlob(b"a" * 10 + b"b")
    assert client.send_token("t") == b"\x00t"


def test_a_blob_over_four_chunks_is_our_bug() -> None:
    server = TpmSaslServer()
    server.receive_init(TpmInit(SCOPE, REG, EK).encode())
    assert isinstance(server.receive_response(b"\x00" + SRK), MakeBlob)
    with pytest.raises(LocalProtocolError, match="more than 4 chunks"):
        server.send_blob(bytes(MAX_CHUNKS * CHUNK_SIZE + 1))


@pytest.mark.parametrize(
    ("init", "words"),
    [
        pytest.param(None, "starts with 0x00", id="none"),
        pytest.param(b"\x80chunked", "chunked init is not supported", id="chunked"),
        pytest.param(b"\x00scope\x00id", "0x00 scope 0x00 id 0x00 EK", id="no-ek"),
        pytest.param(b"\x00\x00id\x00ek", "0x00 scope 0x00 id 0x00 EK", id="empty-scope"),
        pytest.param(b"\x00sc\xffope\x00id\x00ek", "not text", id="not-ascii"),
    ],
)
def test_the_server_refuses_a_malformed_init(init: bytes | None, words: str) -> None:
    with pytest.raises(AmqpProtocolError, match=words) as info:
        TpmSaslServer().receive_init(init)
    assert info.value.condition == "amqp:decode-error"


def _server_at_blob() -> TpmSaslServer:
    server = TpmSaslServer()
    server.receive_init(TpmInit(SCOPE, REG, EK).encode())
    return server


@pytest.mark.parametrize(
    ("responses", "words"),
    [
        pytest.param([b"SRK"], "0x00 ‖ SRK", id="srk-without-0x00"),
        pytest.param([b"\x00"], "0x00 ‖ SRK", id="empty-srk"),
        pytest.param(
            [b"\x00" + SRK, b"\x00"], "while waiting for the application's activation blob", id="early"
        ),
    ],
)
def test_the_server_refuses_responses_out_of_turn_or_shape(responses: list[bytes], words: str) -> None:
    server = _server_at_blob()
    with pytest.raises(AmqpProtocolError, match=words):
        for response in responses:
            server.receive_response(response)


def test_the_server_refuses_a_bad_acknowledgement_and_a_bad_token() -> None:
    server = _server_at_blob()
    server.receive_response(b"\x00" + SRK)
    server.send_blob(bytes(CHUNK_SIZE + 1))
    with pytest.raises(AmqpProtocolError, match="interim blob chunk is 0x00"):
        server.receive_response(b"\x01")
    server = _server_at_blob()
    server.receive_response(b"\x00" + SRK)
    server.send_blob(b"blob")
    with pytest.raises(AmqpProtocolError, match="not UTF-8"):
        server.receive_response(b"\x00\xff\xfe")
    with pytest.raises(AmqpProtocolError, match="while done"):
        server.receive_response(b"\x00again")


def test_the_application_cannot_send_a_blob_nobody_asked_for() -> None:
    with pytest.raises(LocalProtocolError, match="blob while waiting for sasl-init"):
        TpmSaslServer().send_blob(b"blob")
    client = TpmSaslClient(SCOPE, REG, EK, SRK)
    with pytest.raises(LocalProtocolError, match="token while before sasl-init"):
        client.send_token("t")


@pytest.mark.parametrize(
    ("challenges", "words"),
    [
        pytest.param([b"\x01"], "The first TPM challenge is 0x00", id="first-not-0x00"),
        pytest.param([FIRST_CHALLENGE, b"\x00"], "control byte 0x80|seq", id="no-control-byte"),
        pytest.param(
            [FIRST_CHALLENGE, b"\x81chunk"], "chunk 1 arrived where 0 was due", id="out-of-sequence"
        ),
        pytest.param(
            [FIRST_CHALLENGE, b"\xc0a", b"\x80b"], "while waiting for the application", id="after-final"
        ),
    ],
)
def test_the_client_refuses_challenges_out_of_turn_shape_or_sequence(
    challenges: list[bytes], words: str
) -> None:
    client = TpmSaslClient(SCOPE, REG, EK, SRK)
    client.initial_response()
    with pytest.raises(AmqpProtocolError, match=words):
        for challenge in challenges:
            client.receive_challenge(challenge)


def test_a_challenge_before_the_init_is_refused() -> None:
    with pytest.raises(AmqpProtocolError, match="while before sasl-init"):
        TpmSaslClient(SCOPE, REG, EK, SRK).receive_challenge(FIRST_CHALLENGE)


# --- inside the AMQP connection machines -------------------------------------------------------


@dataclass
class TpmServerApp(DpsLikeServer):
    """The server application of the endpoint, in miniature: the mechanism decides what to send."""

    blob: bytes = b""
    tokens: list[str] = field(default_factory=list)
    mechanism: TpmSaslServer = field(default_factory=TpmSaslServer)

    def __call__(self, conn: Connection, event: Event) -> None:
        if isinstance(event, SaslInitReceived):
            conn.sasl_challenge(self.mechanism.receive_init(event.initial_response))
        elif isinstance(event, SaslResponseReceived):
            step = self.mechanism.receive_response(event.response)
            if isinstance(step, MakeBlob):
                conn.sasl_challenge(self.mechanism.send_blob(self.blob))
            elif isinstance(step, SendChallenge):
                conn.sasl_challenge(step.data)
            else:
                assert isinstance(step, TokenReceived)
                self.tokens.append(step.token)
                conn.sasl_outcome(SaslCode.OK)
        else:
            super().__call__(conn, event)


@dataclass
class TpmClientApp(DeviceLikeClient):
    """The device client, in miniature: 'activates' the blob by echoing its length in the token."""

    mechanism_machine: TpmSaslClient = field(default_factory=lambda: TpmSaslClient(SCOPE, REG, EK, SRK))
    outcome: SaslCode | None = None

    def __call__(self, conn: Connection, event: Event) -> None:
        if isinstance(event, SaslMechanismsReceived):
            conn.sasl_init("TPM", self.mechanism_machine.initial_response())
        elif isinstance(event, SaslChallengeReceived):
            step = self.mechanism_machine.receive_challenge(event.challenge)
            if isinstance(step, Respond):
                conn.sasl_response(step.data)
            else:
                conn.sasl_response(self.mechanism_machine.send_token(f"{TOKEN}&blob={len(step.blob)}"))
        else:
            if isinstance(event, SaslOutcomeReceived):
                self.outcome = event.code
            super().__call__(conn, event)


@pytest.mark.parametrize("bytewise", [False, True], ids=["chunks", "byte-at-a-time"])
def test_the_exchange_runs_inside_the_amqp_connection_machines(bytewise: bool) -> None:
    server_app, client_app = TpmServerApp(blob=os.urandom(2 * CHUNK_SIZE + 17)), TpmClientApp()
    pair = make_pair(server_app=server_app, client_app=client_app)
    pair.run(bytewise=bytewise)
    assert client_app.outcome is SaslCode.OK and pair.server.sasl_mechanism == "TPM"
    assert server_app.tokens == [f"{TOKEN}&blob={2 * CHUNK_SIZE + 17}"]
    assert client_app.answers == 1  # the connection opened and the register was answered
