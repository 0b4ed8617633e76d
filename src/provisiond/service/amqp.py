"""The AMQP 1.0 device endpoint (device-protocol.md §4): over TLS on ``--amqp-port`` (5671),
and over WebSockets on the HTTPS port (``/`` and ``/$iothub/websocket``, subprotocol
``AMQPWSB10``), on the project's own sans-io AMQP layer (:mod:`provisiond.protocol.amqp`).

Theory of operation
-------------------
One :class:`_Session` per connection runs a loop over a :class:`~provisiond.service.streams.ByteStream`:
bytes go into a server :class:`~provisiond.protocol.amqp.connection.Connection`, the events it
returns are answered here, and what it queued is written back. The loop waits for bytes no
longer than the machine's next deadline (its idle timeout, ``--session-idle-timeout``, and the
heartbeats the device's idle-time-out asks for) and never longer than
:data:`HANDSHAKE_TIMEOUT` for the connection to be open. The connection's guard
(:mod:`provisiond.service.guard`) learns when the protocol header is in and whether a frame is
incomplete, so that a device trickling a frame byte by byte is held to the minimum receive rate.

**Who the device is** comes from the SASL layer, or from TLS:

* ``PLAIN`` (symmetric key): user ``{idScope}/registrations/{registrationId}``, password the
  SAS token. The outcome is *ok* when the token is for that scope and id and not expired; its
  signature is checked by the registrar at register time, like over HTTPS and MQTT, so that a
  wrong key reads a rejection with DPS's 401 error rather than a bare SASL failure.
* ``TPM``: sasl-init carries the scope, id and EK; a first challenge asks for the SRK; the
  activation blob (:meth:`~provisiond.attestation.tpm.TpmAttestor.challenge`) goes out in
  chunks; the device's last response is the SAS token signed in its TPM, verified against
  the pending challenge before the outcome is *ok* (the register message then uses the
  challenge, through the registrar, with that token and the EK/SRK of the exchange).
* no SASL at all (X.509: the plain AMQP header after a TLS handshake with a client
  certificate), ``EXTERNAL`` (a client certificate is required) and ``ANONYMOUS``: the
  registration id is the link address's; the registrar checks the presented chain.

**Links**: a sender and a receiver on ``{idScope}/registrations/{registrationId}`` (with or
without ``amqps://host/``); another address, or another device's than SASL named, is refused
(attach with a null terminus, then detach with ``amqp:not-found`` or
``amqp:unauthorized-access``). The device's sending link gets :data:`LINK_CREDIT` and has it
topped up as requests are answered.

**Messages**: ``iotdps-operation-type`` ``iotdps-register`` (body: a data section, or an
amqp-value, with the registration JSON; ``iotdps-forceRegistration``) or
``iotdps-get-operationstatus`` (``iotdps-operation-id``). The request is settled *accepted*
and answered on the device's receiving link with a data section carrying the
RegistrationOperationStatus JSON and the request's correlation-id (``retry-after`` /
``Retry-After`` while assigning). A denial *rejects* the request with ``amqp:...`` error whose
description is DPS's error JSON and whose info carries ``retry-after`` and ``Retry-After``
when the device should come back later (the .NET SDK derives the status from
``errorCode // 1000``). Every close says why in one log line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..attestation import symmetric_key as sk
from ..errors import (
    AmqpProtocolError,
    AuthenticationError,
    BodyTooLargeError,
    InvalidBodyError,
    ProvisioningError,
    RequestError,
    ThrottledError,
)
from ..models import RegistrationStatus
from ..protocol.amqp import dps
from ..protocol.amqp.connection import Connection, ConnectionConfig, Side
from ..protocol.amqp.events import (
    ConnectionClosed,
    ConnectionOpened,
    Event,
    LinkAttached,
    LinkId,
    MessageReceived,
    ProtocolHeaderReceived,
    SaslInitReceived,
    SaslResponseReceived,
)
from ..protocol.amqp.performatives import (
    Accepted,
    AmqpValue,
    Data,
    Error,
    ErrorCondition,
    Message,
    Properties,
    Rejected,
    Role,
    SaslCode,
)
from ..protocol.amqp.session import SessionLimits
from ..protocol.amqp.types import Symbol
from ..protocol.messages import DeviceRegistration, RegistrationOperationStatus, TpmAttestationRequest, encode
from .context import ServiceContext
from .device_api import POLL_AFTER_SECONDS
from .http import decode_body, error_response
from .listeners import STARTERS
from .registrar import DeviceRequest, Registrar
from .streams import WEBSOCKET_HANDLERS, ByteStream, StreamClosed, start_tls_listener

__all__ = ["HANDSHAKE_TIMEOUT", "AmqpEndpoint", "start_amqp"]

log = logging.getLogger("provisiond.amqp")

#: Seconds a connection may take to be open (TLS excluded): SASL and the open exchange.
HANDSHAKE_TIMEOUT = 30.0
#: Requests a device may have in flight on its sending link.
LINK_CREDIT = 16
#: Room for the sections and properties above the largest registration body.
MESSAGE_OVERHEAD = 8 * 1024
_READ_SIZE = 65536
MECHANISMS = tuple(m.value for m in dps.Mechanism)


@dataclass
class _Identity:
    """What SASL (or TLS) established; the link address fills in the rest."""

    mechanism: str | None = None
    address: dps.RegistrationAddress | None = None
    authorization: str | None = None
    tpm: TpmAttestationRequest | None = None
    # TPM exchange state
    tpm_ek: bytes = b""
    tpm_srk: bytes = b""
    tpm_chunks: list[bytes] = field(default_factory=list)


class AmqpEndpoint:
    """Runs AMQP sessions for one worker and one transport label (``amqp`` over TLS,
    ``amqp-ws`` over WebSockets). An instance is a session handler."""

    def __init__(self, ctx: ServiceContext, registrar: Registrar, *, transport: str) -> None:
        self.ctx = ctx
        self.registrar = registrar
        self.transport = transport

    def config(self) -> ConnectionConfig:
        return ConnectionConfig(
            container_id=f"provisiond-{uuid.uuid4()}",
            hostname=self.ctx.settings.host,
            idle_timeout=self.ctx.settings.session_idle_timeout,  # our open's idle-time-out
            sessions=SessionLimits(max_message_size=self.ctx.settings.max_body_bytes + MESSAGE_OVERHEAD),
            sasl_mechanisms=MECHANISMS,
            allow_no_sasl=True,
        )

    async def __call__(self, stream: ByteStream) -> None:
        await _Session(self, stream).run()


class _Session:
    def __init__(self, endpoint: AmqpEndpoint, stream: ByteStream) -> None:
        self.endpoint = endpoint
        self.stream = stream
        self.machine = Connection(Side.SERVER, endpoint.config(), clock=time.monotonic)
        self.identity = _Identity()
        self.senders: dict[dps.RegistrationAddress, LinkId] = {}
        self.receivers: dict[LinkId, dps.RegistrationAddress] = {}
        self.close_reason = "closed"
        self.started = time.monotonic()
        self.aborted = False

    @property
    def who(self) -> str:
        address = self.identity.address
        name = address.registration_id if address else "(unidentified)"
        return f"{self.stream.peer} {name} [{self.endpoint.transport}]"

    # --- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        machine = self.machine
        try:
            while not machine.finished and not self.aborted:
                events = await self._receive()
                await self._handle(events)
                await self._flush()
        except StreamClosed as exc:
            self.close_reason = f"the connection broke while sending ({exc or 'reset'})"
        with contextlib.suppress(StreamClosed):
            await self._flush()
        normal = self.close_reason in ("the device closed the connection", "the device closed the stream")
        log.log(logging.DEBUG if normal else logging.INFO, "AMQP %s: closed: %s", self.who, self.close_reason)

    async def _receive(self) -> list[Event]:
        if self.machine.pending_input:
            self.stream.guard.receiving()
        else:
            self.stream.guard.busy()
        deadlines = [d for d in (self.machine.next_deadline(),) if d is not None]
        if not self.machine.opened:
            deadlines.append(self.started + HANDSHAKE_TIMEOUT)
        timeout = min(deadlines) - time.monotonic() if deadlines else None
        try:
            async with asyncio.timeout(max(0.0, timeout) if timeout is not None else None):
                data = await self.stream.receive(_READ_SIZE)
        except TimeoutError:
            if not self.machine.opened and time.monotonic() >= self.started + HANDSHAKE_TIMEOUT:
                self.close_reason = f"the connection was not open within {HANDSHAKE_TIMEOUT:g} s"
                self.aborted = True
                return []
            return self.machine.tick()
        return self.machine.feed_bytes(data)

    async def _flush(self) -> None:
        data = self.machine.get_outbound_data()
        if data:
            await self.stream.send(data)

    async def _handle(self, events: list[Event]) -> None:
        while events:
            for event in events:
                await self._on_event(event)
            events = self.machine.poll_events()

    async def _on_event(self, event: Event) -> None:
        machine = self.machine
        if isinstance(event, ProtocolHeaderReceived):
            self.stream.guard.head_received()  # the first request, as far as the guard is concerned
        elif isinstance(event, SaslInitReceived):
            await self._on_sasl_init(event)
        elif isinstance(event, SaslResponseReceived):
            await self._on_tpm_response(event.response)
        elif isinstance(event, ConnectionOpened):
            machine.open()
            log.debug("AMQP %s: open (SASL %s)", self.who, machine.sasl_mechanism or "none")
        elif isinstance(event, LinkAttached) and event.answer_needed:
            self._on_attach(event)
        elif isinstance(event, MessageReceived):
            await self._on_message(event)
        elif isinstance(event, ConnectionClosed):
            if event.by_peer:
                self.close_reason = (
                    f"the device closed with {event.error.condition}: {event.error.description}"
                    if event.error
                    else "the device closed the connection"
                )
            elif event.error is not None and self.close_reason == "closed":
                self.close_reason = f"{event.error.description} ({event.error.condition})"

    # --- SASL ----------------------------------------------------------------------------------

    def _sasl_fail(self, why: str, code: SaslCode = SaslCode.AUTH) -> None:
        self.close_reason = f"SASL {self.identity.mechanism} refused: {why}"
        self.machine.sasl_outcome(code)

    async def _on_sasl_init(self, init: SaslInitReceived) -> None:
        identity = self.identity
        identity.mechanism = str(init.mechanism)[:40]
        ctx = self.endpoint.ctx
        try:
            mechanism = dps.Mechanism(str(init.mechanism))
        except ValueError:
            self._sasl_fail("not a mechanism this service offered")
            return
        try:
            if mechanism is dps.Mechanism.PLAIN:
                username, password = dps.parse_plain(init.initial_response)
                identity.address = dps.parse_registration_address(username)
                sk.check_device_token(
                    password,
                    identity.address.id_scope,
                    identity.address.registration_id,
                    now=int(ctx.clock()),
                    clock_skew=ctx.settings.clock_skew,
                )
                identity.authorization = password
            elif mechanism is dps.Mechanism.TPM:
                tpm_init = dps.parse_tpm_init(init.initial_response)
                identity.address = dps.RegistrationAddress(tpm_init.id_scope, tpm_init.registration_id)
                identity.tpm_ek = tpm_init.endorsement_key
                self.machine.sasl_challenge(b"\x00")  # send the SRK
                return
            elif mechanism is dps.Mechanism.EXTERNAL and not self.stream.client_chain:
                raise AmqpProtocolError("EXTERNAL needs a client certificate in the TLS handshake.")
        except (AmqpProtocolError, ProvisioningError) as exc:
            self._sasl_fail(exc.message)
            return
        self.machine.sasl_outcome(SaslCode.OK)

    async def _on_tpm_response(self, response: bytes) -> None:
        identity = self.identity
        if identity.mechanism != dps.Mechanism.TPM.value or identity.address is None:
            self._sasl_fail("a SASL response outside the TPM exchange")
            return
        address = identity.address
        tpm = self.endpoint.registrar.tpm
        limiter = self.endpoint.ctx.limiter  # TPM attestation happens here, not in the registrar
        try:
            if not identity.tpm_srk:  # the answer to the first challenge: 0x00 ‖ SRK
                if not response.startswith(b"\x00") or len(response) < 2:
                    raise AmqpProtocolError("The TPM response to the first challenge is 0x00 ‖ SRK.")
                identity.tpm_srk = response[1:]
                limiter.check_source(self.stream.address)
                blob = await tpm.challenge(address.registration_id, identity.tpm_ek, identity.tpm_srk)
                identity.tpm_chunks = dps.chunk_activation_blob(blob.marshal())
                self.machine.sasl_challenge(identity.tpm_chunks.pop(0))
            elif identity.tpm_chunks:  # an interim chunk was acknowledged
                self.machine.sasl_challenge(identity.tpm_chunks.pop(0))
            else:  # 0x00 ‖ SAS token signed in the TPM
                token_text = response[1:].decode("utf-8")
                ctx = self.endpoint.ctx
                token = sk.check_device_token(
                    token_text,
                    address.id_scope,
                    address.registration_id,
                    now=int(ctx.clock()),
                    clock_skew=ctx.settings.clock_skew,
                )
                await tpm.authenticate(token, address.registration_id, consume=False)
                identity.authorization = token_text
                identity.tpm = TpmAttestationRequest(
                    endorsement_key=_b64(identity.tpm_ek), storage_root_key=_b64(identity.tpm_srk)
                )
                self.machine.sasl_outcome(SaslCode.OK)
        except UnicodeDecodeError:
            self._sasl_fail("the SAS token is not UTF-8")
        except ThrottledError as exc:
            self._sasl_fail(exc.message, SaslCode.SYS_TEMP)
        except AuthenticationError as exc:
            limiter.failed(self.stream.address)
            self._sasl_fail(exc.message)
        except (AmqpProtocolError, ProvisioningError) as exc:
            self._sasl_fail(exc.message)

    # --- links ---------------------------------------------------------------------------------

    def _on_attach(self, event: LinkAttached) -> None:
        remote = event.remote
        terminus = remote.target if event.role is Role.RECEIVER else remote.source
        try:
            address = dps.parse_registration_address(getattr(terminus, "address", None))
        except AmqpProtocolError as exc:
            self._refuse_link(event.link, ErrorCondition.NOT_FOUND, exc.message)
            return
        known = self.identity.address
        if known is not None and (
            known.registration_id.lower() != address.registration_id.lower()
            or known.id_scope.lower() != address.id_scope.lower()
        ):
            self._refuse_link(
                event.link,
                ErrorCondition.UNAUTHORIZED_ACCESS,
                f"The link is for {address}, but the connection authenticated {known}.",
            )
            return
        self.identity.address = known or address
        self.machine.accept_link(event.link)
        if event.role is Role.RECEIVER:
            self.receivers[event.link] = address
            self.machine.grant_credit(event.link, LINK_CREDIT)
        else:
            self.senders[address] = event.link
        log.debug("AMQP %s: attached %s link %r", self.who, event.role.name.lower(), remote.name)

    def _refuse_link(self, link: LinkId, condition: str, why: str) -> None:
        log.info("AMQP %s: refused a link: %s", self.who, why)
        self.machine.refuse_link(link, Error(condition=Symbol(condition), description=why))

    # --- messages ------------------------------------------------------------------------------

    async def _on_message(self, event: MessageReceived) -> None:
        address = self.receivers.get(event.link)
        if address is None:
            return
        message = event.message
        properties = message.properties or Properties()
        app = message.application_properties or {}
        operation = app.get(dps.OPERATION_TYPE)
        outcome = await self._answer(address, operation, app, message)
        if isinstance(outcome, Rejected):
            if not event.settled:
                self.machine.settle(event.link, event.delivery_id, outcome)
        else:
            if not event.settled:
                self.machine.settle(event.link, event.delivery_id, Accepted())
            self._respond(address, properties.correlation_id, outcome)
        if self.machine.credit(event.link) < LINK_CREDIT // 2:
            self.machine.grant_credit(event.link, LINK_CREDIT)

    def _respond(
        self, address: dps.RegistrationAddress, correlation_id: Any, result: RegistrationOperationStatus
    ) -> None:
        sender = self.senders.get(address)
        if sender is None:
            log.info("AMQP %s: no receiving link to answer on; the answer is dropped", self.who)
            return
        properties: dict[str, Any] = {}
        if result.status is RegistrationStatus.ASSIGNING:
            properties = {name: POLL_AFTER_SECONDS for name in dps.RETRY_AFTER_NAMES}
        self.machine.send_message(
            sender,
            Message(
                properties=Properties(message_id=str(uuid.uuid4()), correlation_id=correlation_id),
                application_properties=properties or None,
                body=(Data(encode(result)),),
            ),
        )

    async def _answer(
        self, address: dps.RegistrationAddress, operation: Any, app: dict[str, Any], message: Message
    ) -> RegistrationOperationStatus | Rejected:
        endpoint = self.endpoint
        try:
            if operation == dps.OperationType.REGISTER:
                device = self._device_request(
                    address, _body_of(message, endpoint.ctx.settings.max_body_bytes), app
                )
                return await endpoint.registrar.register(device)
            if operation == dps.OperationType.GET_OPERATION_STATUS:
                operation_id = app.get(dps.OPERATION_ID)
                if not isinstance(operation_id, str) or not operation_id:
                    raise InvalidBodyError(
                        f"A status request needs the {dps.OPERATION_ID} application property."
                    )
                device = self._device_request(address, DeviceRegistration(), app)
                return await endpoint.registrar.operation_status(device, operation_id)
            raise RequestError(
                f"{dps.OPERATION_TYPE} {str(operation)[:60]!r} is not {dps.OperationType.REGISTER.value} or "
                f"{dps.OperationType.GET_OPERATION_STATUS.value}."
            )
        except ProvisioningError as exc:
            return self._rejection(str(operation), exc)
        except Exception:
            log.exception("AMQP %s: internal error answering %s", self.who, operation)
            return self._rejection(
                str(operation), ProvisioningError("Internal error; the service log has the details.")
            )

    def _device_request(
        self, address: dps.RegistrationAddress, body: DeviceRegistration, app: dict[str, Any]
    ) -> DeviceRequest:
        identity = self.identity
        if identity.tpm is not None and body.tpm is None:  # .NET sends no EK/SRK in the body
            body = msgspec.structs.replace(body, tpm=identity.tpm)
        return DeviceRequest(
            id_scope=address.id_scope,
            registration_id=address.registration_id,
            body=body,
            authorization=identity.authorization,
            client_chain=self.stream.client_chain,
            force=app.get(dps.FORCE_REGISTRATION) is True,
            transport=self.endpoint.transport,
            source=self.stream.address,
        )

    def _rejection(self, operation: str, exc: ProvisioningError) -> Rejected:
        tid = str(uuid.uuid4())
        level = logging.ERROR if exc.http_status >= 500 else logging.INFO
        log.log(
            level,
            "AMQP %s: %s -> %d %d: %s [trackingId=%s]",
            self.who,
            operation[:60],
            exc.http_status,
            exc.error_code,
            exc.message,
            tid,
        )
        body = bytes(error_response(exc, tid).body).decode("utf-8")
        info: dict[Symbol, Any] = {}
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int):
            info = {Symbol(name): retry_after for name in dps.RETRY_AFTER_NAMES}
        condition = (
            ErrorCondition.UNAUTHORIZED_ACCESS
            if exc.http_status in (401, 403)
            else ErrorCondition.NOT_ALLOWED
        )
        if exc.http_status == 404:
            condition = ErrorCondition.NOT_FOUND
        elif exc.http_status == 429:
            condition = ErrorCondition.RESOURCE_LIMIT_EXCEEDED
        elif exc.http_status >= 500:
            condition = ErrorCondition.INTERNAL_ERROR
        return Rejected(error=Error(condition=Symbol(condition), description=body, info=info or None))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _body_of(message: Message, limit: int) -> DeviceRegistration:
    """The registration body: data sections, or an amqp-value (string or binary) of JSON."""
    raw = message.data
    if raw is None and isinstance(message.body, AmqpValue) and isinstance(message.body.value, str | bytes):
        value = message.body.value
        raw = value.encode("utf-8") if isinstance(value, str) else value
    if not raw or not raw.strip():
        return DeviceRegistration()
    if len(raw) > limit:
        raise BodyTooLargeError(f"The registration body ({len(raw)} bytes) exceeds the {limit}-byte limit.")
    return decode_body(raw, DeviceRegistration, "device registration")


# --- listeners -------------------------------------------------------------------------------------


async def start_amqp(ctx: ServiceContext, registrar: Registrar) -> asyncio.Server | None:
    """The AMQP listeners of this worker: WebSockets on the HTTPS port (always), and TLS on
    ``settings.amqp_port`` unless it is 0.

    :raises ConfigurationError: the port cannot be bound (the worker does not start).
    """
    WEBSOCKET_HANDLERS["amqpwsb10"] = AmqpEndpoint(ctx, registrar, transport="amqp-ws")
    settings = ctx.settings
    return await start_tls_listener(
        settings,
        AmqpEndpoint(ctx, registrar, transport="amqp"),
        port=settings.amqp_port,
        name="AMQP",
        flag="--amqp-port",
        first_request="protocol header",
    )


STARTERS.append(start_amqp)
