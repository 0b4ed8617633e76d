"""The MQTT device endpoint (device-protocol.md §3): MQTT 3.1.1 over TLS on ``--mqtt-port``
(8883), and over WebSockets on the HTTPS port (``/`` and ``/$iothub/websocket``, subprotocol
``mqtt``, or ``MQTT`` from the C SDK; the client's spelling is echoed).

Theory of operation
-------------------
One :class:`_Session` per connection runs a loop over a :class:`~provisiond.service.streams.ByteStream`:
bytes in go to a server :class:`~provisiond.protocol.mqtt.MqttConnection`, the packets it
returns are handled in order, and what it queued is written back. The loop waits for bytes no
longer than the machine's deadline: a connection that never sends its CONNECT
(``--mqtt-connect-timeout``), whose keep-alive lapses (1.5 times its interval) or that sends
nothing for ``--session-idle-timeout`` (also with keep-alive 0, as the C SDK sends) is closed,
as is one that breaks the protocol (malformed or oversized
packet, a packet out of place), publishes to a topic DPS does not have, or leaves too many
responses unacknowledged. Every close names its reason in one log line. The connection's
guard (:mod:`provisiond.service.guard`) learns when the CONNECT is in and whether a packet is
incomplete, so that a device trickling a packet byte by byte is held to the minimum receive rate.

* **CONNECT**: the client id is the registration id; the user name is
  ``{idScope}/registrations/{registrationId}/api-version=...`` (parsed up to ``/api-version=``);
  the password is the SAS token (symmetric key), or absent when the device presented its
  certificate in the TLS handshake (X.509). CONNACK always has session present 0 and every
  session is clean, whatever the client asked (the Python SDK asks for a persistent one).
* **SUBSCRIBE**: filters under ``$dps/registrations/res/`` are granted at QoS 1 at most
  (QoS 2 is granted as 1, as DPS does); any other filter gets the failure code 0x80.
* **PUBLISH** to ``$dps/registrations/PUT/iotdps-register/?$rid=`` or
  ``.../GET/iotdps-get-operationstatus/?$rid=&operationId=``, at QoS 1 or 0 (the C SDK):
  acknowledged first (the .NET SDK requires the PUBACK before the response), then handed to
  the same :class:`~provisiond.service.registrar.Registrar` as HTTPS, and answered at QoS 1
  on ``$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`` to this connection
  only. Register answers 202 like HTTPS (terminal status in the body when assignment is done);
  a poll 200, or 202 while assigning. Denials carry the DPS error body with the status of
  the error (401, 404, 429 with retry-after ...).

Where attestation happens
-------------------------
DPS attests the credential when the device registers and answers in JSON, and so does this
endpoint: the registrar checks the signature of the SAS token, or the certificate chain,
against the enrollments at register and poll time, exactly as over HTTPS, and a device with
a wrong key reads a 401 with errorCode and message on its response topic. The CONNECT is
refused only for what is wrong without looking at any enrollment, so that no attestation is
done twice on the registration path: another protocol version (return code 1); an empty or
malformed client id, or one that is not the user name's registration id (2); a user name that
is not DPS's, or a password that is not a SAS token for this ID scope and registration id,
or an expired one (4); no credential at all, neither password nor client certificate (5).
The official Python SDK reports return codes 4 and 5 as ``CredentialError``; a 401 at
register as a ``ClientError`` caused by ``ServiceError(... status code 401)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ..attestation import symmetric_key as sk
from ..errors import (
    BodyTooLargeError,
    InvalidBodyError,
    InvalidIdError,
    LocalProtocolError,
    ProvisioningError,
    RemoteProtocolError,
)
from ..models import RegistrationStatus
from ..protocol.messages import DeviceRegistration, RegistrationOperationStatus, encode
from ..protocol.mqtt import (
    Connect,
    ConnectReturnCode,
    Disconnect,
    MqttConnection,
    Packet,
    Publish,
    QoS,
    Role,
    State,
    SubackReturnCode,
    Subscribe,
)
from ..protocol.topics import (
    RequestKind,
    RequestTopic,
    is_response_filter,
    parse_request_topic,
    parse_username,
    response_topic,
)
from .context import ServiceContext
from .device_api import POLL_AFTER_SECONDS
from .enrollments import validate_id
from .http import decode_body, error_response
from .listeners import STARTERS
from .registrar import DeviceRequest, Registrar
from .streams import WEBSOCKET_HANDLERS, ByteStream, StreamClosed, start_tls_listener

__all__ = ["MqttEndpoint", "start_mqtt"]

log = logging.getLogger("provisiond.mqtt")

#: Room for the topic and the packet header above the largest request body the service takes.
PACKET_OVERHEAD = 8 * 1024
#: Responses a device may leave unacknowledged before it is disconnected.
MAX_INFLIGHT = 32
_READ_SIZE = 65536
_QOS_GRANTED = {QoS.AT_MOST_ONCE: SubackReturnCode.GRANTED_QOS_0}


@dataclass(frozen=True, kw_only=True)
class _Identity:
    """Who the CONNECT says the device is, checked as far as it can be without the store."""

    id_scope: str
    registration_id: str
    authorization: str | None
    client_chain: Sequence[bytes]


@dataclass(frozen=True)
class _Refusal:
    """A CONNECT to refuse: the return code, and why (for the log)."""

    code: ConnectReturnCode
    reason: str


class MqttEndpoint:
    """Runs MQTT sessions for one worker (its context and registrar) and one transport label
    (``mqtt`` over TLS, ``mqtt-ws`` over WebSockets). An instance is a session handler."""

    def __init__(self, ctx: ServiceContext, registrar: Registrar, *, transport: str) -> None:
        self.ctx = ctx
        self.registrar = registrar
        self.transport = transport
        self.max_packet_size = ctx.settings.max_body_bytes + PACKET_OVERHEAD

    async def __call__(self, stream: ByteStream) -> None:
        await _Session(self, stream).run()


class _Session:
    def __init__(self, endpoint: MqttEndpoint, stream: ByteStream) -> None:
        self.endpoint = endpoint
        self.stream = stream
        self.machine = MqttConnection(
            Role.SERVER,
            clock=time.monotonic,
            max_packet_size=endpoint.max_packet_size,
            connect_timeout=endpoint.ctx.settings.mqtt_connect_timeout,
            max_idle=endpoint.ctx.settings.session_idle_timeout,
            max_inflight=MAX_INFLIGHT,
        )
        self.identity: _Identity | None = None
        self.orderly = False  # the device said DISCONNECT, or closed its end: no log line at info

    @property
    def who(self) -> str:
        name = self.identity.registration_id if self.identity else "(before CONNECT)"
        return f"{self.stream.peer} {name} [{self.endpoint.transport}]"

    # --- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        machine = self.machine
        try:
            while machine.state is not State.CLOSED:
                data = await self._receive()
                if data is None:
                    continue  # a deadline passed; the machine decided what that means
                if not data:
                    self.orderly = True
                    machine.close("the device closed the connection without DISCONNECT")
                    break
                packets = machine.feed_bytes(data)
                await self._handle(packets)
                await self._flush()
        except RemoteProtocolError:
            pass  # the machine closed itself and kept the reason
        except StreamClosed as exc:
            machine.close(f"the connection broke while sending ({exc or 'reset'})")
        with contextlib.suppress(StreamClosed):
            await self._flush()  # a refusing CONNACK, for instance
        self._log_close()

    async def _receive(self) -> bytes | None:
        guard = self.stream.guard
        if self.machine.state is not State.IDLE:
            guard.head_received()  # the CONNECT is in (idempotent)
        if self.machine.pending_input:
            guard.receiving()
        else:
            guard.busy()
        deadline = self.machine.deadline()
        if deadline is None:
            return await self.stream.receive(_READ_SIZE)
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                return await self.stream.receive(_READ_SIZE)
        except TimeoutError:
            self.machine.handle_deadline()
            return None

    async def _flush(self) -> None:
        data = self.machine.get_outbound_data()
        if data:
            await self.stream.send(data)

    def _log_close(self) -> None:
        level = logging.DEBUG if self.orderly else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "MQTT %s: closed: %s", self.who, self.machine.close_reason or "closed")

    # --- packets ---------------------------------------------------------------------------------

    async def _handle(self, packets: list[Packet]) -> None:
        pending = deque(packets)
        while pending:
            packet = pending.popleft()
            if isinstance(packet, Disconnect):
                self.orderly = True
            if self.machine.state is State.CLOSED:
                return
            if isinstance(packet, Connect):
                self._on_connect(packet)
                if self.machine.state is State.CONNECTED:
                    pending.extend(self.machine.feed_bytes(b""))  # what was pipelined behind the CONNECT
            elif isinstance(packet, Subscribe):
                self._on_subscribe(packet)
            elif isinstance(packet, Publish):
                await self._on_publish(packet)
            # PUBACK, PINGREQ, UNSUBSCRIBE, DISCONNECT: the machine has done what they need.

    def _on_connect(self, connect: Connect) -> None:
        if self.machine.state is State.CLOSED:  # refused by the protocol rules already
            return
        identity = self._identify(connect)
        if isinstance(identity, _Refusal):
            self.machine.refuse(identity.code, identity.reason)
            return
        self.identity = identity
        self.machine.accept()
        if log.isEnabledFor(logging.DEBUG):  # ``who`` formats a string: not on the hot path
            log.debug("MQTT %s: connected (keep-alive %d s)", self.who, connect.keep_alive)

    def _identify(self, connect: Connect) -> _Identity | _Refusal:
        registration_id = connect.client_id
        try:
            validate_id(registration_id, "client id")
        except InvalidIdError as exc:
            return _Refusal(
                ConnectReturnCode.IDENTIFIER_REJECTED,
                f"the client id must be the registration id: {exc.message}",
            )
        if connect.username is None:
            return _Refusal(ConnectReturnCode.BAD_USERNAME_OR_PASSWORD, "no user name")
        try:
            username = parse_username(connect.username)
        except RemoteProtocolError as exc:
            return _Refusal(ConnectReturnCode.BAD_USERNAME_OR_PASSWORD, exc.message)
        if username.registration_id.lower() != registration_id.lower():
            return _Refusal(
                ConnectReturnCode.IDENTIFIER_REJECTED,
                f"the client id {registration_id!r} is not the user name's registration id "
                f"{username.registration_id[:128]!r}",
            )
        authorization = None
        if connect.password is not None:
            try:
                authorization = connect.password.decode("utf-8")
                sk.check_device_token(
                    authorization,
                    username.id_scope,
                    registration_id,
                    now=int(self.endpoint.ctx.clock()),
                    clock_skew=self.endpoint.ctx.settings.clock_skew,
                )
            except UnicodeDecodeError:
                return _Refusal(ConnectReturnCode.BAD_USERNAME_OR_PASSWORD, "the password is not UTF-8")
            except ProvisioningError as exc:
                return _Refusal(ConnectReturnCode.BAD_USERNAME_OR_PASSWORD, exc.message)
        elif not self.stream.client_chain:
            return _Refusal(
                ConnectReturnCode.NOT_AUTHORIZED,
                "no credential: a SAS token as the password (symmetric key), or a client certificate "
                "in the TLS handshake (X.509)",
            )
        return _Identity(
            id_scope=username.id_scope,
            registration_id=registration_id,
            authorization=authorization,
            client_chain=self.stream.client_chain,
        )

    def _on_subscribe(self, subscribe: Subscribe) -> None:
        codes = []
        for subscription in subscribe.subscriptions:
            if is_response_filter(subscription.topic_filter):
                codes.append(_QOS_GRANTED.get(subscription.qos, SubackReturnCode.GRANTED_QOS_1))
            else:
                log.info("MQTT %s: refused the subscription to %r", self.who, subscription.topic_filter[:200])
                codes.append(SubackReturnCode.FAILURE)
        self.machine.grant(subscribe, codes)

    async def _on_publish(self, publish: Publish) -> None:
        try:
            request = parse_request_topic(publish.topic)
        except RemoteProtocolError as exc:
            self.machine.close(f"a publish to a topic DPS does not have: {exc.message}")
            return
        self.machine.acknowledge(publish)  # PUBACK first, then the response (.NET)
        status, body, retry_after = await self._answer(request, publish.payload)
        try:
            self.machine.publish(
                response_topic(status, request.rid, retry_after), body, qos=QoS.AT_LEAST_ONCE
            )
        except LocalProtocolError as exc:
            self.machine.close(f"too many unacknowledged responses ({exc.message})")

    async def _answer(self, request: RequestTopic, payload: bytes) -> tuple[int, bytes, int | None]:
        """The status, body and retry-after of the answer to one request."""
        endpoint = self.endpoint
        assert self.identity is not None
        identity = self.identity
        try:
            body = DeviceRegistration()
            if request.kind is RequestKind.REGISTER and payload.strip():
                if len(payload) > endpoint.ctx.settings.max_body_bytes:
                    raise BodyTooLargeError(
                        f"The registration body ({len(payload)} bytes) exceeds the "
                        f"{endpoint.ctx.settings.max_body_bytes}-byte limit."
                    )
                body = decode_body(payload, DeviceRegistration, "device registration")
                if body.tpm is not None:
                    raise InvalidBodyError(
                        "TPM attestation is not available over MQTT (as in DPS); use HTTPS or AMQP."
                    )
            device = DeviceRequest(
                id_scope=identity.id_scope,
                registration_id=identity.registration_id,
                body=body,
                authorization=identity.authorization,
                client_chain=identity.client_chain,
                transport=endpoint.transport,
                source=self.stream.address,
            )
            if request.kind is RequestKind.REGISTER:
                result = await endpoint.registrar.register(device)
                return 202, encode(result), _retry_after(result)
            assert request.operation_id is not None
            result = await endpoint.registrar.operation_status(device, request.operation_id)
            assigning = result.status is RegistrationStatus.ASSIGNING
            return (202 if assigning else 200), encode(result), _retry_after(result)
        except ProvisioningError as exc:
            return self._error(request, exc)
        except Exception:
            log.exception(
                "MQTT %s: internal error answering %s $rid=%s", self.who, request.kind.value, request.rid
            )
            return self._error(request, ProvisioningError("Internal error; the service log has the details."))

    def _error(self, request: RequestTopic, exc: ProvisioningError) -> tuple[int, bytes, int | None]:
        """The DPS error body, rendered by the same function as over HTTPS."""
        tid = str(uuid.uuid4())
        level = logging.ERROR if exc.http_status >= 500 else logging.INFO
        log.log(
            level,
            "MQTT %s: %s $rid=%s -> %d %d: %s [trackingId=%s]",
            self.who,
            request.kind.value,
            request.rid,
            exc.http_status,
            exc.error_code,
            exc.message,
            tid,
        )
        retry_after = getattr(exc, "retry_after", None)
        body = bytes(error_response(exc, tid).body)
        return exc.http_status, body, retry_after if isinstance(retry_after, int) else None


def _retry_after(result: RegistrationOperationStatus) -> int | None:
    return POLL_AFTER_SECONDS if result.status is RegistrationStatus.ASSIGNING else None


# --- listeners -------------------------------------------------------------------------------------


async def start_mqtt(ctx: ServiceContext, registrar: Registrar) -> asyncio.Server | None:
    """The MQTT listeners of this worker: WebSockets on the HTTPS port (always), and TLS on
    ``settings.mqtt_port`` unless it is 0.

    :raises ConfigurationError: the port cannot be bound (the worker does not start).
    """
    websocket = MqttEndpoint(ctx, registrar, transport="mqtt-ws")
    WEBSOCKET_HANDLERS["mqtt"] = websocket  # the lookup is by lower-cased subprotocol (also "MQTT")
    settings = ctx.settings
    return await start_tls_listener(
        settings,
        MqttEndpoint(ctx, registrar, transport="mqtt"),
        port=settings.mqtt_port,
        name="MQTT",
        flag="--mqtt-port",
        first_request="CONNECT",
    )


STARTERS.append(start_mqtt)
