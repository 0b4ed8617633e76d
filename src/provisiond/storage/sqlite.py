"""The SQLite backend: stdlib :mod:`sqlite3` on threads, for one node (or a few processes on one
host sharing a file).

Theory of operation
-------------------
SQLite allows one writer at a time per file, and in WAL mode readers never wait for it. The
store mirrors that: every write runs on **one writer thread** (a single-thread executor that owns
the one write connection), and reads run on a small pool of **reader threads**, each with its own
connection, so that a read never queues behind a write. Each method is one thread hop: the whole
operation (all its statements, its transaction) runs in one function on one thread.

Point reads (``get``, small ``get_many``, ``get_setting``) are the exception: they run on the
calling event loop's own thread. A primary-key lookup in WAL mode takes tens of microseconds
and never waits for the writer, while a hop to a reader thread (queue, wake-up, GIL hand-over,
future) costs several times that; the registration path does such lookups on every request.
Queries still hop. Once the thread has made a small write (below), its point reads use that
same connection, with a page cache of ``INLINE_CACHE_KIB``: SQLite drops a connection's whole
cache when another connection has committed, so a separate read connection started cold after
every registration's commit, and over a million devices each read went back to the file
(a re-registration cost about 12% more server CPU than over 20,000 devices; about 6% now).

Small writes (a few items) first try the same on the caller's thread, with a connection whose
``busy_timeout`` is zero: ``BEGIN IMMEDIATE`` either gets the write lock at once or fails at
once, and then the write goes to the writer thread as usual, which waits its turn. SQLite's lock
keeps the two writers (and other processes) serialized; the caller's thread never waits on it.

The connections on the caller's thread never checkpoint the WAL (``wal_autocheckpoint`` 0): a
checkpoint copies pages into the database file and syncs it, milliseconds of I/O that would stall
the event loop. Every ``CHECKPOINT_EVERY`` small writes the store asks the writer thread for a
checkpoint instead: a passive one (which waits for no one), then a short ``RESTART`` one that lets
the WAL start over (see ``_checkpoint``: without it, steady writes never let the WAL start over and
its file grew without bound); the writer's own connection keeps SQLite's automatic checkpoints.
Durability is unchanged: a commit is in the WAL either way.

Writes take ``BEGIN IMMEDIATE`` before reading the row they are about to change, so the
check-then-write of a conditional write is atomic even when other processes (or other stores)
write the same file; ``busy_timeout`` makes them queue instead of failing.
:meth:`SqliteStore.write_many` runs all its items in one such transaction, deciding each item on
its own (see :mod:`._sql`), so one failing item does not affect the others.
:meth:`SqliteStore.write_atomic` runs its items (in any tables) in one such transaction too, and
on the first failing item rolls it back and raises that item's error; SQLite's journal makes the
transaction atomic across crashes as well. It takes the same two paths as ``write_many``: the
caller's thread when it is small and the lock is free at once, else the writer thread.

Small ``write_atomic`` calls are **committed together**: the calls made while the previous batch
was being written, in the same turn of the event loop or in the next one (``COMMIT_LINGER``),
share one transaction, and every caller is answered after the one ``COMMIT``. A commit writes
each changed page to the WAL (a registration changes eight b-trees: two tables and their
indexes), which was most of a registration's write; a batch writes a shared page once. The batch
is written without savepoints (each would first copy every page its call changes); when one call
fails, the transaction is rolled back and the batch written again with a savepoint per call, so
each call still fails alone. Nothing is answered before it is in the WAL, so durability is as
before (tests/service/test_registration_crash.py kills the server under load).

**Watches** (:meth:`SqliteStore.watch`) are never live: another process's commits cannot wake
them (its readers poll). A watch on the hub outbox is woken by this store's own releases.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

from ..errors import DatabaseUnavailableError, ProvisioningError, StorageError
from . import _sql, _streams
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
    is_wildcard,
    new_etag,
    released,
    stored_etag,
    utc_now,
)

__all__ = ["SqliteStore"]

log = logging.getLogger(__name__)

_STYLE = ParamStyle.QMARK
_T = TypeVar("_T")


@contextlib.contextmanager
def _map_errors() -> Iterator[None]:
    """Turn driver (and file system) failures into :class:`StorageError`; a lock that another
    connection held past ``busy_timeout`` is a retryable :class:`DatabaseUnavailableError`."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            raise DatabaseUnavailableError(
                f"The SQLite database stayed locked by another writer for longer than its busy timeout: {exc}"
            ) from exc
        raise StorageError(f"SQLite error: {exc}") from exc
    except sqlite3.Error as exc:
        raise StorageError(f"SQLite error: {exc}") from exc
    except OSError as exc:
        raise StorageError(f"SQLite database file error: {exc}") from exc


def _split_script(script: str) -> Iterator[str]:
    """The statements of a migration script, one at a time (``executescript`` would commit
    the migration's transaction before running)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    leftover = [line for line in buffer.splitlines() if line.strip() and not line.strip().startswith("--")]
    if leftover:
        raise ValueError(f"Incomplete SQL statement at the end of a migration: {leftover[0]!r}")


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


@contextlib.contextmanager
def _ending(conn: sqlite3.Connection) -> Iterator[None]:
    """End the transaction ``conn`` has begun with the block: commit it when the block
    completes (unless the block rolled it back), roll it back when the block raises."""
    try:
        yield
        if conn.in_transaction:
            conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


class SqliteStore(Store):
    """A :class:`Store` in one SQLite file (created with its directory if missing).

    :param path: the database file.
    :param readers: how many reader threads (and connections) to use.
    :param busy_timeout: seconds a connection waits for another one's lock before failing.
    """

    backend = "sqlite"

    #: ``get_many`` with at most this many ids reads on the caller's thread (see the module docstring).
    INLINE_READ_MAX_IDS = 32
    #: ``write_many`` with at most this many items first tries the caller's thread.
    INLINE_WRITE_MAX_ITEMS = 4
    #: The writer thread checkpoints the WAL after this many writes on callers' threads.
    CHECKPOINT_EVERY = 200
    #: The page cache (KiB) of the connection a caller's thread writes and reads with.
    INLINE_CACHE_KIB = 65536
    #: Turns of the event loop a batch of small ``write_atomic`` calls waits for more (module docstring).
    COMMIT_LINGER = 1
    #: How long (ms) the checkpoint's second step waits for the write lock and for readers.
    RESTART_WAIT_MS = 5
    #: The WAL file is cut back to this size (bytes) when it starts over (``journal_size_limit``).
    WAL_SIZE_LIMIT = 64 * 1024 * 1024

    def __init__(self, path: str | os.PathLike[str], *, readers: int = 4, busy_timeout: float = 10.0) -> None:
        if readers < 1:
            raise ValueError("readers must be at least 1")
        self.path = Path(path)
        self._reader_count = readers
        self._busy_timeout = busy_timeout
        self._writer: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._write_conn: sqlite3.Connection | None = None
        self._read_conns: list[sqlite3.Connection] = []
        self._read_conns_lock = threading.Lock()
        self._local = threading.local()
        self._lifecycle = asyncio.Lock()
        self._inline_writes = 0
        self._appends: _streams.GroupCommit[tuple[Stream, str, bytes], Entry] = _streams.GroupCommit(
            self._flush_appends
        )
        self._atomics: _streams.GroupCommit[list[_sql.AtomicItem], list[Record] | ProvisioningError] = (
            _streams.GroupCommit(self._flush_atomics, max_batch=64, linger=self.COMMIT_LINGER)
        )
        self._watches = Watches()

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._lifecycle:
            if self._writer is not None:
                return
            writer = ThreadPoolExecutor(1, thread_name_prefix="provisiond-sqlite-writer")
            try:
                with _map_errors():
                    await asyncio.get_running_loop().run_in_executor(writer, self._open_writer)
            except BaseException:
                writer.shutdown(wait=False)
                raise
            self._local = threading.local()
            self._writer = writer
            self._readers = ThreadPoolExecutor(
                self._reader_count, thread_name_prefix="provisiond-sqlite-reader"
            )

    async def close(self) -> None:
        await self._appends.close()
        await self._atomics.close()
        async with self._lifecycle:
            writer, readers = self._writer, self._readers
            if writer is None or readers is None:
                return
            self._writer = self._readers = None
            loop = asyncio.get_running_loop()
            try:
                with _map_errors():
                    # Queued behind every write already submitted, which therefore completes.
                    await loop.run_in_executor(writer, self._close_writer)
            finally:
                writer.shutdown(wait=True)  # the thread is idle by now: this returns at once
                await loop.run_in_executor(None, self._close_readers, readers)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: the driver never opens transactions; we issue BEGIN ourselves.
        # check_same_thread=False only so that close() may close reader connections after their
        # threads are gone; each connection is otherwise used by one thread.
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA journal_size_limit = {self.WAL_SIZE_LIMIT}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_writer(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            self._enable_wal(conn)
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._write_conn = conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch the file to WAL (a no-op when it is already). The switch needs an exclusive
        lock and fails at once with SQLITE_BUSY, without waiting for busy_timeout, when another
        connection is opening the same new file: retry until busy_timeout has passed."""
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                [mode] = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                break
            except sqlite3.OperationalError as exc:
                busy = exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)
        if str(mode).lower() != "wal":
            log.warning("%s cannot use WAL (journal mode %s): readers will wait for writers", self.path, mode)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Apply the migrations not yet applied, each in its own ``BEGIN IMMEDIATE``
        transaction (which also keeps two processes from migrating at once)."""
        for migration in _sql.load_migrations("sqlite"):
            conn.execute("BEGIN IMMEDIATE")
            with _ending(conn):
                conn.execute(_sql.BOOTSTRAP_MIGRATIONS)
                if conn.execute(_sql.MIGRATION_APPLIED, (migration.version,)).fetchone() is None:
                    for statement in _split_script(migration.text):
                        conn.execute(statement)
                    conn.execute(_sql.RECORD_MIGRATION, (migration.version, utc_now()))
                    log.info("Applied migration %s to %s", migration.name, self.path)

    def _close_writer(self) -> None:
        conn, self._write_conn = self._write_conn, None
        if conn is not None:
            conn.close()

    def _close_readers(self, readers: ThreadPoolExecutor) -> None:
        readers.shutdown(wait=True)
        with self._read_conns_lock:
            conns, self._read_conns = self._read_conns, []
        for conn in conns:
            conn.close()

    # -- thread hops --------------------------------------------------------------------------

    async def _on_writer(self, function: Callable[..., _T], *args: Any) -> _T:
        executor = self._writer
        if executor is None:
            raise StorageError(f"{self!r} is not open")
        with _map_errors():
            return await asyncio.get_running_loop().run_in_executor(
                executor, functools.partial(function, *args)
            )

    async def _on_reader(self, function: Callable[..., _T], *args: Any) -> _T:
        executor = self._readers
        if executor is None:
            raise StorageError(f"{self!r} is not open")
        with _map_errors():
            return await asyncio.get_running_loop().run_in_executor(
                executor, functools.partial(self._read, function, *args)
            )

    def _inline(self, function: Callable[..., _T], *args: Any) -> _T:
        """A point read on the caller's thread: on the connection its small writes use, once
        it has one (see the module docstring), else on a read-only connection of its own."""
        if self._readers is None:
            raise StorageError(f"{self!r} is not open")
        with _map_errors():
            conn: sqlite3.Connection | None = getattr(self._local, "write_conn", None)
            if conn is not None and not conn.in_transaction:
                try:
                    return function(conn, *args)
                except sqlite3.OperationalError as exc:
                    # Its busy_timeout is zero: a read that must wait (rare in WAL mode: a
                    # recovery in progress) waits on the read-only connection instead.
                    if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                        raise
            return self._read(function, *args)

    def _read(self, function: Callable[..., _T], *args: Any) -> _T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only = ON")
            self._local.conn = conn
            with self._read_conns_lock:
                self._read_conns.append(conn)
        return function(conn, *args)

    def _writer_conn(self) -> sqlite3.Connection:
        conn = self._write_conn
        if conn is None:
            raise StorageError(f"{self!r} is not open")
        return conn

    # -- records ------------------------------------------------------------------------------

    async def schema_version(self) -> int:
        return await self._on_reader(_schema_version)

    async def get(self, collection: Collection, id: str) -> Record | None:
        records = self._inline(_get_many, collection, [collection.key(id)])
        return next(iter(records.values()), None)

    async def get_each(self, ids: Sequence[tuple[Collection, str]]) -> list[Record | None]:
        """The point reads as one statement (``UNION ALL``): one read transaction, so one WAL read
        mark taken and dropped (two ``fcntl`` calls), for a registration's record and individual
        enrollment together."""
        if not 1 < len(ids) <= self.INLINE_READ_MAX_IDS:
            return await super().get_each(ids)
        return self._inline(
            _get_each, tuple(collection for collection, _ in ids), [c.key(id) for c, id in ids]
        )

    async def get_many(self, collection: Collection, ids: Sequence[str]) -> dict[str, Record]:
        keys = sorted({collection.key(id) for id in ids})
        if not keys:
            return {}
        if len(keys) <= self.INLINE_READ_MAX_IDS:
            return self._inline(_get_many, collection, keys)
        return await self._on_reader(_get_many, collection, keys)

    async def write_many(
        self, collection: Collection, items: Sequence[Write | Delete]
    ) -> list[Record | ProvisioningError]:
        prepared = _sql.prepare_items(collection, items)
        if not prepared:
            return []
        outcomes = await self._write_transaction(len(prepared), _apply_batch, collection, prepared)
        if collection.claimable and released((collection, item) for item in items):
            self._watches.wake(collection)
        return outcomes

    async def write_atomic(self, items: Sequence[tuple[Collection, Write | Delete]]) -> list[Record]:
        prepared = _sql.prepare_atomic(items)
        if not prepared:
            return []
        if len(prepared) <= self.INLINE_WRITE_MAX_ITEMS:
            [outcome] = await self._atomics.submit([prepared])
        else:
            outcome = await self._write_transaction(len(prepared), _apply_atomic, prepared)
        if isinstance(outcome, ProvisioningError):
            raise outcome
        if (collection := released(items)) is not None:
            self._watches.wake(collection)
        return outcome

    async def _flush_atomics(
        self, batch: list[list[_sql.AtomicItem]]
    ) -> list[list[Record] | ProvisioningError]:
        """The small ``write_atomic`` calls made while the previous batch was being written (or
        in the same turn of the event loop, or the next), in one transaction: one ``COMMIT``,
        whose WAL writes (a frame per page changed) are most of a registration's write, for
        all of them. Each call still succeeds or fails alone, and every caller is answered
        after the one ``COMMIT``, so an answered write is as durable as before.

        A batch is first written without savepoints (each would copy every page its call changes
        into SQLite's sub-journal first); only when one of its calls fails is the transaction
        rolled back and the batch written again, each call in its own savepoint."""
        if len(batch) > 1:
            at_once = await self._write_transaction(1, _apply_atomic_batch_at_once, batch)
            if at_once is not None:
                return list(at_once)
        return await self._write_transaction(1, _apply_atomic_batch, batch)

    async def _write_transaction(self, size: int, function: Callable[..., _T], *args: Any) -> _T:
        """``function(conn, *args)`` in a ``BEGIN IMMEDIATE`` transaction it ends (commits or
        rolls back): on the caller's thread when ``size`` items are few and the write lock is
        free at once, else on the writer thread (see the module docstring)."""
        if size <= self.INLINE_WRITE_MAX_ITEMS:
            conn = self._begin_inline_write()
            if conn is not None:
                self._inline_writes += 1
                if self._inline_writes >= self.CHECKPOINT_EVERY:
                    self._inline_writes = 0
                    self._checkpoint_soon()
                with _map_errors():
                    return function(conn, *args)
        return await self._on_writer(self._on_writer_transaction, function, *args)

    def _checkpoint_soon(self) -> None:
        """A checkpoint on the writer thread, not waited for."""
        writer = self._writer
        if writer is not None:
            with contextlib.suppress(RuntimeError):  # shut down meanwhile
                writer.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        """Copy the WAL's pages into the database file, then let the WAL start over.

        A passive checkpoint copies what the WAL holds without holding up anyone. Under steady
        writes it never catches up: the callers' threads commit more frames while it runs, SQLite
        starts the WAL over only once every frame is copied, and so the file grew by every
        commit (about 15 MiB a second of registrations), each write landing in new file blocks. A second, ``RESTART`` checkpoint then copies the few frames since, holding the
        write lock (writers wait, or go to this thread behind it) and waiting for readers at most
        ``RESTART_WAIT_MS``: after it the next commit writes from the WAL's start. When a long
        read keeps it from finishing, the next checkpoint tries again."""
        conn = self._write_conn
        if conn is None:
            return
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            conn.execute(f"PRAGMA busy_timeout = {self.RESTART_WAIT_MS}")
            try:
                conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        except sqlite3.Error as exc:  # the next one will do; automatic checkpoints still run
            log.warning("WAL checkpoint of %s failed: %s", self.path, exc)

    def _begin_inline_write(self) -> sqlite3.Connection | None:
        """The caller's thread's write connection with a transaction begun, or ``None`` when
        the write lock is taken."""
        if self._writer is None:
            raise StorageError(f"{self!r} is not open")
        conn: sqlite3.Connection | None = getattr(self._local, "write_conn", None)
        with _map_errors():
            if conn is None:
                conn = self._connect()
                conn.execute("PRAGMA busy_timeout = 0")
                conn.execute("PRAGMA wal_autocheckpoint = 0")  # the writer thread's (module docstring)
                conn.execute(f"PRAGMA cache_size = -{self.INLINE_CACHE_KIB}")
                self._local.write_conn = conn
                with self._read_conns_lock:
                    self._read_conns.append(conn)
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    return None
                raise
        return conn

    def _on_writer_transaction(self, function: Callable[..., _T], *args: Any) -> _T:
        conn = self._writer_conn()
        conn.execute("BEGIN IMMEDIATE")
        return function(conn, *args)

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
        # One writer at a time (BEGIN IMMEDIATE): the select and the updates see no other claim.
        text, params = _sql.claim_sql(collection, filters, limit, _STYLE)
        return await self._write_transaction(1, _claim, collection, text, [*params, now, limit], until, owner)

    async def next_due(self, collection: Collection) -> str | None:
        rows = self._inline(_fetch_all, _sql.next_due_sql(collection), ())
        return None if rows[0][0] is None else str(rows[0][0])

    def watch(self, stream: Stream | Collection) -> StreamWatch:
        """Never live; a watch on a claimable collection is woken by this store's releases."""
        if isinstance(stream, Collection) and stream.claimable:
            return self._watches.add(stream)
        return super().watch(stream)

    async def query(
        self,
        collection: Collection,
        *,
        filters: Mapping[str, str] | None = None,
        limit: int = 100,
        continuation: str | None = None,
    ) -> Page:
        text, params = _sql.page_query(collection, filters, limit, continuation, _STYLE)
        rows = await self._on_reader(_fetch_all, text, params)
        return _sql.make_page(collection, rows, limit)

    async def count(self, collection: Collection, *, filters: Mapping[str, str] | None = None) -> int:
        columns, params = _sql.filter_params(collection, filters)
        return await self._on_reader(_fetch_int, _sql.count_sql(collection, columns, _STYLE), params)

    # -- settings -----------------------------------------------------------------------------

    async def get_setting(self, key: str) -> str | None:
        return self._inline(_get_setting, key)

    async def set_setting(self, key: str, value: str) -> None:
        await self._on_writer(self._set_setting, key, value)

    async def setting_setdefault(self, key: str, value: str) -> str:
        return await self._on_writer(self._setting_setdefault, key, value)

    def _set_setting(self, key: str, value: str) -> None:
        self._writer_conn().execute(_sql.settings_sql(_STYLE).set, (key, value))

    def _setting_setdefault(self, key: str, value: str) -> str:
        conn = self._writer_conn()
        statements = _sql.settings_sql(_STYLE)
        conn.execute("BEGIN IMMEDIATE")
        with _ending(conn):
            rows = conn.execute(statements.insert_if_missing, (key, value)).fetchall()
            if not rows:
                rows = conn.execute(statements.get, (key,)).fetchall()
        stored: str = rows[0][0]
        return stored

    # -- streams ------------------------------------------------------------------------------

    async def append(self, stream: Stream, items: Sequence[tuple[str, bytes]]) -> list[Entry]:
        _streams.check_items(items)
        if not items:
            return []
        return await self._appends.submit([(stream, partition, bytes(doc)) for partition, doc in items])

    async def _flush_appends(self, items: list[tuple[Stream, str, bytes]]) -> list[Entry]:
        return await self._on_writer(self._append_transaction, items)

    def _append_transaction(self, items: list[tuple[Stream, str, bytes]]) -> list[Entry]:
        conn = self._writer_conn()
        created = utc_now()
        text = _sql.sql(_streams.INSERT, _STYLE)
        conn.execute("BEGIN IMMEDIATE")
        with _ending(conn):
            entries = []
            for stream, partition, doc in items:
                [(seq,)] = conn.execute(text, (stream.value, partition, created, doc)).fetchall()
                entries.append(Entry(stream, seq, partition, created, doc))
        return entries

    async def read(
        self, stream: Stream, *, after: int = 0, partition: str | None = None, limit: int = 100
    ) -> list[Entry]:
        params: tuple[Any, ...]
        if partition is None:
            text, params = _streams.READ, (stream.value, after, limit)
        else:
            text, params = _streams.READ_PARTITION, (stream.value, partition, after, limit)
        rows = self._inline(_fetch_all, _sql.sql(text, _STYLE), params)
        return [_streams.entry_from_row(stream, row) for row in rows]

    async def remove(self, stream: Stream, seqs: Sequence[int]) -> int:
        if not seqs:
            return 0
        return await self._on_writer(self._remove, stream, [int(seq) for seq in seqs])

    def _remove(self, stream: Stream, seqs: list[int]) -> int:
        conn = self._writer_conn()
        removed = 0
        for chunk in _sql.chunks([str(seq) for seq in seqs]):
            marks = ", ".join("?" * len(chunk))
            cursor = conn.execute(
                f"DELETE FROM stream_entries WHERE stream = ? AND seq IN ({marks})",
                (stream.value, *[int(seq) for seq in chunk]),
            )
            removed += cursor.rowcount
        return removed

    async def trim(
        self,
        stream: Stream,
        *,
        keep: int | None = None,
        before: str | None = None,
        partition: str | None = None,
    ) -> int:
        return await self._on_writer(self._trim, stream, keep, before, partition)

    def _trim(self, stream: Stream, keep: int | None, before: str | None, partition: str | None) -> int:
        conn = self._writer_conn()
        removed = 0
        name = stream.value
        if before is not None:
            if partition is None:
                cursor = conn.execute(_streams.TRIM_BEFORE, (name, before))
            else:
                cursor = conn.execute(_streams.TRIM_BEFORE_PARTITION, (name, partition, before))
            removed += cursor.rowcount
        if keep is not None:
            if partition is None:
                cursor = conn.execute(_streams.TRIM_KEEP, (name, name, max(0, keep)))
            else:
                cursor = conn.execute(
                    _streams.TRIM_KEEP_PARTITION, (name, partition, name, partition, max(0, keep))
                )
            removed += cursor.rowcount
        return removed

    async def entry_count(self, stream: Stream, *, partition: str | None = None) -> int:
        if partition is None:
            return await self._on_reader(_fetch_int, _streams.COUNT, (stream.value,))
        return await self._on_reader(_fetch_int, _streams.COUNT_PARTITION, (stream.value, partition))

    async def last_seq(self, stream: Stream, *, before: str | None = None) -> int:
        if before is None:
            return await self._on_reader(_fetch_int, _streams.LAST_SEQ, (stream.value,))
        return await self._on_reader(_fetch_int, _streams.LAST_SEQ_BEFORE, (stream.value, before))


# -- functions that run on a reader or the writer thread ---------------------------------------


def _schema_version(conn: sqlite3.Connection) -> int:
    return _fetch_int(conn, _sql.SCHEMA_VERSION, ())


def _fetch_int(conn: sqlite3.Connection, text: str, params: Sequence[Any]) -> int:
    row = conn.execute(text, params).fetchone()
    return int(row[0])


def _fetch_all(conn: sqlite3.Connection, text: str, params: Sequence[Any]) -> list[Any]:
    return conn.execute(text, params).fetchall()


def _get_setting(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute(_sql.settings_sql(_STYLE).get, (key,)).fetchone()
    return None if row is None else str(row[0])


def _get_each(
    conn: sqlite3.Connection, collections: tuple[Collection, ...], keys: list[str]
) -> list[Record | None]:
    found: list[Record | None] = [None] * len(keys)
    for row in conn.execute(_sql.tagged_rows_sql(collections, "key = ?", "NULL"), keys):
        n, record = _sql.tagged_record(collections, row)
        found[n] = record
    return found


def _get_many(conn: sqlite3.Connection, collection: Collection, keys: list[str]) -> dict[str, Record]:
    statements = _sql.statements(collection, _STYLE)
    found: dict[str, Record] = {}
    several = len(keys) > _sql.CHUNK
    if several:
        conn.execute("BEGIN")  # one read transaction, so that every chunk sees one snapshot
    try:
        for chunk in _sql.chunks(keys):
            for row in conn.execute(statements.select_many(len(chunk)), chunk):
                found[row[0]] = _sql.record_from_row(collection, row)
    finally:
        if several:
            _rollback(conn)
    return found


def _apply_batch(
    conn: sqlite3.Connection, collection: Collection, prepared: list[_sql.Prepared]
) -> list[Record | ProvisioningError]:
    """Apply the items of ``write_many`` in the transaction ``conn`` has begun, and commit."""
    statements = _sql.statements(collection, _STYLE)
    with _ending(conn):
        outcomes = [_apply(conn, collection, statements, *entry) for entry in prepared]
    return outcomes


def _apply_atomic(
    conn: sqlite3.Connection, prepared: list[_sql.AtomicItem]
) -> list[Record] | ProvisioningError:
    """Apply the items of ``write_atomic`` in the transaction ``conn`` has begun: commit them
    all, or roll back at the first failing item and return its error."""
    with _ending(conn):
        outcome = _apply_items(conn, prepared)
        if isinstance(outcome, ProvisioningError):
            _rollback(conn)
    return outcome


def _apply_items(
    conn: sqlite3.Connection, prepared: list[_sql.AtomicItem]
) -> list[Record] | ProvisioningError:
    """The items of one ``write_atomic``, up to the first that fails (its error); the caller
    commits or rolls back."""
    records: list[Record] = []
    for collection, key, item, values in prepared:
        outcome = _apply(conn, collection, _sql.statements(collection, _STYLE), key, item, values)
        if isinstance(outcome, ProvisioningError):
            return outcome
        records.append(outcome)
    return records


def _apply_atomic_batch_at_once(
    conn: sqlite3.Connection, batch: list[list[_sql.AtomicItem]]
) -> list[list[Record]] | None:
    """Several ``write_atomic`` calls in the transaction ``conn`` has begun, without savepoints,
    and one commit; or, when one of them fails, nothing (the transaction rolled back): ``None``."""
    outcomes: list[list[Record]] = []
    with _ending(conn):
        for prepared in batch:
            outcome = _apply_items(conn, prepared)
            if isinstance(outcome, ProvisioningError):
                _rollback(conn)
                return None
            outcomes.append(outcome)
    return outcomes


def _apply_atomic_batch(
    conn: sqlite3.Connection, batch: list[list[_sql.AtomicItem]]
) -> list[list[Record] | ProvisioningError]:
    """Several ``write_atomic`` calls in the transaction ``conn`` has begun, each within a
    savepoint (rolled back alone at its first failing item), and one commit for all."""
    if len(batch) == 1:
        return [_apply_atomic(conn, batch[0])]
    outcomes: list[list[Record] | ProvisioningError] = []
    with _ending(conn):
        for prepared in batch:
            conn.execute("SAVEPOINT atomic")
            outcome = _apply_items(conn, prepared)
            if isinstance(outcome, ProvisioningError):
                conn.execute("ROLLBACK TO atomic")
            conn.execute("RELEASE atomic")
            outcomes.append(outcome)
    return outcomes


def _claim(
    conn: sqlite3.Connection,
    collection: Collection,
    text: str,
    params: list[Any],
    until: str,
    owner: str,
) -> list[Record]:
    """Select the due rows and lease them, in the transaction ``conn`` has begun, and commit."""
    update = f"UPDATE {collection.table} SET etag = ?, updated = ?, due = ?, owner = ? WHERE key = ?"
    with _ending(conn):
        rows = conn.execute(text, params).fetchall()
        now = utc_now()
        claimed = []
        for row in rows:
            etag = new_etag()
            conn.execute(update, (etag, now, until, owner, row[0]))
            claimed.append(_sql.claimed_record(collection, row, etag, now, until, owner))
    return claimed


def _conditional(if_match: str | None) -> TypeGuard[str]:
    """Whether ``if_match`` names one etag (not absent, not the wildcard)."""
    return if_match is not None and not is_wildcard(if_match)


@functools.cache
def _insert_or_nothing(insert: str) -> str:
    # Not RETURNING: SQLite's RETURNING costs as much as the read it would save.
    return f"{insert} ON CONFLICT (key) DO NOTHING"


def _apply(
    conn: sqlite3.Connection,
    collection: Collection,
    statements: _sql.Statements,
    key: str,
    item: Write | Delete,
    values: tuple[str | None, ...],
) -> Record | ProvisioningError:
    """Apply one batch item inside the writer's transaction; its outcome. An unconditional
    create is one statement (the insert tells whether the key was free; the row is read only
    to name the conflict)."""
    if isinstance(item, Write) and item.mode is WriteMode.CREATE and item.if_match is None:
        etag, now = new_etag(), utc_now()
        params = _sql.insert_params(key, item, etag, now, values)
        if conn.execute(_insert_or_nothing(statements.insert), params).rowcount == 1:
            return _sql.written_record(collection, item, item.id, etag, now, now, values)
    elif isinstance(item, Write) and item.mode is not WriteMode.CREATE and _conditional(item.if_match):
        # An update on the etag read (a re-registration's two rows): one statement finds the
        # row and checks its etag; only when it changes nothing is the row read to say why.
        etag, now = new_etag(), utc_now()
        # Index columns that keep their value (Write.index_before), and their indexes, are left alone.
        columns, changed = _sql.changed_index(collection, item, values)
        params = (*_sql.update_params(key, item, etag, now, changed), stored_etag(item.if_match))
        row = conn.execute(_sql.update_if_etag_setting(collection, columns, _STYLE), params).fetchone()
        if row is not None:
            return _sql.written_record(collection, item, row[0], etag, row[1], now, values)
    row = conn.execute(statements.select_meta, (key,)).fetchone()
    existing = None if row is None else Meta(*row)
    if isinstance(item, Delete):
        delete_error = _sql.check_delete(collection, item, existing)
        if delete_error is not None:
            return delete_error
        [deleted] = conn.execute(statements.delete, (key,)).fetchall()
        return _sql.record_from_row(collection, deleted)
    error = _sql.check_write(collection, item, existing)
    if error is not None:
        return error
    etag, now = new_etag(), utc_now()
    if existing is None:
        conn.execute(statements.insert, _sql.insert_params(key, item, etag, now, values))
        return _sql.written_record(collection, item, item.id, etag, now, now, values)
    conn.execute(statements.update, _sql.update_params(key, item, etag, now, values))
    return _sql.written_record(collection, item, existing.id, etag, existing.created, now, values)
