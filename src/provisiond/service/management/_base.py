"""What the management operations share: pages, lookups that answer DPS's 404, and the
etag-conditioned writes of the admin collections."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ...errors import ConflictError, DpsCode, NotFoundError, PreconditionFailedError
from ...storage import Collection, Record, Store, WriteMode, etags_match

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "WRITE_RETRIES",
    "Page",
    "check_precondition",
    "delete_record",
    "get_or_404",
    "page_size",
    "put_record",
]

T = TypeVar("T")

#: A query's page size when the caller names none (DPS's), and the most one page may hold.
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 10_000
#: How often a write conditioned on an etag read moments before is tried again when another
#: writer got in between.
WRITE_RETRIES = 3


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a query: its items, the token of the next page (``None``: the last one),
    and the page size that was applied."""

    items: list[T]
    continuation: str | None = None
    size: int = DEFAULT_PAGE_SIZE


def page_size(requested: int | None) -> int:
    """The page size to apply: the default for none (or a non-positive one), at most
    :data:`MAX_PAGE_SIZE`."""
    if requested is None or requested <= 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


async def get_or_404(store: Store, collection: Collection, id: str, code: DpsCode) -> Record:
    """The record, or DPS's 404 with ``code``."""
    record = await store.get(collection, id)
    if record is None:
        raise NotFoundError(f"No {collection.label} is named {id[:140]!r}.", error_code=code)
    return record


def _exists(collection: Collection, id: str) -> ConflictError:
    return ConflictError(
        f"The {collection.label} {id!r} already exists; to replace it, send its etag in If-Match (or *)."
    )


def _stale(collection: Collection, id: str) -> PreconditionFailedError:
    return PreconditionFailedError(
        f"The etag in If-Match does not match the stored {collection.label} {id!r}."
    )


def check_precondition(
    collection: Collection, id: str, existing: Record | None, if_match: str | None
) -> None:
    """What :func:`put_record` would refuse on ``existing`` (as read now), checked before any
    slow work (a linked hub's credential check); the write still checks it atomically.

    :raises ConflictError: 409, a create of an existing record. :raises PreconditionFailedError:
        412, ``if_match`` does not match.
    """
    if existing is None:
        return
    if if_match is None:
        raise _exists(collection, id)
    if not etags_match(if_match, existing.etag):
        raise _stale(collection, id)


async def put_record(
    store: Store,
    collection: Collection,
    id: str,
    doc: bytes,
    if_match: str | None,
    *,
    invalidate: Callable[[], None],
) -> Record:
    """Create (no ``if_match``: an existing record is a 409) or update (on ``if_match``: a
    stale etag is a 412) one record of an admin collection; cached copies are dropped after."""
    try:
        if if_match is None:
            return await store.write(collection, id, doc, mode=WriteMode.CREATE)
        return await store.write(collection, id, doc, mode=WriteMode.UPDATE, if_match=if_match)
    except ConflictError:
        raise _exists(collection, id) from None
    except PreconditionFailedError:
        raise _stale(collection, id) from None
    finally:
        invalidate()


async def delete_record(
    store: Store,
    collection: Collection,
    id: str,
    if_match: str | None,
    *,
    not_found: DpsCode,
    etag_code: DpsCode = DpsCode.PRECONDITION_FAILED,
) -> Record:
    """Delete one record on ``if_match`` (``None``: whatever is stored): 404 with ``not_found``
    when it does not exist, 412 with ``etag_code`` when its etag moved on."""
    await get_or_404(store, collection, id, not_found)
    try:
        return await store.delete(collection, id, if_match=if_match)
    except PreconditionFailedError:
        raise PreconditionFailedError(
            f"The etag in If-Match does not match the stored {collection.label} {id!r}.",
            error_code=etag_code,
        ) from None
