"""The built-in hubs' shared access policies: named key pairs with IoT Hub's rights on a hub's
service API (iothub.md §3.1; Microsoft's "Control access to IoT Hub with shared access
signatures"). Each built-in hub gets IoT Hub's five default policies when it is created
(:data:`DEFAULT_POLICIES`); operators list, read (keys on request), create, change and delete
them through the admin API and ``provisiond hub policy``, as they do DPS's policies.

Stored in ``Collection.HUB_POLICIES``, keyed ``{hubHostName}/{keyName}`` (both
case-insensitive). Keys are secrets: reads strip them unless asked.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable

import msgspec

from ..errors import (
    ConflictError,
    DpsCode,
    InvalidBodyError,
    InvalidIdError,
    NotFoundError,
    PreconditionFailedError,
)
from ..protocol.sas import check_key, generate_key
from ..storage import Collection, Record, Store, WriteMode

__all__ = [
    "DEFAULT_POLICIES",
    "OWNER_POLICY",
    "HubAccessPolicy",
    "HubPolicies",
    "HubRight",
    "connection_string",
    "grants",
]


class HubRight(enum.Enum):
    """IoT Hub's rights (the ``accessRights`` of a hub's shared access policy)."""

    REGISTRY_READ = "RegistryRead"
    REGISTRY_WRITE = "RegistryWrite"  # implies RegistryRead, as IoT Hub's RegistryReadWrite
    SERVICE_CONNECT = "ServiceConnect"
    DEVICE_CONNECT = "DeviceConnect"


class HubAccessPolicy(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    key_name: str
    rights: list[HubRight] | None = None
    primary_key: str | None = None
    secondary_key: str | None = None
    etag: str | None = None


OWNER_POLICY = "iothubowner"
#: IoT Hub's default policies, created with every built-in hub.
DEFAULT_POLICIES: dict[str, tuple[HubRight, ...]] = {
    OWNER_POLICY: (
        HubRight.REGISTRY_READ,
        HubRight.REGISTRY_WRITE,
        HubRight.SERVICE_CONNECT,
        HubRight.DEVICE_CONNECT,
    ),
    "service": (HubRight.SERVICE_CONNECT,),
    "device": (HubRight.DEVICE_CONNECT,),
    "registryRead": (HubRight.REGISTRY_READ,),
    "registryReadWrite": (HubRight.REGISTRY_READ, HubRight.REGISTRY_WRITE),
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-._]{0,63}$")
_KEY_BYTES = 32  # IoT Hub's policy keys


def grants(policy: HubAccessPolicy, wanted: Iterable[HubRight]) -> bool:
    """Whether ``policy`` holds any of the ``wanted`` rights (RegistryWrite counts as
    RegistryRead too)."""
    held = set(policy.rights or ())
    if HubRight.REGISTRY_WRITE in held:
        held.add(HubRight.REGISTRY_READ)
    return any(right in held for right in wanted)


def connection_string(endpoint: str, policy: HubAccessPolicy) -> str:
    """IoT Hub's service connection string for ``policy`` (``endpoint``: ``host`` or
    ``host:port``)."""
    return f"HostName={endpoint};SharedAccessKeyName={policy.key_name};SharedAccessKey={policy.primary_key}"


def _key(hub: str, name: str) -> str:
    return f"{hub.lower()}/{name}"


def _present(record: Record, *, keys: bool = False) -> HubAccessPolicy:
    policy = msgspec.json.decode(record.doc, type=HubAccessPolicy)
    if not keys:
        policy = msgspec.structs.replace(policy, primary_key=None, secondary_key=None)
    return msgspec.structs.replace(policy, etag=record.etag)


class HubPolicies:
    """List, get (with or without keys), create or update, and delete the policies of built-in
    hubs. The caller checks that ``hub`` is a built-in hub."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def ensure_defaults(self, hub: str) -> None:
        """Give ``hub`` IoT Hub's default policies when it has no policy at all: a hub just
        linked, or one from a database older than hub policies (first writer wins: several
        nodes may start at once). A hub that has policies keeps what its operator made of them:
        a default policy deleted stays deleted."""
        if await self._store.query_all(Collection.HUB_POLICIES, filters={"hub": hub.lower()}):
            return
        for name, rights in DEFAULT_POLICIES.items():
            policy = HubAccessPolicy(
                key_name=name,
                rights=list(rights),
                primary_key=generate_key(_KEY_BYTES),
                secondary_key=generate_key(_KEY_BYTES),
            )
            try:
                await self._write(hub, policy, mode=WriteMode.CREATE)
            except ConflictError:
                pass

    async def list(self, hub: str) -> list[HubAccessPolicy]:
        """Every policy of ``hub``, keys stripped."""
        records = await self._store.query_all(Collection.HUB_POLICIES, filters={"hub": hub.lower()})
        return [_present(record) for record in records]

    async def find(self, hub: str, name: str) -> HubAccessPolicy | None:
        """The policy with its keys (to check a token), or ``None``."""
        record = await self._store.get(Collection.HUB_POLICIES, _key(hub, name))
        return _present(record, keys=True) if record is not None else None

    async def get(self, hub: str, name: str, *, keys: bool = False) -> HubAccessPolicy:
        """One policy; its keys only when asked. :raises NotFoundError: 404206."""
        return _present(await self._record(hub, name), keys=keys)

    async def _record(self, hub: str, name: str) -> Record:
        record = await self._store.get(Collection.HUB_POLICIES, _key(hub, name))
        if record is None:
            raise NotFoundError(
                f"IoT hub {hub!r} has no shared access policy named {name[:80]!r}.",
                error_code=DpsCode.POLICY_NOT_FOUND,
            )
        return record

    @staticmethod
    def validate_name(name: str) -> str:
        if not _NAME.match(name):
            raise InvalidIdError(
                f"Invalid policy name {name[:80]!r}: use 1-64 characters from A-Z, a-z, 0-9 and '-._'."
            )
        return name

    async def put(
        self, hub: str, name: str, policy: HubAccessPolicy, *, if_match: str | None = None
    ) -> HubAccessPolicy:
        """Create ``name`` (no etag: an existing policy is a 409) or update it (on ``if_match``,
        else the body's ``etag``; ``*``: whatever is stored). Keys not given are kept, or
        generated for a new policy. Returns the policy with its keys.

        :raises InvalidIdError, InvalidBodyError: a bad name, no rights, a bad key.
        :raises ConflictError: it exists and no etag was given. :raises PreconditionFailedError:
            a stale etag.
        """
        self.validate_name(name)
        if policy.key_name.lower() != name.lower():
            raise InvalidBodyError(
                f"keyName {policy.key_name[:80]!r} in the body differs from {name!r} in the URL."
            )
        if not policy.rights:
            raise InvalidBodyError(
                "rights must list at least one right: " + ", ".join(r.value for r in HubRight)
            )
        etag = if_match or policy.etag
        existing = await self._store.get(Collection.HUB_POLICIES, _key(hub, name))
        old = msgspec.json.decode(existing.doc, type=HubAccessPolicy) if existing is not None else None
        doc = HubAccessPolicy(
            key_name=old.key_name if old is not None else name,
            rights=sorted(set(policy.rights), key=lambda r: r.value),
            primary_key=check_key(
                policy.primary_key or (old.primary_key if old else None) or generate_key(_KEY_BYTES),
                "primaryKey",
            ),
            secondary_key=check_key(
                policy.secondary_key or (old.secondary_key if old else None) or generate_key(_KEY_BYTES),
                "secondaryKey",
            ),
        )
        try:
            if etag is None:
                record = await self._write(hub, doc, mode=WriteMode.CREATE)
            else:
                record = await self._write(hub, doc, mode=WriteMode.UPDATE, if_match=etag)
        except ConflictError:
            raise ConflictError(
                f"IoT hub {hub!r} already has a policy {name!r}; to replace it, send its etag in If-Match (or *)."
            ) from None
        except PreconditionFailedError:
            raise PreconditionFailedError(
                f"The etag in If-Match does not match the policy {name!r}."
            ) from None
        return _present(record, keys=True)

    async def delete(self, hub: str, name: str, *, if_match: str | None = None) -> None:
        """:raises NotFoundError: 404206. :raises PreconditionFailedError: 412000."""
        await self._record(hub, name)
        try:
            await self._store.delete(Collection.HUB_POLICIES, _key(hub, name), if_match=if_match)
        except NotFoundError:
            raise NotFoundError(
                f"IoT hub {hub!r} has no shared access policy named {name[:80]!r}.",
                error_code=DpsCode.POLICY_NOT_FOUND,
            ) from None
        except PreconditionFailedError:
            raise PreconditionFailedError(
                f"The etag in If-Match does not match the policy {name!r}."
            ) from None

    async def delete_all(self, hub: str) -> None:
        """Delete every policy of ``hub`` (it is no longer a built-in hub)."""
        for record in await self._store.query_all(Collection.HUB_POLICIES, filters={"hub": hub.lower()}):
            try:
                await self._store.delete(Collection.HUB_POLICIES, record.id)
            except NotFoundError:
                pass

    async def _write(
        self, hub: str, policy: HubAccessPolicy, *, mode: WriteMode, if_match: str | None = None
    ) -> Record:
        return await self._store.write(
            Collection.HUB_POLICIES,
            _key(hub, policy.key_name),
            msgspec.json.encode(msgspec.structs.replace(policy, etag=None)),
            index={"hub": hub.lower()},
            mode=mode,
            if_match=if_match,
        )
