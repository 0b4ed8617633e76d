"""The registrar: one use case for every transport. A device's request (HTTPS, MQTT or AMQP)
arrives as a :class:`DeviceRequest`; the registrar runs it through named steps, each of which
belongs to a collaborator that can be replaced (all injected, with defaults):

1. **Check the request** (``_check_request``): the registration id's syntax, the body's id,
   the ID scope. Within the rate limits (``limiter``): a source over its budget of failed
   attestations is refused first, a failed attestation spends that budget, and only an attested
   request counts against the device's own limit.
2. **Attest** (``attestors``, :func:`provisiond.attestation.base.attest`): the credential's shape
   picks the attestors; the individual enrollment decides first, then groups. The result is a
   :class:`~provisiond.attestation.base.Match`. A TPM's first register gets its challenge
   (:class:`~provisiond.errors.TpmChallengeRequired`).
3. **Load the previous record** of the registration id (polls, re-registrations, races): read
   once, before attesting, since its enrollment group is the symmetric-key attestor's first try.
4. **Choose the hub** (:func:`~provisiond.service.assignment.choose_hub`, pure): the
   enrollment's allocation policy (or the service's), its reprovision policy, the linked hubs;
   ``custom`` asks the enrollment's webhook (``webhook``, the only slow step).
5. **Decide** (:func:`~provisiond.service.assignment.decide`, pure): the record (status,
   substatus, hub, device id, errorCode) and the identity change (put, twin, remove old).
6. **Commit** (``hubs``): the built-in hub plans the identity writes, and they commit with the
   record in one transaction (``Store.write_atomic``): both land or neither does, so a
   registration is never half written. The record is a create, or an update on the etag read in
   step 3; the identity a create, or an update on its etag. When two registrations of one id
   race, one transaction wins and the other answers with the winner's record: one identity, one
   record. After a failed commit (nothing written), steps 4-6 run again on what is stored.
7. **Answer within the budget.** With custom allocation, steps 3-6 run as a task and the
   request waits for it up to ``settings.assignment_budget``. A slower assignment records
   ``assigning`` under the operation id and answers that; the task then writes its result over
   that record, and the device's polls see it. Should the task fail, it leaves a ``failed``
   record, so that polls end.

Authentication failures raise :class:`~provisiond.errors.AuthenticationError` (401, nothing
written). Outcomes the device should see as a registration result (disabled enrollment, no hub,
a hub that refused the identity) are written as records with status ``disabled`` or ``failed``
and DPS's errorCode.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec

from .._ids import uuid4_text
from ..attestation.base import Attestor, Evidence, Match, attest
from ..attestation.symmetric_key import SymmetricKeyAttestor
from ..attestation.tpm import TpmAttestor
from ..attestation.x509 import X509Attestor
from ..errors import (
    AuthenticationError,
    ConflictError,
    DpsCode,
    InvalidBodyError,
    NotFoundError,
    PreconditionFailedError,
    TpmChallengeRequired,
)
from ..hub import BuiltinHub, HubBackends, HubError, Planned
from ..hub.outbox import ItemKind, OutboxItem, StoredChange, item_write
from ..models import AllocationPolicy, LinkedHub, RegistrationStatus
from ..protocol.messages import DeviceRegistration, DeviceRegistrationResult, RegistrationOperationStatus
from ..storage import Collection, Record, WriteMode, utc_iso
from . import records
from .assignment import (
    AskWebhook,
    Assign,
    Decision,
    Facts,
    NoHub,
    choose_hub,
    decide,
    fail_in_hub,
    webhook_request,
)
from .context import ServiceContext
from .enrollments import validate_id
from .hub_writer import HubWriter
from .records import RegistrationRecord
from .sources import PrefetchedSources, StoreSources
from .throttle import RateLimiter
from .webhook import AllocationRequest, AllocationResponse, AllocationWebhook, WebhookError

__all__ = ["DeviceRequest", "Registrar", "Webhook"]

log = logging.getLogger("provisiond.registrar")

_WRITE_ATTEMPTS = 3
#: How stale the registration path may see the settings, linked hubs and enrollment groups
#: (seconds): they change rarely, and reading them on every registration doubled its database
#: round trips (the groups' query also cost a hop to a reader thread).
CONFIG_MAX_AGE = 1.0


class DeviceRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A device's register / status request, as every transport hands it over."""

    id_scope: str
    registration_id: str
    body: DeviceRegistration
    authorization: str | None = None
    client_chain: Sequence[bytes] = ()
    transport: str = "https"
    #: The address the request came from (the rate limits count failed attestations per source).
    source: str | None = None


class Webhook(Protocol):
    """Calls custom allocation webhooks (:class:`~provisiond.service.webhook.AllocationWebhook`)."""

    async def allocate(
        self, url: str, request: AllocationRequest, candidates: Sequence[str]
    ) -> AllocationResponse: ...

    async def aclose(self) -> None: ...


class _Attempt(msgspec.Struct, frozen=True):
    """A commit attempt: the record written, or the record found instead and the one the
    attempt was based on."""

    written: Record | None = None
    latest: Record | None = None
    based_on: Record | None = None
    #: The outbox item written with an 'assigning' record (a remote hub's identity), and
    #: whether it was queued for the writer loop (a paced hub) rather than leased to this request.
    item: Record | None = None
    queued: bool = False


def _new_operation_id() -> str:
    return uuid4_text()


class Registrar:
    """The registration use case (see the module docstring for the steps).

    :param attestors: one per attestation type, in the order their credentials are tried.
    :param hubs: the hub backends.
    :param webhook: calls custom allocation webhooks.
    :param clock: Unix seconds (token expiry, certificate validity, record timestamps).
    :param random: random bytes (TPM keys and blobs).
    :param new_operation_id: makes operation ids.
    :param limiter: the device API's rate limits.
    """

    def __init__(
        self,
        ctx: ServiceContext,
        *,
        attestors: Sequence[Attestor[Any]] | None = None,
        hubs: HubBackends | None = None,
        webhook: Webhook | None = None,
        clock: Callable[[], float] | None = None,
        random: Callable[[int], bytes] = secrets.token_bytes,
        new_operation_id: Callable[[], str] = _new_operation_id,
        limiter: RateLimiter | None = None,
        writer: HubWriter | None = None,
    ) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.clock = clock or ctx.clock
        self.sources = StoreSources(
            ctx.store, groups=lambda attestation: ctx.enrollment_groups(attestation, max_age=CONFIG_MAX_AGE)
        )
        skew = ctx.settings.clock_skew
        #: The TPM attestor (also the AMQP SASL ``TPM`` mechanism's: challenge and answer).
        self.tpm = TpmAttestor(self.sources, self.sources, clock=self.clock, clock_skew=skew, random=random)
        self.attestors: Sequence[Attestor[Any]] = (
            attestors
            if attestors is not None
            else (
                SymmetricKeyAttestor(self.sources, clock_skew=skew),
                X509Attestor(self.sources, self.sources),
                self.tpm,
            )
        )
        self.hubs = hubs or HubBackends(BuiltinHub(ctx.store, clock=self.clock))
        #: Works the outbox items of remote hubs (the app runs its loop).
        self.writer = writer or HubWriter(ctx, self.hubs, clock=self.clock)
        self.webhook: Webhook = webhook or AllocationWebhook(
            timeout=ctx.settings.webhook_timeout, ca_file=ctx.settings.webhook_ca_file
        )
        self.limiter = limiter or ctx.limiter
        self._new_operation_id = new_operation_id
        # Registrations still finishing after their request answered 'assigning'.
        self._background: set[asyncio.Task[Any]] = set()

    # --- entry points ------------------------------------------------------------------------

    async def register(self, request: DeviceRequest) -> RegistrationOperationStatus:
        """Register a device and return the operation status: terminal when the assignment
        finishes within ``settings.assignment_budget`` (the common case, milliseconds), else
        ``assigning`` (recorded, so that polls on any node see it) while it finishes in the
        background.

        :raises AuthenticationError: the device did not prove an enrollment's credential.
        :raises InvalidBodyError, InvalidIdError: the request is malformed.
        """
        match, previous = await self._attest(request, registering=True)
        operation_id = self._new_operation_id()
        if match.enrollment.allocation_policy is not AllocationPolicy.CUSTOM:
            # Only a webhook can be slow: everything else finishes in well under a millisecond
            # of work, so it runs in this request without a task (that costs about 10%).
            return await self._assign(request, match, operation_id, previous)
        return await self._assign_within_budget(request, match, operation_id, previous)

    async def operation_status(
        self, request: DeviceRequest, operation_id: str
    ) -> RegistrationOperationStatus:
        """The status of an earlier register operation (the device must attest again).

        :raises NotFoundError: no such operation for this registration id.
        """
        _, record = await self._attest(request)
        if record is None or records.decode(record).operation_id != operation_id:
            raise NotFoundError(
                f"No registration operation {operation_id[:64]!r} for {request.registration_id!r}.",
                error_code=DpsCode.OPERATION_NOT_FOUND,
            )
        return records.operation_view(record)

    async def status_lookup(self, request: DeviceRequest) -> DeviceRegistrationResult:
        """The device's registration record (``POST /{idScope}/registrations/{id}``)."""
        _, record = await self._attest(request)
        if record is None:
            raise NotFoundError(
                f"{request.registration_id!r} has not registered.", error_code=DpsCode.REGISTRATION_NOT_FOUND
            )
        return records.device_view(record)

    # --- 1, 2: check the request and attest ----------------------------------------------------

    async def _attest(
        self, request: DeviceRequest, *, registering: bool = False
    ) -> tuple[Match, Record | None]:
        """Check the request and attest the device, within the rate limits; the match and the
        registration record as read before attesting (read once: its group is the attestation's
        hint, and the register, poll or lookup goes on from it).

        :raises ThrottledError: over a limit (429 with ``retry_after``).
        :raises AuthenticationError: the device did not prove an enrollment's credential.
        """
        self.limiter.admit(request.source)
        try:
            await self._check_request(request)
            # The record and the individual enrollment the attestation looks for first, together.
            record, individual = await self.store.get_each(
                [
                    (Collection.REGISTRATIONS, request.registration_id),
                    (Collection.ENROLLMENTS, request.registration_id),
                ]
            )
            last_group = records.decode(record).enrollment_group_id if record is not None else None
            evidence = self._evidence(request, registering, last_group)
            enrollments = PrefetchedSources(self.sources, request.registration_id, individual)
            match = await attest(evidence, self.attestors, enrollments)
        except TpmChallengeRequired:
            raise  # the first step of TPM attestation, not a failure
        except AuthenticationError:
            self.limiter.failed(request.source)
            raise
        self.limiter.attested(request.registration_id)
        return match, record

    async def _check_request(self, request: DeviceRequest) -> None:
        validate_id(request.registration_id, "registrationId")
        body_id = request.body.registration_id
        if body_id is not None and body_id.lower() != request.registration_id.lower():
            raise InvalidBodyError(
                f"registrationId {body_id[:140]!r} in the body differs from {request.registration_id!r} in the address."
            )
        settings = await self.ctx.service_settings(max_age=CONFIG_MAX_AGE)
        if request.id_scope.lower() != (settings.id_scope or "").lower():
            raise AuthenticationError(
                f"ID scope {request.id_scope[:40]!r} is not this service's; check the ID scope the device uses.",
                error_code=DpsCode.TOKEN_AUDIENCE,
            )

    def _evidence(self, request: DeviceRequest, registering: bool, last_group: str | None) -> Evidence:
        return Evidence(
            id_scope=request.id_scope,
            registration_id=request.registration_id,
            authorization=request.authorization,
            client_chain=request.client_chain,
            tpm=request.body.tpm,
            registering=registering,
            last_group=last_group,
            now=self.clock(),
        )

    # --- 3-6: load the previous record, choose the hub, decide, commit -------------------------

    async def _assign(
        self, request: DeviceRequest, match: Match, operation_id: str, previous: Record | None
    ) -> RegistrationOperationStatus:
        """Steps 3-6 over ``previous``, the record as read (a stale one costs a retry: the
        commit is conditional on its etag)."""
        reg_id = request.registration_id
        in_flight = await self._in_flight(reg_id, previous)
        if in_flight is not None:
            return in_flight
        for attempt in range(_WRITE_ATTEMPTS):
            decision = await self._decide(request, match, previous, operation_id)
            # After a failed commit, plan on what is stored: the identity may exist although the
            # record does not (deleted with its individual enrollment, or through the API).
            result = await self._commit(request, match, decision, previous, operation_id, first=attempt == 0)
            if result.written is not None and result.item is not None:
                return await self._await_writer(request, result.item, result.written, queued=result.queued)
            if result.written is not None:
                return records.operation_view(result.written)
            in_flight = await self._in_flight(reg_id, result.latest)
            if in_flight is not None:
                return in_flight
            latest, previous = result.latest, result.based_on
            # Nothing was written. If a concurrent registration of the same id won, answer with
            # its record; otherwise decide again.
            if latest is not None and (previous is None or latest.etag != previous.etag):
                return records.operation_view(latest)
            previous = latest
        raise ConflictError(
            f"The registration of {reg_id!r} kept changing under concurrent writes; retry.",
            error_code=DpsCode.REGISTRATION_CONTENDED,
        )

    async def _decide(
        self, request: DeviceRequest, match: Match, previous: Record | None, operation_id: str
    ) -> Decision:
        facts = Facts(
            registration_id=request.registration_id,
            record_id=previous.id if previous else request.registration_id,
            operation_id=operation_id,
            now=utc_iso(self.clock()),
            match=match,
            previous=records.decode(previous) if previous else None,
            payload=request.body.payload,
        )
        linked = await self.ctx.linked_hubs(max_age=CONFIG_MAX_AGE)
        default_policy = None
        if match.enrollment.allocation_policy is None:
            default_policy = (await self.ctx.service_settings(max_age=CONFIG_MAX_AGE)).allocation_policy
        choice = choose_hub(facts, linked, default_policy, region=self.ctx.settings.region)
        if isinstance(choice, AskWebhook):
            return decide(facts, await self._ask_webhook(facts, choice, request))
        return decide(facts, choice)

    async def _ask_webhook(self, facts: Facts, ask: AskWebhook, request: DeviceRequest) -> Assign | NoHub:
        """The custom allocation webhook's answer (service-api.md §8), as a hub choice."""
        body = webhook_request(facts, ask.candidates, request.body.tpm)
        try:
            answer = await self.webhook.allocate(ask.url, body, body.linked_hubs)
        except WebhookError as exc:
            return NoHub(DpsCode.CUSTOM_ALLOCATION_FAILED, str(exc))
        hubs: dict[str, LinkedHub] = {hub.host_name.lower(): hub for hub in ask.candidates}
        hub = hubs.get((answer.iot_hub_host_name or "").lower())
        if hub is None:  # the webhook caller checks this; a replaced one may not
            return NoHub(
                DpsCode.CUSTOM_ALLOCATION_FAILED, "The webhook answered a hub that is not a candidate."
            )
        return Assign(hub, custom=answer)

    async def _commit(
        self,
        request: DeviceRequest,
        match: Match,
        decision: Decision,
        previous: Record | None,
        operation_id: str,
        *,
        first: bool,
    ) -> _Attempt:
        """Write the record and its identity in one transaction, over ``previous``; for a
        remote hub, the record ``assigning`` and the outbox item that writes the identity."""
        decision, identity = await self._plan_identity(request, match, decision, first=first)
        reg_id = request.registration_id
        latest = previous
        outbox = decision.identity is not None and not identity
        for _ in range(_WRITE_ATTEMPTS):
            try:
                if outbox:
                    item, interim, queued = self._outbox_writes(decision, previous)
                    written = await self.store.write_atomic([item, interim])
                    return _Attempt(written=written[-1], item=written[0], queued=queued)
                written = await self.store.write_atomic(
                    [*identity, records.write(reg_id, decision.record, previous)]
                )
                return _Attempt(written=written[-1])
            except (ConflictError, PreconditionFailedError):
                latest = await self.store.get(Collection.REGISTRATIONS, reg_id)
            if latest is None or not _is_interim(latest, operation_id):
                break
            # Our own 'assigning' record (the request ran out of budget): the plan still holds;
            # write over it.
            previous = latest
        return _Attempt(latest=latest, based_on=previous)

    async def _plan_identity(
        self, request: DeviceRequest, match: Match, decision: Decision, *, first: bool
    ) -> tuple[Decision, list[Planned]]:
        """The identity writes that commit with the record (the built-in hub's transactional
        path), or the decision turned into a failure when the hub cannot take the identity."""
        change = decision.identity
        identity: list[Planned] = []
        if change is not None and not self.hubs.is_transactional(
            change, await self.ctx.linked_hubs(max_age=CONFIG_MAX_AGE)
        ):
            self._log_decision(request, match, decision)
            return decision, []  # through the outbox (_outbox_writes)
        if change is not None:
            try:
                backend = self.hubs.transactional(change)
                identity = await backend.plan(change, probably_new=first and change.probably_new)
            except HubError as exc:
                log.warning(
                    "registration %s failed in hub %s: %s [%s]",
                    request.registration_id,
                    change.put.hub.host_name,
                    exc,
                    request.transport,
                )
                return fail_in_hub(decision, str(exc)), []
        self._log_decision(request, match, decision)
        return decision, identity

    def _outbox_writes(self, decision: Decision, previous: Record | None) -> tuple[Planned, Planned, bool]:
        """The outbox item that writes a remote hub's identity and the 'assigning' record that
        commits with it. The item is leased to this request, which works it at once, unless the
        hub has a write budget: then it is queued for the writer loop, which coalesces new
        identities into bulk calls (the third value says which)."""
        change, decided = decision.identity, decision.record
        assert change is not None and decided.operation_id is not None
        reg_id = decided.registration_id or change.put.registration_id
        now = self.clock()
        item = OutboxItem(
            kind=ItemKind.ASSIGN,
            hub=change.put.ref.hub,
            created=utc_iso(now),
            change=StoredChange.of(change),
            registration_id=reg_id,
            operation_id=decided.operation_id,
            outcome=msgspec.to_builtins(decided),
        )
        interim = RegistrationRecord(
            registration_id=decided.registration_id,
            created_date_time_utc=decided.created_date_time_utc,
            last_updated_date_time_utc=decided.last_updated_date_time_utc,
            status=RegistrationStatus.ASSIGNING,
            operation_id=decided.operation_id,
            enrollment_group_id=decided.enrollment_group_id,
            attestation_type=decided.attestation_type,
        )
        queued = change.put.hub.registry_write_budget() is not None
        due, owner = (now, None) if queued else (now + self.writer.lease, self.writer.node)
        return (
            item_write(reg_id, item, due=due, owner=owner, mode=WriteMode.CREATE),
            records.write(reg_id, interim, previous),
            queued,
        )

    async def _in_flight(self, reg_id: str, record: Record | None) -> RegistrationOperationStatus | None:
        """The answer for a registration whose hub write is still in the outbox: the operation
        in flight ('assigning'); ``None`` when there is none."""
        if record is None or records.decode(record).status is not RegistrationStatus.ASSIGNING:
            return None
        if await self.store.get(Collection.HUB_OUTBOX, reg_id) is None:
            return None
        return records.operation_view(record)

    async def _await_writer(
        self, request: DeviceRequest, item: Record, interim: Record, *, queued: bool
    ) -> RegistrationOperationStatus:
        """Work the outbox item in this node (or, queued, let the writer loop take it), waiting
        for it up to the assignment budget; the record as it then is (``assigning`` when the
        hub is slower)."""
        if queued:
            done: asyncio.Future[Any] = asyncio.ensure_future(self.writer.watch(item.id).wait())
            self.writer.wake()
        else:
            done = asyncio.create_task(self.writer.work(item))
            self._background.add(done)
            done.add_done_callback(self._finished)
        try:
            await asyncio.wait_for(asyncio.shield(done), self.ctx.settings.assignment_budget)
        except TimeoutError:
            if queued:  # the writer loop (here or on another node) finishes it; polls will see it
                done.cancel()
                self.writer.unwatch(item.id)
            log.info(
                "registration %s: the hub write is taking longer than %g s: answering 'assigning' [%s]",
                request.registration_id,
                self.ctx.settings.assignment_budget,
                request.transport,
            )
            return records.operation_view(interim)
        latest = await self.store.get(Collection.REGISTRATIONS, request.registration_id)
        return records.operation_view(latest if latest is not None else interim)

    @staticmethod
    def _log_decision(request: DeviceRequest, match: Match, decision: Decision) -> None:
        record, reg_id, transport = decision.record, request.registration_id, request.transport
        if record.status is RegistrationStatus.ASSIGNED and decision.identity is not None:
            log.info(
                "registration %s assigned to %s as %s by the %s (%s) [%s]",
                reg_id,
                decision.identity.put.hub.host_name,
                record.device_id,
                match.label,
                record.substatus.value if record.substatus else None,
                transport,
            )
        elif record.status is RegistrationStatus.DISABLED:
            log.info("registration %s denied: the %s is disabled [%s]", reg_id, match.label, transport)
        else:
            # A webhook's failure is the operator's to fix; no linked hub is the enrollment's.
            level = logging.WARNING if record.error_code == DpsCode.CUSTOM_ALLOCATION_FAILED else logging.INFO
            log.log(level, "registration %s failed: %s [%s]", reg_id, record.error_message, transport)

    # --- 7: answer within the budget ------------------------------------------------------------

    async def _assign_within_budget(
        self, request: DeviceRequest, match: Match, operation_id: str, previous: Record | None
    ) -> RegistrationOperationStatus:
        task = asyncio.create_task(self._assign_in_background(request, match, operation_id, previous))
        self._background.add(task)
        task.add_done_callback(self._finished)
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.ctx.settings.assignment_budget)
        except TimeoutError:
            pass
        interim = await self._record_assigning(request, operation_id)
        if interim is None:  # the assignment finished meanwhile
            return await task
        log.info(
            "registration %s is taking longer than %g s: answering 'assigning' (operation %s) [%s]",
            request.registration_id,
            self.ctx.settings.assignment_budget,
            operation_id,
            request.transport,
        )
        return records.operation_view(interim)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a registration failed in the background", exc_info=task.exception())

    async def _assign_in_background(
        self, request: DeviceRequest, match: Match, operation_id: str, previous: Record | None
    ) -> RegistrationOperationStatus:
        try:
            return await self._assign(request, match, operation_id, previous)
        except Exception as exc:
            # Nobody may be waiting for this answer any more: leave a failed record behind an
            # 'assigning' one, so that the device's polls end.
            await self._fail_assigning(request, operation_id, exc)
            raise

    async def _record_assigning(self, request: DeviceRequest, operation_id: str) -> Record | None:
        """Write the 'assigning' record of a slow registration; ``None`` when the registration
        finished first (its record carries ``operation_id`` and a terminal status)."""
        reg_id = request.registration_id
        for _ in range(_WRITE_ATTEMPTS):
            previous = await self.store.get(Collection.REGISTRATIONS, reg_id)
            old = records.decode(previous) if previous else None
            if old is not None and old.operation_id == operation_id:
                return None
            now = utc_iso(self.clock())
            state = RegistrationRecord(
                registration_id=previous.id if previous else reg_id,
                created_date_time_utc=(old.created_date_time_utc if old else None) or now,
                last_updated_date_time_utc=now,
                status=RegistrationStatus.ASSIGNING,
                operation_id=operation_id,
                enrollment_group_id=old.enrollment_group_id if old else None,
                attestation_type=old.attestation_type if old else None,
            )
            try:
                [record] = await self.store.write_atomic([records.write(reg_id, state, previous)])
                return record
            except (ConflictError, PreconditionFailedError):
                continue
        return None

    async def _fail_assigning(self, request: DeviceRequest, operation_id: str, exc: Exception) -> None:
        record = await self.store.get(Collection.REGISTRATIONS, request.registration_id)
        if record is None or not _is_interim(record, operation_id):
            return
        failed = msgspec.structs.replace(
            records.decode(record),
            status=RegistrationStatus.FAILED,
            error_code=DpsCode.INTERNAL,
            error_message=f"The assignment failed: {exc}",
            last_updated_date_time_utc=utc_iso(self.clock()),
        )
        try:
            await self.store.write_atomic([records.write(request.registration_id, failed, record)])
        except (ConflictError, PreconditionFailedError):
            pass


def _is_interim(record: Record, operation_id: str) -> bool:
    """Whether ``record`` is the 'assigning' record of ``operation_id``."""
    stored = records.decode(record)
    return stored.operation_id == operation_id and stored.status is RegistrationStatus.ASSIGNING
