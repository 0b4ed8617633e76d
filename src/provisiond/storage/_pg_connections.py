"""The PostgreSQL store's connections: a psycopg pool behind a circuit breaker, so that a node
rides through a database failover (or outage) instead of hanging on it.

Theory of operation
-------------------
**Errors are translated here, once.** Every statement runs on a connection from
:meth:`PgConnections.connection`, whose context turns a driver exception into a
:class:`~provisiond.errors.StorageError` (500) or, when the database cannot be reached now, a
:class:`~provisiond.errors.DatabaseUnavailableError` (503 with ``retry_after``): a lost or
refused connection, no server accepting writes (``target_session_attrs``), a server shutting
down or starting up, too many connections, a read-only session, or no pool connection within the
pool's timeout (:func:`is_unavailable`).

**Up, suspected, down.** An "unavailable" error while the pool serves makes the node *suspect*
the database: one task opens a fresh connection outside the pool (``connect_timeout`` bounds
it). If that works, the database is up and only some connections were lost (a backend killed,
a restart the pool has not noticed): the pool checks its idle connections and drops the dead
ones. If it fails, the breaker *opens*: the pool is closed at once (requests waiting for one of
its connections fail with 503 instead of waiting out the pool timeout; connections in use close
when they are returned), and until the database answers again every call fails immediately with
503 + Retry-After, without touching the network. Meanwhile the same task tries a fresh
connection every ``probe_interval`` seconds; the first one that succeeds (on a multi-host URL:
whichever server accepts writes, such as a promoted standby) starts a new pool, and the node
serves again. psycopg's own reconnection backs off exponentially (up to minutes); the probe
does not, so recovery takes at most about ``probe_interval`` plus one connection.

Nothing is retried here: a statement whose connection died may or may not have committed, and
only the caller knows whether repeating it is safe (the registrar's writes are conditional, so a
device's retry after a 503 finds what was committed).

**Connection defaults** (:data:`CONNECTION_DEFAULTS`, each only when the URL does not set it):
``target_session_attrs=read-write`` (a multi-host URL reaches the primary; a standby is never
written to), TCP keepalives and ``tcp_user_timeout`` (a server that vanished without closing
its sockets is noticed in seconds, not after the kernel's retransmission timeout), and
``connect_timeout`` (an unreachable host fails the connection within seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from ..errors import ConfigurationError, DatabaseUnavailableError, StorageError

__all__ = ["CONNECTION_DEFAULTS", "Connection", "PgConnections", "describe", "is_unavailable"]

log = logging.getLogger("provisiond.storage.postgres")

Connection = psycopg.AsyncConnection[tuple[Any, ...]]

#: libpq parameters provisiond adds to the URL unless it sets them (see the module docstring).
CONNECTION_DEFAULTS = {
    "target_session_attrs": "read-write",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}

#: SQLSTATEs that mean "this server cannot serve us now", besides class 08 (connection exception):
#: admin/crash shutdown, cannot connect now (starting up, in recovery), too many connections,
#: and a read-only session (a server that became a standby under us).
_UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300", "25006"})


def is_unavailable(exc: psycopg.Error) -> bool:
    """Whether ``exc`` says the database cannot be reached now (rather than that a statement
    failed). Client-side operational errors carry no SQLSTATE: a connection refused or lost, and
    the pool's timeout and closing (``PoolTimeout``, ``PoolClosed`` are ``OperationalError``)."""
    sqlstate = exc.sqlstate
    if sqlstate is None:
        return isinstance(exc, psycopg.OperationalError)
    return sqlstate.startswith("08") or sqlstate in _UNAVAILABLE_SQLSTATES


_EVERY_HOST_FAILED = "Multiple connection attempts failed. All failures were:"


def describe(exc: BaseException) -> str:
    """The driver's message on one line. A multi-host URL's failure becomes one entry per host
    (psycopg repeats the last host's error above its list of every host's)."""
    text = str(exc)
    if _EVERY_HOST_FAILED in text:
        hosts = text.split(_EVERY_HOST_FAILED, 1)[1].splitlines()
        return "no host accepted the connection: " + "; ".join(
            line.strip()[2:] for line in hosts if line.strip().startswith("- ")
        )
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


class PgConnections:
    """The connections of one :class:`~provisiond.storage.postgres.PostgresStore` (one per
    worker process): open, hand out, translate errors, break and recover the circuit.

    :param url: the libpq URL (:data:`CONNECTION_DEFAULTS` are added to it).
    :param label: how log lines name the database (without the password).
    :param min_size, max_size: the pool's bounds.
    :param timeout: seconds a call waits for a free pool connection (then 503).
    :param connect_timeout: seconds one connection attempt may take (per host).
    :param probe_interval: seconds between connection attempts while the database is down.
    :param retry_after: what 503 answers tell clients (seconds).
    """

    def __init__(
        self,
        url: str,
        *,
        label: str,
        min_size: int,
        max_size: int,
        timeout: float,
        connect_timeout: float,
        probe_interval: float,
        retry_after: int,
    ) -> None:
        self._url = url
        self._label = label
        self._min_size = min_size
        self._max_size = max_size
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._probe_interval = probe_interval
        self._retry_after = retry_after
        self._conninfo: str | None = None
        self._open = False
        self._pool: AsyncConnectionPool[Connection] | None = None  # None while down
        self._down_since = 0.0
        self._down_reason = ""
        self._recovery: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self, prepare: Callable[[Connection], Awaitable[None]]) -> None:
        """Connect once outside the pool (so that an unreachable database fails with its own
        error within ``connect_timeout``), run ``prepare`` (the migrations) on that
        connection, then start the pool."""
        if self._open:
            return
        self._conninfo = self._make_conninfo()
        with self._errors(None):
            async with await self._connect() as conn:
                await prepare(conn)
            self._pool = await self._start_pool()
        self._open = True

    async def close(self) -> None:
        self._open = False
        recovery, self._recovery = self._recovery, None
        if recovery is not None:
            recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recovery
        pool, self._pool = self._pool, None
        if pool is not None:
            with self._errors(None):
                await pool.close()

    def _make_conninfo(self) -> str:
        try:
            given = psycopg.conninfo.conninfo_to_dict(self._url)
        except psycopg.Error as exc:
            raise ConfigurationError(f"Invalid PostgreSQL URL: {describe(exc)}") from exc
        defaults = {k: v for k, v in CONNECTION_DEFAULTS.items() if k not in given}
        if "connect_timeout" not in given:
            defaults["connect_timeout"] = str(max(2, math.ceil(self._connect_timeout)))
        return psycopg.conninfo.make_conninfo(self._url, **defaults)

    async def _connect(self) -> Connection:
        assert self._conninfo is not None
        return await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)

    async def connect_outside(self) -> Connection:
        """A connection outside the pool (the store's listening connection), with the pool's
        connection string: on a multi-host URL it reaches the server that accepts writes.

        :raises StorageError: the store is not open.
        :raises psycopg.Error: the connection failed (not translated: the caller retries).
        """
        if not self._open or self._conninfo is None:
            raise StorageError(f"{self._label} is not open")
        return await self._connect()

    async def _start_pool(self) -> AsyncConnectionPool[Connection]:
        assert self._conninfo is not None
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            self._conninfo,
            min_size=self._min_size,
            max_size=self._max_size,
            timeout=self._timeout,
            kwargs={"autocommit": True},
            name="provisiond",
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=self._connect_timeout)
        except BaseException:
            await pool.close()
            raise
        return pool

    # -- serving ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pool connection; driver errors inside the block leave it translated."""
        if not self._open:
            raise StorageError(f"{self._label} is not open")
        pool = self._pool
        if pool is None:
            raise DatabaseUnavailableError(
                f"The database is unavailable ({self._down_reason}); retry later.",
                retry_after=self._retry_after,
            )
        with self._errors(pool):
            async with pool.connection() as conn:
                yield conn

    @contextlib.contextmanager
    def _errors(self, pool: AsyncConnectionPool[Connection] | None) -> Iterator[None]:
        """Translate driver errors; an "unavailable" one from the serving ``pool`` makes the
        database suspect (see the module docstring)."""
        try:
            yield
        except psycopg.Error as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # psycopg answers a cancelled wait with a driver error (it cancels the query on
                # the server); the caller is being cancelled, so it must see the cancellation,
                # not a storage error a retry loop would catch and go on with (shutdown hung).
                raise asyncio.CancelledError() from exc
            if not is_unavailable(exc):
                raise StorageError(f"PostgreSQL error: {describe(exc)}") from exc
            if pool is not None and pool is self._pool:
                self._suspect()
            raise DatabaseUnavailableError(
                f"The database is unavailable: {describe(exc)}", retry_after=self._retry_after
            ) from exc

    # -- the breaker --------------------------------------------------------------------------

    def _suspect(self) -> None:
        if self._open and (self._recovery is None or self._recovery.done()):
            self._recovery = asyncio.create_task(self._verify(), name="provisiond-postgres-check")

    async def _verify(self) -> None:
        """Is the database up (some connections died) or down (open the breaker, recover)?"""
        try:
            await self._probe()
        except psycopg.Error as exc:
            await self._break(describe(exc))
            await self._recover()
            return
        except Exception:
            log.exception("Checking %s failed", self._label)
            return
        pool = self._pool
        if pool is not None:
            log.info("%s answers: dropping the pool's dead connections", self._label)
            with contextlib.suppress(psycopg.Error):
                await pool.check()

    async def _probe(self) -> None:
        async with await self._connect() as conn:
            await conn.execute("SELECT 1")

    async def _break(self, reason: str) -> None:
        pool, self._pool = self._pool, None
        self._down_since, self._down_reason = time.monotonic(), reason
        log.warning(
            "%s is unavailable (%s): answering 503 + Retry-After at once, and trying to reconnect every %g s",
            self._label,
            reason,
            self._probe_interval,
        )
        if pool is not None:
            # Waiting requests fail now (PoolClosed); connections in use close when returned.
            with contextlib.suppress(psycopg.Error):
                await pool.close(timeout=1.0)

    async def _recover(self) -> None:
        """Try a fresh connection every ``probe_interval``; on success start a new pool."""
        while self._open:
            await asyncio.sleep(self._probe_interval)
            try:
                await self._probe()
                pool = await self._start_pool()
            except psycopg.Error as exc:
                reason = describe(exc)
                if reason != self._down_reason:
                    log.warning("%s is still unavailable: %s", self._label, reason)
                    self._down_reason = reason
                continue
            except Exception:
                log.exception("Reconnecting to %s failed", self._label)
                continue
            if not self._open:  # closed meanwhile
                await pool.close()
                return
            self._pool = pool
            log.warning(
                "%s is available again, after %.1f s", self._label, time.monotonic() - self._down_since
            )
            return
