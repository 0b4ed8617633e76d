"""How a built-in hub's identity is stored: its key in ``Collection.HUB_DEVICES``, its document
and the index columns derived from it on every write (the one place, for the registrar's
backend and the registry alike)."""

from __future__ import annotations

import msgspec

from ..storage import Collection, Record, Store, Write, WriteMode
from .models import HubDevice

__all__ = ["decode", "device_key", "index_of", "read", "write_of"]

_decoder = msgspec.json.Decoder(HubDevice)


def device_key(hub: str, device_id: str) -> str:
    """The record key of ``device_id`` in ``hub``: host names are case-insensitive, device ids
    are not (the partition of the device's streams too)."""
    return f"{hub.lower()}/{device_id}"


def decode(record: Record) -> HubDevice:
    return _decoder.decode(record.doc)


def index_of(device: HubDevice) -> dict[str, str | None]:
    return {
        "hub": device.hub,
        "status": device.status.value,
        "connection_state": device.connection_state.value,
    }


def write_of(device: HubDevice, existing: Record | None) -> Write:
    """The store write of ``device``: a create when there is no record yet, else an update on
    the etag of the record read."""
    key, doc, index = device_key(device.hub, device.device_id), msgspec.json.encode(device), index_of(device)
    if existing is None:
        return Write(key, doc, index, WriteMode.CREATE)
    return Write(key, doc, index, WriteMode.UPDATE, existing.etag, index_before=existing.index)


async def read(store: Store, hub: str, device_id: str) -> Record | None:
    return await store.get(Collection.HUB_DEVICES, device_key(hub, device_id))
