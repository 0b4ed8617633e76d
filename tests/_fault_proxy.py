"""A TCP proxy with faults, for the hub writer's tests: it forwards connections to a hub (TLS
passes through untouched) and can cut them where a flaky network would: after the request has
reached the hub but before its answer comes back (the write happened, the writer never hears
of it), or as soon as a connection opens.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

__all__ = ["FaultProxy", "fault_proxy"]


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        #: Answers to drop: the connection is aborted when the hub's next answer arrives.
        self.drop_answers = 0
        #: New connections to abort at once.
        self.refuse_connections = 0
        self.dropped = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._lock = threading.Lock()

    def _take(self, name: str) -> bool:
        with self._lock:
            left: int = getattr(self, name)
            if left <= 0:
                return False
            setattr(self, name, left - 1)
            self.dropped += 1
            return True

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        counts: list[int],
        side: int,
        client: asyncio.StreamWriter,
    ) -> None:
        """Copy one direction; ``counts`` are the chunks each side has sent on this connection
        (0: the client, 1: the hub). An answer is the hub's data once the TLS handshake is over
        (the hub sent its flight and the client has sent its Finished and a request)."""
        try:
            while data := await reader.read(65536):
                counts[side] += 1
                if side == 1 and counts[0] >= 3 and counts[1] >= 2 and self._take("drop_answers"):
                    client.transport.abort()
                    writer.transport.abort()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._take("refuse_connections"):
            client_writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_writer.transport.abort()
            return
        counts = [0, 0]
        await asyncio.gather(
            self._pipe(client_reader, up_writer, counts=counts, side=0, client=client_writer),
            self._pipe(up_reader, client_writer, counts=counts, side=1, client=client_writer),
        )

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)

            async def serve() -> None:
                self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
                self.port = self._server.sockets[0].getsockname()[1]
                ready.set()

            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "the fault proxy did not start"

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(close(), self._loop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture
def fault_proxy(hub_peer_server: object) -> Iterator[FaultProxy]:
    """A proxy in front of the module's stand-in hub."""
    from tests._hub_standin import HubPeer

    assert isinstance(hub_peer_server, HubPeer)
    proxy = FaultProxy(hub_peer_server.port)
    proxy.start()
    yield proxy
    proxy.stop()
