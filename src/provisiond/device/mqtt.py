"""The device client's MQTT transport: DPS over MQTT 3.1.1 on TLS (port 8883) or over
WebSockets (``wss://host:443/$iothub/websocket``, subprotocol ``mqtt``), device-protocol.md §3.

It carries the flow's requests like :class:`~provisiond.device.transport.HttpsTransport`:
it makes no decisions (polling, retries and backoff live in
:mod:`provisiond.protocol.registration`) and hands every answer back as a
:class:`~provisiond.protocol.registration.Reply` whose status is the one in the response topic,
with the topic's ``retry-after``.

One connection serves the device's whole registration (register, then polls): the first
request opens it and sends CONNECT, SUBSCRIBE ``$dps/registrations/res/#`` and the PUBLISH in
one write (MQTT lets a client pipeline behind its CONNECT), so a registration costs one round
trip after the TLS handshake. Requests go one at a time, each with its own ``$rid``; answers
to other rids (a late answer to a request that timed out) are acknowledged and dropped.
While the flow sleeps the connection idles; if it idled past its keep-alive, or the service
closed it, the next request opens a new one. :meth:`MqttTransport.close` sends DISCONNECT.

Errors are translated once, at this boundary: cannot connect, TLS refused, or closed before
the CONNACK -> :class:`~provisiond.errors.ConnectError`; no answer in time ->
:class:`~provisiond.errors.TimeoutError`; the connection broke ->
:class:`~provisiond.errors.TransportError`; a malformed packet or topic from the service ->
:class:`~provisiond.errors.RemoteProtocolError` (before the CONNACK: "is not an MQTT server",
naming the first bytes that came instead, e.g. an HTTPS port's ``HTTP/1.1 400``). A refusing CONNACK is the service's answer,
so it becomes a :class:`Reply` with the HTTP-like status of :data:`CONNACK_STATUS` (4 and 5:
401, refused by the flow with the reason; 3: 503, retried with backoff).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import logging
import os
import ssl
import time
from typing import ClassVar

import msgspec

from ..errors import ConnectError, RemoteProtocolError, TimeoutError, TransportError
from ..protocol.messages import encode
from ..protocol.mqtt import (
    Connack,
    ConnectReturnCode,
    Lapse,
    MqttConnection,
    Packet,
    Publish,
    QoS,
    Role,
    State,
    Suback,
    SubackReturnCode,
    Subscription,
)
from ..protocol.registration import Reply, Request, SendRegister, parse_retry_after
from ..protocol.topics import (
    RESPONSE_FILTER,
    build_username,
    parse_response_topic,
    register_topic,
    status_topic,
)
from ._stream import WEBSOCKET_PATH, WEBSOCKET_PORT, Channel, StreamTransport
from .security import SecurityProvider
from .transport import DEFAULT_API_VERSION, DEFAULT_SAS_TTL, USER_AGENT, check_options

__all__ = [
    "CONNACK_STATUS",
    "DEFAULT_KEEP_ALIVE",
    "MQTT_PORT",
    "WEBSOCKET_PATH",
    "WEBSOCKET_PORT",
    "MqttTransport",
]

logger = logging.getLogger(__name__)

MQTT_PORT = 8883
#: Seconds between the client's keep-alive pings (the Python SDK's default).
DEFAULT_KEEP_ALIVE = 60
#: A refusing CONNACK as the HTTP-like status the registration flow understands.
CONNACK_STATUS: dict[ConnectReturnCode, int] = {
    ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION: 400,
    ConnectReturnCode.IDENTIFIER_REJECTED: 400,
    ConnectReturnCode.SERVER_UNAVAILABLE: 503,
    ConnectReturnCode.BAD_USERNAME_OR_PASSWORD: 401,
    ConnectReturnCode.NOT_AUTHORIZED: 401,
}
_CONNACK_TEXT = {
    ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION: "it does not speak MQTT 3.1.1",
    ConnectReturnCode.IDENTIFIER_REJECTED: "it rejected the client id (the registration id)",
    ConnectReturnCode.SERVER_UNAVAILABLE: "it is unavailable",
    ConnectReturnCode.BAD_USERNAME_OR_PASSWORD: "bad user name or password (the ID scope, registration id or SAS token)",
    ConnectReturnCode.NOT_AUTHORIZED: "not authorized (no credential it accepts)",
}


class _Connection:
    """One MQTT connection: the channel and the client machine."""

    def __init__(self, channel: Channel, machine: MqttConnection, registration_id: str) -> None:
        self.channel = channel
        self.machine = machine
        self.registration_id = registration_id

    @property
    def usable(self) -> bool:
        deadline = self.machine.deadline()
        idle_too_long = deadline is not None and time.monotonic() >= deadline
        return self.machine.state is not State.CLOSED and not self.channel.closed and not idle_too_long

    async def flush(self) -> None:
        data = self.machine.get_outbound_data()
        if data:
            await self.channel.write(data)


class MqttTransport(StreamTransport):
    """DPS's MQTT device API (device-protocol.md §3), over TLS or WebSockets.

    :param host: the global endpoint, ``host`` or ``host:port`` (default port 8883, or 443
        with ``websockets``).
    :param id_scope: the service's ID scope.
    :param security: signs SAS tokens (the CONNECT password) or supplies the TLS client
        certificate (X.509).
    :param websockets: MQTT over WebSockets (``wss://host:port/$iothub/websocket``).
    :param ssl_context: the TLS context to use; the security provider's client certificate is
        loaded into it. Give this or ``ca_file``, not both.
    :param ca_file: PEM file of the CAs that may sign the service's certificate (default: the
        system's trust store).
    :param timeout: seconds for each network operation (connect, TLS handshake, an answer).
    :param api_version: the ``api-version`` in the CONNECT user name.
    :param sas_ttl: lifetime in seconds of the SAS tokens it signs.
    :param keep_alive: the MQTT keep-alive interval in seconds (0: none).
    :raises ValueError: a malformed host, or both ``ssl_context`` and ``ca_file``.
    :raises ConfigurationError: the CA file or the client certificate cannot be loaded.
    """

    _protocol: ClassVar[str] = "MQTT"
    _scheme: ClassVar[str] = "mqtts"
    _default_port: ClassVar[int] = MQTT_PORT
    _subprotocol: ClassVar[str] = "mqtt"

    def __init__(
        self,
        *,
        host: str,
        id_scope: str,
        security: SecurityProvider,
        websockets: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
        api_version: str = DEFAULT_API_VERSION,
        sas_ttl: int = DEFAULT_SAS_TTL,
        keep_alive: int = DEFAULT_KEEP_ALIVE,
    ) -> None:
        check_options(id_scope=id_scope, ssl_context=ssl_context, ca_file=ca_file)
        if not timeout > 0 or sas_ttl <= 0 or not 0 <= keep_alive <= 0xFFFF:
            raise ValueError("timeout and sas_ttl must be positive, keep_alive 0 to 65535.")
        super().__init__(
            host=host,
            id_scope=id_scope,
            security=security,
            websockets=websockets,
            ssl_context=ssl_context,
            ca_file=ca_file,
            timeout=timeout,
            api_version=api_version,
            sas_ttl=sas_ttl,
        )
        self.keep_alive = keep_alive
        self._connection: _Connection | None = None
        self._rids = itertools.count(1)

    async def send(self, request: Request) -> Reply:
        rid = str(next(self._rids))
        if isinstance(request, SendRegister):
            if request.force:
                # No SDK sends forceRegistration over MQTT, and DPS documents no topic property for it.
                logger.warning("force=True is not carried over MQTT; registering without it")
            topic, payload = register_topic(rid), encode(request.body)
        else:
            topic, payload = status_topic(rid, request.operation_id), b""
        async with self._lock:
            try:
                async with self._errors_mapped():
                    connection = await self._connection_for(request.registration_id)
                    connection.machine.publish(topic, payload, qos=QoS.AT_LEAST_ONCE)
                    await connection.flush()
                    reply = await self._response(connection, rid)
            except BaseException:
                await self._drop()
                raise
            if connection.machine.state is State.CLOSED:  # the CONNACK refused
                await self._drop()
        logger.debug("%s %s -> %d", self.address, topic, reply.status)
        return reply

    async def close(self) -> None:
        async with self._lock:
            connection = self._connection
            if connection is not None and connection.usable:
                connection.machine.disconnect()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await connection.flush()
            await self._drop()

    # --- internals -------------------------------------------------------------------------------

    async def _connection_for(self, registration_id: str) -> _Connection:
        connection = self._connection
        if connection is not None and connection.usable and connection.registration_id == registration_id:
            return connection
        await self._drop()
        channel = await self._open()
        machine = MqttConnection(Role.CLIENT, clock=time.monotonic)
        resource = f"{self.id_scope}/registrations/{registration_id}"
        token = self._security.sas_token(resource, int(time.time()) + self._sas_ttl)
        machine.connect(
            client_id=registration_id,
            username=build_username(
                self.id_scope, registration_id, api_version=self.api_version, client_version=USER_AGENT
            ),
            password=token.encode() if token else None,
            keep_alive=self.keep_alive,
        )
        machine.subscribe([Subscription(topic_filter=RESPONSE_FILTER, qos=QoS.AT_LEAST_ONCE)])
        self._connection = _Connection(channel, machine, registration_id)
        return self._connection

    async def _response(self, connection: _Connection, rid: str) -> Reply:
        """Read until the answer to ``rid`` arrives, pinging while waiting."""
        machine = connection.machine
        give_up = time.monotonic() + self.timeout
        while True:
            ping_at = machine.deadline()
            until = give_up if ping_at is None else min(give_up, ping_at)
            try:
                async with asyncio.timeout(max(0.0, until - time.monotonic())):
                    data = await connection.channel.read()
            except builtins.TimeoutError:
                if time.monotonic() >= give_up:
                    raise TimeoutError(
                        f"{self.address} did not answer request $rid={rid} within {self.timeout:g} s"
                    ) from None
                if machine.handle_deadline() is Lapse.KEEP_ALIVE:
                    raise TransportError(f"{self.address} stopped answering pings") from None
                await connection.flush()
                continue
            connecting = machine.state is State.CONNECTING
            if not data:
                if connecting:
                    raise ConnectError(
                        f"{self.address} closed the connection instead of answering the MQTT CONNECT: "
                        "is it an MQTT server?"
                    )
                raise TransportError(f"{self.address} closed the MQTT connection before answering $rid={rid}")
            try:
                packets = machine.feed_bytes(data)
            except RemoteProtocolError as exc:
                if connecting:  # before the CONNACK: whatever answered does not speak MQTT
                    raise RemoteProtocolError(f"{self.address} is not an MQTT server. {exc.message}") from exc
                raise RemoteProtocolError(f"{self.address} broke the MQTT protocol: {exc.message}") from exc
            reply = self._answer(packets, rid, machine)
            await connection.flush()  # PUBACKs
            if reply is not None:
                return reply

    def _answer(self, packets: list[Packet], rid: str, machine: MqttConnection) -> Reply | None:
        reply = None
        for packet in packets:
            if isinstance(packet, Connack) and packet.return_code is not ConnectReturnCode.ACCEPTED:
                return _refusal(packet.return_code)  # nothing else comes on this connection
            if isinstance(packet, Suback) and SubackReturnCode.FAILURE in packet.return_codes:
                raise RemoteProtocolError(f"{self.address} refused the subscription to {RESPONSE_FILTER}.")
            if isinstance(packet, Publish):
                machine.acknowledge(packet)
                response = parse_response_topic(packet.topic)
                if response.rid == rid:
                    reply = Reply(
                        status=response.status,
                        body=packet.payload,
                        retry_after=parse_retry_after(response.retry_after),
                    )
                else:
                    logger.debug("dropped an answer to $rid=%s while waiting for %s", response.rid, rid)
        return reply

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.channel.close()

    def _established(self) -> bool:
        connection = self._connection
        return connection is not None and connection.machine.state is State.CONNECTED

    def __repr__(self) -> str:
        return f"<MqttTransport {self.address} id_scope={self.id_scope!r}>"


def _refusal(code: ConnectReturnCode) -> Reply:
    """A refusing CONNACK as the flow's reply: the HTTP-like status and a body with the reason."""
    message = (
        f"The service refused the MQTT connection: {_CONNACK_TEXT[code]} (CONNACK return code {int(code)})"
    )
    return Reply(status=CONNACK_STATUS[code], body=msgspec.json.encode({"message": message}))
