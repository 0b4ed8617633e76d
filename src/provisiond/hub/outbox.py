"""The durable outbox of hub writes: what remains to be done in hubs that cannot join
provisiond's transactions (remote hubs), one stored item at a time.

An item is written in the same transaction as what asked for it (a registration's
``assigning`` record; the deletion of records that deprovisions their identities), so the
database says at every moment what remains to be done, and any node's writer
(``service/hub_writer.py``) can finish it: items are claimed with a lease
(:meth:`~provisiond.storage.Store.claim`), every step is idempotent and checkpointed in the
item on its etag (which renews the lease and fences a writer whose lease was taken over), and
the item is deleted in the transaction that records the outcome.

Keys: a registration's item is keyed by its registration id (one change in flight per device);
a deprovisioning item by ``~remove/{hub}/{deviceId}``.

Deprovisioning: :func:`removal` is the write that enqueues "delete identity" or "disable
identity" for one identity of a remote hub; commit it in the transaction that deletes the
registration record (a built-in hub's identity is removed in that transaction instead:
``TransactionalHubBackend.plan_removal``). The writer deletes the item once the hub has done it
(a 404 counts as done).
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from ..attestation.base import CertificateCredential, IdentityCredential, KeyCredential
from ..models import Deprovision, DeviceCapabilities, LinkedHub
from ..storage import Collection, Write, WriteMode, utc_iso
from .base import IdentityChange, IdentityRef, IdentitySpec, Planned, TwinPlan
from .models import Twin

__all__ = ["ItemKind", "OutboxItem", "StoredChange", "item_write", "removal", "removal_key"]


class ItemKind(enum.Enum):
    ASSIGN = "assign"  # carry out a registration's IdentityChange, then record the outcome
    DELETE = "delete"  # deprovisioning: delete an identity
    DISABLE = "disable"  # deprovisioning: disable an identity


class _Spec(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An :class:`IdentitySpec` as stored (the credential's kind spelled out; the linked hub
    without its connection string and CA: the writer uses the hub as linked when it works)."""

    hub: LinkedHub
    device_id: str
    registration_id: str
    key: KeyCredential | None = None
    certificate: CertificateCredential | None = None
    capabilities: DeviceCapabilities | None = None
    twin: TwinPlan


class StoredChange(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    put: _Spec
    remove: IdentityRef | None = None
    probably_new: bool = False

    @classmethod
    def of(cls, change: IdentityChange) -> StoredChange:
        spec = change.put
        hub = msgspec.structs.replace(spec.hub, connection_string=None, ca_certificate=None, etag=None)
        credential: IdentityCredential = spec.credential
        stored = _Spec(
            hub=hub,
            device_id=spec.device_id,
            registration_id=spec.registration_id,
            key=credential if isinstance(credential, KeyCredential) else None,
            certificate=credential if isinstance(credential, CertificateCredential) else None,
            capabilities=spec.capabilities,
            twin=spec.twin,
        )
        return cls(put=stored, remove=change.remove, probably_new=change.probably_new)

    def change(self) -> IdentityChange:
        spec = self.put
        credential: IdentityCredential
        if spec.key is not None:
            credential = spec.key
        else:
            assert spec.certificate is not None
            credential = spec.certificate
        return IdentityChange(
            put=IdentitySpec(
                hub=spec.hub,
                device_id=spec.device_id,
                registration_id=spec.registration_id,
                credential=credential,
                capabilities=spec.capabilities,
                twin=spec.twin,
            ),
            remove=self.remove,
            probably_new=self.probably_new,
        )


class OutboxItem(msgspec.Struct, kw_only=True, omit_defaults=True, rename="camel"):
    """One item of the outbox (``HUB_OUTBOX``), with its checkpoints."""

    kind: ItemKind
    hub: str  # the hub written to (lower-cased host name)
    created: str
    #: ASSIGN: the change, the registration it belongs to and the record to write when done.
    change: StoredChange | None = None
    registration_id: str | None = None
    operation_id: str | None = None
    outcome: dict[str, Any] | None = None
    #: DELETE, DISABLE: the identity.
    target: IdentityRef | None = None
    # --- checkpoints ---
    #: The twin to apply, resolved before any write (``resolved``; ``None``: keep the twin).
    resolved: bool = False
    #: A bulk create was tried (it is not tried again: the single path follows).
    bulk_tried: bool = False
    twin: Twin | None = None
    #: Whether the identity existed before this item wrote it, and its twin then (compensation).
    existed: bool | None = None
    previous_twin: Twin | None = None
    #: The identity was written (put and twin); the old one removed.
    written: bool = False
    attempts: int = 0
    last_error: str | None = None


def item_write(
    key: str, item: OutboxItem, *, due: float, owner: str | None, mode: WriteMode, if_match: str | None = None
) -> Planned:
    """The store write of ``item``: claimable from ``due`` (Unix seconds), held by ``owner``."""
    index = {"hub": item.hub, "due": utc_iso(due), "owner": owner}
    return Collection.HUB_OUTBOX, Write(key, msgspec.json.encode(item), index, mode, if_match)


def removal_key(target: IdentityRef) -> str:
    return f"~remove/{target.hub}/{target.device_id}"


def removal(target: IdentityRef, mode: Deprovision, *, now: float) -> Planned:
    """The write that enqueues deprovisioning one identity of a remote hub (disable or delete
    it), due at once; commit it in the transaction that deletes the registration record. An
    item already queued for the same identity is replaced (UPSERT): the last request wins."""
    kind = ItemKind.DELETE if mode is Deprovision.DELETE else ItemKind.DISABLE
    item = OutboxItem(kind=kind, hub=target.hub, created=utc_iso(now), target=target)
    return item_write(removal_key(target), item, due=now, owner=None, mode=WriteMode.UPSERT)
