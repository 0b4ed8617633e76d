"""What the built-in hubs' MQTT endpoint reads and writes of an identity, over the store, until
the identity registry (``provisiond/hub/registry.py``, part "registry" of issue 11) replaces it:
the identity and its twin, a reported-properties patch, the connection state and the last
activity. Every write is conditional on the record's etag, with retries; fields this module
does not know are kept as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from .. import twin as twins
from ..errors import NotFoundError, PreconditionFailedError, StorageError
from ..hub.models import HubDevice
from ..storage import Collection, Store, WriteMode, utc_iso

__all__ = ["Identities"]

_RETRIES = 8


def _key(hub: str, device_id: str) -> str:
    return f"{hub.lower()}/{device_id}"


def _twin_of(doc: Mapping[str, Any], now: str) -> twins.Twin:
    raw = doc.get("twin") or {}
    if "version" in raw:
        return msgspec.convert(raw, twins.Twin)
    twin = twins.initial(raw.get("tags"), raw.get("desired"), now=doc.get("created") or now)
    return msgspec.structs.replace(twin, reported=raw.get("reported") or {})


class Identities:
    """The identities of the built-in hubs, as the MQTT endpoint needs them."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    async def get(self, hub: str, device_id: str) -> tuple[HubDevice, twins.Twin] | None:
        record = await self._store.get(Collection.HUB_DEVICES, _key(hub, device_id))
        if record is None:
            return None
        doc = msgspec.json.decode(record.doc)
        return msgspec.convert(doc, HubDevice), _twin_of(doc, utc_iso(self._clock()))

    async def patch_reported(self, hub: str, device_id: str, patch: Any) -> int:
        """Merge the device's reported-properties patch; return the new reported version.

        :raises NotFoundError: the identity is gone. :raises InvalidBodyError, TwinLimitError:
            the patch is not an object, or the result breaks IoT Hub's limits.
        """
        version = 0

        def change(doc: dict[str, Any]) -> None:
            nonlocal version
            now = utc_iso(self._clock())
            twin = twins.patch_reported(_twin_of(doc, now), patch, now=now)
            doc["twin"] = msgspec.to_builtins(twin)
            version = twin.reported_version

        await self._update(hub, device_id, change)
        return version

    async def patch_desired(self, hub: str, device_id: str, patch: Any) -> tuple[dict[str, Any] | None, int]:
        """Merge a desired-properties patch (the service side); return what changed (None:
        nothing) and the new desired version."""
        result: tuple[dict[str, Any] | None, int] = (None, 0)

        def change(doc: dict[str, Any]) -> None:
            nonlocal result
            now = utc_iso(self._clock())
            before = _twin_of(doc, now)
            after = twins.patch_desired(before, patch, now=now)
            doc["twin"] = msgspec.to_builtins(after)
            result = (twins.desired_changes(before, after), after.desired_version)

        await self._update(hub, device_id, change)
        return result

    async def set_connection_state(self, hub: str, device_id: str, *, connected: bool) -> None:
        now = utc_iso(self._clock())

        def change(doc: dict[str, Any]) -> None:
            doc["connectionState"] = "Connected" if connected else "Disconnected"
            doc["connectionStateUpdatedTime"] = now
            doc["lastActivityTime"] = now

        try:
            await self._update(hub, device_id, change)
        except NotFoundError:
            pass  # the identity was deleted while connected

    async def connected(self, hub: str, device_id: str) -> bool:
        record = await self._store.get(Collection.HUB_DEVICES, _key(hub, device_id))
        return record is not None and msgspec.json.decode(record.doc).get("connectionState") == "Connected"

    async def record_activity(self, activity: Mapping[tuple[str, str], float]) -> None:
        for (hub, device_id), when in activity.items():
            stamp = utc_iso(when)

            def change(doc: dict[str, Any], stamp: str = stamp) -> None:
                if doc.get("lastActivityTime", "") < stamp:
                    doc["lastActivityTime"] = stamp

            try:
                await self._update(hub, device_id, change)
            except NotFoundError:
                pass

    async def _update(self, hub: str, device_id: str, change: Callable[[dict[str, Any]], None]) -> None:
        key = _key(hub, device_id)
        for _ in range(_RETRIES):
            record = await self._store.get(Collection.HUB_DEVICES, key)
            if record is None:
                raise NotFoundError(f"No device {device_id!r} in IoT hub {hub!r}.")
            doc = msgspec.json.decode(record.doc)
            change(doc)
            try:
                await self._store.write(
                    Collection.HUB_DEVICES,
                    key,
                    msgspec.json.encode(doc),
                    index=record.index,
                    mode=WriteMode.UPDATE,
                    if_match=record.etag,
                )
                return
            except (PreconditionFailedError, NotFoundError):
                continue
        raise StorageError(f"The identity {key!r} kept changing under concurrent writes.")
