"""IoT hubs as provisiond sees them: where device identities are created on assignment.

The built-in hub keeps its identities (and their twins) in provisiond's own database, in the
``HUB_DEVICES`` collection keyed ``{hubHostName}/{deviceId}``. The device document follows IoT
Hub's registry shape (``deviceId``, ``authentication`` with ``type`` ``sas`` / ``selfSigned`` /
``certificateAuthority``, ``capabilities``, ``status``) plus the twin's ``tags`` and desired
properties.

Linked hubs that are not built in are reached through their registry REST API, which is not
implemented yet: assigning a device to one fails with a message that says so.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .models import DeviceCapabilities, InitialTwin, LinkedHub, X509GroupAuthentication
from .storage import Collection, Delete, Store, Write, WriteMode, utc_now

__all__ = [
    "DeviceAuthentication",
    "HubDevice",
    "HubError",
    "HubRegistry",
    "Planned",
    "Twin",
    "twin_from",
    "x509_authentication",
]


class HubError(Exception):
    """The hub could not create or update the identity (internal: the registrar fails the
    registration with DPS's errorCode 400209)."""


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


def twin_from(initial: InitialTwin | None) -> Twin:
    if initial is None:
        return Twin()
    return Twin(tags=initial.tags, desired=initial.properties.desired if initial.properties else None)


#: One write of a registration's transaction (see :meth:`HubRegistry.plan_put`).
Planned = tuple[Collection, Write | Delete]


class HubRegistry:
    """Plans the identity writes of a registration; the registrar commits them together with the
    registration record in one transaction (:meth:`Store.write_atomic`), so a registration is
    never half written: identity and record land together or not at all."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @staticmethod
    def _key(hub: str, device_id: str) -> str:
        return f"{hub.lower()}/{device_id}"

    async def get(self, hub: str, device_id: str) -> HubDevice | None:
        record = await self._store.get(Collection.HUB_DEVICES, self._key(hub, device_id))
        return msgspec.json.decode(record.doc, type=HubDevice) if record else None

    async def plan_put(
        self,
        hub: LinkedHub,
        device_id: str,
        *,
        registration_id: str,
        authentication: DeviceAuthentication,
        capabilities: DeviceCapabilities | None,
        twin: Twin | None,
        initial: Twin,
        probably_new: bool = False,
    ) -> Planned:
        """The write that creates the identity, or updates the existing one in place (on the
        etag read here: a concurrent change makes the transaction fail, and the registrar
        retries). ``twin=None`` keeps the existing twin (data migrated or kept); a twin replaces
        it (initial or reset configuration). Whenever the identity has to be created, there is
        no twin to keep: it gets ``twin`` or else ``initial``, the enrollment's (or the custom
        allocation webhook's) current initial twin. ``probably_new`` skips the read (a first
        registration): the write is then a create, which fails if the identity exists after all.

        :raises HubError: the hub is not one provisiond can write to.
        """
        if not hub.builtin:
            raise HubError(
                f"IoT hub {hub.host_name!r} is not provisiond's built-in hub, and writing identities to external "
                "hubs (their registry REST API) is not implemented yet."
            )
        key = self._key(hub.host_name, device_id)
        existing = None if probably_new else await self._store.get(Collection.HUB_DEVICES, key)
        now = utc_now()
        old = msgspec.json.decode(existing.doc, type=HubDevice) if existing else None
        device = HubDevice(
            device_id=device_id,
            hub=hub.host_name.lower(),
            authentication=authentication,
            capabilities=capabilities,
            twin=twin if twin is not None else (old.twin if old is not None else initial),
            registration_id=registration_id,
            created=old.created if old else now,
            updated=now,
            generation=old.generation if old else 1,
        )
        mode, etag = (WriteMode.CREATE, None) if existing is None else (WriteMode.UPDATE, existing.etag)
        write = Write(key, msgspec.json.encode(device), {"hub": hub.host_name.lower()}, mode, etag)
        return Collection.HUB_DEVICES, write

    async def plan_delete(self, hub: str, device_id: str) -> Planned | None:
        """The delete of an identity (on its current etag), or ``None`` when there is none."""
        key = self._key(hub, device_id)
        existing = await self._store.get(Collection.HUB_DEVICES, key)
        return None if existing is None else (Collection.HUB_DEVICES, Delete(key, existing.etag))
