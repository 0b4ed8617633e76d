"""The built-in hubs' shared access policies and addressing over both stores: IoT Hub's default
policies created once (several nodes at once), kept per hub, keys secret unless asked, etags on
updates; the first built-in hub recorded on a database's first start."""

from __future__ import annotations

import asyncio

import pytest

from provisiond.errors import (
    ConflictError,
    InvalidBodyError,
    InvalidIdError,
    NotFoundError,
    PreconditionFailedError,
)
from provisiond.hub.addressing import (
    LEGACY_BUILTIN_HUB,
    builtin_hub_names,
    ensure_builtin_hubs,
    first_builtin_hub,
    hub_connections,
)
from provisiond.hub.policies import DEFAULT_POLICIES, HubAccessPolicy, HubPolicies, HubRight, grants
from provisiond.storage import Store


async def test_defaults_once_per_hub_and_keys_secret(store: Store) -> None:
    policies = HubPolicies(store)
    await asyncio.gather(*(policies.ensure_defaults("Hub-A.example") for _ in range(4)))
    await policies.ensure_defaults("hub-b.example")
    listed = await policies.list("hub-a.example")
    assert sorted(p.key_name for p in listed) == sorted(DEFAULT_POLICIES)
    assert all(p.primary_key is None and p.secondary_key is None and p.etag for p in listed)
    owner_a = await policies.get("hub-a.example", "iothubowner", keys=True)
    owner_b = await policies.get("hub-b.example", "iothubowner", keys=True)
    assert owner_a.primary_key and owner_a.primary_key != owner_b.primary_key  # per hub
    # creating the defaults again keeps the keys
    await policies.ensure_defaults("hub-a.example")
    assert (await policies.get("hub-a.example", "iothubowner", keys=True)).primary_key == owner_a.primary_key
    # and a default policy the operator deleted stays deleted (every start ensures the defaults)
    await policies.delete("hub-b.example", "iothubowner")
    await policies.ensure_defaults("hub-b.example")
    with pytest.raises(NotFoundError):
        await policies.get("hub-b.example", "iothubowner")
    assert grants(owner_a, (HubRight.SERVICE_CONNECT,))
    reader = await policies.get("hub-a.example", "registryRead")
    assert grants(reader, (HubRight.REGISTRY_READ,)) and not grants(reader, (HubRight.REGISTRY_WRITE,))
    writer = await policies.get("hub-a.example", "registryReadWrite")
    assert grants(HubAccessPolicy(key_name="w", rights=[HubRight.REGISTRY_WRITE]), (HubRight.REGISTRY_READ,))
    assert writer.rights is not None and HubRight.REGISTRY_WRITE in writer.rights


async def test_put_and_delete_on_etags(store: Store) -> None:
    policies = HubPolicies(store)
    made = await policies.put(
        "hub.example", "ops", HubAccessPolicy(key_name="ops", rights=[HubRight.REGISTRY_READ])
    )
    assert made.primary_key and made.secondary_key and made.etag
    with pytest.raises(ConflictError):
        await policies.put(
            "hub.example", "ops", HubAccessPolicy(key_name="ops", rights=[HubRight.REGISTRY_READ])
        )
    changed = await policies.put(
        "hub.example",
        "ops",
        HubAccessPolicy(key_name="ops", rights=[HubRight.SERVICE_CONNECT]),
        if_match=made.etag,
    )
    assert (
        changed.rights == [HubRight.SERVICE_CONNECT] and changed.primary_key == made.primary_key
    )  # keys kept
    with pytest.raises(PreconditionFailedError):
        await policies.put(
            "hub.example",
            "ops",
            HubAccessPolicy(key_name="ops", rights=[HubRight.REGISTRY_READ]),
            if_match=made.etag,
        )
    with pytest.raises(InvalidBodyError):
        await policies.put("hub.example", "bad", HubAccessPolicy(key_name="bad", rights=[]))
    with pytest.raises(InvalidBodyError):
        await policies.put(
            "hub.example",
            "bad",
            HubAccessPolicy(key_name="bad", rights=[HubRight.REGISTRY_READ], primary_key="short"),
        )
    with pytest.raises(InvalidIdError):
        await policies.put(
            "hub.example", "no/slash", HubAccessPolicy(key_name="no/slash", rights=[HubRight.REGISTRY_READ])
        )
    with pytest.raises(PreconditionFailedError):
        await policies.delete("hub.example", "ops", if_match=made.etag)
    await policies.delete("hub.example", "ops", if_match='"*"')
    with pytest.raises(NotFoundError):
        await policies.get("hub.example", "ops")
    assert await policies.find("hub.example", "ops") is None


async def test_first_hub_is_recorded_once(store: Store) -> None:
    # a new database: the first start's --host, then kept whatever later starts say
    assert await first_builtin_hub(store, explicit=None, host="Dev.Example") == "dev.example"
    assert await first_builtin_hub(store, explicit=None, host="other.example") == "dev.example"
    names = await ensure_builtin_hubs(store, "dev.example")
    assert names == ["dev.example"]
    assert await builtin_hub_names(store, "dev.example") == ["dev.example"]
    connections = await hub_connections(store, names, 8443)
    owner = await HubPolicies(store).get("dev.example", "iothubowner", keys=True)
    assert connections == [
        {
            "hostName": "dev.example",
            "connectionString": f"HostName=dev.example:8443;SharedAccessKeyName=iothubowner;SharedAccessKey={owner.primary_key}",
        }
    ]
    assert (await hub_connections(store, names, 443))[0]["connectionString"].startswith(
        "HostName=dev.example;"
    )


async def test_a_database_with_the_legacy_hub_keeps_it(store: Store) -> None:
    await ensure_builtin_hubs(store, LEGACY_BUILTIN_HUB)  # as a schema-3 database has it
    from provisiond.hub.addressing import FIRST_HUB_SETTING

    assert await store.get_setting(FIRST_HUB_SETTING) is None
    assert await first_builtin_hub(store, explicit=None, host="localhost") == LEGACY_BUILTIN_HUB
