"""The hub seam: what a registration asks of IoT hubs, and the interface every hub backend
implements.

Theory of operation
-------------------
The registrar's assignment (``service/assignment.py``) decides, without reading any hub, an
:class:`IdentityChange`: the identity to put in the assigned hub (:class:`IdentitySpec`: device
id, authentication, capabilities, and a :class:`TwinPlan` saying which twin it ends up with),
and the old identity to remove when the device moved. Carrying it out is the backend's part.

A :class:`HubBackend` does what IoT Hub's registry REST API does, one idempotent call at a time,
outside any database transaction: get an identity, put one (create or update in place), read
and replace its twin, delete or disable it. A remote hub (issue 12: an Azure IoT hub over HTTPS,
throttled, failing, slow) implements exactly this; :func:`resolve_twin` and :func:`carry_out`
are the sequence a worker runs for a change (docs/architecture.md, "Hub backends and the
never-half-written guarantee", says how a registration stays whole around it).

The built-in hub keeps its identities in provisiond's own database, so it is also a
:class:`TransactionalHubBackend`: :meth:`~TransactionalHubBackend.plan` turns a change into
store writes that commit in the registration record's own transaction (``Store.write_atomic``):
identity and record land together or not at all. That is the special case the registrar uses
whenever every hub a change touches is built in (:meth:`HubBackends.transactional`).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import msgspec

from .. import twin as twins
from ..attestation.base import IdentityCredential
from ..errors import ConfigurationError, HubError
from ..models import Deprovision, DeviceCapabilities, InitialTwin, LinkedHub
from ..storage import Collection, Delete, Write
from .models import HubDevice, Twin

__all__ = [
    "HubBackend",
    "HubBackends",
    "HubError",
    "IdentityChange",
    "IdentityRef",
    "IdentitySpec",
    "Planned",
    "TransactionalHubBackend",
    "TwinPlan",
    "TwinSource",
    "carry_out",
    "resolve_twin",
]


#: One write of a registration's transaction (see :meth:`TransactionalHubBackend.plan`).
Planned = tuple[Collection, Write | Delete]


class TwinSource(enum.Enum):
    """Where the twin of the assigned identity comes from."""

    INITIAL = "initial"  # the initial twin (the enrollment's, or the custom allocation webhook's)
    KEEP = "keep"  # the identity's own (the initial twin when the identity has to be created)
    MIGRATE = "migrate"  # the removed identity's (as KEEP when that has none)
    RESET = "reset"  # the initial twin, replacing what the device had in its old hub


class TwinPlan(msgspec.Struct, frozen=True):
    source: TwinSource
    #: The enrollment's (or the webhook's) current initial twin (None: none).
    initial: InitialTwin | None = None

    def resolve(self, existing: HubDevice | None, removed: HubDevice | None, *, now: str) -> Twin | None:
        """The twin the identity gets, given the identity as it exists now (``None``: it has to
        be created) and the identity the change removes (for MIGRATE); ``now`` stamps what is
        written. ``None``: keep the existing identity's twin as it is.

        A migrated twin is the removed identity's, whole (its versions and reported properties
        too). The initial twin is a new twin's tags and desired properties, every counter at 1;
        on an identity that exists it replaces the tags and desired properties as
        ``PUT /twins/{id}`` does (reported properties stay, the versions go on counting, so that
        a connected device sees a new desired ``$version``).

        :raises TwinLimitError: the initial twin breaks IoT Hub's limits.
        """
        if self.source is TwinSource.MIGRATE and removed is not None:
            return removed.twin
        if self.source in (TwinSource.KEEP, TwinSource.MIGRATE) and existing is not None:
            return None
        tags, desired = _initial_sections(self.initial)
        if existing is None:
            return twins.initial(tags, desired, now=now)
        return twins.replace(existing.twin, tags, desired, now=now)


def _initial_sections(
    initial: InitialTwin | None,
) -> tuple[dict[str, object] | None, dict[str, object] | None]:
    if initial is None:
        return None, None
    return initial.tags, initial.properties.desired if initial.properties else None


class IdentityRef(msgspec.Struct, frozen=True):
    hub: str  # host name, lower-cased
    device_id: str


class IdentitySpec(msgspec.Struct, frozen=True, kw_only=True):
    """The identity a registration puts in its assigned hub."""

    hub: LinkedHub
    device_id: str
    registration_id: str
    credential: IdentityCredential
    capabilities: DeviceCapabilities | None
    twin: TwinPlan

    @property
    def ref(self) -> IdentityRef:
        return IdentityRef(self.hub.host_name.lower(), self.device_id)


class IdentityChange(msgspec.Struct, frozen=True, kw_only=True):
    """What an assignment does to hub identities: put one, and remove the old one when the
    device moved (its twin is the source of a MIGRATE)."""

    put: IdentitySpec
    remove: IdentityRef | None = None
    #: The decision's guess that the identity does not exist yet (a first assignment, or a
    #: move): a backend may create without reading first, and fail if the guess was wrong.
    probably_new: bool = False


class HubBackend(Protocol):
    """A hub's identity registry, one idempotent operation at a time (IoT Hub's registry REST
    API: ``/devices/{id}``, ``/twins/{id}``), outside any database transaction."""

    async def get_identity(self, hub: str, device_id: str) -> HubDevice | None:
        """The identity with its twin, or ``None``."""
        ...

    async def put_identity(self, spec: IdentitySpec) -> HubDevice:
        """Create the identity, or update it in place (authentication, capabilities, enabled;
        IoT Hub: ``PUT /devices/{id}``, ``If-Match: "*"`` on update). A created identity has
        an empty twin; an updated one keeps its twin.

        :raises HubError: the hub refused it.
        """
        ...

    async def read_twin(self, hub: str, device_id: str) -> Twin | None:
        """The identity's twin (for a migration), or ``None`` when there is no identity."""
        ...

    async def apply_twin(self, hub: str, device_id: str, twin: Twin) -> None:
        """Give the identity ``twin`` (from :meth:`TwinPlan.resolve`). A remote hub replaces the
        tags and desired properties (IoT Hub: ``PUT /twins/{id}``); the built-in hub keeps the
        whole twin, versions and reported properties included.

        :raises HubError: there is no such identity, or the hub refused it.
        """
        ...

    async def delete_identity(self, hub: str, device_id: str) -> bool:
        """Delete the identity (IoT Hub: ``DELETE /devices/{id}``, ``If-Match: "*"``);
        ``False`` when there was none (so a retry is harmless)."""
        ...

    async def disable_identity(self, hub: str, device_id: str) -> bool:
        """Set the identity's status to ``disabled`` (deprovisioning that keeps it); ``False``
        when there is none."""
        ...


class TransactionalHubBackend(HubBackend, Protocol):
    """A hub whose identities live in provisiond's database (the built-in hub)."""

    async def plan(self, change: IdentityChange, *, probably_new: bool) -> list[Planned]:
        """The store writes that carry out ``change``, to commit in one transaction with the
        registration record: the removal of the old identity (on its etag), then the put (a
        create, or an update on the etag read here). A concurrent change makes the transaction
        fail, and the registrar plans again. ``probably_new``: create without reading first.
        """
        ...

    async def plan_removal(self, ref: IdentityRef, mode: Deprovision) -> list[Planned]:
        """The store writes that disable or delete the identity ``ref`` (deprovisioning), to
        commit in the transaction that deletes its registration record: a delete on the
        identity's etag, or the update that disables it; nothing when there is no identity."""
        ...


class HubBackends:
    """Which backend serves which hub: the built-in hubs (``builtin`` linked hubs, and the
    identities of a hub no longer linked, which are in the built-in store too), and a remote
    backend per linked hub that is not built in (``remote`` makes it: by default
    :class:`~provisiond.hub.remote.RemoteHub`, its registry REST API).
    """

    def __init__(
        self,
        builtin: TransactionalHubBackend,
        remote: Callable[[LinkedHub], HubBackend] | None = None,
    ) -> None:
        self.builtin = builtin
        self._remote_factory = remote
        self._remote: dict[str, tuple[LinkedHub, HubBackend]] = {}

    @staticmethod
    def is_transactional(change: IdentityChange, linked: Mapping[str, LinkedHub]) -> bool:
        """Whether every hub ``change`` touches is built in (else it goes through the outbox)."""
        if not change.put.hub.builtin:
            return False
        if change.remove is None:
            return True
        old = linked.get(change.remove.hub)
        return old is None or bool(old.builtin)

    def transactional(self, change: IdentityChange) -> TransactionalHubBackend:
        """The backend that commits ``change`` in the registration's transaction.

        :raises HubError: the change touches a hub that is not built in (it goes through the
            durable outbox: ``service/hub_writer.py``).
        """
        hub = change.put.hub
        if not hub.builtin:
            raise HubError(
                f"IoT hub {hub.host_name!r} is not built in: its identities go through the outbox."
            )
        return self.builtin

    def for_hub(self, hub: LinkedHub | None) -> HubBackend:
        """The backend of a linked hub (``None``: a hub no longer linked: the built-in store).
        A remote hub's backend is made once per hub and made again when the hub's link changes.

        :raises HubError: a remote hub without a usable connection string.
        """
        if hub is None or hub.builtin:
            return self.builtin
        key = hub.host_name.lower()
        known = self._remote.get(key)
        if known is not None and known[0] == hub:
            return known[1]
        if self._remote_factory is None:
            from .remote import RemoteHub

            try:
                backend: HubBackend = RemoteHub(hub)
            except ConfigurationError as exc:  # no usable connection string: the link is broken
                raise HubError(str(exc), hub=key) from exc
        else:
            backend = self._remote_factory(hub)
        self._remote[key] = (hub, backend)
        return backend

    async def aclose(self) -> None:
        """Close the remote backends' connections."""
        for _, backend in self._remote.values():
            close = getattr(backend, "aclose", None)
            if close is not None:
                await close()
        self._remote.clear()

    async def plan_removal(self, ref: IdentityRef, hub: LinkedHub | None, mode: Deprovision) -> list[Planned]:
        """Deprovisioning: the store writes that disable or delete the identity ``ref``, to commit
        in the transaction that deletes the registration record naming it (so that the record
        and the identity cannot disagree after a crash). ``hub``: ``ref``'s linked hub (``None``:
        no longer linked). A built-in hub's identity is written in that transaction; a remote
        hub's removal is an item of the durable outbox in the same transaction, which the hub
        writer carries out (docs/architecture.md, "Deprovisioning").

        """
        if hub is None or hub.builtin:
            return await self.builtin.plan_removal(ref, mode)
        from .outbox import removal  # (outbox builds on this module)

        return [removal(ref, mode, now=time.time())]


async def resolve_twin(
    change: IdentityChange, new: HubBackend, old: HubBackend | None, *, now: str
) -> Twin | None:
    """The twin ``change`` gives its identity, read from the hubs as they are (before any
    write of the change: a worker checkpoints the answer, so that a retry after a crash writes
    the same twin); ``now`` stamps what it writes."""
    put = change.put
    removed = None
    if change.remove is not None and old is not None and put.twin.source is TwinSource.MIGRATE:
        removed = await old.get_identity(change.remove.hub, change.remove.device_id)
    existing = await new.get_identity(put.ref.hub, put.device_id)
    return put.twin.resolve(existing, removed, now=now)


async def carry_out(
    change: IdentityChange, twin: Twin | None, new: HubBackend, old: HubBackend | None
) -> HubDevice:
    """Carry out ``change`` outside any transaction, each step idempotent: put the identity,
    replace its twin with ``twin`` (from :func:`resolve_twin`; ``None`` keeps it), then delete
    the old identity. Run again after a failure, it ends in the same state.

    :raises HubError: a hub refused a step (what the earlier steps wrote stays: the caller
        compensates or retries).
    """
    put = change.put
    device = await new.put_identity(put)
    if twin is not None:
        await new.apply_twin(put.ref.hub, put.device_id, twin)
    if change.remove is not None and change.remove != put.ref and old is not None:
        await old.delete_identity(change.remove.hub, change.remove.device_id)
    return device
