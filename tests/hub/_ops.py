"""What the hub operation tests share: a device provisioned into the built-in hub the real way
(an enrollment, then a registration over HTTPS), and stream entries written into a running
server's database the way the device side writes them (before part "mqtt"'s device session,
and for cases a device cannot produce: an expired message, a foreign hub)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence

import msgspec

from provisiond.device import ProvisioningDeviceClient, SymmetricKeySecurity
from provisiond.hub.messages import CloudToDeviceMessage, TelemetryEvent, partition
from provisiond.service_client import ServiceClient
from provisiond.storage import Entry, Stream, open_store, utc_iso
from tests._server import RunningServer


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def builtin_hub(server: RunningServer) -> str:
    return str(server.info["builtinHub"])


def provision(server: RunningServer, admin: ServiceClient, device_id: str | None = None) -> tuple[str, str]:
    """Enroll a symmetric-key device and register it over HTTPS; return its device id and key
    (its identity is then in the built-in hub)."""
    reg = device_id or uid("dev")
    admin.put(f"/enrollments/{reg}", {"registrationId": reg, "attestation": {"type": "symmetricKey"}})
    key: str = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    with ProvisioningDeviceClient.create(
        f"localhost:{server.port}",
        server.id_scope,
        SymmetricKeySecurity(registration_id=reg, symmetric_key=key),
        "https",
        ca_file=server.ca_file,
        timeout=15,
    ) as client:
        result = client.register()
    assert result.device_id == reg and result.assigned_hub == builtin_hub(server), result
    return reg, key


def _run(server: RunningServer, stream: Stream, items: Sequence[tuple[str, bytes]]) -> list[Entry]:
    async def go() -> list[Entry]:
        store = open_store(f"sqlite:///{server.data_dir / 'provisiond.db'}")
        await store.open()
        try:
            return await store.append(stream, items)
        finally:
            await store.close()

    return asyncio.run(go())


def telemetry(device_id: str, body: bytes, **fields: object) -> TelemetryEvent:
    return TelemetryEvent(device_id=device_id, enqueued_time=utc_iso(time.time()), body=body, **fields)  # type: ignore[arg-type]


def append_events(server: RunningServer, hub: str, events: Sequence[TelemetryEvent]) -> list[Entry]:
    """Store telemetry as the device side does (partition ``{hub}/{deviceId}``)."""
    items = [(partition(hub, e.device_id), msgspec.json.encode(e)) for e in events]
    return _run(server, Stream.HUB_EVENTS, items)


def append_c2d(
    server: RunningServer, hub: str, device_id: str, messages: Sequence[CloudToDeviceMessage]
) -> None:
    _run(server, Stream.HUB_C2D, [(partition(hub, device_id), msgspec.json.encode(m)) for m in messages])


def read_stream(server: RunningServer, stream: Stream, part: str | None = None) -> list[Entry]:
    async def go() -> list[Entry]:
        store = open_store(f"sqlite:///{server.data_dir / 'provisiond.db'}")
        await store.open()
        try:
            return await store.read(stream, partition=part, limit=10_000)
        finally:
            await store.close()

    return asyncio.run(go())
