"""What the SQLite and PostgreSQL backends share: SQL text, the write rules, paging tokens.

The SQL is written once with ``?`` placeholders; :func:`sql` turns it into psycopg's ``%s``
style. Both engines accept the same dialect for everything here (``ON CONFLICT``,
``RETURNING``, ``IN (...)``); what differs (``FOR UPDATE``, ``BEGIN IMMEDIATE``, advisory
locks, column types in the migrations) stays in the backend modules.

The write rules of the contract (``if_match`` first, then the write mode) live in
:func:`check_write` and :func:`check_delete`, so that both backends decide every case the same
way: each backend reads the current row under a write lock, asks these functions, then writes.
:func:`prepare_atomic` likewise validates the items of :meth:`Store.write_atomic` once for both.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .._enums import IdentityEnum
from ..errors import ConflictError, InvalidQueryError, NotFoundError, PreconditionFailedError
from .base import CLAIM_COLUMNS, Collection, Delete, Page, Record, Write, WriteMode, etags_match

#: An item of a write batch: its key, the item, and (for writes) its index values.
Prepared = tuple[str, Write | Delete, tuple[str | None, ...]]


def prepare_items(collection: Collection, items: Sequence[Write | Delete]) -> list[Prepared]:
    """Key and index values of each item of a :meth:`Store.write_many` batch.

    :raises ValueError: an item names an index column the collection does not have, or has a
        key that does not start with its key prefix (:func:`index_values`).
    """
    prepared: list[Prepared] = []
    for item in items:
        key = collection.key(item.id)
        prepared.append(
            (key, item, index_values(collection, key, item.index) if isinstance(item, Write) else ())
        )
    return prepared


__all__ = [
    "BOOTSTRAP_MIGRATIONS",
    "CHUNK",
    "MIGRATION_APPLIED",
    "RECORD_MIGRATION",
    "SCHEMA_VERSION",
    "AtomicItem",
    "Meta",
    "Migration",
    "ParamStyle",
    "Statements",
    "changed_index",
    "check_delete",
    "check_item",
    "check_write",
    "chunks",
    "claim_sql",
    "claimed_record",
    "count_sql",
    "decode_continuation",
    "encode_continuation",
    "filter_conditions",
    "filter_params",
    "index_values",
    "insert_params",
    "key_range",
    "load_migrations",
    "make_page",
    "page_query",
    "page_sql",
    "prepare_atomic",
    "record_from_row",
    "settings_sql",
    "sql",
    "statements",
    "tagged_record",
    "tagged_rows_sql",
    "update_if_etag_setting",
    "update_params",
    "written_record",
]

#: How many keys go into one ``IN (...)`` list (SQLite's historic limit is 999 parameters).
CHUNK = 500

#: The columns every collection table starts with, in this order; index columns follow.
BASE_COLUMNS = ("key", "id", "etag", "created", "updated", "doc")


class ParamStyle(IdentityEnum):
    """Placeholder style of a DB-API driver."""

    QMARK = "qmark"  # sqlite3
    FORMAT = "format"  # psycopg


def sql(text: str, style: ParamStyle) -> str:
    """``text`` (written with ``?`` placeholders) in ``style``."""
    if style is ParamStyle.QMARK:
        return text
    # None of our SQL contains a literal "%" or "?", so a plain replace is exact.
    return text.replace("?", "%s")


# -- migrations -------------------------------------------------------------------------------

BOOTSTRAP_MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, applied_at text NOT NULL)"
)
MIGRATION_APPLIED = "SELECT 1 FROM schema_migrations WHERE version = ?"
RECORD_MIGRATION = "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)"
SCHEMA_VERSION = "SELECT coalesce(max(version), 0) FROM schema_migrations"

_MIGRATION_NAME = re.compile(r"^(\d+)_[A-Za-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned migration file."""

    version: int
    name: str
    text: str


def load_migrations(dialect: str) -> list[Migration]:
    """The migrations of ``dialect`` (``"sqlite"`` or ``"postgresql"``), in version order.

    :raises RuntimeError: two files share a version (a packaging mistake, not a runtime one).
    """
    folder = resources.files(__package__).joinpath("migrations", dialect)
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            continue
        version = int(match.group(1))
        if version in found:
            raise RuntimeError(f"Two {dialect} migrations have version {version}")
        found[version] = Migration(version, entry.name, entry.read_text(encoding="utf-8"))
    return [found[version] for version in sorted(found)]


# -- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SettingsSql:
    """The statements of the settings table, in one placeholder style."""

    get: str
    set: str
    insert_if_missing: str


@functools.cache
def settings_sql(style: ParamStyle) -> SettingsSql:
    """The statements of the settings table."""
    return SettingsSql(
        get=sql("SELECT value FROM settings WHERE key = ?", style),
        set=sql(
            "INSERT INTO settings (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            style,
        ),
        insert_if_missing=sql(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING RETURNING value",
            style,
        ),
    )


# -- collections ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Statements:
    """The fixed statements of one collection table, in one placeholder style.

    Rows selected with :attr:`columns` are ``key, id, etag, created, updated, doc, *index``;
    :attr:`select_meta` yields ``key, id, etag, created``.
    """

    columns: str
    select_meta: str
    insert: str
    insert_if_missing: str
    upsert: str
    update: str
    #: :attr:`update` only when the row's etag is the last parameter; returns ``id, created``.
    update_if_etag: str
    delete: str
    select_full_prefix: str
    select_meta_prefix: str
    placeholder: str

    def select_many(self, count: int) -> str:
        """Full rows whose key is one of ``count`` parameters, in key order."""
        return self._many(self.select_full_prefix, count)

    def select_meta_many(self, count: int) -> str:
        """Meta rows (``key, id, etag, created``) whose key is one of ``count`` parameters."""
        return self._many(self.select_meta_prefix, count)

    def _many(self, prefix: str, count: int) -> str:
        return f"{prefix} WHERE key IN ({', '.join([self.placeholder] * count)}) ORDER BY key"


@functools.cache
def statements(collection: Collection, style: ParamStyle) -> Statements:
    """The statements of ``collection`` in ``style`` (built once)."""
    table = collection.table
    index = collection.index_columns
    columns = ", ".join((*BASE_COLUMNS, *index))
    values = ", ".join("?" * (len(BASE_COLUMNS) + len(index)))
    # An upsert keeps id and created (the first write's) and replaces everything else.
    replaced = ", ".join(f"{column} = excluded.{column}" for column in ("etag", "updated", "doc", *index))
    assignments = ", ".join(f"{column} = ?" for column in ("etag", "updated", "doc", *index))
    insert = f"INSERT INTO {table} ({columns}) VALUES ({values})"
    return Statements(
        columns=columns,
        select_meta=sql(f"SELECT key, id, etag, created FROM {table} WHERE key = ?", style),
        insert=sql(insert, style),
        insert_if_missing=sql(f"{insert} ON CONFLICT (key) DO NOTHING RETURNING id, created", style),
        upsert=sql(f"{insert} ON CONFLICT (key) DO UPDATE SET {replaced} RETURNING id, created", style),
        update=sql(f"UPDATE {table} SET {assignments} WHERE key = ?", style),
        update_if_etag=update_if_etag_setting(collection, index, style),
        delete=sql(f"DELETE FROM {table} WHERE key = ? RETURNING {columns}", style),
        select_full_prefix=f"SELECT {columns} FROM {table}",
        select_meta_prefix=f"SELECT key, id, etag, created FROM {table}",
        placeholder=sql("?", style),
    )


@functools.lru_cache(maxsize=256)
def update_if_etag_setting(collection: Collection, columns: tuple[str, ...], style: ParamStyle) -> str:
    """An update of the row whose key and etag match, setting its etag, time, document and
    ``columns`` of its index columns (in their order; the others keep their values; all of them:
    :attr:`Statements.update_if_etag`): parameters etag, updated, doc, those columns' values,
    key, etag read. See :func:`changed_index`."""
    assignments = ", ".join(f"{column} = ?" for column in ("etag", "updated", "doc", *columns))
    return sql(
        f"UPDATE {collection.table} SET {assignments} WHERE key = ? AND etag = ? RETURNING id, created", style
    )


def changed_index(
    collection: Collection, item: Write, values: tuple[str | None, ...]
) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """The index columns an update on an etag sets, and their new values (from ``values``,
    :func:`index_values`): those that change when ``item`` says what they were
    (:attr:`Write.index_before`), else all of them."""
    before = item.index_before
    if before is None:
        return collection.index_columns, values
    changed = [
        (column, value)
        for column, value in zip(collection.index_columns, values, strict=True)
        if before.get(column) != value
    ]
    return tuple(column for column, _ in changed), tuple(value for _, value in changed)


def chunks(keys: Sequence[str], size: int = CHUNK) -> Iterator[Sequence[str]]:
    """``keys`` in slices of at most ``size``."""
    for start in range(0, len(keys), size):
        yield keys[start : start + size]


def index_values(collection: Collection, key: str, index: Mapping[str, str | None]) -> tuple[str | None, ...]:
    """The values of every index column of ``collection``, in column order (missing ones None),
    for the record ``key``.

    :raises ValueError: ``index`` names a column the collection does not have, or its value of
        the key prefix column is not the start of ``key`` ("Key prefixes" in ``base``).
    """
    unknown = set(index).difference(collection.index_columns)
    if unknown:
        raise ValueError(f"{collection.table} has no index column(s) {sorted(unknown)}")
    column = collection.key_prefix_column
    if column is not None:
        prefix = index.get(column)
        if prefix is not None and not key.startswith(prefix + "/"):
            raise ValueError(f"The {collection.label} {key!r} has {column} {prefix!r}: not its key's prefix")
    return tuple(index.get(column) for column in collection.index_columns)


def insert_params(
    key: str, item: Write, etag: str, now: str, values: tuple[str | None, ...]
) -> tuple[Any, ...]:
    """Parameters of :attr:`Statements.insert` (and its variants)."""
    return (key, item.id, etag, now, now, item.doc, *values)


def update_params(
    key: str, item: Write, etag: str, now: str, values: tuple[str | None, ...]
) -> tuple[Any, ...]:
    """Parameters of :attr:`Statements.update`; followed by the etag read, of
    :func:`update_if_etag_setting` when ``values`` are those of its columns."""
    return (etag, now, item.doc, *values, key)


@functools.lru_cache(maxsize=256)  # SQLite's point reads may come in any order of tables
def tagged_rows_sql(collections: tuple[Collection, ...], where: str, null: str) -> str:
    """One statement reading the full rows of several tables (a table may come more than once):
    each row is its part's number in ``collections``, then its full row, padded with ``null``
    (the dialect's text NULL) to the widest table's (every index column is text). ``where``
    selects each part's rows, with its one parameter. Read back with :func:`tagged_record`."""
    width = max(len(collection.index_columns) for collection in collections)
    selects = []
    for n, collection in enumerate(collections):
        columns = ", ".join((*BASE_COLUMNS, *collection.index_columns))
        padding = f", {null}" * (width - len(collection.index_columns))
        selects.append(f"SELECT {n}, {columns}{padding} FROM {collection.table} WHERE {where}")
    return " UNION ALL ".join(selects)


def tagged_record(collections: tuple[Collection, ...], row: Sequence[Any]) -> tuple[int, Record]:
    """A row of :func:`tagged_rows_sql`: its part's number and its record."""
    collection = collections[row[0]]
    return row[0], record_from_row(collection, row[1 : 1 + len(BASE_COLUMNS) + len(collection.index_columns)])


def record_from_row(collection: Collection, row: Sequence[Any]) -> Record:
    """A :class:`Record` from a full row (``key, id, etag, created, updated, doc, *index``)."""
    return Record(
        id=row[1],
        etag=row[2],
        created=row[3],
        updated=row[4],
        doc=bytes(row[5]),
        index=dict(zip(collection.index_columns, row[6:], strict=True)),
    )


def written_record(
    collection: Collection,
    item: Write,
    id: str,
    etag: str,
    created: str,
    now: str,
    values: tuple[str | None, ...],
) -> Record:
    """The record a successful write stored (``id`` and ``created`` as the row keeps them)."""
    return Record(
        id=id,
        etag=etag,
        created=created,
        updated=now,
        doc=item.doc,
        index=dict(zip(collection.index_columns, values, strict=True)),
    )


# -- the write rules --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Meta:
    """What the write rules need to know about an existing row."""

    key: str
    id: str
    etag: str
    created: str


def check_write(
    collection: Collection, item: Write, existing: Meta | None
) -> ConflictError | NotFoundError | PreconditionFailedError | None:
    """The contract error ``item`` meets given the current row (``None``: go ahead).

    ``if_match`` is checked first: ``"*"`` or an etag on a missing record fails the condition.
    """
    if item.if_match is not None and (existing is None or not etags_match(item.if_match, existing.etag)):
        return _precondition_failed(collection, item.id, existing)
    if existing is not None and item.mode is WriteMode.CREATE:
        return ConflictError(f"The {collection.label} {existing.id!r} already exists")
    if existing is None and item.mode is WriteMode.UPDATE:
        return NotFoundError(f"No {collection.label} by the id of {item.id!r} was found")
    return None


def check_delete(
    collection: Collection, item: Delete, existing: Meta | None
) -> NotFoundError | PreconditionFailedError | None:
    """The contract error a delete meets given the current row (``None``: go ahead).

    As for writes, ``if_match`` is checked first, so an etag (or ``"*"``) on a missing record is
    a failed precondition, and a missing record without ``if_match`` is not found.
    """
    if item.if_match is not None and (existing is None or not etags_match(item.if_match, existing.etag)):
        return _precondition_failed(collection, item.id, existing)
    if existing is None:
        return NotFoundError(f"No {collection.label} by the id of {item.id!r} was found")
    return None


def check_item(
    collection: Collection, item: Write | Delete, existing: Meta | None
) -> ConflictError | NotFoundError | PreconditionFailedError | None:
    """:func:`check_write` or :func:`check_delete`, as ``item`` is."""
    if isinstance(item, Delete):
        return check_delete(collection, item, existing)
    return check_write(collection, item, existing)


#: An item of :meth:`Store.write_atomic`, prepared: its collection, its key, the item, and (for
#: writes) its index values in column order.
AtomicItem = tuple[Collection, str, Write | Delete, tuple[str | None, ...]]


def prepare_atomic(items: Sequence[tuple[Collection, Write | Delete]]) -> list[AtomicItem]:
    """The items of :meth:`Store.write_atomic` with their keys and index values, in order.

    :raises ValueError: two items on one (collection, key), or an unknown index column (so
        that a backend finds every such mistake before it writes anything).
    """
    prepared: list[AtomicItem] = []
    seen: set[tuple[Collection, str]] = set()
    for collection, item in items:
        key = collection.key(item.id)
        if (collection, key) in seen:
            raise ValueError(f"write_atomic has two items on the {collection.label} {item.id!r}")
        seen.add((collection, key))
        values = index_values(collection, key, item.index) if isinstance(item, Write) else ()
        prepared.append((collection, key, item, values))
    return prepared


def _precondition_failed(collection: Collection, id: str, existing: Meta | None) -> PreconditionFailedError:
    if existing is None:
        return PreconditionFailedError(
            f"If-Match was given but no {collection.label} by the id of {id!r} exists"
        )
    return PreconditionFailedError(f"If-Match does not match the etag of the {collection.label} {id!r}")


# -- claims -----------------------------------------------------------------------------------


def require_claimable(collection: Collection) -> None:
    """:raises ValueError: ``collection`` has not the index columns a claim needs."""
    if not collection.claimable:
        raise ValueError(f"{collection.table} has no {' and '.join(CLAIM_COLUMNS)} index columns to claim by")


def claim_sql(
    collection: Collection,
    filters: Mapping[str, str] | None,
    limit: int,
    style: ParamStyle,
    *,
    lock: str = "",
) -> tuple[str, list[Any]]:
    """The statement and parameters that select the due rows a claim takes (full rows, in
    ``due`` then key order), ``lock`` appended (PostgreSQL: ``FOR UPDATE SKIP LOCKED``), with
    ``now`` left as the last parameter but one (the caller appends ``now`` and ``limit``).

    :raises ValueError: the collection cannot be claimed from, a bad filter, ``limit`` below 1.
    """
    require_claimable(collection)
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    columns, params = filter_params(collection, filters)
    conditions = [*filter_conditions(collection, columns, style), "due <= ?"]
    text = (
        f"SELECT {statements(collection, style).columns} FROM {collection.table} "
        f"WHERE {' AND '.join(conditions)} ORDER BY due, key LIMIT ?{lock}"
    )
    return sql(text, style), list(params)


def next_due_sql(collection: Collection) -> str:
    """The statement that reads the earliest ``due`` of a claimable collection (the index on
    ``due`` answers it from one end).

    :raises ValueError: the collection cannot be claimed from.
    """
    require_claimable(collection)
    return f"SELECT min(due) FROM {collection.table}"


def claimed_record(
    collection: Collection, row: Sequence[Any], etag: str, now: str, until: str, owner: str
) -> Record:
    """The record a claim stored for a selected full ``row``."""
    record = record_from_row(collection, row)
    return Record(
        id=record.id,
        etag=etag,
        created=record.created,
        updated=now,
        doc=record.doc,
        index={**record.index, "due": until, "owner": owner},
    )


# -- queries ----------------------------------------------------------------------------------

_TOKEN_PREFIX = "k1:"
_TOKEN_ALPHABET = re.compile(r"^[A-Za-z0-9_-]+$")


def encode_continuation(key: str) -> str:
    """The opaque continuation token that resumes after ``key``."""
    raw = (_TOKEN_PREFIX + key).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_continuation(token: str) -> str:
    """The key a continuation token resumes after.

    :raises InvalidQueryError: the token is not one :func:`encode_continuation` made.
    """
    if not _TOKEN_ALPHABET.match(token):
        raise InvalidQueryError("The continuation token is malformed")
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidQueryError("The continuation token is malformed") from exc
    if not text.startswith(_TOKEN_PREFIX) or "\x00" in text:  # no key holds a NUL
        raise InvalidQueryError("The continuation token is malformed")
    return text[len(_TOKEN_PREFIX) :]


def holds_nul(values: Iterable[str]) -> bool:
    """Whether a key or filter value has a NUL: no stored one has (the contract's "Text" rule),
    and PostgreSQL refuses it as a parameter, so a read with one finds nothing without asking."""
    return any("\x00" in value for value in values)


def filter_params(
    collection: Collection, filters: Mapping[str, str] | None
) -> tuple[tuple[str, ...], list[str]]:
    """The filtered columns (sorted, ``"id"`` becoming ``key``) and the parameters of their
    :func:`filter_conditions`, in order.

    :raises ValueError: a filter names neither ``"id"`` nor an index column of ``collection``.
    """
    if not filters:
        return (), []
    unknown = set(filters).difference(("id", *collection.index_columns))
    if unknown:
        raise ValueError(f"{collection.table} cannot be filtered on {sorted(unknown)}")
    names = sorted(filters)
    columns = tuple("key" if name == "id" else name for name in names)
    values = [collection.key(filters[name]) if name == "id" else filters[name] for name in names]
    if _prefix_alone(collection, columns):
        values += key_range(values[0])
    return columns, values


def _prefix_alone(collection: Collection, columns: tuple[str, ...]) -> bool:
    """Whether a filter on ``columns`` is on the collection's key prefix column alone (then
    read as a range of the key: :func:`key_range`, :func:`filter_conditions`)."""
    return columns == (collection.key_prefix_column,)


def key_range(prefix: str) -> tuple[str, str]:
    """The bounds ``[low, high)`` of the keys that start with ``prefix`` and ``/``. The keys
    compare by code point (SQLite's BINARY collation on UTF-8, PostgreSQL's "C"), in which
    ``0`` follows ``/``: every key with that start is in the range, and no other key is."""
    return prefix + "/", prefix + "0"


def filter_conditions(collection: Collection, columns: tuple[str, ...], style: ParamStyle) -> list[str]:
    """The conditions of ``columns`` (from :func:`filter_params`), each equal to a parameter
    (``?``; the caller converts them to ``style``).

    A filter on the key prefix column alone also bounds the key to its range
    (:func:`key_range`), which the key's own index reads ("Key prefixes" in ``base``); the
    equality stays, so the rows are exactly those it selects. On SQLite (``QMARK``) it is
    written ``+column = ?``, which no index answers: the hub devices' other indexes start with
    ``hub``, and SQLite's planner, which has no statistics here, ranks an equality above a
    range, so it would read the hub from one of them and sort it. PostgreSQL's planner sizes
    both from its statistics and reads the range, in key order, for a page (its plans are
    tested in ``tests/storage/test_hub_device_keys.py``). With other columns the range is left
    out: their indexes (hub first) answer those filters.
    """
    if not _prefix_alone(collection, columns):
        return [f"{column} = ?" for column in columns]
    unindexed = "+" if style is ParamStyle.QMARK else ""
    return [f"{unindexed}{columns[0]} = ?", "key >= ?", "key < ?"]


@functools.lru_cache(maxsize=256)
def page_sql(collection: Collection, columns: tuple[str, ...], after: bool, style: ParamStyle) -> str:
    """A page query: ``columns`` equal to parameters (:func:`filter_conditions`), then
    (``after``) ``key > ?``, then LIMIT ?."""
    conditions = filter_conditions(collection, columns, style)
    if after:
        conditions.append("key > ?")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    text = (
        f"SELECT {statements(collection, style).columns} FROM {collection.table}{where} ORDER BY key LIMIT ?"
    )
    return sql(text, style)


@functools.lru_cache(maxsize=256)
def count_sql(collection: Collection, columns: tuple[str, ...], style: ParamStyle) -> str:
    """A count query with ``columns`` equal to parameters (:func:`filter_conditions`)."""
    where = f" WHERE {' AND '.join(filter_conditions(collection, columns, style))}" if columns else ""
    return sql(f"SELECT count(*) FROM {collection.table}{where}", style)


def page_query(
    collection: Collection,
    filters: Mapping[str, str] | None,
    limit: int,
    continuation: str | None,
    style: ParamStyle,
) -> tuple[str, list[Any]]:
    """The statement and parameters of one :meth:`Store.query` page (it asks for one extra row
    to learn whether more remain; :func:`make_page` drops it).

    :raises ValueError: a bad filter, or ``limit`` below 1.
    :raises InvalidQueryError: a malformed continuation token.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    columns, params = filter_params(collection, filters)
    after = None if continuation is None else decode_continuation(continuation)
    text = page_sql(collection, columns, after is not None, style)
    return text, [*params, *(() if after is None else (after,)), limit + 1]


def make_page(collection: Collection, rows: Sequence[Sequence[Any]], limit: int) -> Page:
    """The page for the rows of a :func:`page_query` statement."""
    more = len(rows) > limit
    rows = rows[:limit]
    continuation = encode_continuation(rows[-1][0]) if more else None
    return Page([record_from_row(collection, row) for row in rows], continuation)
