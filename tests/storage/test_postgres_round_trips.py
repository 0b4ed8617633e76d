"""What the PostgreSQL store sends for the registrar's commit, counted on the wire: a TCP proxy
between the store and a real PostgreSQL server reads the frontend protocol's messages (each
``Execute`` is a statement; each ``Sync`` or ``Flush`` is a point where the client waits for the
server: a round trip). Counts of messages, not timings."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import pytest

from provisiond.errors import ConflictError, PreconditionFailedError
from provisiond.storage import Collection, Write, WriteMode
from provisiond.storage.postgres import PostgresStore

pytestmark = pytest.mark.postgres

H, R = Collection.HUB_DEVICES, Collection.REGISTRATIONS
#: The untyped first messages: SSLRequest, GSSENCRequest (answered with one byte), then the
#: StartupMessage (protocol 3.0), after which every message starts with its type byte.
_SSL_REQUEST, _GSSENC_REQUEST, _PROTOCOL_3 = 80877103, 80877104, 196608


@contextlib.contextmanager
def _closing(writer: asyncio.StreamWriter) -> Iterator[None]:
    try:
        yield
    finally:
        writer.close()


class _Counting:
    """A proxy to ``upstream`` that counts the frontend messages of every connection by type."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.messages: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()

    async def _client_to_server(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = False
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError), _closing(writer):
            while True:
                if not started:
                    head = await reader.readexactly(8)
                    length, code = struct.unpack("!ii", head)
                    rest = await reader.readexactly(length - 8)
                    started = code not in (_SSL_REQUEST, _GSSENC_REQUEST)
                    assert not started or code == _PROTOCOL_3
                    writer.write(head + rest)
                    continue
                head = await reader.readexactly(5)
                kind, length = chr(head[0]), struct.unpack("!i", head[1:])[0]
                body = await reader.readexactly(length - 4)
                self.messages[kind] += 1
                writer.write(head + body)

    async def _server_to_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError), _closing(writer):
            while data := await reader.read(65536):
                writer.write(data)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        for coro in (self._client_to_server(reader, up_writer), self._server_to_client(up_reader, writer)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _items(n: int, mode: WriteMode, etags: tuple[str, str] | None = None) -> list[tuple[Collection, Write]]:
    hub_etag, reg_etag = etags or (None, None)
    return [
        (H, Write(f"hub.example/d{n}", b"hub", index={"hub": "hub.example"}, mode=mode, if_match=hub_etag)),
        (R, Write(f"d{n}", b"reg", index={"device_id": f"d{n}"}, mode=mode, if_match=reg_etag)),
    ]


@contextlib.asynccontextmanager
async def _counted_store(postgres_db_url: str) -> AsyncIterator[tuple[_Counting, PostgresStore]]:
    """A store with one pool connection, through a proxy that counts the protocol messages."""
    url = urlsplit(postgres_db_url)
    assert url.hostname is not None and url.port is not None
    proxy = _Counting(url.hostname, url.port)
    async with proxy.running() as port:
        store = PostgresStore(url._replace(netloc=f"{url.username}@127.0.0.1:{port}").geturl(), max_size=1)
        await store.open()
        try:
            yield proxy, store
        finally:
            await store.close()


async def _counted(proxy: _Counting, store: PostgresStore, call: object) -> Counter[str]:
    await store.schema_version()  # the pool's connection is open and idle
    proxy.messages.clear()
    assert asyncio.iscoroutine(call)
    await call
    return Counter({kind: proxy.messages[kind] for kind in "QEHS" if proxy.messages[kind]})


async def test_first_registration_commit_is_one_statement(postgres_db_url: str) -> None:
    """The registrar's first commit (identity and record, both CREATE) is one statement in one
    round trip, and so is a re-registration's (both updated on their etags); a CREATE pair over
    an existing key, or updates on a stale etag, fall back to the locking transaction and write
    nothing."""
    async with _counted_store(postgres_db_url) as (proxy, store):
        created: list[object] = []

        async def create(n: int) -> None:
            created.extend(await store.write_atomic(_items(n, WriteMode.CREATE)))

        assert await _counted(proxy, store, create(1)) == Counter({"E": 1, "S": 1})
        hub, reg = await store.get(H, "hub.example/d1"), await store.get(R, "d1")
        assert created == [hub, reg]

        assert hub is not None and reg is not None
        updated: list[object] = []

        async def update(etags: tuple[str, str]) -> None:
            updated.extend(await store.write_atomic(_items(1, WriteMode.UPDATE, etags)))

        # A re-registration: both updated on their etags, one statement too.
        assert await _counted(proxy, store, update((hub.etag, reg.etag))) == Counter({"E": 1, "S": 1})
        assert updated == [await store.get(H, "hub.example/d1"), await store.get(R, "d1")]

        # On an etag that no longer matches, the statement writes nothing, and the general
        # path (BEGIN, the advisory locks, a FOR UPDATE read per table) says why.
        with pytest.raises(PreconditionFailedError):
            await _counted(proxy, store, update((hub.etag, reg.etag)))
        assert updated == [await store.get(H, "hub.example/d1"), await store.get(R, "d1")]

        with pytest.raises(ConflictError):
            await store.write_atomic(
                [
                    (H, Write("hub.example/d2", b"new", mode=WriteMode.CREATE)),
                    *_items(1, WriteMode.CREATE)[1:],
                ]
            )
        assert await store.get(H, "hub.example/d2") is None


async def test_first_registrations_made_together_are_one_statement(postgres_db_url: str) -> None:
    """First registrations made in one turn of the event loop are written together as **one
    statement** (an INSERT of all their rows per table, its own transaction), not a statement
    each between BEGIN and COMMIT (main sent 10 Executes). Each gets its own records, as
    stored; a batch with a key that exists writes nothing, and each of its calls is then made
    alone (the one on the existing key fails, the others are written)."""
    async with _counted_store(postgres_db_url) as (proxy, store):
        results: list[object] = []

        async def create(numbers: range) -> None:
            results.extend(
                await asyncio.gather(*(store.write_atomic(_items(n, WriteMode.CREATE)) for n in numbers))
            )

        assert await _counted(proxy, store, create(range(8))) == Counter({"E": 1, "S": 1})
        for n, records in enumerate(results):
            assert records == [await store.get(H, f"hub.example/d{n}"), await store.get(R, f"d{n}")]
            assert isinstance(records, list) and records[1].index["device_id"] == f"d{n}"

        outcomes = await asyncio.gather(
            *(store.write_atomic(_items(n, WriteMode.CREATE)) for n in (20, 21, 3, 22)),
            return_exceptions=True,
        )
        assert isinstance(outcomes[2], ConflictError), outcomes
        for n, records in zip((20, 21, 22), (outcomes[0], outcomes[1], outcomes[3]), strict=True):
            assert records == [await store.get(H, f"hub.example/d{n}"), await store.get(R, f"d{n}")]


async def test_reads_of_several_tables_are_one_statement(postgres_db_url: str) -> None:
    """The registrar's two reads (its record and the individual enrollment), made with others
    in one turn, are one statement for every table (main sent one per table), and each record
    comes back whole, its index columns included (the tables have different numbers of them)."""
    E = Collection.ENROLLMENTS
    async with _counted_store(postgres_db_url) as (proxy, store):
        written = await store.write_atomic(_items(1, WriteMode.CREATE))
        enrollment = await store.write(E, "d2", b"enr", index={"device_id": "D2", "attestation_type": "tpm"})
        results: list[list[object]] = []

        async def read() -> None:
            results.extend(
                await asyncio.gather(
                    store.get_each([(R, "d1"), (E, "d1")]),
                    store.get_each([(R, "d2"), (E, "d2")]),
                    store.get_each([(H, "hub.example/d1"), (R, "nobody")]),
                )
            )

        assert await _counted(proxy, store, read()) == Counter({"E": 1, "S": 1})
        assert results == [[written[1], None], [None, enrollment], [written[0], None]]
        assert enrollment.index == {
            "device_id": "D2",
            "provisioning_status": None,
            "attestation_type": "tpm",
            "iot_hub_host_name": None,
        }


async def test_registrations_made_in_consecutive_turns_are_one_statement(postgres_db_url: str) -> None:
    """A batch of the registrar's commits waits one more turn of the event loop
    (``COMMIT_LINGER``): calls made in the turn after the first join it, so a burst of answers
    spread over two turns is still one statement (with no linger, two)."""
    async with _counted_store(postgres_db_url) as (proxy, store):
        results: list[object] = []

        async def later(n: int) -> list[object]:
            await asyncio.sleep(0)  # the next turn of the event loop
            return list(await store.write_atomic(_items(n, WriteMode.CREATE)))

        async def create() -> None:
            results.extend(
                await asyncio.gather(store.write_atomic(_items(1, WriteMode.CREATE)), later(2), later(3))
            )

        assert await _counted(proxy, store, create()) == Counter({"E": 1, "S": 1})
        for n, records in zip((1, 2, 3), results, strict=True):
            assert records == [await store.get(H, f"hub.example/d{n}"), await store.get(R, f"d{n}")]
