"""DPS's SASL ``TPM`` mechanism (device-protocol.md §4.1), sans-io, one machine per role:
:class:`TpmSaslServer` for the service endpoint and :class:`TpmSaslClient` for the device
client. Neither touches a socket, a TPM or a store: they turn the SASL frames' bytes into what
the application must do next, and what it decided back into bytes.

Theory of operation
-------------------
A TPM device has no secret the service knows; SASL carries the proof (the same one HTTPS does
in two register requests, §2.3)::

    client  sasl-init      0x00 ‖ idScope ‖ 0x00 ‖ registrationId ‖ 0x00 ‖ EK       (TPM2B_PUBLIC)
    server  challenge      0x00                                                     "send the SRK"
    client  response       0x00 ‖ SRK
            (the service checks EK and SRK against the enrollment and makes the activation blob)
    server  challenge      ctrl ‖ chunk    ctrl = 0x80 | seq (interim), 0xC0 | seq (final)
    client  response       0x00            after an interim chunk
            (the device activates the blob in its TPM and signs a SAS token with the key in it)
    client  response       0x00 ‖ SAS token after the final chunk
            (the service verifies the token against the challenge; the outcome is the SASL one)

``seq`` is a 2-bit counter from 0, so a blob goes in :data:`MAX_CHUNKS` chunks of at most
:data:`CHUNK_SIZE` bytes (a challenge frame must fit the 512 bytes SASL allows; the C SDK caps
the data at 470, and .NET checks the sequence number). Chunked sasl-inits and SRK responses,
which the C SDK sends only for keys too large for one frame, are not supported.

Each machine's states and what moves them are in a table (:data:`SERVER_TRANSITIONS`,
:data:`CLIENT_TRANSITIONS`). Bytes the peer may not send in the current state, or malformed
bytes, raise :class:`~provisiond.errors.AmqpProtocolError` (``amqp:decode-error``; the endpoint
answers it with a failed SASL outcome); a call the application may not make now raises
:class:`~provisiond.errors.LocalProtocolError` (our bug).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ...errors import AmqpProtocolError, LocalProtocolError

__all__ = [
    "CHUNK_SIZE",
    "FIRST_CHALLENGE",
    "MAX_CHUNKS",
    "ActivateBlob",
    "ClientState",
    "MakeBlob",
    "Respond",
    "SendChallenge",
    "ServerState",
    "TokenReceived",
    "TpmInit",
    "TpmSaslClient",
    "TpmSaslServer",
]

#: Blob bytes per challenge: a challenge frame must fit 512 bytes (the C SDK caps data at 470).
CHUNK_SIZE = 400
#: The sequence number has 2 bits and .NET checks it: a blob goes in 4 chunks at most.
MAX_CHUNKS = 4
#: The service's first challenge: "send the SRK".
FIRST_CHALLENGE = b"\x00"
_NUL = b"\x00"
_PRESENT = 0x80
_FINAL = 0x40
_SEQUENCE = 0x03


def _decode_error(message: str) -> AmqpProtocolError:
    return AmqpProtocolError(message, condition="amqp:decode-error")


@dataclass(frozen=True, slots=True)
class TpmInit:
    """What a TPM sasl-init names: the ID scope, the registration id, and the EK (raw TPM2B_PUBLIC)."""

    id_scope: str
    registration_id: str
    endorsement_key: bytes

    def encode(self) -> bytes:
        return (
            _NUL + self.id_scope.encode() + _NUL + self.registration_id.encode() + _NUL + self.endorsement_key
        )

    @classmethod
    def decode(cls, data: bytes | None) -> TpmInit:
        """:raises AmqpProtocolError: not ``0x00 scope 0x00 id 0x00 EK`` (or a chunked init)."""
        raw = data or b""
        if not raw.startswith(_NUL):
            raise _decode_error("A TPM sasl-init starts with 0x00 (a chunked init is not supported).")
        parts = raw[1:].split(_NUL, 2)
        if len(parts) != 3 or not all(parts):
            raise _decode_error("A TPM sasl-init is 0x00 scope 0x00 id 0x00 EK.")
        try:
            return cls(parts[0].decode("ascii"), parts[1].decode("utf-8"), parts[2])
        except UnicodeDecodeError:
            raise _decode_error("The scope or id of a TPM sasl-init is not text.") from None


def _chunks(blob: bytes) -> list[bytes]:
    """The challenges that carry ``blob``: ``ctrl ‖ chunk`` each.

    :raises LocalProtocolError: the blob needs more than :data:`MAX_CHUNKS` chunks.
    """
    pieces = [blob[i : i + CHUNK_SIZE] for i in range(0, len(blob), CHUNK_SIZE)] or [b""]
    if len(pieces) > MAX_CHUNKS:
        raise LocalProtocolError(
            f"A {len(blob)}-byte blob needs more than {MAX_CHUNKS} chunks of {CHUNK_SIZE}."
        )
    last = len(pieces) - 1
    return [bytes([_PRESENT | (_FINAL if n == last else 0) | n]) + piece for n, piece in enumerate(pieces)]


# --- the service's side ------------------------------------------------------------------------


class ServerState(enum.Enum):
    INIT = "waiting for sasl-init"
    SRK = "waiting for the SRK"
    BLOB = "waiting for the application's activation blob"
    ACK = "waiting for the acknowledgement of a blob chunk"
    TOKEN = "waiting for the SAS token"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class MakeBlob:
    """The device sent its SRK: check EK and SRK, make the activation blob, and pass its bytes
    to :meth:`TpmSaslServer.send_blob`."""

    init: TpmInit
    storage_root_key: bytes


@dataclass(frozen=True, slots=True)
class SendChallenge:
    """Send these bytes as the next sasl-challenge."""

    data: bytes


@dataclass(frozen=True, slots=True)
class TokenReceived:
    """The device's last response: the SAS token its TPM signed. Verify it, then send the outcome."""

    token: str


ServerStep = MakeBlob | SendChallenge | TokenReceived

#: (state, what happened) -> next state. "init", "response" come from the peer; "blob" from us.
SERVER_TRANSITIONS: dict[tuple[ServerState, str], ServerState] = {
    (ServerState.INIT, "init"): ServerState.SRK,
    (ServerState.SRK, "response"): ServerState.BLOB,
    (ServerState.BLOB, "blob"): ServerState.ACK,  # or TOKEN when the blob fits one chunk
    (ServerState.ACK, "response"): ServerState.ACK,  # or TOKEN after the final chunk went out
    (ServerState.TOKEN, "response"): ServerState.DONE,
}


class TpmSaslServer:
    """The service side of one TPM SASL exchange.

    ::

        server = TpmSaslServer()
        send(server.receive_init(init_bytes))          # FIRST_CHALLENGE
        step = server.receive_response(response)       # MakeBlob(init, srk)
        send(server.send_blob(blob))                   # the first chunk
        step = server.receive_response(response)       # SendChallenge(next chunk) ... TokenReceived(token)
    """

    def __init__(self) -> None:
        self.state = ServerState.INIT
        self.init: TpmInit | None = None
        self.storage_root_key = b""
        self._pending: list[bytes] = []

    def _move(self, event: str, *, local: bool = False) -> None:
        after = SERVER_TRANSITIONS.get((self.state, event))
        if after is None:
            text = f"A TPM SASL {event} while {self.state.value}."
            raise LocalProtocolError(text) if local else _decode_error(text)
        self.state = after

    def receive_init(self, data: bytes | None) -> bytes:
        """Parse the sasl-init; return the first challenge to send.

        :raises AmqpProtocolError: malformed, or not the first frame of the exchange.
        """
        init = TpmInit.decode(data)
        self._move("init")
        self.init = init
        return FIRST_CHALLENGE

    def receive_response(self, data: bytes) -> ServerStep:
        """What one sasl-response asks for.

        :raises AmqpProtocolError: a response out of turn, or not the layout its turn requires.
        """
        state = self.state
        self._move("response")
        if state is ServerState.SRK:
            if not data.startswith(_NUL) or len(data) < 2:
                raise _decode_error("The TPM response to the first challenge is 0x00 ‖ SRK.")
            self.storage_root_key = data[1:]
            assert self.init is not None
            return MakeBlob(self.init, self.storage_root_key)
        if state is ServerState.ACK:
            if data != _NUL:
                raise _decode_error("The TPM response to an interim blob chunk is 0x00.")
            return SendChallenge(self._next_chunk())
        if not data.startswith(_NUL) or len(data) < 2:
            raise _decode_error("The last TPM response is 0x00 ‖ SAS token.")
        try:
            return TokenReceived(data[1:].decode("utf-8"))
        except UnicodeDecodeError:
            raise _decode_error("The SAS token is not UTF-8.") from None

    def send_blob(self, blob: bytes) -> bytes:
        """The first challenge that carries the activation blob (:class:`MakeBlob` asked for it).

        :raises LocalProtocolError: not asked for now, or a blob over :data:`MAX_CHUNKS` chunks.
        """
        self._move("blob", local=True)
        self._pending = _chunks(blob)
        return self._next_chunk()

    def _next_chunk(self) -> bytes:
        chunk = self._pending.pop(0)
        if not self._pending:
            self.state = ServerState.TOKEN
        return chunk


# --- the device's side -------------------------------------------------------------------------


class ClientState(enum.Enum):
    INIT = "before sasl-init"
    SRK = "waiting for the first challenge"
    BLOB = "receiving the activation blob"
    TOKEN = "waiting for the application's SAS token"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Respond:
    """Send these bytes as the sasl-response."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ActivateBlob:
    """The whole activation blob arrived: activate it in the TPM, sign a SAS token with the key
    it holds, and pass the token to :meth:`TpmSaslClient.send_token`."""

    blob: bytes


ClientStep = Respond | ActivateBlob

CLIENT_TRANSITIONS: dict[tuple[ClientState, str], ClientState] = {
    (ClientState.INIT, "init"): ClientState.SRK,
    (ClientState.SRK, "challenge"): ClientState.BLOB,
    (ClientState.BLOB, "chunk"): ClientState.BLOB,
    (ClientState.BLOB, "final chunk"): ClientState.TOKEN,
    (ClientState.TOKEN, "token"): ClientState.DONE,
}


class TpmSaslClient:
    """The device side of one TPM SASL exchange, for the device ``registration_id`` in
    ``id_scope`` whose TPM has these EK and SRK (raw TPM2B_PUBLIC)::

        client = TpmSaslClient(scope, reg_id, ek, srk)
        sasl_init("TPM", client.initial_response())
        step = client.receive_challenge(challenge)     # Respond(bytes) ... ActivateBlob(blob)
        sasl_response(client.send_token(token))
    """

    def __init__(
        self, id_scope: str, registration_id: str, endorsement_key: bytes, storage_root_key: bytes
    ) -> None:
        self.state = ClientState.INIT
        self._init = TpmInit(id_scope, registration_id, endorsement_key)
        self._storage_root_key = storage_root_key
        self._blob: list[bytes] = []

    def _move(self, event: str, *, local: bool = False) -> None:
        after = CLIENT_TRANSITIONS.get((self.state, event))
        if after is None:
            text = f"A TPM SASL {event} while {self.state.value}."
            raise LocalProtocolError(text) if local else _decode_error(text)
        self.state = after

    def initial_response(self) -> bytes:
        """The sasl-init's initial response."""
        self._move("init", local=True)
        return self._init.encode()

    def receive_challenge(self, data: bytes) -> ClientStep:
        """What one sasl-challenge asks for.

        :raises AmqpProtocolError: a challenge out of turn, without its control byte, or out of
            sequence.
        """
        if self.state not in (ClientState.SRK, ClientState.BLOB):
            self._move("challenge")  # raises: no challenge is due
        if self.state is ClientState.SRK:
            if data != FIRST_CHALLENGE:
                raise _decode_error("The first TPM challenge is 0x00.")
            self._move("challenge")
            return Respond(_NUL + self._storage_root_key)
        if not data or not data[0] & _PRESENT:
            raise _decode_error("A TPM blob challenge starts with a control byte 0x80|seq.")
        final = bool(data[0] & _FINAL)
        self._move("final chunk" if final else "chunk")
        expected = len(self._blob) % (_SEQUENCE + 1)
        if data[0] & _SEQUENCE != expected:
            raise _decode_error(f"TPM blob chunk {data[0] & _SEQUENCE} arrived where {expected} was due.")
        self._blob.append(data[1:])
        return ActivateBlob(b"".join(self._blob)) if final else Respond(_NUL)

    def send_token(self, token: str) -> bytes:
        """The last response: the SAS token the TPM signed (:class:`ActivateBlob` asked for it)."""
        self._move("token", local=True)
        return _NUL + token.encode("utf-8")
