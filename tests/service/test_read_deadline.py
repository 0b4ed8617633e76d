"""The session loops' read deadline (service/_deadline.py), on a real event loop over an
in-memory stream: the sessions' own deadline tests over TLS are in test_mqtt_endpoint.py and
test_connection_deadlines.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from provisiond.service._deadline import ReadDeadline
from provisiond.service.guard import NO_GUARD


class _Stream:
    """Bytes put in by the test, read by the deadline's receive."""

    client_chain: list[bytes] = []
    peer = "test"
    guard = NO_GUARD
    address = None

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.queue.get()

    async def send(self, data: bytes) -> None:
        pass

    async def close(self) -> None:
        pass


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_bytes_before_the_deadline_are_returned() -> None:
    async def main() -> bytes | None:
        stream, deadline = _Stream(), ReadDeadline()
        stream.queue.put_nowait(b"abc")
        try:
            return await deadline.receive(stream, 10, time.monotonic() + 5)
        finally:
            deadline.close()

    assert _run(main()) == b"abc"


def test_a_passed_deadline_returns_none_and_the_task_is_not_left_cancelled() -> None:
    async def main() -> tuple[bytes | None, int, bytes | None]:
        stream, deadline = _Stream(), ReadDeadline()
        try:
            lapsed = await deadline.receive(stream, 10, time.monotonic() + 0.05)
            task = asyncio.current_task()
            assert task is not None
            stream.queue.put_nowait(b"later")
            after = await deadline.receive(stream, 10, None)  # the loop goes on reading
            return lapsed, task.cancelling(), after
        finally:
            deadline.close()

    assert _run(main()) == (None, 0, b"later")


def test_a_deadline_moved_later_is_not_cut_short_by_the_earlier_timer() -> None:
    async def main() -> list[bytes | None]:
        stream, deadline = _Stream(), ReadDeadline()
        loop = asyncio.get_running_loop()
        got = []
        try:
            stream.queue.put_nowait(b"first")
            got.append(await deadline.receive(stream, 10, time.monotonic() + 0.1))  # the timer: at 0.1 s
            loop.call_later(0.3, stream.queue.put_nowait, b"second")
            # the deadline moved to 1.5 s: the timer fires at 0.1 s, sees it, and waits on
            got.append(await deadline.receive(stream, 10, time.monotonic() + 1.5))
        finally:
            deadline.close()
        return got

    assert _run(main()) == [b"first", b"second"]


def test_a_deadline_moved_earlier_rearms_the_timer() -> None:
    async def main() -> bytes | None:
        stream, deadline = _Stream(), ReadDeadline()
        stream.queue.put_nowait(b"first")
        try:
            await deadline.receive(stream, 10, time.monotonic() + 60)
            return await deadline.receive(stream, 10, time.monotonic() + 0.05)
        finally:
            deadline.close()

    assert _run(main()) is None


def test_a_cancellation_from_outside_is_not_taken_for_the_deadline() -> None:
    async def reader(stream: _Stream) -> bytes | None:
        deadline = ReadDeadline()
        try:
            return await deadline.receive(stream, 10, time.monotonic() + 60)
        finally:
            deadline.close()

    async def main() -> None:
        task = asyncio.create_task(reader(_Stream()))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    _run(main())


def test_no_timer_is_left_after_close() -> None:
    async def main() -> None:
        stream, deadline = _Stream(), ReadDeadline()
        stream.queue.put_nowait(b"x")
        await deadline.receive(stream, 10, time.monotonic() + 0.05)
        deadline.close()
        await asyncio.sleep(0.1)  # a timer left armed would cancel this sleep

    _run(main())


def test_a_stream_that_swallows_the_cancellation_leaves_the_task_uncancelled() -> None:
    # A stream whose read ends on cancellation instead of raising it (as a read that turns an
    # error into b"" might): the deadline's cancellation must not stay pending on the task.
    class _Swallowing(_Stream):
        async def receive(self, max_bytes: int = 65536) -> bytes:
            try:
                return await super().receive(max_bytes)
            except asyncio.CancelledError:
                return b""

    async def main() -> tuple[bytes | None, int]:
        stream, deadline = _Swallowing(), ReadDeadline()
        try:
            got = await deadline.receive(stream, 10, time.monotonic() + 0.05)
            task = asyncio.current_task()
            assert task is not None
            await asyncio.sleep(0.01)  # a cancellation left pending would land here
            return got, task.cancelling()
        finally:
            deadline.close()

    assert _run(main()) == (b"", 0)
