"""The device client's AMQP transport: DPS over AMQP 1.0 on TLS (port 5671) or over WebSockets
(``wss://host:443/$iothub/websocket``, subprotocol ``AMQPWSB10``), device-protocol.md §4, on the
project's own sans-io AMQP layer (:mod:`provisiond.protocol.amqp`).

Like the other transports it carries the flow's requests and decides nothing: every answer
goes back as a :class:`~provisiond.protocol.registration.Reply`. The security provider picks
the SASL layer:

* a SAS token (symmetric key): SASL ``PLAIN``, user ``{idScope}/registrations/{id}``;
* a TLS client certificate (X.509): no SASL at all, the plain AMQP header after TLS;
* a provider that answers TPM challenges: SASL ``TPM``, the client half of
  :mod:`provisiond.protocol.amqp.sasl_tpm` (the service runs the other): the EK goes in
  sasl-init, the SRK answers the first challenge, the activation blob arrives in chunks and is
  activated in the TPM (a worker thread, like the HTTPS challenge), and the last response is
  the SAS token the TPM signs with the key it imported.

One connection serves the whole registration: the first request opens it (TLS, SASL, open,
a session, a sender and a receiver link on ``{idScope}/registrations/{id}``), later ones (polls)
reuse it while it lives. A request is a message with ``iotdps-operation-type`` and a fresh
correlation-id; the service settles it *accepted* and answers on the receiving link (status
200, the body, ``retry-after``), or *rejects* it with DPS's error JSON in the error description
(the status is its ``errorCode // 1000``, as the .NET SDK does, and ``retry-after`` comes from
the error's info). A refused SASL outcome or link becomes a 401/404 reply with the reason, so
the flow reports it like an HTTP refusal.

Errors are translated once, here: cannot connect, TLS refused, or closed before the service's
protocol header -> ConnectError; no answer in time -> TimeoutError; the connection broke or
closed -> TransportError; a malformed frame from the service -> RemoteProtocolError (where the
first bytes are not an AMQP protocol header: "is not an AMQP server", naming them).
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import logging
import os
import ssl
import time
import uuid
from typing import Any, ClassVar

import msgspec

from ..errors import ConnectError, ProvisioningError, RemoteProtocolError, TimeoutError, TransportError
from ..protocol import bounded_json
from ..protocol.amqp import dps
from ..protocol.amqp.connection import Connection, ConnectionConfig, Side
from ..protocol.amqp.events import (
    ConnectionClosed,
    DeliveryUpdated,
    Event,
    LinkAttached,
    LinkDetached,
    LinkId,
    MessageReceived,
    ProtocolHeaderReceived,
    SaslChallengeReceived,
    SaslMechanismsReceived,
    SaslOutcomeReceived,
)
from ..protocol.amqp.performatives import (
    Accepted,
    AmqpValue,
    Data,
    Error,
    Message,
    Properties,
    Rejected,
    Role,
    SaslCode,
    Source,
    Target,
)
from ..protocol.amqp.sasl_tpm import Respond, TpmSaslClient
from ..protocol.amqp.types import Symbol
from ..protocol.messages import TpmChallenge, encode
from ..protocol.registration import Reply, Request, SendRegister, parse_retry_after
from ._stream import WEBSOCKET_PATH, WEBSOCKET_PORT, Channel, StreamTransport
from .security import SecurityProvider
from .transport import DEFAULT_API_VERSION, DEFAULT_SAS_TTL, USER_AGENT, check_options

__all__ = ["AMQP_PORT", "WEBSOCKET_PATH", "WEBSOCKET_PORT", "AmqpTransport"]

logger = logging.getLogger(__name__)

AMQP_PORT = 5671
#: The HTTP-like status of a refusal that carries no DPS error body, by AMQP error condition.
CONDITION_STATUS = {
    "amqp:unauthorized-access": 401,
    "amqp:not-found": 404,
    "amqp:resource-limit-exceeded": 429,
    "amqp:internal-error": 500,
}


class _Refusal(Exception):
    """The service refused the connection or a link (internal): becomes a Reply."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Link:
    """One AMQP connection with its two links, for one registration id."""

    def __init__(self, channel: Channel, machine: Connection, registration_id: str) -> None:
        self.channel = channel
        self.machine = machine
        self.registration_id = registration_id
        self.sender: LinkId | None = None
        self.receiver: LinkId | None = None
        self.attached: set[LinkId] = set()
        self.backlog: list[Event] = []
        #: Whether the service sent an AMQP protocol header (else it may not speak AMQP at all).
        self.heard = False

    @property
    def usable(self) -> bool:
        return not self.machine.finished and not self.channel.closed and len(self.attached) == 2

    async def flush(self) -> None:
        data = self.machine.get_outbound_data()
        if data:
            await self.channel.write(data)


class AmqpTransport(StreamTransport):
    """DPS's AMQP device API (device-protocol.md §4), over TLS or WebSockets.

    :param host: the global endpoint, ``host`` or ``host:port`` (default port 5671, or 443
        with ``websockets``).
    :param id_scope: the service's ID scope.
    :param security: signs SAS tokens (PLAIN), supplies the TLS client certificate (X.509), or
        answers TPM challenges (the TPM mechanism).
    :param websockets: AMQP over WebSockets (``wss://host:port/$iothub/websocket``).
    :param ssl_context: the TLS context to use; the provider's client certificate is loaded
        into it. Give this or ``ca_file``, not both.
    :param ca_file: PEM file of the CAs that may sign the service's certificate.
    :param timeout: seconds for each network operation (connect, handshake, an answer).
    :param api_version: the ``com.microsoft:api-version`` link property.
    :param sas_ttl: lifetime in seconds of the SAS tokens it signs.
    :raises ValueError: a malformed host, or both ``ssl_context`` and ``ca_file``.
    :raises ConfigurationError: the CA file or the client certificate cannot be loaded.
    """

    _protocol: ClassVar[str] = "AMQP"
    _scheme: ClassVar[str] = "amqps"
    _default_port: ClassVar[int] = AMQP_PORT
    _subprotocol: ClassVar[str] = "AMQPWSB10"

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
    ) -> None:
        check_options(id_scope=id_scope, ssl_context=ssl_context, ca_file=ca_file)
        if not timeout > 0 or sas_ttl <= 0:
            raise ValueError("timeout and sas_ttl must be positive.")
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
        self._link: _Link | None = None

    async def send(self, request: Request) -> Reply:
        correlation_id = str(uuid.uuid4())
        properties: dict[str, Any]
        if isinstance(request, SendRegister):
            properties = {
                dps.OPERATION_TYPE: dps.OperationType.REGISTER.value,
                dps.FORCE_REGISTRATION: request.force,
            }
            body = encode(request.body)
        else:
            properties = {
                dps.OPERATION_TYPE: dps.OperationType.GET_OPERATION_STATUS.value,
                dps.OPERATION_ID: request.operation_id,
            }
            body = b""
        message = Message(
            properties=Properties(message_id=str(uuid.uuid4()), correlation_id=correlation_id),
            application_properties=properties,
            body=(Data(body),),
        )
        async with self._lock:
            try:
                async with self._errors_mapped():
                    link = await self._link_for(request)
                    assert link.sender is not None
                    link.machine.send_message(link.sender, message)
                    await link.flush()
                    reply = await self._answer(link, correlation_id)
            except _Refusal as refusal:
                await self._drop()
                return Reply(status=refusal.status, body=msgspec.json.encode({"message": refusal.message}))
            except BaseException:
                await self._drop()
                raise
        logger.debug("%s %s -> %d", self.address, properties[dps.OPERATION_TYPE], reply.status)
        return reply

    async def close(self) -> None:
        async with self._lock:
            link = self._link
            if link is not None and link.usable:
                with contextlib.suppress(ProvisioningError, OSError, ssl.SSLError):
                    link.machine.close()
                    await link.flush()
            await self._drop()

    # --- connecting ----------------------------------------------------------------------------

    def _mechanism(self, request: Request) -> dps.Mechanism | None:
        if self._security.answers_challenges and isinstance(request, SendRegister) and request.body.tpm:
            return dps.Mechanism.TPM
        if self._security.tls_client_certificate() is not None:
            return None
        return dps.Mechanism.PLAIN

    async def _link_for(self, request: Request) -> _Link:
        link = self._link
        if link is not None and link.usable and link.registration_id == request.registration_id:
            return link
        await self._drop()
        mechanism = self._mechanism(request)
        channel = await self._open()
        machine = Connection(
            Side.CLIENT,
            ConnectionConfig(
                container_id=str(uuid.uuid4()),
                hostname=self.host,
                use_sasl=mechanism is not None,
                idle_timeout=None,
                properties={Symbol(dps.CLIENT_VERSION_PROPERTY): USER_AGENT},
            ),
            clock=time.monotonic,
        )
        link = self._link = _Link(channel, machine, request.registration_id)
        if mechanism is None:
            machine.open()
        else:
            await self._authenticate(link, mechanism, request)
        await self._attach(link)
        return link

    async def _authenticate(self, link: _Link, mechanism: dps.Mechanism, request: Request) -> None:
        resource = f"{self.id_scope}/registrations/{request.registration_id}"
        machine = link.machine
        tpm: TpmSaslClient | None = None
        while True:
            for event in await self._events(link):
                if isinstance(event, SaslMechanismsReceived):
                    if mechanism.value not in event.mechanisms:
                        offered = ", ".join(event.mechanisms)
                        raise _Refusal(
                            401, f"The service does not offer SASL {mechanism.value} (it offers {offered})."
                        )
                    if mechanism is dps.Mechanism.PLAIN:
                        token = self._security.sas_token(resource, int(time.time()) + self._sas_ttl) or ""
                        machine.sasl_init(mechanism.value, dps.plain_response(resource, token))
                    else:
                        assert isinstance(request, SendRegister) and request.body.tpm is not None
                        keys = request.body.tpm
                        tpm = TpmSaslClient(
                            self.id_scope,
                            request.registration_id,
                            base64.b64decode(keys.endorsement_key),
                            base64.b64decode(keys.storage_root_key or ""),
                        )
                        machine.sasl_init(mechanism.value, tpm.initial_response())
                elif isinstance(event, SaslChallengeReceived):
                    if tpm is None:  # PLAIN and EXTERNAL have no challenge
                        raise RemoteProtocolError(
                            f"{self.address} sent a SASL challenge to a {mechanism.value} authentication, "
                            "which has none: is it a DPS service?"
                        )
                    machine.sasl_response(await self._tpm_answer(tpm, event.challenge, resource))
                elif isinstance(event, SaslOutcomeReceived):
                    if event.code is not SaslCode.OK:
                        raise _Refusal(
                            401,
                            f"The service refused the SASL {mechanism.value} authentication (outcome "
                            f"{event.code.name.lower()}): check the ID scope, registration id and credential.",
                        )
                    machine.open()
                    await link.flush()
                    return
            await link.flush()

    async def _tpm_answer(self, tpm: TpmSaslClient, challenge: bytes, resource: str) -> bytes:
        """The response to one TPM challenge (:mod:`provisiond.protocol.amqp.sasl_tpm`): the SRK,
        an acknowledgement, or, once the blob is in, the token signed with the key it carried
        (activated in the TPM on a worker thread, like the HTTPS challenge)."""
        step = tpm.receive_challenge(challenge)
        if isinstance(step, Respond):
            return step.data
        blob = base64.b64encode(step.blob).decode("ascii")
        await asyncio.to_thread(self._security.answer_challenge, TpmChallenge(authentication_key=blob))
        token = self._security.sas_token(resource, int(time.time()) + self._sas_ttl) or ""
        return tpm.send_token(token)

    async def _attach(self, link: _Link) -> None:
        machine = link.machine
        for event in await self._events(link, until_opened=True):
            link.backlog.append(event)
        address = f"{self.id_scope}/registrations/{link.registration_id}"
        properties = {Symbol(dps.API_VERSION_PROPERTY): self.api_version}
        channel = machine.begin()
        link.sender = machine.attach(
            channel,
            name=f"sender-{uuid.uuid4()}",
            role=Role.SENDER,
            target=Target(address=address),
            properties=properties,
        )
        link.receiver = machine.attach(
            channel,
            name=f"receiver-{uuid.uuid4()}",
            role=Role.RECEIVER,
            source=Source(address=address),
            properties=properties,
        )
        machine.grant_credit(link.receiver, 8)
        await link.flush()
        give_up = time.monotonic() + self.timeout  # for both answers, whatever else comes
        while len(link.attached) < 2:
            for event in await self._events(link, give_up=give_up):
                if isinstance(event, LinkAttached):
                    link.attached.add(event.link)
                elif isinstance(event, LinkDetached):
                    raise _refused_link(event.error)

    # --- answers -------------------------------------------------------------------------------

    async def _events(
        self, link: _Link, *, until_opened: bool = False, give_up: float | None = None
    ) -> list[Event]:
        """The next events (reading as needed, before ``give_up``: the timeout from now unless
        the caller's wait began earlier); ends the connection on a close."""
        if until_opened and link.machine.opened:
            return []
        if link.backlog and not until_opened:
            events, link.backlog = link.backlog, []
            return events
        await link.flush()
        if give_up is None:
            give_up = time.monotonic() + self.timeout
        collected: list[Event] = []
        while True:
            try:
                async with asyncio.timeout(max(0.0, give_up - time.monotonic())):
                    data = await link.channel.read()
            except builtins.TimeoutError:
                raise TimeoutError(f"{self.address} did not answer within {self.timeout:g} s") from None
            events = link.machine.feed_bytes(data)
            for event in events:
                if isinstance(event, ProtocolHeaderReceived):
                    link.heard = True
                elif isinstance(event, ConnectionClosed):
                    raise _closed(self.address, event, heard=link.heard)
            collected += events
            if until_opened and not link.machine.opened:
                await link.flush()
                continue
            if collected or until_opened:
                return collected

    async def _answer(self, link: _Link, correlation_id: str) -> Reply:
        outcome: Reply | None = None
        accepted = False
        # One timeout for the whole answer: frames that are not it (flow, another request's
        # answer) do not start the wait again, or a service that sent them forever held the
        # device forever.
        give_up = time.monotonic() + self.timeout
        while True:
            for event in await self._events(link, give_up=give_up):
                if isinstance(event, DeliveryUpdated) and event.link == link.sender:
                    if isinstance(event.state, Rejected):
                        outcome = _rejection(event.state.error)
                    elif isinstance(event.state, Accepted):
                        accepted = True
                    elif event.settled:
                        outcome = Reply(status=503, body=b'{"message":"The service released the request."}')
                elif isinstance(event, MessageReceived) and event.link == link.receiver:
                    link.machine.settle(event.link, event.delivery_id, Accepted())
                    properties = event.message.properties
                    if properties is None or properties.correlation_id != correlation_id:
                        logger.debug("dropped an answer to another request (correlation-id %r)", properties)
                        continue
                    outcome = _response(event.message)
                elif isinstance(event, LinkDetached):
                    raise TransportError(
                        f"{self.address} detached a link: {event.error.description if event.error else 'no reason'}"
                    )
            await link.flush()
            if outcome is not None and (accepted or outcome.status >= 300):
                return outcome

    async def _drop(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            with contextlib.suppress(OSError, ssl.SSLError):
                await link.channel.close()

    def _established(self) -> bool:
        link = self._link
        return link is not None and link.machine.opened

    def __repr__(self) -> str:
        return f"<AmqpTransport {self.address} id_scope={self.id_scope!r}>"


def _closed(address: str, event: ConnectionClosed, *, heard: bool) -> ProvisioningError:
    if not heard:  # no AMQP protocol header came back: whatever answered does not speak AMQP
        if event.error is None:
            return ConnectError(
                f"{address} closed the connection instead of sending an AMQP protocol header: "
                "is it an AMQP server?"
            )
        if not event.by_peer:
            return RemoteProtocolError(f"{address} is not an AMQP server. {event.error.description}")
    if event.error is None:
        return TransportError(f"{address} closed the AMQP connection")
    text = f"{address} closed the AMQP connection: {event.error.description} ({event.error.condition})"
    if event.by_peer:
        return TransportError(text)
    return RemoteProtocolError(f"The AMQP exchange with {address} broke: {event.error.description}")


def _refused_link(error: Error | None) -> _Refusal:
    if error is None:
        return _Refusal(404, "The service refused the link.")
    status = CONDITION_STATUS.get(str(error.condition), 400)
    return _Refusal(status, f"The service refused the link: {error.description} ({error.condition})")


def _response(message: Message) -> Reply:
    body = message.data
    if body is None and isinstance(message.body, AmqpValue):
        value = message.body.value
        body = value.encode() if isinstance(value, str) else value if isinstance(value, bytes) else b""
    properties = message.application_properties or {}
    retry_after = next((properties[k] for k in dps.RETRY_AFTER_NAMES if k in properties), None)
    return Reply(status=200, body=body or b"", retry_after=parse_retry_after(_scalar(retry_after)))


def _rejection(error: Error | None) -> Reply:
    """A rejected request as the flow's reply: the status of the DPS error in the description."""
    if error is None:
        return Reply(status=400, body=b'{"message":"The service rejected the request without a reason."}')
    description = (error.description or "").encode("utf-8")
    status = CONDITION_STATUS.get(str(error.condition), 400)
    try:
        document = bounded_json.decode(description, max_depth=bounded_json.REPLY_MAX_DEPTH)
    except msgspec.DecodeError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("errorCode"), int):
        code = document["errorCode"] // 1000
        status = code if 400 <= code <= 599 else status
    else:
        description = msgspec.json.encode({"message": error.description or str(error.condition)})
    info: dict[str, Any] = {str(k): v for k, v in (error.info or {}).items()}
    retry_after = next((info[k] for k in dps.RETRY_AFTER_NAMES if k in info), None)
    return Reply(status=status, body=description, retry_after=parse_retry_after(_scalar(retry_after)))


def _scalar(value: Any) -> str | int | float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float | str):
        return value
    return None
