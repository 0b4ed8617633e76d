"""Storage: one contract (:class:`Store`), two backends (SQLite, PostgreSQL)."""

from __future__ import annotations

from .base import Collection, Delete, Page, Record, Store, Write, WriteMode, etags_match, new_etag, utc_now

__all__ = [
    "Collection",
    "Delete",
    "Page",
    "Record",
    "Store",
    "Write",
    "WriteMode",
    "etags_match",
    "new_etag",
    "open_store",
    "utc_now",
]


def open_store(url: str) -> Store:
    """A store for a database URL: ``postgresql://...`` or a SQLite path (``sqlite:///path``,
    or a plain file path). The store is not opened yet: await :meth:`Store.open`."""
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url)
    path = url.removeprefix("sqlite:///").removeprefix("sqlite://")
    from .sqlite import SqliteStore

    return SqliteStore(path)
