"""What the stream transports (:mod:`~provisiond.device.mqtt`, :mod:`~provisiond.device.amqp`)
share: the byte channels to the service (TLS, :mod:`~provisiond.device._tls`, or a WebSocket at
``wss://host:port/$iothub/websocket``)
and :class:`StreamTransport`, their base: the endpoint with the protocol's default port, the TLS
context, opening a channel and translating its exceptions into ours.

The constructor checks, the endpoint parsing and the TLS context are every transport's, so they
live in :mod:`~provisiond.device.transport` (``check_options``, ``parse_endpoint``,
``tls_context``), which this module builds on and :class:`~provisiond.device.transport.HttpsTransport`
uses as well.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import ssl
from abc import abstractmethod
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar, Protocol

from ..errors import ConnectError, ProvisioningError, TimeoutError, TransportError
from ._tls import TlsStream, open_tls
from .security import SecurityProvider
from .transport import USER_AGENT, Transport, parse_endpoint, split_endpoint, tls_context

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

__all__ = [
    "READ_SIZE",
    "WEBSOCKET_PATH",
    "WEBSOCKET_PORT",
    "Channel",
    "StreamTransport",
    "TlsChannel",
    "WebSocketChannel",
    "host_and_port",
]

#: DPS serves WebSockets on the HTTPS port, at this path.
WEBSOCKET_PORT = 443
WEBSOCKET_PATH = "/$iothub/websocket"
#: Bytes asked of a TLS channel per read.
READ_SIZE = 65536


class Channel(Protocol):
    """Bytes to and from the service, over TLS or a WebSocket."""

    @property
    def closed(self) -> bool: ...

    async def read(self) -> bytes:
        """The next bytes; ``b""`` when the service closed the connection."""
        ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class TlsChannel:
    def __init__(self, stream: TlsStream) -> None:
        self._stream = stream

    @property
    def closed(self) -> bool:
        return self._stream.closed

    async def read(self) -> bytes:
        return await self._stream.read(READ_SIZE)

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)

    async def close(self) -> None:
        await self._stream.close()


class WebSocketChannel:
    def __init__(self, websocket: ClientConnection) -> None:
        self._ws = websocket

    @property
    def closed(self) -> bool:
        return self._ws.close_code is not None

    async def read(self) -> bytes:
        """The next message's bytes; b"" once the connection closed. An empty message (which
        WebSocket allows) is not the end of the connection: the next one is read."""
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                message = await self._ws.recv()
            except ConnectionClosed:
                return b""
            data = message if isinstance(message, bytes) else message.encode()
            if data:
                return data

    async def write(self, data: bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            await self._ws.send(data)
        except ConnectionClosed as exc:
            raise ConnectionResetError(str(exc)) from exc

    async def close(self) -> None:
        await self._ws.close()


def host_and_port(host: str, *, scheme: str, default_port: int) -> tuple[str, int]:
    """The host and port of a global endpoint, ``host`` or ``host:port``, that may start with
    ``{scheme}://`` or ``wss://`` (or ``https://``); ``default_port`` when it names none.

    :raises ValueError: a malformed host.
    """
    for prefix in (f"{scheme}://", "wss://"):
        host = host.removeprefix(prefix)
    return split_endpoint(parse_endpoint(host), default_port=default_port)


class StreamTransport(Transport):
    """A transport that holds one connection to the service at a time, over TLS or a WebSocket.

    Subclasses set the class attributes, check their options (with
    :func:`~provisiond.device.transport.check_options` and their own limits) before calling this
    constructor, and say in :meth:`_established` whether the connection got past its handshake.

    :raises ValueError: a malformed host.
    :raises ConfigurationError: the CA file or the client certificate cannot be loaded.
    """

    #: The protocol's name in messages (``MQTT``).
    _protocol: ClassVar[str]
    #: The URL scheme of the TLS address (``mqtts``), also allowed in front of the host.
    _scheme: ClassVar[str]
    #: The TLS port when the host names none (WebSockets: :data:`WEBSOCKET_PORT`).
    _default_port: ClassVar[int]
    #: The WebSocket subprotocol (``mqtt``).
    _subprotocol: ClassVar[str]

    def __init__(
        self,
        *,
        host: str,
        id_scope: str,
        security: SecurityProvider,
        websockets: bool,
        ssl_context: ssl.SSLContext | None,
        ca_file: str | os.PathLike[str] | None,
        timeout: float,
        api_version: str,
        sas_ttl: int,
    ) -> None:
        self.host, self.port = host_and_port(
            host, scheme=self._scheme, default_port=WEBSOCKET_PORT if websockets else self._default_port
        )
        self.websockets = websockets
        self.id_scope = id_scope
        self.api_version = api_version
        self.timeout = timeout
        self._security = security
        self._sas_ttl = sas_ttl
        self._ssl = tls_context(ssl_context, ca_file=ca_file, security=security)
        self._lock = asyncio.Lock()

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.websockets:
            return f"wss://{host}:{self.port}{WEBSOCKET_PATH}"
        return f"{self._scheme}://{host}:{self.port}"

    @abstractmethod
    def _established(self) -> bool:
        """Whether the current connection got past its handshake (a failure after it is a broken
        connection, not a failure to connect)."""

    async def _open(self) -> Channel:
        """A new channel to :attr:`address`, TLS handshake (and WebSocket upgrade) done."""
        if not self.websockets:
            stream = await asyncio.wait_for(
                open_tls(self.host, self.port, self._ssl, server_hostname=self.host), self.timeout
            )
            return TlsChannel(stream)
        from websockets.asyncio.client import connect
        from websockets.typing import Subprotocol

        websocket = await connect(
            self.address,
            ssl=self._ssl,
            subprotocols=[Subprotocol(self._subprotocol)],
            open_timeout=self.timeout,
            ping_interval=None,  # MQTT's keep-alive does this job; the AMQP client asks for none
            compression=None,
            max_size=None,  # the protocol layer bounds what it accepts
            # A service that does not answer our close is not waited for past the timeout (the
            # library's default, 10 s, came on top of it).
            close_timeout=min(self.timeout, 1.0),
            user_agent_header=USER_AGENT,
        )
        return WebSocketChannel(websocket)

    @contextlib.asynccontextmanager
    async def _errors_mapped(self) -> AsyncIterator[None]:
        """Translate socket, TLS and WebSocket exceptions into ours, keeping the cause; ours, and
        exceptions of neither kind (AMQP's internal refusal), pass through."""
        from websockets.exceptions import InvalidHandshake, InvalidURI

        try:
            yield
        except ProvisioningError:  # ours already (our TimeoutError is also a builtin TimeoutError)
            raise
        except (ssl.SSLCertVerificationError, InvalidHandshake, InvalidURI) as exc:
            raise ConnectError(f"Cannot connect to {self.address}: {exc}") from exc
        except builtins.TimeoutError as exc:
            raise TimeoutError(f"{self.address} did not answer within {self.timeout:g} s") from exc
        except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
            detail = str(exc) or type(exc).__name__
            if not self._established():
                raise ConnectError(f"Cannot connect to {self.address}: {detail}") from exc
            raise TransportError(
                f"The {self._protocol} connection to {self.address} failed: {detail}"
            ) from exc
