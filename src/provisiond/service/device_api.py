"""The device API over HTTPS (device-protocol.md §2), on the same port as the service API.

| Verb | Path | Answer |
|---|---|---|
| PUT | /{idScope}/registrations/{registrationId}/register | 202 RegistrationOperationStatus |
| GET | /{idScope}/registrations/{registrationId}/operations/{operationId} | 200 terminal, 202 assigning |
| POST | /{idScope}/registrations/{registrationId} | 200 DeviceRegistrationResult |

Register always answers 202 (the .NET SDK accepts nothing else). Beyond DPS, the 202 already
carries the terminal status and the full ``registrationState`` when the assignment completed,
which it normally does within milliseconds, so the device needs no poll. X.509 devices are
identified by the certificate chain the TLS front saw (``scope["extensions"]["tls"]``).
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import TpmChallengeRequired
from ..models import RegistrationStatus
from ..protocol.messages import DeviceRegistration, encode
from .context import context_of
from .http import decode_body, handle_errors, json_response, require_api_version, shown_path, tracking_id
from .registrar import DeviceRequest, Registrar

__all__ = ["routes"]

log = logging.getLogger("provisiond.device_api")

POLL_AFTER_SECONDS = 1


def _registrar(request: Request) -> Registrar:
    registrar: Registrar = request.app.state.registrar
    return registrar


async def _device_request(request: Request, *, with_body: bool) -> DeviceRequest:
    ctx = context_of(request)
    require_api_version(request)
    body = DeviceRegistration()
    if with_body:
        raw = await ctx.body(request)
        if raw.strip():
            body = decode_body(raw, DeviceRegistration, "device registration")
    tls = request.scope.get("extensions", {}).get("tls", {})
    force = request.query_params.get("forceRegistration", "").lower() == "true"
    return DeviceRequest(
        id_scope=request.path_params["scope"],
        registration_id=request.path_params["id"],
        body=body,
        authorization=request.headers.get("authorization"),
        client_chain=tls.get("client_cert_chain", ()),
        force=force,
        transport="https",
        source=request.client.host if request.client else None,
    )


def _status_headers(status: RegistrationStatus) -> dict[str, str]:
    return {"Retry-After": str(POLL_AFTER_SECONDS)} if status is RegistrationStatus.ASSIGNING else {}


def _tpm_challenge(request: Request, device: DeviceRequest, challenge: TpmChallengeRequired) -> Response:
    # Not a DPS error body: the C SDK requires keyName and the absence of status (§2.3).
    log.info(
        "%s %s -> 401: TPM challenge sent to %s [trackingId=%s] [https]",
        request.method,
        shown_path(request),
        device.registration_id,
        tracking_id(request),
    )
    body = {
        "message": challenge.message,
        "authenticationKey": challenge.authentication_key,
        "keyName": challenge.key_name,  # always written (TpmChallenge would omit the default)
    }
    return json_response(body, 401)


@handle_errors
async def register(request: Request) -> Response:
    device = await _device_request(request, with_body=True)
    try:
        result = await _registrar(request).register(device)
    except TpmChallengeRequired as challenge:
        return _tpm_challenge(request, device, challenge)
    return json_response(encode(result), 202, _status_headers(result.status))


@handle_errors
async def operation_status(request: Request) -> Response:
    device = await _device_request(request, with_body=False)
    result = await _registrar(request).operation_status(device, request.path_params["operation"])
    status = 202 if result.status is RegistrationStatus.ASSIGNING else 200
    return json_response(encode(result), status, _status_headers(result.status))


@handle_errors
async def status_lookup(request: Request) -> Response:
    device = await _device_request(request, with_body=True)
    try:
        return json_response(encode(await _registrar(request).status_lookup(device)))
    except TpmChallengeRequired as challenge:
        return _tpm_challenge(request, device, challenge)


def routes() -> list[Route]:
    return [
        Route("/{scope}/registrations/{id}/register", register, methods=["PUT"]),
        Route("/{scope}/registrations/{id}/operations/{operation}", operation_status, methods=["GET"]),
        Route("/{scope}/registrations/{id}", status_lookup, methods=["POST"]),
    ]
