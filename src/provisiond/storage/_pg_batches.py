"""What the PostgreSQL store sends together: point reads and the registrar's commits, batched
by two loops, the write loop carrying the reads that are waiting when it sends.

Theory of operation
-------------------
The registrar's calls come in two kinds: point reads (its record, the individual enrollment:
:meth:`~provisiond.storage.postgres.PostgresStore.get`, ``get_each``) and one-statement commits
(``write_atomic`` of first registrations' creates and re-registrations' updates on an etag,
:mod:`._pg_atomic`). With many registrations in flight each kind is batched: the calls made
while the previous batch of that kind is at the server go together in the next (group commit).

Each wait for the server costs the database a backend wake-up, a transaction's start and end
and a context switch, and the server an event-loop wake-up and psycopg's per-round-trip work,
whatever the round trip carries. :class:`Exchange` has a loop for each kind, and **the write
loop carries the reads that are waiting** (made while the read loop's turn is at the server)
when its writes are first registrations' creates: the creates and the reads are then **one
statement** (:func:`creates_then_read`: the inserts as data-modifying ``WITH`` queries, then the
reads' ``SELECT``), one round trip where there were two. The read loop then finds fewer reads
waiting when its turn ends, and more often none.

What was measured and not kept: **one loop for both kinds** (every turn carrying whatever both
queues hold). It made fewer round trips still (about 0.33 a registration under ``bench/cpu.py``'s
load, against 0.65), but then every read waited for a commit's WAL flush, turns grew longer, and
the median latency under load doubled or tripled, with p99 over 100 ms
(``docs/performance.md``, "The fifth round"). Here a read waits for a WAL flush only when it
would otherwise have waited for the read loop's turn in flight and the next one.

Durability is unchanged: a write's caller is answered after its commit came back. A read made
while creates are being sent is answered as the tables were before them; such calls are
concurrent, so either order is a correct one.

A failure in a shared statement fails neither side for the other: nothing of it was written;
the reads are made again alone, and the writes take the path they take alone (on a unique
violation or a deadlock, each call on its own; any other error is the writes' error), so one
registration's failing create costs the others only a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from . import _pg_atomic, _sql
from ._sql import ParamStyle
from ._streams import Pending, fail_pending, settle, take
from .base import Collection, Record

__all__ = [
    "Exchange",
    "ReadStatement",
    "WritePart",
    "carries_reads",
    "creates_then_read",
    "read_statement",
    "select_any_sql",
    "write_parts",
]

_STYLE = ParamStyle.FORMAT

A = TypeVar("A")  # a read
RA = TypeVar("RA")  # a read's result
B = TypeVar("B")  # a write
RB = TypeVar("RB")  # a write's result

#: What a flush of both queues gives each side: one result per item, or the side's error.
Outcomes = tuple[list[RA] | Exception, list[RB] | Exception]


class Exchange(Generic[A, RA, B, RB]):
    """Two queues (reads and writes), each drained by its own loop. The first call of a kind to
    arrive starts a turn at once; calls that arrive while that kind's turn is at the server wait
    for the next, which carries all of them (up to ``max_reads`` or ``max_writes`` items). A
    write turn also takes the reads waiting when it starts, if ``carries(writes)``. A turn is
    ``flush(reads, writes)``, which returns each side's results, or each side's error. Use from
    one event loop."""

    def __init__(
        self,
        flush: Callable[[list[A], list[B]], Awaitable[Outcomes[RA, RB]]],
        carries: Callable[[list[B]], bool],
        *,
        max_reads: int,
        max_writes: int,
    ) -> None:
        self._flush = flush
        self._carries = carries
        self._max_reads, self._max_writes = max_reads, max_writes
        self._reads: Pending[A, RA] = []
        self._writes: Pending[B, RB] = []
        #: The loop of writes (with the reads pending when it starts a turn), and the loop of
        #: reads alone.
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def read(self, items: Sequence[A]) -> list[RA]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[RA]] = loop.create_future()
        self._reads.append((list(items), future))
        if self._reader is None:
            self._reader = loop.create_task(self._drain(writer=False))
        return await future

    async def write(self, items: Sequence[B]) -> list[RB]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[RB]] = loop.create_future()
        self._writes.append((list(items), future))
        if self._writer is None:
            self._writer = loop.create_task(self._drain(writer=True))
        # A cancelled caller cancels only its future: its items stay in the batch, which is
        # written for everyone (settle skips futures already done).
        return await future

    async def _drain(self, *, writer: bool) -> None:
        try:
            while self._writes if writer else self._reads:
                writes = take(self._writes, self._max_writes) if writer else []
                write_items = [item for items, _ in writes for item in items]
                carried = self._reads and (not writer or self._carries(write_items))
                reads = take(self._reads, self._max_reads) if carried else []
                try:
                    read_results, write_results = await self._flush(
                        [item for items, _ in reads for item in items], write_items
                    )
                except BaseException as exc:  # every caller of this turn learns it failed
                    settle(reads, exc)
                    settle(writes, exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                settle(reads, read_results)
                settle(writes, write_results)
        finally:
            # Marked done before anything else can run: a call made from now on starts a loop.
            if writer:
                self._writer = None
            else:
                self._reader = None
            if self._writer is None and self._reader is None:  # only when a loop was cancelled
                fail_pending(self._reads)
                fail_pending(self._writes)

    async def close(self) -> None:
        """Wait for the pending turns to finish."""
        for task in (self._writer, self._reader):
            if task is not None:
                with contextlib.suppress(Exception):
                    await task


@dataclass(frozen=True, slots=True)
class ReadStatement:
    """The one statement of a batch of point reads, and how to read its rows."""

    text: str
    params: list[Any]
    #: Each item's record (``None``: not found), in the items' order, from the statement's rows.
    records: Callable[[list[tuple[Any, ...]]], list[Record | None]]


def read_statement(items: Sequence[tuple[Collection, str]]) -> ReadStatement:
    """One statement reading the rows of ``items`` (collection and key; duplicates allowed): the
    rows of each table by one array of keys, several tables' rows together (``UNION ALL``, each
    row tagged with its table). A registration reads two records (its record and its individual
    enrollment); with many in flight, their reads share the statement."""
    if len(items) == 1:
        [(collection, key)] = items
        return ReadStatement(
            _sql.statements(collection, _STYLE).select_many(1),
            [key],
            lambda rows: [_sql.record_from_row(collection, rows[0]) if rows else None],
        )
    by_table: dict[Collection, set[str]] = {}
    for collection, key in items:
        by_table.setdefault(collection, set()).add(key)
    tables = tuple(sorted(by_table, key=lambda collection: collection.table))
    params = [sorted(by_table[collection]) for collection in tables]

    def records(rows: list[tuple[Any, ...]]) -> list[Record | None]:
        found: dict[tuple[Collection, str], Record] = {}
        if len(tables) == 1:
            for row in rows:
                found[(tables[0], row[0])] = _sql.record_from_row(tables[0], row)
        else:
            for row in rows:
                collection = tables[row[0]]
                width = 7 + len(collection.index_columns)
                found[(collection, row[1])] = _sql.record_from_row(collection, row[1:width])
        return [found.get(item) for item in items]

    text = select_any_sql(tables[0], meta=False) if len(tables) == 1 else _select_tables_sql(tables)
    return ReadStatement(text, params, records)


@dataclass(frozen=True, slots=True)
class WritePart:
    """One statement of a batch of one-statement ``write_atomic`` calls."""

    text: str
    params: list[Any]
    #: Whether it returns rows (the updates' shape).
    returns_rows: bool
    #: The outcome of each call it carries (by the call's position in the batch), from its rows.
    outcomes: Callable[[list[tuple[Any, ...]]], dict[int, list[Record] | None]]
    #: The tables of the creates it carries (:func:`._pg_atomic.creates_together`), if that is
    #: what it is: a read can then go in the same statement (:func:`creates_then_read`).
    shape: tuple[Collection, ...] | None = None


def write_parts(batch: Sequence[list[_sql.AtomicItem]], now: str) -> list[WritePart]:
    """The statements of a batch of one-statement ``write_atomic`` calls (:mod:`._pg_atomic`):
    the creates of one shape (every first registration's) as one statement together
    (:func:`._pg_atomic.creates_together`), each other call as its own statement."""
    parts: list[WritePart] = []
    shapes: dict[tuple[Collection, ...], list[int]] = {}
    for n, prepared in enumerate(batch):
        shape = _pg_atomic.creates_shape(prepared)
        if shape is not None:
            shapes.setdefault(shape, []).append(n)
            continue
        statement = _pg_atomic.one_statement(prepared, now)
        assert statement is not None, "write_atomic submits only the shapes _pg_atomic fits"
        parts.append(
            WritePart(statement.text, statement.params, statement.returns_rows, _outcome(n, statement))
        )
    for shape, calls in shapes.items():
        together = _pg_atomic.creates_together([batch[n] for n in calls], now)
        parts.append(
            WritePart(together.text, together.params, False, _written(calls, together.records), shape)
        )
    return parts


def carries_reads(batch: list[list[_sql.AtomicItem]]) -> bool:
    """Whether reads can go in the statement of ``batch``: creates only, all of one shape (the
    first registrations'), which :func:`write_parts` makes one statement."""
    shape = _pg_atomic.creates_shape(batch[0])
    return shape is not None and all(_pg_atomic.creates_shape(prepared) == shape for prepared in batch[1:])


def creates_then_read(part: WritePart, read: ReadStatement) -> ReadStatement:
    """``part`` (creates: :func:`carries_reads`) and ``read`` as **one statement** returning
    the read's rows (:func:`._pg_atomic.creates_then`). The read sees the tables as they were
    before the creates, as if it had gone first."""
    assert part.shape is not None, "only creates carry reads"
    return ReadStatement(
        _pg_atomic.creates_then(part.shape, read.text), [*part.params, *read.params], read.records
    )


def _outcome(
    n: int, statement: _pg_atomic.OneStatement
) -> Callable[[list[tuple[Any, ...]]], dict[int, list[Record] | None]]:
    """How call ``n``'s outcome is read from its statement's rows."""
    return lambda rows: {n: statement.finish(rows)}


def _written(
    calls: list[int], records: list[list[Record]]
) -> Callable[[list[tuple[Any, ...]]], dict[int, list[Record] | None]]:
    """The outcome of calls ``calls`` whose creates went in one statement: what they wrote."""
    written: dict[int, list[Record] | None] = dict(zip(calls, records, strict=True))
    return lambda rows: written


@functools.cache
def select_any_sql(collection: Collection, *, meta: bool) -> str:
    """The rows (full, or ``key, id, etag, created`` when ``meta``) whose key is in one array
    parameter, in key order. One short text whatever the number of keys, so psycopg prepares it
    once, where an ``IN (...)`` list would be a new statement to parse and plan for every size."""
    statements = _sql.statements(collection, _STYLE)
    prefix = statements.select_meta_prefix if meta else statements.select_full_prefix
    return f"{prefix} WHERE key = ANY(%s::text[]) ORDER BY key"


@functools.cache
def _select_tables_sql(collections: tuple[Collection, ...]) -> str:
    """The full rows of several tables whose key is in one array parameter per table (in
    order), as one statement: each row is its table's number in ``collections``, then its full
    row, padded with NULLs to the widest table's (every index column is text)."""
    width = max(len(collection.index_columns) for collection in collections)
    selects = []
    for n, collection in enumerate(collections):
        columns = ", ".join((*_sql.BASE_COLUMNS, *collection.index_columns))
        padding = ", NULL::text" * (width - len(collection.index_columns))
        selects.append(f"SELECT {n}, {columns}{padding} FROM {collection.table} WHERE key = ANY(%s::text[])")
    return " UNION ALL ".join(selects)
