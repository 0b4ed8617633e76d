"""A session loop's read deadline, kept with one timer instead of one per read.

The MQTT and AMQP session loops wait for the device's next bytes until a deadline their
protocol machine computes (the CONNECT or open timeout, then keep-alive or idle), and the
deadline moves later with almost every packet. ``asyncio.timeout`` around each read arms and
cancels a timer every time (about 4 µs of a read's 6 in process, four or five reads per
registration). :class:`ReadDeadline` keeps one timer for the session: it is re-armed only when
the deadline moves earlier than the timer, or when the timer fires before the deadline that is
current by then. When it fires on time while the loop waits in :meth:`ReadDeadline.receive`,
the read is cancelled (as ``asyncio.timeout`` would cancel it: the bytes stay in the stream's
buffer) and :meth:`~ReadDeadline.receive` returns None.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from .streams import ByteStream

__all__ = ["ReadDeadline"]


class ReadDeadline:
    """The read deadline of the session loop running in the current task."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "a ReadDeadline belongs to the task that reads"
        self._task = task
        self._due: float | None = None  # the current deadline (clock seconds)
        self._timer: asyncio.TimerHandle | None = None
        self._armed: float | None = None  # when the timer fires (clock seconds)
        self._waiting = False
        self._fired = False
        self._cancelling = 0  # the task's cancellation requests before the timer's own

    async def receive(self, stream: ByteStream, max_bytes: int, due: float | None) -> bytes | None:
        """The stream's next bytes (``b""``: the peer closed), or None when ``due`` (clock
        seconds; None: no deadline) passed first."""
        self._due = due
        if due is not None and (self._armed is None or due < self._armed):
            self._arm(due)
        self._waiting = True
        try:
            return await stream.receive(max_bytes)
        except asyncio.CancelledError:
            if self._fired:
                self._fired = False
                if self._task.uncancel() <= self._cancelling:
                    return None  # our cancellation alone
            raise  # cancelled from outside too (a shutdown): that wins
        finally:
            self._waiting = False
            if self._fired:
                # Our cancellation met a read that ended otherwise (a stream that turned it
                # into b"", say): it must not stay pending on the task.
                self._fired = False
                self._task.uncancel()

    def close(self) -> None:
        """Stop the timer (the session is over)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._armed = self._due = None

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = due
        self._timer = self._loop.call_at(self._loop.time() + (due - self._clock()), self._fire)

    def _fire(self) -> None:
        self._timer = self._armed = None
        due = self._due
        if due is None or not self._waiting:
            return  # the next read arms it again if it has a deadline
        if self._clock() < due:
            self._arm(due)  # the deadline moved on since the timer was armed
            return
        self._fired = True
        self._cancelling = self._task.cancelling()
        self._task.cancel()
