"""HTTP/1.1 for :class:`~provisiond.device.transport.HttpsTransport`: one keep-alive TLS
connection (:mod:`provisiond.device._tls`: TLS over memory BIOs on an asyncio TCP stream), with
h11 (the sans-io HTTP/1.1 core) for the protocol.

A device sends a handful of requests to one host in its life (a register, maybe polls), so
this is all the client it needs: no pool, no proxies, no redirects, no cookies, no
compression (it asks for none). The connection opened for the register serves the polls while
it lives; one the service closed while the flow slept (or that fails before any byte of an
answer) is replaced once, as HTTP clients do with a stale keep-alive connection.

Errors are translated here, once: cannot connect or the TLS handshake failed ->
:class:`~provisiond.errors.ConnectError`; no answer in time -> :class:`~provisiond.errors.TimeoutError`;
the connection broke, or the answer is not HTTP/1.1 -> :class:`~provisiond.errors.TransportError`.
"""

from __future__ import annotations

import asyncio
import builtins
import ssl

import h11

from ..errors import ConnectError, TimeoutError, TransportError
from ._tls import TlsStream, open_tls

__all__ = ["HttpConnection", "HttpResponse"]

#: The largest status line and headers accepted from the service (h11's default is 16 KiB).
MAX_HEAD = 64 * 1024
#: The largest body accepted from the service: a registration result is a few KiB.
MAX_BODY = 4 * 1024 * 1024


class HttpResponse:
    """A complete answer: the status, the headers (names lower-cased) and the body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), None when absent."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class _Stale(Exception):
    """A reused connection failed before any byte of the answer (internal: reconnect once)."""


class HttpConnection:
    """Requests to one ``host:port`` over TLS, one at a time, on a keep-alive connection.

    :param host: the host name to connect to and verify the certificate for.
    :param port: the TCP port.
    :param authority: the ``Host`` header (``host`` or ``host:port``).
    :param ssl_context: the client TLS context.
    :param timeout: seconds for the connect and TLS handshake, and for each write and read.
    """

    def __init__(
        self, *, host: str, port: int, authority: str, ssl_context: ssl.SSLContext, timeout: float
    ) -> None:
        self.host = host
        self.port = port
        self.authority = authority
        self.timeout = timeout
        self._ssl = ssl_context
        self._stream: TlsStream | None = None
        self._h11: h11.Connection | None = None

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> HttpResponse:
        """Send one request and read the whole answer.

        :raises ConnectError: cannot connect (refused, unknown host, TLS handshake failed).
        :raises TimeoutError: no connection, or no answer, in time.
        :raises TransportError: the connection broke, or the answer is not HTTP/1.1.
        """
        all_headers = [("Host", self.authority), *headers]
        if body or method != "GET":  # a poll goes without one, as the SDKs' HTTP stacks send it
            all_headers.append(("Content-Length", str(len(body))))
        reused = self._usable()
        if not reused:
            await self._connect()
        try:
            return await self._exchange(method, target, all_headers, body, reused=reused)
        except _Stale:
            await self.close()
            await self._connect()
            return await self._exchange(method, target, all_headers, body, reused=False)

    async def close(self) -> None:
        """Close the connection, if one is open."""
        stream, self._stream, self._h11 = self._stream, None, None
        if stream is not None:
            await stream.close()

    # --- internals -------------------------------------------------------------------------------

    def _usable(self) -> bool:
        """Whether the open connection can carry another request: idle, and not closed by the
        service (which the event loop noticed while the flow slept)."""
        stream, machine = self._stream, self._h11
        if stream is None or machine is None:
            return False
        return machine.our_state is h11.IDLE and not stream.closed

    async def _connect(self) -> None:
        await self.close()
        try:
            async with asyncio.timeout(self.timeout):
                stream = await open_tls(self.host, self.port, self._ssl, server_hostname=self.host)
        except builtins.TimeoutError as exc:
            raise TimeoutError(
                f"{self.authority} did not answer in time (connect, {self.timeout:g} s)"
            ) from exc
        except OSError as exc:  # refused, unknown host, TLS refused (ssl.SSLError is an OSError)
            raise ConnectError(f"Cannot connect to {self.authority}: {exc or type(exc).__name__}") from exc
        self._stream = stream
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)

    async def _exchange(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes, *, reused: bool
    ) -> HttpResponse:
        stream, machine = self._stream, self._h11
        assert stream is not None and machine is not None
        heard = False
        try:
            async with asyncio.timeout(self.timeout):
                data = machine.send(h11.Request(method=method, target=target, headers=headers)) or b""
                if body:
                    data += machine.send(h11.Data(data=body)) or b""
                await stream.write(data + (machine.send(h11.EndOfMessage()) or b""))
                status, answer_headers, chunks = 0, [], []
                size = 0
                while True:
                    event = machine.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.read()
                        if not data and not heard and reused:
                            raise _Stale
                        heard = heard or bool(data)
                        machine.receive_data(data)
                    elif isinstance(event, h11.Response):
                        status, answer_headers = event.status_code, list(event.headers)
                    elif isinstance(event, h11.Data):
                        size += len(event.data)
                        if size > MAX_BODY:
                            raise TransportError(f"{self.authority} answered with more than {MAX_BODY} bytes")
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        raise h11.RemoteProtocolError("the connection closed before the answer ended")
                    # InformationalResponse (1xx): wait for the final answer
        except _Stale:
            raise
        except builtins.TimeoutError as exc:
            await self.close()
            raise TimeoutError(f"{self.authority} did not answer in time ({self.timeout:g} s)") from exc
        except (OSError, EOFError, h11.ProtocolError) as exc:
            await self.close()
            if reused and not heard and isinstance(exc, OSError):
                raise _Stale from exc
            detail = str(exc) or type(exc).__name__
            raise TransportError(
                f"The exchange with {self.authority} failed ({type(exc).__name__}: {detail})"
            ) from exc
        except BaseException:
            await self.close()
            raise
        if machine.our_state is h11.DONE and machine.their_state is h11.DONE:
            machine.start_next_cycle()
        else:  # the service closes it (Connection: close, or HTTP/1.0)
            await self.close()
        return HttpResponse(status, answer_headers, b"".join(chunks))
