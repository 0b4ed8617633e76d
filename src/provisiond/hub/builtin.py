"""The built-in hub: identities (and their twins) in provisiond's own database, in the
``HUB_DEVICES`` collection keyed ``{hubHostName}/{deviceId}`` (IoT Hub device ids are
case-sensitive; host names are not)."""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from ..models import Deprovision
from ..storage import Collection, Delete, Record, Store, Write, WriteMode, utc_iso
from .base import HubError, IdentityChange, IdentityRef, IdentitySpec, Planned
from .models import HubDevice, Twin, authentication_for

__all__ = ["BuiltinHub"]


class BuiltinHub:
    """The built-in hubs' backend (a :class:`~provisiond.hub.base.TransactionalHubBackend`).

    :param clock: Unix seconds, for the identities' ``created`` and ``updated``.
    """

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    @staticmethod
    def key(hub: str, device_id: str) -> str:
        return f"{hub.lower()}/{device_id}"

    async def _record(self, hub: str, device_id: str) -> Record | None:
        return await self._store.get(Collection.HUB_DEVICES, self.key(hub, device_id))

    @staticmethod
    def _decode(record: Record | None) -> HubDevice | None:
        return msgspec.json.decode(record.doc, type=HubDevice) if record else None

    def _device(self, spec: IdentitySpec, existing: HubDevice | None, twin: Twin | None) -> HubDevice:
        now = utc_iso(self._clock())
        return HubDevice(
            device_id=spec.device_id,
            hub=spec.hub.host_name.lower(),
            authentication=authentication_for(spec.credential, spec.hub),
            capabilities=spec.capabilities,
            twin=twin,
            registration_id=spec.registration_id,
            created=existing.created if existing else now,
            updated=now,
            generation=existing.generation if existing else 1,
        )

    @staticmethod
    def _write(device: HubDevice, existing: Record | None) -> Write:
        key = BuiltinHub.key(device.hub, device.device_id)
        mode, etag = (WriteMode.CREATE, None) if existing is None else (WriteMode.UPDATE, existing.etag)
        return Write(key, msgspec.json.encode(device), {"hub": device.hub}, mode, etag)

    # --- the registration's transaction ------------------------------------------------------

    async def plan(self, change: IdentityChange, *, probably_new: bool) -> list[Planned]:
        planned: list[Planned] = []
        removed = None
        if change.remove is not None:
            record = await self._record(change.remove.hub, change.remove.device_id)
            if record is not None:
                key = self.key(change.remove.hub, change.remove.device_id)
                planned.append((Collection.HUB_DEVICES, Delete(key, record.etag)))
                removed = self._decode(record)
        spec = change.put
        if not spec.hub.builtin:  # the registrar asks HubBackends first; this is our own guard
            raise HubError(f"IoT hub {spec.hub.host_name!r} is not a built-in hub.")
        record = None if probably_new else await self._record(spec.hub.host_name, spec.device_id)
        existing = self._decode(record)
        twin = spec.twin.resolve(existing, removed)
        if twin is None and existing is not None:
            twin = existing.twin
        planned.append((Collection.HUB_DEVICES, self._write(self._device(spec, existing, twin), record)))
        return planned

    async def plan_removal(self, ref: IdentityRef, mode: Deprovision) -> list[Planned]:
        record = await self._record(ref.hub, ref.device_id)
        device = self._decode(record)
        if record is None or device is None:
            return []
        if mode is Deprovision.DELETE:
            return [(Collection.HUB_DEVICES, Delete(record.id, record.etag))]
        if device.status == "disabled":
            return []
        disabled = msgspec.structs.replace(device, status="disabled", updated=utc_iso(self._clock()))
        return [(Collection.HUB_DEVICES, self._write(disabled, record))]

    # --- one operation at a time (what a remote hub does too) ----------------------------------

    async def get_identity(self, hub: str, device_id: str) -> HubDevice | None:
        return self._decode(await self._record(hub, device_id))

    async def put_identity(self, spec: IdentitySpec) -> HubDevice:
        record = await self._record(spec.hub.host_name, spec.device_id)
        existing = self._decode(record)
        device = self._device(spec, existing, existing.twin if existing else Twin())
        await self._put(self._write(device, record))
        return device

    async def read_twin(self, hub: str, device_id: str) -> Twin | None:
        device = await self.get_identity(hub, device_id)
        return (device.twin or Twin()) if device is not None else None

    async def apply_twin(self, hub: str, device_id: str, twin: Twin) -> None:
        await self._update(
            hub, device_id, lambda device: msgspec.structs.replace(device, twin=twin), must_exist=True
        )

    async def delete_identity(self, hub: str, device_id: str) -> bool:
        record = await self._record(hub, device_id)
        if record is None:
            return False
        await self._store.delete(Collection.HUB_DEVICES, record.id, if_match=record.etag)
        return True

    async def disable_identity(self, hub: str, device_id: str) -> bool:
        return await self._update(hub, device_id, lambda d: msgspec.structs.replace(d, status="disabled"))

    async def _update(
        self, hub: str, device_id: str, change: Callable[[HubDevice], HubDevice], *, must_exist: bool = False
    ) -> bool:
        record = await self._record(hub, device_id)
        device = self._decode(record)
        if record is None or device is None:
            if must_exist:
                raise HubError(f"No device {device_id!r} in IoT hub {hub!r}.")
            return False
        updated = msgspec.structs.replace(change(device), updated=utc_iso(self._clock()))
        await self._put(self._write(updated, record))
        return True

    async def _put(self, write: Write) -> None:
        await self._store.write(
            Collection.HUB_DEVICES,
            write.id,
            write.doc,
            index=write.index,
            mode=write.mode,
            if_match=write.if_match,
        )
