"""The built-in hub: identities (and their twins) in provisiond's own database, in the
``HUB_DEVICES`` collection keyed ``{hubHostName}/{deviceId}`` (IoT Hub device ids are
case-sensitive; host names are not). The registrar writes them through this backend, in the
registration's transaction; the hub's own API (:mod:`.registry`) reads and writes the same
records."""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from ..models import Deprovision
from ..storage import Collection, Delete, Record, Store, Write, utc_iso
from . import _records
from .base import HubError, IdentityChange, IdentityRef, IdentitySpec, Planned
from .models import DeviceStatus, HubDevice, Twin, authentication_for, new_device_etag, new_generation_id

__all__ = ["BuiltinHub"]


class BuiltinHub:
    """The built-in hubs' backend (a :class:`~provisiond.hub.base.TransactionalHubBackend`).

    :param clock: Unix seconds, for the identities' times and their twins' metadata.
    """

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    @staticmethod
    def key(hub: str, device_id: str) -> str:
        return _records.device_key(hub, device_id)

    async def _record(self, hub: str, device_id: str) -> Record | None:
        return await _records.read(self._store, hub, device_id)

    @staticmethod
    def _decode(record: Record | None) -> HubDevice | None:
        return _records.decode(record) if record else None

    def _now(self) -> str:
        return utc_iso(self._clock())

    def _device(
        self, spec: IdentitySpec, existing: HubDevice | None, twin: Twin | None, now: str
    ) -> HubDevice:
        """The identity ``spec`` describes: a new one, or ``existing`` updated in place (its
        generation, connection state and counters stay; it is enabled again, as DPS's PUT
        does; a new identity etag)."""
        authentication = authentication_for(spec.credential, spec.hub)
        if existing is None:
            return HubDevice(
                device_id=spec.device_id,
                hub=spec.hub.host_name.lower(),
                authentication=authentication,
                capabilities=spec.capabilities,
                status_updated_time=now,
                generation_id=new_generation_id(),
                etag=new_device_etag(),
                twin=twin or Twin(),
                registration_id=spec.registration_id,
                created=now,
                updated=now,
            )
        enabled = existing.status is DeviceStatus.ENABLED
        return msgspec.structs.replace(
            existing,
            authentication=authentication,
            capabilities=spec.capabilities,
            status=DeviceStatus.ENABLED,
            status_reason=existing.status_reason if enabled else None,
            status_updated_time=existing.status_updated_time if enabled else now,
            generation_id=existing.generation_id or new_generation_id(),
            etag=new_device_etag(),
            twin=twin if twin is not None else existing.twin,
            registration_id=spec.registration_id,
            created=existing.created or now,
            updated=now,
        )

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
        now = self._now()
        twin = spec.twin.resolve(existing, removed, now=now)
        planned.append(
            (Collection.HUB_DEVICES, _records.write_of(self._device(spec, existing, twin, now), record))
        )
        return planned

    async def plan_removal(self, ref: IdentityRef, mode: Deprovision) -> list[Planned]:
        record = await self._record(ref.hub, ref.device_id)
        device = self._decode(record)
        if record is None or device is None:
            return []
        if mode is Deprovision.DELETE:
            return [(Collection.HUB_DEVICES, Delete(record.id, record.etag))]
        if device.status is DeviceStatus.DISABLED:
            return []
        now = self._now()
        disabled = msgspec.structs.replace(
            device, status=DeviceStatus.DISABLED, status_updated_time=now, etag=new_device_etag(), updated=now
        )
        return [(Collection.HUB_DEVICES, _records.write_of(disabled, record))]

    # --- one operation at a time (what a remote hub does too) ----------------------------------

    async def get_identity(self, hub: str, device_id: str) -> HubDevice | None:
        return self._decode(await self._record(hub, device_id))

    async def put_identity(self, spec: IdentitySpec) -> HubDevice:
        record = await self._record(spec.hub.host_name, spec.device_id)
        device = self._device(spec, self._decode(record), None, self._now())
        await self._put(_records.write_of(device, record))
        return device

    async def read_twin(self, hub: str, device_id: str) -> Twin | None:
        device = await self.get_identity(hub, device_id)
        return device.twin if device is not None else None

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
        def disable(device: HubDevice) -> HubDevice:
            if device.status is DeviceStatus.DISABLED:
                return device
            return msgspec.structs.replace(
                device,
                status=DeviceStatus.DISABLED,
                status_updated_time=self._now(),
                etag=new_device_etag(),
            )

        return await self._update(hub, device_id, disable)

    async def _update(
        self, hub: str, device_id: str, change: Callable[[HubDevice], HubDevice], *, must_exist: bool = False
    ) -> bool:
        record = await self._record(hub, device_id)
        device = self._decode(record)
        if record is None or device is None:
            if must_exist:
                raise HubError(f"No device {device_id!r} in IoT hub {hub!r}.")
            return False
        updated = msgspec.structs.replace(change(device), updated=self._now())
        await self._put(_records.write_of(updated, record))
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
