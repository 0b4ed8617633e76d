"""The built-in hubs' identity registry over both stores: identities (create, update on IoT
Hub's etags, delete), twins (the service's patch and replace, the device's reported patch,
version counters, limits), queries with paging, statistics, connection state; no write lost
under concurrent writers; IoT Hub's error codes; and identities stored before the registry
existed (schema 3) read after the migration."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import msgspec
import pytest

from provisiond.errors import (
    ConflictError,
    InvalidBodyError,
    InvalidIdError,
    InvalidQueryError,
    IotHubCode,
    NotFoundError,
    PreconditionFailedError,
)
from provisiond.hub import (
    AuthenticationType,
    ConnectionState,
    Device,
    DeviceAuthentication,
    DeviceStatus,
    TwinPatch,
    twin_view,
)
from provisiond.hub._records import device_key
from provisiond.hub.models import SymmetricKeyAuth, TwinProperties, X509Thumbprint
from provisiond.hub.registry import HubRegistry, QueryPage
from provisiond.storage import Collection, Stream, open_store
from provisiond.storage._sql import load_migrations
from provisiond.storage.base import Store

HUB = "Hub.Example.Local"
KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="  # 32 bytes
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(store: Store, clock: Clock) -> HubRegistry:
    return HubRegistry(store, clock=clock)


def sas(device_id: str, primary: str | None = None, **extra: object) -> Device:
    keys = SymmetricKeyAuth(primary_key=primary, secondary_key=primary) if primary else None
    auth = DeviceAuthentication(type=AuthenticationType.SAS, symmetric_key=keys)
    return Device(device_id=device_id, authentication=auth, **extra)  # type: ignore[arg-type]


# --- identities --------------------------------------------------------------------------------


async def test_create_generates_keys_and_a_generation(registry: HubRegistry) -> None:
    created = await registry.create(HUB, sas("dev-1"))
    keys = created.authentication.symmetric_key
    assert (
        keys is not None
        and keys.primary_key
        and keys.secondary_key
        and keys.primary_key != keys.secondary_key
    )
    assert (created.hub, created.status, created.connection_state) == (
        "hub.example.local",
        DeviceStatus.ENABLED,
        ConnectionState.DISCONNECTED,
    )
    assert (
        created.generation_id
        and created.etag
        and created.status_updated_time == "2027-01-15T08:00:00.000000Z"
    )
    got = await registry.get(HUB.upper(), "dev-1")  # host names are case-insensitive ...
    assert got == created
    with pytest.raises(NotFoundError) as missing:  # ... device ids are not
        await registry.get(HUB, "DEV-1")
    assert missing.value.iothub_code is IotHubCode.DEVICE_NOT_FOUND
    with pytest.raises(ConflictError) as exists:
        await registry.create(HUB, sas("dev-1", KEY))
    assert exists.value.iothub_code is IotHubCode.DEVICE_ALREADY_EXISTS
    # Given keys are kept; an identity deleted and created again is another generation.
    await registry.delete(HUB, "dev-1")
    again = await registry.create(HUB, sas("dev-1", KEY, status=DeviceStatus.DISABLED))
    assert again.authentication.symmetric_key == SymmetricKeyAuth(primary_key=KEY, secondary_key=KEY)
    assert again.generation_id != created.generation_id and again.status is DeviceStatus.DISABLED


@pytest.mark.parametrize(
    ("device", "error"),
    [
        pytest.param(sas("bad/id"), InvalidIdError, id="slash-in-id"),
        pytest.param(sas("x" * 129), InvalidIdError, id="id-too-long"),
        pytest.param(sas("d", "not base64!"), InvalidBodyError, id="key-not-base64"),
        pytest.param(sas("d", "AAEC"), InvalidBodyError, id="key-too-short"),
        pytest.param(
            Device(device_id="d", authentication=DeviceAuthentication(type=AuthenticationType.SELF_SIGNED)),
            InvalidBodyError,
            id="self-signed-without-thumbprint",
        ),
        pytest.param(
            Device(
                device_id="d",
                authentication=DeviceAuthentication(
                    type=AuthenticationType.SELF_SIGNED,
                    x509_thumbprint=X509Thumbprint(primary_thumbprint="XYZ"),
                ),
            ),
            InvalidBodyError,
            id="thumbprint-not-hex",
        ),
        pytest.param(sas("d", status_reason="r" * 129), InvalidBodyError, id="status-reason-too-long"),
    ],
)
async def test_bad_identities_are_argument_invalid(
    registry: HubRegistry, device: Device, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        await registry.create(HUB, device)
    assert info.value.iothub_code is IotHubCode.ARGUMENT_INVALID  # type: ignore[attr-defined]
    assert await registry.list(HUB) == []


async def test_self_signed_thumbprints_fill_both_slots(registry: HubRegistry) -> None:
    thumbprint = "ab" * 20
    auth = DeviceAuthentication(
        type=AuthenticationType.SELF_SIGNED, x509_thumbprint=X509Thumbprint(primary_thumbprint=thumbprint)
    )
    created = await registry.create(HUB, Device(device_id="x509", authentication=auth))
    assert created.authentication.x509_thumbprint == X509Thumbprint(
        primary_thumbprint=thumbprint.upper(), secondary_thumbprint=thumbprint.upper()
    )


async def test_an_update_without_authentication_keeps_the_identitys(registry: HubRegistry) -> None:
    """A body without ``authentication`` (a status change) keeps a selfSigned identity's
    thumbprints and a sas identity's keys: nothing the device connects with changes."""
    auth = DeviceAuthentication(
        type=AuthenticationType.SELF_SIGNED, x509_thumbprint=X509Thumbprint(primary_thumbprint="cd" * 32)
    )
    created = await registry.create(HUB, Device(device_id="x509-keep", authentication=auth))
    changed = await registry.update(
        HUB, Device(device_id="x509-keep", status=DeviceStatus.DISABLED), if_match="*"
    )
    assert changed.device.authentication == created.authentication
    assert changed.disconnect == "the device was disabled"
    keyed = await registry.create(HUB, sas("sas-keep", KEY))
    enabled = await registry.update(
        HUB, Device(device_id="sas-keep", status=DeviceStatus.ENABLED), if_match="*"
    )
    assert enabled.device.authentication == keyed.authentication and enabled.disconnect is None


async def test_update_on_the_identitys_etag(registry: HubRegistry, clock: Clock) -> None:
    created = await registry.create(HUB, sas("dev-u", KEY))
    # A reported patch changes the record, not the identity's etag: an update on it still works.
    await registry.patch_reported(HUB, "dev-u", {"battery": 90})
    clock.now += 60
    changed = await registry.update(
        HUB, sas("dev-u", status_reason="maintenance"), if_match=f'"{created.etag}"'
    )
    device = changed.device
    assert changed.disconnect is None, "nothing a connected device must be dropped for"
    assert device.authentication == created.authentication, "keys left out are kept"
    assert device.status_reason == "maintenance" and device.status_updated_time == created.status_updated_time
    assert device.etag != created.etag and device.generation_id == created.generation_id
    assert device.twin.reported == {"battery": 90}
    with pytest.raises(PreconditionFailedError) as stale:
        await registry.update(HUB, sas("dev-u"), if_match=created.etag)
    assert stale.value.iothub_code is IotHubCode.PRECONDITION_FAILED
    disabled = await registry.update(HUB, sas("dev-u", status=DeviceStatus.DISABLED), if_match="*")
    assert disabled.disconnect == "the device was disabled"
    assert disabled.device.status_updated_time == "2027-01-15T08:01:00.000000Z"
    rekeyed = await registry.update(
        HUB, sas("dev-u", "ZGV2LXUtbmV3LWtleS0wMTIzNDU2Nzg5"), if_match=disabled.device.etag or ""
    )
    assert rekeyed.disconnect == "the device's credentials changed"
    with pytest.raises(NotFoundError):
        await registry.update(HUB, sas("nobody"), if_match="*")


async def test_delete_on_the_etag_and_its_queue_goes_too(store: Store, registry: HubRegistry) -> None:
    created = await registry.create(HUB, sas("dev-d"))
    await store.append(
        Stream.HUB_C2D, [("hub.example.local/dev-d", b"{}"), ("hub.example.local/other", b"{}")]
    )
    assert (await registry.get(HUB, "dev-d")).cloud_to_device_message_count == 1
    with pytest.raises(PreconditionFailedError):
        await registry.delete(HUB, "dev-d", if_match='"stale"')
    deleted = await registry.delete(HUB, "dev-d", if_match=f'"{created.etag}"')
    assert deleted.device_id == "dev-d"
    assert await registry.find(HUB, "dev-d") is None
    assert await store.entry_count(Stream.HUB_C2D, partition="hub.example.local/dev-d") == 0
    assert await store.entry_count(Stream.HUB_C2D, partition="hub.example.local/other") == 1
    with pytest.raises(NotFoundError) as gone:
        await registry.delete(HUB, "dev-d", if_match="*")
    assert gone.value.iothub_code is IotHubCode.DEVICE_NOT_FOUND


async def test_list_statistics_and_connection_state(registry: HubRegistry, clock: Clock) -> None:
    for n in range(5):
        await registry.create(HUB, sas(f"dev-{n}", status=DeviceStatus.DISABLED if n == 4 else None))
    await registry.create("other.hub", sas("elsewhere"))
    assert [d.device_id for d in await registry.list(HUB)] == [f"dev-{n}" for n in range(5)]
    assert len(await registry.list(HUB, top=2)) == 2 and len(await registry.list(HUB, top=0)) == 5
    stats = await registry.statistics(HUB)
    assert (stats.total_device_count, stats.enabled_device_count, stats.disabled_device_count) == (5, 4, 1)
    clock.now += 5
    assert await registry.set_connection_state(HUB, "dev-1", connected=True)
    assert not await registry.set_connection_state(HUB, "gone", connected=True)
    assert await registry.connected_count(HUB) == 1
    device = await registry.get(HUB, "dev-1")
    assert device.connection_state is ConnectionState.CONNECTED
    assert device.connection_state_updated_time == device.last_activity_time == "2027-01-15T08:00:05.000000Z"
    clock.now += 5
    assert await registry.record_activity(HUB, "dev-1")
    assert await registry.set_connection_state(HUB, "dev-1", connected=False)
    device = await registry.get(HUB, "dev-1")
    assert (
        device.connection_state is ConnectionState.DISCONNECTED and await registry.connected_count(HUB) == 0
    )
    assert device.last_activity_time == "2027-01-15T08:00:10.000000Z"


async def test_batched_activity_keeps_its_own_time_and_never_goes_back(
    registry: HubRegistry, clock: Clock, store: Store
) -> None:
    """The hub's MQTT endpoint writes last activity in batches, later than it happened: the
    time it names is kept (not the write's), an older one changes nothing (no write at all)."""
    await registry.create(HUB, sas("dev-a"))
    start = clock.now
    clock.now += 30
    assert await registry.record_activity(HUB, "dev-a", when=start + 12)
    record = await store.get(Collection.HUB_DEVICES, device_key(HUB, "dev-a"))
    assert (await registry.get(HUB, "dev-a")).last_activity_time == "2027-01-15T08:00:12.000000Z"
    assert await registry.record_activity(HUB, "dev-a", when=start + 3)
    assert (await registry.get(HUB, "dev-a")).last_activity_time == "2027-01-15T08:00:12.000000Z"
    after = await store.get(Collection.HUB_DEVICES, device_key(HUB, "dev-a"))
    assert record is not None and after is not None and after.etag == record.etag
    assert not await registry.record_activity(HUB, "gone", when=start)


# --- twins -------------------------------------------------------------------------------------


def desired(patch: dict[str, object] | None = None, tags: dict[str, object] | None = None) -> TwinPatch:
    return TwinPatch(tags=tags, properties=TwinProperties(desired=patch) if patch is not None else None)


async def test_twin_patches_merge_count_and_say_what_changed(registry: HubRegistry) -> None:
    await registry.create(HUB, sas("dev-t"))
    first = await registry.update_twin(HUB, "dev-t", desired({"rate": 1, "mode": "eco"}, tags={"site": "a"}))
    assert first.desired_changes == {"rate": 1, "mode": "eco"}
    twin = first.device.twin
    assert (twin.version, twin.desired_version, twin.tags) == (3, 2, {"site": "a"})
    etag = twin_view(first.device)["etag"]
    # A patch on the twin's etag: null deletes, and only the members that changed are told.
    second = await registry.update_twin(
        HUB, "dev-t", desired({"mode": None, "rate": 1}), if_match=f'"{etag}"'
    )
    assert second.desired_changes == {"mode": None}
    assert second.device.twin.desired == {"rate": 1} and second.device.twin.desired_version == 3
    with pytest.raises(PreconditionFailedError):
        await registry.update_twin(HUB, "dev-t", desired({"rate": 2}), if_match=etag)
    # Tags alone change no desired property.
    tags_only = await registry.update_twin(HUB, "dev-t", desired(tags={"site": None, "floor": 2}))
    assert tags_only.desired_changes is None and tags_only.device.twin.tags == {"floor": 2}
    # Replace: tags and desired whole, reported kept.
    assert await registry.patch_reported(HUB, "dev-t", {"battery": 80}) == 2
    replaced = await registry.update_twin(HUB, "dev-t", desired({"new": True}, tags={"t": 1}), replace=True)
    assert replaced.desired_changes == {"rate": None, "new": True}
    assert (replaced.device.twin.tags, replaced.device.twin.desired) == ({"t": 1}, {"new": True})
    assert replaced.device.twin.reported == {"battery": 80}


@pytest.mark.parametrize(
    "patch",
    [
        pytest.param(TwinPatch(properties=TwinProperties(reported={"x": 1})), id="reported-from-the-service"),
        pytest.param(desired({"$version": 3}), id="dollar-member"),
        pytest.param(desired({"big": "x" * 4097}), id="string-over-4KB"),
        pytest.param(desired(tags={"a.b": 1}), id="dot-in-key"),
    ],
)
async def test_bad_twin_writes_are_argument_invalid_and_change_nothing(
    registry: HubRegistry, patch: TwinPatch
) -> None:
    before = await registry.create(HUB, sas("dev-bad"))
    with pytest.raises(InvalidBodyError) as info:
        await registry.update_twin(HUB, "dev-bad", patch)
    assert info.value.iothub_code is IotHubCode.ARGUMENT_INVALID
    assert (await registry.get_twin(HUB, "dev-bad")).twin == before.twin


async def test_reported_patches_refuse_what_iot_hub_refuses(registry: HubRegistry) -> None:
    await registry.create(HUB, sas("dev-r"))
    for patch in (
        [1, 2],
        {"$x": 1},
        {"deep": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": {"k": 1}}}}}}}}}}}},
    ):
        with pytest.raises(InvalidBodyError) as info:
            await registry.patch_reported(HUB, "dev-r", patch)
        assert info.value.iothub_code is IotHubCode.ARGUMENT_INVALID
    with pytest.raises(NotFoundError):
        await registry.patch_reported(HUB, "nobody", {"a": 1})


async def test_no_write_is_lost_under_concurrent_writers(registry: HubRegistry) -> None:
    """Reported patches, desired patches and connection-state writes racing on one identity
    all land: each is a read-modify-write on the record's etag, retried when another won."""
    await registry.create(HUB, sas("dev-c"))
    reported = [registry.patch_reported(HUB, "dev-c", {f"r{n}": n}) for n in range(12)]
    wanted = [registry.update_twin(HUB, "dev-c", desired({f"d{n}": n})) for n in range(6)]
    states = [registry.set_connection_state(HUB, "dev-c", connected=n % 2 == 0) for n in range(4)]
    await asyncio.gather(*reported, *wanted, *states)
    twin = (await registry.get_twin(HUB, "dev-c")).twin
    assert twin.reported == {f"r{n}": n for n in range(12)} and twin.reported_version == 13
    assert twin.desired == {f"d{n}": n for n in range(6)} and twin.desired_version == 7
    assert twin.version == 1 + 12 + 6


# --- queries -----------------------------------------------------------------------------------


async def _fleet(registry: HubRegistry) -> None:
    for n in range(9):
        device_id = f"q-{n}"
        await registry.create(HUB, sas(device_id, status=DeviceStatus.DISABLED if n == 8 else None))
        await registry.update_twin(
            HUB, device_id, desired({"rate": n}, tags={"site": "north" if n % 3 == 0 else "south", "n": n})
        )
        if n % 2 == 0:
            await registry.patch_reported(HUB, device_id, {"battery": 10 * n})
    await registry.set_connection_state(HUB, "q-4", connected=True)


def ids(page: QueryPage) -> list[str]:
    return [item["deviceId"] for item in page.items]


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("", [f"q-{n}" for n in range(9)]),
        ("WHERE tags.site = 'north'", ["q-0", "q-3", "q-6"]),
        ('where Tags.Site = "north" and properties.reported.battery > 0', ["q-6"]),
        ("WHERE properties.reported.battery >= 40 OR deviceId = 'q-1'", ["q-1", "q-4", "q-6", "q-8"]),
        ("WHERE NOT IS_DEFINED(properties.reported.battery)", ["q-1", "q-3", "q-5", "q-7"]),
        ("WHERE status = 'disabled'", ["q-8"]),
        ("WHERE status = 'enabled' AND connectionState = 'Connected'", ["q-4"]),
        ("WHERE deviceId = 'q-5'", ["q-5"]),
        ("WHERE deviceId IN ['q-1', 'q-2', 'nobody']", ["q-1", "q-2"]),
        ("WHERE tags.n NIN [0, 1, 2, 3, 4, 5, 6]", ["q-7", "q-8"]),
        ("WHERE properties.desired.rate < 2 AND (tags.site = 'south' OR tags.n = 0)", ["q-0", "q-1"]),
        ("WHERE tags.n = '3'", []),  # a string never equals a number
        ("WHERE tags.missing != 'x'", []),  # nor does a member that is not there compare
        ("WHERE STARTS_WITH(deviceId, 'q-') AND ENDS_WITH(tags.site, 'rth') AND tags.n > 2", ["q-3", "q-6"]),
        ("WHERE properties.desired.$version = 2 AND IS_NUMBER(tags.n)", [f"q-{n}" for n in range(9)]),
    ],
)
async def test_queries_select_the_twins_iot_hub_would(
    registry: HubRegistry, where: str, expected: list[str]
) -> None:
    await _fleet(registry)
    page = await registry.query(HUB, f"SELECT * FROM devices {where}")
    assert (ids(page), page.item_type, page.continuation) == (expected, "twin", None)


async def test_query_pages_resume_after_the_last_item_without_repeats(registry: HubRegistry) -> None:
    await _fleet(registry)
    await registry.create("other.hub", sas("q-0"))  # another hub's identity is never selected
    text = "SELECT * FROM devices WHERE tags.site = 'south'"  # sparse: the scan stops mid-batch
    seen: list[str] = []
    token = None
    pages = 0
    while True:
        page = await registry.query(HUB, text, page_size=2, continuation=token)
        seen += ids(page)
        pages += 1
        if page.continuation is None:
            break
        token = page.continuation
        await registry.create(HUB, sas(f"q-0{pages}"))  # created behind the cursor: not selected
    assert seen == ["q-1", "q-2", "q-4", "q-5", "q-7", "q-8"] and pages == 3


async def test_hubs_whose_names_are_prefixes_of_each_other_stay_apart(registry: HubRegistry) -> None:
    """Schema 10 reads a hub's identities as a range of the record keys ("{hub}/..."): hubs
    whose names start alike, or differ just below or above "/", never see each other's."""
    hubs = {"Hub.A": 5, "hub.a.b": 4, "hub-a": 3, "hub.a0": 2}
    for hub, count in hubs.items():
        for n in range(count):
            await registry.create(
                hub, sas(f"d-{n}", status=DeviceStatus.DISABLED if n == 0 else DeviceStatus.ENABLED)
            )
        await registry.set_connection_state(hub, "d-1", connected=True)
    for hub, count in hubs.items():
        expected = [f"d-{n}" for n in range(count)]
        assert [device.device_id for device in await registry.list(hub.upper())] == expected
        assert [device.device_id for device in await registry.list(hub, top=2)] == expected[:2]
        stats = await registry.statistics(hub)
        assert (stats.total_device_count, stats.enabled_device_count, stats.disabled_device_count) == (
            count,
            count - 1,
            1,
        )
        assert await registry.connected_count(hub) == 1
        seen: list[str] = []
        token = None
        while True:
            page = await registry.query(hub, "SELECT * FROM devices", page_size=2, continuation=token)
            seen += ids(page)
            if (token := page.continuation) is None:
                break
        assert seen == expected
        disabled = await registry.query(hub, "SELECT * FROM devices WHERE status = 'disabled'")
        assert ids(disabled) == ["d-0"]
        counted = await registry.query(
            hub, "SELECT COUNT() AS n FROM devices WHERE connectionState = 'Disconnected'"
        )
        assert counted.items == [{"n": count - 1}]


async def test_count_projection_and_top(registry: HubRegistry) -> None:
    await _fleet(registry)
    count = await registry.query(
        HUB, "SELECT COUNT() AS numberOfDevices FROM devices WHERE tags.site = 'north'"
    )
    assert (count.items, count.item_type) == ([{"numberOfDevices": 3}], "raw")
    projected = await registry.query(
        HUB, "SELECT deviceId, tags.site AS where, properties.reported.battery FROM devices WHERE tags.n < 2"
    )
    assert projected.items == [
        {"deviceId": "q-0", "where": "north", "battery": 0},
        {"deviceId": "q-1", "where": "south"},
    ]
    top = await registry.query(HUB, "SELECT TOP 3 * FROM devices", page_size=100)
    assert ids(top) == ["q-0", "q-1", "q-2"] and top.continuation is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "DELETE FROM devices",
        "SELECT * FROM devices.modules",
        "SELECT * FROM devices WHERE",
        "SELECT * FROM devices WHERE tags.a = ",
        "SELECT * FROM devices WHERE LOWER(tags.a) = 'x'",
        "SELECT * FROM devices WHERE tags.a = 'x' GROUP BY tags.a",
        "SELECT * FROM devices WHERE (tags.a = 'x'",
        "SELECT * FROM devices WHERE tags.a = 'unterminated",
        "SELECT TOP 0 * FROM devices",
        "SELECT * FROM devices WHERE tags.a IN ('x')",
    ],
)
async def test_queries_it_does_not_read_are_400s_that_say_why(registry: HubRegistry, text: str) -> None:
    with pytest.raises(InvalidQueryError) as info:
        await registry.query(HUB, text)
    assert info.value.http_status == 400 and info.value.message


# --- identities stored before the registry (schema 3) ---------------------------------------------

OLD_DOC = {
    "deviceId": "old-dev",
    "hub": "hub.example.local",
    "authentication": {"type": "sas", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}},
    "status": "disabled",
    "twin": {"tags": {"t": 1}, "desired": {"d": 2}},
    "registrationId": "old-dev",
    "created": "2025-01-01T00:00:00.000000Z",
    "updated": "2025-01-01T00:00:00.000000Z",
    "generation": 1,
}


async def test_identities_written_before_the_registry_are_read_and_counted(store_url: str) -> None:
    postgres = store_url.startswith("postgresql")
    dialect = "postgresql" if postgres else "sqlite"
    old = [m for m in load_migrations(dialect) if m.version <= 3]
    row = (
        "hub.example.local/old-dev",
        "hub.example.local/old-dev",
        '"e"',
        "t",
        "t",
        msgspec.json.encode(OLD_DOC),
    )
    if postgres:
        import psycopg

        with psycopg.connect(store_url, autocommit=True) as pg:
            pg.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY, applied_at text NOT NULL)"
            )
            for migration in old:
                pg.execute(migration.text)  # type: ignore[arg-type]
                pg.execute("INSERT INTO schema_migrations VALUES (%s, 'then')", (migration.version,))
            pg.execute(
                "INSERT INTO hub_devices (key, id, etag, created, updated, doc, hub) VALUES (%s, %s, %s, %s, %s, %s, 'hub.example.local')",
                row,
            )
    else:
        Path(store_url).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(store_url)
        with conn:
            conn.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY, applied_at text NOT NULL)"
            )
            for migration in old:
                conn.executescript(migration.text)
                conn.execute("INSERT INTO schema_migrations VALUES (?, 'then')", (migration.version,))
            conn.execute(
                "INSERT INTO hub_devices (key, id, etag, created, updated, doc, hub) VALUES (?, ?, ?, ?, ?, ?, 'hub.example.local')",
                row,
            )
        conn.close()
    store = open_store(store_url)
    await store.open()
    try:
        registry = HubRegistry(store)
        stats = await registry.statistics(HUB)
        assert (stats.total_device_count, stats.disabled_device_count) == (1, 1)
        device = await registry.get(HUB, "old-dev")
        assert (device.twin.tags, device.twin.desired, device.twin.desired_version) == ({"t": 1}, {"d": 2}, 1)
        assert device.connection_state is ConnectionState.DISCONNECTED
        page = await registry.query(HUB, "SELECT * FROM devices WHERE status = 'disabled' AND tags.t = 1")
        assert ids(page) == ["old-dev"]
        assert twin_view(device)["properties"]["desired"]["d"] == 2
    finally:
        await store.close()
