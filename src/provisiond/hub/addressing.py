"""Where the built-in hubs are: their host names (the first one's chosen on a database's first
start), the policies each one gets, and the connection strings that reach them.

Every built-in hub is served on provisiond's own ports and told apart by its host name: MQTT
CONNECT user names and SAS ``sr`` name it, HTTP requests carry it in ``Host``, DPS returns it
as ``assignedHub``, and the server certificate covers it. The *first* built-in hub is the one
a database starts with: ``serve --builtin-hub`` when given, else ``serve --host`` (so that a
device told its ``assignedHub`` reaches it by the name it already uses), recorded in the
database on its first start. A database from before that was recorded keeps the built-in hub
it has (``builtin-hub.provisiond.local``, a name that resolves nowhere by itself).
"""

from __future__ import annotations

import msgspec

from ..errors import ConflictError
from ..models import LinkedHub
from ..storage import Collection, Store, WriteMode
from .policies import OWNER_POLICY, HubPolicies, connection_string

__all__ = [
    "FIRST_HUB_SETTING",
    "LEGACY_BUILTIN_HUB",
    "builtin_hub_names",
    "ensure_builtin_hubs",
    "first_builtin_hub",
    "hub_connections",
    "hub_endpoint",
]

#: The settings key that records the first built-in hub's host name.
FIRST_HUB_SETTING = "builtin_hub"
#: The built-in hub's name before it followed ``--host``.
LEGACY_BUILTIN_HUB = "builtin-hub.provisiond.local"


async def builtin_hub_names(store: Store, first: str | None = None) -> list[str]:
    """The host names of every built-in hub, lower-cased and sorted (``first`` first)."""
    names = []
    for record in await store.query_all(Collection.LINKED_HUBS):
        hub = msgspec.json.decode(record.doc, type=LinkedHub)
        if hub.builtin:
            names.append(hub.host_name.lower())
    return sorted(names, key=lambda name: (name != (first or "").lower(), name))


async def first_builtin_hub(store: Store, *, explicit: str | None, host: str) -> str:
    """The first built-in hub's host name: ``explicit`` (``--builtin-hub``) when given; else
    the one the database recorded; else, for a database that recorded none, the built-in hub it
    has, or ``host`` for a new one (recorded now: first writer wins across nodes)."""
    if explicit:
        await store.setting_setdefault(FIRST_HUB_SETTING, explicit.lower())
        return explicit.lower()
    stored = await store.get_setting(FIRST_HUB_SETTING)
    if stored:
        return stored
    existing = await builtin_hub_names(store)
    proposal = LEGACY_BUILTIN_HUB if LEGACY_BUILTIN_HUB in existing else (existing or [host.lower()])[0]
    return await store.setting_setdefault(FIRST_HUB_SETTING, proposal)


async def ensure_builtin_hubs(store: Store, first: str) -> list[str]:
    """Make sure ``first`` is linked as a built-in hub and every built-in hub has IoT Hub's
    default policies (safe on every start, from several nodes at once); return every built-in
    hub's host name, ``first`` first."""
    hub = LinkedHub(host_name=first, builtin=True, allocation_weight=1, apply_allocation_policy=True)
    try:
        await store.write(Collection.LINKED_HUBS, first, msgspec.json.encode(hub), mode=WriteMode.CREATE)
    except ConflictError:
        pass
    names = await builtin_hub_names(store, first)
    policies = HubPolicies(store)
    for name in names:
        await policies.ensure_defaults(name)
    return names


def hub_endpoint(host: str, https_port: int) -> str:
    """How a service client names a hub: ``host`` on 443 (as Azure's connection strings do; the
    Node.js service SDK only connects to 443), ``host:port`` otherwise."""
    return host if https_port == 443 else f"{host}:{https_port}"


async def hub_connections(store: Store, names: list[str], https_port: int) -> list[dict[str, str | None]]:
    """Each built-in hub's host name and its ``iothubowner`` connection string (``None`` when
    that policy was deleted)."""
    policies = HubPolicies(store)
    connections: list[dict[str, str | None]] = []
    for name in names:
        owner = await policies.find(name, OWNER_POLICY)
        endpoint = hub_endpoint(name, https_port)
        connections.append(
            {"hostName": name, "connectionString": connection_string(endpoint, owner) if owner else None}
        )
    return connections
