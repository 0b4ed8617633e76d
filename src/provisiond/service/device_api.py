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

Each operation is an ASGI app of its own (:class:`DeviceOperation`): it reads what it needs
from the scope (path parameters, ``api-version``, ``Authorization``, ``Content-Length``, the
presented chain) and writes the answer's two messages, with no Starlette request or response
object in between, and the app calls it without its router
(:class:`~provisiond.service.http.DirectRoutes`). The answer's headers are those a Starlette
JSON response would have, in the same order.
"""

from __future__ import annotations

import uuid

from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..errors import ProvisioningError
from .gateway import HTTPS, Answer, Credential, DeviceCall, DeviceGateway, Operation
from .http import AsgiEndpoint, api_version_of, path_shown, receive_body

__all__ = ["DeviceOperation", "routes"]

_CONTENT_TYPE = (b"content-type", b"application/json; charset=utf-8")


class DeviceOperation(AsgiEndpoint):
    """One operation of the device API, answered by ``gateway``."""

    def __init__(self, gateway: DeviceGateway, operation: Operation) -> None:
        self._gateway = gateway
        self._operation = operation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = await self._answer(scope, receive)
        await send({"type": "http.response.start", "status": answer.status, "headers": _headers(answer)})
        await send({"type": "http.response.body", "body": answer.body})

    async def _answer(self, scope: Scope, receive: Receive) -> Answer:
        gateway = self._gateway
        describe = f"{scope['method']} {path_shown(scope)}"
        try:
            authorization = declared = None
            for name, value in scope["headers"]:  # the first of each, as Starlette's Headers.get
                if name == b"authorization" and authorization is None:
                    authorization = value.decode("latin-1")
                elif name == b"content-length" and declared is None:
                    declared = value.decode("latin-1")
            try:
                api_version_of(scope)
                payload = (
                    b""
                    if self._operation is Operation.OPERATION_STATUS
                    else await receive_body(declared, receive, gateway.max_body_bytes)
                )
            except ProvisioningError as exc:
                return gateway.refuse(exc, HTTPS, describe)
            tls = scope.get("extensions", {}).get("tls", {})
            params = scope["path_params"]
            client = scope.get("client")
            call = DeviceCall(
                credential=Credential(
                    id_scope=params["scope"],
                    registration_id=params["id"],
                    authorization=authorization,
                    client_chain=tls.get("client_cert_chain", ()),
                ),
                operation=self._operation,
                transport=HTTPS,
                payload=payload,
                operation_id=params.get("operation"),
                peer=client[0] if client else None,
                describe=describe,
            )
            return await gateway.answer(call)
        except Exception:  # our bug (the gateway's answer never raises): a 500 that says where to look
            tid = str(uuid.uuid4())
            HTTPS.log.exception("%s -> 500: internal error [trackingId=%s]", describe, tid)
            return gateway.internal_error(tid)


def _headers(answer: Answer) -> list[tuple[bytes, bytes]]:
    headers = []
    if answer.error_code is not None:
        headers.append((b"x-ms-error-code", b"%d" % answer.error_code))
    if answer.retry_after is not None:
        headers.append((b"retry-after", b"%d" % answer.retry_after))
    headers.append((b"content-length", b"%d" % len(answer.body)))
    headers.append(_CONTENT_TYPE)
    return headers


def routes(gateway: DeviceGateway) -> list[Route]:
    """The device API's routes, answered by ``gateway``."""
    return [
        Route(
            "/{scope}/registrations/{id}/register",
            DeviceOperation(gateway, Operation.REGISTER),
            methods=["PUT"],
            name="register",
        ),
        Route(
            "/{scope}/registrations/{id}/operations/{operation}",
            DeviceOperation(gateway, Operation.OPERATION_STATUS),
            methods=["GET"],
            name="operation_status",
        ),
        Route(
            "/{scope}/registrations/{id}",
            DeviceOperation(gateway, Operation.STATUS_LOOKUP),
            methods=["POST"],
            name="status_lookup",
        ),
    ]
