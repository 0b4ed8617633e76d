"""The built-in hubs' persistent MQTT sessions (clean session 0), in ``Collection.HUB_SESSIONS``.

IoT Hub keeps a device's subscriptions for a clean-session-0 connection, and the official SDKs
count on it: neither the Python nor the Node.js device SDK subscribes again after a reconnect
(iothub.md §1.5), and the Python SDK reconnects every time it renews its SAS token. So a
session is stored, keyed like the identity (``{hub}/{deviceId}``), with:

* the subscriptions (topic filter as the device sent it, and the QoS granted);
* ``c2dSent``: the seq of the newest cloud-to-device message published to the device, so that a
  later connection marks a redelivery with DUP (written when the connection ends, merged into
  what is stored: a connection that a newer one replaced must not write back its subscriptions
  over the newer one's);
* ``identity``: when the identity it belongs to was created, so that a device created again
  under the same id does not inherit a session.

A clean-session-1 CONNECT discards the stored session (MQTT-3.1.2-6) and keeps none. Queued
cloud-to-device messages belong to the device (``Stream.HUB_C2D``), not to the session: they
wait for whichever connection subscribes to them.
"""

from __future__ import annotations

import msgspec

from ..errors import NotFoundError, PreconditionFailedError
from ..storage import Collection, Store, WriteMode

__all__ = ["SessionStore", "StoredSession"]


class StoredSession(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True, frozen=True):
    subscriptions: dict[str, int] = msgspec.field(default_factory=dict)
    c2d_sent: int = 0
    identity: str | None = None


_decoder = msgspec.json.Decoder(StoredSession)
_RETRIES = 5


def _key(hub: str, device_id: str) -> str:
    return f"{hub.lower()}/{device_id}"


class SessionStore:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def load(self, hub: str, device_id: str, *, identity: str | None) -> StoredSession | None:
        """The device's session, or None (none stored, or one of an earlier identity)."""
        record = await self._store.get(Collection.HUB_SESSIONS, _key(hub, device_id))
        if record is None:
            return None
        session = _decoder.decode(record.doc)
        return session if session.identity == identity else None

    async def save(self, hub: str, device_id: str, session: StoredSession) -> None:
        await self._store.write(Collection.HUB_SESSIONS, _key(hub, device_id), msgspec.json.encode(session))

    async def record_c2d_sent(self, hub: str, device_id: str, seq: int, *, identity: str | None) -> None:
        """Raise the stored session's ``c2dSent`` to ``seq``, keeping everything else; nothing
        when no session of this identity is stored (a clean session discarded it)."""
        key = _key(hub, device_id)
        for _ in range(_RETRIES):
            record = await self._store.get(Collection.HUB_SESSIONS, key)
            if record is None:
                return
            session = _decoder.decode(record.doc)
            if session.identity != identity or session.c2d_sent >= seq:
                return
            updated = msgspec.structs.replace(session, c2d_sent=seq)
            try:
                await self._store.write(
                    Collection.HUB_SESSIONS,
                    key,
                    msgspec.json.encode(updated),
                    mode=WriteMode.UPDATE,
                    if_match=record.etag,
                )
                return
            except (PreconditionFailedError, NotFoundError):
                continue

    async def discard(self, hub: str, device_id: str) -> None:
        try:
            await self._store.delete(Collection.HUB_SESSIONS, _key(hub, device_id))
        except NotFoundError:
            pass
