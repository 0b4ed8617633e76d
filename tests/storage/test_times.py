"""The store's timestamps: ``utc_iso`` formats the date and time once per second and must give
exactly what ``datetime.fromtimestamp(...).strftime`` gives, rounding included."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from provisiond.storage.base import utc_iso, utc_now


def reference(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_utc_iso_formats_as_datetime_does() -> None:
    rng = random.Random(13)
    edge = [0.0, 1.5, -1.25, -0.0000004, 1e9 + 0.9999996, 1733356800.000001, 3218574638.3329434]
    values = edge + [rng.uniform(-1e9, 4e9) for _ in range(50_000)]
    # in order and shuffled: the cached second must not leak into the next value
    values += sorted(rng.uniform(1.7e9, 1.7e9 + 5) for _ in range(5_000))
    for seconds in values:
        assert utc_iso(seconds) == reference(seconds), seconds


def test_utc_now_is_now() -> None:
    before = datetime.now(UTC)
    now = datetime.strptime(utc_now(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before <= now <= datetime.now(UTC)
