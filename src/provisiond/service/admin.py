"""The admin API: what Azure keeps in its management plane (ARM), served by provisiond under
``/admin`` with the same SAS authentication and the ServiceConfig right. Each handler parses
(path, If-Match, body), calls :mod:`provisiond.service.management`, renders.

| Verb | Path | What |
|---|---|---|
| GET, PATCH | /admin/settings | ID scope, default allocation policy, host names |
| GET | /admin/linkedHubs | every linked hub (connection strings stripped) |
| GET, PUT, DELETE | /admin/linkedHubs/{hostName} | one linked hub (``"builtin": true`` on create: a hub provisiond keeps itself) |
| GET | /admin/linkedHubs/{hostName}/writer | the hub writer's figures for a remote hub (budget, queued, written, throttled, retried, failed) |
| GET | /admin/linkedHubs/{hostName}/devices | the identities of a built-in hub (keys stripped) |
| GET, DELETE | /admin/linkedHubs/{hostName}/devices/{deviceId} | one identity, with its twin (ETag: IoT Hub's device etag) |
| PUT | /admin/linkedHubs/{hostName}/devices/{deviceId} | create an identity (IoT Hub's Device JSON; keys generated when left out; 409 if it exists) |
| GET | /admin/linkedHubs/{hostName}/sharedAccessPolicies | a built-in hub's policies (keys stripped) |
| GET, PUT, DELETE | /admin/linkedHubs/{hostName}/sharedAccessPolicies/{name} | one of them (IoT Hub's rights; keys generated when omitted) |
| POST | /admin/linkedHubs/{hostName}/sharedAccessPolicies/{name}/listKeys | the policy with its keys |
| GET | /admin/certificates | every CA certificate |
| GET, PUT, DELETE | /admin/certificates/{name} | one CA certificate (PUT uploads it, unverified) |
| POST | /admin/certificates/{name}/generateVerificationCode | a fresh proof-of-possession code |
| POST | /admin/certificates/{name}/verify | ``{"certificate": PEM}``: CN = code, signed by the CA |
| GET | /admin/sharedAccessPolicies | every policy (keys stripped) |
| GET, PUT, DELETE | /admin/sharedAccessPolicies/{name} | one policy (keys generated when omitted) |
| POST | /admin/sharedAccessPolicies/{name}/listKeys | the policy with its keys |

PUT and DELETE take If-Match like the service API; PUT without If-Match creates (409 if the
record exists).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import InvalidBodyError
from ..hub.models import Device
from ..hub.policies import HubAccessPolicy
from ..models import CertificateUpload, LinkedHub, Right, ServiceSettingsPatch, SharedAccessPolicy
from .context import ServiceContext, context_of
from .http import ApiHandler, decode_body, handle_errors, json_response
from .hub_api import events_of
from .hub_writer import hub_writer_report
from .management import Management, validate_id_scope
from .management.certificates import validate_name
from .management.hubs import validate_host_name

__all__ = ["routes", "validate_id_scope"]


def _if_match(request: Request) -> str | None:
    return request.headers.get("if-match")


def _with_etag(item: Any) -> Response:
    return json_response(item, headers={"ETag": item.etag})


def _no_content() -> Response:
    return Response(status_code=204)


async def _admin(request: Request) -> tuple[ServiceContext, Management, dict[str, Any]]:
    """The context, the management operations and the path parameters of an authorized
    admin request (ServiceConfig)."""
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    return ctx, ctx.management, request.path_params


def _handler(call: Callable[[Management, dict[str, Any]], Awaitable[Response]]) -> ApiHandler:
    """A handler without a body: authorize, call, render."""

    @handle_errors
    async def handle(request: Request) -> Response:
        _, management, params = await _admin(request)
        return await call(management, params)

    handle.__name__ = call.__name__
    return handle


# --- settings ----------------------------------------------------------------------------------


async def get_settings(m: Management, _: dict[str, Any]) -> Response:
    return json_response(await m.settings.get())


@handle_errors
async def patch_settings(request: Request) -> Response:
    ctx, m, _ = await _admin(request)
    patch = decode_body(await ctx.body(request), ServiceSettingsPatch, "settings")
    return json_response(await m.settings.update(patch))


# --- linked hubs and their identities -----------------------------------------------------------


async def list_hubs(m: Management, _: dict[str, Any]) -> Response:
    return json_response(await m.hubs.list())


async def get_hub(m: Management, p: dict[str, Any]) -> Response:
    return _with_etag(await m.hubs.get(p["name"]))


async def get_hub_writer(m: Management, p: dict[str, Any]) -> Response:
    hub = await m.hubs.get(p["name"])  # 404 for a hub not linked
    return json_response(await hub_writer_report(m.store, hub))


@handle_errors
async def put_hub(request: Request) -> Response:
    ctx, m, p = await _admin(request)
    host = validate_host_name(p["name"])
    hub = decode_body(await ctx.body(request), LinkedHub, "linked hub")
    return _with_etag(await m.hubs.put(host, hub, if_match=_if_match(request)))


@handle_errors
async def delete_hub(request: Request) -> Response:
    _, m, p = await _admin(request)
    await m.hubs.delete(p["name"], if_match=_if_match(request))
    return _no_content()


@handle_errors
async def list_hub_devices(request: Request) -> Response:
    """The identities provisiond created in a built-in hub (paged like the query APIs)."""
    _, m, p = await _admin(request)
    page = await m.hubs.devices(p["name"], continuation=request.headers.get("x-ms-continuation") or None)
    headers = {"x-ms-continuation": page.continuation} if page.continuation else None
    return json_response(page.items, headers=headers)


async def get_hub_device(m: Management, p: dict[str, Any]) -> Response:
    identity = await m.hubs.device(p["name"], p["device_id"])
    return json_response(identity.device, headers={"ETag": identity.etag})


@handle_errors
async def put_hub_device(request: Request) -> Response:
    ctx, m, p = await _admin(request)
    device = decode_body(await ctx.body(request), Device, "device")
    if device.device_id is not None and device.device_id != p["device_id"]:
        raise InvalidBodyError(f"deviceId {device.device_id[:140]!r} in the body differs from the URL's.")
    created = await m.hubs.create_device(p["name"], msgspec.structs.replace(device, device_id=p["device_id"]))
    return json_response(created, headers={"ETag": f'"{created["etag"]}"'})


@handle_errors
async def delete_hub_device(request: Request) -> Response:
    _, m, p = await _admin(request)
    await m.hubs.delete_device(p["name"], p["device_id"], if_match=_if_match(request))
    await events_of(request).disconnect(p["name"].lower(), p["device_id"], "the device was deleted")
    return _no_content()


# --- a built-in hub's shared access policies ------------------------------------------------------


async def list_hub_policies(m: Management, p: dict[str, Any]) -> Response:
    await m.hubs.builtin(p["name"])
    return json_response(await m.hub_policies.list(p["name"]))


async def get_hub_policy(m: Management, p: dict[str, Any]) -> Response:
    await m.hubs.builtin(p["name"])
    return _with_etag(await m.hub_policies.get(p["name"], p["policy"]))


async def list_hub_policy_keys(m: Management, p: dict[str, Any]) -> Response:
    await m.hubs.builtin(p["name"])
    return _with_etag(await m.hub_policies.get(p["name"], p["policy"], keys=True))


@handle_errors
async def put_hub_policy(request: Request) -> Response:
    ctx, m, p = await _admin(request)
    await m.hubs.builtin(p["name"])
    name = m.hub_policies.validate_name(p["policy"])
    policy = decode_body(await ctx.body(request), HubAccessPolicy, "shared access policy")
    return _with_etag(await m.hub_policies.put(p["name"], name, policy, if_match=_if_match(request)))


@handle_errors
async def delete_hub_policy(request: Request) -> Response:
    _, m, p = await _admin(request)
    await m.hubs.builtin(p["name"])
    await m.hub_policies.delete(p["name"], p["policy"], if_match=_if_match(request))
    return _no_content()


# --- CA certificates -----------------------------------------------------------------------------


async def list_cas(m: Management, _: dict[str, Any]) -> Response:
    return json_response(await m.certificates.list())


async def get_ca(m: Management, p: dict[str, Any]) -> Response:
    return _with_etag(await m.certificates.get(p["name"]))


@handle_errors
async def put_ca(request: Request) -> Response:
    ctx, m, p = await _admin(request)
    name = validate_name(p["name"], "certificate name")
    upload = decode_body(await ctx.body(request), CertificateUpload, "CA certificate")
    return _with_etag(await m.certificates.upload(name, upload, if_match=_if_match(request)))


@handle_errors
async def delete_ca(request: Request) -> Response:
    _, m, p = await _admin(request)
    await m.certificates.delete(p["name"], if_match=_if_match(request))
    return _no_content()


async def generate_verification_code(m: Management, p: dict[str, Any]) -> Response:
    return _with_etag(await m.certificates.generate_verification_code(p["name"]))


@handle_errors
async def verify_ca(request: Request) -> Response:
    ctx, m, p = await _admin(request)
    proof = decode_body(await ctx.body(request), CertificateUpload, "verification certificate")
    return _with_etag(await m.certificates.verify(p["name"], proof.certificate))


# --- shared access policies ----------------------------------------------------------------------


async def list_policies(m: Management, _: dict[str, Any]) -> Response:
    return json_response(await m.policies.list())


async def get_policy(m: Management, p: dict[str, Any]) -> Response:
    return _with_etag(await m.policies.get(p["name"]))


async def list_policy_keys(m: Management, p: dict[str, Any]) -> Response:
    return _with_etag(await m.policies.get(p["name"], keys=True))


@handle_errors
async def put_policy(request: Request) -> Response:
    ctx, m, p = await _admin(request)
    name = m.policies.validate_name(p["name"])
    policy = decode_body(await ctx.body(request), SharedAccessPolicy, "shared access policy")
    return _with_etag(await m.policies.put(name, policy, if_match=_if_match(request)))


@handle_errors
async def delete_policy(request: Request) -> Response:
    _, m, p = await _admin(request)
    await m.policies.delete(p["name"], if_match=_if_match(request))
    return _no_content()


def routes() -> list[Route]:
    hub, ca, policy = (
        "/admin/linkedHubs/{name}",
        "/admin/certificates/{name}",
        "/admin/sharedAccessPolicies/{name}",
    )
    return [
        Route("/admin/settings", _handler(get_settings), methods=["GET"]),
        Route("/admin/settings", patch_settings, methods=["PATCH"]),
        Route("/admin/linkedHubs", _handler(list_hubs), methods=["GET"]),
        Route(hub, _handler(get_hub), methods=["GET"]),
        Route(hub, put_hub, methods=["PUT"]),
        Route(hub, delete_hub, methods=["DELETE"]),
        Route(f"{hub}/writer", _handler(get_hub_writer), methods=["GET"]),
        Route(f"{hub}/devices", list_hub_devices, methods=["GET"]),
        Route(f"{hub}/devices/{{device_id}}", _handler(get_hub_device), methods=["GET"]),
        Route(f"{hub}/devices/{{device_id}}", put_hub_device, methods=["PUT"]),
        Route(f"{hub}/devices/{{device_id}}", delete_hub_device, methods=["DELETE"]),
        Route(f"{hub}/sharedAccessPolicies", _handler(list_hub_policies), methods=["GET"]),
        Route(
            f"{hub}/sharedAccessPolicies/{{policy}}/listKeys",
            _handler(list_hub_policy_keys),
            methods=["POST"],
        ),
        Route(f"{hub}/sharedAccessPolicies/{{policy}}", _handler(get_hub_policy), methods=["GET"]),
        Route(f"{hub}/sharedAccessPolicies/{{policy}}", put_hub_policy, methods=["PUT"]),
        Route(f"{hub}/sharedAccessPolicies/{{policy}}", delete_hub_policy, methods=["DELETE"]),
        Route("/admin/certificates", _handler(list_cas), methods=["GET"]),
        Route(f"{ca}/generateVerificationCode", _handler(generate_verification_code), methods=["POST"]),
        Route(f"{ca}/verify", verify_ca, methods=["POST"]),
        Route(ca, _handler(get_ca), methods=["GET"]),
        Route(ca, put_ca, methods=["PUT"]),
        Route(ca, delete_ca, methods=["DELETE"]),
        Route("/admin/sharedAccessPolicies", _handler(list_policies), methods=["GET"]),
        Route(f"{policy}/listKeys", _handler(list_policy_keys), methods=["POST"]),
        Route(policy, _handler(get_policy), methods=["GET"]),
        Route(policy, put_policy, methods=["PUT"]),
        Route(policy, delete_policy, methods=["DELETE"]),
    ]
