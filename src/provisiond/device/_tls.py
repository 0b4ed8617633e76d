"""TLS for the device client's connections: an :class:`ssl.SSLObject` over memory BIOs on a
plain asyncio TCP stream.

asyncio's own TLS transport (``open_connection(ssl=...)``) allocates and zero-fills a 256 KiB
read buffer per connection; a device holding its connection while the flow sleeps, or a
process with many clients, pays that for every one. Here the TCP stream's reads (as large as
what arrived) feed the TLS object directly, so a connection costs what it holds.

:class:`TlsStream` reads and writes application bytes; the handshake runs in :func:`open_tls`.
Failures are the ``ssl`` and socket exceptions (``ssl.SSLError`` and its subclasses are
``OSError``); the callers translate them into the client's errors.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ssl
from collections.abc import Callable
from typing import TypeVar

__all__ = ["READ_SIZE", "TlsStream", "open_tls"]

#: Bytes asked of the TCP stream per read.
READ_SIZE = 65536

T = TypeVar("T")


class TlsStream:
    """One TLS connection: application bytes in and out."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tls: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._tls = tls
        self._incoming = incoming
        self._outgoing = outgoing
        self._eof = False

    @property
    def closed(self) -> bool:
        """Whether the peer closed the connection (as far as the event loop has seen) or we did."""
        return self._eof or self._reader.at_eof() or self._writer.is_closing()

    async def read(self, size: int = READ_SIZE) -> bytes:
        """The next application bytes; ``b""`` once the peer closed the connection (with or
        without TLS's close_notify)."""
        if self._eof:
            return b""
        try:
            return await self._call(self._tls.read, size)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            self._eof = True
            return b""

    async def write(self, data: bytes) -> None:
        await self._call(self._tls.write, data)

    async def close(self) -> None:
        """Send close_notify (best effort) and close the socket."""
        if not self._writer.is_closing():
            with contextlib.suppress(ssl.SSLError, OSError):
                self._tls.unwrap()
            with contextlib.suppress(OSError):
                self._flush()
            self._writer.close()
        with contextlib.suppress(OSError, builtins.TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), 2)

    async def handshake(self) -> None:
        await self._call(self._tls.do_handshake)

    async def _call(self, operation: Callable[..., T], *args: object) -> T:
        while True:
            try:
                result = operation(*args)
            except ssl.SSLWantReadError:
                if self._incoming.eof:  # nothing more will come
                    raise ssl.SSLEOFError("the connection closed in the middle of a TLS record") from None
                self._flush()
                await self._writer.drain()
                data = await self._reader.read(READ_SIZE)
                if data:
                    self._incoming.write(data)
                else:
                    self._incoming.write_eof()
                continue
            self._flush()
            await self._writer.drain()
            return result

    def _flush(self) -> None:
        if self._outgoing.pending:
            self._writer.write(self._outgoing.read())


async def open_tls(host: str, port: int, context: ssl.SSLContext, *, server_hostname: str) -> TlsStream:
    """A TCP connection to ``host:port`` with the TLS handshake done (the caller bounds the time).

    :raises OSError: cannot connect, or the handshake failed (``ssl.SSLError``,
        ``ssl.SSLCertVerificationError``: the certificate was refused).
    """
    reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE)
    try:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
        stream = TlsStream(reader, writer, tls, incoming, outgoing)
        await stream.handshake()
    except BaseException:
        writer.close()
        raise
    return stream
