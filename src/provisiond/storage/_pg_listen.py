"""The PostgreSQL store's watches (:meth:`provisiond.storage.Store.watch`): LISTEN/NOTIFY.

Theory of operation
-------------------
**Notify.** An append to a stream of :data:`NOTIFIED` (the hub broker's signals) also calls
``pg_notify`` in its transaction, in the statement that takes the stream's lock (no extra round
trip): PostgreSQL delivers the notification after the commit, so a reader it wakes finds the
rows. A write that releases a record of the hub outbox (a new unleased item, an item put back:
:func:`~provisiond.storage.base.releases`) notifies in a statement of its own once it has
committed (one more round trip, on those writes only: the registrations of hubs with a write
budget, deprovisioning, retries; not the leased items of registrations a node works itself,
nor claims and checkpoints). The payload names the store that wrote
(:attr:`PgListener.sender`); a store ignores its own (it wakes its watches itself). Other
streams and collections do not notify: nobody watches them across processes, and the commits
of notifying transactions are serialized by PostgreSQL (a lock on its notification queue).

**Listen.** The first watch of a notified stream starts :class:`PgListener`: one connection per
store (one per worker process), opened outside the pool with the pool's connection string (so a
multi-host URL reaches the same server: the primary, ``target_session_attrs=read-write``; a
standby cannot listen). It runs ``LISTEN`` on the notified streams' channels, says the
watches are live (which wakes them: their readers read what came while they were not), and
wakes the watches of a channel for each notification.

**Lost.** When the connection fails (the server restarted, failed over, the backend was
terminated, TCP keepalives found it dead), the watches stop being live (their readers poll
again at their own pace), one warning is logged, and the listener connects again after
0.5 s, then 1, 2, ... up to :data:`RETRY_MAX` s between attempts, and logs one line when it
listens again (``LISTEN`` comes before the wake, so nothing committed after the readers' next
read is missed).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import psycopg

from .._cancel import raise_if_cancelling, stop
from ..errors import StorageError
from ._pg_connections import Connection, describe
from ._watch import Watches
from .base import Collection, Stream

__all__ = ["NOTIFIED", "RETRY_FIRST", "RETRY_MAX", "PgListener", "channel"]

log = logging.getLogger("provisiond.storage.postgres")

#: The streams whose appends notify, the collections whose releases notify, and that a
#: listener listens for.
NOTIFIED: frozenset[Stream | Collection] = frozenset({Stream.HUB_SIGNALS, Collection.HUB_OUTBOX})
#: Seconds before the first reconnection of a lost listening connection; doubled each failure.
RETRY_FIRST = 0.5
#: The most seconds between two reconnection attempts.
RETRY_MAX = 5.0


def channel(stream: Stream | Collection) -> str:
    """The notification channel of ``stream`` (an SQL identifier as it stands)."""
    return "provisiond_" + (stream.table if isinstance(stream, Collection) else stream.value)


class PgListener:
    """One store's listening connection (see the module docstring).

    :param connect: opens a connection outside the pool (autocommit).
    :param label: how log lines name the database.
    :param watches: the store's watches, woken and made (not) live here.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[Connection]],
        *,
        label: str,
        watches: Watches,
        retry_first: float = RETRY_FIRST,
        retry_max: float = RETRY_MAX,
    ) -> None:
        self._connect = connect
        self._label = label
        self._watches = watches
        self._retry_first = retry_first
        self._retry_max = retry_max
        #: The payload of this store's notifications (it ignores its own).
        self.sender = uuid.uuid4().hex[:16]
        self._channels = {channel(stream): stream for stream in NOTIFIED}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start listening, unless started already (from a running event loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="provisiond-postgres-listen"
            )

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop(task, "the PostgreSQL listener")
        self._watches.set_live(NOTIFIED, False)

    async def _run(self) -> None:
        delay = self._retry_first
        lost: float | None = None  # when the connection was lost (None: listening, or never yet)
        while True:
            reason = "the server stopped sending notifications"
            try:
                async with await self._connect() as conn:
                    for name in self._channels:
                        await conn.execute(f"LISTEN {name}")
                    self._watches.set_live(NOTIFIED, True)
                    if lost is not None:
                        log.warning(
                            "%s: listening for notifications again, after %.1f s",
                            self._label,
                            time.monotonic() - lost,
                        )
                        lost = None
                    delay = self._retry_first
                    async for notify in conn.notifies():
                        stream = self._channels.get(notify.channel)
                        if stream is not None and notify.payload != self.sender:
                            self._watches.wake(stream)
            except (psycopg.Error, StorageError) as exc:
                raise_if_cancelling()
                reason = describe(exc)
            except Exception as exc:  # a defect: say so, and go on (the readers poll meanwhile)
                log.exception("%s: the listening connection failed", self._label)
                reason = type(exc).__name__
            self._watches.set_live(NOTIFIED, False)
            if lost is None:
                lost = time.monotonic()
                log.warning(
                    "%s: no listening connection (%s): readers of the hub's signals and the hub writer poll until "
                    "it is back; reconnecting with backoff (up to every %g s)",
                    self._label,
                    reason,
                    self._retry_max,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max)
