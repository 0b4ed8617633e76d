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
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import _sql
from ._sql import ParamStyle
from .base import Collection, Delete, Record, Write, WriteMode, is_wildcard, new_etag, stored_etag

__all__ = ["OneStatement", "fits", "one_statement"]

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
