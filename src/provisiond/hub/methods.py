"""Direct methods, service side: the invocation request of IoT Hub's
``POST /twins/{deviceId}/methods`` as provisiond checks and answers it (the admin call
``POST /admin/linkedHubs/{hub}/devices/{deviceId}/methods`` and ``provisiond hub
invoke-method`` take the same body), carried out by the broker
(:mod:`provisiond.service.hub_broker`), which reaches the device wherever it is connected.

The request is IoT Hub's ``CloudToDeviceMethod``: ``{"methodName", "payload",
"responseTimeoutInSeconds", "connectTimeoutInSeconds"}`` (the Python service SDK's
``invoke_device_method``, the Node.js ``Client.invokeDeviceMethod``); the answer is
``{"status": the device's status, "payload": the device's JSON}``, 200 whatever status the
device chose. IoT Hub's rules (the direct-methods developer guide and the service SDKs):

=====================================  =============================================  ==========
what                                   rule                                           otherwise
=====================================  =============================================  ==========
``methodName``                         1-:data:`MAX_NAME` characters, none of         400 ArgumentInvalid
                                       ``/ ? # +``, no control character
``responseTimeoutInSeconds``           :data:`MIN_RESPONSE_TIMEOUT`-                  400 ArgumentInvalid
                                       :data:`MAX_RESPONSE_TIMEOUT` (default 30)
``connectTimeoutInSeconds``            0-:data:`MAX_CONNECT_TIMEOUT` (default 0: the  400 ArgumentInvalid
                                       device must be connected now)
``payload``                            any JSON, at most 128 KB encoded               400 ArgumentInvalid
the device                             connected and subscribed to methods (within    404 DeviceNotOnline (404103)
                                       the connect timeout)
the device's answer                    within the response timeout                    504 GatewayTimeout (504101)
the identity                           exists                                         404 DeviceNotFound (404001)
=====================================  =============================================  ==========
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import msgspec

from ..errors import InvalidBodyError, IotHubCode
from ..protocol import bounded_json
from .registry import device_not_found

__all__ = [
    "DEFAULT_RESPONSE_TIMEOUT",
    "MAX_CONNECT_TIMEOUT",
    "MAX_NAME",
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_TIMEOUT",
    "MIN_RESPONSE_TIMEOUT",
    "CloudToDeviceMethod",
    "CloudToDeviceMethodResult",
    "IdentityLookup",
    "MethodBroker",
    "invoke",
    "parse_invocation",
]

log = logging.getLogger("provisiond.hub")

DEFAULT_RESPONSE_TIMEOUT = 30
MIN_RESPONSE_TIMEOUT = 5
MAX_RESPONSE_TIMEOUT = 300
MAX_CONNECT_TIMEOUT = 300
MAX_NAME = 128
#: The largest request body read: IoT Hub's 128 KB payload limit and room for the other fields.
MAX_REQUEST_BYTES = 128 * 1024 + 4096
_FORBIDDEN = set("/?#+")


class CloudToDeviceMethod(msgspec.Struct, rename="camel", kw_only=True):
    """The request body (IoT Hub's ``CloudToDeviceMethod``)."""

    method_name: str | None = None
    payload: Any = None
    response_timeout_in_seconds: int | None = None
    connect_timeout_in_seconds: int | None = None


class CloudToDeviceMethodResult(msgspec.Struct):
    """The answer (IoT Hub's ``CloudToDeviceMethodResult``): the device's status and payload."""

    status: int
    payload: Any


class _Result(Protocol):
    status: int
    payload: Any


class MethodBroker(Protocol):
    """What this needs of the broker (:class:`provisiond.service.hub_broker.HubBroker`)."""

    async def invoke_method(
        self,
        hub: str,
        device_id: str,
        name: str,
        payload: Any,
        *,
        response_timeout: float,
        connect_timeout: float = 0.0,
    ) -> _Result: ...


class IdentityLookup(Protocol):
    """What this needs of the identity registry (:class:`provisiond.hub.registry.HubRegistry`)."""

    async def find(self, hub: str, device_id: str) -> object | None: ...


def _invalid(message: str) -> InvalidBodyError:
    return InvalidBodyError(message, error_code=IotHubCode.ARGUMENT_INVALID)


def _bounded(value: int | None, name: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not low <= value <= high:
        raise _invalid(f"{name} must be between {low} and {high} seconds, not {value}.")
    return value


def parse_invocation(body: bytes) -> tuple[str, Any, int, int]:
    """The method name, payload, response and connect timeouts of a request body, within IoT
    Hub's bounds (module docstring).

    :raises InvalidBodyError: (400, ArgumentInvalid) anything out of bounds, or not JSON.
    """
    if not body.strip():
        raise _invalid("The request body is empty; expected {methodName, payload, responseTimeoutInSeconds}.")
    try:
        request = bounded_json.decode(body, CloudToDeviceMethod)
    except msgspec.ValidationError as exc:
        raise _invalid(f"Invalid method invocation: {exc}") from None
    except msgspec.DecodeError as exc:
        raise _invalid(f"The request body is not valid JSON: {exc}") from None
    name = request.method_name
    if not name:
        raise _invalid("methodName is required.")
    if len(name) > MAX_NAME or any(c in _FORBIDDEN or not c.isprintable() for c in name):
        raise _invalid(
            f"methodName {name[:MAX_NAME]!r} is not a method name: at most {MAX_NAME} printable "
            "characters, none of '/', '?', '#', '+'."
        )
    response_timeout = _bounded(
        request.response_timeout_in_seconds,
        "responseTimeoutInSeconds",
        DEFAULT_RESPONSE_TIMEOUT,
        MIN_RESPONSE_TIMEOUT,
        MAX_RESPONSE_TIMEOUT,
    )
    connect_timeout = _bounded(
        request.connect_timeout_in_seconds, "connectTimeoutInSeconds", 0, 0, MAX_CONNECT_TIMEOUT
    )
    return name, request.payload, response_timeout, connect_timeout


async def invoke(
    broker: MethodBroker, identities: IdentityLookup, hub: str, device_id: str, body: bytes
) -> CloudToDeviceMethodResult:
    """Invoke the method a request body asks for on ``device_id`` and return the device's answer.

    :raises InvalidBodyError: a bad request (:func:`parse_invocation`), or a payload over 128 KB.
    :raises NotFoundError: 404001, no such identity in the hub.
    :raises DeviceNotOnlineError: 404103. :raises GatewayTimeoutError: 504101.
    """
    name, payload, response_timeout, connect_timeout = parse_invocation(body)
    if await identities.find(hub, device_id) is None:
        raise device_not_found(hub, device_id)
    result = await broker.invoke_method(
        hub, device_id, name, payload, response_timeout=response_timeout, connect_timeout=connect_timeout
    )
    log.info("Method %r on %s/%s answered %d", name, hub, device_id, result.status)
    return CloudToDeviceMethodResult(result.status, result.payload)
