"""The PostgreSQL backend: psycopg 3 (async) with a :class:`psycopg_pool.AsyncConnectionPool`,
for one node or several nodes sharing one database.

Theory of operation
-------------------
Connections are in autocommit mode; a method that needs several statements opens an explicit
transaction. Conditional writes are race-free across processes because every decision is taken
on a row this transaction has locked:

- The common unconditional writes are one statement each: UPSERT is
  ``INSERT ... ON CONFLICT (key) DO UPDATE`` (keeping ``id`` and ``created``), CREATE is
  ``INSERT ... ON CONFLICT (key) DO NOTHING`` (no row back means the key exists: conflict).
  Among racing CREATEs the unique index lets exactly one insert win.
- Everything else (``if_match``, UPDATE, deletes, :meth:`PostgresStore.write_many`) runs in a
  transaction that locks the existing rows of all its keys with ``SELECT ... FOR UPDATE``,
  decides each item with the shared rules in :mod:`._sql`, and writes. A key that did not exist
  is inserted with ``ON CONFLICT DO NOTHING``; if another node inserted it meanwhile, the row is
  locked and the item decided again.
- A batch of several keys first takes one transaction-scoped advisory lock per key, in one
  global order, so that two batches sharing keys (existing or not) queue instead of
  deadlocking. Should a deadlock or serialization failure happen anyway, the transaction is
  rolled back and retried.
- In a batch, the inserts of keys that did not exist go to the server together, as one
  ``INSERT ... SELECT FROM unnest(...) ON CONFLICT (key) DO NOTHING RETURNING key`` per
  :data:`_INSERT_CHUNK` rows, instead of one round trip per item (a bulk create of 1,000
  enrollments is then a handful of statements). A key missing from what it returns was inserted
  by another node after our look: that item is decided again on its own, as above. Items on a
  key already pending in the batch flush the pending inserts first, so each key still sees its
  items in order.
- :meth:`PostgresStore.write_atomic` is one transaction too, across tables: the advisory locks
  of all its keys (the same lock ids and global order as batches, so the two queue on shared
  keys instead of deadlocking), the existing rows of each table ``FOR UPDATE``, then every item
  decided before anything is written, then the writes. A failing item raises inside the
  transaction, which rolls it back: among nodes racing to create the same keys, exactly one
  commits. It has the same deadlock retry. It costs **two round trips** (pipeline mode: the
  ``BEGIN``, the locks and the reads go together; the writes and ``COMMIT`` go together), so
  a key that did not exist is inserted with a plain ``INSERT``: one that another node inserted
  after our look aborts the transaction with a unique violation, and the transaction is tried
  again (it then finds the row, and decides on it).
- The registrar's commits are **one statement** each (:mod:`._pg_atomic`): a first
  registration's ``write_atomic`` of CREATEs only (the device identity and its record: plain
  INSERTs chained with ``WITH``, which commit together or not at all), and a re-registration's
  updates of both on the etags read before (the rows locked and counted, then updated only when
  all matched). If a key exists (a unique violation), an etag no longer matches (no row back),
  or the statement deadlocks with a transaction on the same keys, nothing was written and the
  general path above decides (and names the error). Such calls made while the previous ones
  are being written (or in the same turn of the event loop) go together, in one transaction,
  one round trip and one commit for all: first registrations' creates as one statement (an
  ``INSERT ... SELECT FROM unnest(...)`` per table), the updates pipelined with it; if a create
  in it fails, nothing of it was written and each call is made on its own. A batch waits one
  more turn of the event loop (``COMMIT_LINGER``) for calls to join it, as SQLite's does: under
  load it holds more of them, and the database does a quarter less work per registration.
- **Point reads go together** the same way (one more turn too): the ``get`` calls made while
  the previous ones are being read become one statement (``key = ANY(...)`` per table, the tables' rows joined with
  ``UNION ALL``), and :meth:`PostgresStore.get_each` asks for several records at once (the
  registrar's record and individual enrollment). Reads by key are planned at each call, never
  from a cached generic plan (:data:`_PLAN_KEY_READS` says why). Each wait for the server costs the event loop a wake-up and
  psycopg its per-statement work whatever it carries: with 64 registrations in flight, a
  registration's three waits became a fraction of one.

**Watches** (:meth:`PostgresStore.watch`) are LISTEN/NOTIFY on one more connection per store,
outside the pool (:mod:`._pg_listen`): appends to the hub's signal stream notify in their
transaction; writes that release hub outbox items notify once committed.

Migrations run in :meth:`PostgresStore.open`, each in a transaction holding
``pg_advisory_xact_lock``, so nodes starting together apply each migration exactly once.
Connections, the translation of driver exceptions (503 when the database is unreachable) and
riding through a failover are :mod:`._pg_connections`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors

from ..errors import ConflictError, NotFoundError, ProvisioningError, StorageError
from . import _pg_atomic, _pg_listen, _sql, _streams
from ._pg_connections import Connection as _Connection
from ._pg_connections import PgConnections
from ._pg_listen import NOTIFIED, PgListener
from ._sql import Meta, ParamStyle
from ._watch import Watches
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
    new_etag,
    released,
    releases,
    utc_now,
)

__all__ = ["PostgresStore"]

log = logging.getLogger(__name__)

_STYLE = ParamStyle.FORMAT
#: The advisory lock that serializes migrations ("prov" in ASCII).
_MIGRATION_LOCK = 0x70726F76
#: How often a write transaction is retried after a deadlock or serialization failure.
_TRANSACTION_ATTEMPTS = 3
#: How often one item re-reads its row after losing an insert race (inside one transaction).
_ITEM_ATTEMPTS = 5
#: The driver errors after which a write transaction is tried again.
_RETRIED: tuple[type[BaseException], ...] = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)
#: The most rows one batched INSERT statement carries.
_INSERT_CHUNK = 1000
#: psycopg's ``prepare`` for the reads of rows by key (``key = ANY(...)``): ``False``, planned
#: at every call, never a prepared statement's cached generic plan. A generic plan is made
#: once per connection, on the table as it is then, and kept until the table is analyzed:
#: made while a table is new or small (a fresh database, a first burst of registrations, a
#: bulk import), it is a sequential scan, and it stays one while the table grows by thousands
#: of rows a second, until autovacuum's next ANALYZE (a minute or more). Under a registration
#: burst on a fresh database every record read then scanned the whole table (about a quarter
#: of PostgreSQL's CPU per registration under the bench's load, over half of it with a pool of
#: 4 connections: ``docs/performance.md``, "The fourth round"). A plan made at each call sees
#: the table's current size (its pages), so a read of a few keys is an index scan as soon as
#: the table has more than a few pages. Planning costs some 25-50 µs per statement.
_PLAN_KEY_READS = False

_T = TypeVar("_T")


class PostgresStore(Store):
    """A :class:`Store` in a PostgreSQL database.

    :param url: a libpq connection string or ``postgresql://`` URL (several hosts allowed:
        provisiond connects to the one that accepts writes).
    :param min_size: connections the pool keeps open.
    :param max_size: the most connections the pool opens. The pool opens them as requests wait
        for one, and closes those idle for 10 minutes, so it follows the load up to this bound
        (``--db-pool-size``; :class:`~provisiond.storage.PoolSize` says how the default was
        chosen). With several worker processes or nodes, each has its own pool: together they
        must stay within the server's ``max_connections`` (100 by default).
    :param timeout: seconds a call waits for a free pool connection before failing (503).
    :param connect_timeout: seconds one connection attempt may take (unless the URL sets
        ``connect_timeout``).
    :param probe_interval: seconds between reconnection attempts while the database is down.
    :param retry_after: the Retry-After of 503 answers while the database is unavailable.
    """

    backend = "postgresql"

    #: Turns of the event loop a batch of reads or of the registrar's commits waits for more
    #: (module docstring).
    COMMIT_LINGER = 1

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 16,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        probe_interval: float = 0.5,
        retry_after: int = 2,
    ) -> None:
        self.url = url
        self._connections = PgConnections(
            url,
            label=repr(self),
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            connect_timeout=connect_timeout,
            probe_interval=probe_interval,
            retry_after=retry_after,
        )
        self._lifecycle = asyncio.Lock()
        self._watches = Watches()
        self._listener = PgListener(
            self._connections.connect_outside, label=repr(self), watches=self._watches
        )
        self._appends: _streams.GroupCommit[tuple[Stream, str, bytes], Entry] = _streams.GroupCommit(
            self._flush_appends
        )
        self._reads: _streams.GroupCommit[tuple[Collection, str], Record | None] = _streams.GroupCommit(
            self._flush_reads, max_batch=256, linger=self.COMMIT_LINGER
        )
        self._simple: _streams.GroupCommit[list[_sql.AtomicItem], list[Record] | None] = _streams.GroupCommit(
            self._flush_simple, max_batch=64, linger=self.COMMIT_LINGER
        )

    def __repr__(self) -> str:
        # The URL may carry a password: show only where it points.
        try:
            info = psycopg.conninfo.conninfo_to_dict(self.url)
        except psycopg.Error:
            return "PostgresStore(<invalid url>)"
        return f"PostgresStore(host={info.get('host')!r}, dbname={info.get('dbname')!r})"

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._lifecycle:
            await self._connections.open(self._migrate)

    async def close(self) -> None:
        await self._listener.close()
        await self._reads.close()
        await self._simple.close()
        await self._appends.close()
        async with self._lifecycle:
            await self._connections.close()

    async def _migrate(self, conn: _Connection) -> None:
        for migration in _sql.load_migrations("postgresql"):
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                await conn.execute(_sql.BOOTSTRAP_MIGRATIONS)
                cursor = await conn.execute(_sql.sql(_sql.MIGRATION_APPLIED, _STYLE), (migration.version,))
                if await cursor.fetchone() is not None:
                    continue
                await conn.execute(migration.text)
                await conn.execute(_sql.sql(_sql.RECORD_MIGRATION, _STYLE), (migration.version, utc_now()))
                log.info("Applied migration %s to %r", migration.name, self)

    async def _fetch_all(
        self, text: str, params: Sequence[Any], *, prepare: bool | None = None
    ) -> list[tuple[Any, ...]]:
        async with self._connections.connection() as conn:
            cursor = await conn.execute(text, params, prepare=prepare)
            return await cursor.fetchall()

    # -- records ------------------------------------------------------------------------------

    async def schema_version(self) -> int:
        [(version,)] = await self._fetch_all(_sql.SCHEMA_VERSION, ())
        return int(version)

    async def get(self, collection: Collection, id: str) -> Record | None:
        key = collection.key(id)
        if _sql.holds_nul((key,)):
            return None
        [record] = await self._reads.submit([(collection, key)])
        return record

    async def get_each(self, ids: Sequence[tuple[Collection, str]]) -> list[Record | None]:
        keys = [(collection, collection.key(id)) for collection, id in ids]
        wanted = [item for item in keys if not _sql.holds_nul((item[1],))]
        found = dict(zip(wanted, await self._reads.submit(wanted), strict=True)) if wanted else {}
        return [found.get(item) for item in keys]

    async def _flush_reads(self, items: list[tuple[Collection, str]]) -> list[Record | None]:
        """The point reads asked for while the previous ones were being read (or in the same
        turn of the event loop), in one round trip and **one statement**: the rows of each
        table by one array of keys, the tables' rows together (``UNION ALL``, each row tagged
        with its table). A registration reads two records (its record and its individual
        enrollment); with many in flight, their reads share the wait, the pool connection and
        the per-statement cost (the database's and psycopg's), which is most of a read's."""
        if len(items) == 1:
            [(collection, key)] = items
            rows = await self._fetch_all(
                _sql.statements(collection, _STYLE).select_many(1), (key,), prepare=_PLAN_KEY_READS
            )
            return [_sql.record_from_row(collection, rows[0]) if rows else None]
        by_table: dict[Collection, set[str]] = {}
        for collection, key in items:
            by_table.setdefault(collection, set()).add(key)
        tables = tuple(sorted(by_table, key=lambda collection: collection.table))
        params = [sorted(by_table[collection]) for collection in tables]
        found: dict[tuple[Collection, str], Record] = {}
        if len(tables) == 1:
            for row in await self._fetch_all(
                _select_any_sql(tables[0], meta=False), params, prepare=_PLAN_KEY_READS
            ):
                found[(tables[0], row[0])] = _sql.record_from_row(tables[0], row)
        else:
            statement = _sql.tagged_rows_sql(tables, "key = ANY(%b::text[])", "NULL::text")
            for row in await self._fetch_all(statement, params, prepare=_PLAN_KEY_READS):
                n, record = _sql.tagged_record(tables, row)
                found[(tables[n], row[1])] = record
        return [found.get(item) for item in items]

    async def get_many(self, collection: Collection, ids: Sequence[str]) -> dict[str, Record]:
        keys = sorted({collection.key(id) for id in ids if not _sql.holds_nul((id,))})
        if not keys:
            return {}
        # One statement (one snapshot) with one array parameter, whatever the number of keys.
        rows = await self._fetch_all(
            _select_any_sql(collection, meta=False), (keys,), prepare=_PLAN_KEY_READS
        )
        return {row[0]: _sql.record_from_row(collection, row) for row in rows}

    async def write(
        self,
        collection: Collection,
        id: str,
        doc: bytes,
        *,
        index: Mapping[str, str | None] | None = None,
        mode: WriteMode = WriteMode.UPSERT,
        if_match: str | None = None,
    ) -> Record:
        item = Write(id, doc, index or {}, mode, if_match)
        key = collection.key(id)
        values = _sql.index_values(collection, key, item.index)
        outcome: Record | ProvisioningError
        if if_match is None and mode is not WriteMode.UPDATE:
            outcome = await self._write_one_statement(collection, key, item, values)
        else:
            [outcome] = await self._write_batch(collection, [(key, item, values)])
        if isinstance(outcome, ProvisioningError):
            raise outcome
        if collection.claimable and releases(collection, item):
            await self._released(collection)
        return outcome

    async def write_many(
        self, collection: Collection, items: Sequence[Write | Delete]
    ) -> list[Record | ProvisioningError]:
        prepared = _sql.prepare_items(collection, items)
        if not prepared:
            return []
        outcomes = await self._write_batch(collection, prepared)
        if collection.claimable and released((collection, item) for item in items):
            await self._released(collection)
        return outcomes

    async def write_atomic(self, items: Sequence[tuple[Collection, Write | Delete]]) -> list[Record]:
        prepared = _sql.prepare_atomic(items)
        if not prepared:
            return []
        written: list[Record] | None = None
        if _pg_atomic.fits(prepared):
            [written] = await self._simple.submit([prepared])
        if written is None:
            tables = ", ".join(sorted({collection.table for collection, *_ in prepared}))
            # A unique violation is an insert that lost a race: the next attempt decides on the row.
            attempt = functools.partial(self._pipelined, _apply_atomic, prepared)
            written = await _retrying(tables, attempt, (*_RETRIED, pg_errors.UniqueViolation))
        if (collection := released(items)) is not None:
            await self._released(collection)
        return written

    async def _released(self, collection: Collection) -> None:
        """A committed write released records of ``collection``: wake this store's watches, and
        notify the other stores' (:mod:`._pg_listen`; a notification that fails to go is
        logged: the write stands, and the other writers find its records at their fallback)."""
        self._watches.wake(collection)
        try:
            await self._execute(
                "SELECT pg_notify(%s, %s)", (_pg_listen.channel(collection), self._listener.sender)
            )
        except StorageError as exc:
            log.warning(
                "%r: could not notify the other nodes of a release in %s: %s", self, collection.table, exc
            )

    async def _flush_simple(self, batch: list[list[_sql.AtomicItem]]) -> list[list[Record] | None]:
        """The one-statement ``write_atomic`` calls (:mod:`._pg_atomic`: first registrations'
        creates, re-registrations' updates on an etag) made while the previous ones were being
        written (or in the same turn of the event loop), in one transaction (one round trip,
        one commit for all). The creates of one shape (every first registration's) are one
        statement together (:func:`._pg_atomic.creates_together`); a batch of those alone is
        sent as that statement, its own transaction; anything else is pipelined between
        ``BEGIN`` and ``COMMIT``. An update whose etag no longer matches writes nothing and
        costs the others nothing; its caller gets ``None`` and takes the general path. If a
        create's key exists or the transaction deadlocks, nothing of it was written, and each
        call is then made on its own (:meth:`_one_statement`), so that each succeeds or fails
        alone."""
        if len(batch) == 1:
            return [await self._one_statement(batch[0])]
        now = utc_now()
        # (text, params, whether it returns rows, the outcome of each call it carries from its rows)
        parts: list[
            tuple[str, list[Any], bool, Callable[[list[tuple[Any, ...]]], dict[int, list[Record] | None]]]
        ]
        parts = []
        shapes: dict[tuple[Collection, ...], list[int]] = {}
        for n, prepared in enumerate(batch):
            shape = _pg_atomic.creates_shape(prepared)
            if shape is not None:
                shapes.setdefault(shape, []).append(n)
                continue
            statement = _pg_atomic.one_statement(prepared, now)
            assert statement is not None, "write_atomic submits only the shapes _pg_atomic fits"
            parts.append((statement.text, statement.params, statement.returns_rows, _outcome(n, statement)))
        for calls in shapes.values():
            together = _pg_atomic.creates_together([batch[n] for n in calls], now)
            parts.append((together.text, together.params, False, _written(calls, together.records)))
        outcomes: dict[int, list[Record] | None] = {}
        try:
            async with self._connections.connection() as conn:
                try:
                    if len(parts) == 1:
                        [(text, params, returns_rows, finish)] = parts
                        cursor = await conn.execute(text, params)
                        outcomes.update(finish(await cursor.fetchall() if returns_rows else []))
                    else:
                        async with conn.pipeline():
                            await conn.execute("BEGIN")
                            cursors = [await conn.execute(text, params) for text, params, _, _ in parts]
                            await conn.execute("COMMIT")
                        for (_, _, returns_rows, finish), cursor in zip(parts, cursors, strict=True):
                            outcomes.update(finish(await cursor.fetchall() if returns_rows else []))
                except BaseException:
                    await _roll_back(conn)
                    raise
        except StorageError as exc:
            if isinstance(exc.__cause__, pg_errors.UniqueViolation | pg_errors.DeadlockDetected):
                return [await self._one_statement(prepared) for prepared in batch]
            raise
        return [outcomes[n] for n in range(len(batch))]

    async def _one_statement(self, prepared: list[_sql.AtomicItem]) -> list[Record] | None:
        """One ``write_atomic`` call as one statement (:mod:`._pg_atomic`). None when it wrote
        nothing: a key exists (a unique violation), an etag no longer matches, or the statement
        deadlocked with a transaction on the same keys. The caller then takes the general path,
        which decides every item on the locked rows (and names the error)."""
        statement = _pg_atomic.one_statement(prepared, utc_now())
        assert statement is not None
        try:
            if statement.returns_rows:
                rows = await self._fetch_all(statement.text, statement.params)
            else:
                rows = []
                await self._execute(statement.text, statement.params)
        except StorageError as exc:
            if isinstance(exc.__cause__, pg_errors.UniqueViolation | pg_errors.DeadlockDetected):
                return None
            raise
        return statement.finish(rows)

    async def _write_one_statement(
        self, collection: Collection, key: str, item: Write, values: tuple[str | None, ...]
    ) -> Record | ProvisioningError:
        """An unconditional CREATE or UPSERT, in one statement (see the module docstring)."""
        statements = _sql.statements(collection, _STYLE)
        etag, now = new_etag(), utc_now()
        params = _sql.insert_params(key, item, etag, now, values)
        text = statements.insert_if_missing if item.mode is WriteMode.CREATE else statements.upsert
        rows = await self._fetch_all(text, params)
        if not rows:
            return ConflictError(f"The {collection.label} {item.id!r} already exists")
        [(stored_id, created)] = rows
        return _sql.written_record(collection, item, stored_id, etag, created, now, values)

    async def _write_batch(
        self, collection: Collection, prepared: list[_sql.Prepared]
    ) -> list[Record | ProvisioningError]:
        return await self._transaction(collection.table, _apply_batch, collection, prepared)

    async def _transaction(self, tables: str, function: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """``await function(conn, *args)`` in a transaction, which commits when it returns and
        rolls back when it raises; retried after a deadlock or serialization failure."""

        async def attempt() -> _T:
            async with self._connections.connection() as conn, conn.transaction():
                return await function(conn, *args)

        return await _retrying(tables, attempt, _RETRIED)

    async def _pipelined(
        self, function: Callable[..., Awaitable[Callable[[], Awaitable[_T]]]], *args: Any
    ) -> _T:
        """One attempt of a pipelined transaction: ``function(conn, *args)`` queues it,
        ``BEGIN`` to ``COMMIT`` (it may wait for results in between), and returns a coroutine
        function that gives its outcome once the pipeline's final sync has brought the results
        of everything it queued. Errors come out of that sync; the connection is then closed
        here, which rolls the transaction back (:func:`_roll_back`)."""
        async with self._connections.connection() as conn:
            try:
                async with conn.pipeline():
                    finish = await function(conn, *args)
                return await finish()
            except BaseException:
                await _roll_back(conn)
                raise

    async def claim(
        self,
        collection: Collection,
        *,
        now: str,
        until: str,
        owner: str,
        limit: int = 1,
        filters: Mapping[str, str] | None = None,
    ) -> list[Record]:
        # SKIP LOCKED: concurrent claims take disjoint rows and never wait for each other (nor
        # for a transaction writing a row: that row is skipped this time).
        text, params = _sql.claim_sql(collection, filters, limit, _STYLE, lock=" FOR UPDATE SKIP LOCKED")
        if filters and _sql.holds_nul(filters.values()):
            return []
        async with self._connections.connection() as conn, conn.transaction():
            cursor = await conn.execute(text, [*params, now, limit])
            rows = await cursor.fetchall()
            if not rows:
                return []
            stamp = utc_now()
            etags = [new_etag() for _ in rows]
            await conn.execute(
                f"UPDATE {collection.table} AS t SET etag = u.etag, updated = %s, due = %s, owner = %s "
                "FROM unnest(%b::text[], %b::text[]) AS u(key, etag) WHERE t.key = u.key",
                (stamp, until, owner, [row[0] for row in rows], etags),
            )
        return [
            _sql.claimed_record(collection, row, etag, stamp, until, owner)
            for row, etag in zip(rows, etags, strict=True)
        ]

    async def next_due(self, collection: Collection) -> str | None:
        [(due,)] = await self._fetch_all(_sql.next_due_sql(collection), ())
        return None if due is None else str(due)

    async def query(
        self,
        collection: Collection,
        *,
        filters: Mapping[str, str] | None = None,
        limit: int = 100,
        continuation: str | None = None,
    ) -> Page:
        text, params = _sql.page_query(collection, filters, limit, continuation, _STYLE)
        if filters and _sql.holds_nul(filters.values()):
            return _sql.make_page(collection, [], limit)
        rows = await self._fetch_all(text, params)
        return _sql.make_page(collection, rows, limit)

    async def count(self, collection: Collection, *, filters: Mapping[str, str] | None = None) -> int:
        columns, params = _sql.filter_params(collection, filters)
        if filters and _sql.holds_nul(filters.values()):
            return 0
        [(count,)] = await self._fetch_all(_sql.count_sql(collection, columns, _STYLE), params)
        return int(count)

    # -- settings -----------------------------------------------------------------------------

    async def get_setting(self, key: str) -> str | None:
        rows = await self._fetch_all(_sql.settings_sql(_STYLE).get, (key,))
        return str(rows[0][0]) if rows else None

    async def set_setting(self, key: str, value: str) -> None:
        await self._execute(_sql.settings_sql(_STYLE).set, (key, value))

    async def setting_setdefault(self, key: str, value: str) -> str:
        statements = _sql.settings_sql(_STYLE)
        async with self._connections.connection() as conn:
            # Two statements, not one: a statement's snapshot may predate the row that made
            # its insert a no-op, so the lookup must be a statement of its own.
            cursor = await conn.execute(statements.insert_if_missing, (key, value))
            row = await cursor.fetchone()
            if row is None:
                cursor = await conn.execute(statements.get, (key,))
                row = await cursor.fetchone()
        if row is None:  # settings are never deleted, so this cannot happen
            raise StorageError(f"The setting {key!r} vanished while it was being set")
        return str(row[0])

    async def _execute(self, text: str, params: Sequence[Any]) -> None:
        async with self._connections.connection() as conn:
            await conn.execute(text, params)

    # -- streams ------------------------------------------------------------------------------

    async def append(self, stream: Stream, items: Sequence[tuple[str, bytes]]) -> list[Entry]:
        _streams.check_items(items)
        if not items:
            return []
        return await self._appends.submit([(stream, partition, bytes(doc)) for partition, doc in items])

    async def _flush_appends(self, items: list[tuple[Stream, str, bytes]]) -> list[Entry]:
        created = utc_now()
        entries: list[Entry] = []
        async with self._connections.connection() as conn, conn.transaction():
            # One lock per stream, in one order: seq values of a stream become visible in order.
            # A watched stream notifies its listeners too, delivered at the commit (_pg_listen).
            for stream in sorted({stream for stream, _, _ in items}, key=lambda stream: stream.value):
                if stream in NOTIFIED:
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(%s), pg_notify(%s, %s)",
                        (_stream_lock_id(stream.value), _pg_listen.channel(stream), self._listener.sender),
                    )
                else:
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_stream_lock_id(stream.value),))
            for start in range(0, len(items), _INSERT_CHUNK):
                chunk = items[start : start + _INSERT_CHUNK]
                cursor = await conn.execute(
                    "INSERT INTO stream_entries (stream, partition, created, doc) "
                    "SELECT s, p, %s, d FROM unnest(%b::text[], %b::text[], %b::bytea[]) "
                    "WITH ORDINALITY AS t(s, p, d, n) ORDER BY n RETURNING seq",
                    (
                        created,
                        [stream.value for stream, _, _ in chunk],
                        [partition for _, partition, _ in chunk],
                        [doc for _, _, doc in chunk],
                    ),
                )
                # Identity values are drawn in insertion order (the ORDER BY); RETURNING's own
                # order is not promised, so sort them back into it.
                seqs = sorted(int(row[0]) for row in await cursor.fetchall())
                entries += [
                    Entry(stream, seq, partition, created, doc)
                    for (stream, partition, doc), seq in zip(chunk, seqs, strict=True)
                ]
        return entries

    def watch(self, stream: Stream | Collection) -> StreamWatch:
        """Live while the store's listening connection is up, for the hub's signal stream and
        the hub outbox's releases (:data:`._pg_listen.NOTIFIED`; any other watch is never
        live). The first such watch opens the listening connection (call it on an open
        store)."""
        if stream not in NOTIFIED:
            return super().watch(stream)
        watch = self._watches.add(stream)
        self._listener.start()
        return watch

    async def read(
        self, stream: Stream, *, after: int = 0, partition: str | None = None, limit: int = 100
    ) -> list[Entry]:
        params: tuple[Any, ...]
        if partition is None:
            text, params = _streams.READ, (stream.value, after, limit)
        else:
            if "\0" in partition:
                return []
            text, params = _streams.READ_PARTITION, (stream.value, partition, after, limit)
        rows = await self._fetch_all(_sql.sql(text, _STYLE), params)
        return [_streams.entry_from_row(stream, row) for row in rows]

    async def remove(self, stream: Stream, seqs: Sequence[int]) -> int:
        if not seqs:
            return 0
        async with self._connections.connection() as conn:
            cursor = await conn.execute(
                "DELETE FROM stream_entries WHERE stream = %s AND seq = ANY(%s)",
                (stream.value, [int(seq) for seq in seqs]),
            )
            return cursor.rowcount

    async def trim(
        self,
        stream: Stream,
        *,
        keep: int | None = None,
        before: str | None = None,
        partition: str | None = None,
    ) -> int:
        name = stream.value
        removed = 0
        params: tuple[Any, ...]
        keep_params: tuple[Any, ...]
        async with self._connections.connection() as conn:
            if before is not None:
                if partition is None:
                    text, params = _streams.TRIM_BEFORE, (name, before)
                else:
                    text, params = _streams.TRIM_BEFORE_PARTITION, (name, partition, before)
                removed += (await conn.execute(_sql.sql(text, _STYLE), params)).rowcount
            if keep is not None:
                if partition is None:
                    text, keep_params = _streams.TRIM_KEEP, (name, name, max(0, keep))
                else:
                    text, keep_params = (
                        _streams.TRIM_KEEP_PARTITION,
                        (name, partition, name, partition, max(0, keep)),
                    )
                removed += (await conn.execute(_sql.sql(text, _STYLE), keep_params)).rowcount
        return removed

    async def entry_count(self, stream: Stream, *, partition: str | None = None) -> int:
        if partition is None:
            rows = await self._fetch_all(_sql.sql(_streams.COUNT, _STYLE), (stream.value,))
        else:
            rows = await self._fetch_all(
                _sql.sql(_streams.COUNT_PARTITION, _STYLE), (stream.value, partition)
            )
        return int(rows[0][0])

    async def last_seq(self, stream: Stream, *, before: str | None = None) -> int:
        if before is None:
            rows = await self._fetch_all(_sql.sql(_streams.LAST_SEQ, _STYLE), (stream.value,))
        else:
            rows = await self._fetch_all(_sql.sql(_streams.LAST_SEQ_BEFORE, _STYLE), (stream.value, before))
        return int(rows[0][0])


def _outcome(
    n: int, statement: _pg_atomic.OneStatement
) -> Callable[[list[tuple[Any, ...]]], dict[int, list[Record] | None]]:
    """How :meth:`PostgresStore._flush_simple` reads call ``n``'s outcome from its statement's rows."""
    return lambda rows: {n: statement.finish(rows)}


def _written(
    calls: list[int], records: list[list[Record]]
) -> Callable[[list[tuple[Any, ...]]], dict[int, list[Record] | None]]:
    """The outcome of calls ``calls`` whose creates went in one statement: what they wrote."""
    written: dict[int, list[Record] | None] = dict(zip(calls, records, strict=True))
    return lambda rows: written


async def _retrying(
    tables: str, attempt: Callable[[], Awaitable[_T]], retried: tuple[type[BaseException], ...]
) -> _T:
    """``await attempt()``, again (up to :data:`_TRANSACTION_ATTEMPTS` in all) while it fails
    with a driver error of one of the ``retried`` kinds."""
    number = 1
    while True:
        try:
            return await attempt()
        except StorageError as exc:
            if not isinstance(exc.__cause__, retried) or number >= _TRANSACTION_ATTEMPTS:
                raise
            log.info("Retrying a write to %s after: %s", tables, exc.__cause__)
            number += 1


def _stream_lock_id(name: str) -> int:
    digest = hashlib.blake2b(f"stream\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _lock_id(collection: Collection, key: str) -> int:
    """The advisory lock id of a key (a 64-bit hash; a collision only serializes two batches)."""
    digest = hashlib.blake2b(f"{collection.table}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def _apply_batch(
    conn: _Connection, collection: Collection, prepared: list[_sql.Prepared]
) -> list[Record | ProvisioningError]:
    """Apply a batch inside the caller's transaction (see the module docstring)."""
    statements = _sql.statements(collection, _STYLE)
    keys = sorted({key for key, _, _ in prepared})
    await _lock_keys(conn, [(collection, key) for key in keys])
    state = await _lock_rows(conn, collection, keys)
    outcomes: list[Record | ProvisioningError | None] = [None] * len(prepared)
    # Positions of items that insert a key missing from the table, sent together by _flush.
    pending: dict[str, int] = {}
    for position, (key, item, values) in enumerate(prepared):
        if key in pending:  # a second item on a key: its insert must happen first
            await _flush(conn, collection, statements, state, prepared, pending, outcomes)
        if isinstance(item, Write) and state.get(key) is None:
            error = _sql.check_write(collection, item, None)
            if error is not None:
                outcomes[position] = error
            else:
                pending[key] = position
            continue
        outcomes[position] = await _apply(conn, collection, statements, state, key, item, values)
    await _flush(conn, collection, statements, state, prepared, pending, outcomes)
    done = [outcome for outcome in outcomes if outcome is not None]
    assert len(done) == len(prepared), "every item has an outcome"
    return done


async def _apply_atomic(
    conn: _Connection, prepared: list[_sql.AtomicItem]
) -> Callable[[], Awaitable[list[Record]]]:
    """Apply the items of ``write_atomic`` in one transaction, in two round trips: ``BEGIN``,
    the advisory locks and the ``FOR UPDATE`` reads go to the server together, every item is
    decided on the locked rows, then the writes and ``COMMIT`` go together. ``conn`` is in
    pipeline mode (:meth:`PostgresStore._pipelined`). The first failing item's error is raised
    and the transaction rolled back (see the module docstring).

    A key that did not exist is inserted with a plain ``INSERT``: if another transaction
    inserted it after our look, the unique violation aborts this transaction, which is tried
    again (and then finds the row locked, and decides on it).

    Returns the coroutine function that gives the records, once the pipeline has synced."""
    await conn.execute("BEGIN")
    await _lock_keys(conn, [(collection, key) for collection, key, _, _ in prepared])
    cursors = {
        collection: await conn.execute(
            f"{_select_any_sql(collection, meta=True)} FOR UPDATE",
            (sorted(key for c, key, _, _ in prepared if c is collection),),
        )
        for collection in sorted({collection for collection, *_ in prepared}, key=lambda c: c.table)
    }
    states = {
        collection: {row[0]: Meta(*row) for row in await cursor.fetchall()}
        for collection, cursor in cursors.items()
    }
    # Every item is decided on the locked rows before anything is written: a failing item
    # (the usual failure: a CREATE racing another request) costs no write to roll back.
    for collection, key, item, _ in prepared:
        error = _sql.check_item(collection, item, states[collection].get(key))
        if error is not None:
            raise error
    now = utc_now()
    written: list[Record | psycopg.AsyncCursor[tuple[Any, ...]]] = []
    for collection, key, item, values in prepared:
        statements = _sql.statements(collection, _STYLE)
        existing = states[collection].get(key)
        if isinstance(item, Delete):
            written.append(await conn.execute(statements.delete, (key,)))
            continue
        etag = new_etag()
        if existing is None:
            await conn.execute(statements.insert, _sql.insert_params(key, item, etag, now, values))
            written.append(_sql.written_record(collection, item, item.id, etag, now, now, values))
        else:
            await conn.execute(statements.update, _sql.update_params(key, item, etag, now, values))
            written.append(
                _sql.written_record(collection, item, existing.id, etag, existing.created, now, values)
            )
    await conn.execute("COMMIT")

    async def finish() -> list[Record]:
        records: list[Record] = []
        for (collection, _, _, _), outcome in zip(prepared, written, strict=True):
            if isinstance(outcome, Record):
                records.append(outcome)
                continue
            row = await outcome.fetchone()
            assert row is not None, "the row was locked, so the delete found it"
            records.append(_sql.record_from_row(collection, row))
        return records

    return finish


async def _roll_back(conn: _Connection) -> None:
    """End a failed pipeline: close its connection (the server rolls back what it left open,
    and the pool replaces the connection when it comes back). Not a ``ROLLBACK`` on a
    connection kept: psycopg (3.3) may count a statement queued in an aborted pipeline as
    prepared although the server never prepared it, and that connection's next use of the
    statement then fails ("prepared statement _pg3_0 does not exist"). Pipelines fail rarely
    (a key that exists, an insert race), so a new connection each time costs little."""
    if not conn.closed:
        with contextlib.suppress(psycopg.Error):
            await conn.close()


async def _lock_keys(conn: _Connection, keys: Sequence[tuple[Collection, str]]) -> None:
    """Take the transaction-scoped advisory lock of every key when there are several, in one
    global order, so that transactions sharing keys queue here and cannot deadlock on keys that
    do not exist yet (single-key writes never hold one lock while waiting for another, so they
    need no such lock)."""
    if len(keys) < 2:
        return
    locks = sorted({_lock_id(collection, key) for collection, key in keys})
    await conn.execute(
        "SELECT pg_advisory_xact_lock(k.id)"
        " FROM unnest(%s::bigint[]) WITH ORDINALITY AS k(id, n) ORDER BY k.n",
        (locks,),
    )


async def _lock_rows(conn: _Connection, collection: Collection, keys: list[str]) -> dict[str, Meta | None]:
    """Lock the existing rows among ``keys`` (sorted) for this transaction; their metadata."""
    cursor = await conn.execute(
        f"{_select_any_sql(collection, meta=True)} FOR UPDATE", (keys,), prepare=_PLAN_KEY_READS
    )
    return {row[0]: Meta(*row) for row in await cursor.fetchall()}


@functools.cache
def _select_any_sql(collection: Collection, *, meta: bool) -> str:
    """The rows (full, or ``key, id, etag, created`` when ``meta``) whose key is in one array
    parameter, in key order. One short text whatever the number of keys, so psycopg prepares it
    once, where an ``IN (...)`` list would be a new statement to parse and plan for every size."""
    statements = _sql.statements(collection, _STYLE)
    prefix = statements.select_meta_prefix if meta else statements.select_full_prefix
    return f"{prefix} WHERE key = ANY(%b::text[]) ORDER BY key"


@functools.cache
def _batch_insert_sql(collection: Collection) -> str:
    """One INSERT of many rows, one array parameter per column; returns the keys it inserted."""
    columns = (*_sql.BASE_COLUMNS, *collection.index_columns)
    arrays = ", ".join("%b::bytea[]" if column == "doc" else "%b::text[]" for column in columns)
    return (
        f"INSERT INTO {collection.table} ({', '.join(columns)}) SELECT * FROM unnest({arrays}) "
        "ON CONFLICT (key) DO NOTHING RETURNING key"
    )


async def _flush(
    conn: _Connection,
    collection: Collection,
    statements: _sql.Statements,
    state: dict[str, Meta | None],
    prepared: list[_sql.Prepared],
    pending: dict[str, int],
    outcomes: list[Record | ProvisioningError | None],
) -> None:
    """Insert the pending rows (keys that did not exist, each once) and record their outcomes;
    an item whose key another transaction inserted meanwhile is decided again by :func:`_apply`."""
    positions = list(pending.values())
    pending.clear()
    for start in range(0, len(positions), _INSERT_CHUNK):
        chunk = positions[start : start + _INSERT_CHUNK]
        now = utc_now()
        etags = [new_etag() for _ in chunk]
        rows: list[tuple[Any, ...]] = []
        for position, etag in zip(chunk, etags, strict=True):
            key, item, values = prepared[position]
            assert isinstance(item, Write)
            rows.append(_sql.insert_params(key, item, etag, now, values))
        columns = [list(column) for column in zip(*rows, strict=True)]
        cursor = await conn.execute(_batch_insert_sql(collection), columns)
        inserted = {row[0] for row in await cursor.fetchall()}
        for position, etag in zip(chunk, etags, strict=True):
            key, item, values = prepared[position]
            assert isinstance(item, Write)
            if key in inserted:
                state[key] = Meta(key, item.id, etag, now)
                outcomes[position] = _sql.written_record(collection, item, item.id, etag, now, now, values)
            else:
                outcomes[position] = await _apply(conn, collection, statements, state, key, item, values)


async def _apply(
    conn: _Connection,
    collection: Collection,
    statements: _sql.Statements,
    state: dict[str, Meta | None],
    key: str,
    item: Write | Delete,
    values: tuple[str | None, ...],
) -> Record | ProvisioningError:
    """Apply one item; ``state`` holds the rows this transaction has locked (and updates)."""
    for _ in range(_ITEM_ATTEMPTS):
        existing = state.get(key)
        if isinstance(item, Delete):
            delete_error = _sql.check_delete(collection, item, existing)
            if delete_error is not None:
                return delete_error
            cursor = await conn.execute(statements.delete, (key,))
            row = await cursor.fetchone()
            if row is None:  # we hold the row lock, so it cannot have gone
                return NotFoundError(f"No {collection.label} by the id of {item.id!r} was found")
            state[key] = None
            return _sql.record_from_row(collection, row)
        error = _sql.check_write(collection, item, existing)
        if error is not None:
            return error
        etag, now = new_etag(), utc_now()
        if existing is None:
            params = _sql.insert_params(key, item, etag, now, values)
            cursor = await conn.execute(statements.insert_if_missing, params)
            if await cursor.fetchone() is None:
                # Another transaction inserted the key after our look: lock its row, decide again.
                cursor = await conn.execute(f"{statements.select_meta} FOR UPDATE", (key,))
                row = await cursor.fetchone()
                state[key] = None if row is None else Meta(*row)
                continue
            state[key] = Meta(key, item.id, etag, now)
            return _sql.written_record(collection, item, item.id, etag, now, now, values)
        await conn.execute(statements.update, _sql.update_params(key, item, etag, now, values))
        state[key] = Meta(key, existing.id, etag, existing.created)
        return _sql.written_record(collection, item, existing.id, etag, existing.created, now, values)
    raise StorageError(f"Could not write the {collection.label} {item.id!r}: the row kept changing")
