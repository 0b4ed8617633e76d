"""Byte streams for the connection-oriented device transports (MQTT, AMQP).

The MQTT and AMQP endpoints run one session loop per connection over a :class:`ByteStream`,
whether the bytes come from a TLS socket on their own port or from a WebSocket on the shared
HTTPS port. The TLS front (:mod:`provisiond.tls`) provides the presented client certificate
chain either way, so X.509 attestation sees the same thing on every transport.

Listeners: :func:`start_tls_listener` starts a TLS listener for one protocol (SO_REUSEPORT
only when there are several workers), behind the guard of :mod:`provisiond.service.guard`
(admission, the TLS handshake, deadlines); a session loop tells the stream's :attr:`ByteStream.guard`
when its first request (CONNECT, protocol header) is in and whether a packet or frame is
incomplete (the minimum receive rate then applies). The WebSocket side is
one ASGI endpoint (``/`` and ``/$iothub/websocket``) that picks the protocol handler by the
subprotocol the client asks for (``mqtt``/``MQTT``, ``AMQPWSB10``), see :class:`WebSocketRouter`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, cast

from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..errors import ConfigurationError
from ..tls import peer_chain, server_context
from .guard import GUARD_INFO, NO_GUARD, Guard, Listener
from .settings import ConnectionLimits, Settings

__all__ = [
    "ByteStream",
    "SessionHandler",
    "StreamClosed",
    "TcpStream",
    "WebSocketRouter",
    "WebSocketStream",
    "serve_tls",
    "start_tls_listener",
]

log = logging.getLogger("provisiond.streams")


class StreamClosed(Exception):
    """The peer closed the connection (internal to the session loops)."""


class ByteStream(Protocol):
    """One device connection: bytes in, bytes out, and who the device said it is in TLS."""

    #: The client certificate chain the device presented (DER, leaf first; empty if none).
    client_chain: list[bytes]
    #: Short peer description for logs ("127.0.0.1:53412" or "websocket 127.0.0.1:53412").
    peer: str
    #: The connection's deadlines (:data:`~provisiond.service.guard.NO_GUARD` when it has none).
    guard: Guard
    #: The peer's IP address (the device API's rate limits count failures per source address).
    address: str | None

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """The next bytes from the peer; ``b""`` when it closed the connection."""
        ...

    async def send(self, data: bytes) -> None:
        """Send bytes (raises :class:`StreamClosed` if the peer is gone)."""
        ...

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        ...


SessionHandler = Callable[[ByteStream], Awaitable[None]]


class TcpStream:
    """A :class:`ByteStream` over an asyncio TLS (or plain TCP) connection, read and written
    through its :class:`_SessionProtocol` (what asyncio's StreamReader and StreamWriter did, in
    fewer calls per read and write: a session loop makes one of each per packet or frame)."""

    def __init__(self, protocol: _SessionProtocol, transport: asyncio.Transport) -> None:
        self._protocol = protocol
        self._transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        self.client_chain = peer_chain(ssl_object) if ssl_object is not None else []
        peername = transport.get_extra_info("peername")
        self.peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        self.guard: Guard = transport.get_extra_info(GUARD_INFO) or NO_GUARD
        self.address = str(peername[0]) if peername else None

    async def receive(self, max_bytes: int = 65536) -> bytes:
        protocol = self._protocol
        if not protocol.chunks and protocol.error is None and not protocol.eof:
            waiter = protocol.waiter = protocol.loop.create_future()
            try:
                await waiter
            finally:
                protocol.waiter = None
        if protocol.error is not None:  # a broken connection (reset, TLS error): its end
            return b""
        return protocol.take(max_bytes)

    async def send(self, data: bytes) -> None:
        protocol = self._protocol
        try:
            self._transport.write(data)
        except (ConnectionError, ssl.SSLError) as exc:
            raise StreamClosed(str(exc)) from exc
        if protocol.error is not None:
            raise StreamClosed(str(protocol.error))
        if protocol.lost:
            raise StreamClosed("Connection lost")
        if self._transport.is_closing():
            await asyncio.sleep(0)  # let connection_lost run, as a drain would
            if protocol.lost:
                raise StreamClosed("Connection lost")  # as asyncio's drain says it
        if protocol.paused_writing:
            await protocol.drained()

    async def close(self) -> None:
        if self._transport.is_closing():
            return
        self._transport.close()
        await self._protocol.closed(2.0)


class WebSocketStream:
    """A :class:`ByteStream` over an accepted Starlette WebSocket (binary messages)."""

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket
        extensions = websocket.scope.get("extensions", {})
        tls = extensions.get("tls", {})
        self.client_chain = list(tls.get("client_cert_chain", []))
        self.guard: Guard = extensions.get(GUARD_INFO) or NO_GUARD
        client = websocket.client
        self.peer = f"websocket {client.host}:{client.port}" if client else "websocket"
        self.address = client.host if client else None
        self._closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self._closed:  # empty frames carry nothing: wait for the next (a loop, not recursion)
            try:
                message = await self._ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return b""
            if message["type"] == "websocket.disconnect":
                self._closed = True
                return b""
            data = message.get("bytes")
            if data is None:  # a text frame: not what MQTT or AMQP send
                text = message.get("text") or ""
                data = text.encode()
            if data:
                return bytes(data)
        return b""

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise StreamClosed("websocket closed")
        try:
            await self._ws.send_bytes(data)
        except (WebSocketDisconnect, RuntimeError) as exc:
            self._closed = True
            raise StreamClosed(str(exc)) from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._ws.close()
        except (RuntimeError, WebSocketDisconnect):  # the peer went first
            pass


#: Bytes read and not yet taken above which a connection stops reading (asyncio's
#: StreamReader's: twice its 64 KiB limit), and at or below which it reads again.
_PAUSE_ABOVE = 2 * 65536
_RESUME_AT = 65536


class _SessionProtocol(asyncio.Protocol):
    """The application protocol of one stream connection: the bytes the peer sent and the
    session has not taken yet, a waiter for more, flow control both ways, and a task that runs
    ``session`` over its :class:`TcpStream` (asyncio's own callback would log a traceback for a
    session cancelled at shutdown on Python 3.11)."""

    def __init__(self, session: Callable[[TcpStream], Coroutine[Any, Any, None]]) -> None:
        self._session = session
        self._task: asyncio.Task[None] | None = None
        self._transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        #: What the peer sent, not taken yet (:meth:`take`), and how many bytes that is.
        self.chunks: list[bytes] = []
        self._size = 0
        self.eof = False
        #: The exception the connection was lost with (then reads end, writes fail).
        self.error: BaseException | None = None
        self.lost = False
        self.waiter: asyncio.Future[None] | None = None
        self._paused_reading = False
        self.paused_writing = False
        self._over_tls = False
        self._drain: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)
        self._transport = transport
        self._over_tls = transport.get_extra_info("sslcontext") is not None
        self._task = self.loop.create_task(self._session(TcpStream(self, transport)))

    def data_received(self, data: bytes) -> None:
        if not data:
            return
        self.chunks.append(data)
        self._size += len(data)
        self._wake()
        if self._size > _PAUSE_ABOVE and not self._paused_reading and self._transport is not None:
            self._paused_reading = True
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return not self._over_tls  # TLS closes on the peer's end; plain TCP stays half open

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if exc is None:
            self.eof = True
        else:
            self.error = exc
        self._wake()
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of what the peer sent (``b""`` at its end)."""
        chunks = self.chunks
        if not chunks:
            return b""
        if len(chunks) == 1 and len(chunks[0]) <= max_bytes:
            data = chunks.pop()
        else:
            joined = b"".join(chunks)
            data, rest = joined[:max_bytes], joined[max_bytes:]
            chunks[:] = [rest] if rest else []
        self._size -= len(data)
        if self._paused_reading and self._size <= _RESUME_AT and self._transport is not None:
            self._paused_reading = False
            self._transport.resume_reading()
        return data

    async def drained(self) -> None:
        """Until the transport takes writes again (or the connection is lost)."""
        if self.lost:
            raise StreamClosed(str(self.error or "Connection lost"))
        if self._drain is None:
            self._drain = self.loop.create_future()
        await self._drain
        if self.error is not None:
            raise StreamClosed(str(self.error))

    async def closed(self, within: float) -> None:
        """Until the connection is lost, at most ``within`` seconds."""
        if self.lost:
            return
        closed = self._closed = self.loop.create_future()
        timer = self.loop.call_later(within, _release, closed)
        try:
            await closed
        finally:
            timer.cancel()


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def serve_tls(
    handler: SessionHandler,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    name: str,
    limits: ConnectionLimits,
    first_request: str,
    reuse_port: bool = False,
) -> asyncio.Server:
    """Start a TLS listener whose connections each run ``handler``, behind a guard with ``limits``
    (``first_request`` names, for its logs, what a connection owes first). ``reuse_port``
    (SO_REUSEPORT) lets every worker process of one service listen on the same port; a single
    worker leaves it off, so that a second service on a taken port fails loudly instead of sharing it."""

    async def on_connection(stream: TcpStream) -> None:
        try:
            await handler(stream)
        except Exception:
            log.exception("%s session with %s ended with an internal error", name, stream.peer)
        finally:
            await stream.close()

    listener = Listener(name, ssl_context, limits, first_request=first_request)
    server = await asyncio.get_running_loop().create_server(
        listener.protocol_factory(lambda: _SessionProtocol(on_connection)),
        host,
        port,
        reuse_port=reuse_port,
        backlog=2048,  # as uvicorn's: a burst of connections is accepted (or refused) rather than dropped
    )
    log.info("%s listening on %s:%d (TLS)", name, host, port)
    return server


async def start_tls_listener(
    settings: Settings, handler: SessionHandler, *, port: int, name: str, flag: str, first_request: str
) -> asyncio.Server | None:
    """The TLS listener of one device transport for this worker, or ``None`` when its port is 0
    (or there is no server certificate: the transport then runs over WebSockets only).

    :raises ConfigurationError: the port cannot be bound (the worker does not start).
    """
    if not port:
        log.info("%s over TLS is off (%s 0); %s over WebSockets is on the HTTPS port", name, flag, name)
        return None
    if settings.server_cert is None or settings.server_key is None:
        log.warning("%s over TLS is off: the service has no server certificate", name)
        return None
    context = server_context(settings.server_cert, settings.server_key)
    try:
        return await serve_tls(
            handler,
            host=settings.bind,
            port=port,
            ssl_context=context,
            name=name,
            limits=settings.connections,
            first_request=first_request,
            reuse_port=settings.workers > 1,
        )
    except OSError as exc:
        raise ConfigurationError(
            f"Cannot serve {name} on {settings.bind}:{port}: {exc.strerror or exc}"
        ) from exc


class WebSocketRouter:
    """The ASGI endpoint of ``/`` and ``/$iothub/websocket``: MQTT or AMQP over WebSockets,
    picked by the subprotocol the client asks for. ``handlers`` maps a lower-cased subprotocol
    (``mqtt``, ``amqpwsb10``) to its session handler; the client's spelling is echoed (the C SDK
    asks for ``MQTT``). The app factory builds it."""

    def __init__(self, handlers: dict[str, SessionHandler]) -> None:
        self.handlers = {name.lower(): handler for name, handler in handlers.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        offered = [p.strip() for p in websocket.scope.get("subprotocols", [])]
        chosen = next((p for p in offered if p.lower() in self.handlers), None)
        if chosen is None:
            log.info("websocket from %s refused: no supported subprotocol in %s", websocket.client, offered)
            await websocket.close(code=1002)
            return
        await websocket.accept(subprotocol=chosen)
        stream = WebSocketStream(websocket)
        try:
            await self.handlers[chosen.lower()](stream)
        except Exception:
            log.exception("websocket %s session with %s ended with an internal error", chosen, stream.peer)
        finally:
            await stream.close()
