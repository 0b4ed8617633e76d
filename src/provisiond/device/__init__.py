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

from ..protocol.registration import RegistrationResult, RetryPolicy
from ..protocol.sas import derive_device_key
from .amqp import AmqpTransport
from .async_client import AsyncProvisioningDeviceClient
from .mqtt import MqttTransport
from .security import PemX509Credential, SecurityProvider, SymmetricKeySecurity, X509Credential, X509Security
from .sync_client import ProvisioningDeviceClient
from .transport import HttpsTransport, MockTransport, Transport, TransportKind

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

# Show the public names as provisiond.device.X in reprs, docs and tracebacks (as httpx does).
# derive_device_key stays provisiond.protocol.sas's: the service uses it too.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = __name__
del _name, _obj
