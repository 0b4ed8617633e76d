"""``write_atomic`` as **one statement** on PostgreSQL, for the two shapes the registrar writes.

Theory of operation
-------------------
A registration commits its device identity and its registration record together
(:meth:`~provisiond.storage.base.Store.write_atomic`). The general path decides every item on
rows it has locked, which takes two round trips (the reads, then the writes and ``COMMIT``).
Two shapes need no decision in Python, so they are one statement, and statements of several
calls can share one pipelined transaction (:meth:`PostgresStore._flush_simple`):

- **Creates** (a first registration): plain INSERTs chained with ``WITH``, which commit
  together or not at all. A key that exists fails the statement with a unique violation:
  nothing was written, and the caller takes the general path, which names the conflict.
- **Updates on an etag** (a re-registration: the identity and the record, each over the etag
  read before): one statement locks the rows whose key *and* etag match (``FOR UPDATE``, in the
  general path's order: table, then key), counts them, and updates each row only when all of
  them matched. Under READ COMMITTED a row changed by a transaction that committed after the
  statement's snapshot is re-checked on its newest version by the lock (and then no longer
  matches), so the statement writes every row or none. It returns one row when it wrote, none
  when an etag did not match or a row is gone: the caller then takes the general path, which
  says which (412 or 404). It fails with no error, so within a shared transaction a failed call
  costs the others nothing.

Anything else (deletes, wildcard or missing ``If-Match`` on an update, mixed shapes) is the
general path's.

**Creates of several calls are one statement too** (:func:`creates_together`): the calls that
create rows in the same tables (every first registration: the identity, then the record) have
their rows inserted by one ``INSERT ... SELECT FROM unnest(...)`` per table, chained with
``WITH``, one array parameter per column. A batch of first registrations is then one statement
and its own transaction, where it was ``BEGIN``, a statement per call and ``COMMIT``: each
statement costs the database its parse, plan, executor start and protocol messages, and the
server psycopg's per-statement work, whatever it carries. A key that exists (or two calls of
the batch on one key) fails it with a unique violation, and nothing of it was written, as with
the transaction before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import _sql
from ._sql import ParamStyle
from .base import Collection, Delete, Record, Write, WriteMode, is_wildcard, new_etag, stored_etag

__all__ = ["OneStatement", "Together", "creates_shape", "creates_together", "fits", "one_statement"]

_STYLE = ParamStyle.FORMAT


@dataclass(frozen=True, slots=True)
class OneStatement:
    """The statement of one ``write_atomic`` call and how to read its outcome."""

    text: str
    params: list[Any]
    #: Whether the statement returns a row (the updates' shape); the creates' returns nothing.
    returns_rows: bool
    #: The records written, from the statement's rows (``None``: it wrote nothing).
    finish: Callable[[Sequence[Sequence[Any]]], list[Record] | None]


def fits(prepared: list[_sql.AtomicItem]) -> bool:
    """Whether ``prepared`` has one of the shapes :func:`one_statement` writes."""
    return _writer(prepared) is not None


def one_statement(prepared: list[_sql.AtomicItem], now: str) -> OneStatement | None:
    """The one statement of ``prepared`` (see the module docstring), or ``None`` when its
    shape needs the general path."""
    writer = _writer(prepared)
    return writer(prepared, now) if writer is not None else None


@dataclass(frozen=True, slots=True)
class Together:
    """The one statement of several calls' creates (:func:`creates_together`)."""

    text: str
    params: list[Any]
    #: The records each call writes, in the calls' order.
    records: list[list[Record]]


def creates_shape(prepared: list[_sql.AtomicItem]) -> tuple[Collection, ...] | None:
    """The tables ``prepared`` creates a row in, in order, when it is creates only (the calls
    of one shape can go in one statement, :func:`creates_together`); otherwise ``None``."""
    if _writer(prepared) is not _creates:
        return None
    return tuple(collection for collection, _, _, _ in prepared)


def creates_together(batch: Sequence[list[_sql.AtomicItem]], now: str) -> Together:
    """One statement creating the rows of every call of ``batch``, which all have the same
    :func:`creates_shape`: per position, one ``INSERT`` of all the calls' rows (in key order,
    so that batches racing on shared keys wait for each other in one order)."""
    shape = creates_shape(batch[0])
    assert shape is not None
    rows: list[list[tuple[Any, ...]]] = [[] for _ in shape]
    records: list[list[Record]] = []
    for prepared in batch:
        assert creates_shape(prepared) == shape, "creates_together takes calls of one shape"
        written = []
        for n, (collection, key, item, values) in enumerate(prepared):
            assert isinstance(item, Write)
            etag = new_etag()
            rows[n].append(_sql.insert_params(key, item, etag, now, values))
            written.append(_sql.written_record(collection, item, item.id, etag, now, now, values))
        records.append(written)
    params: list[Any] = []
    for table_rows in rows:
        table_rows.sort(key=lambda row: row[0])
        params += [list(column) for column in zip(*table_rows, strict=True)]
    return Together(_create_together_sql(shape), params, records)


def _writer(
    prepared: list[_sql.AtomicItem],
) -> Callable[[list[_sql.AtomicItem], str], OneStatement] | None:
    """What makes ``prepared``'s statement: all creates, or all updates on an etag."""
    if all(_is_create(item) for _, _, item, _ in prepared):
        return _creates
    if all(_is_update_on_etag(item) for _, _, item, _ in prepared):
        return _updates
    return None


def _is_create(item: Write | Delete) -> bool:
    return isinstance(item, Write) and item.mode is WriteMode.CREATE and item.if_match is None


def _is_update_on_etag(item: Write | Delete) -> bool:
    return (
        isinstance(item, Write)
        and item.mode is not WriteMode.CREATE
        and item.if_match is not None
        and not is_wildcard(item.if_match)
    )


def _creates(prepared: list[_sql.AtomicItem], now: str) -> OneStatement:
    params: list[Any] = []
    records: list[Record] = []
    for collection, key, item, values in prepared:
        assert isinstance(item, Write)
        etag = new_etag()
        params += _sql.insert_params(key, item, etag, now, values)
        records.append(_sql.written_record(collection, item, item.id, etag, now, now, values))
    text = _create_all_sql(tuple(c for c, _, _, _ in prepared))
    return OneStatement(text, params, False, lambda rows: records)


def _updates(prepared: list[_sql.AtomicItem], now: str) -> OneStatement:
    order = tuple(sorted(range(len(prepared)), key=lambda n: (prepared[n][0].table, prepared[n][1])))
    params: list[Any] = []
    etags: list[str] = []
    for n in order:
        _, key, item, _ = prepared[n]
        assert isinstance(item, Write) and item.if_match is not None
        params += (key, stored_etag(item.if_match))
    for _, key, item, values in prepared:
        assert isinstance(item, Write) and item.if_match is not None
        etag = new_etag()
        etags.append(etag)
        params += (*_sql.update_params(key, item, etag, now, values), stored_etag(item.if_match))

    def finish(rows: Sequence[Sequence[Any]]) -> list[Record] | None:
        if not rows:
            return None
        [row] = rows
        return [
            _sql.written_record(collection, item, row[2 * n], etag, row[2 * n + 1], now, values)
            for n, ((collection, _, item, values), etag) in enumerate(zip(prepared, etags, strict=True))
            if isinstance(item, Write)
        ]

    text = _update_all_sql(tuple(c for c, _, _, _ in prepared), order)
    return OneStatement(text, params, True, finish)


@functools.cache
def _create_all_sql(collections: tuple[Collection, ...]) -> str:
    """One statement inserting one row into each of ``collections`` (in order): the inserts
    but the last are data-modifying ``WITH`` queries, which run to completion with it."""
    inserts = [_sql.statements(collection, _STYLE).insert for collection in collections]
    if len(inserts) == 1:
        return inserts[0]
    queries = ", ".join(f"w{n} AS ({text})" for n, text in enumerate(inserts[:-1]))
    return f"WITH {queries} {inserts[-1]}"


_RETURNING = " RETURNING id, created"


@functools.cache
def _update_all_sql(collections: tuple[Collection, ...], order: tuple[int, ...]) -> str:
    """One statement updating one row of each of ``collections`` (in order) on its key and
    etag, all or none; ``order`` is the order in which their rows are locked. Parameters: the
    key and etag of each row in lock order, then each update's (:func:`_sql.update_params` and
    the etag); one row back (``id, created`` of each) when it wrote."""
    checks = " + ".join(
        f"(SELECT count(*) FROM (SELECT 1 FROM {collections[n].table}"
        f" WHERE key = %s AND etag = %s FOR UPDATE) AS l{n})"
        for n in order
    )
    updates = []
    for n, collection in enumerate(collections):
        update = _sql.statements(collection, _STYLE).update_if_etag
        assert update.endswith(_RETURNING)
        updates.append(f"w{n} AS ({update.removesuffix(_RETURNING)} AND (SELECT ok FROM ok){_RETURNING})")
    columns = ", ".join(f"w{n}.id, w{n}.created" for n in range(len(collections)))
    sources = ", ".join(f"w{n}" for n in range(len(collections)))
    return (
        f"WITH ok AS (SELECT {checks} = {len(collections)} AS ok), {', '.join(updates)} "
        f"SELECT {columns} FROM {sources}"
    )


@functools.cache
def _create_together_sql(collections: tuple[Collection, ...]) -> str:
    """One statement inserting many rows into each of ``collections`` (in order), one array
    parameter per column; the inserts but the last are data-modifying ``WITH`` queries."""
    inserts = []
    for collection in collections:
        columns = (*_sql.BASE_COLUMNS, *collection.index_columns)
        arrays = ", ".join("%b::bytea[]" if column == "doc" else "%b::text[]" for column in columns)
        inserts.append(
            f"INSERT INTO {collection.table} ({', '.join(columns)}) SELECT * FROM unnest({arrays})"
        )
    if len(inserts) == 1:
        return inserts[0]
    queries = ", ".join(f"w{n} AS ({text})" for n, text in enumerate(inserts[:-1]))
    return f"WITH {queries} {inserts[-1]}"
