"""Deprovisioning: deleting registration records together with the identities they created.

DPS leaves a device's identity in its hub when its enrollment, its group or its registration
record is deleted (deprovisioning is a separate, manual step there). provisiond does the same by
default; with ``deprovision`` (:class:`~provisiond.models.Deprovision`) it also disables or
deletes the identity each deleted record names (its ``assignedHub`` and ``deviceId``), in the
transaction that deletes the record: the record and the identity cannot disagree after a crash.
The built-in hub's identity is written in that transaction; a remote hub's removal is an item of
the hub writer's durable outbox written in it (:meth:`~provisiond.hub.HubBackends.plan_removal`).

An enrollment group's devices are swept page by page (:meth:`Deprovisioner.group_devices`), one
transaction per page, after the group itself is deleted, so that no device can register into
it meanwhile; the sweep is idempotent, and running it again (after a crash) finishes the job.
An identity whose hub is no longer linked (and not a built-in one) cannot be reached: its record
is deleted and the log says which identities were left.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from ...errors import ConflictError, DpsCode, NotFoundError, PreconditionFailedError, RequestError
from ...hub import HubBackends, HubError, IdentityRef, Planned
from ...models import Deprovision, LinkedHub
from ...storage import Collection, Delete, Record, Store, etags_match
from ..records import decode
from ._base import WRITE_RETRIES

__all__ = ["Deprovisioner"]

log = logging.getLogger("provisiond.management")

#: Registration records deleted per transaction when a group's devices are swept.
SWEEP_PAGE = 200

LinkedHubsReader = Callable[[], Awaitable[Mapping[str, LinkedHub]]]
_CHANGED = (ConflictError, NotFoundError, PreconditionFailedError)


class Deprovisioner:
    """Plans and commits the deletion of registration records with their identities."""

    def __init__(self, store: Store, hubs: HubBackends, linked_hubs: LinkedHubsReader) -> None:
        self._store = store
        self._hubs = hubs
        self._linked_hubs = linked_hubs

    async def removal(
        self, record: Record | None, mode: Deprovision | None, linked: Mapping[str, LinkedHub] | None = None
    ) -> list[Planned]:
        """The writes that disable or delete the identity ``record`` names (none without
        ``mode``, without a record, or when the record names no identity); ``linked``: the
        linked hubs, when the caller has read them.

        :raises RequestError: the hub cannot take the removal (the hub writer's refusal).
        """
        if record is None or mode is None:
            return []
        ref = _identity_of(record)
        if ref is None:
            return []
        hub = (linked if linked is not None else await self._linked_hubs()).get(ref.hub)
        try:
            planned = await self._hubs.plan_removal(ref, hub, mode)
        except HubError as exc:
            raise RequestError(f"Cannot deprovision {ref.device_id!r} in {ref.hub!r}: {exc}") from None
        if not planned and hub is None:
            log.warning(
                "deprovisioning (%s): identity %s of registration %s left in IoT hub %s, which is no longer linked",
                mode.value,
                ref.device_id,
                record.id,
                ref.hub,
            )
        return planned

    async def delete_record(
        self,
        registration_id: str,
        mode: Deprovision | None,
        *,
        if_match: str | None = None,
        also: Sequence[tuple[Collection, Delete]] = (),
    ) -> Record | None:
        """Delete the registration record (on ``if_match``, ``None``: whatever is stored) and
        deprovision its identity, in one transaction with ``also`` (an individual enrollment's
        delete); re-read and retried when something changed meanwhile. Returns the deleted
        record, ``None`` when there was none (``also`` is then still applied).

        :raises PreconditionFailedError: 412001, ``if_match`` does not match.
        :raises ConflictError: 409000, the record kept changing.
        """
        for _ in range(WRITE_RETRIES):
            record = await self._store.get(Collection.REGISTRATIONS, registration_id)
            if record is not None and if_match is not None and not etags_match(if_match, record.etag):
                raise PreconditionFailedError(
                    f"The etag in If-Match does not match the stored registration record {registration_id!r}.",
                    error_code=DpsCode.ETAG_MISMATCH,
                )
            items: list[Planned] = list(also)
            if record is not None:
                items.append((Collection.REGISTRATIONS, Delete(record.id, record.etag)))
                items.extend(await self.removal(record, mode))
            try:
                await self._store.write_atomic(items)
            except _CHANGED:
                if also:  # the caller's own items may be what changed: let it read them again
                    raise
                continue
            if record is not None and mode is not None:
                _log_one(record, mode)
            return record
        raise ConflictError(
            f"The registration record {registration_id!r} kept changing under concurrent writes; retry.",
            error_code=DpsCode.CONFLICT,
        )

    async def group_devices(self, group_id: str, mode: Deprovision) -> int:
        """Delete the registration records of the devices of enrollment group ``group_id`` and
        deprovision their identities, a page per transaction, until none is left (a page that
        changed meanwhile goes one record at a time). Returns how many records were deleted."""
        deleted = 0
        while True:
            page = await self._store.query(
                Collection.REGISTRATIONS,
                filters={"enrollment_group_id": group_id.lower()},
                limit=SWEEP_PAGE,
            )
            if not page.records:
                break
            linked = await self._linked_hubs()
            items: list[Planned] = []
            for record in page.records:
                items.append((Collection.REGISTRATIONS, Delete(record.id, record.etag)))
                items.extend(await self.removal(record, mode, linked))
            try:
                await self._store.write_atomic(items)
                deleted += len(page.records)
            except _CHANGED:
                for record in page.records:
                    deleted += await self.delete_record(record.id, mode) is not None
        log.info(
            "enrollment group %s: %d registration record(s) deleted, their identities %s",
            group_id,
            deleted,
            "deleted" if mode is Deprovision.DELETE else "disabled",
        )
        return deleted


def _identity_of(record: Record) -> IdentityRef | None:
    """The identity a registration record names: the hub and device id of its last assignment
    (an ``assigning`` record keeps them while its change is in flight)."""
    stored = decode(record)
    if not stored.assigned_hub or not stored.device_id:
        return None
    return IdentityRef(stored.assigned_hub.lower(), stored.device_id)


def _log_one(record: Record, mode: Deprovision) -> None:
    ref = _identity_of(record)
    if ref is None:
        log.info("registration %s deleted (it named no identity to %s)", record.id, mode.value)
    else:
        log.info(
            "registration %s deleted, its identity %s in IoT hub %s: %s",
            record.id,
            ref.device_id,
            ref.hub,
            "deleted" if mode is Deprovision.DELETE else "disabled",
        )
