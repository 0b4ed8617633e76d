"""Device registration records, as the service API shows them (read-only but for delete)."""

from __future__ import annotations

from collections.abc import Sequence

from ...errors import DpsCode, NotFoundError
from ...models import Deprovision, DeviceRegistrationState
from ...storage import Collection, Record, Store
from ..query import REGISTRATION_FIELDS, parse_query
from ..records import service_view
from ._base import Page, delete_record, get_or_404, page_size
from ._deprovision import Deprovisioner

__all__ = ["Registrations", "registration_state"]


def registration_state(record: Record) -> DeviceRegistrationState:
    """The service API's view of a stored registration record (one model, two views:
    :mod:`provisiond.service.records`); its id, etag and timestamps are the store's."""
    return service_view(record)


class Registrations:
    """Get, delete and query the registration records."""

    def __init__(self, store: Store, deprovisioner: Deprovisioner) -> None:
        self._store = store
        self._deprovisioner = deprovisioner

    async def get(self, registration_id: str) -> DeviceRegistrationState:
        """:raises NotFoundError: 404202, no record has this id."""
        record = await get_or_404(
            self._store, Collection.REGISTRATIONS, registration_id, DpsCode.REGISTRATION_NOT_FOUND
        )
        return registration_state(record)

    async def states_of(self, registration_ids: Sequence[str]) -> dict[str, DeviceRegistrationState]:
        """The records that exist among ``registration_ids``, keyed by lower-cased id."""
        records = await self._store.get_many(Collection.REGISTRATIONS, registration_ids)
        return {key: registration_state(record) for key, record in records.items()}

    async def delete(
        self, registration_id: str, *, if_match: str | None = None, deprovision: Deprovision | None = None
    ) -> None:
        """Delete a record (the device registers afresh next time). Its hub identity stays, as
        with DPS, unless ``deprovision`` disables or deletes it, in the same transaction
        (:mod:`._deprovision`).

        :raises NotFoundError: 404202. :raises PreconditionFailedError: 412001, a stale etag.
        :raises RequestError: the identity's hub cannot take the removal.
        """
        if deprovision is not None:
            deleted = await self._deprovisioner.delete_record(registration_id, deprovision, if_match=if_match)
            if deleted is None:
                raise NotFoundError(
                    f"No registration record is named {registration_id[:140]!r}.",
                    error_code=DpsCode.REGISTRATION_NOT_FOUND,
                )
            return
        await delete_record(
            self._store,
            Collection.REGISTRATIONS,
            registration_id,
            if_match,
            not_found=DpsCode.REGISTRATION_NOT_FOUND,
            etag_code=DpsCode.ETAG_MISMATCH,
        )

    async def query(
        self,
        group_id: str,
        query: str | None = None,
        *,
        size: int | None = None,
        continuation: str | None = None,
    ) -> Page[DeviceRegistrationState]:
        """The records of the devices of enrollment group ``group_id`` (DPS's only registration
        query), narrowed by ``query``'s WHERE clause when there is one (provisiond's extension).

        :raises NotFoundError: 404203, no such group. :raises InvalidQueryError: a query
            provisiond cannot read.
        """
        await get_or_404(self._store, Collection.ENROLLMENT_GROUPS, group_id, DpsCode.GROUP_NOT_FOUND)
        filters = parse_query(query, REGISTRATION_FIELDS) if query is not None else {}
        size = page_size(size)
        group_key = group_id.lower()
        if filters is None or filters.get("enrollment_group_id", group_key) != group_key:
            return Page([], None, size)
        filters["enrollment_group_id"] = group_key
        page = await self._store.query(
            Collection.REGISTRATIONS, filters=filters, limit=size, continuation=continuation
        )
        return Page([registration_state(r) for r in page.records], page.continuation, size)
