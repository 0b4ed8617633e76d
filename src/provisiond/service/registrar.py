"""The registrar: one use case for every transport. A device's request (whatever carried it:
HTTPS now, MQTT and AMQP later) arrives as a :class:`DeviceRequest`; the registrar attests it,
matches it to an enrollment, allocates a hub, creates the identity there, and writes the
registration record.

Theory of operation
-------------------
1. **Attest and match** (``_match``): the credential decides the path. A SAS token means
   symmetric key: the individual enrollment of that registration id if there is one (its keys
   must have signed the token), else the first symmetric-key group whose derived key did. A
   client certificate chain (and no token) means X.509: the leaf's CN must be the registration
   id; an individual enrollment matches the leaf (or a certificate of its chain), else the chain
   is walked from the first intermediate up to the root for a group (its signing certificate or
   a verified CA it references), and the chain is verified up to what matched. The first match
   decides: an individual enrollment wins over groups, a disabled match denies. TPM: a register
   with the EK and SRK and no credential gets a challenge (401); the token of the retried
   register, for an individual TPM enrollment, must be signed in the TPM with the challenge's
   key (``attestation/tpm.py``), and the result wraps the hub identity's key for that TPM.
2. **Allocate** with the enrollment's policy (or the service default) and its reprovision
   policy, given the device's previous registration record (``custom``: the enrollment's
   webhook, ``webhook.py``; its initialTwin and payload override the twin and the payload).
3. **Plan the identity** in the chosen hub, with authentication that matches the attestation
   (X.509: ``selfSigned`` with the presented leaf's SHA-256 thumbprint, as DPS does, unless the
   hub asks for ``certificateAuthority`` group devices), the enrollment's capabilities and
   initial twin (unless data is migrated or kept; an identity that must be created always gets
   the current initial twin), and the removal of the old identity when the device moves.
4. **Commit identity and record in one transaction** (``Store.write_atomic``): the record is a
   create, or an update on the etag read in step 2; the identity a create, or an update on its
   etag. Either everything lands or nothing does, so a registration is never half written.
   When two registrations of one id race, one transaction wins and the other answers with the
   winner's record: one identity, one record.
5. **Answer within the budget.** With custom allocation (a webhook, the only slow step), steps
   2-4 run as a task and the request waits for it up to ``settings.assignment_budget``. A
   slower assignment records ``assigning`` under the operation id and answers that; the task
   then writes its result over that record, and the device's polls see it. Should the task
   fail, it leaves a ``failed`` record, so that polls end.

Authentication failures raise :class:`~provisiond.errors.AuthenticationError` (401, nothing
written). Outcomes the device should see as a registration result (disabled enrollment, no hub)
are written as records with status ``disabled`` or ``failed`` and DPS's errorCode.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from .. import certificates
from ..allocation import AllocationError, allocate, candidate_hubs
from ..attestation import symmetric_key as sk
from ..attestation import tpm as tpm_att
from ..attestation import x509 as x5
from ..errors import (
    AuthenticationError,
    ConflictError,
    DpsCode,
    InvalidBodyError,
    NotFoundError,
    PreconditionFailedError,
    TpmChallengeRequired,
)
from ..hub import (
    DeviceAuthentication,
    HubError,
    HubRegistry,
    Planned,
    SymmetricKeyAuth,
    twin_from,
    x509_authentication,
)
from ..models import (
    AllocationPolicy,
    AttestationType,
    CaCertificate,
    EnrollmentGroup,
    IndividualEnrollment,
    LinkedHub,
    ProvisioningStatus,
    RegistrationStatus,
    RegistrationSubstatus,
    ReprovisionPolicy,
    X509CertificateInfo,
)
from ..protocol.messages import (
    DeviceRegistration,
    DeviceRegistrationResult,
    RegistrationOperationStatus,
    SymmetricKeyRegistrationResult,
    TpmRegistrationResult,
    X509RegistrationResult,
)
from ..protocol.sas import derive_device_key
from ..storage import Collection, Record, Write, WriteMode, utc_now
from .context import ServiceContext
from .enrollments import strip_secrets, validate_id
from .webhook import (
    AllocationRequest,
    AllocationResponse,
    AllocationWebhook,
    DeviceRuntimeContext,
    WebhookError,
)

__all__ = ["DeviceRequest", "Registrar", "StoredRegistration"]

log = logging.getLogger("provisiond.registrar")

_WRITE_ATTEMPTS = 3
#: How stale the registration path may see the settings and linked hubs (seconds): they change
#: rarely, and reading them on every registration doubled its database round trips.
CONFIG_MAX_AGE = 1.0


@dataclass(frozen=True, kw_only=True)
class DeviceRequest:
    """A device's register / status request, as every transport hands it over."""

    id_scope: str
    registration_id: str
    body: DeviceRegistration
    authorization: str | None = None
    client_chain: Sequence[bytes] = ()
    force: bool = False
    transport: str = "https"
    #: The address the request came from (the rate limits count failed attestations per source).
    source: str | None = None


class StoredRegistration(DeviceRegistrationResult, kw_only=True):
    """The registration record as stored: what the device is told, plus what the service
    needs to answer polls and re-registrations."""

    operation_id: str | None = None
    enrollment_group_id: str | None = None
    attestation_type: str | None = None


@dataclass(frozen=True)
class _Match:
    individual: IndividualEnrollment | None
    group: EnrollmentGroup | None
    attestation: AttestationType
    x509: X509RegistrationResult | None = None
    leaf_sha256: str | None = None
    tpm: tpm_att.TpmProof | None = None
    hub_keys: tuple[bytes, bytes] | None = None  # TPM: the hub identity's keys (primary wrapped for the TPM)

    @property
    def enrollment(self) -> IndividualEnrollment | EnrollmentGroup:
        enrollment = self.individual or self.group
        assert enrollment is not None
        return enrollment

    @property
    def label(self) -> str:
        if self.individual is not None:
            return f"individual enrollment {self.individual.registration_id!r}"
        assert self.group is not None
        return f"enrollment group {self.group.enrollment_group_id!r}"


def _decode(record: Record, type_: type[Any]) -> Any:
    return msgspec.json.decode(record.doc, type=type_)


class Registrar:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.hubs = HubRegistry(ctx.store)
        # Registrations still finishing after their request answered 'assigning'.
        self._background: set[asyncio.Task[RegistrationOperationStatus]] = set()
        self.tpm = tpm_att.TpmAttestor(ctx.store, clock=ctx.clock)
        self.webhook = AllocationWebhook(
            timeout=ctx.settings.webhook_timeout, ca_file=ctx.settings.webhook_ca_file
        )

    # --- entry points ------------------------------------------------------------------------

    async def register(self, request: DeviceRequest) -> RegistrationOperationStatus:
        """Register a device and return the operation status: terminal when the assignment
        finishes within ``settings.assignment_budget`` (the common case, milliseconds), else
        ``assigning`` (recorded, so that polls on any node see it) while it finishes in the
        background.

        :raises AuthenticationError: the device did not prove an enrollment's credential.
        :raises InvalidBodyError, InvalidIdError: the request is malformed.
        """
        match = await self._attest(request, registering=True)
        operation_id = str(uuid.uuid4())
        if match.enrollment.allocation_policy is not AllocationPolicy.CUSTOM:
            # Only a webhook can be slow: everything else finishes in well under a millisecond
            # of work, so it runs in this request without a task (that costs about 10%).
            return await self._commit(request, match, operation_id)
        task = asyncio.create_task(self._complete(request, match, operation_id))
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
        return self._operation(interim)

    def _finished(self, task: asyncio.Task[RegistrationOperationStatus]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a registration failed in the background", exc_info=task.exception())

    async def _complete(
        self, request: DeviceRequest, match: _Match, operation_id: str
    ) -> RegistrationOperationStatus:
        """Assign and commit identity and record together (see the theory of operation)."""
        try:
            return await self._commit(request, match, operation_id)
        except Exception as exc:
            # Nobody may be waiting for this answer any more: leave a failed record behind an
            # 'assigning' one, so that the device's polls end.
            await self._fail_assigning(request, operation_id, exc)
            raise

    async def _commit(
        self, request: DeviceRequest, match: _Match, operation_id: str
    ) -> RegistrationOperationStatus:
        reg_id = request.registration_id
        previous = await self.ctx.store.get(Collection.REGISTRATIONS, reg_id)
        for attempt in range(_WRITE_ATTEMPTS):
            # After a failed commit, plan on what is stored: the identity may exist although the
            # record does not (deleted with its individual enrollment, or through the API).
            state, identity = await self._assign(
                request, match, previous, operation_id, guess_new=attempt == 0
            )
            for _ in range(_WRITE_ATTEMPTS):
                try:
                    written = await self.ctx.store.write_atomic(
                        [*identity, self._record_write(reg_id, state, previous)]
                    )
                    return self._operation(written[-1])
                except (ConflictError, PreconditionFailedError):
                    latest = await self.ctx.store.get(Collection.REGISTRATIONS, reg_id)
                if latest is not None and self._is_interim(latest, operation_id):
                    # Our own 'assigning' record (the request ran out of budget): the plan still
                    # holds; write over it.
                    previous = latest
                    continue
                break
            # Something else changed (nothing was written). If a concurrent registration of the
            # same id won, answer with its record; otherwise plan again.
            if latest is not None and (previous is None or latest.etag != previous.etag):
                return self._operation(latest)
            previous = latest
        raise ConflictError(
            f"The registration of {reg_id!r} kept changing under concurrent writes; retry.",
            error_code=DpsCode.REGISTRATION_CONTENDED,
        )

    @staticmethod
    def _is_interim(record: Record, operation_id: str) -> bool:
        stored: StoredRegistration = _decode(record, StoredRegistration)
        return stored.operation_id == operation_id and stored.status is RegistrationStatus.ASSIGNING

    async def _record_assigning(self, request: DeviceRequest, operation_id: str) -> Record | None:
        """Write the 'assigning' record of a slow registration; ``None`` when the registration
        finished first (its record carries ``operation_id`` and a terminal status)."""
        reg_id = request.registration_id
        for _ in range(_WRITE_ATTEMPTS):
            previous = await self.ctx.store.get(Collection.REGISTRATIONS, reg_id)
            if previous is not None and _decode(previous, StoredRegistration).operation_id == operation_id:
                return None
            old: StoredRegistration | None = _decode(previous, StoredRegistration) if previous else None
            now = utc_now()
            state = StoredRegistration(
                registration_id=previous.id if previous else reg_id,
                created_date_time_utc=old.created_date_time_utc if old and old.created_date_time_utc else now,
                last_updated_date_time_utc=now,
                status=RegistrationStatus.ASSIGNING,
                operation_id=operation_id,
                enrollment_group_id=old.enrollment_group_id if old else None,
                attestation_type=old.attestation_type if old else None,
            )
            try:
                [record] = await self.ctx.store.write_atomic([self._record_write(reg_id, state, previous)])
                return record
            except (ConflictError, PreconditionFailedError):
                continue
        return None

    async def _fail_assigning(self, request: DeviceRequest, operation_id: str, exc: Exception) -> None:
        record = await self.ctx.store.get(Collection.REGISTRATIONS, request.registration_id)
        if record is None or not self._is_interim(record, operation_id):
            return
        stored: StoredRegistration = _decode(record, StoredRegistration)
        failed = msgspec.structs.replace(
            stored,
            status=RegistrationStatus.FAILED,
            error_code=DpsCode.INTERNAL,
            error_message=f"The assignment failed: {exc}",
            last_updated_date_time_utc=utc_now(),
        )
        try:
            await self.ctx.store.write_atomic([self._record_write(request.registration_id, failed, record)])
        except (ConflictError, PreconditionFailedError):
            pass

    async def operation_status(
        self, request: DeviceRequest, operation_id: str
    ) -> RegistrationOperationStatus:
        """The status of an earlier register operation (the device must attest again).

        :raises NotFoundError: no such operation for this registration id.
        """
        await self._attest(request)
        record = await self.ctx.store.get(Collection.REGISTRATIONS, request.registration_id)
        if record is None or _decode(record, StoredRegistration).operation_id != operation_id:
            raise NotFoundError(
                f"No registration operation {operation_id[:64]!r} for {request.registration_id!r}.",
                error_code=DpsCode.OPERATION_NOT_FOUND,
            )
        return self._operation(record)

    async def status_lookup(self, request: DeviceRequest) -> DeviceRegistrationResult:
        """The device's registration record (``POST /{idScope}/registrations/{id}``)."""
        await self._attest(request)
        record = await self.ctx.store.get(Collection.REGISTRATIONS, request.registration_id)
        if record is None:
            raise NotFoundError(
                f"{request.registration_id!r} has not registered.", error_code=DpsCode.REGISTRATION_NOT_FOUND
            )
        return self._result(record)

    # --- request checks ----------------------------------------------------------------------

    async def _attest(self, request: DeviceRequest, *, registering: bool = False) -> _Match:
        """Check the request and attest the device, within the rate limits: a source over its
        budget of failed attestations is refused before any work, a failed attestation spends
        that budget, and only an attested request counts against the device's own limit (so
        that nobody but the device can use it up).

        :raises ThrottledError: over a limit (429 with ``retry_after``).
        :raises AuthenticationError: the device did not prove an enrollment's credential.
        """
        limiter = self.ctx.limiter
        limiter.admit(request.source)
        try:
            await self._check_request(request)
            match = await self._match(request, registering=registering)
        except TpmChallengeRequired:
            raise  # the first step of TPM attestation, not a failure
        except AuthenticationError:
            limiter.failed(request.source)
            raise
        limiter.attested(request.registration_id)
        return match

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

    # --- attestation and matching ------------------------------------------------------------

    async def _match(self, request: DeviceRequest, *, registering: bool = False) -> _Match:
        if request.authorization:
            return await self._match_symmetric_key(request, registering=registering)
        if request.client_chain:
            return await self._match_x509(request)
        if request.body.tpm is not None:
            ek, srk = tpm_att.request_keys(request.body.tpm)
            blob = await self.tpm.challenge(request.registration_id, ek, srk)
            raise TpmChallengeRequired(
                "Activate the authenticationKey in the TPM, then register again with a SAS token signed by the "
                "imported key.",
                authentication_key=blob.b64(),
                key_name=tpm_att.KEY_NAME,
            )
        raise AuthenticationError(
            "No credential: send a SharedAccessSignature token (symmetric key), or present the device "
            "certificate and its chain in the TLS handshake (X.509).",
            error_code=DpsCode.UNAUTHENTICATED,
        )

    async def _match_symmetric_key(self, request: DeviceRequest, *, registering: bool = False) -> _Match:
        reg_id = request.registration_id
        token = sk.check_device_token(
            request.authorization,
            request.id_scope,
            reg_id,
            now=int(self.ctx.clock()),
            clock_skew=self.ctx.settings.clock_skew,
        )
        record = await self.ctx.store.get(Collection.ENROLLMENTS, reg_id)
        if record is not None:
            enrollment: IndividualEnrollment = _decode(record, IndividualEnrollment)
            if enrollment.attestation.type is AttestationType.TPM:  # a token signed in the TPM
                return await self._match_tpm(request, enrollment, token, registering=registering)
            if enrollment.attestation.type is not AttestationType.SYMMETRIC_KEY:
                raise AuthenticationError(
                    f"The individual enrollment {enrollment.registration_id!r} uses {enrollment.attestation.type.value} "
                    "attestation, not a symmetric key.",
                    error_code=DpsCode.TOKEN_INVALID,
                )
            keys = enrollment.attestation.symmetric_key
            if keys is None or not sk.matches_any(token, [keys.primary_key, keys.secondary_key]):
                raise AuthenticationError(
                    f"The SAS token was not signed with a key of the individual enrollment {enrollment.registration_id!r}.",
                    error_code=DpsCode.TOKEN_INVALID,
                )
            return _Match(enrollment, None, AttestationType.SYMMETRIC_KEY)
        group = await self._find_symmetric_key_group(reg_id, token)
        if group is None:
            raise AuthenticationError(
                f"No individual enrollment is named {reg_id!r}, and no symmetric-key enrollment group's derived key "
                "signed the SAS token.",
                error_code=DpsCode.TOKEN_INVALID,
            )
        return _Match(None, group, AttestationType.SYMMETRIC_KEY)

    async def _match_tpm(
        self, request: DeviceRequest, enrollment: IndividualEnrollment, token: Any, *, registering: bool
    ) -> _Match:
        proof = await self.tpm.authenticate(
            token,
            request.registration_id,
            enrollment=enrollment,
            presented=request.body.tpm,
            consume=registering,
        )
        keys = (secrets.token_bytes(tpm_att.KEY_BYTES), secrets.token_bytes(tpm_att.KEY_BYTES))
        return _Match(enrollment, None, AttestationType.TPM, tpm=proof, hub_keys=keys)

    async def _groups(self, attestation: AttestationType) -> list[EnrollmentGroup]:
        records = await self.ctx.store.query_all(
            Collection.ENROLLMENT_GROUPS, filters={"attestation_type": attestation.value.lower()}
        )
        return [_decode(r, EnrollmentGroup) for r in records]

    async def _find_symmetric_key_group(self, reg_id: str, token: Any) -> EnrollmentGroup | None:
        # The group of the device's last registration first: a re-registration costs one HMAC.
        previous = await self.ctx.store.get(Collection.REGISTRATIONS, reg_id)
        hint = _decode(previous, StoredRegistration).enrollment_group_id if previous else None
        groups = await self._groups(AttestationType.SYMMETRIC_KEY)
        if hint:
            groups.sort(key=lambda g: g.enrollment_group_id.lower() != hint.lower())
        for group in groups:
            keys = group.attestation.symmetric_key
            if keys is not None and sk.matches_group(token, [keys.primary_key, keys.secondary_key], reg_id):
                return group
        return None

    async def _match_x509(self, request: DeviceRequest) -> _Match:
        now = dt.datetime.fromtimestamp(self.ctx.clock(), dt.UTC)
        chain = x5.parse_presented_chain(request.client_chain)
        cn = x5.common_name(chain.leaf)
        if cn is None or cn.lower() != request.registration_id.lower():
            raise AuthenticationError(
                f"The device certificate's subject CN {cn!r} is not the registration id {request.registration_id!r}.",
                error_code=DpsCode.X509_CN_MISMATCH,
            )
        leaf_info = msgspec.convert(certificates.certificate_info(chain.leaf), X509CertificateInfo)
        leaf_sha256 = certificates.sha256_thumbprint(chain.leaf)
        record = await self.ctx.store.get(Collection.ENROLLMENTS, request.registration_id)
        if record is not None:
            enrollment: IndividualEnrollment = _decode(record, IndividualEnrollment)
            self._verify_individual_x509(enrollment, chain, now)
            return _Match(
                enrollment,
                None,
                AttestationType.X509,
                x509=X509RegistrationResult(certificate_info=leaf_info),
                leaf_sha256=leaf_sha256,
            )
        group, anchor = await self._find_x509_group(chain)
        x5.verify_chain(chain, anchor, now)
        return _Match(
            None,
            group,
            AttestationType.X509,
            x509=X509RegistrationResult(
                certificate_info=leaf_info,
                enrollment_group_id=group.enrollment_group_id,
                signing_certificate_info=msgspec.convert(
                    certificates.certificate_info(anchor), X509CertificateInfo
                ),
            ),
            leaf_sha256=leaf_sha256,
        )

    @staticmethod
    def _verify_individual_x509(
        enrollment: IndividualEnrollment, chain: x5.PresentedChain, now: dt.datetime
    ) -> None:
        name = enrollment.registration_id
        x509_att = enrollment.attestation.x509
        if enrollment.attestation.type is not AttestationType.X509 or x509_att is None:
            raise AuthenticationError(
                f"The individual enrollment {name!r} uses {enrollment.attestation.type.value} attestation, not X.509.",
                error_code=DpsCode.X509_CHAIN_INVALID,
            )
        certs = x509_att.client_certificates
        enrolled = (
            [c.certificate for c in (certs.primary, certs.secondary) if c and c.certificate] if certs else []
        )
        x5.match_individual(name, [certificates.load_pem_chain(pem)[0] for pem in enrolled], chain, now)

    async def _find_x509_group(self, chain: x5.PresentedChain) -> tuple[EnrollmentGroup, Any]:
        groups = await self._groups(AttestationType.X509)
        cas: dict[str, CaCertificate] = {}
        for group in groups:
            refs = group.attestation.x509.ca_references if group.attestation.x509 else None
            for name in (refs.primary, refs.secondary) if refs else ():
                if name and name.lower() not in cas:
                    record = await self.ctx.store.get(Collection.CA_CERTIFICATES, name)
                    if record is not None:
                        cas[name.lower()] = _decode(record, CaCertificate)
        unverified: list[str] = []
        candidates: list[tuple[EnrollmentGroup, Any]] = []
        for group in groups:
            x509_att = group.attestation.x509
            if x509_att is None:
                continue
            pems: list[str] = []
            signing = x509_att.signing_certificates
            if signing is not None:
                pems += [c.certificate for c in (signing.primary, signing.secondary) if c and c.certificate]
            refs = x509_att.ca_references
            for name in (refs.primary, refs.secondary) if refs else ():
                ca = cas.get(name.lower()) if name else None
                if ca is not None and ca.certificate:
                    if ca.is_verified:
                        pems.append(ca.certificate)
                    else:
                        unverified.append(f"{ca.name} (group {group.enrollment_group_id})")
            candidates += [(group, certificates.load_pem_chain(pem)[0]) for pem in pems]
        found = x5.find_anchor(chain, candidates)
        if found is not None:
            return found
        hint = f" (CA certificates not verified: {', '.join(unverified)})" if unverified else ""
        raise AuthenticationError(
            f"No individual enrollment is named {x5.common_name(chain.leaf)!r}, and no X.509 enrollment group's "
            f"certificate is in, or signed, the presented chain of {len(chain.certificates)} certificate(s){hint}.",
            error_code=DpsCode.X509_CHAIN_INVALID,
        )

    # --- assignment --------------------------------------------------------------------------

    async def _assign(
        self,
        request: DeviceRequest,
        match: _Match,
        previous: Record | None,
        operation_id: str,
        *,
        guess_new: bool = True,
    ) -> tuple[StoredRegistration, list[Planned]]:
        """The registration record to write, and the identity writes that go with it.
        ``guess_new``: a device without an assignment probably has no identity yet, so its
        identity write is a create without reading first; a retry after a failed commit reads."""
        enrollment = match.enrollment
        reg_id = request.registration_id
        old: StoredRegistration | None = _decode(previous, StoredRegistration) if previous else None
        now = utc_now()
        base = StoredRegistration(
            registration_id=previous.id if previous else reg_id,
            created_date_time_utc=old.created_date_time_utc if old and old.created_date_time_utc else now,
            last_updated_date_time_utc=now,
            operation_id=operation_id,
            enrollment_group_id=match.group.enrollment_group_id if match.group else None,
            attestation_type=match.attestation.value,
            x509=match.x509,
            symmetric_key=SymmetricKeyRegistrationResult(enrollment_group_id=match.group.enrollment_group_id)
            if match.attestation is AttestationType.SYMMETRIC_KEY and match.group
            else (
                SymmetricKeyRegistrationResult()
                if match.attestation is AttestationType.SYMMETRIC_KEY
                else None
            ),
            payload=request.body.payload,
        )
        if enrollment.provisioning_status is ProvisioningStatus.DISABLED:
            log.info(
                "registration %s denied: the %s is disabled [%s]", reg_id, match.label, request.transport
            )
            return msgspec.structs.replace(
                base,
                status=RegistrationStatus.DISABLED,
                assigned_hub=old.assigned_hub if old else None,
                device_id=old.device_id if old else None,
                error_code=DpsCode.ENROLLMENT_DISABLED,
                error_message=f"The {match.label} is disabled.",
            ), []
        device_id = (match.individual.device_id if match.individual else None) or reg_id
        linked = await self.ctx.linked_hubs(max_age=CONFIG_MAX_AGE)
        named = list(
            enrollment.iot_hubs or ([enrollment.iot_hub_host_name] if enrollment.iot_hub_host_name else [])
        )
        policy = (
            enrollment.allocation_policy
            or (await self.ctx.service_settings(max_age=CONFIG_MAX_AGE)).allocation_policy
            or AllocationPolicy.HASHED
        )
        reprovision = enrollment.reprovision_policy or ReprovisionPolicy()
        was_assigned = old is not None and old.status is RegistrationStatus.ASSIGNED and old.assigned_hub
        custom: AllocationResponse | None = None
        try:
            candidates = candidate_hubs(named, linked)
            if was_assigned and not reprovision.update_hub_assignment and old and old.assigned_hub in linked:
                hub = linked[old.assigned_hub]
            elif policy is AllocationPolicy.CUSTOM and candidates:
                custom = await self._call_webhook(request, match, old if was_assigned else None, candidates)
                hub = linked[(custom.iot_hub_host_name or "").lower()]
            else:
                hub = allocate(policy, reg_id, candidates, named=named)
        except AllocationError as exc:
            log.info("registration %s failed: %s [%s]", reg_id, exc, request.transport)
            return msgspec.structs.replace(
                base, status=RegistrationStatus.FAILED, error_code=DpsCode.NO_HUB, error_message=str(exc)
            ), []
        except WebhookError as exc:
            log.warning("registration %s failed: %s [%s]", reg_id, exc, request.transport)
            return msgspec.structs.replace(
                base,
                status=RegistrationStatus.FAILED,
                error_code=DpsCode.CUSTOM_ALLOCATION_FAILED,
                error_message=str(exc),
            ), []
        moved = bool(
            was_assigned and old and (old.assigned_hub != hub.host_name.lower() or old.device_id != device_id)
        )
        if not was_assigned:
            substatus, twin = RegistrationSubstatus.INITIAL_ASSIGNMENT, twin_from(enrollment.initial_twin)
        elif not moved:
            substatus, twin = (
                (old.substatus if old else None) or RegistrationSubstatus.INITIAL_ASSIGNMENT,
                None,
            )
        elif reprovision.migrate_device_data:
            substatus, twin = RegistrationSubstatus.DEVICE_DATA_MIGRATED, None
        else:
            substatus, twin = RegistrationSubstatus.DEVICE_DATA_RESET, twin_from(enrollment.initial_twin)
        initial = twin_from(enrollment.initial_twin)  # for an identity that must be created
        if custom is not None:
            base = msgspec.structs.replace(base, payload=custom.payload)
            if custom.initial_twin is not None:  # overrides the migration settings: the twin is replaced
                twin = initial = twin_from(custom.initial_twin)
        identity: list[Planned] = []
        try:
            if moved and old and old.assigned_hub and old.device_id:
                migrated = await self.hubs.get(old.assigned_hub, old.device_id)
                if twin is None and migrated is not None:
                    twin = migrated.twin
                removal = await self.hubs.plan_delete(old.assigned_hub, old.device_id)
                identity += [removal] if removal else []
            identity.append(
                await self.hubs.plan_put(
                    hub,
                    device_id,
                    registration_id=reg_id,
                    authentication=self._authentication(match, reg_id, hub),
                    capabilities=enrollment.capabilities,
                    twin=twin,
                    initial=initial,
                    probably_new=guess_new and (not was_assigned or moved),
                )
            )
        except HubError as exc:
            log.warning(
                "registration %s failed in hub %s: %s [%s]", reg_id, hub.host_name, exc, request.transport
            )
            return msgspec.structs.replace(
                base, status=RegistrationStatus.FAILED, error_code=DpsCode.HUB_FAILED, error_message=str(exc)
            ), []
        log.info(
            "registration %s assigned to %s as %s by the %s (%s) [%s]",
            reg_id,
            hub.host_name,
            device_id,
            match.label,
            substatus.value,
            request.transport,
        )
        state = msgspec.structs.replace(
            base,
            status=RegistrationStatus.ASSIGNED,
            substatus=substatus,
            assigned_hub=hub.host_name.lower(),
            device_id=device_id,
            tpm=TpmRegistrationResult(authentication_key=match.tpm.wrap(match.hub_keys[0]))
            if match.tpm is not None and match.hub_keys is not None
            else None,
        )
        return state, identity

    async def _call_webhook(
        self,
        request: DeviceRequest,
        match: _Match,
        old: StoredRegistration | None,
        candidates: Sequence[LinkedHub],
    ) -> AllocationResponse:
        """Ask the enrollment's custom allocation webhook for the hub (service-api.md §8)."""
        enrollment = match.enrollment
        definition = enrollment.custom_allocation_definition
        if definition is None or not definition.webhook_url:
            raise AllocationError(
                f"The {match.label} uses custom allocation but has no customAllocationDefinition.webhookUrl."
            )
        stripped = msgspec.structs.replace(enrollment, attestation=strip_secrets(enrollment.attestation))
        hosts = [hub.host_name for hub in candidates]
        body = AllocationRequest(
            individual_enrollment=stripped if isinstance(stripped, IndividualEnrollment) else None,
            enrollment_group=stripped if isinstance(stripped, EnrollmentGroup) else None,
            device_runtime_context=DeviceRuntimeContext(
                registration_id=request.registration_id,
                current_iot_hub_host_name=old.assigned_hub if old else None,
                current_device_id=old.device_id if old else None,
                x509=match.x509,
                symmetric_key={} if match.attestation is AttestationType.SYMMETRIC_KEY else None,
                tpm=request.body.tpm,
                payload=request.body.payload,
            ),
            linked_hubs=hosts,
        )
        return await self.webhook.allocate(definition.webhook_url, body, hosts)

    @staticmethod
    def _authentication(match: _Match, reg_id: str, hub: LinkedHub) -> DeviceAuthentication:
        if match.attestation is AttestationType.SYMMETRIC_KEY:
            keys = match.enrollment.attestation.symmetric_key
            assert keys is not None
            if match.group is not None:
                primary = derive_device_key(keys.primary_key or "", reg_id) if keys.primary_key else None
                secondary = (
                    derive_device_key(keys.secondary_key or "", reg_id) if keys.secondary_key else None
                )
            else:
                primary, secondary = keys.primary_key, keys.secondary_key
            return DeviceAuthentication(
                type="sas", symmetric_key=SymmetricKeyAuth(primary_key=primary, secondary_key=secondary)
            )
        if match.attestation is AttestationType.TPM:
            assert match.hub_keys is not None
            primary, secondary = (base64.b64encode(key).decode("ascii") for key in match.hub_keys)
            return DeviceAuthentication(
                type="sas", symmetric_key=SymmetricKeyAuth(primary_key=primary, secondary_key=secondary)
            )
        return x509_authentication(match.leaf_sha256, group=match.group is not None, hub=hub)

    # --- records -----------------------------------------------------------------------------

    @staticmethod
    def _record_write(reg_id: str, state: StoredRegistration, previous: Record | None) -> Planned:
        """The registration record's write: a create, or an update on the etag read before."""
        index = {
            "device_id": state.device_id,
            "status": state.status.value if state.status else None,
            "assigned_hub": state.assigned_hub,
            "enrollment_group_id": state.enrollment_group_id.lower() if state.enrollment_group_id else None,
            "operation_id": state.operation_id,
        }
        doc = msgspec.json.encode(state)
        if previous is None:
            return Collection.REGISTRATIONS, Write(reg_id, doc, index, WriteMode.CREATE)
        return Collection.REGISTRATIONS, Write(reg_id, doc, index, WriteMode.UPDATE, previous.etag)

    @staticmethod
    def _result(record: Record) -> DeviceRegistrationResult:
        stored: StoredRegistration = _decode(record, StoredRegistration)
        fields = {f: getattr(stored, f) for f in DeviceRegistrationResult.__struct_fields__}
        fields.update(registration_id=record.id, etag=record.etag, last_updated_date_time_utc=record.updated)
        return DeviceRegistrationResult(**fields)

    def _operation(self, record: Record) -> RegistrationOperationStatus:
        result = self._result(record)
        stored: StoredRegistration = _decode(record, StoredRegistration)
        assert result.status is not None and stored.operation_id is not None
        return RegistrationOperationStatus(
            operation_id=stored.operation_id, status=result.status, registration_state=result
        )
