"""Storage: one contract (:class:`Store`), two backends (SQLite, PostgreSQL)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigurationError
from .base import (
    Collection,
    Delete,
    Entry,
    Page,
    Record,
    Store,
    Stream,
    StreamWatch,
    Write,
    WriteMode,
    etags_match,
    is_wildcard,
    new_etag,
    utc_iso,
    utc_now,
    utc_seconds,
)

__all__ = [
    "Collection",
    "Delete",
    "Entry",
    "Page",
    "PoolSize",
    "Record",
    "Store",
    "Stream",
    "StreamWatch",
    "Write",
    "WriteMode",
    "etags_match",
    "is_wildcard",
    "new_etag",
    "open_store",
    "utc_iso",
    "utc_now",
    "utc_seconds",
]


#: How to get the PostgreSQL backend's drivers (the ``postgres`` extra, which ``make run`` does not install).
POSTGRES_EXTRA_HINT = (
    "pip install 'provisiond[postgres]' (in a checkout: .venv/bin/pip install -e '.[postgres]')"
)


_POOL_MIN = 1


@dataclass(frozen=True, slots=True)
class PoolSize:
    """The bounds of a PostgreSQL store's connection pool, in one worker process
    (``--db-pool-size``). The pool keeps ``min`` connections open and opens more, up to
    ``max``, while calls wait for one (closing those idle for 10 minutes). Every worker of every
    node has its own pool, and one listening connection besides (the hub broker's
    :meth:`Store.watch`): together their ``max + 1`` must stay within the server's
    ``max_connections`` (100 by default, 3 of them reserved for superusers).

    The default, 1 to 16: with 64 registrations in flight a worker's reads and commits go in
    batches (a few connections), but the registration path's cached settings, hubs and groups
    are read again by every request in flight when they expire, each second, and those bursts
    grow the pool to 10-16 connections (docs/performance.md). Four workers or nodes at 16 fit
    PostgreSQL's default ``max_connections``."""

    min: int = _POOL_MIN
    max: int = 16

    def __post_init__(self) -> None:
        if self.min < 0 or self.max < 1 or self.min > self.max:
            raise ValueError(f"{self}: {_POOL_SIZE_RULE}")

    def __str__(self) -> str:
        return f"{self.min}-{self.max}"

    @classmethod
    def parse(cls, text: str) -> PoolSize:
        """``MAX`` (the minimum stays 1, or MAX if smaller) or ``MIN-MAX``.

        :raises ValueError: anything else, with a message that says what is expected.
        """
        low, sep, high = text.strip().partition("-")
        try:
            return cls(int(low), int(high)) if sep else cls(min(_POOL_MIN, int(low)), int(low))
        except ValueError:
            raise ValueError(f"{text!r} is not a pool size: {_POOL_SIZE_RULE}") from None


_POOL_SIZE_RULE = "MAX or MIN-MAX, whole numbers with 0 <= MIN <= MAX and MAX >= 1 (e.g. 16 or 2-16)"


def open_store(url: str, *, pool: PoolSize | None = None) -> Store:
    """A store for a database URL: ``postgresql://...`` or a SQLite path (``sqlite:///path``,
    or a plain file path). The store is not opened yet: await :meth:`Store.open`. ``pool``
    bounds a PostgreSQL store's connection pool (SQLite has none).

    :raises ConfigurationError: a PostgreSQL URL without the ``postgres`` extra installed.
    """
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from .postgres import PostgresStore
        except ImportError as exc:
            if not (exc.name or "psycopg").startswith("psycopg"):
                raise
            raise ConfigurationError(
                f"PostgreSQL support is not installed ({exc}): {POSTGRES_EXTRA_HINT}"
            ) from exc
        pool = pool or PoolSize()
        return PostgresStore(url, min_size=pool.min, max_size=pool.max)
    path = url.removeprefix("sqlite:///").removeprefix("sqlite://")
    from .sqlite import SqliteStore

    return SqliteStore(path)
