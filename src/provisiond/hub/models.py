"""IoT hub identities as provisiond writes them: the device (IoT Hub's registry shape:
``deviceId``, ``authentication`` with ``type`` ``sas`` / ``selfSigned`` /
``certificateAuthority``, ``capabilities``, ``status``) and its twin's ``tags`` and desired
properties. Pure."""

from __future__ import annotations

from typing import Any

import msgspec

from ..attestation.base import CertificateCredential, IdentityCredential, KeyCredential
from ..models import DeviceCapabilities, InitialTwin, LinkedHub, X509GroupAuthentication

__all__ = [
    "DeviceAuthentication",
    "HubDevice",
    "SymmetricKeyAuth",
    "Twin",
    "X509Thumbprint",
    "authentication_for",
    "twin_from",
    "x509_authentication",
]


class _HubModel(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    pass


class SymmetricKeyAuth(_HubModel):
    primary_key: str | None = None
    secondary_key: str | None = None


class X509Thumbprint(_HubModel):
    primary_thumbprint: str | None = None
    secondary_thumbprint: str | None = None


class DeviceAuthentication(_HubModel):
    type: str  # "sas" | "selfSigned" | "certificateAuthority" (IoT Hub's names)
    symmetric_key: SymmetricKeyAuth | None = None
    x509_thumbprint: X509Thumbprint | None = None


class Twin(_HubModel):
    tags: dict[str, Any] | None = None
    desired: dict[str, Any] | None = None
    reported: dict[str, Any] | None = None


class HubDevice(_HubModel):
    device_id: str
    hub: str
    authentication: DeviceAuthentication
    capabilities: DeviceCapabilities | None = None
    status: str = "enabled"
    twin: Twin | None = None
    registration_id: str | None = None
    created: str | None = None
    updated: str | None = None
    generation: int = 1


def x509_authentication(thumbprint: str | None, *, group: bool, hub: LinkedHub) -> DeviceAuthentication:
    """An X.509 device's authentication in ``hub``, as DPS creates it: ``selfSigned`` with the
    SHA-256 thumbprint (upper-case hex) of the certificate the device presented, in both slots,
    for individual and group devices alike; a group device is ``certificateAuthority`` instead
    when the linked hub asks for it (``x509GroupAuthentication``, provisiond's option)."""
    if group and hub.x509_group_authentication is X509GroupAuthentication.CERTIFICATE_AUTHORITY:
        return DeviceAuthentication(type="certificateAuthority")
    return DeviceAuthentication(
        type="selfSigned",
        x509_thumbprint=X509Thumbprint(primary_thumbprint=thumbprint, secondary_thumbprint=thumbprint),
    )


def authentication_for(credential: IdentityCredential, hub: LinkedHub) -> DeviceAuthentication:
    """How the identity of a device that proved ``credential`` authenticates in ``hub``:
    ``sas`` with its keys, or the certificate it presented (:func:`x509_authentication`)."""
    if isinstance(credential, KeyCredential):
        keys = SymmetricKeyAuth(primary_key=credential.primary, secondary_key=credential.secondary)
        return DeviceAuthentication(type="sas", symmetric_key=keys)
    assert isinstance(credential, CertificateCredential)
    return x509_authentication(credential.sha256_thumbprint, group=credential.from_group, hub=hub)


def twin_from(initial: InitialTwin | None) -> Twin:
    if initial is None:
        return Twin()
    return Twin(tags=initial.tags, desired=initial.properties.desired if initial.properties else None)
