"""The built-in hubs' telemetry, read side: where a reader starts, what it reads, and the
stream's bounds.

The device side appends each acknowledged telemetry message to ``Stream.HUB_EVENTS``
(partition ``{hub}/{deviceId}``, a :class:`~provisiond.hub.messages.TelemetryEvent`) before it
sends the PUBACK. Readers (``GET /admin/linkedHubs/{hub}/events``, ``provisiond hub
monitor-events``) follow the stream with a seq cursor (:meth:`EventLog.read`): the store's
seqs only grow in commit order, so a reader that resumes after the last seq it saw misses
nothing that is still kept and sees nothing twice.

The stream is bounded (:class:`Retention`): every node trims it periodically by age and by
count (:meth:`EventLog.trim`, run by :class:`provisiond.service.hub_ops.RetentionTask`), so
that a hub nobody reads does not fill the disk. A reader that falls behind the trim simply
continues with the oldest entry kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from ..errors import RequestError
from ..storage import Store, Stream, utc_iso
from .messages import TelemetryEvent, decode_event, partition

__all__ = ["EventLog", "Retention", "StoredEvent", "parse_enqueued_time"]

log = logging.getLogger("provisiond.hub")

#: Entries one :meth:`EventLog.read` looks at, at most (a hub-wide read skips other hubs' entries).
READ_BATCH = 500


@dataclass(frozen=True, slots=True)
class Retention:
    """How long and how many telemetry events the built-in hubs keep (every hub together)."""

    #: Seconds an event is kept after it was stored.
    max_age: float
    #: Events kept at most; the oldest go first.
    max_count: int


class StoredEvent(TelemetryEvent, frozen=True, kw_only=True):
    """A telemetry event with its place in the stream (the NDJSON line of the events endpoint:
    the body is base64)."""

    seq: int


def parse_enqueued_time(text: str, *, field: str = "enqueuedTime") -> str:
    """A reader's start time as the store writes times (ISO 8601 UTC, microseconds, ``Z``).
    Accepts ISO 8601 (a time without an offset is UTC) and Unix time in milliseconds, as
    ``az iot hub monitor-events --enqueued-time`` does.

    :raises RequestError: neither.
    """
    value = text.strip()
    try:
        if value.isdigit():
            return utc_iso(int(value) / 1000)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        raise RequestError(
            f"{field} {text[:64]!r} is neither an ISO 8601 time nor Unix time in milliseconds."
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class EventLog:
    """The telemetry stream of the built-in hubs, over the store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def start(self, *, enqueued_from: str | None = None) -> int:
        """The cursor of a reader that wants what is appended from now on, or (with
        ``enqueued_from``, a time as :func:`parse_enqueued_time` gives it) what was stored from
        that time on and later."""
        return await self._store.last_seq(Stream.HUB_EVENTS, before=enqueued_from)

    async def read(
        self, hub: str, *, after: int, device_id: str | None = None, limit: int = 100
    ) -> tuple[list[StoredEvent], int]:
        """At most ``limit`` events of ``hub`` (of one device with ``device_id``) after the
        cursor ``after``, and the cursor to read on from (past every entry looked at, also
        those of other hubs). An entry that does not decode is skipped with a log line."""
        limit = max(1, limit)
        if device_id is not None:
            entries = await self._store.read(
                Stream.HUB_EVENTS, after=after, partition=partition(hub, device_id), limit=limit
            )
        else:
            entries = await self._store.read(Stream.HUB_EVENTS, after=after, limit=max(limit, READ_BATCH))
        prefix = hub.lower() + "/"
        events: list[StoredEvent] = []
        cursor = after
        for entry in entries:
            if len(events) == limit:
                break
            cursor = entry.seq
            if not entry.partition.startswith(prefix):
                continue
            try:
                event = decode_event(entry.doc)
            except msgspec.DecodeError as exc:
                log.warning("Telemetry entry %d of %s does not decode: %s", entry.seq, entry.partition, exc)
                continue
            events.append(StoredEvent(seq=entry.seq, **msgspec.structs.asdict(event)))
        return events, cursor

    async def trim(self, retention: Retention, *, now: float) -> int:
        """Drop the events older than ``retention.max_age`` and all but the newest
        ``retention.max_count``; return how many went."""
        return await self._store.trim(
            Stream.HUB_EVENTS, keep=retention.max_count, before=utc_iso(now - retention.max_age)
        )
