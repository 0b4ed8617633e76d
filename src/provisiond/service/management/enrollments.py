"""Individual enrollments and enrollment groups as typed operations: get, create-or-update with
DPS's etag rules, read-modify-write, delete, attestation mechanism, query, bulk.

Both kinds share :class:`EnrollmentOperations`; :class:`IndividualEnrollments` adds what is theirs
alone: the registration record shown with each one (``registrationState``) and deleted with it.
Validation, secrets and the stored form are :mod:`provisiond.service.enrollments`' rules.

The etag rules (DPS's, service API 2021-10-01): without If-Match (the argument, else the
enrollment's own ``etag``) a write creates, and an existing record is a 409; with If-Match it
updates, and a stale etag is a 412; ``*`` matches any existing record.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import msgspec

from ...errors import (
    ConflictError,
    DpsCode,
    InvalidBodyError,
    NotFoundError,
    PreconditionFailedError,
    ProvisioningError,
)
from ...models import (
    AttestationMechanism,
    BulkEnrollmentOperationError,
    BulkEnrollmentOperationResult,
    BulkOperationMode,
    Deprovision,
    EnrollmentGroup,
    IndividualEnrollment,
    LinkedHub,
    ProvisioningStatus,
)
from ...storage import Collection, Delete, Record, Store, Write, WriteMode, etags_match, is_wildcard
from .. import enrollments as en
from ..query import ENROLLMENT_FIELDS, GROUP_FIELDS, parse_query
from ._base import WRITE_RETRIES, Page, delete_record, get_or_404, page_size
from ._deprovision import Deprovisioner
from .registrations import Registrations

__all__ = ["EnrollmentGroups", "EnrollmentOperations", "IndividualEnrollments"]

E = TypeVar("E", IndividualEnrollment, EnrollmentGroup)

#: The query a missing or empty query specification stands for.
ALL = "SELECT * FROM c"

_BULK_WRITES = {
    BulkOperationMode.CREATE: WriteMode.CREATE,
    BulkOperationMode.UPDATE: WriteMode.UPSERT,
    BulkOperationMode.UPDATE_IF_MATCH_ETAG: WriteMode.UPDATE,
}

LinkedHubsReader = Callable[[], Awaitable[Mapping[str, LinkedHub]]]


def _nothing_cached() -> None:
    pass


class EnrollmentOperations(Generic[E]):
    """The operations both kinds share."""

    kind: en.EnrollmentKind[E]
    _fields: Mapping[str, tuple[str, bool]]

    def __init__(
        self,
        store: Store,
        linked_hubs: LinkedHubsReader,
        deprovisioner: Deprovisioner,
        *,
        invalidate: Callable[[], None] = _nothing_cached,
    ) -> None:
        self._store = store
        self._linked_hubs = linked_hubs
        self._deprovisioner = deprovisioner
        #: Drops cached copies of this kind after every write (the registration path caches groups).
        self._invalidate = invalidate

    # --- presenting ------------------------------------------------------------------------

    async def _present(self, records: list[Record], shown: en.Shown = en.Shown.READ) -> list[E]:
        """The API form of stored records (overridden to join what else belongs to them)."""
        return [en.present(self.kind, record, shown=shown) for record in records]

    async def _present_one(self, record: Record, shown: en.Shown = en.Shown.READ) -> E:
        [item] = await self._present([record], shown)
        return item

    # --- reads -----------------------------------------------------------------------------

    async def get(self, id: str) -> E:
        """The enrollment, secrets stripped.

        :raises NotFoundError: 404201 / 404203.
        """
        return await self._present_one(await self._get_record(id))

    async def _get_record(self, id: str) -> Record:
        return await get_or_404(self._store, self.kind.collection, id, self.kind.not_found_code)

    async def attestation_mechanism(self, id: str) -> AttestationMechanism:
        """The enrollment's attestation with every secret (keys, certificates)."""
        record = await self._get_record(id)
        return en.present(self.kind, record, shown=en.Shown.ALL).attestation

    async def query(
        self, query: str | None = None, *, size: int | None = None, continuation: str | None = None
    ) -> Page[E]:
        """A page of the enrollments ``query`` selects (``None``: all), secrets stripped.

        :raises InvalidQueryError: a query provisiond cannot read.
        """
        filters = parse_query(ALL if query is None else query, self._fields)
        size = page_size(size)
        if filters is None:  # contradicting conditions: nothing can match
            return Page([], None, size)
        page = await self._store.query(
            self.kind.collection, filters=filters, limit=size, continuation=continuation
        )
        return Page(await self._present(page.records), page.continuation, size)

    # --- writes ----------------------------------------------------------------------------

    def validate_id(self, id: str) -> str:
        """``id`` if it keeps DPS's id rules. :raises InvalidIdError: the rule it breaks."""
        return en.validate_id(id, self.kind.id_field)

    async def put(self, id: str, enrollment: E, *, if_match: str | None = None) -> E:
        """Create or update ``id`` with DPS's etag rules (module docstring); ``if_match``
        ``None`` takes the enrollment's own ``etag``. Secrets a read stripped are kept, keys
        are generated for a new symmetric key enrollment. Returns the stored enrollment with
        its symmetric keys (DPS answers a write with them).

        :raises InvalidIdError, InvalidBodyError: what is wrong, naming the field.
        :raises ConflictError: 409201, it exists and no etag was given.
        :raises PreconditionFailedError: 412001, the etag is not the stored one.
        """
        self.validate_id(id)
        if_match = if_match or enrollment.etag
        hubs = await self._linked_hubs()
        for attempt in range(WRITE_RETRIES):
            existing = await self._store.get(self.kind.collection, id)
            doc, index = en.prepare(self.kind, enrollment, id, existing, linked_hubs=hubs)
            try:
                record = await self._write(id, doc, index, existing, if_match)
            except PreconditionFailedError:
                star = is_wildcard(if_match)
                if star and existing is not None and attempt + 1 < WRITE_RETRIES:
                    continue  # changed between our read and our write: carry over its secrets
                raise
            return await self._present_one(record, en.Shown.WRITE)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _write(
        self, id: str, doc: bytes, index: dict[str, str | None], existing: Record | None, if_match: str | None
    ) -> Record:
        try:
            return await self._write_record(id, doc, index, existing, if_match)
        finally:
            self._invalidate()

    async def _write_record(
        self, id: str, doc: bytes, index: dict[str, str | None], existing: Record | None, if_match: str | None
    ) -> Record:
        collection, label = self.kind.collection, self.kind.label
        if if_match is None:
            if existing is not None:
                raise ConflictError(
                    f"The {label} {existing.id!r} already exists; to update it, send its etag in If-Match "
                    "(or If-Match: *).",
                    error_code=DpsCode.ENROLLMENT_EXISTS,
                )
            return await self._store.write(collection, id, doc, index=index, mode=WriteMode.CREATE)
        # "*" means "whatever is there": condition the write on the etag just read, so that the
        # secrets carried over are the ones overwritten.
        condition = existing.etag if (is_wildcard(if_match) and existing is not None) else if_match
        try:
            return await self._store.write(
                collection, id, doc, index=index, mode=WriteMode.UPDATE, if_match=condition
            )
        except PreconditionFailedError:
            raise PreconditionFailedError(
                f"The etag in If-Match does not match the stored {label} {id!r}"
                + ("" if existing is not None else " (it does not exist)")
                + "; read it again and retry.",
                error_code=DpsCode.ETAG_MISMATCH,
            ) from None

    async def create(self, enrollment: E) -> E:
        """Create a new enrollment (:meth:`put` without an etag)."""
        return await self.put(
            self.kind.id_of(enrollment), msgspec.structs.replace(enrollment, etag=None), if_match=None
        )

    async def modify(self, id: str, change: Callable[[E], E]) -> E:
        """Read the enrollment (every secret included), apply ``change``, and write the result
        back on the etag that was read; when another writer got in between, start over (a few
        times). What an operator's "disable this enrollment" needs.

        :raises NotFoundError: it does not exist. :raises PreconditionFailedError: it kept
            changing.
        """
        for attempt in range(WRITE_RETRIES):
            record = await self._get_record(id)
            current = en.present(self.kind, record, shown=en.Shown.ALL)
            try:
                return await self.put(id, change(current), if_match=record.etag)
            except PreconditionFailedError:
                if attempt + 1 == WRITE_RETRIES:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def set_provisioning_status(self, id: str, status: ProvisioningStatus) -> E:
        """Enable or disable the enrollment (a :meth:`modify`)."""
        return await self.modify(id, lambda e: msgspec.structs.replace(e, provisioning_status=status))

    async def delete(
        self, id: str, *, if_match: str | None = None, deprovision: Deprovision | None = None
    ) -> None:
        """Delete the enrollment group on ``if_match`` (``None``: whatever is stored; individual
        enrollments override this). Its devices' registration records and identities stay, as
        with DPS, unless ``deprovision``: then, once the group is deleted (no device can register
        into it any more), every record of its devices is deleted and the identity it names
        disabled or deleted, a page of records per transaction (:mod:`._deprovision`). A group
        already deleted whose devices still have records is swept the same way (after a crash,
        or after a delete without ``deprovision``).

        :raises NotFoundError: 404203 (no such group, nor records of its devices).
        :raises PreconditionFailedError: 412001. :raises RequestError: a hub cannot take the
            removal.
        """
        try:
            await delete_record(
                self._store,
                self.kind.collection,
                id,
                if_match,
                not_found=self.kind.not_found_code,
                etag_code=DpsCode.ETAG_MISMATCH,
            )
        except NotFoundError:
            if deprovision is None or not await self._has_devices(id):
                raise
        finally:
            self._invalidate()
        if deprovision is not None:
            await self._deprovisioner.group_devices(id, deprovision)

    async def _has_devices(self, group_id: str) -> bool:
        page = await self._store.query(
            Collection.REGISTRATIONS, filters={"enrollment_group_id": group_id.lower()}, limit=1
        )
        return bool(page.records)

    # --- bulk ------------------------------------------------------------------------------

    async def bulk(self, mode: BulkOperationMode, items: Sequence[E]) -> BulkEnrollmentOperationResult:
        """Create, update (upsert), update on each item's etag, or delete many enrollments;
        each item succeeds or fails on its own, and the result lists the failures."""
        ids = [self.kind.id_of(item) for item in items]
        existing = await self._store.get_many(self.kind.collection, ids)
        hubs = await self._linked_hubs() if mode is not BulkOperationMode.DELETE else {}
        outcomes: list[Record | ProvisioningError | None] = [None] * len(items)
        writes: list[Write | Delete] = []
        positions: list[int] = []
        seen: set[str] = set()
        for i, (item, id) in enumerate(zip(items, ids, strict=True)):
            try:
                writes.append(self._bulk_item(mode, item, id, existing, hubs, seen))
                positions.append(i)
            except ProvisioningError as exc:
                outcomes[i] = exc
        try:
            results = await self._store.write_many(self.kind.collection, writes)
        finally:
            self._invalidate()
        for pos, written in zip(positions, results, strict=True):
            outcomes[pos] = written
        if mode is BulkOperationMode.DELETE:
            await self._deleted_in_bulk(
                [w.id for w, r in zip(writes, results, strict=True) if isinstance(r, Record)]
            )
        errors = [
            self._bulk_error(id, result)
            for id, result in zip(ids, outcomes, strict=True)
            if isinstance(result, ProvisioningError)
        ]
        return BulkEnrollmentOperationResult(is_successful=not errors, errors=errors)

    def _bulk_item(
        self,
        mode: BulkOperationMode,
        item: E,
        id: str,
        existing: Mapping[str, Record],
        hubs: Mapping[str, LinkedHub],
        seen: set[str],
    ) -> Write | Delete:
        key = self.kind.collection.key(id)
        if key in seen:
            raise InvalidBodyError(
                f"{self.kind.id_field} {id!r} appears more than once in this bulk operation."
            )
        seen.add(key)
        self.validate_id(id)
        if mode is BulkOperationMode.DELETE:
            return Delete(id, if_match=item.etag)
        doc, index = en.prepare(self.kind, item, id, existing.get(key), linked_hubs=hubs)
        if_match = (item.etag or "*") if mode is BulkOperationMode.UPDATE_IF_MATCH_ETAG else None
        return Write(id, doc, index, _BULK_WRITES[mode], if_match)

    async def _deleted_in_bulk(self, ids: list[str]) -> None:
        """What else goes when a bulk operation deleted ``ids`` (overridden)."""

    def _bulk_error(self, id: str, error: ProvisioningError) -> BulkEnrollmentOperationError:
        return BulkEnrollmentOperationError(
            error_code=error.error_code, error_status=error.message, enrollment_group_id=id
        )


class IndividualEnrollments(EnrollmentOperations[IndividualEnrollment]):
    """Individual enrollments: each shown with its registration record, and deleted with it."""

    kind = en.INDIVIDUAL
    _fields = ENROLLMENT_FIELDS

    def __init__(
        self,
        store: Store,
        linked_hubs: LinkedHubsReader,
        registrations: Registrations,
        deprovisioner: Deprovisioner,
    ) -> None:
        super().__init__(store, linked_hubs, deprovisioner)
        self._registrations = registrations

    async def _present(
        self, records: list[Record], shown: en.Shown = en.Shown.READ
    ) -> list[IndividualEnrollment]:
        """With their registrationState joined in (DPS's GET has it; its query leaves it out,
        Azure/azure-iot-sdk-csharp#3478: provisiond returns it in both)."""
        states = await self._registrations.states_of([r.id for r in records])
        out = []
        for record in records:
            state = states.get(Collection.REGISTRATIONS.key(record.id))
            extra: dict[str, Any] = {"registration_state": state} if state else {}
            out.append(en.present(self.kind, record, shown=shown, extra=extra))
        return out

    async def delete(
        self, id: str, *, if_match: str | None = None, deprovision: Deprovision | None = None
    ) -> None:
        """Delete the enrollment and, as DPS does, its registration record, in one transaction.
        The hub identity stays, as with DPS, unless ``deprovision`` disables or deletes it in
        that transaction too (:mod:`._deprovision`).

        :raises NotFoundError: 404201. :raises PreconditionFailedError: 412001.
        :raises ConflictError: 409000, the two kept changing under concurrent writes.
        :raises RequestError: the identity's hub cannot take the removal.
        """
        for _ in range(WRITE_RETRIES):
            enrollment = await self._get_record(id)
            if if_match is not None and not etags_match(if_match, enrollment.etag):
                raise PreconditionFailedError(
                    f"The etag in If-Match does not match the stored individual enrollment {id!r}.",
                    error_code=DpsCode.ETAG_MISMATCH,
                )
            record = await self._store.get(Collection.REGISTRATIONS, id)
            items: list[tuple[Collection, Write | Delete]] = [
                (Collection.ENROLLMENTS, Delete(id, enrollment.etag))
            ]
            if record is not None:
                items.append((Collection.REGISTRATIONS, Delete(id, record.etag)))
                items.extend(await self._deprovisioner.removal(record, deprovision))
            try:
                await self._store.write_atomic(items)
                return
            except (ConflictError, PreconditionFailedError, NotFoundError):
                continue  # one of them changed meanwhile: read them again
        raise ConflictError(
            f"The individual enrollment {id!r} kept changing under concurrent writes; retry.",
            error_code=DpsCode.CONFLICT,
        )

    async def _deleted_in_bulk(self, ids: list[str]) -> None:
        # As delete() does: the deleted enrollments' registration records go too (a second
        # batch here, not one transaction per item).
        if ids:
            await self._store.write_many(Collection.REGISTRATIONS, [Delete(id) for id in ids])

    def _bulk_error(self, id: str, error: ProvisioningError) -> BulkEnrollmentOperationError:
        return BulkEnrollmentOperationError(
            error_code=error.error_code, error_status=error.message, registration_id=id
        )


class EnrollmentGroups(EnrollmentOperations[EnrollmentGroup]):
    """Enrollment groups (deleting one keeps its devices' registration records, as DPS does,
    unless it deprovisions them: :meth:`EnrollmentOperations.delete`)."""

    kind = en.GROUP
    _fields = GROUP_FIELDS
