"""Wiring: the ASGI application and the first-start initialization of the database. No logic."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from .._cancel import stop
from ..errors import ConflictError, MethodNotAllowedError, NotFoundError, ProvisioningError, RequestError
from ..hub.addressing import ensure_builtin_hubs, first_builtin_hub
from ..models import AllocationPolicy, Right, ServiceSettings, SharedAccessPolicy
from ..storage import Collection, Store, WriteMode, open_store
from . import admin, amqp, api, device_api, hub_api, hub_ops, mqtt
from .context import SETTINGS_KEY, ServiceContext, context_of
from .enrollments import generate_key
from .front import running_front
from .gateway import AMQP_WS, MQTT_WS, DeviceGateway
from .http import (
    DirectRoutes,
    ShapedRouter,
    UnknownPaths,
    error_answer,
    handle_errors,
    lean_log_records,
    one_line_logs,
    route_table,
    shown_path,
)
from .hub_broker import HubBroker
from .hub_mqtt import HubEndpoint
from .listeners import running_listeners
from .registrar import Registrar
from .settings import Settings
from .streams import WebSocketRouter

__all__ = [
    "OWNER_POLICY",
    "WORKER_SETTINGS_ENV",
    "YOUNG_COLLECTION_THRESHOLD",
    "app_from_environment",
    "create_app",
    "initialize",
    "settle_garbage_collector",
]

WORKER_SETTINGS_ENV = "PROVISIOND_WORKER_SETTINGS"

#: Net new objects between collections of the youngest generation in a serving process
#: (:func:`settle_garbage_collector`; CPython's default is 700).
YOUNG_COLLECTION_THRESHOLD = 10_000

log = logging.getLogger("provisiond.service")

OWNER_POLICY = "provisioningserviceowner"


def _new_id_scope() -> str:
    return "0ne" + secrets.token_hex(4).upper()


async def initialize(store: Store, settings: Settings) -> ServiceSettings:
    """Make sure the database holds the service settings (ID scope), the owner policy, the
    first built-in hub and every built-in hub's policies. Safe to run on every start and from
    several nodes at once: the first writer wins and the others read what it wrote."""
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
    try:
        await store.write(
            Collection.ACCESS_POLICIES, OWNER_POLICY, msgspec.json.encode(owner), mode=WriteMode.CREATE
        )
        log.info("Created the %s %r", Collection.ACCESS_POLICIES.label, OWNER_POLICY)
    except ConflictError:
        pass
    first = await first_builtin_hub(store, explicit=settings.builtin_hub, host=settings.host)
    await ensure_builtin_hubs(store, first)
    return service_settings


async def owner_key(store: Store) -> str:
    """The primary key of the owner policy (for connection.json)."""
    record = await store.get(Collection.ACCESS_POLICIES, OWNER_POLICY)
    if record is None:
        raise NotFoundError(f"The {OWNER_POLICY} policy was deleted; connection.json cannot be written.")
    key = msgspec.json.decode(record.doc, type=SharedAccessPolicy).primary_key
    assert key is not None
    return key


async def _not_found(request: Request) -> Response:
    return error_answer(request, NotFoundError(f"No such resource: {request.method} {shown_path(request)}."))


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: ProvisioningError
    if exc.status_code == 404:
        return await _not_found(request)
    if exc.status_code == 405:
        error = MethodNotAllowedError(f"{request.method} is not allowed on {shown_path(request)}.")
    else:
        error = RequestError(str(exc.detail))
    return error_answer(request, error)


async def healthz(request: Request) -> Response:
    """Liveness: answers without touching the database (also the benchmark's trivial request)."""
    return Response(b'{"status":"ok"}', media_type="application/json")


@handle_errors
async def readyz(request: Request) -> Response:
    """Readiness: one round trip to the database; 503 + Retry-After (a DPS error body whose
    message is the database's error) while it cannot be reached."""
    await context_of(request).store.ping()
    return Response(b'{"status":"ready"}', media_type="application/json")


def create_app(
    settings: Settings, *, store: Store | None = None, clock: Callable[[], float] = time.time
) -> Starlette:
    """The ASGI app serving the service API, the admin API and the device API.

    Without ``store`` the app opens the database of ``settings`` at startup and closes it at
    shutdown (its lifespan), so every worker process has its own connections; a ``store`` given
    here must already be open and stays the caller's.
    """
    owned = store is None
    ctx = ServiceContext(
        settings=settings, store=store or open_store(settings.db_url, pool=settings.db_pool), clock=clock
    )

    registrar = Registrar(ctx)
    # The device transports: one gateway; MQTT and AMQP on their own TLS ports (the lifespan
    # starts them) and over WebSockets on this one, picked by subprotocol.
    gateway = DeviceGateway(ctx, registrar)
    # The built-in hubs: their devices share the MQTT listener and the WebSocket router (told
    # apart by the CONNECT's user name); the broker links them to the service side.
    broker = HubBroker(ctx.store, clock=clock, fallback_interval=settings.hub_signal_poll)
    hub = HubEndpoint(ctx, broker, ctx.hub_registry)
    listeners = [mqtt.tls_listener(gateway, hub), amqp.tls_listener(gateway)]
    websockets = WebSocketRouter(
        {"mqtt": mqtt.MqttEndpoint(gateway, MQTT_WS, hub), "amqpwsb10": amqp.AmqpEndpoint(gateway, AMQP_WS)}
    )

    retention = hub_ops.RetentionTask(ctx.store, settings, clock=clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if owned:
            await ctx.store.open()
        # Every node drains the outbox of remote hubs' identity writes (service/hub_writer.py).
        writer = asyncio.create_task(registrar.writer.run(), name="hub-writer")
        try:
            await broker.start()
            await hub.start()
            async with (
                running_listeners(settings, listeners),
                running_front(settings, app),
                retention.running(),
            ):
                yield
        finally:
            await hub.close()
            await broker.close()
            await stop(writer, "the hub writer")
            await registrar.writer.flush_figures(force=True)
            await registrar.hubs.aclose()
            await registrar.webhook.aclose()
            if owned:
                await ctx.store.close()

    app = Starlette(
        routes=route_table(
            [
                Route("/healthz", healthz, methods=["GET"]),
                Route("/readyz", readyz, methods=["GET"]),
                *api.routes(),
                *admin.routes(),
                *hub_ops.routes(),
                *device_api.routes(gateway),
                *hub_api.routes(extra=hub_ops.hub_api_routes()),
                WebSocketRoute("/", websockets),
                WebSocketRoute("/$iothub/websocket", websockets),
            ]
        ),
        exception_handlers={HTTPException: _http_exception},
        lifespan=lifespan,
    )
    router = app.router
    app.router = ShapedRouter(
        router.routes, redirect_slashes=router.redirect_slashes, lifespan=router.lifespan_context
    )
    # An unknown path is answered 404 without the router (the 404 of _not_found).
    app.add_middleware(UnknownPaths, routes=app.routes, not_found=_not_found)
    # The device API's requests go to their endpoints without the router's layers.
    app.add_middleware(DirectRoutes, routes=app.routes)
    app.state.ctx = ctx
    app.state.registrar = registrar
    app.state.gateway = gateway
    app.state.broker = broker
    # Who tells connected hub devices what a service API write changed: the broker.
    app.state.hub_events = broker
    return app


def app_from_environment() -> Starlette:
    """The app for a worker process: settings from ``PROVISIOND_WORKER_SETTINGS`` (JSON), which
    ``provisiond serve --workers N`` sets before it starts the workers."""
    raw = os.environ.get(WORKER_SETTINGS_ENV)
    if not raw:
        raise RuntimeError(
            f"{WORKER_SETTINGS_ENV} is not set: start workers with `provisiond serve --workers N`."
        )
    logging.basicConfig(
        level=os.environ.get("PROVISIOND_LOG_LEVEL", "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    lean_log_records()
    one_line_logs()
    app = create_app(Settings.from_json(raw))
    settle_garbage_collector()
    return app


def settle_garbage_collector() -> None:
    """Set the garbage collector up for serving, for the life of the process: ``provisiond
    serve`` calls it in each serving process once the app is built, just before it serves.

    - **What exists now is exempt from full collections** (``gc.freeze``, after a
      ``gc.collect`` so that no garbage is frozen). A full collection walks every object the
      collector tracks, and a serving process holds a few hundred thousand from its imports
      alone: under load one ran every three to four seconds and took about 20 ms, during which
      nothing was served; now about 1 ms.
    - **The youngest generation is collected after 10,000 net new objects instead of 700**
      (``gc.set_threshold``). The requests in flight hold more than 700 between them, so at
      700 it was collected every thirty or so requests (about 0.13 ms each, 4-5 µs a request); at
      10,000 it was collected once in a run of 35,000 requests: provisiond makes little cyclic
      garbage, and what it makes waits a little longer.

    Measured in docs/performance.md, "the ninth round". Objects made later (connections,
    sessions, requests) are collected as before; what is frozen and later becomes cyclic
    garbage (nothing built at start-up is meant to) would stay, which is why the tests'
    in-process apps do not call it."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)
