"""Watching a stream for other processes' appends, or a claimable collection for records
released to every claimer (:meth:`provisiond.storage.Store.watch`).

A :class:`StreamWatch` is a flag and a liveness: the backend sets the flag when another process
or node may have appended to the stream, or released a record of the collection (PostgreSQL: a
notification; the store's own releases wake it too), and says whether other processes can wake
it (``live``: PostgreSQL while its listening connection is up; SQLite never). A reader reads
after its cursor (claims what is due), then waits on the watch: woken at once when live, else
after its own poll interval. The flag stays set from the wake to the next
:meth:`StreamWatch.wait`, so a write that commits between a read and the wait that follows it
is not missed.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Collection, Stream

__all__ = ["StreamWatch", "Watches"]


class StreamWatch:
    """Wakes a reader of one stream, or a claimer of one collection (see the module docstring).
    Use from one event loop; close it when done (a closed watch is never woken again)."""

    def __init__(self, stream: Stream | Collection, owner: Watches | None = None) -> None:
        self.stream = stream
        self._owner = owner
        self._woken = asyncio.Event()
        self._live = False

    @property
    def live(self) -> bool:
        """Whether every append (release) that another process or node commits to the stream
        (collection) from now on wakes this watch. A watch wakes when this changes either way (on becoming live: the
        reader reads what was appended while it was not)."""
        return self._live

    async def wait(self, seconds: float) -> bool:
        """Wait until woken, at most ``seconds``; True when woken (since the last wait, or since
        the watch was made). A wake may find nothing new: read, then wait again."""
        if not self._woken.is_set() and seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._woken.wait()
        woken = self._woken.is_set()
        self._woken.clear()
        return woken

    def close(self) -> None:
        if self._owner is not None:
            self._owner.discard(self)
            self._owner = None
        self._live = False

    def wake(self) -> None:
        """(For the store.) Entries may have been appended (records released)."""
        self._woken.set()

    def set_live(self, live: bool) -> None:
        """(For the store.) The watch can (not) be woken by other processes now: wakes it."""
        self._live = live
        self._woken.set()


class Watches:
    """A store's open watches, by stream (collection), and which are live (a backend's helper)."""

    def __init__(self) -> None:
        self._watches: dict[Stream | Collection, set[StreamWatch]] = {}
        self._live: set[Stream | Collection] = set()

    def add(self, stream: Stream | Collection) -> StreamWatch:
        watch = StreamWatch(stream, self)
        self._watches.setdefault(stream, set()).add(watch)
        if stream in self._live:
            watch.set_live(True)
        return watch

    def discard(self, watch: StreamWatch) -> None:
        watches = self._watches.get(watch.stream)
        if watches is not None:
            watches.discard(watch)

    def wake(self, stream: Stream | Collection) -> None:
        for watch in self._watches.get(stream, ()):
            watch.wake()

    def set_live(self, streams: frozenset[Stream | Collection], live: bool) -> None:
        """Every watch of ``streams`` becomes (not) live, and is woken."""
        if live:
            self._live |= streams
        else:
            self._live -= streams
        for stream in streams:
            for watch in self._watches.get(stream, ()):
                watch.set_live(live)
