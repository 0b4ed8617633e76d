"""IoT hub identities: the stored identity of a built-in hub (:class:`HubDevice`: IoT Hub's
registry fields, its twin as :class:`provisiond.twin.Twin`), the wire shapes of IoT Hub's
service REST API (:class:`Device`, :class:`TwinPatch`, the twin view), and how a device's
attested credential becomes an identity's authentication. Pure: no storage, no clock (times
are passed in).

IoT Hub's shapes are SWAGGER ``definitions.Device`` / ``Twin`` (iothub.md §3.3, §3.4) as the
official service SDKs read them: ``azure-iot-hub``'s msrest models (``protocol/models/
device_py3.py``, ``twin_py3.py``) and ``azure-iothub``'s ``Registry``.
"""

from __future__ import annotations

import base64
import enum
from typing import Any

import msgspec

from .._ids import random_below
from ..attestation.base import CertificateCredential, IdentityCredential, KeyCredential
from ..models import DeviceCapabilities, LinkedHub, X509GroupAuthentication
from ..twin import NEVER, Twin, section_view, twin_etag

__all__ = [
    "NEVER",
    "AuthenticationMechanism",
    "AuthenticationType",
    "ConnectionState",
    "Device",
    "DeviceAuthentication",
    "DeviceStatus",
    "HubDevice",
    "RegistryStatistics",
    "ServiceStatistics",
    "SymmetricKeyAuth",
    "Twin",
    "TwinPatch",
    "TwinProperties",
    "X509Thumbprint",
    "authentication_for",
    "device_view",
    "new_device_etag",
    "new_generation_id",
    "twin_view",
    "x509_authentication",
]

Json = dict[str, Any]


class AuthenticationType(enum.Enum):
    """How an identity authenticates (IoT Hub's ``authentication.type``)."""

    SAS = "sas"
    SELF_SIGNED = "selfSigned"
    CERTIFICATE_AUTHORITY = "certificateAuthority"
    NONE = "none"


class DeviceStatus(enum.Enum):
    ENABLED = "enabled"
    DISABLED = "disabled"


class ConnectionState(enum.Enum):
    CONNECTED = "Connected"
    DISCONNECTED = "Disconnected"


class _HubModel(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    pass


class SymmetricKeyAuth(_HubModel):
    primary_key: str | None = None
    secondary_key: str | None = None


class X509Thumbprint(_HubModel):
    primary_thumbprint: str | None = None
    secondary_thumbprint: str | None = None


class DeviceAuthentication(_HubModel):
    """IoT Hub's ``authentication`` (``AuthenticationMechanism``), stored and on the wire."""

    type: AuthenticationType
    symmetric_key: SymmetricKeyAuth | None = None
    x509_thumbprint: X509Thumbprint | None = None


#: The wire name of :class:`DeviceAuthentication` in IoT Hub's swagger.
AuthenticationMechanism = DeviceAuthentication


class HubDevice(_HubModel):
    """The stored identity of one device in a built-in hub (``Collection.HUB_DEVICES``, keyed
    ``{hub}/{deviceId}``).

    ``etag`` is the identity's own (IoT Hub's device etag): it changes when the identity is
    written (authentication, status, capabilities), not when its twin or connection state do,
    so that an update on an etag read earlier does not fail because the device reported
    something meanwhile. The store's record etag, which changes on every write, is what the
    registry's read-modify-write cycles are conditioned on. Times are ISO 8601 UTC; ``None``
    is IoT Hub's "never" (:data:`NEVER` in views).
    """

    device_id: str
    hub: str
    authentication: DeviceAuthentication
    capabilities: DeviceCapabilities | None = None
    status: DeviceStatus = DeviceStatus.ENABLED
    status_reason: str | None = None
    status_updated_time: str | None = None
    connection_state: ConnectionState = ConnectionState.DISCONNECTED
    connection_state_updated_time: str | None = None
    last_activity_time: str | None = None
    cloud_to_device_message_count: int = 0
    generation_id: str | None = None
    etag: str | None = None
    #: The model id a device announced in its CONNECT (IoT Plug and Play), shown in its twin.
    model_id: str | None = None
    device_scope: str | None = None
    parent_scopes: list[str] | None = None
    twin: Twin = msgspec.field(default_factory=Twin)
    #: The DPS registration that created the identity (None: created through the hub's API).
    registration_id: str | None = None
    created: str | None = None
    updated: str | None = None


def new_generation_id() -> str:
    """A fresh ``generationId``: IoT Hub's tells apart identities of one device id deleted and
    created again (18 decimal digits, the shape IoT Hub gives them)."""
    return f"{random_below(9 * 10**17) + 10**17}"


def new_device_etag() -> str:
    """A fresh device etag in IoT Hub's shape (base64 of a decimal number, ``"MjM0NTY3ODkw"``)."""
    return base64.b64encode(b"%d" % (random_below(9 * 10**8) + 10**8)).decode("ascii")


# --- the wire: IoT Hub's service REST API -------------------------------------------------------


class Device(_HubModel):
    """IoT Hub's ``Device`` JSON: what ``PUT /devices/{id}`` takes and every device read returns.
    On input only ``deviceId``, ``status``, ``statusReason``, ``authentication``,
    ``capabilities``, ``deviceScope`` and ``parentScopes`` count (the rest is IoT Hub's)."""

    device_id: str | None = None
    generation_id: str | None = None
    etag: str | None = None
    connection_state: ConnectionState | None = None
    status: DeviceStatus | None = None
    status_reason: str | None = None
    connection_state_updated_time: str | None = None
    status_updated_time: str | None = None
    last_activity_time: str | None = None
    cloud_to_device_message_count: int | None = None
    authentication: DeviceAuthentication | None = None
    capabilities: DeviceCapabilities | None = None
    device_scope: str | None = None
    parent_scopes: list[str] | None = None


class TwinProperties(_HubModel):
    desired: Json | None = None
    reported: Json | None = None


class TwinPatch(_HubModel):
    """What ``PATCH`` and ``PUT /twins/{id}`` take: ``tags`` and ``properties.desired`` (a body
    with ``properties.reported`` is refused: the device writes those). Other members of IoT
    Hub's Twin JSON (``deviceId``, ``etag``, ``version``, ...) are read and ignored, as the SDKs
    send back twins they read."""

    device_id: str | None = None
    etag: str | None = None
    tags: Json | None = None
    properties: TwinProperties | None = None


class RegistryStatistics(_HubModel, omit_defaults=False):
    """``GET /statistics/devices`` (every count, zeros too)."""

    total_device_count: int = 0
    enabled_device_count: int = 0
    disabled_device_count: int = 0


class ServiceStatistics(_HubModel, omit_defaults=False):
    """``GET /statistics/service``."""

    connected_device_count: int = 0


def _when(value: str | None) -> str:
    return value if value is not None else NEVER


def device_view(device: HubDevice, *, keys: bool = True, c2d_count: int | None = None) -> Device:
    """The identity as IoT Hub's registry API shows it (``keys=False`` strips the symmetric keys,
    as the admin API does). ``c2d_count``: the queued cloud-to-device messages, when counted."""
    authentication = device.authentication
    if not keys and authentication.symmetric_key is not None:
        authentication = msgspec.structs.replace(authentication, symmetric_key=SymmetricKeyAuth())
    return Device(
        device_id=device.device_id,
        generation_id=device.generation_id,
        etag=device.etag,
        connection_state=device.connection_state,
        status=device.status,
        status_reason=device.status_reason,
        connection_state_updated_time=_when(device.connection_state_updated_time),
        status_updated_time=_when(device.status_updated_time),
        last_activity_time=_when(device.last_activity_time),
        cloud_to_device_message_count=(
            c2d_count if c2d_count is not None else device.cloud_to_device_message_count
        ),
        authentication=authentication,
        capabilities=device.capabilities or DeviceCapabilities(),
        device_scope=device.device_scope,
        parent_scopes=device.parent_scopes,
    )


def twin_view(device: HubDevice) -> Json:
    """The identity's twin as IoT Hub's service API shows it (``GET /twins/{id}``, each item of
    ``SELECT * FROM devices``): the registry fields, ``tags``, and ``properties`` with each
    section's ``$metadata`` and ``$version``."""
    authentication = device.authentication
    view: Json = {
        "deviceId": device.device_id,
        "modelId": device.model_id or "",
        "etag": twin_etag(device.twin),
        "deviceEtag": device.etag,
        "status": device.status.value,
        "statusReason": device.status_reason,
        "statusUpdateTime": _when(device.status_updated_time),
        "connectionState": device.connection_state.value,
        "lastActivityTime": _when(device.last_activity_time),
        "cloudToDeviceMessageCount": device.cloud_to_device_message_count,
        "authenticationType": authentication.type.value,
        "x509Thumbprint": msgspec.to_builtins(authentication.x509_thumbprint or X509Thumbprint()),
        "version": device.twin.version,
        "tags": device.twin.tags,
        "properties": section_view(device.twin),
        "capabilities": msgspec.to_builtins(device.capabilities or DeviceCapabilities()),
    }
    if device.device_scope is not None:
        view["deviceScope"] = device.device_scope
    if device.parent_scopes is not None:
        view["parentScopes"] = device.parent_scopes
    return view


# --- identities DPS creates -------------------------------------------------------------------


def x509_authentication(thumbprint: str | None, *, group: bool, hub: LinkedHub) -> DeviceAuthentication:
    """An X.509 device's authentication in ``hub``, as DPS creates it: ``selfSigned`` with the
    SHA-256 thumbprint (upper-case hex) of the certificate the device presented, in both slots,
    for individual and group devices alike; a group device is ``certificateAuthority`` instead
    when the linked hub asks for it (``x509GroupAuthentication``, provisiond's option)."""
    if group and hub.x509_group_authentication is X509GroupAuthentication.CERTIFICATE_AUTHORITY:
        return DeviceAuthentication(type=AuthenticationType.CERTIFICATE_AUTHORITY)
    return DeviceAuthentication(
        type=AuthenticationType.SELF_SIGNED,
        x509_thumbprint=X509Thumbprint(primary_thumbprint=thumbprint, secondary_thumbprint=thumbprint),
    )


def authentication_for(credential: IdentityCredential, hub: LinkedHub) -> DeviceAuthentication:
    """How the identity of a device that proved ``credential`` authenticates in ``hub``:
    ``sas`` with its keys, or the certificate it presented (:func:`x509_authentication`)."""
    if isinstance(credential, KeyCredential):
        keys = SymmetricKeyAuth(primary_key=credential.primary, secondary_key=credential.secondary)
        return DeviceAuthentication(type=AuthenticationType.SAS, symmetric_key=keys)
    assert isinstance(credential, CertificateCredential)
    return x509_authentication(credential.sha256_thumbprint, group=credential.from_group, hub=hub)
