"""IoT hubs as provisiond sees them: where device identities are created on assignment.

- :mod:`.models`: the identity and its twin (IoT Hub's registry shape), IoT Hub's REST wire
  shapes, and how a device's attested credential becomes the identity's authentication;
- :mod:`.base`: what a registration asks of a hub (:class:`IdentityChange`), the
  :class:`HubBackend` interface (one idempotent registry operation at a time, outside any
  database transaction) and its transactional special case;
- :mod:`.builtin`: the built-in hub, whose identities live in provisiond's database;
- :mod:`.messages`: the built-in hubs' stored telemetry events and cloud-to-device messages;
- :mod:`.registry`: the built-in hubs' identity registry, as IoT Hub's service API and the
  hub's device endpoint use it (identities, twins, queries, statistics, connection state);
- :mod:`.query`: IoT Hub's query language, as far as the built-in hubs read it;
- :mod:`.policies`: the built-in hubs' shared access policies;
- :mod:`.connection`: a remote hub's connection string, its service token and the credential
  check made when it is linked;
- :mod:`.remote`: a remote hub (Azure IoT Hub, or any hub serving IoT Hub's registry REST API)
  as a :class:`HubBackend`;
- :mod:`.outbox`: the durable outbox through which identities are written to remote hubs
  (the hub writer, :mod:`provisiond.service.hub_writer`, carries its items out).
"""

from __future__ import annotations

from .base import (
    HubBackend,
    HubBackends,
    HubError,
    IdentityChange,
    IdentityRef,
    IdentitySpec,
    Planned,
    TransactionalHubBackend,
    TwinPlan,
    TwinSource,
    carry_out,
    resolve_twin,
)
from .builtin import BuiltinHub
from .models import (
    AuthenticationType,
    ConnectionState,
    Device,
    DeviceAuthentication,
    DeviceStatus,
    HubDevice,
    SymmetricKeyAuth,
    Twin,
    TwinPatch,
    X509Thumbprint,
    authentication_for,
    device_view,
    twin_view,
    x509_authentication,
)

__all__ = [
    "AuthenticationType",
    "BuiltinHub",
    "ConnectionState",
    "Device",
    "DeviceAuthentication",
    "DeviceStatus",
    "HubBackend",
    "HubBackends",
    "HubDevice",
    "HubError",
    "IdentityChange",
    "IdentityRef",
    "IdentitySpec",
    "Planned",
    "SymmetricKeyAuth",
    "TransactionalHubBackend",
    "Twin",
    "TwinPatch",
    "TwinPlan",
    "TwinSource",
    "X509Thumbprint",
    "authentication_for",
    "carry_out",
    "device_view",
    "resolve_twin",
    "twin_view",
    "x509_authentication",
]
