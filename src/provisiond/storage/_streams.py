"""What the backends share for streams: the SQL (in the ``?`` style; :func:`provisiond.storage._sql.sql`
converts it) and the group commit that batches concurrent appends into one transaction.

Group commit: the first append to arrive starts a flush of everything pending; appends that
arrive while a flush runs wait for the next one, which then carries all of them. Under load a
transaction (and its fsync or its round trip) is shared by many appends; an idle store commits a
lone append at once. Each caller is answered when the transaction that holds its entries has
committed, or gets that transaction's error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from ..errors import StorageError
from .base import Entry, Stream

__all__ = ["GroupCommit", "check_items", "entry_from_row"]

I = TypeVar("I")  # noqa: E741  (an item)
R = TypeVar("R")  # a result

#: The most items one group-commit transaction carries.
MAX_BATCH = 2000

INSERT = "INSERT INTO stream_entries (stream, partition, created, doc) VALUES (?, ?, ?, ?) RETURNING seq"
SELECT_COLUMNS = "seq, partition, created, doc"
READ = f"SELECT {SELECT_COLUMNS} FROM stream_entries WHERE stream = ? AND seq > ? ORDER BY seq LIMIT ?"
READ_PARTITION = (
    f"SELECT {SELECT_COLUMNS} FROM stream_entries WHERE stream = ? AND partition = ? AND seq > ? "
    "ORDER BY seq LIMIT ?"
)
COUNT = "SELECT count(*) FROM stream_entries WHERE stream = ?"
COUNT_PARTITION = "SELECT count(*) FROM stream_entries WHERE stream = ? AND partition = ?"
LAST_SEQ = "SELECT coalesce(max(seq), 0) FROM stream_entries WHERE stream = ?"
LAST_SEQ_BEFORE = "SELECT coalesce(max(seq), 0) FROM stream_entries WHERE stream = ? AND created < ?"
TRIM_BEFORE = "DELETE FROM stream_entries WHERE stream = ? AND created < ?"
TRIM_BEFORE_PARTITION = "DELETE FROM stream_entries WHERE stream = ? AND partition = ? AND created < ?"
# The newest ``keep`` entries stay: everything at or below the seq of the (keep+1)-th newest goes.
TRIM_KEEP = (
    "DELETE FROM stream_entries WHERE stream = ? AND seq <= (SELECT seq FROM stream_entries "
    "WHERE stream = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)"
)
TRIM_KEEP_PARTITION = (
    "DELETE FROM stream_entries WHERE stream = ? AND partition = ? AND seq <= (SELECT seq FROM "
    "stream_entries WHERE stream = ? AND partition = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)"
)


def entry_from_row(stream: Stream, row: Sequence[object]) -> Entry:
    seq, partition, created, doc = row
    assert isinstance(seq, int) and isinstance(partition, str) and isinstance(created, str)
    assert isinstance(doc, bytes | memoryview)
    return Entry(stream, seq, partition, created, bytes(doc))


def check_items(items: Sequence[tuple[str, bytes]]) -> None:
    for partition, doc in items:
        if not isinstance(partition, str) or "\0" in partition:
            raise ValueError(f"a stream partition must be a string without NUL, not {partition!r}")
        if not isinstance(doc, bytes | bytearray | memoryview):
            raise TypeError("a stream entry's doc is bytes")


class GroupCommit(Generic[I, R]):
    """Batches concurrent submissions into calls of ``flush(items) -> results`` (one result per
    item, in order). Use from one event loop.

    ``linger``: how many more turns of the event loop a batch waits for submissions before it
    is flushed. With 0 a batch holds what was submitted in the turn that started it and while
    the previous flush ran; a flush that runs on the loop's own thread (SQLite's small writes)
    lets nothing in meanwhile, so under load one more turn makes its batches larger.
    """

    def __init__(
        self, flush: Callable[[list[I]], Awaitable[list[R]]], *, max_batch: int = MAX_BATCH, linger: int = 0
    ) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._linger = linger
        self._pending: list[tuple[list[I], asyncio.Future[list[R]]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, items: Sequence[I]) -> list[R]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[R]] = loop.create_future()
        self._pending.append((list(items), future))
        if self._task is None:
            self._task = loop.create_task(self._drain())
        # A cancelled caller cancels only its future: its items stay in the batch, which is
        # written for everyone (the drain skips futures already done).
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                await self._gather()
                batch: list[tuple[list[I], asyncio.Future[list[R]]]] = []
                size = 0
                while self._pending and (not batch or size + len(self._pending[0][0]) <= self._max_batch):
                    entry = self._pending.pop(0)
                    batch.append(entry)
                    size += len(entry[0])
                flat = [item for items, _ in batch for item in items]
                try:
                    results = await self._flush(flat)
                except BaseException as exc:  # every caller of this transaction learns it failed
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                position = 0
                for items, future in batch:
                    if not future.done():
                        future.set_result(results[position : position + len(items)])
                    position += len(items)
        finally:
            self._task = None
            for _, future in self._pending:  # only when the loop ended abnormally (cancelled)
                if not future.done():
                    future.set_exception(StorageError("the store stopped before this append was committed"))
            self._pending.clear()

    async def _gather(self) -> None:
        """Let the event loop run ``linger`` more turns before a batch is formed (unless it is
        full already): the submissions those turns make join it."""
        for _ in range(self._linger):
            if sum(len(items) for items, _ in self._pending) >= self._max_batch:
                return
            await asyncio.sleep(0)

    async def close(self) -> None:
        """Wait for the pending flushes to finish."""
        task = self._task
        if task is not None:
            with contextlib.suppress(Exception):
                await task
