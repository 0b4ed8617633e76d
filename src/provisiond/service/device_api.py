"""The device API over HTTPS (device-protocol.md §2), on the same port as the service API: an
adapter between HTTP and the device gateway (:mod:`provisiond.service.gateway`).

| Verb | Path | Answer |
|---|---|---|
| PUT | /{idScope}/registrations/{registrationId}/register | 202 RegistrationOperationStatus |
| GET | /{idScope}/registrations/{registrationId}/operations/{operationId} | 200 terminal, 202 assigning |
| POST | /{idScope}/registrations/{registrationId} | 200 DeviceRegistrationResult |

Register always answers 202 (the .NET SDK accepts nothing else). Beyond DPS, the 202 already
carries the terminal status and the full ``registrationState`` when the assignment completed,
which it normally does within milliseconds, so the device needs no poll. X.509 devices are
identified by the certificate chain the TLS front saw (``scope["extensions"]["tls"]``). The
HTTP-only parts are here: the api-version rule, the bounded body read, the headers
(``Retry-After``, ``x-ms-error-code``); the rest is the gateway's, as for MQTT and AMQP.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import ProvisioningError
from .gateway import HTTPS, Answer, Credential, DeviceCall, DeviceGateway, Operation
from .http import error_headers, handle_errors, json_response, read_body, require_api_version, shown_path

__all__ = ["routes"]


async def _serve(gateway: DeviceGateway, request: Request, operation: Operation) -> Response:
    describe = f"{request.method} {shown_path(request)}"
    try:
        require_api_version(request)
        payload = (
            b""
            if operation is Operation.OPERATION_STATUS
            else await read_body(request, gateway.max_body_bytes)
        )
    except ProvisioningError as exc:
        return _response(gateway.refuse(exc, HTTPS, describe))
    tls = request.scope.get("extensions", {}).get("tls", {})
    params = request.path_params
    call = DeviceCall(
        credential=Credential(
            id_scope=params["scope"],
            registration_id=params["id"],
            authorization=request.headers.get("authorization"),
            client_chain=tls.get("client_cert_chain", ()),
        ),
        operation=operation,
        transport=HTTPS,
        payload=payload,
        operation_id=params.get("operation"),
        peer=request.client.host if request.client else None,
        describe=describe,
    )
    return _response(await gateway.answer(call))


def _response(answer: Answer) -> Response:
    if answer.error_code is not None:
        headers = error_headers(answer.error_code, answer.retry_after)
    else:
        headers = {"Retry-After": str(answer.retry_after)} if answer.retry_after is not None else {}
    return json_response(answer.body, answer.status, headers)


def routes(gateway: DeviceGateway) -> list[Route]:
    """The device API's routes, answered by ``gateway`` (bound here: no lookup in the app's
    state per request)."""

    @handle_errors
    async def register(request: Request) -> Response:
        return await _serve(gateway, request, Operation.REGISTER)

    @handle_errors
    async def operation_status(request: Request) -> Response:
        return await _serve(gateway, request, Operation.OPERATION_STATUS)

    @handle_errors
    async def status_lookup(request: Request) -> Response:
        return await _serve(gateway, request, Operation.STATUS_LOOKUP)

    return [
        Route("/{scope}/registrations/{id}/register", register, methods=["PUT"]),
        Route("/{scope}/registrations/{id}/operations/{operation}", operation_status, methods=["GET"]),
        Route("/{scope}/registrations/{id}", status_lookup, methods=["POST"]),
    ]
