"""Linked IoT hubs (where devices are assigned) and the identities provisiond keeps in its
built-in hubs. Azure keeps linked hubs in its Resource Manager; provisiond under ``/admin``."""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import msgspec

from ...errors import (
    DpsCode,
    InvalidBodyError,
    InvalidIdError,
    PreconditionFailedError,
    RequestError,
)
from ...hub import Device, HubDevice, device_view
from ...hub._records import decode
from ...hub.connection import HubConnection, check_credential, parse_ca_certificate
from ...hub.policies import HubPolicies
from ...hub.registry import HubRegistry, device_not_found
from ...models import LinkedHub
from ...regions import NAME_RULE, is_valid_name
from ...storage import Collection, Record, Store
from ._base import Page, check_precondition, delete_record, get_or_404, put_record

__all__ = ["HubIdentity", "LinkedHubs", "identity_view", "read_linked_hubs", "validate_host_name"]

_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*$"
)
#: Identities per page of :meth:`LinkedHubs.devices`.
DEVICES_PAGE = 1000
#: The largest explicit write budget (registry operations a second) a hub may be given.
MAX_WRITE_BUDGET = 100_000.0

#: Checks a remote hub's credential when it is linked (:func:`provisiond.hub.connection.check_credential`).
CredentialCheck = Callable[[LinkedHub, HubConnection], Awaitable[None]]


class HubIdentity(NamedTuple):
    """An identity of a built-in hub as the admin API shows it (:func:`identity_view`) and the
    etag of its record."""

    device: dict[str, Any]
    etag: str


def validate_host_name(host: str) -> str:
    """``host`` if it is a DNS host name. :raises InvalidIdError: it is not."""
    if not _HOST_NAME.match(host):
        raise InvalidIdError(f"Invalid IoT hub host name {host[:260]!r}.")
    return host


async def read_linked_hubs(store: Store) -> dict[str, LinkedHub]:
    """Every linked hub as stored (connection strings included), keyed by lower-cased host name."""
    hubs = [msgspec.json.decode(r.doc, type=LinkedHub) for r in await store.query_all(Collection.LINKED_HUBS)]
    return {hub.host_name.lower(): hub for hub in hubs}


def _present(record: Record, *, secrets: bool = False) -> LinkedHub:
    hub = msgspec.json.decode(record.doc, type=LinkedHub)
    return msgspec.structs.replace(
        hub, etag=record.etag, connection_string=hub.connection_string if secrets else None
    )


def identity_view(device: HubDevice) -> dict[str, Any]:
    """An identity as the admin API shows it: IoT Hub's Device JSON without the keys (secrets,
    like enrollment keys), the DPS registration that created it, and its twin's sections
    without metadata (``tags``, ``desired``, ``reported``; empty ones left out). The hub's own
    API (``/devices``, ``/twins``) shows both in IoT Hub's shapes."""
    view: dict[str, Any] = msgspec.to_builtins(device_view(device, keys=False))
    if device.registration_id is not None:
        view["registrationId"] = device.registration_id
    twin = device.twin
    sections = {"tags": twin.tags, "desired": twin.desired, "reported": twin.reported}
    view["twin"] = {name: section for name, section in sections.items() if section}
    return view


def _present_device(record: Record) -> dict[str, Any]:
    return identity_view(decode(record))


class LinkedHubs:
    """List, get, link (create or update) and unlink IoT hubs; read and delete the identities
    of the built-in hubs. Connection strings and device keys never leave."""

    def __init__(
        self,
        store: Store,
        *,
        builtin_hub: str,
        invalidate: Callable[[], None],
        check: CredentialCheck | None = None,
    ) -> None:
        self._store = store
        self._builtin_hub = builtin_hub
        self._invalidate = invalidate
        self._check = check or check_credential
        self._policies = HubPolicies(store)
        self._registry = HubRegistry(store)

    async def list(self) -> list[LinkedHub]:
        """Every linked hub, the first built-in hub first (the one connection.json names, which
        clients take when they name no hub), the others in the store's order."""
        hubs = [_present(r) for r in await self._store.query_all(Collection.LINKED_HUBS)]
        first = self._builtin_hub.lower()
        return sorted(hubs, key=lambda hub: hub.host_name.lower() != first)

    async def get(self, host: str) -> LinkedHub:
        """:raises NotFoundError: 404204."""
        return _present(await self._get_record(host))

    async def _get_record(self, host: str) -> Record:
        return await get_or_404(self._store, Collection.LINKED_HUBS, host, DpsCode.LINKED_HUB_NOT_FOUND)

    async def put(self, host: str, hub: LinkedHub, *, if_match: str | None = None) -> LinkedHub:
        """Link ``host`` or change it (If-Match as for every admin record; ``None``: the hub's own
        ``etag``). A hub is built in when it was (the one made on first start) or when a new one
        asks for it (``builtin``): further built-in hubs keep their identities in provisiond's
        database too. Any other hub needs a connection string; a change without one keeps the
        stored one. A new connection string or CA certificate is checked against the hub
        before anything is written (:func:`~provisiond.hub.connection.check_credential`).

        :raises InvalidIdError, InvalidBodyError: a bad host name, weight, location, tier,
            budget, CA certificate or connection string, or a missing one.
            :raises RequestError: 400210 / 400211, the hub refused the credential or could not
            be read with it. :raises ConflictError, PreconditionFailedError: the etag rules.
        """
        validate_host_name(host)
        if hub.host_name.lower() != host.lower():
            raise InvalidBodyError(
                f"hostName {hub.host_name[:260]!r} in the body differs from {host!r} in the URL."
            )
        weight = hub.allocation_weight
        if weight is not None and not 1 <= weight <= 1000:
            raise InvalidBodyError(f"allocationWeight must be between 1 and 1000, not {weight}.")
        if hub.location is not None and not is_valid_name(hub.location):
            raise InvalidBodyError(f"location {hub.location[:80]!r} is not a location: it has {NAME_RULE}.")
        existing = await self._store.get(Collection.LINKED_HUBS, host)
        check_precondition(Collection.LINKED_HUBS, host, existing, if_match or hub.etag)
        old = msgspec.json.decode(existing.doc, type=LinkedHub) if existing else None
        builtin = bool((old and old.builtin) or (old is None and hub.builtin))
        connection_string = hub.connection_string or (old.connection_string if old else None)
        if not builtin and not connection_string:
            raise InvalidBodyError(
                "connectionString is required: how provisiond reaches the hub's identity registry "
                "(HostName=...;SharedAccessKeyName=...;SharedAccessKey=...)."
            )
        hub = _remote_settings(hub, builtin)
        if not builtin and connection_string:
            connection = HubConnection.parse(connection_string, host=host)
            if old is None or (connection_string, hub.ca_certificate) != (
                old.connection_string,
                old.ca_certificate,
            ):
                await self._check(hub, connection)
        doc = msgspec.structs.replace(
            hub,
            etag=None,
            builtin=builtin or None,
            connection_string=connection_string,
            allocation_weight=weight if weight is not None else 1,
            apply_allocation_policy=True
            if hub.apply_allocation_policy is None
            else hub.apply_allocation_policy,
        )
        record = await put_record(
            self._store,
            Collection.LINKED_HUBS,
            host,
            msgspec.json.encode(doc),
            if_match or hub.etag,
            invalidate=self._invalidate,
        )
        if builtin:
            await self._policies.ensure_defaults(host)
        return _present(record)

    async def delete(self, host: str, *, if_match: str | None = None) -> None:
        """Unlink ``host`` (its identities stay).

        :raises NotFoundError: 404204. :raises RequestError: the built-in hub, which can be left
            out of allocation but not unlinked. :raises PreconditionFailedError: 412000.
        """
        hub = _present(await self._get_record(host))
        if host.lower() == self._builtin_hub.lower():
            raise RequestError(
                f"{host!r} is the built-in hub; it can be excluded from allocation but not unlinked."
            )
        try:
            await delete_record(
                self._store, Collection.LINKED_HUBS, host, if_match, not_found=DpsCode.NOT_FOUND
            )
            if hub.builtin:  # its identities stay (a hub linked again finds them); its keys go
                await self._policies.delete_all(host)
        finally:
            self._invalidate()

    async def builtin(self, host: str) -> LinkedHub:
        """The linked hub ``host`` if it is built in.

        :raises NotFoundError: 404204. :raises RequestError: a hub provisiond does not serve.
        """
        hub = await self.get(host)
        if not hub.builtin:
            raise RequestError(
                f"{host!r} is not a built-in hub: provisiond keeps no identities or policies of it."
            )
        return hub

    # --- the identities of the built-in hubs ---------------------------------------------------

    async def devices(self, host: str, *, continuation: str | None = None) -> Page[dict[str, Any]]:
        """A page of the identities of ``host`` (keys stripped).

        :raises NotFoundError: 404204, no such linked hub.
        """
        await self._get_record(host)
        page = await self._store.query(
            Collection.HUB_DEVICES,
            filters={"hub": host.lower()},
            limit=DEVICES_PAGE,
            continuation=continuation,
        )
        return Page([_present_device(r) for r in page.records], page.continuation, DEVICES_PAGE)

    async def device(self, host: str, device_id: str) -> HubIdentity:
        """One identity with its twin (keys stripped), and its etag (IoT Hub's device etag).

        :raises NotFoundError: 404001."""
        device = await self._registry.find(host, device_id)
        if device is None:
            raise device_not_found(host, device_id)
        return HubIdentity(identity_view(device), f'"{device.etag}"')

    async def create_device(self, host: str, device: Device) -> dict[str, Any]:
        """Create an identity in the built-in hub ``host`` (as ``PUT /devices/{id}`` of the hub's
        own API does: keys generated when not given); returns IoT Hub's Device JSON, keys
        included.

        :raises NotFoundError: 404204. :raises RequestError: not a built-in hub; a bad id or
            body (400). :raises ConflictError: 409, the device exists.
        """
        await self.builtin(host)
        return msgspec.to_builtins(device_view(await self._registry.create(host, device)))  # type: ignore[no-any-return]

    async def delete_device(self, host: str, device_id: str, *, if_match: str | None = None) -> None:
        """Delete an identity and its queued cloud-to-device messages (its registration record
        stays: the device's next registration creates it again).

        :raises NotFoundError: 404001. :raises PreconditionFailedError: 412000."""
        try:
            await self._registry.delete(host, device_id, if_match=if_match)
        except PreconditionFailedError:
            raise PreconditionFailedError(
                f"The etag in If-Match does not match the device {device_id[:140]!r}.",
                error_code=DpsCode.PRECONDITION_FAILED,
            ) from None


def _remote_settings(hub: LinkedHub, builtin: bool) -> LinkedHub:
    """``hub`` with its write budget and TLS trust checked: none on a built-in hub (its
    identities are written in the registration's transaction, by provisiond itself); on a remote
    hub, ``units`` (default 1) only with a ``tier`` and within what the tier allows, an explicit
    budget above 0, a CA certificate in PEM.

    :raises InvalidBodyError: one of them is wrong.
    """
    remote_only = {
        "tier": hub.tier,
        "units": hub.units,
        "writeBudgetPerSecond": hub.write_budget_per_second,
        "caCertificate": hub.ca_certificate,
    }
    if builtin:
        given = [name for name, value in remote_only.items() if value is not None]
        if given:
            raise InvalidBodyError(
                f"{', '.join(given)}: not for a built-in hub (provisiond writes its identities "
                "in the registration's own transaction)."
            )
        return hub
    units = hub.units
    if units is not None and hub.tier is None:
        raise InvalidBodyError("units needs the hub's tier (F1, B1-B3, S1-S3).")
    if hub.tier is not None:
        units = 1 if units is None else units
        if not 1 <= units <= hub.tier.max_units:
            raise InvalidBodyError(
                f"units must be between 1 and {hub.tier.max_units} for tier {hub.tier.value}, not {units}."
            )
    budget = hub.write_budget_per_second
    if budget is not None and not (math.isfinite(budget) and 0 < budget <= MAX_WRITE_BUDGET):
        raise InvalidBodyError(
            f"writeBudgetPerSecond must be above 0 and at most {MAX_WRITE_BUDGET:g}, not {budget}."
        )
    if hub.ca_certificate is not None:
        parse_ca_certificate(hub.ca_certificate)
    return msgspec.structs.replace(hub, units=units)
