"""Wiring: the ASGI application and the first-start initialization of the database. No logic."""

from __future__ import annotations

import logging
import secrets

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ..errors import ConflictError, MethodNotAllowedError, NotFoundError, ProvisioningError, RequestError
from ..models import AllocationPolicy, LinkedHub, Right, ServiceSettings, SharedAccessPolicy
from ..storage import Collection, Store, WriteMode
from . import admin, api, device_api
from .context import SETTINGS_KEY, ServiceContext
from .enrollments import generate_key
from .http import error_response, tracking_id
from .registrar import Registrar
from .settings import Settings
from .throttle import RateLimiter

__all__ = ["OWNER_POLICY", "create_app", "initialize"]

log = logging.getLogger("provisiond.service")

OWNER_POLICY = "provisioningserviceowner"


def _new_id_scope() -> str:
    return "0ne" + secrets.token_hex(4).upper()


async def initialize(store: Store, settings: Settings) -> ServiceSettings:
    """Make sure the database holds the service settings (ID scope), the owner policy and the
    built-in hub. Safe to run on every start and from several nodes at once: the first writer
    wins and the others read what it wrote."""
    proposal = ServiceSettings(
        id_scope=_new_id_scope(),
        allocation_policy=AllocationPolicy.HASHED,
        service_operations_host_name=settings.host,
        device_provisioning_host_name=settings.host,
    )
    raw = await store.setting_setdefault(SETTINGS_KEY, msgspec.json.encode(proposal).decode())
    service_settings = msgspec.json.decode(raw, type=ServiceSettings)
    owner = SharedAccessPolicy(
        key_name=OWNER_POLICY, rights=list(Right), primary_key=generate_key(), secondary_key=generate_key()
    )
    hub = LinkedHub(
        host_name=settings.builtin_hub, builtin=True, allocation_weight=1, apply_allocation_policy=True
    )
    for collection, id, doc in (
        (Collection.ACCESS_POLICIES, OWNER_POLICY, owner),
        (Collection.LINKED_HUBS, settings.builtin_hub, hub),
    ):
        try:
            await store.write(collection, id, msgspec.json.encode(doc), mode=WriteMode.CREATE)
            log.info("Created the %s %r", collection.label, id)
        except ConflictError:
            pass
    return service_settings


async def owner_key(store: Store) -> str:
    """The primary key of the owner policy (for connection.json)."""
    record = await store.get(Collection.ACCESS_POLICIES, OWNER_POLICY)
    if record is None:
        raise NotFoundError(f"The {OWNER_POLICY} policy was deleted; connection.json cannot be written.")
    key = msgspec.json.decode(record.doc, type=SharedAccessPolicy).primary_key
    assert key is not None
    return key


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: ProvisioningError
    if exc.status_code == 404:
        error = NotFoundError(f"No such resource: {request.method} {request.url.path[:200]}.")
    elif exc.status_code == 405:
        error = MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path[:200]}.")
    else:
        error = RequestError(str(exc.detail))
    return error_response(error, tracking_id(request))


def create_app(ctx: ServiceContext) -> Starlette:
    """The ASGI app serving the service API, the admin API and the device API."""
    app = Starlette(
        routes=[*api.routes(), *admin.routes(), *device_api.routes()],
        exception_handlers={HTTPException: _http_exception},
    )
    app.state.ctx = ctx
    app.state.registrar = Registrar(ctx)
    app.state.limiter = RateLimiter(
        clock=ctx.clock,
        global_per_second=ctx.settings.rate_limit,
        device_per_minute=ctx.settings.device_rate_limit,
    )
    return app
