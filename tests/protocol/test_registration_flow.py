"""The sans-io registration flow, driven by hand: scripted replies, a fake clock, fixed jitter."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisiond import errors
from provisiond.errors import (
    ConnectError,
    LocalProtocolError,
    ProtocolError,
    ProvisioningError,
    RegistrationFailedError,
    RemoteProtocolError,
    ServiceResponseError,
)
from provisiond.models import RegistrationStatus, RegistrationSubstatus
from provisiond.protocol.registration import (
    AnswerChallenge,
    Command,
    RegistrationResult,
    Reply,
    RetryPolicy,
    SendPoll,
    SendRegister,
    Sleep,
    SleepReason,
    parse_retry_after,
    registration_flow,
)

START = 1_000.0


def op(status: str, operation_id: str = "op-1", **state: Any) -> bytes:
    doc: dict[str, Any] = {"operationId": operation_id, "status": status}
    if state or status != "assigning":
        doc["registrationState"] = {"registrationId": "dev-1", "status": status, **state}
    return json.dumps(doc).encode()


ASSIGNED = op(
    "assigned",
    assignedHub="hub.local",
    deviceId="dev-1",
    substatus="initialAssignment",
    payload={"answer": 42},
)
DPS_401 = json.dumps(
    {
        "errorCode": 401002,
        "trackingId": "tid-123",
        "message": "The device's credential is not valid for this enrollment.",
        "timestampUtc": "2025-01-01T00:00:00Z",
    }
).encode()


class Harness:
    """Drive a flow: answer each request with the next scripted reply (or throw the next
    exception into it), advance the fake clock on Sleep, and record every command."""

    def __init__(
        self,
        *replies: Reply | BaseException,
        policy: RetryPolicy | None = None,
        draw: float = 0.5,
        answers_challenges: bool = False,
        payload: Any = None,
        force: bool = False,
    ) -> None:
        self.now = START
        self.replies = list(replies)
        self.commands: list[Command] = []
        self.flow = registration_flow(
            "dev-1",
            payload=payload,
            force=force,
            policy=policy or RetryPolicy(),
            clock=lambda: self.now,
            random=lambda: draw,
            answers_challenges=answers_challenges,
        )

    def run(self) -> RegistrationResult:
        command = next(self.flow)
        try:
            while True:
                self.commands.append(command)
                if isinstance(command, Sleep):
                    self.now += command.seconds
                    command = self.flow.send(None)
                elif isinstance(command, AnswerChallenge):
                    command = self.flow.send(None)
                else:
                    reply = self.replies.pop(0)
                    if isinstance(reply, BaseException):
                        command = self.flow.throw(reply)
                    else:
                        command = self.flow.send(reply)
        except StopIteration as stop:
            assert not self.replies, f"unused replies: {self.replies}"
            result: RegistrationResult = stop.value
            return result

    @property
    def sleeps(self) -> list[Sleep]:
        return [c for c in self.commands if isinstance(c, Sleep)]

    @property
    def requests(self) -> list[Command]:
        return [c for c in self.commands if isinstance(c, SendRegister | SendPoll)]


# --- success paths -------------------------------------------------------------------------------


def test_terminal_status_in_the_register_answer_needs_no_poll() -> None:
    harness = Harness(Reply(status=202, body=ASSIGNED), payload={"model": "x1"}, force=True)
    result = harness.run()
    assert result == RegistrationResult(
        status=RegistrationStatus.ASSIGNED,
        assigned_hub="hub.local",
        device_id="dev-1",
        substatus=RegistrationSubstatus.INITIAL_ASSIGNMENT,
        payload={"answer": 42},
        registration_state=result.registration_state,
        operation_id="op-1",
    )
    assert result.registration_state is not None and result.registration_state.registration_id == "dev-1"
    [register] = harness.commands
    assert isinstance(register, SendRegister)
    assert register.force and register.registration_id == "dev-1"
    assert register.body.registration_id == "dev-1" and register.body.payload == {"model": "x1"}


def test_assigning_is_polled_after_retry_after() -> None:
    harness = Harness(
        Reply(status=202, body=op("assigning", "op-7"), retry_after=3),
        Reply(status=202, body=op("assigning", "op-7"), retry_after=1),
        Reply(status=200, body=op("assigned", "op-7", assignedHub="hub.local", deviceId="dev-1")),
    )
    result = harness.run()
    assert result.status is RegistrationStatus.ASSIGNED and result.operation_id == "op-7"
    assert [type(c).__name__ for c in harness.commands] == [
        "SendRegister",
        "Sleep",
        "SendPoll",
        "Sleep",
        "SendPoll",
    ]
    assert harness.sleeps == [
        Sleep(seconds=3, reason=SleepReason.POLL),
        Sleep(seconds=1, reason=SleepReason.POLL),
    ]
    assert harness.commands[2] == SendPoll(registration_id="dev-1", operation_id="op-7")


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        pytest.param(None, 2.0, id="absent-default-2s"),
        pytest.param(0, 0.1, id="zero-clamped-up"),
        pytest.param(10_000, 300.0, id="huge-clamped-down"),
    ],
)
def test_poll_delay_defaults_and_clamps(retry_after: float | None, expected: float) -> None:
    harness = Harness(
        Reply(status=202, body=op("assigning"), retry_after=retry_after),
        Reply(status=200, body=ASSIGNED),
        policy=RetryPolicy(total_timeout=1_000),
    )
    harness.run()
    assert harness.sleeps == [Sleep(seconds=expected, reason=SleepReason.POLL)]


# --- retries -------------------------------------------------------------------------------------


def test_429_is_retried_with_retry_after_as_the_floor_of_the_backoff() -> None:
    policy = RetryPolicy(initial_backoff=1, multiplier=2, max_backoff=30)
    harness = Harness(
        Reply(status=429, body=b"", retry_after=3),  # backoff 0.5 < floor 3
        Reply(status=429, body=b""),  # no floor: 0.5 * 2
        Reply(status=503, body=b"", retry_after=0.2),  # 0.5 * 4 > floor 0.2
        Reply(status=202, body=ASSIGNED),
        policy=policy,
        draw=0.5,
    )
    assert harness.run().device_id == "dev-1"
    assert [s.seconds for s in harness.sleeps] == [3, 1.0, 2.0]
    assert {s.reason for s in harness.sleeps} == {SleepReason.RETRY}
    registers = harness.requests
    assert len(registers) == 4 and all(r == registers[0] for r in registers), "the same request is re-sent"


@pytest.mark.parametrize("draw", [0.0, 0.25, 0.999999])
def test_backoff_stays_within_the_exponential_ceiling(draw: float) -> None:
    policy = RetryPolicy(
        max_attempts=8, initial_backoff=0.5, multiplier=3, max_backoff=10, total_timeout=1_000
    )
    harness = Harness(*[Reply(status=500)] * 7, Reply(status=202, body=ASSIGNED), policy=policy, draw=draw)
    harness.run()
    ceilings = [min(10, 0.5 * 3**n) for n in range(7)]
    delays = [s.seconds for s in harness.sleeps]
    assert all(0.1 <= d <= max(0.1, c) for d, c in zip(delays, ceilings, strict=True)), delays


def test_503_until_attempts_run_out_raises_service_response_error() -> None:
    body = json.dumps({"errorCode": 503000, "trackingId": "t-9", "message": "Service unavailable"}).encode()
    harness = Harness(*[Reply(status=503, body=body)] * 3, policy=RetryPolicy(max_attempts=3))
    with pytest.raises(ServiceResponseError) as info:
        harness.run()
    assert len(harness.requests) == 3 and len(harness.sleeps) == 2
    exc = info.value
    assert exc.status_code == 503 and exc.error_code == 503000 and exc.tracking_id == "t-9"
    assert "Service unavailable" in str(exc) and "503000" in str(exc) and "after 3 attempts" in str(exc)


def test_retrying_stops_at_the_total_timeout() -> None:
    policy = RetryPolicy(max_attempts=100, total_timeout=10)
    harness = Harness(*[Reply(status=429, retry_after=4)] * 3, policy=policy)
    with pytest.raises(ServiceResponseError, match="total_timeout of 10 s") as info:
        harness.run()
    assert info.value.status_code == 429
    assert harness.now - START == 8  # two waits of 4 s; a third would end past the deadline


def test_polling_stops_at_the_total_timeout() -> None:
    assigning = Reply(status=202, body=op("assigning"), retry_after=30)
    harness = Harness(*[assigning] * 3, policy=RetryPolicy(total_timeout=60))
    with pytest.raises(errors.TimeoutError, match="still assigning") as info:
        harness.run()
    assert isinstance(info.value, TimeoutError)  # also the builtin
    assert len(harness.requests) == 3 and harness.now - START == 60


def test_transport_errors_propagate_unless_the_policy_retries_them() -> None:
    with pytest.raises(ConnectError, match="refused"):
        Harness(ConnectError("connection refused")).run()

    harness = Harness(
        ConnectError("connection refused"),
        Reply(status=202, body=ASSIGNED),
        policy=RetryPolicy(retry_transport_errors=True),
    )
    assert harness.run().assigned_hub == "hub.local"
    assert [s.seconds for s in harness.sleeps] == [0.5]

    harness = Harness(
        *[ConnectError("refused")] * 2, policy=RetryPolicy(retry_transport_errors=True, max_attempts=2)
    )
    with pytest.raises(ConnectError):
        harness.run()


# --- refusals and terminal failures --------------------------------------------------------------


def test_401_with_a_dps_body_names_error_code_message_and_tracking_id() -> None:
    harness = Harness(Reply(status=401, body=DPS_401))
    with pytest.raises(ServiceResponseError) as info:
        harness.run()
    exc = info.value
    assert exc.status_code == 401 and exc.error_code == 401002 and exc.tracking_id == "tid-123"
    assert exc.body["message"].startswith("The device's credential")
    text = str(exc)
    assert (
        "HTTP 401" in text
        and "401002" in text
        and "tid-123" in text
        and "not valid for this enrollment" in text
    )
    assert len(harness.requests) == 1, "4xx is never retried"


@pytest.mark.parametrize(
    ("status", "body", "fragment"),
    [
        pytest.param(400, b"not json at all", "not a DPS error: 'not json at all'", id="400-text"),
        pytest.param(404, b"", "no error details", id="404-empty"),
        pytest.param(403, b'{"message": "Forbidden"}', "Forbidden", id="403-message-only"),
        pytest.param(302, b"", "HTTP 302", id="redirect"),
    ],
)
def test_other_statuses_are_refusals(status: int, body: bytes, fragment: str) -> None:
    with pytest.raises(ServiceResponseError, match="HTTP") as info:
        Harness(Reply(status=status, body=body)).run()
    assert info.value.status_code == status and fragment in str(info.value)


def test_a_refused_poll_says_so() -> None:
    harness = Harness(Reply(status=202, body=op("assigning", "op-3")), Reply(status=404, body=b""))
    with pytest.raises(ServiceResponseError, match="status request for operation op-3"):
        harness.run()


@pytest.mark.parametrize("status", [RegistrationStatus.FAILED, RegistrationStatus.DISABLED])
def test_failed_and_disabled_raise_with_the_result(status: RegistrationStatus) -> None:
    body = op(status.value, errorCode=400209, errorMessage="The hub refused the device")
    with pytest.raises(RegistrationFailedError) as info:
        Harness(Reply(status=200, body=body)).run()
    exc = info.value
    assert exc.status is status and exc.error_code == 400209
    assert isinstance(exc.result, RegistrationResult) and exc.result.status is status
    assert "The hub refused the device" in str(exc) and "400209" in str(exc)


def test_disabled_without_details_still_explains() -> None:
    body = json.dumps({"operationId": "o", "status": "disabled"}).encode()
    with pytest.raises(RegistrationFailedError, match="disabled"):
        Harness(Reply(status=200, body=body)).run()


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(op("unassigned"), id="unassigned"),
        pytest.param(b"{not json", id="garbage"),
        pytest.param(b"[1, 2]", id="array"),
        pytest.param(b'{"operationId": "o", "status": "blacklisted"}', id="unknown-status"),
        pytest.param(b'{"status": "assigned"}', id="no-operation-id"),
        pytest.param(b'{"operationId": " ", "status": "assigning"}', id="blank-operation-id"),
        pytest.param(op("assigned"), id="assigned-without-hub"),
    ],
)
def test_impossible_success_answers_are_remote_protocol_errors(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        Harness(Reply(status=202, body=body)).run()


# --- the TPM challenge seam ----------------------------------------------------------------------

CHALLENGE = json.dumps(
    {"message": "TPM challenge", "authenticationKey": "AAEC", "keyName": "registration"}
).encode()


def test_a_challenge_is_answered_once_then_the_register_is_resent() -> None:
    harness = Harness(
        Reply(status=401, body=CHALLENGE), Reply(status=202, body=ASSIGNED), answers_challenges=True
    )
    harness.run()
    kinds = [type(c).__name__ for c in harness.commands]
    assert kinds == ["SendRegister", "AnswerChallenge", "SendRegister"]
    answer = harness.commands[1]
    assert isinstance(answer, AnswerChallenge) and answer.challenge.authentication_key == "AAEC"


def test_a_challenge_without_a_provider_that_answers_it_is_refused() -> None:
    with pytest.raises(ServiceResponseError, match="cannot answer"):
        Harness(Reply(status=401, body=CHALLENGE)).run()
    with pytest.raises(ServiceResponseError, match="already answered"):
        Harness(
            Reply(status=401, body=CHALLENGE), Reply(status=401, body=CHALLENGE), answers_challenges=True
        ).run()


# --- driver misuse, configuration and helpers ----------------------------------------------------


def test_driver_misuse_is_a_local_protocol_error() -> None:
    flow = registration_flow("dev-1", policy=RetryPolicy(), clock=lambda: 0.0, random=lambda: 0.5)
    next(flow)
    with pytest.raises(LocalProtocolError, match="without a Reply"):
        flow.send(None)

    flow = registration_flow("dev-1", policy=RetryPolicy(), clock=lambda: 0.0, random=lambda: 0.5)
    next(flow)
    assert isinstance(flow.send(Reply(status=202, body=op("assigning"))), Sleep)
    with pytest.raises(LocalProtocolError, match="send None"):
        flow.send(Reply(status=200))

    with pytest.raises(LocalProtocolError):
        next(registration_flow(" ", policy=RetryPolicy(), clock=lambda: 0.0, random=lambda: 0.5))
    with pytest.raises(LocalProtocolError):
        Reply(status=42)
    with pytest.raises(ProtocolError):  # both halves share the abstract base ...
        Sleep(seconds=-1, reason=SleepReason.POLL)
    with pytest.raises(TypeError):  # ... which cannot be raised itself
        ProtocolError("abstract")


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"max_attempts": 0}, id="no-attempts"),
        pytest.param({"initial_backoff": 0}, id="zero-backoff"),
        pytest.param({"initial_backoff": 5, "max_backoff": 1}, id="max-below-initial"),
        pytest.param({"multiplier": 0.5}, id="shrinking"),
        pytest.param({"total_timeout": float("inf")}, id="infinite-timeout"),
    ],
)
def test_retry_policy_is_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_retry_policy_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        RetryPolicy(3)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        (" 2 ", 2.0),
        (b"7", 7.0),
        ("1.5", 1.5),
        (3, 3.0),
        (None, None),
        ("", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ("-1", None),
        ("nan", None),
        ("inf", None),
        (True, None),
    ],
)
def test_parse_retry_after(value: Any, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


@settings(max_examples=150, deadline=None)
@given(
    status=st.sampled_from([200, 201, 202, 204, 400, 401, 404, 409, 429, 500, 503]),
    body=st.one_of(
        st.binary(max_size=64),
        st.sampled_from([ASSIGNED, op("assigning"), op("failed"), op("unassigned"), DPS_401, CHALLENGE]),
    ),
    retry_after=st.one_of(st.none(), st.floats(min_value=0, max_value=1e6)),
)
def test_any_answer_ends_in_a_result_a_next_step_or_a_provisioning_error(
    status: int, body: bytes, retry_after: float | None
) -> None:
    """h11's fuzz invariant: the flow handles any answer, or raises one of ours, never anything else."""
    flow = registration_flow("dev-1", policy=RetryPolicy(), clock=lambda: 0.0, random=lambda: 0.5)
    next(flow)
    try:
        step = flow.send(Reply(status=status, body=body, retry_after=retry_after))
    except StopIteration as stop:
        assert isinstance(stop.value, RegistrationResult)
    except ProvisioningError:
        pass
    else:
        assert isinstance(step, Sleep)
