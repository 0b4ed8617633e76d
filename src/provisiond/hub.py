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

from .errors import ConflictError, PreconditionFailedError
from .models import DeviceCapabilities, InitialTwin, LinkedHub
from .storage import Collection, Record, Store, WriteMode, utc_now

__all__ = ["DeviceAuthentication", "HubDevice", "HubError", "HubRegistry", "Twin"]

_WRITE_ATTEMPTS = 5


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


def twin_from(initial: InitialTwin | None) -> Twin:
    if initial is None:
        return Twin()
    return Twin(tags=initial.tags, desired=initial.properties.desired if initial.properties else None)


class HubRegistry:
    """Creates, updates and deletes device identities in linked hubs."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @staticmethod
    def _key(hub: str, device_id: str) -> str:
        return f"{hub.lower()}/{device_id}"

    async def get(self, hub: str, device_id: str) -> HubDevice | None:
        record = await self._store.get(Collection.HUB_DEVICES, self._key(hub, device_id))
        return msgspec.json.decode(record.doc, type=HubDevice) if record else None

    async def put(
        self,
        hub: LinkedHub,
        device_id: str,
        *,
        registration_id: str,
        authentication: DeviceAuthentication,
        capabilities: DeviceCapabilities | None,
        twin: Twin | None,
        probably_new: bool = False,
    ) -> HubDevice:
        """Create the identity, or update an existing one in place (idempotent: two concurrent
        calls for one device leave one identity). ``twin=None`` keeps the existing twin (data
        migrated or kept); a twin replaces it (initial or reset configuration).
        ``probably_new`` skips the first read (a first registration: one round trip, not two).

        :raises HubError: the hub is not one provisiond can write to.
        """
        if not hub.builtin:
            raise HubError(
                f"IoT hub {hub.host_name!r} is not provisiond's built-in hub, and writing identities to external "
                "hubs (their registry REST API) is not implemented yet."
            )
        key = self._key(hub.host_name, device_id)
        for attempt in range(_WRITE_ATTEMPTS):
            existing = (
                None if probably_new and attempt == 0 else await self._store.get(Collection.HUB_DEVICES, key)
            )
            now = utc_now()
            old = msgspec.json.decode(existing.doc, type=HubDevice) if existing else None
            device = HubDevice(
                device_id=device_id,
                hub=hub.host_name.lower(),
                authentication=authentication,
                capabilities=capabilities,
                twin=twin if twin is not None or old is None else old.twin,
                registration_id=registration_id,
                created=old.created if old else now,
                updated=now,
                generation=old.generation if old else 1,
            )
            doc = msgspec.json.encode(device)
            try:
                if existing is None:
                    await self._write(key, doc, hub, WriteMode.CREATE, None)
                else:
                    await self._write(key, doc, hub, WriteMode.UPDATE, existing.etag)
                return device
            except (ConflictError, PreconditionFailedError):
                continue  # someone else wrote it in between: read again and reapply
        raise HubError(
            f"The identity {device_id!r} in {hub.host_name!r} kept changing under concurrent writes."
        )

    async def _write(
        self, key: str, doc: bytes, hub: LinkedHub, mode: WriteMode, if_match: str | None
    ) -> Record:
        return await self._store.write(
            Collection.HUB_DEVICES,
            key,
            doc,
            index={"hub": hub.host_name.lower()},
            mode=mode,
            if_match=if_match,
        )

    async def delete(self, hub: str, device_id: str) -> bool:
        """Remove an identity; ``False`` when there was none."""
        key = self._key(hub, device_id)
        if await self._store.get(Collection.HUB_DEVICES, key) is None:
            return False
        try:
            await self._store.delete(Collection.HUB_DEVICES, key)
        except LookupError:
            return False
        return True
