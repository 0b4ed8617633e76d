"""The built-in hubs' operations that are not the registry: reading telemetry, sending
cloud-to-device messages, and keeping both streams bounded. Adapters over
:mod:`provisiond.hub.events` and :mod:`provisiond.hub.c2d`; authorized like the admin API.

| Verb | Path | What |
|---|---|---|
| GET | /admin/linkedHubs/{hub}/events | telemetry as NDJSON, long-lived (``after``, ``enqueuedTime``, ``deviceId``, ``timeout``) |
| POST | /admin/linkedHubs/{hub}/devices/{deviceId}/messages/deviceBound | queue a cloud-to-device message (the body; ``iothub-*`` headers) |
| POST | /admin/linkedHubs/{hub}/devices/{deviceId}/methods | invoke a direct method (IoT Hub's body and answer: :mod:`provisiond.hub.methods`) |
| POST | /twins/{deviceId}/methods | the same on the hub's REST API, as the service SDKs call it (:func:`hub_api_routes`) |

**The events stream.** One JSON document a line: an event (``seq``, ``deviceId``,
``moduleId``, ``enqueuedTime``, ``properties``, ``systemProperties``, ``body`` in base64), or a
cursor line ``{"cursor": N}``, sent first and whenever the stream has been quiet for
:data:`CURSOR_EVERY` seconds. A client that reconnects with ``after`` = the last ``seq`` or
``cursor`` it read misses nothing still kept and sees nothing twice. Without ``after`` the
stream starts at ``enqueuedTime`` (ISO 8601 or Unix milliseconds), else at its end (what
arrives from now on). ``timeout`` (seconds) ends the stream after that long without an event.

**Sending.** The request body is the message body; the message's fields come in headers, as on
IoT Hub's HTTPS messaging API: ``iothub-messageid``, ``iothub-correlationid``,
``iothub-userid``, ``iothub-ack``, ``iothub-expiry`` (an absolute time, ISO 8601 or Unix
milliseconds), ``iothub-contenttype``, ``iothub-contentencoding``, and one
``iothub-app-{name}`` header per application property. The answer is the queued message
(``messageId``, ``expiryTimeUtc``, ``enqueuedTime``, ``ack``) and the device's ``queueDepth``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .._cancel import raise_if_cancelling, stop
from ..errors import ProvisioningError, RequestError
from ..hub.c2d import MAX_MESSAGE_BYTES, CloudToDeviceRequest, enqueue, purge_expired
from ..hub.events import EventLog, Retention, parse_enqueued_time
from ..hub.methods import MAX_REQUEST_BYTES, MethodBroker, invoke
from ..hub.policies import HubRight
from ..models import Right
from ..storage import Store, Stream
from .context import ServiceContext, context_of
from .http import handle_errors, json_response, read_body
from .hub_api import authorized, hub_error_response
from .settings import Settings

__all__ = ["CURSOR_EVERY", "POLL_INTERVAL", "RetentionTask", "routes"]

log = logging.getLogger("provisiond.hub")

#: Seconds between two looks at the store while a stream has nothing new.
POLL_INTERVAL = 0.2
#: Seconds of quiet after which a stream sends a cursor line (also how a client learns the
#: connection is alive).
CURSOR_EVERY = 10.0
#: Events one look at the store sends, at most.
_BATCH = 200
_encoder = msgspec.json.Encoder()


async def _builtin_hub(ctx: ServiceContext, name: str) -> str:
    """The host name of the built-in hub ``name``. :raises NotFoundError: 404204.
    :raises RequestError: a linked hub provisiond does not keep itself."""
    hub = await ctx.management.hubs.get(name)
    if not hub.builtin:
        raise RequestError(f"{name!r} is not a built-in hub: its telemetry and messages are its own.")
    return hub.host_name


def _int_param(request: Request, name: str) -> int | None:
    text = request.query_params.get(name)
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise RequestError(f"{name} must be an integer, not {text[:40]!r}.") from None
    if value < 0:
        raise RequestError(f"{name} must not be negative.")
    return value


# --- telemetry -------------------------------------------------------------------------------------


async def _follow(
    events: EventLog,
    hub: str,
    *,
    cursor: int,
    device_id: str | None,
    quiet_limit: float | None,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[bytes]:
    yield _encoder.encode({"cursor": cursor}) + b"\n"
    last_event = last_line = clock()
    while quiet_limit is None or clock() - last_event < quiet_limit:
        batch, cursor = await events.read(hub, after=cursor, device_id=device_id, limit=_BATCH)
        if batch:
            yield b"".join(_encoder.encode(event) + b"\n" for event in batch)
            last_event = last_line = clock()
            continue
        if clock() - last_line >= CURSOR_EVERY:
            yield _encoder.encode({"cursor": cursor}) + b"\n"
            last_line = clock()
        await asyncio.sleep(POLL_INTERVAL)
    yield _encoder.encode({"cursor": cursor}) + b"\n"


@handle_errors
async def stream_events(request: Request) -> Response:
    """Telemetry of a built-in hub as NDJSON (module docstring)."""
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    hub = await _builtin_hub(ctx, request.path_params["name"])
    events = EventLog(ctx.store)
    after = _int_param(request, "after")
    timeout = _int_param(request, "timeout")
    device_id = request.query_params.get("deviceId") or None
    if after is None:
        enqueued = request.query_params.get("enqueuedTime")
        after = await events.start(enqueued_from=parse_enqueued_time(enqueued) if enqueued else None)
    lines = _follow(events, hub, cursor=after, device_id=device_id, quiet_limit=timeout or None)
    return StreamingResponse(lines, media_type="application/x-ndjson", headers={"Cache-Control": "no-store"})


# --- cloud-to-device ----------------------------------------------------------------------------

_HEADERS = {
    "iothub-messageid": "message_id",
    "iothub-correlationid": "correlation_id",
    "iothub-userid": "user_id",
    "iothub-ack": "ack",
    "iothub-expiry": "expiry_time_utc",
    "iothub-contenttype": "content_type",
    "iothub-contentencoding": "content_encoding",
}
_APP_PREFIX = "iothub-app-"


def _c2d_request(request: Request, body: bytes) -> CloudToDeviceRequest:
    fields: dict[str, Any] = {}
    properties: dict[str, str] = {}
    for name, value in request.headers.items():
        if name in _HEADERS:
            fields[_HEADERS[name]] = value
        elif name.startswith(_APP_PREFIX) and len(name) > len(_APP_PREFIX):
            properties[name[len(_APP_PREFIX) :]] = value
    return CloudToDeviceRequest(body=body, properties=properties, **fields)


@handle_errors
async def send_c2d(request: Request) -> Response:
    """Queue a cloud-to-device message for a device of a built-in hub (module docstring)."""
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    hub = await _builtin_hub(ctx, request.path_params["name"])
    device_id = request.path_params["device_id"]
    body = await read_body(request, MAX_MESSAGE_BYTES)
    _, queued = await enqueue(ctx.store, hub, device_id, _c2d_request(request, body), now=ctx.clock())
    broker = getattr(request.app.state, "broker", None)
    if broker is not None:
        await broker.notify_c2d(hub, device_id)
    log.info("Queued cloud-to-device message %r for %s/%s", queued.message_id[:128], hub, device_id)
    return json_response(queued)


# --- direct methods -----------------------------------------------------------------------------


def broker_of(request: Request) -> MethodBroker:
    """The app's broker (``create_app`` puts it on the app state)."""
    broker: MethodBroker = request.app.state.broker
    return broker


@handle_errors
async def invoke_method(request: Request) -> Response:
    """Invoke a direct method on a device of a built-in hub and answer ``{status, payload}``
    (the request and the errors are IoT Hub's: :mod:`provisiond.hub.methods`)."""
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    hub = await _builtin_hub(ctx, request.path_params["name"])
    body = await read_body(request, MAX_REQUEST_BYTES)
    result = await invoke(broker_of(request), ctx.hub_registry, hub, request.path_params["device_id"], body)
    return json_response(result)


async def invoke_method_on_hub(request: Request) -> Response:
    """``POST /twins/{deviceId}/methods`` on a built-in hub's REST API (what ``azure-iothub``'s
    ``Client.invokeDeviceMethod`` and ``azure-iot-hub``'s ``invoke_device_method`` call): the
    hub is the request's (:func:`provisiond.service.hub_api.hub_of`), the token one of its
    policies with ServiceConnect, errors IoT Hub's body and ``iothub-errorcode``."""
    _, registry, hub = await authorized(request, (HubRight.SERVICE_CONNECT,))
    body = await read_body(request, MAX_REQUEST_BYTES)
    result = await invoke(broker_of(request), registry, hub, request.path_params["id"], body)
    return json_response(result)


def hub_api_routes() -> list[Route]:
    """The routes this module adds to the hub's REST API (``hub_api.routes(extra=...)``)."""
    handler = handle_errors(invoke_method_on_hub, render=hub_error_response)
    return [Route("/twins/{id}/methods", handler, methods=["POST"])]


def routes() -> list[Route]:
    hub = "/admin/linkedHubs/{name}"
    return [
        Route(f"{hub}/events", stream_events, methods=["GET"]),
        Route(f"{hub}/devices/{{device_id}}/messages/deviceBound", send_c2d, methods=["POST"]),
        Route(f"{hub}/devices/{{device_id}}/methods", invoke_method, methods=["POST"]),
    ]


# --- retention ----------------------------------------------------------------------------------


class RetentionTask:
    """Keeps the built-in hubs' streams bounded, in every worker of every node (trimming is
    idempotent): every ``settings.hub_trim_interval`` seconds it trims the telemetry to its
    retention (age and count) and drops expired cloud-to-device messages."""

    def __init__(self, store: Store, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._events = EventLog(store)
        self._retention = Retention(
            max_age=settings.hub_events_retention, max_count=settings.hub_events_max_count
        )
        self._interval = settings.hub_trim_interval
        self._clock = clock

    async def run_once(self) -> tuple[int, int]:
        """One pass; returns how many events and expired messages went."""
        now = self._clock()
        events = await self._events.trim(self._retention, now=now)
        expired = 0
        after = 0
        while True:
            page = await self._store.read(Stream.HUB_C2D, after=after, limit=1000)
            if not page:
                break
            kept = await purge_expired(self._store, page, now=now)
            expired += len(page) - len(kept)
            after = page[-1].seq
        if events or expired:
            log.info(
                "Retention: %d telemetry events and %d expired cloud-to-device messages removed",
                events,
                expired,
            )
        return events, expired

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except ProvisioningError as exc:  # the database is away: try again next time
                log.warning("Retention pass failed: %s", exc)
            raise_if_cancelling()  # (a cancellation inside a database call: see provisiond._cancel)
            await asyncio.sleep(self._interval)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(self._loop(), name="provisiond-hub-retention")
        try:
            yield
        finally:
            await stop(task, "the hub retention task")
