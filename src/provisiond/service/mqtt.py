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
  the device gateway (:mod:`provisiond.service.gateway`) as over HTTPS and AMQP, and its
  answer published at QoS 1 on ``$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]``
  to this connection only. Register answers 202 like HTTPS (terminal status in the body when
  assignment is done); a poll 200, or 202 while assigning. Denials carry the DPS error body
  with the status of the error (401, 404, 429 with retry-after ...).

The built-in IoT hubs share this listener (and the WebSocket router): a CONNECT whose user
name begins with a built-in hub's host name (``{hubHostName}/{deviceId}/?api-version=...``)
is handed, with the stream and the machine paused after it, to the hub's endpoint
(:mod:`provisiond.service.hub_mqtt`), which answers it and runs the session from then on.

Where attestation happens
-------------------------
DPS attests the credential when the device registers and answers in JSON, and so does this
endpoint: the registrar (through the gateway) checks the signature of the SAS token, or the
certificate chain, against the enrollments at register and poll time, exactly as over HTTPS,
and a device with a wrong key reads a 401 with errorCode and message on its response topic.
The CONNECT is refused only for what is wrong without looking at any enrollment (the gateway's
``check_token``), so that no attestation is done twice on the registration path: another
protocol version (return code 1); an empty or
malformed client id, or one that is not the user name's registration id (2); a user name that
is not DPS's, or a password that is not a SAS token for this ID scope and registration id,
or an expired one (4); no credential at all, neither password nor client certificate (5).
The official Python SDK reports return codes 4 and 5 as ``CredentialError``; a 401 at
register as a ``ClientError`` caused by ``ServiceError(... status code 401)``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidIdError, LocalProtocolError, ProvisioningError, RemoteProtocolError
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
from ._deadline import ReadDeadline
from .enrollments import validate_id
from .gateway import MQTT, Answer, Credential, DeviceCall, DeviceGateway, Operation, Transport
from .listeners import TlsListener
from .streams import ByteStream, StreamClosed

if TYPE_CHECKING:
    from .hub_mqtt import HubEndpoint

__all__ = ["MqttEndpoint", "tls_listener"]

log = logging.getLogger("provisiond.mqtt")

#: Room for the topic and the packet header above the largest request body the service takes.
PACKET_OVERHEAD = 8 * 1024
#: Responses a device may leave unacknowledged before it is disconnected.
MAX_INFLIGHT = 32
_READ_SIZE = 65536
_QOS_GRANTED = {QoS.AT_MOST_ONCE: SubackReturnCode.GRANTED_QOS_0}


@dataclass(frozen=True)
class _Refusal:
    """A CONNECT to refuse: the return code, and why (for the log)."""

    code: ConnectReturnCode
    reason: str


class MqttEndpoint:
    """Runs MQTT sessions for one worker's device gateway over one transport (``MQTT`` over
    TLS, ``MQTT_WS`` over WebSockets: :mod:`provisiond.service.gateway`). An instance is a
    session handler."""

    def __init__(self, gateway: DeviceGateway, transport: Transport, hub: HubEndpoint | None = None) -> None:
        self.gateway = gateway
        self.transport = transport
        self.settings = gateway.ctx.settings
        self.max_packet_size = gateway.max_body_bytes + PACKET_OVERHEAD
        #: The built-in hubs' endpoint: it takes the connections whose CONNECT names a hub.
        self.hub = hub

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
            connect_timeout=endpoint.settings.mqtt_connect_timeout,
            max_idle=endpoint.settings.session_idle_timeout,
            max_inflight=MAX_INFLIGHT,
        )
        self.identity: Credential | None = None
        self.orderly = False  # the device said DISCONNECT, or closed its end: no log line at info
        self.hub: str | None = None  # the built-in hub whose CONNECT this is (its session takes over)
        self.deadline = ReadDeadline()  # created in the task that runs the session

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
                if self.hub is not None:
                    assert self.endpoint.hub is not None
                    await self.endpoint.hub.serve(
                        self.stream, machine, self.hub, str(self.endpoint.transport)
                    )
                    return
                await self._flush()
        except RemoteProtocolError:
            pass  # the machine closed itself and kept the reason
        except StreamClosed as exc:
            machine.close(f"the connection broke while sending ({exc or 'reset'})")
        finally:
            self.deadline.close()
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
        data = await self.deadline.receive(self.stream, _READ_SIZE, self.machine.deadline())
        if data is None:
            self.machine.handle_deadline()
        return data

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
        if any(isinstance(packet, Disconnect) for packet in packets):
            # the machine closed on it already, so the packets before it return early below
            self.orderly = True
        pending = deque(packets)
        while pending:
            packet = pending.popleft()
            if self.machine.state is State.CLOSED:
                return
            if isinstance(packet, Connect):
                hub = self.endpoint.hub
                if hub is not None and (host := await hub.claims(packet)) is not None:
                    self.hub = host  # the rest of the input waits in the machine, paused
                    return
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

    def _identify(self, connect: Connect) -> Credential | _Refusal:
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
                self.endpoint.gateway.check_token(authorization, username.id_scope, registration_id)
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
        return Credential(
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
        answer = await self._answer(request, publish.payload)
        try:
            self.machine.publish(
                response_topic(answer.status, request.rid, answer.retry_after),
                answer.body,
                qos=QoS.AT_LEAST_ONCE,
            )
        except LocalProtocolError as exc:
            self.machine.close(f"too many unacknowledged responses ({exc.message})")

    async def _answer(self, request: RequestTopic, payload: bytes) -> Answer:
        """The gateway's answer to one request (a register, or an operation status)."""
        assert self.identity is not None
        register = request.kind is RequestKind.REGISTER
        call = DeviceCall(
            credential=self.identity,
            operation=Operation.REGISTER if register else Operation.OPERATION_STATUS,
            transport=self.endpoint.transport,
            payload=payload,
            operation_id=request.operation_id,
            peer=self.stream.address,
            describe=f"MQTT {self.who}: {request.kind.value} $rid={request.rid}",
        )
        return await self.endpoint.gateway.answer(call)


# --- listeners -------------------------------------------------------------------------------------


def tls_listener(gateway: DeviceGateway, hub: HubEndpoint | None = None) -> TlsListener:
    """The MQTT listener of a worker: TLS on ``settings.mqtt_port`` (none when it is 0), for DPS
    and the built-in hubs (``hub``). MQTT over WebSockets is served on the HTTPS port by the
    app's WebSocket router (subprotocol ``mqtt``)."""
    return TlsListener(
        name="MQTT",
        handler=MqttEndpoint(gateway, MQTT, hub),
        port=gateway.ctx.settings.mqtt_port,
        flag="--mqtt-port",
        first_request="CONNECT",
    )
