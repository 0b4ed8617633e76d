"""Rate limits on the device API: a global one (registrations per second on this node) and a
per-device one (requests per minute per registration id). Token buckets; off by default.

The buckets live in the node's memory, not in the database: with several nodes each enforces
its own share (set the global limit per node). Per-device buckets are kept for the most
recent devices only (a bounded LRU), so a flood of distinct ids cannot grow memory unbounded.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ThrottledError

__all__ = ["RateLimiter"]

_MAX_DEVICES = 100_000


@dataclass
class _Bucket:
    rate: float  # tokens per second
    capacity: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """Take a token; return 0 when granted, else the seconds until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class RateLimiter:
    """``global_per_second`` and ``device_per_minute`` are ``None`` for no limit."""

    clock: Callable[[], float]
    global_per_second: float | None = None
    device_per_minute: float | None = None
    _global: _Bucket | None = field(default=None, init=False)
    _devices: OrderedDict[str, _Bucket] = field(default_factory=OrderedDict, init=False)

    def check(self, registration_id: str) -> None:
        """Count one request of ``registration_id``.

        :raises ThrottledError: over a limit; ``retry_after`` says when to come back.
        """
        now = self.clock()
        if self.device_per_minute:
            key = registration_id.lower()
            bucket = self._devices.pop(key, None)
            if bucket is None:
                rate = self.device_per_minute / 60
                bucket = _Bucket(
                    rate, max(1.0, self.device_per_minute), max(1.0, self.device_per_minute), now
                )
            self._devices[key] = bucket
            if len(self._devices) > _MAX_DEVICES:
                self._devices.popitem(last=False)
            wait = bucket.take(now)
            if wait:
                raise ThrottledError(
                    f"{registration_id!r} is over the per-device limit of {self.device_per_minute:g} requests a minute.",
                    retry_after=max(1, math.ceil(wait)),
                    error_code=429001,
                )
        if self.global_per_second:
            if self._global is None:
                self._global = _Bucket(
                    self.global_per_second, self.global_per_second, self.global_per_second, now
                )
            wait = self._global.take(now)
            if wait:
                raise ThrottledError(
                    f"The service is over its limit of {self.global_per_second:g} registrations a second.",
                    retry_after=max(1, math.ceil(wait)),
                    error_code=429002,
                )
