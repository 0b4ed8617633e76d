"""The device gateway: the one place where a device's request, whatever carried it (HTTPS,
MQTT, MQTT over WebSockets, AMQP, AMQP over WebSockets), becomes a call of the
:class:`~provisiond.service.registrar.Registrar`, and the registrar's answer or error becomes
what the device reads.

Theory of operation
-------------------
The transport endpoints are adapters between their wire and two small values:

* a :class:`DeviceCall` in: who the device says it is (:class:`Credential`: ID scope,
  registration id, SAS token, TLS client chain, the EK/SRK a SASL TPM exchange proved), the
  :class:`Operation` (register, operation status, status lookup), the request's payload bytes,
  the :class:`Transport` (its label and what it does with TPM), the source address, and how the
  log line names the request;
* an :class:`Answer` out: status, body bytes, retry-after, tracking id (and the errorCode when it
  is a refusal). HTTPS writes it as a response (Retry-After, ``x-ms-error-code``), MQTT as a
  publish on ``$dps/registrations/res/{status}/?$rid=..[&retry-after=..]``, AMQP as a response
  message (``retry-after`` properties) or a rejected delivery whose description is the body.

:meth:`DeviceGateway.answer` does, for every transport alike: the body size limit, bounded JSON
decoding (:mod:`provisiond.protocol.bounded_json`), the transport's TPM rule, the registrar
call, the statuses (register 202; operation status 202 while ``assigning``, else 200; status
lookup 200; retry-after while ``assigning``), and for a refusal DPS's error body
(:func:`~provisiond.protocol.messages.error_body`) with a fresh tracking id and the one log line
that says why (INFO for 4xx, ERROR with the traceback for our bugs, answered as 500). The rate
limits (the node's limit and the source's budget of failed attestations first, the device's
own budget after attestation, :mod:`provisiond.service.throttle`) are applied where attestation
happens: in the registrar for every request, and here for the one attestation that happens
before any request, AMQP's SASL ``TPM`` exchange (:meth:`DeviceGateway.tpm_challenge`,
:meth:`DeviceGateway.tpm_authenticate`). Connection-time token checks (MQTT's CONNECT, SASL
PLAIN) go through :meth:`DeviceGateway.check_token`: what is wrong with a token without reading
an enrollment; its signature is checked by the registrar at register time.

``forceRegistration`` (HTTPS query parameter, AMQP ``iotdps-forceRegistration``) is accepted and
has no effect, as in DPS: every register runs the assignment again under the enrollment's
reprovisioning policy (docs/device-api.md, "forceRegistration").
"""

from __future__ import annotations

import base64
import enum
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from ..attestation import symmetric_key as sk
from ..errors import (
    AuthenticationError,
    BodyTooLargeError,
    InvalidBodyError,
    ProvisioningError,
    TpmChallengeRequired,
)
from ..models import RegistrationStatus
from ..protocol.messages import (
    DeviceRegistration,
    DeviceRegistrationResult,
    RegistrationOperationStatus,
    TpmAttestationRequest,
    encode,
    error_body,
)
from ..protocol.sas import SasToken
from ..storage import utc_now
from .context import ServiceContext
from .http import decode_body, retry_after_of
from .registrar import DeviceRequest, Registrar

__all__ = [
    "AMQP",
    "AMQP_WS",
    "HTTPS",
    "MQTT",
    "MQTT_WS",
    "POLL_AFTER_SECONDS",
    "Answer",
    "Credential",
    "DeviceCall",
    "DeviceGateway",
    "Operation",
    "TpmSupport",
    "Transport",
]

#: The retry-after of an 'assigning' answer: when the device should poll.
POLL_AFTER_SECONDS = 1


class Operation(enum.Enum):
    """What the device asks for."""

    REGISTER = "register"
    OPERATION_STATUS = "operation status"
    STATUS_LOOKUP = "status lookup"


class TpmSupport(enum.Enum):
    """What a transport does with TPM attestation (device-protocol.md §2.3, §4.1)."""

    #: HTTPS: a register with the EK and SRK and no token is answered with the challenge.
    CHALLENGE = "challenge"
    #: AMQP: the challenge and its answer happen in SASL; requests carry the proof.
    SASL = "sasl"
    #: MQTT: DPS has no TPM attestation; a body with ``tpm`` is refused.
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Transport:
    """A device transport: its label (logs, registration records' log lines, ``[mqtt-ws]``),
    what it does with TPM, and the logger of its lines."""

    name: str
    tpm: TpmSupport
    log: logging.Logger

    def __str__(self) -> str:
        return self.name


HTTPS = Transport("https", TpmSupport.CHALLENGE, logging.getLogger("provisiond.device_api"))
MQTT = Transport("mqtt", TpmSupport.NONE, logging.getLogger("provisiond.mqtt"))
MQTT_WS = Transport("mqtt-ws", TpmSupport.NONE, MQTT.log)
AMQP = Transport("amqp", TpmSupport.SASL, logging.getLogger("provisiond.amqp"))
AMQP_WS = Transport("amqp-ws", TpmSupport.SASL, AMQP.log)


class Credential(msgspec.Struct, frozen=True, kw_only=True):
    """Who the device says it is, as its transport established it (nothing is verified yet
    beyond what :meth:`DeviceGateway.check_token` checks)."""

    id_scope: str
    registration_id: str
    #: The SAS token (symmetric key, or signed in a TPM).
    authorization: str | None = None
    #: The TLS client certificate chain (DER, leaf first).
    client_chain: Sequence[bytes] = ()
    #: The EK and SRK a SASL TPM exchange proved (AMQP); fills a body without ``tpm``.
    tpm: TpmAttestationRequest | None = None


class DeviceCall(msgspec.Struct, frozen=True, kw_only=True):
    """One request of a device, as its transport hands it over."""

    credential: Credential
    operation: Operation
    transport: Transport
    #: The request body (register, status lookup); ignored for an operation status.
    payload: bytes = b""
    operation_id: str | None = None
    #: The source IP address (rate limits count failed attestations per source).
    peer: str | None = None
    #: How the log line names the request ("PUT /scope/registrations/x/register",
    #: "MQTT 10.0.0.1:5000 x [mqtt]: register $rid=1", "AMQP ...: iotdps-register").
    describe: str = ""


class Answer(msgspec.Struct, frozen=True):
    """What the device reads: an HTTP-like status, the JSON body, and the seconds after which to
    come back (``assigning``, 429, 503). ``error_code`` is set for a refusal (the body is DPS's
    error body); ``challenge`` for HTTPS's TPM challenge (401 with the challenge body)."""

    status: int
    body: bytes
    retry_after: int | None = None
    tracking_id: str | None = None
    error_code: int | None = None
    challenge: bool = False

    @property
    def refused(self) -> bool:
        """A refusal (an error body, or the TPM challenge), not a registration result."""
        return self.error_code is not None or self.challenge


def _status_answer(status: int, result: RegistrationOperationStatus) -> Answer:
    assigning = result.status is RegistrationStatus.ASSIGNING
    return Answer(status, encode(result), POLL_AFTER_SECONDS if assigning else None)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


class DeviceGateway:
    """Answers device requests for one worker: its context (settings, clock, rate limits) and
    its registrar."""

    def __init__(self, ctx: ServiceContext, registrar: Registrar) -> None:
        self.ctx = ctx
        self.registrar = registrar

    @property
    def max_body_bytes(self) -> int:
        return self.ctx.settings.max_body_bytes

    # --- requests ------------------------------------------------------------------------------

    async def answer(self, call: DeviceCall) -> Answer:
        """The answer to one request; never raises (a refusal is an answer)."""
        try:
            request = self._request(call)
            return await self._call_registrar(call, request)
        except TpmChallengeRequired as challenge:
            if call.transport.tpm is TpmSupport.CHALLENGE:
                return self._challenge(call, challenge)
            return self.refuse(challenge, call.transport, call.describe)
        except ProvisioningError as exc:
            return self.refuse(exc, call.transport, call.describe)
        except Exception:
            tid = str(uuid.uuid4())
            call.transport.log.exception("%s -> 500: internal error [trackingId=%s]", call.describe, tid)
            return self.internal_error(tid)

    def _request(self, call: DeviceCall) -> DeviceRequest:
        credential = call.credential
        body = DeviceRegistration()
        if call.operation is not Operation.OPERATION_STATUS:
            body = self._decode(call.payload, call.transport)
        if credential.tpm is not None and body.tpm is None:  # .NET sends no EK/SRK in the body
            body = msgspec.structs.replace(body, tpm=credential.tpm)
        return DeviceRequest(
            id_scope=credential.id_scope,
            registration_id=credential.registration_id,
            body=body,
            authorization=credential.authorization,
            client_chain=credential.client_chain,
            transport=call.transport.name,
            source=call.peer,
        )

    def _decode(self, payload: bytes, transport: Transport) -> DeviceRegistration:
        """The registration body within the size limit (as over HTTPS, whatever it holds): none
        (empty or blank), or bounded JSON."""
        limit = self.max_body_bytes
        if len(payload) > limit:
            raise BodyTooLargeError(
                f"The registration body ({len(payload)} bytes) exceeds the {limit}-byte limit."
            )
        if not payload.strip():
            return DeviceRegistration()
        body = decode_body(payload, DeviceRegistration, "device registration")
        if body.tpm is not None and transport.tpm is TpmSupport.NONE:
            raise InvalidBodyError(
                "TPM attestation is not available over MQTT (as in DPS); use HTTPS or AMQP."
            )
        return body

    async def _call_registrar(self, call: DeviceCall, request: DeviceRequest) -> Answer:
        registrar = self.registrar
        if call.operation is Operation.REGISTER:
            result = await registrar.register(request)
            return _status_answer(202, result)
        if call.operation is Operation.OPERATION_STATUS:
            result = await registrar.operation_status(request, call.operation_id or "")
            return _status_answer(202 if result.status is RegistrationStatus.ASSIGNING else 200, result)
        lookup: DeviceRegistrationResult = await registrar.status_lookup(request)
        return Answer(200, encode(lookup))

    def _challenge(self, call: DeviceCall, challenge: TpmChallengeRequired) -> Answer:
        # Not a DPS error body: the C SDK requires keyName and the absence of status (§2.3).
        tid = str(uuid.uuid4())
        call.transport.log.info(
            "%s -> 401: TPM challenge sent to %s [trackingId=%s] [%s]",
            call.describe,
            call.credential.registration_id,
            tid,
            call.transport,
        )
        body = {
            "message": challenge.message,
            "authenticationKey": challenge.authentication_key,
            "keyName": challenge.key_name,  # always written (TpmChallenge would omit the default)
        }
        return Answer(401, msgspec.json.encode(body), tracking_id=tid, challenge=True)

    # --- refusals ------------------------------------------------------------------------------

    def refuse(self, exc: ProvisioningError, transport: Transport, describe: str) -> Answer:
        """DPS's error answer for ``exc``, and the log line that says why (INFO for 4xx, ERROR
        for 5xx): what was asked, status, errorCode, message and tracking id. Adapters call it
        for what they refuse before a request reaches :meth:`answer` (api-version, a body cut
        short, an AMQP message without its operation)."""
        tid = str(uuid.uuid4())
        level = logging.ERROR if exc.http_status >= 500 else logging.INFO
        transport.log.log(
            level,
            "%s -> %d %d: %s [trackingId=%s]",
            describe,
            exc.http_status,
            exc.error_code,
            exc.message,
            tid,
        )
        return self._error(exc, tid)

    def internal_error(self, tid: str) -> Answer:
        """The answer to a request that failed on a bug of ours (logged by the caller, with its
        traceback, under ``tid``)."""
        return self._error(
            ProvisioningError(f"Internal error; the service log has the details under trackingId {tid}."), tid
        )

    @staticmethod
    def _error(exc: ProvisioningError, tid: str) -> Answer:
        return Answer(
            exc.http_status,
            error_body(exc.error_code, tid, exc.message, utc_now()),
            retry_after_of(exc),
            tracking_id=tid,
            error_code=exc.error_code,
        )

    # --- connection-time attestation -----------------------------------------------------------

    def check_token(self, token: str, id_scope: str, registration_id: str) -> SasToken:
        """What can be wrong with a device's SAS token without reading an enrollment: its
        form, audience (this scope and registration id) and expiry (MQTT CONNECT, SASL PLAIN).

        :raises AuthenticationError: with the reason.
        """
        settings = self.ctx.settings
        return sk.check_device_token(
            token, id_scope, registration_id, now=int(self.ctx.clock()), clock_skew=settings.clock_skew
        )

    async def tpm_challenge(
        self, registration_id: str, endorsement_key: bytes, storage_root_key: bytes, peer: str | None
    ) -> bytes:
        """The activation blob for a SASL TPM exchange (the registrar's TPM attestor checks the
        keys against the enrollment and records the challenge), within the rate limits: a source
        over its budget of failed attestations is refused first, a refusal spends it.

        :raises ThrottledError: the source is over its budget.
        :raises AuthenticationError, InvalidBodyError: not this enrollment's TPM, malformed keys.
        """
        limiter = self.ctx.limiter
        limiter.check_source(peer)
        try:
            blob = await self.registrar.tpm.challenge(registration_id, endorsement_key, storage_root_key)
        except AuthenticationError:
            limiter.failed(peer)
            raise
        return blob.marshal()

    async def tpm_authenticate(
        self, id_scope: str, registration_id: str, token: str, keys: tuple[bytes, bytes], peer: str | None
    ) -> TpmAttestationRequest:
        """Verify the SAS token a TPM signed at the end of a SASL TPM exchange (without using
        the challenge: the register that follows on the connection uses it), and return the EK
        and SRK the connection's requests carry (:attr:`Credential.tpm`). A refusal spends the
        source's budget of failed attestations.

        :raises AuthenticationError: the token is not for this device, expired, or not signed
            with the challenge's key.
        """
        try:
            parsed = self.check_token(token, id_scope, registration_id)
            await self.registrar.tpm.authenticate(parsed, registration_id, consume=False)
        except AuthenticationError:
            self.ctx.limiter.failed(peer)
            raise
        return TpmAttestationRequest(endorsement_key=_b64(keys[0]), storage_root_key=_b64(keys[1]))
