"""Storage: one contract (:class:`Store`), two backends (SQLite, PostgreSQL)."""

from __future__ import annotations

from ..errors import ConfigurationError
from .base import (
    Collection,
    Delete,
    Entry,
    Page,
    Record,
    Store,
    Stream,
    Write,
    WriteMode,
    etags_match,
    is_wildcard,
    new_etag,
    utc_iso,
    utc_now,
)

__all__ = [
    "Collection",
    "Delete",
    "Entry",
    "Page",
    "Record",
    "Store",
    "Stream",
    "Write",
    "WriteMode",
    "etags_match",
    "is_wildcard",
    "new_etag",
    "open_store",
    "utc_iso",
    "utc_now",
]


#: How to get the PostgreSQL backend's drivers (the ``postgres`` extra, which ``make run`` does not install).
POSTGRES_EXTRA_HINT = (
    "pip install 'provisiond[postgres]' (in a checkout: .venv/bin/pip install -e '.[postgres]')"
)


def open_store(url: str) -> Store:
    """A store for a database URL: ``postgresql://...`` or a SQLite path (``sqlite:///path``,
    or a plain file path). The store is not opened yet: await :meth:`Store.open`.

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
        return PostgresStore(url)
    path = url.removeprefix("sqlite:///").removeprefix("sqlite://")
    from .sqlite import SqliteStore

    return SqliteStore(path)
