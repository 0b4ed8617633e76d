"""The built-in hubs' service REST API: IoT Hub's registry, twin, query and statistics calls as
the official service SDKs make them (``azure-iot-hub``'s ``IoTHubRegistryManager``,
``azure-iothub``'s ``Registry``; iothub.md §3), served on the HTTPS port beside the DPS APIs.
Each handler resolves the hub, authorizes, parses (path, ``If-Match``, body), calls the
registry (:mod:`provisiond.hub.registry`) and renders IoT Hub's JSON; errors are IoT Hub's
(:func:`provisiond.protocol.hub_messages.rest_error_body` and ``iothub-errorcode``).

| Verb | Path | Right (any of) | What |
|---|---|---|---|
| GET | /devices[/]?top=N | RegistryRead | up to N identities (1-1000) |
| GET | /devices/{id} | RegistryRead | one identity (keys included, as IoT Hub shows them) |
| PUT | /devices/{id} | RegistryWrite | create (no If-Match; 409 if it exists) or update (If-Match: * or its etag); 200 |
| DELETE | /devices/{id} | RegistryWrite | delete (If-Match: * or its etag); 204 |
| POST | /devices/query | RegistryRead, ServiceConnect | IoT Hub's query language, paged (x-ms-max-item-count, x-ms-continuation) |
| GET | /twins/{id} | RegistryRead, ServiceConnect | the twin |
| PATCH | /twins/{id} | ServiceConnect | merge tags and desired properties (If-Match: * or the twin's etag) |
| PUT | /twins/{id} | ServiceConnect | replace tags and desired properties |
| GET | /statistics/devices | RegistryRead | total, enabled and disabled identities |
| GET | /statistics/service | RegistryRead, ServiceConnect | connected identities |

**Which hub.** The request's ``Host`` names it when it is a built-in hub's host name; any other
host (an IP address, ``--host`` when the first hub has another name) reaches the first built-in
hub. The SAS token must be signed with one of that hub's policies (iothub.md §3.1), its ``sr``
the hub's host name or the host the request was sent to.

**Paths** match as the DPS APIs' do (case-insensitive, with or without a trailing slash:
``azure-iothub`` lists ``/devices/``). Other paths under ``/devices``, ``/twins`` and
``/statistics`` (modules, bulk registry, jobs, C2D purge) answer IoT Hub's 400
``InvalidOperation``. ``POST /twins/{id}/methods`` (direct methods) is added beside these by
the hub's device side, before the catch-alls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..errors import InvalidBodyError, IotHubCode, NotFoundError, ProvisioningError, RequestError
from ..hub.models import Device, TwinPatch, device_view, twin_view
from ..hub.policies import HubRight
from ..hub.registry import HubEvents, HubRegistry
from ..protocol.hub_messages import rest_error_body
from ..storage import utc_now
from .auth import authorize_hub
from .context import ServiceContext, context_of
from .http import ApiHandler, decode_body, handle_errors, json_response, require_api_version, retry_after_of

__all__ = ["HUB_PATHS", "authorized", "events_of", "host_name", "hub_error_response", "hub_of", "routes"]

#: The path prefixes the hub's API owns (the rest of the HTTPS port is DPS's).
HUB_PATHS = ("/devices", "/twins", "/statistics")
#: How long the list of built-in hubs may be reused to route a request (an admin write on
#: this node drops it at once; other nodes see a new built-in hub within this).
HUBS_MAX_AGE = 1.0

READ = (HubRight.REGISTRY_READ,)
WRITE = (HubRight.REGISTRY_WRITE,)
SERVICE = (HubRight.SERVICE_CONNECT,)
READ_OR_SERVICE = (HubRight.REGISTRY_READ, HubRight.SERVICE_CONNECT)


class _Query(msgspec.Struct):
    query: str


def hub_error_response(exc: ProvisioningError, tid: str) -> Response:
    """IoT Hub's error response for ``exc``: the status and name of its :class:`IotHubCode`,
    the legacy body, ``iothub-errorcode``, and ``Retry-After`` when the error carries one."""
    code = exc.iothub_code
    headers = {"iothub-errorcode": code.iothub_name}
    retry_after = retry_after_of(exc)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    body = rest_error_body(code, exc.message, tid, utc_now())
    return json_response(body, code.http_status, headers)


def _handler(handler: ApiHandler) -> ApiHandler:
    return handle_errors(handler, render=hub_error_response)


def events_of(request: Request) -> HubEvents:
    """Who tells connected devices what a write changed (``create_app`` wires it)."""
    events: HubEvents = request.app.state.hub_events
    return events


def host_name(header: str) -> str:
    """The host name of a ``Host`` header: lower-cased, without the port or a trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):  # an IPv6 literal
        return header[1:].split("]", 1)[0]
    return header.split(":", 1)[0].rstrip(".")


async def hub_of(request: Request, ctx: ServiceContext) -> str:
    """The built-in hub a request is for (see the module docstring)."""
    name = host_name(request.headers.get("host", ""))
    hubs = await ctx.builtin_hubs(max_age=HUBS_MAX_AGE)
    if not hubs:
        raise NotFoundError("This service has no built-in IoT hub.", error_code=IotHubCode.DEVICE_NOT_FOUND)
    return name if name in hubs else hubs[0]


async def authorized(
    request: Request, rights: tuple[HubRight, ...]
) -> tuple[ServiceContext, HubRegistry, str]:
    """The context, the registry and the hub of an authorized request."""
    ctx = context_of(request)
    hub = await hub_of(request, ctx)
    require_api_version(request)
    await authorize_hub(
        ctx.management.hub_policies,
        request.headers.get("authorization"),
        rights,
        hub=hub,
        request_host=request.headers.get("host", ""),
        path=request.url.path,
        now=int(ctx.clock()),
        clock_skew=ctx.settings.clock_skew,
    )
    return ctx, ctx.hub_registry, hub


def _if_match(request: Request) -> str | None:
    return request.headers.get("if-match")


def _device_response(device: Any, c2d_count: int | None = None) -> Response:
    view = device_view(device, c2d_count=c2d_count)
    return json_response(view, headers={"ETag": f'"{view.etag}"'})


def _twin_response(device: Any) -> Response:
    view = twin_view(device)
    return json_response(view, headers={"ETag": f'"{view["etag"]}"'})


def _int_header(request: Request, name: str) -> int | None:
    value = request.headers.get(name) or request.query_params.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidBodyError(f"{name} must be a whole number, not {value[:40]!r}.") from None


# --- devices -----------------------------------------------------------------------------------


@_handler
async def list_devices(request: Request) -> Response:
    _, registry, hub = await authorized(request, READ)
    devices = await registry.list(hub, top=_int_header(request, "top"))
    return json_response([device_view(device) for device in devices])


@_handler
async def get_device(request: Request) -> Response:
    _, registry, hub = await authorized(request, READ)
    device = await registry.get(hub, request.path_params["id"])
    return _device_response(device, device.cloud_to_device_message_count)


@_handler
async def put_device(request: Request) -> Response:
    ctx, registry, hub = await authorized(request, WRITE)
    device_id = request.path_params["id"]
    device = decode_body(await ctx.body(request), Device, "device")
    if device.device_id is not None and device.device_id != device_id:
        raise InvalidBodyError(
            f"deviceId {device.device_id[:140]!r} in the body differs from {device_id!r} in the URL.",
            error_code=IotHubCode.ARGUMENT_INVALID,
        )
    device = msgspec.structs.replace(device, device_id=device_id)
    if_match = _if_match(request)
    if if_match is None:
        return _device_response(await registry.create(hub, device))
    changed = await registry.update(hub, device, if_match=if_match)
    if changed.disconnect is not None:
        await events_of(request).disconnect(hub, device_id, changed.disconnect)
    return _device_response(changed.device)


@_handler
async def delete_device(request: Request) -> Response:
    _, registry, hub = await authorized(request, WRITE)
    device_id = request.path_params["id"]
    await registry.delete(hub, device_id, if_match=_if_match(request))
    await events_of(request).disconnect(hub, device_id, "the device was deleted")
    return Response(status_code=204)


@_handler
async def query_devices(request: Request) -> Response:
    ctx, registry, hub = await authorized(request, READ_OR_SERVICE)
    query = decode_body(await ctx.body(request), _Query, "query specification")
    page = await registry.query(
        hub,
        query.query,
        page_size=_int_header(request, "x-ms-max-item-count"),
        continuation=request.headers.get("x-ms-continuation") or None,
    )
    # The last page has no x-ms-continuation at all: the Node.js SDK takes any value, even an
    # empty one, for "more results" (Query.next), and the Python SDK reads an absent one as None.
    headers = {"x-ms-item-type": page.item_type}
    if page.continuation is not None:
        headers["x-ms-continuation"] = page.continuation
    return json_response(page.items, headers=headers)


# --- twins -------------------------------------------------------------------------------------


@_handler
async def get_twin(request: Request) -> Response:
    _, registry, hub = await authorized(request, READ_OR_SERVICE)
    return _twin_response(await registry.get_twin(hub, request.path_params["id"]))


def _twin_write(*, replace: bool) -> ApiHandler:
    async def write_twin(request: Request) -> Response:
        ctx, registry, hub = await authorized(request, SERVICE)
        device_id = request.path_params["id"]
        patch = decode_body(await ctx.body(request), TwinPatch, "twin")
        update = await registry.update_twin(
            hub, device_id, patch, replace=replace, if_match=_if_match(request)
        )
        if update.desired_changes is not None:
            version = update.device.twin.desired_version
            await events_of(request).notify_desired(hub, device_id, update.desired_changes, version)
        return _twin_response(update.device)

    write_twin.__name__ = "replace_twin" if replace else "patch_twin"
    return _handler(write_twin)


# --- statistics --------------------------------------------------------------------------------


@_handler
async def device_statistics(request: Request) -> Response:
    _, registry, hub = await authorized(request, READ)
    return json_response(await registry.statistics(hub))


@_handler
async def service_statistics(request: Request) -> Response:
    _, registry, hub = await authorized(request, READ_OR_SERVICE)
    return json_response({"connectedDeviceCount": await registry.connected_count(hub)})


@_handler
async def not_served(request: Request) -> Response:
    raise RequestError(
        f"The built-in hub does not serve {request.method} {request.url.path[:200]} (modules, jobs, bulk "
        "registry operations, cloud-to-device purge and file upload are not served; see docs/hub.md).",
        error_code=IotHubCode.INVALID_OPERATION,
    )


_ALL = ["GET", "PUT", "POST", "PATCH", "DELETE"]


def routes(extra: Sequence[BaseRoute] = ()) -> list[BaseRoute]:
    """The hub API's routes: the operations, ``extra`` (more routes under the hub's prefixes,
    such as ``POST /twins/{id}/methods``), then catch-alls under its prefixes."""
    return [
        *operation_routes(),
        *extra,
        *fallback_routes(),
    ]


def operation_routes() -> list[BaseRoute]:
    return [
        Route("/devices", list_devices, methods=["GET"]),
        Route("/devices/query", query_devices, methods=["POST"]),
        Route("/devices/{id}", get_device, methods=["GET"]),
        Route("/devices/{id}", put_device, methods=["PUT"]),
        Route("/devices/{id}", delete_device, methods=["DELETE"]),
        Route("/twins/{id}", get_twin, methods=["GET"]),
        Route("/twins/{id}", _twin_write(replace=False), methods=["PATCH"]),
        Route("/twins/{id}", _twin_write(replace=True), methods=["PUT"]),
        Route("/statistics/devices", device_statistics, methods=["GET"]),
        Route("/statistics/service", service_statistics, methods=["GET"]),
    ]


def fallback_routes() -> list[BaseRoute]:
    exact = [Route(prefix, not_served, methods=_ALL) for prefix in HUB_PATHS]
    return [*exact, *(Route(f"{prefix}/{{rest:path}}", not_served, methods=_ALL) for prefix in HUB_PATHS)]
