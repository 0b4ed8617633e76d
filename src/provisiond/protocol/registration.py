"""The device side of DPS registration, sans-io: one flow for every transport and both clients.

Theory of operation
===================

A device registers in at most three kinds of exchange (device-protocol.md §1.3, §1.4, §2):

1. **register** (HTTPS ``PUT .../register``, MQTT ``$dps/registrations/PUT/iotdps-register``,
   AMQP ``iotdps-register``) with a :class:`DeviceRegistration` body;
2. **poll** the operation (``GET .../operations/{operationId}``, ``iotdps-get-operationstatus``)
   while the answer says ``assigning``;
3. **retry** the same request when the service is busy (429) or broken (5xx).

The answer to 1 or 2 is a :class:`RegistrationOperationStatus`. provisiond usually answers
register with the terminal status straight away (202 + ``assigned``), so the common case is a
single exchange; real DPS answers ``assigning`` first and the device polls.

:func:`registration_flow` is a generator in the style of httpx's ``Auth.auth_flow``. It
*yields commands* and the driver (a client plus a transport) carries them out:

* :class:`SendRegister` / :class:`SendPoll`: send this request; ``.send()`` back the
  :class:`Reply` (status code, body, retry-after), or ``.throw()`` the
  :class:`~provisiond.errors.TransportError` the transport raised;
* :class:`Sleep`: wait this long, then ``.send(None)``;
* :class:`AnswerChallenge`: the service sent a TPM challenge (401 with ``authenticationKey``);
  let the security provider activate it, then ``.send(None)``; the flow re-sends the register.

When the flow is done it returns a :class:`RegistrationResult` (``StopIteration.value``) or
raises. Everything the device decides lives here, and only here:

Rule 1: this module does no I/O, reads no clock and draws no random numbers except through the
``clock`` and ``random`` callables it is given, so a test drives it by hand, deterministically.

Rule 2: this module does not know which transport carries the requests. A transport maps its
wire answers to a :class:`Reply` whose ``status`` is HTTP's or the MQTT/AMQP equivalent (the
status in the MQTT response topic; ``errorCode // 1000`` for an AMQP rejection).

What each answer leads to is two tables: :data:`DISPOSITIONS` (by status code) and
:data:`OUTCOMES` (by the registration status in a 2xx body). Delays: a poll waits the answer's
retry-after (default 2 s), a retry waits exponential backoff with full jitter but never less than
the retry-after; every delay is clamped to [0.1, 300] s so that a hostile or broken service can
neither spin the device nor park it for hours. The :class:`RetryPolicy` bounds the retries of
one request (``max_attempts``) and the whole registration (``total_timeout``).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgspec

from .. import errors
from ..errors import (
    LocalProtocolError,
    RegistrationFailedError,
    RemoteProtocolError,
    ServiceResponseError,
    TransportError,
)
from ..models import RegistrationStatus, RegistrationSubstatus
from . import bounded_json
from .messages import (
    DeviceRegistration,
    DeviceRegistrationResult,
    RegistrationOperationStatus,
    TpmAttestationRequest,
    TpmChallenge,
    decode_operation_status,
)

__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "DISPOSITIONS",
    "MAX_DELAY",
    "MIN_DELAY",
    "OUTCOMES",
    "AnswerChallenge",
    "Command",
    "Disposition",
    "Outcome",
    "RegistrationFlow",
    "RegistrationResult",
    "Reply",
    "Request",
    "RetryPolicy",
    "SendPoll",
    "SendRegister",
    "Sleep",
    "SleepReason",
    "parse_retry_after",
    "registration_flow",
]

logger = logging.getLogger(__name__)

#: Seconds between polls when the service gives no retry-after (PY, NODE and NET use 2 s).
DEFAULT_POLL_INTERVAL = 2.0
#: Every delay is clamped to [MIN_DELAY, MAX_DELAY] seconds (C accepts retry-after up to 300 s).
MIN_DELAY = 0.1
MAX_DELAY = 300.0
_MAX_QUOTED_BODY = 200


# --- commands and replies ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SendRegister:
    """Send the register request (``forceRegistration`` when ``force``)."""

    registration_id: str
    body: DeviceRegistration
    force: bool = False

    def __post_init__(self) -> None:
        if not self.registration_id or not self.registration_id.strip():
            raise LocalProtocolError("A register request needs a non-empty registration id.")


@dataclass(frozen=True, slots=True, kw_only=True)
class SendPoll:
    """Ask for the status of the operation ``operation_id``."""

    registration_id: str
    operation_id: str

    def __post_init__(self) -> None:
        if not self.registration_id or not self.operation_id:
            raise LocalProtocolError("A poll needs a registration id and an operation id.")


class SleepReason(enum.Enum):
    POLL = "poll"  # the operation is assigning: come back later
    RETRY = "retry"  # the service was busy or failing: back off, then re-send


@dataclass(frozen=True, slots=True, kw_only=True)
class Sleep:
    """Wait ``seconds``, then ``.send(None)``."""

    seconds: float
    reason: SleepReason

    def __post_init__(self) -> None:
        if not (math.isfinite(self.seconds) and self.seconds >= 0):
            raise LocalProtocolError(f"Cannot sleep {self.seconds!r} seconds.")


@dataclass(frozen=True, slots=True, kw_only=True)
class AnswerChallenge:
    """The service sent a TPM challenge: have the security provider activate it, then
    ``.send(None)``. (The seam for TPM attestation; see device-protocol.md §2.3.)"""

    challenge: TpmChallenge


Request: TypeAlias = SendRegister | SendPoll
Command: TypeAlias = SendRegister | SendPoll | Sleep | AnswerChallenge


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """What the transport got back: the status code (HTTP's, or the MQTT/AMQP equivalent), the
    body, and the retry-after in seconds when the service sent a usable one."""

    status: int
    body: bytes = b""
    retry_after: float | None = None

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599:
            raise LocalProtocolError(f"{self.status!r} is not a status code.")
        if self.retry_after is not None and not (math.isfinite(self.retry_after) and self.retry_after >= 0):
            raise LocalProtocolError(f"{self.retry_after!r} is not a retry-after; use None.")


def parse_retry_after(value: str | bytes | int | float | None) -> float | None:
    """Seconds from a retry-after header or property; None when absent or unusable (an HTTP
    date, garbage, negative, not finite), so that the flow falls back to its default."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        seconds = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


# --- results and policy --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistrationResult:
    """The terminal answer: where the device goes (``assigned``), or why not (carried by
    :class:`~provisiond.errors.RegistrationFailedError` for ``failed``/``disabled``)."""

    status: RegistrationStatus
    assigned_hub: str | None = None
    device_id: str | None = None
    substatus: RegistrationSubstatus | None = None
    payload: Any = None
    registration_state: DeviceRegistrationResult | None = None
    operation_id: str

    @classmethod
    def from_operation_status(cls, op: RegistrationOperationStatus) -> RegistrationResult:
        state = op.registration_state
        return cls(
            status=op.status,
            assigned_hub=state.assigned_hub if state else None,
            device_id=state.device_id if state else None,
            substatus=state.substatus if state else None,
            payload=state.payload if state else None,
            registration_state=state,
            operation_id=op.operation_id,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How hard the device tries when the service is busy (429) or failing (5xx).

    :param max_attempts: tries of one request, the first included, before giving up.
    :param initial_backoff: the backoff ceiling of the first retry, in seconds.
    :param max_backoff: the highest backoff ceiling.
    :param multiplier: the ceiling grows by this factor per retry.
    :param total_timeout: seconds the whole registration (retries and polls) may take.
    :param retry_transport_errors: also retry when the connection fails (refused, reset, timed
        out). Off by default, so that a wrong host or CA fails at once.
    """

    max_attempts: int = 5
    initial_backoff: float = 1.0
    max_backoff: float = 30.0
    multiplier: float = 2.0
    total_timeout: float = 90.0
    retry_transport_errors: bool = False

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts!r}")
        for name in ("initial_backoff", "max_backoff", "total_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.max_backoff < self.initial_backoff:
            raise ValueError("max_backoff must not be less than initial_backoff")
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1):
            raise ValueError(f"multiplier must be at least 1, not {self.multiplier!r}")

    def backoff(self, retry: int, draw: float) -> float:
        """The delay before retry number ``retry`` (1-based): full jitter, i.e. ``draw`` (in
        [0, 1)) times the exponential ceiling."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** min(retry - 1, 64))
        return draw * ceiling


# --- the tables ----------------------------------------------------------------------------------


class Disposition(enum.Enum):
    """What a status code means to the device."""

    ANSWER = "answer"  # 2xx: the body is a RegistrationOperationStatus
    RETRY = "retry"  # 429, 5xx: re-send the same request later
    CHALLENGE = "challenge"  # 401: a TPM challenge if the body has authenticationKey, else refused
    REFUSED = "refused"  # any other status: the service said no


#: Status codes with a disposition other than their class's (see :func:`disposition`).
DISPOSITIONS: dict[int, Disposition] = {401: Disposition.CHALLENGE, 429: Disposition.RETRY}


def disposition(status: int) -> Disposition:
    if status in DISPOSITIONS:
        return DISPOSITIONS[status]
    if 200 <= status < 300:
        return Disposition.ANSWER
    return Disposition.RETRY if status >= 500 else Disposition.REFUSED


class Outcome(enum.Enum):
    """What a registration status in a 2xx answer means to the device."""

    POLL = "poll"
    DONE = "done"
    FAILED = "failed"
    VIOLATION = "violation"  # never valid in a 2xx (device-protocol.md §1.3)


OUTCOMES: dict[RegistrationStatus, Outcome] = {
    RegistrationStatus.ASSIGNING: Outcome.POLL,
    RegistrationStatus.ASSIGNED: Outcome.DONE,
    RegistrationStatus.FAILED: Outcome.FAILED,
    RegistrationStatus.DISABLED: Outcome.FAILED,
    RegistrationStatus.UNASSIGNED: Outcome.VIOLATION,
}


# --- the flow ------------------------------------------------------------------------------------

RegistrationFlow: TypeAlias = Generator[Command, Reply | None, RegistrationResult]


def registration_flow(
    registration_id: str,
    *,
    payload: Any = None,
    force: bool = False,
    policy: RetryPolicy,
    clock: Callable[[], float],
    random: Callable[[], float],
    answers_challenges: bool = False,
    tpm: TpmAttestationRequest | None = None,
) -> RegistrationFlow:
    """Register ``registration_id``: yields commands, returns the :class:`RegistrationResult`.

    :param payload: custom JSON for the service's allocation (sent as ``payload``).
    :param force: send DPS's ``forceRegistration`` flag; it changes nothing at DPS or provisiond,
        where every register runs the assignment again (docs/device-api.md).
    :param clock: monotonic seconds (``time.monotonic``); read to enforce ``total_timeout``.
    :param random: a float in [0, 1) (``random.random``); the backoff jitter.
    :param answers_challenges: the security provider can answer a TPM challenge.
    :param tpm: the device's EK and SRK (TPM attestation), sent in the register body.
    :raises RegistrationFailedError: the registration ended ``failed`` or ``disabled``.
    :raises ServiceResponseError: the service refused (4xx), or kept failing (429/5xx) until
        the policy gave up.
    :raises RemoteProtocolError: the service's answer is malformed or impossible.
    :raises provisiond.errors.TimeoutError: still ``assigning`` when ``total_timeout`` ran out.
    :raises TransportError: thrown in by the driver (and not retried, or retried in vain).
    """
    deadline = clock() + policy.total_timeout
    request: Request = SendRegister(
        registration_id=registration_id,
        body=DeviceRegistration(registration_id=registration_id, tpm=tpm, payload=payload),
        force=force,
    )
    challenged = False
    while True:
        reply = yield from _exchange(request, policy, clock, random, deadline)
        kind = disposition(reply.status)
        if kind is Disposition.CHALLENGE:
            challenge = _challenge(reply)
            if challenge is None or challenged or not answers_challenges:
                raise _refusal(reply, request, challenge=challenge, challenged=challenged)
            challenged = True
            logger.debug("TPM challenge for %s; asking the security provider", registration_id)
            yield from _acknowledged(AnswerChallenge(challenge=challenge))
            continue  # re-send the same request, now with the activated key
        if kind is not Disposition.ANSWER:
            raise _refusal(reply, request)
        op = _operation_status(reply, request)
        outcome = OUTCOMES[op.status]
        if outcome is Outcome.DONE:
            return _assigned(op)
        if outcome is Outcome.FAILED:
            raise _failed(op)
        if outcome is Outcome.VIOLATION:
            raise RemoteProtocolError(
                f"The service answered {_describe(request)} with HTTP {reply.status} and status "
                f"'{op.status.value}', which is never valid in a success answer (operation {op.operation_id})."
            )
        delay = _clamp(DEFAULT_POLL_INTERVAL if reply.retry_after is None else reply.retry_after)
        if clock() + delay > deadline:
            raise errors.TimeoutError(
                f"Registration {registration_id} is still assigning (operation {op.operation_id}) and the "
                f"next poll, in {delay:g} s, would pass the retry policy's total_timeout of "
                f"{policy.total_timeout:g} s."
            )
        logger.debug(
            "%s is assigning (operation %s); polling in %.1f s", registration_id, op.operation_id, delay
        )
        yield from _acknowledged(Sleep(seconds=delay, reason=SleepReason.POLL))
        request = SendPoll(registration_id=registration_id, operation_id=op.operation_id)


def _exchange(
    request: Request,
    policy: RetryPolicy,
    clock: Callable[[], float],
    random: Callable[[], float],
    deadline: float,
) -> Generator[Command, Reply | None, Reply]:
    """Send ``request`` until the answer is not retryable, or give up as the policy says."""
    attempt = 1
    while True:
        failure: TransportError | None = None
        try:
            reply = yield request
        except TransportError as exc:
            if not policy.retry_transport_errors:
                raise
            failure, reply = exc, None
        else:
            if reply is None:
                raise LocalProtocolError(f"The driver answered {_describe(request)} without a Reply.")
            if disposition(reply.status) is not Disposition.RETRY:
                return reply
        floor = reply.retry_after if reply is not None and reply.retry_after is not None else 0.0
        delay = _clamp(max(floor, policy.backoff(attempt, _draw(random))))
        if attempt >= policy.max_attempts or clock() + delay > deadline:
            why = (
                f"after {attempt} attempts"
                if attempt >= policy.max_attempts
                else f"the next retry, in {delay:.1f} s, would pass the total_timeout of {policy.total_timeout:g} s"
            )
            if failure is not None:
                logger.debug("giving up on %s: %s", _describe(request), why)
                raise failure
            assert reply is not None
            raise _refusal(reply, request, gave_up=why)
        logger.debug(
            "%s: %s; retry %d in %.2f s",
            _describe(request),
            failure or f"HTTP {reply.status if reply else '?'}",
            attempt,
            delay,
        )
        yield from _acknowledged(Sleep(seconds=delay, reason=SleepReason.RETRY))
        attempt += 1


def _acknowledged(command: Sleep | AnswerChallenge) -> Generator[Command, Reply | None, None]:
    ack = yield command
    if ack is not None:
        raise LocalProtocolError(f"The driver answered {type(command).__name__} with {ack!r}; send None.")


def _draw(random: Callable[[], float]) -> float:
    value = random()
    if not 0.0 <= value <= 1.0:
        raise LocalProtocolError(f"random() returned {value!r}, not a number in [0, 1).")
    return value


def _clamp(seconds: float) -> float:
    return min(MAX_DELAY, max(MIN_DELAY, seconds))


def _describe(request: Request) -> str:
    if isinstance(request, SendRegister):
        return f"the register request for {request.registration_id}"
    return f"the status request for operation {request.operation_id}"


# --- reading answers -----------------------------------------------------------------------------


def _operation_status(reply: Reply, request: Request) -> RegistrationOperationStatus:
    try:
        op = decode_operation_status(reply.body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RemoteProtocolError(
            f"The service answered {_describe(request)} with HTTP {reply.status} and a body that is not a "
            f"registration operation status ({exc}): {_quote(reply.body)}"
        ) from exc
    if not op.operation_id.strip():
        raise RemoteProtocolError(f"The service answered {_describe(request)} with an empty operationId.")
    return op


def _assigned(op: RegistrationOperationStatus) -> RegistrationResult:
    state = op.registration_state
    if state is None or not state.assigned_hub or not state.device_id:
        raise RemoteProtocolError(
            f"The service says the device is assigned but names no hub or device id (operation {op.operation_id})."
        )
    return RegistrationResult.from_operation_status(op)


def _failed(op: RegistrationOperationStatus) -> RegistrationFailedError:
    state = op.registration_state
    reason = "the service gave no reason"
    error_code = None
    if state is not None and (state.error_message or state.error_code):
        error_code = state.error_code
        reason = state.error_message or "no message"
        if state.error_code:
            reason += f" (errorCode {state.error_code})"
    elif op.status is RegistrationStatus.DISABLED:
        reason = "the enrollment or the registration is disabled"
    return RegistrationFailedError(
        f"The registration ended '{op.status.value}': {reason}.",
        status=op.status,
        result=RegistrationResult.from_operation_status(op),
        error_code=error_code,
    )


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = bounded_json.decode(body, max_depth=bounded_json.REPLY_MAX_DEPTH)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, dict) else None


def _challenge(reply: Reply) -> TpmChallenge | None:
    document = _json_object(reply.body)
    if document is None or "authenticationKey" not in document:
        return None
    try:
        return msgspec.convert(document, TpmChallenge)
    except msgspec.ValidationError:
        return None


def _refusal(
    reply: Reply,
    request: Request,
    *,
    gave_up: str | None = None,
    challenge: TpmChallenge | None = None,
    challenged: bool = False,
) -> ServiceResponseError:
    """The error for a status the device does not (or no longer) retry, naming the service's
    message, errorCode and trackingId so that the cause is never lost."""
    body = _json_object(reply.body)
    if body is not None and ("message" in body or "errorCode" in body):
        message = str(body.get("message") or "no message").rstrip(".")
        details = [f"errorCode {body['errorCode']}" if "errorCode" in body else None]
        details.append(f"trackingId {body['trackingId']}" if body.get("trackingId") else None)
        cause = f"{message} ({', '.join(d for d in details if d)})" if any(details) else message
    elif reply.body.strip():
        cause = f"the body is not a DPS error: {_quote(reply.body)}"
    else:
        cause = "no error details"
    text = f"The service answered {_describe(request)} with HTTP {reply.status}: {cause}."
    if gave_up:
        text += f" Gave up: {gave_up}."
    if challenge is not None:
        text += (
            " This is a TPM challenge that was already answered once."
            if challenged
            else " This is a TPM challenge, which this security provider cannot answer."
        )
    return ServiceResponseError(text, status_code=reply.status, body=body)


def _quote(body: bytes) -> str:
    text = body[:_MAX_QUOTED_BODY].decode("utf-8", "replace")
    return repr(text + ("..." if len(body) > _MAX_QUOTED_BODY else ""))
