"""The built-in hubs' identity registry: typed operations over the Store, as IoT Hub's service
REST API, the hub's MQTT endpoint and the operator's tools use them.

Theory of operation
-------------------
Every identity of a built-in hub is one record of ``Collection.HUB_DEVICES`` (a
:class:`~provisiond.hub.models.HubDevice`, keyed ``{hub}/{deviceId}``, its twin inside), written
by the registrar when DPS assigns a device (:mod:`.builtin`, in the registration's transaction)
and by this registry otherwise. Each write here is a read-modify-write conditioned on the
record's store etag, retried when another writer (another request, another worker process,
another node) got in between, so that no write is lost: a reported patch racing a desired
patch both land. Twins change only through :mod:`provisiond.twin`, which keeps IoT Hub's merge
rules, version counters and limits.

IoT Hub's preconditions are checked on IoT Hub's etags: the identity's own etag
(:attr:`HubDevice.etag`, ``If-Match`` of ``PUT`` and ``DELETE /devices/{id}``) and the twin's
(:func:`provisiond.twin.twin_etag`, ``If-Match`` of ``PATCH`` and ``PUT /twins/{id}``); ``*``
or none means "whatever is there". Errors carry IoT Hub's codes (:class:`IotHubCode`).

The registry tells no device anything: a write that a connected device must hear of (a desired
change, a deleted or disabled identity, new keys) returns what changed, and its caller tells
the hub's device side (:class:`HubEvents`).
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import msgspec

from .. import twin as twins
from ..errors import (
    ConflictError,
    InvalidBodyError,
    InvalidIdError,
    IotHubCode,
    NotFoundError,
    PreconditionFailedError,
    ThrottledError,
)
from ..protocol.sas import check_key, generate_key
from ..storage import Collection, Record, Store, Stream, WriteMode, etags_match, is_wildcard, utc_iso
from . import _records
from .models import (
    AuthenticationType,
    ConnectionState,
    Device,
    DeviceAuthentication,
    DeviceStatus,
    HubDevice,
    RegistryStatistics,
    SymmetricKeyAuth,
    TwinPatch,
    TwinProperties,
    X509Thumbprint,
    new_device_etag,
    new_generation_id,
    twin_view,
)
from .query import Query, parse

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_LIST",
    "MAX_PAGE_SIZE",
    "HubEvents",
    "HubRegistry",
    "IdentityChanged",
    "NoHubEvents",
    "QueryPage",
    "TwinUpdate",
    "DEVICE_ID_RULE",
    "device_not_found",
    "is_device_id",
    "validate_device_id",
]

#: ``GET /devices?top=N``: at most (and, for none or one out of range, exactly) this many.
MAX_LIST = 1000
#: Query pages: the size when the caller names none, and the most one page holds.
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
#: How often a read-modify-write is tried when other writers keep changing the record, and the
#: longest pause between two tries (random, growing with each try, so that racing writers
#: spread out instead of colliding again).
WRITE_ATTEMPTS = 25
_BACKOFF = 0.002
_SCAN_BATCH = 500
_KEY_BYTES = 32  # IoT Hub's generated keys
_STATUS_REASON_MAX = 128
# IoT Hub's device ids: up to 128 ASCII letters, digits and - . + % _ # * ? ! ( ) , : = @ $ '
_DEVICE_ID = re.compile(r"^[A-Za-z0-9\-.+%_#*?!(),:=@$']{1,128}$")
_THUMBPRINT = re.compile(r"^(?:[0-9A-Fa-f]{40}|[0-9A-Fa-f]{64})$")

Json = dict[str, Any]


class HubEvents(Protocol):
    """What the hub's device side must hear of a registry write (the MQTT broker implements
    it: it tells a connected device, on this node or another)."""

    async def notify_desired(self, hub: str, device_id: str, changes: Json, version: int) -> None:
        """The twin's desired properties changed (``changes``: the members that changed, ``None``
        for deleted ones) and are now at ``version``."""
        ...

    async def disconnect(self, hub: str, device_id: str, reason: str) -> None:
        """Close the device's connection, if it has one (identity deleted, disabled, new keys)."""
        ...


class NoHubEvents:
    """:class:`HubEvents` for a service without a hub device endpoint: nobody to tell."""

    async def notify_desired(self, hub: str, device_id: str, changes: Json, version: int) -> None:
        pass

    async def disconnect(self, hub: str, device_id: str, reason: str) -> None:
        pass


class IdentityChanged(NamedTuple):
    """An identity as written, and why a connected device must be dropped (``None``: it may
    stay connected)."""

    device: HubDevice
    disconnect: str | None


class TwinUpdate(NamedTuple):
    """A twin as written by the service, and the desired members a device must be told of
    (``None``: the desired version did not move; empty: it moved, nothing changed: a connected
    device's session moves on to it without publishing)."""

    device: HubDevice
    desired_changes: Json | None


@dataclass(frozen=True, slots=True)
class QueryPage:
    """A page of a query: its items, IoT Hub's item type and the token of the next page."""

    items: list[Json]
    item_type: str
    continuation: str | None


#: What IoT Hub accepts as a device id, for messages that state the rule.
DEVICE_ID_RULE = "up to 128 ASCII letters, digits and - . + % _ # * ? ! ( ) , : = @ $ '"


def is_device_id(value: str) -> bool:
    """Whether IoT Hub accepts ``value`` as a device id."""
    return _DEVICE_ID.match(value) is not None


def validate_device_id(device_id: str) -> str:
    """``device_id`` if IoT Hub accepts it. :raises InvalidIdError: it does not."""
    if not is_device_id(device_id):
        raise InvalidIdError(
            f"Invalid device id {device_id[:140]!r}: {DEVICE_ID_RULE}.",
            error_code=IotHubCode.ARGUMENT_INVALID,
        )
    return device_id


def device_not_found(hub: str, device_id: str) -> NotFoundError:
    """The error for "the built-in hub ``hub`` has no identity ``device_id``" (404001
    DeviceNotFound), one wording wherever a command or API names a device the hub lacks."""
    return NotFoundError(
        f"Device {device_id[:140]!r} does not exist in IoT hub {hub!r}.",
        error_code=IotHubCode.DEVICE_NOT_FOUND,
    )


def _invalid(message: str) -> InvalidBodyError:
    return InvalidBodyError(message, error_code=IotHubCode.ARGUMENT_INVALID)


def _key(value: str | None, field: str) -> str:
    """A device's symmetric key as given (checked as DPS checks keys, with IoT Hub's error
    code), or a new one of IoT Hub's size."""
    if not value:
        return generate_key(_KEY_BYTES)
    try:
        return check_key(value, f"authentication.symmetricKey.{field}")
    except InvalidBodyError as exc:
        raise _invalid(exc.message) from None


def _authentication(
    given: DeviceAuthentication | None, old: DeviceAuthentication | None
) -> DeviceAuthentication:
    """The authentication a ``PUT /devices/{id}`` body asks for, checked: ``sas`` keys left out
    (or empty, as the Node.js SDK sends them) are kept from ``old`` or generated; thumbprints are
    hex SHA-1 or SHA-256."""
    if given is None:
        given = DeviceAuthentication(type=AuthenticationType.SAS)
    if given.type is AuthenticationType.SAS:
        keys = given.symmetric_key or SymmetricKeyAuth()
        kept = old.symmetric_key if old is not None and old.type is AuthenticationType.SAS else None
        primary = keys.primary_key or (kept.primary_key if kept else None)
        secondary = keys.secondary_key or (kept.secondary_key if kept else None)
        return DeviceAuthentication(
            type=AuthenticationType.SAS,
            symmetric_key=SymmetricKeyAuth(
                primary_key=_key(primary, "primaryKey"), secondary_key=_key(secondary, "secondaryKey")
            ),
        )
    if given.type is AuthenticationType.SELF_SIGNED:
        prints = given.x509_thumbprint or X509Thumbprint()
        if not prints.primary_thumbprint and not prints.secondary_thumbprint:
            raise _invalid("A selfSigned device needs authentication.x509Thumbprint.primaryThumbprint.")
        for name, value in (
            ("primary", prints.primary_thumbprint),
            ("secondary", prints.secondary_thumbprint),
        ):
            if value and not _THUMBPRINT.match(value):
                raise _invalid(f"x509Thumbprint.{name}Thumbprint is not a hex SHA-1 or SHA-256 thumbprint.")
        primary = (prints.primary_thumbprint or prints.secondary_thumbprint or "").upper()
        secondary = (prints.secondary_thumbprint or primary).upper()
        return DeviceAuthentication(
            type=AuthenticationType.SELF_SIGNED,
            x509_thumbprint=X509Thumbprint(primary_thumbprint=primary, secondary_thumbprint=secondary),
        )
    return DeviceAuthentication(type=given.type)


class HubRegistry:
    """The identities and twins of the built-in hubs (see the module docstring).

    :param clock: Unix seconds, for the times the registry writes.
    """

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    def _now(self) -> str:
        return utc_iso(self._clock())

    # --- identities ----------------------------------------------------------------------------

    async def find(self, hub: str, device_id: str) -> HubDevice | None:
        """The identity, or ``None``."""
        record = await _records.read(self._store, hub, device_id)
        return _records.decode(record) if record is not None else None

    async def get(self, hub: str, device_id: str) -> HubDevice:
        """The identity, with its queued cloud-to-device message count.

        :raises NotFoundError: 404001 DeviceNotFound.
        """
        device = await self.find(hub, device_id)
        if device is None:
            raise device_not_found(hub, device_id)
        queued = await self._store.entry_count(Stream.HUB_C2D, partition=_records.device_key(hub, device_id))
        return msgspec.structs.replace(device, cloud_to_device_message_count=queued)

    async def create(self, hub: str, device: Device) -> HubDevice:
        """Create an identity (``PUT /devices/{id}`` without ``If-Match``): keys generated for
        ``sas`` when none are given, enabled unless the body says otherwise, an empty twin.

        :raises InvalidIdError, InvalidBodyError: 400004, a bad id or body.
        :raises ConflictError: 409001 DeviceAlreadyExists.
        """
        device_id = validate_device_id(device.device_id or "")
        now = self._now()
        stored = HubDevice(
            device_id=device_id,
            hub=hub.lower(),
            authentication=_authentication(device.authentication, None),
            capabilities=device.capabilities,
            status=device.status or DeviceStatus.ENABLED,
            status_reason=self._status_reason(device),
            status_updated_time=now,
            generation_id=new_generation_id(),
            etag=new_device_etag(),
            device_scope=device.device_scope,
            parent_scopes=device.parent_scopes,
            created=now,
            updated=now,
        )
        write = _records.write_of(stored, None)
        try:
            await self._store.write(
                Collection.HUB_DEVICES, write.id, write.doc, index=write.index, mode=WriteMode.CREATE
            )
        except ConflictError:
            raise ConflictError(
                f"Device {device_id!r} already exists in IoT hub {hub!r}; update it with If-Match.",
                error_code=IotHubCode.DEVICE_ALREADY_EXISTS,
            ) from None
        return stored

    async def update(self, hub: str, device: Device, *, if_match: str) -> IdentityChanged:
        """Update an identity (``PUT /devices/{id}`` with ``If-Match``: ``*`` or its etag):
        authentication (kept when the body has none), status (and its reason), capabilities and
        scopes are the body's; the generation, the twin and the connection state stay. The identity gets a new etag.

        :raises NotFoundError: 404001. :raises PreconditionFailedError: 412001, a stale etag.
        :raises InvalidBodyError: 400004.
        """
        device_id = validate_device_id(device.device_id or "")
        status_reason = self._status_reason(device)

        def change(old: HubDevice, now: str) -> HubDevice:
            self._check_etag(if_match, old.etag, "device")
            status = device.status or old.status
            return msgspec.structs.replace(
                old,
                # no authentication in the body (a status change): what the device connects with stays
                authentication=(
                    _authentication(device.authentication, old.authentication)
                    if device.authentication is not None
                    else old.authentication
                ),
                capabilities=device.capabilities if device.capabilities is not None else old.capabilities,
                status=status,
                status_reason=status_reason,
                status_updated_time=now if status is not old.status else old.status_updated_time,
                device_scope=device.device_scope if device.device_scope is not None else old.device_scope,
                parent_scopes=device.parent_scopes if device.parent_scopes is not None else old.parent_scopes,
                etag=new_device_etag(),
                updated=now,
            )

        old, new = await self._modify(hub, device_id, change)
        reason = None
        if new.status is DeviceStatus.DISABLED and old.status is not DeviceStatus.DISABLED:
            reason = "the device was disabled"
        elif new.authentication != old.authentication:
            reason = "the device's credentials changed"
        return IdentityChanged(new, reason)

    async def delete(self, hub: str, device_id: str, *, if_match: str | None = None) -> HubDevice:
        """Delete an identity (``DELETE /devices/{id}``; ``If-Match``: ``*``, none, or its etag)
        and the cloud-to-device messages queued for it; returns what was deleted.

        :raises NotFoundError: 404001. :raises PreconditionFailedError: 412001.
        """
        for attempt in range(WRITE_ATTEMPTS):
            if attempt:
                await asyncio.sleep(random.uniform(0, _BACKOFF * attempt))
            record = await _records.read(self._store, hub, device_id)
            if record is None:
                raise device_not_found(hub, device_id)
            device = _records.decode(record)
            self._check_etag(if_match, device.etag, "device")
            try:
                await self._store.delete(Collection.HUB_DEVICES, record.id, if_match=record.etag)
            except PreconditionFailedError:
                continue
            except NotFoundError:
                raise device_not_found(hub, device_id) from None
            await self._store.trim(Stream.HUB_C2D, keep=0, partition=_records.device_key(hub, device_id))
            return device
        raise self._contended(device_id)

    async def list(self, hub: str, *, top: int | None = None) -> list[HubDevice]:
        """``GET /devices?top=N``: at most ``top`` identities (1-1000; anything else: 1000), in
        device id order."""
        limit = top if top is not None and 1 <= top <= MAX_LIST else MAX_LIST
        page = await self._store.query(Collection.HUB_DEVICES, filters={"hub": hub.lower()}, limit=limit)
        return [_records.decode(record) for record in page.records]

    async def statistics(self, hub: str) -> RegistryStatistics:
        """``GET /statistics/devices``: how many identities, enabled and disabled."""
        hub = hub.lower()
        total = await self._store.count(Collection.HUB_DEVICES, filters={"hub": hub})
        enabled = await self._store.count(
            Collection.HUB_DEVICES, filters={"hub": hub, "status": DeviceStatus.ENABLED.value}
        )
        return RegistryStatistics(
            total_device_count=total, enabled_device_count=enabled, disabled_device_count=total - enabled
        )

    async def connected_count(self, hub: str) -> int:
        """``GET /statistics/service``: how many identities are connected now."""
        return await self._store.count(
            Collection.HUB_DEVICES,
            filters={"hub": hub.lower(), "connection_state": ConnectionState.CONNECTED.value},
        )

    # --- queries -------------------------------------------------------------------------------

    async def query(
        self, hub: str, text: str, *, page_size: int | None = None, continuation: str | None = None
    ) -> QueryPage:
        """``POST /devices/query``: one page of the twins ``text`` selects (:mod:`.query`), in
        device id order, and the token of the next page. ``COUNT()`` counts every match, in
        one item; ``TOP n`` answers at most n items, in one page.

        :raises InvalidQueryError: 400 with what is not supported.
        """
        query = parse(text)
        limit = page_size if page_size is not None and page_size > 0 else DEFAULT_PAGE_SIZE
        limit = min(limit, MAX_PAGE_SIZE, query.top or MAX_PAGE_SIZE)
        if query.count is not None:
            total = 0
            async for _ in self._matches(hub, query, None):
                total += 1
            return QueryPage([{query.count: total}], query.item_type, None)
        items: list[Json] = []
        async for record, twin, more in self._matches(hub, query, continuation):
            items.append(query.project(twin))
            if len(items) == limit:
                next_page = self._store.continuation_after(Collection.HUB_DEVICES, record.id)
                return QueryPage(items, query.item_type, next_page if more and query.top is None else None)
        return QueryPage(items, query.item_type, None)

    async def _matches(
        self, hub: str, query: Query, continuation: str | None
    ) -> AsyncIterator[tuple[Record, Json, bool]]:
        """The records ``query`` selects, after ``continuation``, each with its twin view and
        whether records may follow it."""
        required = query.required
        if "deviceId" in required:  # one identity at most: read it
            record = await _records.read(self._store, hub, required["deviceId"])
            if continuation is None and record is not None:
                twin = twin_view(_records.decode(record))
                if query.matches(twin):
                    yield record, twin, False
            return
        filters = {"hub": hub.lower()}
        if "status" in required:
            filters["status"] = required["status"]
        if "connectionState" in required:
            filters["connection_state"] = required["connectionState"]
        token = continuation
        while True:
            page = await self._store.query(
                Collection.HUB_DEVICES, filters=filters, limit=_SCAN_BATCH, continuation=token
            )
            for index, record in enumerate(page.records):
                twin = twin_view(_records.decode(record))
                if query.matches(twin):
                    more = index + 1 < len(page.records) or page.continuation is not None
                    yield record, twin, more
            if page.continuation is None:
                return
            token = page.continuation

    # --- twins ---------------------------------------------------------------------------------

    async def get_twin(self, hub: str, device_id: str) -> HubDevice:
        """The identity with its twin (render it with :func:`~.models.twin_view`).

        :raises NotFoundError: 404001.
        """
        device = await self.find(hub, device_id)
        if device is None:
            raise device_not_found(hub, device_id)
        return device

    async def update_twin(
        self,
        hub: str,
        device_id: str,
        patch: TwinPatch,
        *,
        replace: bool = False,
        if_match: str | None = None,
    ) -> TwinUpdate:
        """The service's twin write: ``PATCH /twins/{id}`` merges ``tags`` and
        ``properties.desired`` (``null`` deletes a member); ``PUT`` (``replace``) replaces both.
        ``If-Match``: ``*``, none, or the twin's etag.

        :raises NotFoundError: 404001. :raises PreconditionFailedError: 412001.
        :raises InvalidBodyError: 400004, reported properties in the body, a ``$`` member, or a
            twin past IoT Hub's limits.
        """
        properties = patch.properties
        if properties is not None and properties.reported is not None:
            raise _invalid("The service cannot write reported properties; only tags and properties.desired.")
        desired = properties.desired if properties is not None else None

        def change(old: HubDevice, now: str) -> HubDevice:
            self._check_etag(if_match, twins.twin_etag(old.twin), "twin")
            twin = old.twin
            try:
                if replace:
                    twin = twins.replace(twin, patch.tags, desired, now=now)
                else:
                    if patch.tags is not None:
                        twin = twins.update_tags(twin, patch.tags, now=now)
                    if desired is not None:
                        twin = twins.patch_desired(twin, desired, now=now)
            except InvalidBodyError as exc:  # TwinLimitError too: IoT Hub's ArgumentInvalid
                raise _invalid(exc.message) from None
            return msgspec.structs.replace(old, twin=twin, updated=now)

        old, new = await self._modify(hub, device_id, change)
        changes = twins.desired_changes(old.twin, new.twin)
        if changes is None and new.twin.desired_version != old.twin.desired_version:
            changes = {}  # nothing changed, but the version moved: connected devices move on too
        return TwinUpdate(new, changes)

    async def patch_desired(self, hub: str, device_id: str, patch: Json) -> tuple[Json | None, int]:
        """A desired-properties patch alone (:meth:`update_twin` without tags or If-Match, for
        tools and tests): what changed (``None``: nothing) and the new desired version."""
        update = await self.update_twin(hub, device_id, TwinPatch(properties=TwinProperties(desired=patch)))
        return update.desired_changes, update.device.twin.desired_version

    async def patch_reported(self, hub: str, device_id: str, patch: Any) -> int:
        """The device's reported-properties PATCH (MQTT ``$iothub/twin/PATCH/properties/
        reported/``): merged, ``null`` deletes; the identity's last activity is now. Returns the
        new reported ``$version``.

        :raises NotFoundError: 404001. :raises InvalidBodyError: 400004, not an object, a ``$``
            member, or past IoT Hub's limits.
        """

        def change(old: HubDevice, now: str) -> HubDevice:
            try:
                twin = twins.patch_reported(old.twin, patch, now=now)
            except InvalidBodyError as exc:
                raise _invalid(exc.message) from None
            return msgspec.structs.replace(old, twin=twin, last_activity_time=now, updated=now)

        _, new = await self._modify(hub, device_id, change)
        return new.twin.reported_version

    # --- the device side -----------------------------------------------------------------------

    async def set_connection_state(self, hub: str, device_id: str, *, connected: bool) -> bool:
        """Record that the device connected (also its last activity) or disconnected; ``False``
        when the identity is gone."""
        state = ConnectionState.CONNECTED if connected else ConnectionState.DISCONNECTED

        def change(old: HubDevice, now: str) -> HubDevice:
            return msgspec.structs.replace(
                old,
                connection_state=state,
                connection_state_updated_time=now,
                last_activity_time=now if connected else old.last_activity_time,
                updated=now,
            )

        return await self._modify_if_present(hub, device_id, change)

    async def record_activity(self, hub: str, device_id: str, *, when: float | None = None) -> bool:
        """Record the device's last activity (it sent or received something) at ``when`` (Unix
        seconds; now by default), unless a later one is recorded; ``False`` when the identity
        is gone. A caller on a hot path (telemetry) batches it: at most every few seconds per
        device."""
        stamp = utc_iso(when) if when is not None else None

        def change(old: HubDevice, now: str) -> HubDevice:
            if old.last_activity_time is not None and old.last_activity_time >= (stamp or now):
                return old  # nothing to write
            return msgspec.structs.replace(old, last_activity_time=stamp or now, updated=now)

        return await self._modify_if_present(hub, device_id, change)

    # --- the read-modify-write cycle ------------------------------------------------------------

    async def _modify(
        self, hub: str, device_id: str, change: Callable[[HubDevice, str], HubDevice]
    ) -> tuple[HubDevice, HubDevice]:
        """Read the identity, ``change`` it, write it back on the store etag read; again when
        another writer got in between. Returns the identity before and after.

        :raises NotFoundError: 404001. :raises ThrottledError: 429001, the record kept changing.
        """
        for attempt in range(WRITE_ATTEMPTS):
            if attempt:
                await asyncio.sleep(random.uniform(0, _BACKOFF * attempt))
            record = await _records.read(self._store, hub, device_id)
            if record is None:
                raise device_not_found(hub, device_id)
            old = _records.decode(record)
            new = change(old, self._now())
            if new is old:  # nothing to write
                return old, new
            if await self._write_back(new, record):
                return old, new
        raise self._contended(device_id)

    async def _modify_if_present(
        self, hub: str, device_id: str, change: Callable[[HubDevice, str], HubDevice]
    ) -> bool:
        try:
            await self._modify(hub, device_id, change)
        except NotFoundError:
            return False
        return True

    async def _write_back(self, device: HubDevice, record: Record) -> bool:
        write = _records.write_of(device, record)
        try:
            await self._store.write(
                Collection.HUB_DEVICES,
                write.id,
                write.doc,
                index=write.index,
                mode=WriteMode.UPDATE,
                if_match=record.etag,
            )
        except (PreconditionFailedError, NotFoundError):
            return False  # changed or deleted meanwhile: read again
        return True

    @staticmethod
    def _check_etag(if_match: str | None, etag: str | None, what: str) -> None:
        if if_match is None or is_wildcard(if_match):
            return
        if etag is None or not etags_match(if_match, etag):
            raise PreconditionFailedError(
                f"The etag in If-Match does not match the {what}'s ({etag!r}).",
                error_code=IotHubCode.PRECONDITION_FAILED,
            )

    @staticmethod
    def _status_reason(device: Device) -> str | None:
        reason = device.status_reason
        if reason is not None and len(reason) > _STATUS_REASON_MAX:
            raise _invalid(f"statusReason is longer than {_STATUS_REASON_MAX} characters.")
        return reason

    @staticmethod
    def _contended(device_id: str) -> ThrottledError:
        return ThrottledError(
            f"Device {device_id[:140]!r} kept changing under concurrent writes; retry.",
            retry_after=1,
            error_code=IotHubCode.THROTTLING,
        )
