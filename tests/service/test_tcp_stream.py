"""The TLS listeners' :class:`~provisiond.service.streams.TcpStream` (what the MQTT and AMQP
session loops read and write), over real TLS on loopback: bytes arrive whole and in order
whatever the reads, reading stops while too much is unread and starts again once it is taken,
the peer's end reads as ``b""``, a write to a peer that is gone fails with StreamClosed."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from provisiond import pki
from provisiond.service.settings import ConnectionLimits
from provisiond.service.streams import ByteStream, StreamClosed, serve_tls
from provisiond.tls import server_context


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> pki.ServerTlsFiles:
    return pki.ensure_dev_pki(Path(tmp_path_factory.mktemp("stream")) / "data")


async def _serving(
    files: pki.ServerTlsFiles, handler: Callable[[ByteStream], Awaitable[None]]
) -> tuple[asyncio.Server, ssl.SSLContext]:
    server = await serve_tls(
        handler,
        host="127.0.0.1",
        port=0,
        ssl_context=server_context(files.cert_file, files.key_file),
        name="test",
        limits=ConnectionLimits(),
        first_request="bytes",
    )
    client = ssl.create_default_context(cafile=files.ca_file)
    return server, client


def _run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_bytes_sent_while_the_session_does_not_read_arrive_whole_and_reading_resumes(
    files: pki.ServerTlsFiles,
) -> None:
    sent = bytes(range(256)) * 2000  # 512,000 bytes: more than the stream holds unread
    got = bytearray()
    paused: list[bool] = []

    async def handler(stream: ByteStream) -> None:
        transport = stream._transport  # type: ignore[attr-defined]
        while transport.is_reading():  # noqa: ASYNC110 (no event says it): until the unread bytes stop it
            await asyncio.sleep(0.01)
        paused.append(True)
        while len(got) < len(sent):
            data = await stream.receive(65536)
            assert 0 < len(data) <= 65536
            got.extend(data)
        paused.append(not transport.is_reading())
        await stream.send(b"done")
        assert await stream.receive() == b""  # the peer's end

    async def main() -> None:
        server, context = await _serving(files, handler)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost"
        )
        writer.write(sent)
        await writer.drain()
        assert await reader.readexactly(4) == b"done"
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    _run(main())
    assert bytes(got) == sent
    assert paused == [True, False]


def test_a_write_to_a_peer_that_is_gone_fails_with_stream_closed(files: pki.ServerTlsFiles) -> None:
    outcome: list[str] = []
    greeted, gone, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def handler(stream: ByteStream) -> None:
        try:
            assert await stream.receive() == b"hello"
            greeted.set()
            await gone.wait()
            for _ in range(100):  # the reset is seen by the first write or one soon after
                await stream.send(b"x" * 1024)
                await asyncio.sleep(0.01)
        except StreamClosed:
            outcome.append("closed")
            outcome.append(repr(await stream.receive()))  # and reads end
        finally:
            done.set()

    async def main() -> None:
        server, context = await _serving(files, handler)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
        writer.write(b"hello")
        await writer.drain()
        await greeted.wait()
        writer.transport.abort()  # a reset, no TLS close
        await asyncio.sleep(0.1)
        gone.set()
        await done.wait()
        server.close()
        await server.wait_closed()

    _run(main())
    assert outcome == ["closed", "b''"]
