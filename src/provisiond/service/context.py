"""What every request handler needs: the store, the settings, the clock, and the small helpers
that turn a request into an authorized, validated call. Holds no state of its own: everything
it knows lives in the database, so several service nodes can share one."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from ..errors import NotFoundError
from ..hub.registry import HubRegistry
from ..models import AttestationType, EnrollmentGroup, LinkedHub, Right, ServiceSettings
from ..storage import Collection, Record, Store
from .auth import authorize
from .http import read_body, require_api_version
from .management import SETTINGS_KEY, Management, read_linked_hubs, read_service_settings
from .settings import Settings
from .sources import read_groups
from .throttle import RateLimiter

__all__ = ["SETTINGS_KEY", "ServiceContext", "context_of"]


@dataclass
class ServiceContext:
    settings: Settings
    store: Store
    clock: Callable[[], float] = field(default=time.time)
    # A short-lived copy of the rarely written settings, linked hubs and enrollment groups, for
    # the registration path only (``max_age``); never the source of truth (see ``invalidate``).
    _cache: dict[str, tuple[float, Any]] = field(default_factory=dict, repr=False)
    # Bumped by ``invalidate``: a copy read across an invalidation is not kept.
    _generation: int = field(default=0, repr=False)
    #: The device API's rate limits in this worker, one for every transport (HTTPS, MQTT, AMQP).
    limiter: RateLimiter = field(init=False, repr=False)
    #: The management operations (service and admin API, a console), over the same store.
    management: Management = field(init=False, repr=False)
    #: The built-in hubs' identities and twins (the hub's service API and device side).
    hub_registry: HubRegistry = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.management = Management(
            self.store, builtin_hub=self.settings.first_builtin_hub, invalidate=self.invalidate
        )
        self.hub_registry = HubRegistry(self.store, clock=self.clock)
        self.limiter = RateLimiter(
            clock=self.clock,
            global_per_second=self.settings.rate_limit,
            device_per_minute=self.settings.device_rate_limit,
            failures_per_minute=self.settings.failed_attestation_limit,
            workers=self.settings.workers,
        )

    def invalidate(self) -> None:
        """Forget cached settings, hubs and groups (after an admin or group write on this node;
        other nodes and workers see the change within ``max_age``)."""
        self._cache.clear()
        self._generation += 1

    def _cached(self, key: str, max_age: float) -> Any:
        if max_age <= 0:
            return None
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < max_age:
            return hit[1]
        return None

    def _keep(self, key: str, value: Any, generation: int) -> None:
        """Cache ``value``, read since ``generation``, unless an invalidation came in between."""
        if generation == self._generation:
            self._cache[key] = (time.monotonic(), value)

    async def authorize(self, request: Request, right: Right) -> None:
        """Check api-version and the SAS token for ``right`` (raises the DPS error)."""
        require_api_version(request)
        await authorize(
            self.store,
            request.headers.get("authorization"),
            right,
            host_names=self.settings.host_names,
            path=request.url.path,
            now=int(self.clock()),
            clock_skew=self.settings.clock_skew,
        )

    async def body(self, request: Request) -> bytes:
        return await read_body(request, self.settings.max_body_bytes)

    async def service_settings(self, *, max_age: float = 0) -> ServiceSettings:
        """The service settings; ``max_age`` > 0 accepts a copy read that many seconds ago."""
        cached: ServiceSettings | None = self._cached(SETTINGS_KEY, max_age)
        if cached is not None:
            return cached
        generation = self._generation
        settings = await read_service_settings(self.store)
        self._keep(SETTINGS_KEY, settings, generation)
        return settings

    async def linked_hubs(self, *, max_age: float = 0) -> dict[str, LinkedHub]:
        """Every linked hub, keyed by lower-cased host name (``max_age``: as for settings)."""
        cached: dict[str, LinkedHub] | None = self._cached("linked_hubs", max_age)
        if cached is not None:
            return cached
        generation = self._generation
        hubs = await read_linked_hubs(self.store)
        self._keep("linked_hubs", hubs, generation)
        return hubs

    async def enrollment_groups(
        self, attestation: AttestationType, *, max_age: float = 0
    ) -> list[EnrollmentGroup]:
        """Every enrollment group of one attestation type, in id order (``max_age``: as for
        settings). The list is shared with other requests: callers copy it to reorder it."""
        key = f"groups:{attestation.value}"
        cached: list[EnrollmentGroup] | None = self._cached(key, max_age)
        if cached is not None:
            return cached
        generation = self._generation
        groups = await read_groups(self.store, attestation)
        self._keep(key, groups, generation)
        return groups

    async def builtin_hubs(self, *, max_age: float = 0) -> list[str]:
        """The host names of the built-in hubs (lower-cased), the first one first (``max_age``:
        as for :meth:`linked_hubs`)."""
        first = self.settings.first_builtin_hub
        names = [name for name, hub in (await self.linked_hubs(max_age=max_age)).items() if hub.builtin]
        return sorted(names, key=lambda name: (name != first, name))

    async def get_or_404(self, collection: Collection, id: str, code: int) -> Record:
        record = await self.store.get(collection, id)
        if record is None:
            raise NotFoundError(f"No {collection.label} is named {id[:140]!r}.", error_code=code)
        return record


def context_of(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx
