"""The front door of every TLS listener (HTTPS with its WebSockets, MQTT, AMQP): admission, the
TLS handshake, and the deadlines of each connection, in one mechanism. The trusted front's plain
listener (:mod:`provisiond.service.front`) goes through it too, without the handshake and with
a check of the source address before admission.

Theory of operation
-------------------
A listener serves plain TCP; its protocol factory makes one :class:`GuardedConnection` per
accepted socket. That object

1. asks the listener's :class:`~provisiond.service.admission.Admission` for a slot, and drops
   the socket at once when there is none (before any TLS work);
2. runs the TLS handshake itself (``loop.start_tls``), so that it can time it out and say so;
3. then makes the application's protocol (uvicorn's HTTP protocol, or the stream protocol of the
   MQTT and AMQP session loops) and stands between it and the TLS transport for the rest of
   the connection: every byte in passes through :meth:`GuardedConnection.data_received`, and
   the application writes through a thin :class:`_GuardedTransport`. A protocol switch (the
   WebSocket upgrade) goes through it too, so the connection is counted until its very end.

The connection is always in one :class:`Phase`, and each phase has at most one deadline, kept in
a single timer per connection:

============  =========================================================  ==========================
phase         the service waits for                                      deadline
============  =========================================================  ==========================
HANDSHAKE     the end of the TLS handshake                               ``tls_handshake_timeout``
FIRST         the first request head / MQTT CONNECT / AMQP header        ``first_request_timeout``
HEAD          the rest of a later request's head (HTTPS keep-alive)      ``header_timeout``
RATE          the rest of a body, packet or frame                        ``min_receive_rate``
BUSY          nothing from the peer: the application is at work          none (the application's)
IDLE          the next request on a kept-alive HTTPS connection          ``keep_alive_timeout``
CLOSING       the peer's TLS close, after the application closed         ``tls_handshake_timeout``
============  =========================================================  ==========================

The bytes themselves move HANDSHAKE to FIRST and IDLE to HEAD; the application tells the rest
through the :class:`Guard` it finds with ``transport.get_extra_info(GUARD_INFO)``:
``head_received()`` (FIRST or HEAD is over), ``receiving()`` (something is incomplete: the rate
applies), ``busy()`` and ``idle()``. In RATE the peer must have sent ``rate`` bytes a second
since the phase began, after a grace period. While the application has paused reading (flow
control; uvicorn's WebSocket protocol does it after every message until the session reads it)
the clock stops for the peer: that time is added to its deadlines. A lapsed deadline aborts the connection with one log line
that names the flag; lines are throttled per listener.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
from collections.abc import Callable
from typing import Any, Protocol, cast

from .admission import Admission, ThrottledLog, process_budget
from .settings import ConnectionLimits

__all__ = ["GUARD_INFO", "NO_GUARD", "Guard", "GuardedConnection", "Listener", "Phase"]

log = logging.getLogger("provisiond.connections")

#: The ``get_extra_info`` name under which a guarded transport gives its :class:`Guard`.
GUARD_INFO = "provisiond.guard"
#: TLS bytes kept for the handshake while it has not begun (a ClientHello is a few KB).
_MAX_HELLO = 64 * 1024


class Guard(Protocol):
    """What the application tells the guard of its connection (see the module docstring)."""

    def head_received(self) -> None:
        """The first request (or a later request's head) is complete."""

    def receiving(self) -> None:
        """Something the peer started is incomplete: the minimum receive rate applies."""

    def busy(self) -> None:
        """The peer owes nothing now."""

    def idle(self) -> None:
        """HTTPS: the response went out; the next request must begin within the keep-alive timeout."""


class _NoGuard:
    """For streams without a guarded transport (tests, in-process servers)."""

    def head_received(self) -> None:
        pass

    def receiving(self) -> None:
        pass

    def busy(self) -> None:
        pass

    def idle(self) -> None:
        pass


NO_GUARD: Guard = _NoGuard()


class Phase(enum.Enum):
    HANDSHAKE = "handshake"
    FIRST = "first request"
    HEAD = "request head"
    RATE = "receiving"
    BUSY = "busy"
    IDLE = "idle"
    CLOSING = "closing"  # the application closed it; the TLS layer bounds the wait for the peer
    CLOSED = "closed"


class Listener:
    """One TLS listener of this process: its name for the logs, TLS context, limits and
    admission. ``first_request`` names what the FIRST phase waits for, for the logs.

    Without ``ssl_context`` the listener serves plain TCP (the trusted front's listener,
    :mod:`provisiond.service.front`): no HANDSHAKE phase, the FIRST deadline runs from the accept.
    ``allowed`` (a source address -> whether it may connect), when given, is asked first: a
    connection from any other address is closed at accept, with a log line, before admission."""

    def __init__(
        self,
        name: str,
        ssl_context: ssl.SSLContext | None,
        limits: ConnectionLimits,
        *,
        first_request: str,
        allowed: Callable[[str], bool] | None = None,
    ) -> None:
        self.name = name
        self.ssl_context = ssl_context
        self.allowed = allowed
        self.limits = limits
        self.first_request = first_request
        self.events = ThrottledLog(log, name)
        self.admission = Admission(name, limits, budget=process_budget(limits.fd_reserve), events=self.events)

    def protocol_factory(
        self, make_protocol: Callable[[], asyncio.Protocol]
    ) -> Callable[[], GuardedConnection]:
        """For ``loop.create_server``: each connection gets a fresh ``make_protocol()`` after its
        handshake."""
        return lambda: GuardedConnection(self, make_protocol)


class GuardedConnection(asyncio.Protocol):
    """One accepted connection: the TCP transport's protocol until the handshake starts, then
    the TLS transport's, forwarding to the application's protocol. It is the :class:`Guard`."""

    __slots__ = (
        "_address",
        "_admitted",
        "_base",
        "_deadline",
        "_early",
        "_early_eof",
        "_hello",
        "_inner",
        "_limits",
        "_listener",
        "_loop",
        "_make_protocol",
        "_paused",
        "_paused_at",
        "_raw",
        "_reason",
        "_received",
        "_since",
        "_task",
        "_timer",
        "_timer_at",
        "_tls",
        "_tls_started",
        "peer",
        "phase",
    )

    def __init__(self, listener: Listener, make_protocol: Callable[[], asyncio.Protocol]) -> None:
        self._listener = listener
        self._limits = listener.limits
        self._make_protocol = make_protocol
        self._loop = asyncio.get_running_loop()
        self._raw: asyncio.Transport | None = None
        self._tls: asyncio.Transport | None = None
        self._inner: asyncio.BaseProtocol | None = None
        self._task: asyncio.Task[None] | None = None
        self._address = "?"
        self.peer = "?"
        self.phase = Phase.HANDSHAKE
        self._admitted = False
        self._deadline: float | None = None
        self._since = 0.0  # when the phase began
        self._received = 0  # bytes from the peer since the handshake
        self._base = 0  # ... when RATE began
        self._paused = False  # by the application (flow control)
        self._paused_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._tls_started = False
        self._hello: list[bytes] = []  # TLS bytes that came before start_tls took over (uvloop)
        self._early: list[bytes] = []  # application bytes that came before the application protocol
        self._early_eof = False
        self._reason: str | None = None  # why we closed, once we did

    # --- the TCP connection, admission, the handshake -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._raw is not None:  # not expected: start_tls does not call it again
            return
        transport = cast("asyncio.Transport", transport)  # uvloop's does not subclass it
        self._raw = transport
        peername = transport.get_extra_info("peername")
        if peername:
            self._address = str(peername[0])
            self.peer = f"{peername[0]}:{peername[1]}"
        allowed = self._listener.allowed
        if allowed is not None and not allowed(self._address):
            self.phase = Phase.CLOSED
            self._listener.events.log(
                logging.WARNING, "refused", "%s: refused: not a trusted front (--trusted-front)", self.peer
            )
            transport.abort()
            return
        if not self._listener.admission.admit(self._address):
            self.phase = Phase.CLOSED
            transport.abort()
            return
        self._admitted = True
        if self._listener.ssl_context is None:  # plain TCP: the application's from the start
            self._tls_started = True
            self._start_application(transport, self._limits.first_request_timeout)
            return
        # Until start_tls has put the TLS layer in place. uvloop starts reading after this
        # returns all the same; what it reads is kept in _hello and handed to the TLS layer.
        transport.pause_reading()
        self._enter(Phase.HANDSHAKE, self._limits.tls_handshake_timeout)
        self._task = self._loop.create_task(self._handshake(transport))

    async def _handshake(self, raw: asyncio.Transport) -> None:
        limits = self._limits
        assert self._listener.ssl_context is not None  # plain listeners never get here
        tls: asyncio.Transport | None = None
        try:
            if self.phase is Phase.HANDSHAKE:
                self._tls_started = True
                starting = self._loop.start_tls(
                    raw,
                    self,
                    self._listener.ssl_context,
                    server_side=True,
                    # Ours (the timer) comes first and logs; asyncio's is a backstop.
                    ssl_handshake_timeout=limits.tls_handshake_timeout + 5,
                    ssl_shutdown_timeout=limits.tls_handshake_timeout,
                )
                if self._hello:
                    # Runs after start_tls has installed its TLS protocol (synchronously, in
                    # this step) and before that protocol's connection_made (scheduled by it).
                    self._loop.call_soon(self._replay_hello, raw)
                tls = await starting
        except asyncio.CancelledError:
            raw.abort()
            self._finish()
            raise
        except Exception as exc:  # ssl.SSLError, ConnectionError, and whatever else start_tls raises
            self._handshake_failed(exc)
            return
        finally:
            self._task = None
        if tls is None or tls.is_closing() or self.phase is not Phase.HANDSHAKE:
            self._handshake_failed(None)  # the peer left during the handshake (or we closed it)
            if tls is not None:
                tls.abort()
            return
        self._start_application(tls, limits.first_request_timeout)

    def _start_application(self, transport: asyncio.Transport, first_request_timeout: float) -> None:
        """The application's protocol takes over ``transport`` (TLS, or the plain TCP one)."""
        self._tls = transport
        self._enter(Phase.FIRST, first_request_timeout)
        inner = self._inner = self._make_protocol()
        inner.connection_made(_GuardedTransport(transport, self))
        if isinstance(inner, asyncio.Protocol):
            early, self._early = self._early, []
            for data in early:
                try:
                    inner.data_received(data)
                except Exception as exc:
                    self._protocol_failed(inner, exc)
                    return
            if self._early_eof and not inner.eof_received():
                transport.close()

    def _replay_hello(self, raw: asyncio.Transport) -> None:
        """Hand the TLS bytes read before start_tls to the TLS protocol it installed."""
        installed = raw.get_protocol()
        data, self._hello = b"".join(self._hello), []
        if not hasattr(installed, "buffer_updated"):  # both loops install a BufferedProtocol
            self._close(
                logging.WARNING, "TLS start", f"cannot hand the TLS layer its first bytes ({installed!r})"
            )
            return
        protocol = cast("asyncio.BufferedProtocol", installed)
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]

    def _handshake_failed(self, exc: BaseException | None) -> None:
        if self._reason is None:  # our own deadline already logged why
            if exc is None or isinstance(exc, ConnectionError | EOFError):
                log.debug(
                    "%s %s: closed by the peer during the TLS handshake", self._listener.name, self.peer
                )
            else:
                reason = str(exc) or type(exc).__name__
                self._listener.events.log(
                    logging.INFO, "TLS handshake failed", "%s: TLS handshake failed: %s", self.peer, reason
                )
        if self._raw is not None:
            self._raw.abort()
        self._finish()

    def _finish(self) -> None:
        """The connection is gone: stop the timer, give the slot back (once)."""
        self.phase = Phase.CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._admitted:
            self._admitted = False
            self._listener.admission.release(self._address)

    # --- asyncio.Protocol, between the TLS transport and the application -------------------------

    def data_received(self, data: bytes) -> None:
        if not self._tls_started:  # TLS bytes (a ClientHello) that beat start_tls
            self._hello.append(data)
            if sum(map(len, self._hello)) > _MAX_HELLO:
                self._close(
                    logging.INFO, "TLS start", f"more than {_MAX_HELLO} bytes before the TLS handshake began"
                )
            return
        self._received += len(data)
        if self.phase is Phase.IDLE:
            self._enter(Phase.HEAD, self._limits.header_timeout)
        inner = self._inner
        if inner is None:
            self._early.append(data)  # the handshake finished and data came before our task resumed
            return
        try:
            inner.data_received(data)  # type: ignore[attr-defined]  # a Protocol (see _switch)
        except Exception as exc:
            self._protocol_failed(inner, exc)

    def _protocol_failed(self, inner: asyncio.BaseProtocol, exc: Exception) -> None:
        """The application's protocol raised on the peer's bytes (a library's bug the peer can
        trigger: uvicorn's WebSocket protocol asserted on frames that came before the upgrade was
        accepted). The connection is closed with one throttled log line, not asyncio's "Fatal
        error" and traceback for every such peer; the traceback goes to the debug log."""
        log.debug("%s %s: %s failed", self._listener.name, self.peer, type(inner).__name__, exc_info=exc)
        why = f"{type(inner).__name__} failed on the peer's data: {type(exc).__name__}: {exc}"
        self._close(logging.WARNING, "protocol failure", why[:300])

    def eof_received(self) -> bool | None:
        if not self._tls_started:
            return None  # gone before the handshake: close
        inner = self._inner
        if inner is None:
            self._early_eof = True
            return True
        return inner.eof_received()  # type: ignore[attr-defined, no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        inner, self._inner = self._inner, None
        self._finish()
        if inner is not None:
            # No longer ours to reach: the application's protocol (with its app, its requests
            # and the transport that points back here) is freed when it lets go, not left in a
            # reference cycle for the garbage collector.
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # --- what the application says (Guard) -------------------------------------------------------

    def head_received(self) -> None:
        if self.phase is Phase.FIRST or self.phase is Phase.HEAD:
            self._enter(Phase.BUSY, None)

    def receiving(self) -> None:
        if (self.phase is Phase.BUSY or self.phase is Phase.IDLE) and self._limits.min_receive_rate > 0:
            self._enter(Phase.RATE, None)

    def busy(self) -> None:
        if self.phase is Phase.RATE or self.phase is Phase.IDLE:
            self._enter(Phase.BUSY, None)

    def idle(self) -> None:
        if self.phase is Phase.RATE or self.phase is Phase.BUSY:
            self._enter(Phase.IDLE, self._limits.keep_alive_timeout)

    # --- what the application does through _GuardedTransport -------------------------------------

    def _switch(self, protocol: asyncio.BaseProtocol) -> None:
        """The application hands the connection to another protocol (a WebSocket upgrade); from
        now on that protocol's session keeps its own deadlines."""
        self._inner = protocol
        if self.phase is not Phase.CLOSED:
            self._enter(Phase.BUSY, None)

    def _closing(self) -> None:
        if self.phase is not Phase.CLOSED:
            self._enter(Phase.CLOSING, None)

    def _pause_reading(self) -> None:
        if not self._paused:
            self._paused, self._paused_at = True, self._loop.time()
        assert self._tls is not None
        self._tls.pause_reading()

    def _resume_reading(self) -> None:
        if self._paused:
            # The peer could not send while we did not read: that time is not held against it.
            held = self._loop.time() - self._paused_at
            self._since += held
            if self._deadline is not None:
                self._deadline += held
            self._paused = False
        assert self._tls is not None
        self._tls.resume_reading()
        self._arm()

    # --- deadlines -------------------------------------------------------------------------------

    def _enter(self, phase: Phase, timeout: float | None) -> None:
        now = self._loop.time()
        self.phase = phase
        self._since = now
        self._deadline = now + timeout if timeout is not None else None
        if phase is Phase.RATE:
            self._base = self._received
        self._arm()

    def _due(self) -> float | None:
        """When the current phase's deadline lapses (the rate's moves with every byte)."""
        if self._paused and self.phase is not Phase.HANDSHAKE:
            return None
        if self.phase is Phase.RATE:
            limits = self._limits
            return (
                self._since
                + limits.min_receive_rate_grace
                + (self._received - self._base) / limits.min_receive_rate
            )
        return self._deadline

    def _arm(self) -> None:
        due = self._due()
        if due is None or self.phase is Phase.CLOSED:
            return
        if self._timer is not None:
            if self._timer_at <= due:
                return  # it fires first and looks again
            self._timer.cancel()
        self._timer_at = due
        self._timer = self._loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        due = self._due()
        if due is None or self.phase is Phase.CLOSED:
            return
        if self._loop.time() < due:
            self._arm()
            return
        self._expire()

    def _expire(self) -> None:
        limits, phase = self._limits, self.phase
        level = logging.INFO
        if phase is Phase.HANDSHAKE:
            why = f"TLS handshake not finished within {limits.tls_handshake_timeout:g} s (--tls-handshake-timeout)"
        elif phase is Phase.FIRST:
            why = (
                f"no complete {self._listener.first_request} within {limits.first_request_timeout:g} s "
                f"of the {'TLS handshake' if self._listener.ssl_context else 'accept'} (--first-request-timeout)"
            )
        elif phase is Phase.HEAD:
            why = f"request head not complete {limits.header_timeout:g} s after its first byte (--header-timeout)"
        elif phase is Phase.RATE:
            took = self._loop.time() - self._since
            why = (
                f"{self._received - self._base} bytes in {took:.1f} s while more was due, under "
                f"{limits.min_receive_rate:g} bytes/s (--min-receive-rate)"
            )
        else:
            level = logging.DEBUG  # the normal end of a kept-alive connection
            why = f"idle {limits.keep_alive_timeout:g} s after a response (--keep-alive-timeout)"
        self._close(level, phase.value, why)

    def _close(self, level: int, kind: str, why: str) -> None:
        self._reason = why
        if level >= logging.INFO:
            self._listener.events.log(level, kind, "%s: closed: %s", self.peer, why)
        else:
            log.log(level, "%s %s: closed: %s", self._listener.name, self.peer, why)
        transport = self._tls or self._raw
        self.phase = Phase.CLOSED
        if transport is not None:
            transport.abort()


class _GuardedTransport(asyncio.Transport):
    """The TLS transport as the application sees it: everything passes through, but a protocol
    switch and flow control go by the :class:`GuardedConnection`, which is also
    ``get_extra_info(GUARD_INFO)``."""

    __slots__ = ("_conn", "_tls")

    def __init__(self, tls: asyncio.Transport, conn: GuardedConnection) -> None:
        super().__init__()
        self._tls = tls
        self._conn = conn

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == GUARD_INFO:
            return self._conn
        return self._tls.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._tls.is_closing()

    def close(self) -> None:
        self._conn._closing()
        self._tls.close()

    def abort(self) -> None:
        self._tls.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._conn._switch(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._conn._inner or self._conn

    def is_reading(self) -> bool:
        return self._tls.is_reading()

    def pause_reading(self) -> None:
        self._conn._pause_reading()

    def resume_reading(self) -> None:
        self._conn._resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tls.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._tls.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tls.get_write_buffer_limits()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._tls.writelines(list_of_data)

    def write_eof(self) -> None:
        self._tls.write_eof()

    def can_write_eof(self) -> bool:
        return self._tls.can_write_eof()
