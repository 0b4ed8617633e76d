"""Rate limits on the device API, applied by the registrar for every transport (HTTPS, MQTT,
AMQP). Token buckets; each is off unless its setting is given.

* **Global** (``--rate-limit``): device API requests a second on this node (registrations,
  operation polls and status lookups), counted before attestation; it sheds load, whoever sends
  it (429002). With ``--workers N`` each worker admits its share, the rate over N: the kernel
  spreads new connections evenly over the workers, so together they admit about the node's rate.
* **Per device** (``--device-rate-limit``): requests a minute per registration id, counted only
  *after* the device attested: a stranger who merely names a registration id spends nothing of
  that device's budget, so it cannot lock the device out (429001).
* **Per source address** (``--failed-attestation-limit``): failed attestations a minute per
  source address (an IPv6 address counts as its /64 network). A source that used up its
  budget is refused before any attestation work until the budget refills (429003); requests
  that attest spend nothing of it.

The buckets live in each worker's memory, not in the database. The global limit is divided among
a node's workers (above); the per-device and per-source budgets are not, because one device's or
one source's connections may all land on one worker: with N workers a device or a source may
spend up to N times its budget. With several nodes, each node enforces its own limits. Per-device and per-source buckets are kept for the most recent keys only
(a bounded LRU), so a flood of distinct ids or addresses cannot grow memory without bound; a
forgotten bucket starts full again.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import DpsCode, ThrottledError

__all__ = ["MAX_KEYS", "RateLimiter", "source_key"]

#: Per-device and per-source buckets kept (each); the least recently used go first.
MAX_KEYS = 100_000


@dataclass(slots=True)
class _Bucket:
    rate: float  # tokens per second
    capacity: float
    tokens: float
    stamp: float

    @classmethod
    def per_minute(cls, limit: float, now: float) -> _Bucket:
        capacity = max(1.0, limit)
        return cls(limit / 60, capacity, capacity, now)

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self) -> float:
        """Seconds until a token is available (0 when one is)."""
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self, now: float) -> float:
        """Take a token; return 0 when granted, else the seconds until one is available."""
        self.refill(now)
        wait = self.wait()
        if not wait:
            self.tokens -= 1
        return wait


class _Buckets:
    """Per-key buckets of one per-minute limit, the most recent :data:`MAX_KEYS` keys only."""

    def __init__(self, per_minute: float, max_keys: int) -> None:
        self.per_minute = per_minute
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def get(self, key: str, now: float, *, create: bool) -> _Bucket | None:
        bucket = self._buckets.get(key)
        if bucket is None:
            if not create:
                return None
            bucket = _Bucket.per_minute(self.per_minute, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        bucket.refill(now)
        return bucket


def _retry_after(wait: float) -> int:
    return max(1, math.ceil(wait))


def source_key(address: str | None) -> str | None:
    """The key a source address is counted under: an IPv4 address as is, an IPv6 address as its
    /64 network (one host usually has the whole /64); ``None`` for no address."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an IP address (a Unix socket path): count it as it is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class RateLimiter:
    """``global_per_second``, ``device_per_minute`` and ``failures_per_minute`` are ``None``
    for no limit. The registrar calls :meth:`admit` first, then :meth:`attested` or
    :meth:`failed` once it knows whether the device proved its credential."""

    clock: Callable[[], float]
    global_per_second: float | None = None
    device_per_minute: float | None = None
    failures_per_minute: float | None = None
    max_keys: int = MAX_KEYS
    #: The node's worker processes: this limiter admits ``global_per_second / workers``.
    workers: int = 1
    _global: _Bucket | None = field(default=None, init=False)
    _devices: _Buckets | None = field(default=None, init=False)
    _sources: _Buckets | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.device_per_minute:
            self._devices = _Buckets(self.device_per_minute, self.max_keys)
        if self.failures_per_minute:
            self._sources = _Buckets(self.failures_per_minute, self.max_keys)

    def admit(self, source: str | None) -> None:
        """Before any attestation work: refuse a source that spent its budget of failed
        attestations (:meth:`check_source`), and count the request against the node's limit.

        :raises ThrottledError: 429003 (the source) or 429002 (the node), with ``retry_after``.
        """
        self.check_source(source)
        now = self.clock()
        if self.global_per_second:
            if self._global is None:
                share = self.global_per_second / self.workers
                # A burst of one second's share, and at least one request (else a share under
                # one a second would never admit any).
                capacity = max(1.0, share)
                self._global = _Bucket(share, capacity, capacity, now)
            wait = self._global.take(now)
            if wait:
                raise ThrottledError(
                    f"The service is over its limit of {self.global_per_second:g} device requests a second.",
                    retry_after=_retry_after(wait),
                    error_code=DpsCode.NODE_RATE_LIMIT,
                )

    def check_source(self, source: str | None) -> None:
        """Refuse a source that spent its budget of failed attestations (spends nothing).

        :raises ThrottledError: 429003, with ``retry_after``.
        """
        if self._sources is None:
            return  # no limit on failed attestations (the default): nothing to look up
        key = source_key(source)
        if key is None:
            return
        bucket = self._sources.get(key, self.clock(), create=False)
        wait = bucket.wait() if bucket is not None else 0.0
        if wait:
            raise ThrottledError(
                f"Too many failed attestations from {source}: over the limit of "
                f"{self._sources.per_minute:g} a minute per source address.",
                retry_after=_retry_after(wait),
                error_code=DpsCode.FAILED_ATTESTATION_LIMIT,
            )

    def attested(self, registration_id: str) -> None:
        """Count one request of a device that proved its credential.

        :raises ThrottledError: 429001, the device is over its per-device limit.
        """
        if self._devices is None:
            return
        bucket = self._devices.get(registration_id.lower(), self.clock(), create=True)
        assert bucket is not None
        wait = bucket.take(bucket.stamp)
        if wait:
            raise ThrottledError(
                f"{registration_id!r} is over the per-device limit of {self._devices.per_minute:g} "
                "requests a minute.",
                retry_after=_retry_after(wait),
                error_code=DpsCode.DEVICE_RATE_LIMIT,
            )

    def failed(self, source: str | None) -> None:
        """Count one failed attestation against ``source``'s budget."""
        if self._sources is None:
            return  # no limit on failed attestations (the default): nothing to look up
        key = source_key(source)
        if key is None:
            return
        bucket = self._sources.get(key, self.clock(), create=True)
        assert bucket is not None
        bucket.take(bucket.stamp)
