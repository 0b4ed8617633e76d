"""The provisiond device client: register a device with a DPS-compatible service.

::

    from provisiond.device import ProvisioningDeviceClient, SymmetricKeySecurity

    security = SymmetricKeySecurity(registration_id="my-device", symmetric_key=key)
    with ProvisioningDeviceClient.create("localhost:8443", id_scope, security, ca_file="ca.pem") as client:
        result = client.register()
    print(result.assigned_hub, result.device_id)

The registration logic lives once, sans-io, in :mod:`provisiond.protocol.registration`; the
async client drives it over a transport, and the sync client is a facade over the async one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..protocol.registration import RegistrationResult, RetryPolicy
from ..protocol.sas import derive_device_key
from .async_client import AsyncProvisioningDeviceClient
from .security import PemX509Credential, SecurityProvider, SymmetricKeySecurity, X509Credential, X509Security
from .sync_client import ProvisioningDeviceClient
from .transport import HttpsTransport, MockTransport, Transport, TransportKind

if TYPE_CHECKING:
    from .amqp import AmqpTransport
    from .mqtt import MqttTransport

__all__ = [
    "AmqpTransport",
    "AsyncProvisioningDeviceClient",
    "HttpsTransport",
    "MockTransport",
    "MqttTransport",
    "PemX509Credential",
    "ProvisioningDeviceClient",
    "RegistrationResult",
    "RetryPolicy",
    "SecurityProvider",
    "SymmetricKeySecurity",
    "Transport",
    "TransportKind",
    "X509Credential",
    "X509Security",
    "derive_device_key",
]

#: Imported on first use (PEP 562): their codecs cost a device that uses HTTPS memory for nothing.
_LAZY = {"AmqpTransport": ".amqp", "MqttTransport": ".mqtt"}

# Show the public names as provisiond.device.X in reprs, docs and tracebacks (as httpx does).
# derive_device_key stays provisiond.protocol.sas's: the service uses it too.
for _name in __all__:
    _obj = globals().get(_name)
    if isinstance(_obj, type):
        _obj.__module__ = __name__
del _name, _obj


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    value.__module__ = __name__
    globals()[name] = value
    return value
