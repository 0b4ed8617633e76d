"""What the attestors read, over the store: enrollments, CA certificates and pending TPM
challenges (the protocols of :mod:`provisiond.attestation.base`).

Enrollment groups are read on every group-derived registration and change rarely: they come
from a loader (the service context's cache, :meth:`ServiceContext.enrollment_groups`) when one
is given, else straight from the store."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import msgspec

from ..attestation.base import IssuedChallenge, PendingChallenge
from ..errors import NotFoundError, PreconditionFailedError
from ..models import AttestationType, CaCertificate, EnrollmentGroup, IndividualEnrollment
from ..storage import Collection, Record, Store, WriteMode

__all__ = ["GroupsLoader", "PrefetchedSources", "StoreSources", "read_groups"]

#: Every enrollment group of one attestation type, in id order (shared: not to be mutated).
GroupsLoader = Callable[[AttestationType], Awaitable[list[EnrollmentGroup]]]


async def read_groups(store: Store, attestation: AttestationType) -> list[EnrollmentGroup]:
    """Every enrollment group of one attestation type, in id order, from the store."""
    records = await store.query_all(
        Collection.ENROLLMENT_GROUPS, filters={"attestation_type": attestation.value.lower()}
    )
    return [msgspec.json.decode(r.doc, type=EnrollmentGroup) for r in records]


class StoreSources:
    """:class:`~provisiond.attestation.base.EnrollmentSource`,
    :class:`~provisiond.attestation.base.CaSource` and
    :class:`~provisiond.attestation.base.ChallengeStore` over one store."""

    def __init__(self, store: Store, *, groups: GroupsLoader | None = None) -> None:
        self._store = store
        self._groups = groups

    # --- enrollments -----------------------------------------------------------------------------

    async def individual(self, registration_id: str) -> IndividualEnrollment | None:
        return _individual(await self._store.get(Collection.ENROLLMENTS, registration_id))

    async def groups(self, attestation: AttestationType) -> list[EnrollmentGroup]:
        if self._groups is None:
            return await read_groups(self._store, attestation)
        return list(await self._groups(attestation))  # a copy: the caller may reorder it

    # --- CA certificates -------------------------------------------------------------------------

    async def ca_certificates(self, names: Iterable[str]) -> dict[str, CaCertificate]:
        found = await self._store.get_many(
            Collection.CA_CERTIFICATES, list({n.lower(): n for n in names}.values())
        )
        return {key: msgspec.json.decode(r.doc, type=CaCertificate) for key, r in found.items()}

    # --- TPM challenges (single use through a write conditional on the etag read) ----------------

    async def issue(self, registration_id: str, challenge: PendingChallenge) -> None:
        # An upsert: a new challenge replaces the registration id's older one.
        await self._store.write(Collection.TPM_CHALLENGES, registration_id, msgspec.json.encode(challenge))

    async def read(self, registration_id: str) -> IssuedChallenge | None:
        record = await self._store.get(Collection.TPM_CHALLENGES, registration_id)
        if record is None:
            return None
        return IssuedChallenge(msgspec.json.decode(record.doc, type=PendingChallenge), record.etag)

    async def use(self, registration_id: str, issued: IssuedChallenge) -> bool:
        used = msgspec.structs.replace(issued.challenge, used=True)
        try:
            await self._store.write(
                Collection.TPM_CHALLENGES,
                registration_id,
                msgspec.json.encode(used),
                mode=WriteMode.UPDATE,
                if_match=issued.version,
            )
        except (PreconditionFailedError, NotFoundError):
            return False
        return True


def _individual(record: Record | None) -> IndividualEnrollment | None:
    return msgspec.json.decode(record.doc, type=IndividualEnrollment) if record else None


class PrefetchedSources:
    """:class:`StoreSources`' enrollments, with one registration id's individual enrollment
    already read: the registrar reads it together with the registration record
    (:meth:`~provisiond.storage.Store.get_each`, one round trip on PostgreSQL)."""

    def __init__(self, sources: StoreSources, registration_id: str, record: Record | None) -> None:
        self._sources = sources
        self._key = Collection.ENROLLMENTS.key(registration_id)
        self._record = record

    async def individual(self, registration_id: str) -> IndividualEnrollment | None:
        if Collection.ENROLLMENTS.key(registration_id) == self._key:
            return _individual(self._record)
        return await self._sources.individual(registration_id)

    async def groups(self, attestation: AttestationType) -> list[EnrollmentGroup]:
        return await self._sources.groups(attestation)
