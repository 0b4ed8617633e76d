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
:data:`HANDSHAKE_TIMEOUT` for the connection to be open. The deadline is kept by one timer
per connection (:class:`~provisiond.service._deadline.ReadDeadline`, shared with MQTT), moved only when a read's deadline is earlier than
the timer: a deadline that moves later (every read, for the idle timeout) costs nothing until
the timer fires and finds it later.

A connection starts on the **fast path** (:mod:`provisiond.protocol.amqp.fastpath`): the frames
of the official SDKs' provisioning script are answered in one pass, without the general
machines, and the steps that need this endpoint (the SASL mechanism, a link's address, a
request) go through the same checks and answers as the machine's events. Anything else (a
refusal, TPM, a deadline, a frame the script does not have) hands the connection over to a
:class:`~provisiond.protocol.amqp.connection.Connection` in the same state (its input
replayed), and the loop above carries on: the device sees the same bytes and the log the
same lines either way (``AmqpEndpoint(..., fast_path=False)`` runs the machine from the
start). The connection's guard
(:mod:`provisiond.service.guard`) learns when the protocol header is in and whether a frame is
incomplete, so that a device trickling a frame byte by byte is held to the minimum receive rate.

**Who the device is** comes from the SASL layer, or from TLS:

* ``PLAIN`` (symmetric key): user ``{idScope}/registrations/{registrationId}``, password the
  SAS token. The outcome is *ok* when the token is for that scope and id and not expired; its
  signature is checked by the registrar at register time, like over HTTPS and MQTT, so that a
  wrong key reads a rejection with DPS's 401 error rather than a bare SASL failure.
* ``TPM``: the exchange is the sans-io :class:`~provisiond.protocol.amqp.sasl_tpm.TpmSaslServer`
  (the device client runs its other half): sasl-init carries the scope, id and EK; a first
  challenge asks for the SRK; the activation blob (the gateway's
  :meth:`~provisiond.service.gateway.DeviceGateway.tpm_challenge`) goes out in chunks; the
  device's last response is the SAS token signed in its TPM, verified against the pending
  challenge (:meth:`~provisiond.service.gateway.DeviceGateway.tpm_authenticate`) before the
  outcome is *ok* (the register message then uses the challenge, through the registrar, with
  that token and the EK/SRK of the exchange).
* no SASL at all (X.509: the plain AMQP header after a TLS handshake with a client
  certificate), ``EXTERNAL`` (a client certificate is required) and ``ANONYMOUS``: the
  registration id is the link address's; the registrar checks the presented chain.

**Links**: a sender and a receiver on ``{idScope}/registrations/{registrationId}`` (with or
without ``amqps://host/``); another address, or another device's than SASL named, is refused
(attach with a null terminus, then detach with ``amqp:not-found`` or
``amqp:unauthorized-access``). The device's sending link gets :data:`LINK_CREDIT` and has it
topped up as requests are answered.

**Messages**: ``iotdps-operation-type`` ``iotdps-register`` (body: a data section, or an
amqp-value, with the registration JSON; ``iotdps-forceRegistration`` is accepted and changes
nothing, as in DPS) or ``iotdps-get-operationstatus`` (``iotdps-operation-id``), each answered
by the device gateway (:mod:`provisiond.service.gateway`). The request is settled *accepted*
and answered on the device's receiving link with a data section carrying the
RegistrationOperationStatus JSON and the request's correlation-id (``retry-after`` /
``Retry-After`` while assigning). A denial *rejects* the request with ``amqp:...`` error whose
description is DPS's error JSON and whose info carries ``retry-after`` and ``Retry-After``
when the device should come back later (the .NET SDK derives the status from
``errorCode // 1000``). Every close says why in one log line.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..errors import (
    AmqpProtocolError,
    InvalidBodyError,
    MessageTooLargeError,
    ProvisioningError,
    RequestError,
    ThrottledError,
)
from ..protocol.amqp import dps
from ..protocol.amqp.connection import Connection, ConnectionConfig, Side
from ..protocol.amqp.events import (
    ConnectionClosed,
    ConnectionOpened,
    Event,
    LinkAttached,
    LinkDetached,
    LinkId,
    MessageReceived,
    ProtocolHeaderReceived,
    SaslInitReceived,
    SaslResponseReceived,
    SessionEnded,
)
from ..protocol.amqp.fastpath import (
    HEADER,
    OPENED,
    AttachStep,
    ClosedStep,
    MessageStep,
    Reply,
    SaslInitStep,
    SdkPath,
    deliver,
)
from ..protocol.amqp.performatives import (
    Accepted,
    AmqpValue,
    Attach,
    DeliveryState,
    Error,
    ErrorCondition,
    Message,
    Properties,
    Rejected,
    Role,
    SaslCode,
)
from ..protocol.amqp.sasl_tpm import MakeBlob, SendChallenge, TokenReceived, TpmSaslServer
from ..protocol.amqp.session import SessionLimits
from ..protocol.amqp.types import Symbol
from ..protocol.messages import TpmAttestationRequest
from ._deadline import ReadDeadline
from .gateway import AMQP, Answer, Credential, DeviceCall, DeviceGateway, Operation, Transport
from .listeners import TlsListener
from .streams import ByteStream, StreamClosed

__all__ = ["HANDSHAKE_TIMEOUT", "AmqpEndpoint", "tls_listener"]

log = logging.getLogger("provisiond.amqp")

#: Seconds a connection may take to be open (TLS excluded): SASL and the open exchange.
HANDSHAKE_TIMEOUT = 30.0
#: Requests a device may have in flight on its sending link.
LINK_CREDIT = 16
#: The debug line of a connection the fast path hands over to the general machine.
HANDED_OVER = "handed over to the general machine"
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
    #: The EK and SRK a SASL TPM exchange proved (its token is ``authorization``).
    tpm: TpmAttestationRequest | None = None
    tpm_exchange: TpmSaslServer | None = None


#: The AMQP error condition a refusal is rejected with, by status (else ``amqp:not-allowed``).
_CONDITIONS = {
    401: ErrorCondition.UNAUTHORIZED_ACCESS,
    403: ErrorCondition.UNAUTHORIZED_ACCESS,
    404: ErrorCondition.NOT_FOUND,
    429: ErrorCondition.RESOURCE_LIMIT_EXCEEDED,
}
#: What ``iotdps-operation-type`` asks for.
_OPERATIONS = {
    dps.OperationType.REGISTER.value: Operation.REGISTER,
    dps.OperationType.GET_OPERATION_STATUS.value: Operation.OPERATION_STATUS,
}


class AmqpEndpoint:
    """Runs AMQP sessions for one worker's device gateway over one transport (``AMQP`` over
    TLS, ``AMQP_WS`` over WebSockets: :mod:`provisiond.service.gateway`). An instance is a
    session handler."""

    def __init__(self, gateway: DeviceGateway, transport: Transport, *, fast_path: bool = True) -> None:
        self.gateway = gateway
        #: Whether connections start on the one-pass path for the SDKs' script
        #: (:mod:`provisiond.protocol.amqp.fastpath`), handed over to the general machine on
        #: anything else.
        self.fast_path = fast_path
        self.transport = transport
        self.settings = gateway.ctx.settings
        #: Our side of every connection (immutable, so shared): this endpoint is one container.
        self.config = ConnectionConfig(
            container_id=f"provisiond-{uuid.uuid4()}",
            hostname=self.settings.host,
            idle_timeout=self.settings.session_idle_timeout,  # our open's idle-time-out
            sessions=SessionLimits(max_message_size=self.gateway.max_body_bytes + MESSAGE_OVERHEAD),
            sasl_mechanisms=MECHANISMS,
            allow_no_sasl=True,
        )

    async def __call__(self, stream: ByteStream) -> None:
        await _Session(self, stream).run()


class _Session:
    def __init__(self, endpoint: AmqpEndpoint, stream: ByteStream) -> None:
        self.endpoint = endpoint
        self.stream = stream
        self.machine: Connection
        self.fast: SdkPath | None = None
        if endpoint.fast_path:
            self.fast = SdkPath(endpoint.config, credit=LINK_CREDIT, clock=time.monotonic)
        else:
            self.machine = Connection(Side.SERVER, endpoint.config, clock=time.monotonic)
        self.identity = _Identity()
        self.senders: dict[dps.RegistrationAddress, LinkId] = {}
        self.receivers: dict[LinkId, dps.RegistrationAddress] = {}
        self.refused: set[LinkId] = set()  # links refused with their own log line
        self.close_reason = "closed"
        self.started = time.monotonic()
        self.aborted = False
        self.deadline = ReadDeadline()  # created in the task that runs the session

    @property
    def who(self) -> str:
        address = self.identity.address
        name = address.registration_id if address else "(unidentified)"
        return f"{self.stream.peer} {name} [{self.endpoint.transport}]"

    # --- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if self.fast is None or await self._run_fast():
                machine = self.machine
                while not machine.finished and not self.aborted:
                    events = await self._receive()
                    await self._handle(events)
                    await self._flush()
        except StreamClosed as exc:
            self.close_reason = f"the connection broke while sending ({exc or 'reset'})"
        finally:
            self.deadline.close()
        with contextlib.suppress(StreamClosed):
            await self._flush()
        self._log_close()

    def _log_close(self) -> None:
        normal = self.close_reason in ("the device closed the connection", "the device closed the stream")
        level = logging.DEBUG if normal else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "AMQP %s: closed: %s", self.who, self.close_reason)

    # --- the fast path (the SDKs' script) ------------------------------------------------------

    async def _run_fast(self) -> bool:
        """Serve the connection on the fast path; True once it is handed over to the machine
        (which then carries on), False when the connection is over."""
        fast = self.fast
        assert fast is not None
        while not fast.finished and not self.aborted:
            data = await self._read(fast)
            if data is None:
                if self.aborted:
                    return False
                await self._hand_over()  # a heartbeat or the idle timeout: the machine's
                await self._handle(self.machine.tick())
                await self._flush()
                return True
            if not data:
                self._closed_by_peer(None)
                fast.ended()
                return False
            fast.receive(data)
            if not await self._fast_steps(fast):
                await self._hand_over()
                await self._flush()
                return True
            await self._flush()
        return False

    async def _fast_steps(self, fast: SdkPath) -> bool:
        """Answer the fast path's steps until it needs bytes; False to hand over."""
        while True:
            step = fast.next()
            if step is None:
                return True
            if step is False:
                return False
            kind = type(step)
            if step is HEADER:
                self.stream.guard.head_received()
            elif kind is MessageStep:
                assert isinstance(step, MessageStep)
                address = self.receivers[step.link]
                state, sender, message = await self._answer_message(address, step.message, step.settled)
                if not fast.answer(state, sender, message):
                    return False
            elif kind is AttachStep:
                assert isinstance(step, AttachStep)
                found = self._link_address(step.role, step.remote)
                if isinstance(found, tuple):
                    return False  # refused the general way, with its log line
                fast.accept_link()
                self._attached(step.link, step.role, step.remote, found)
            elif kind is SaslInitStep:
                assert isinstance(step, SaslInitStep)
                self.identity.mechanism = str(step.mechanism)[:40]
                mechanism = _FAST_MECHANISMS.get(step.mechanism)
                if mechanism is None or self._authenticate(mechanism, step.initial_response) is not None:
                    return False
                fast.sasl_ok()
            elif step is OPENED:
                self._log_open(fast.sasl_mechanism)
            elif kind is ClosedStep:
                assert isinstance(step, ClosedStep)
                self._closed_by_peer(step.close.error if step.close is not None else None)

    def _log_unsent(self, too_large: MessageTooLargeError) -> None:
        log.info(
            "AMQP %s: an answer is not sent (%s); its link is detached with amqp:link:message-size-exceeded",
            self.who,
            too_large.message,
        )

    async def _hand_over(self) -> None:
        """Carry on with the general machine, in the state the fast path reached."""
        fast = self.fast
        assert fast is not None
        self.machine, events = fast.handover()
        self.fast = None
        for too_large in fast.unsent:
            self._log_unsent(too_large)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("AMQP %s: %s", self.who, HANDED_OVER)
        await self._handle(events)

    async def _receive(self) -> list[Event]:
        data = await self._read(self.machine)
        if data is None:
            return [] if self.aborted else self.machine.tick()
        return self.machine.feed_bytes(data)

    async def _read(self, side: SdkPath | Connection) -> bytes | None:
        """The next bytes for ``side`` (the fast path or the machine; empty when the device
        closed), waiting no longer than its next deadline and, until the connection is open,
        :data:`HANDSHAKE_TIMEOUT`; None when a deadline came first, with the connection
        aborted when it was the handshake's."""
        if side.pending_input:
            self.stream.guard.receiving()
        else:
            self.stream.guard.busy()
        deadline = side.next_deadline()
        if not side.opened:
            handshake = self.started + HANDSHAKE_TIMEOUT
            deadline = handshake if deadline is None or handshake < deadline else deadline
        data = await self.deadline.receive(self.stream, _READ_SIZE, deadline)
        if data is None and not side.opened and time.monotonic() >= self.started + HANDSHAKE_TIMEOUT:
            self.close_reason = f"the connection was not open within {HANDSHAKE_TIMEOUT:g} s"
            self.aborted = True
        return data

    async def _flush(self) -> None:
        data = self.fast.get_outbound_data() if self.fast is not None else self.machine.get_outbound_data()
        if data:
            await self.stream.send(data)

    async def _handle(self, events: list[Event]) -> None:
        handlers = _HANDLERS
        while events:
            for event in events:
                handler = handlers.get(type(event))
                if handler is not None:
                    await handler(self, event)
            events = self.machine.poll_events()

    async def _on_header(self, event: ProtocolHeaderReceived) -> None:
        self.stream.guard.head_received()  # the first request, as far as the guard is concerned

    async def _on_sasl_response(self, event: SaslResponseReceived) -> None:
        await self._on_tpm_response(event.response)

    async def _on_opened(self, event: ConnectionOpened) -> None:
        machine = self.machine
        machine.open()
        self._log_open(machine.sasl_mechanism)

    def _log_open(self, mechanism: Symbol | None) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("AMQP %s: open (SASL %s)", self.who, mechanism or "none")

    async def _on_link(self, event: LinkAttached) -> None:
        if event.answer_needed:
            self._on_attach(event)

    async def _on_closed(self, event: ConnectionClosed) -> None:
        if event.by_peer:
            self._closed_by_peer(event.error)
        elif event.error is not None and self.close_reason == "closed":
            self.close_reason = f"{event.error.description} ({event.error.condition})"

    async def _on_session_ended(self, event: SessionEnded) -> None:
        if not event.by_peer and event.error is not None:  # the device broke a session rule
            log.info(
                "AMQP %s: ended session %d: %s (%s)",
                self.who,
                event.channel,
                event.error.description,
                event.error.condition,
            )

    async def _on_link_detached(self, event: LinkDetached) -> None:
        error = event.error
        if event.by_peer or error is None or event.link in self.refused:
            return  # the device's own detach, or a refusal already logged
        if (
            str(error.condition) == ErrorCondition.MESSAGE_SIZE_EXCEEDED.value
            and event.link in self.senders.values()
        ):
            return  # an answer too large for the device's link: _log_unsent said so
        log.info("AMQP %s: detached a link: %s (%s)", self.who, error.description, error.condition)

    def _closed_by_peer(self, error: Error | None) -> None:
        self.close_reason = (
            f"the device closed with {error.condition}: {error.description}"
            if error
            else "the device closed the connection"
        )

    # --- SASL ----------------------------------------------------------------------------------

    def _sasl_fail(self, why: str, code: SaslCode = SaslCode.AUTH) -> None:
        self.close_reason = f"SASL {self.identity.mechanism} refused: {why}"
        self.machine.sasl_outcome(code)

    async def _on_sasl_init(self, init: SaslInitReceived) -> None:
        identity = self.identity
        identity.mechanism = str(init.mechanism)[:40]
        try:
            mechanism = dps.Mechanism(str(init.mechanism))
        except ValueError:
            self._sasl_fail("not a mechanism this service offered")
            return
        if mechanism is dps.Mechanism.TPM:
            try:
                exchange = identity.tpm_exchange = TpmSaslServer()
                challenge = exchange.receive_init(init.initial_response)
                assert exchange.init is not None
                identity.address = dps.RegistrationAddress(
                    exchange.init.id_scope, exchange.init.registration_id
                )
            except (AmqpProtocolError, ProvisioningError) as exc:
                self._sasl_fail(exc.message)
                return
            self.machine.sasl_challenge(challenge)  # send the SRK
            return
        why = self._authenticate(mechanism, init.initial_response)
        if why is not None:
            self._sasl_fail(why)
            return
        self.machine.sasl_outcome(SaslCode.OK)

    def _authenticate(self, mechanism: dps.Mechanism, initial_response: bytes | None) -> str | None:
        """PLAIN, EXTERNAL or ANONYMOUS: who the device is (``identity``); None when the outcome
        is *ok*, else why not. No side effect but ``identity`` (the fast path hands a refusal
        over to the general machine, which asks again)."""
        identity = self.identity
        try:
            if mechanism is dps.Mechanism.PLAIN:
                username, password = dps.parse_plain(initial_response)
                identity.address = dps.parse_registration_address(username)
                self.endpoint.gateway.check_token(
                    password, identity.address.id_scope, identity.address.registration_id
                )
                identity.authorization = password
            elif mechanism is dps.Mechanism.EXTERNAL and not self.stream.client_chain:
                raise AmqpProtocolError("EXTERNAL needs a client certificate in the TLS handshake.")
        except (AmqpProtocolError, ProvisioningError) as exc:
            return exc.message
        return None

    async def _on_tpm_response(self, response: bytes) -> None:
        """One step of the SASL TPM exchange (:mod:`provisiond.protocol.amqp.sasl_tpm`); the
        attestation itself is the gateway's (the registrar's TPM attestor, the rate limits)."""
        exchange = self.identity.tpm_exchange
        if exchange is None or self.identity.address is None:
            self._sasl_fail("a SASL response outside the TPM exchange")
            return
        address, gateway, peer = self.identity.address, self.endpoint.gateway, self.stream.address
        try:
            step = exchange.receive_response(response)
            if isinstance(step, MakeBlob):
                blob = await gateway.tpm_challenge(
                    address.registration_id, step.init.endorsement_key, step.storage_root_key, peer
                )
                self.machine.sasl_challenge(exchange.send_blob(blob))
            elif isinstance(step, SendChallenge):
                self.machine.sasl_challenge(step.data)
            elif isinstance(step, TokenReceived):
                keys = (exchange.init.endorsement_key if exchange.init else b"", exchange.storage_root_key)
                self.identity.tpm = await gateway.tpm_authenticate(
                    address.id_scope, address.registration_id, step.token, keys, peer
                )
                self.identity.authorization = step.token
                self.machine.sasl_outcome(SaslCode.OK)
        except ThrottledError as exc:
            self._sasl_fail(exc.message, SaslCode.SYS_TEMP)
        except (AmqpProtocolError, ProvisioningError) as exc:
            self._sasl_fail(exc.message)

    # --- links ---------------------------------------------------------------------------------

    def _on_attach(self, event: LinkAttached) -> None:
        found = self._link_address(event.role, event.remote)
        if isinstance(found, tuple):
            self._refuse_link(event.link, *found)
            return
        self.machine.accept_link(event.link)
        if event.role is Role.RECEIVER:
            self.machine.grant_credit(event.link, LINK_CREDIT)
        self._attached(event.link, event.role, event.remote, found)

    def _link_address(self, role: Role, remote: Attach) -> dps.RegistrationAddress | tuple[str, str]:
        """The device's address a link names, or the condition and reason to refuse it."""
        terminus = remote.target if role is Role.RECEIVER else remote.source
        try:
            address = dps.parse_registration_address(getattr(terminus, "address", None))
        except AmqpProtocolError as exc:
            return ErrorCondition.NOT_FOUND, exc.message
        known = self.identity.address
        if known is not None and (
            known.registration_id.lower() != address.registration_id.lower()
            or known.id_scope.lower() != address.id_scope.lower()
        ):
            return (
                ErrorCondition.UNAUTHORIZED_ACCESS,
                f"The link is for {address}, but the connection authenticated {known}.",
            )
        return address

    def _attached(self, link: LinkId, role: Role, remote: Attach, address: dps.RegistrationAddress) -> None:
        self.identity.address = self.identity.address or address
        if role is Role.RECEIVER:
            self.receivers[link] = address
        else:
            self.senders[address] = link
        if log.isEnabledFor(logging.DEBUG):
            log.debug("AMQP %s: attached %s link %r", self.who, role.name.lower(), remote.name)

    def _refuse_link(self, link: LinkId, condition: str, why: str) -> None:
        log.info("AMQP %s: refused a link: %s", self.who, why)
        self.refused.add(link)
        self.machine.refuse_link(link, Error(condition=Symbol(condition), description=why))

    # --- messages ------------------------------------------------------------------------------

    async def _on_message(self, event: MessageReceived) -> None:
        address = self.receivers.get(event.link)
        if address is None:
            return
        state, sender, message = await self._answer_message(address, event.message, event.settled)
        if not self.machine.has_link(event.link) and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "AMQP %s: the link of delivery %d detached before its answer", self.who, event.delivery_id
            )
        too_large = deliver(self.machine, event, state, sender, message, LINK_CREDIT)
        if too_large is not None:
            self._log_unsent(too_large)

    async def _answer_message(
        self, address: dps.RegistrationAddress, message: Message, settled: bool
    ) -> tuple[DeliveryState | None, LinkId | None, Reply | None]:
        """The gateway's answer to one request: how to settle it (None: the device settled
        it), and the answer's message and the link to send it on (None: none)."""
        properties = message.properties or Properties()
        answer = await self._answer(address, message)
        if answer.refused:
            return (None if settled else _rejection(answer)), None, None
        state = None if settled else Accepted()
        sender = self.senders.get(address)
        if sender is None:
            log.info("AMQP %s: no receiving link to answer on; the answer is dropped", self.who)
            return state, None, None
        retry: dict[str, Any] = {}
        if answer.retry_after is not None:
            retry = {name: answer.retry_after for name in dps.RETRY_AFTER_NAMES}
        return state, sender, Reply(str(uuid.uuid4()), properties.correlation_id, retry or None, answer.body)

    async def _answer(self, address: dps.RegistrationAddress, message: Message) -> Answer:
        """The gateway's answer to one request message."""
        app = message.application_properties or {}
        kind = app.get(dps.OPERATION_TYPE)
        gateway, transport = self.endpoint.gateway, self.endpoint.transport
        describe = f"AMQP {self.who}: {str(kind)[:60]}"
        operation = _OPERATIONS.get(kind) if isinstance(kind, str) else None
        operation_id = app.get(dps.OPERATION_ID)
        if operation is None:
            return gateway.refuse(
                RequestError(
                    f"{dps.OPERATION_TYPE} {str(kind)[:60]!r} is not {dps.OperationType.REGISTER.value} or "
                    f"{dps.OperationType.GET_OPERATION_STATUS.value}."
                ),
                transport,
                describe,
            )
        if operation is Operation.OPERATION_STATUS and (
            not isinstance(operation_id, str) or not operation_id
        ):
            return gateway.refuse(
                InvalidBodyError(f"A status request needs the {dps.OPERATION_ID} application property."),
                transport,
                describe,
            )
        credential = Credential(
            id_scope=address.id_scope,
            registration_id=address.registration_id,
            authorization=self.identity.authorization,
            client_chain=self.stream.client_chain,
            tpm=self.identity.tpm,
        )
        call = DeviceCall(
            credential=credential,
            operation=operation,
            transport=transport,
            payload=_payload_of(message) if operation is Operation.REGISTER else b"",
            operation_id=operation_id if isinstance(operation_id, str) else None,
            peer=self.stream.address,
            describe=describe,
        )
        return await gateway.answer(call)


#: The mechanisms the fast path serves (TPM's exchange is the general machine's).
_FAST_MECHANISMS = {
    Symbol(m.value): m for m in (dps.Mechanism.PLAIN, dps.Mechanism.EXTERNAL, dps.Mechanism.ANONYMOUS)
}

#: What the session does with each kind of event (the others need nothing from it).
_HANDLERS: dict[type[Event], Callable[[_Session, Any], Awaitable[None]]] = {
    ProtocolHeaderReceived: _Session._on_header,
    SaslInitReceived: _Session._on_sasl_init,
    SaslResponseReceived: _Session._on_sasl_response,
    ConnectionOpened: _Session._on_opened,
    LinkAttached: _Session._on_link,
    MessageReceived: _Session._on_message,
    ConnectionClosed: _Session._on_closed,
    SessionEnded: _Session._on_session_ended,
    LinkDetached: _Session._on_link_detached,
}


def _rejection(answer: Answer) -> Rejected:
    """A refusal as AMQP's *rejected* outcome: DPS's error JSON as the description, the
    retry-after in the info (both spellings the SDKs read)."""
    info: dict[Symbol, Any] = {}
    if answer.retry_after is not None:
        info = {Symbol(name): answer.retry_after for name in dps.RETRY_AFTER_NAMES}
    condition = _CONDITIONS.get(answer.status, ErrorCondition.NOT_ALLOWED)
    if answer.status >= 500:
        condition = ErrorCondition.INTERNAL_ERROR
    return Rejected(
        error=Error(condition=Symbol(condition), description=answer.body.decode("utf-8"), info=info or None)
    )


def _payload_of(message: Message) -> bytes:
    """The registration body's bytes: data sections, or an amqp-value (string or binary)."""
    raw = message.data
    if raw is None and isinstance(message.body, AmqpValue) and isinstance(message.body.value, str | bytes):
        value = message.body.value
        raw = value.encode("utf-8") if isinstance(value, str) else value
    return raw or b""


# --- listeners -------------------------------------------------------------------------------------


def tls_listener(gateway: DeviceGateway) -> TlsListener:
    """The AMQP listener of a worker: TLS on ``settings.amqp_port`` (none when it is 0). AMQP over
    WebSockets is served on the HTTPS port by the app's WebSocket router (``AMQPWSB10``)."""
    return TlsListener(
        name="AMQP",
        handler=AmqpEndpoint(gateway, AMQP),
        port=gateway.ctx.settings.amqp_port,
        flag="--amqp-port",
        first_request="protocol header",
    )
