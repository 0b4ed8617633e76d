"""The hub writer: drains the durable outbox (:mod:`provisiond.hub.outbox`) into remote hubs,
in every node, surviving kill -9 (docs/hubs.md, "The consistency guarantee").

Theory of operation
-------------------
An item is worked by one writer at a time: the node whose registration wrote it (the item is
written already leased to it, and the request waits for it up to the assignment budget), or
any node's :meth:`HubWriter.run` loop once its lease has expired (``Store.claim``). Working an
ASSIGN item:

1. **resolve** (once): whether the identity exists and its twin (the compensation's copy), the
   removed identity's twin for a migration, hence the twin to apply; checkpointed in the item
   (a conditional write on its etag, which renews the lease);
2. **write**: ``PUT /devices/{id}`` (create, or update in place), then the resolved twin;
   checkpointed (``written``);
3. **remove** the old identity when the device moved (a 404 is success);
4. **finish**, one transaction: the registration record becomes the outcome the registrar
   decided (``assigned``) over the ``assigning`` record of the item's operation, and the item
   is deleted. A record deleted or replaced meanwhile: the identity this item created is
   deleted again (compensation) and the item dropped.

Every step is idempotent, so an item whose writer died is simply worked again from its last
checkpoint. A checkpoint that fails (the etag moved: another writer took the lease over) stops
this writer at once. Transient hub failures (no answer, 5xx, 429) put the item back with a
backoff: the hub's Retry-After, else exponential with jitter; a 429 also pauses every write to
that hub (:class:`Pacer`). A permanent refusal, or too many attempts, compensates (an identity
this item created is deleted, a twin it replaced is restored) and records the registration
``failed`` with 400209 and the hub's error.

**Waiting for work.** The loop claims when an item is due, and otherwise waits on the store's
watch of the outbox (:meth:`~provisiond.storage.Store.watch`): woken when any process or node
releases an item (queues one unleased, puts one back: on PostgreSQL by LISTEN/NOTIFY, in this
process by the store itself), or when the earliest item it saw comes due
(:meth:`~provisiond.storage.Store.next_due`: a retry's backoff, the lease of a writer that
died), and at the latest after ``idle`` seconds (the lease: a safety net for a notification
lost on the way). An idle wake costs one read; nothing due, no claim. While the watch is not
live (SQLite, which cannot hear other processes; PostgreSQL while its listening connection is
lost) the loop looks every ``poll`` seconds, as it always did.

Each hub's calls are paced by its write budget (``writeBudgetPerSecond``, else from ``tier``
and ``units``: 100 a minute per unit, 5,000 for S3 and B3; none: unpaced), each node at its
share (:class:`BudgetShare`: the budget divided among the nodes writing to the hub now).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec

from .._cancel import raise_if_cancelling
from ..errors import (
    ConflictError,
    HubDeviceExistsError,
    HubError,
    HubThrottledError,
    NotFoundError,
    PreconditionFailedError,
    ProvisioningError,
)
from ..hub import HubBackend, HubBackends, HubDevice, IdentityChange, Twin, TwinSource
from ..hub.models import AuthenticationType, DeviceAuthentication
from ..hub.outbox import ItemKind, OutboxItem, item_write
from ..hub.remote import BULK_LIMIT, RemoteHub
from ..models import LinkedHub, RegistrationStatus
from ..storage import Collection, Delete, Record, StreamWatch, WriteMode, utc_iso, utc_seconds
from . import records
from .assignment import Decision, fail_in_hub
from .context import ServiceContext
from .hub_figures import (
    BudgetShare,
    HubWriterReport,
    NodeFigures,
    Pacer,
    WriterFigures,
    hub_writer_report,
)
from .records import RegistrationRecord

__all__ = ["HubWriter", "HubWriterReport", "Pacer", "WriterFigures", "hub_writer_report"]

log = logging.getLogger("provisiond.hub_writer")

T = TypeVar("T")


class _LostLease(Exception):
    """Another writer holds the item now (or it is gone): stop without writing anything more."""


class HubWriter:
    """Works the outbox (module docstring).

    :param lease: how long a claim or checkpoint holds an item (seconds; default:
        ``settings.hub_write_lease``).
    :param poll: how often the loop looks for due items when its watch is not live, and the
        least it waits after finding due items it could not claim.
    :param idle: the most the loop waits when its watch is live (default: the lease).
    :param max_attempts: transient failures before an item fails for good.
    """

    def __init__(
        self,
        ctx: ServiceContext,
        hubs: HubBackends,
        *,
        node: str | None = None,
        lease: float | None = None,
        poll: float = 0.5,
        idle: float | None = None,
        max_attempts: int = 8,
        batch: int = BULK_LIMIT,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.hubs = hubs
        self.node = node or uuid.uuid4().hex[:12]
        self.lease = lease if lease is not None else ctx.settings.hub_write_lease
        self.poll = poll
        self.idle = idle if idle is not None else self.lease
        self.max_attempts = max_attempts
        self.batch = batch
        self.clock = clock or ctx.clock
        self.pacer = Pacer()
        self.share = BudgetShare(self.store, self.node)
        self.figures = NodeFigures()
        self._watch: StreamWatch | None = None
        self._flush_soon = False
        self._watchers: dict[str, asyncio.Event] = {}
        #: Hubs that refused a bulk call as a whole (not served): written singly from then on.
        self._no_bulk: set[str] = set()
        self._last_flush = 0.0

    # --- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Claim and work due items until cancelled (module docstring, "Waiting for work")."""
        self._watch = watch = self.store.watch(Collection.HUB_OUTBOX)
        try:
            while True:
                wait = await self._claim_and_work(watch.live)
                raise_if_cancelling()  # (a cancellation inside a database call: see provisiond._cancel)
                await self.flush_figures()
                raise_if_cancelling()
                if wait > 0:
                    await watch.wait(wait)
        finally:
            self._watch = None
            watch.close()

    async def _claim_and_work(self, live: bool) -> float:
        """Claim the due items and work them, when there are; how long to wait before looking
        again (0: at once)."""
        fallback = self.idle if live else self.poll
        try:
            next_due = await self.store.next_due(Collection.HUB_OUTBOX)
            now = self.clock()
            if next_due is not None and (due := utc_seconds(next_due)) > now:
                return self._flush_within(min(fallback, due - now))
            claimed = []
            if next_due is not None:
                claimed = await self.store.claim(
                    Collection.HUB_OUTBOX,
                    now=utc_iso(now),
                    until=utc_iso(now + self.lease),
                    owner=self.node,
                    limit=self.batch,
                )
        except ProvisioningError as exc:
            log.warning("the hub writer could not claim outbox items: %s", exc)
            return self.poll
        if not claimed:
            # Nothing at all (wait for a release), or due items that are not claimable now
            # (being written by another transaction): look again soon.
            return self._flush_within(fallback if next_due is None else min(fallback, self.poll))
        raise_if_cancelling()
        await self.work_many(claimed)
        return 0.0

    def _flush_within(self, wait: float) -> float:
        """``wait``, shortened so that figures not stored yet are stored within about a second
        (``_flush_soon``: the loop's wait is that short; work outside the loop that changes
        figures while it is not wakes the loop)."""
        self._flush_soon = bool(self.figures.dirty)
        if self._flush_soon:
            return min(wait, max(0.05, 1.0 - (time.monotonic() - self._last_flush)))
        return wait

    def wake(self) -> None:
        """Claim at once (an item was queued; the store's watch wakes the loop by itself for
        items it stores unleased, this is for a caller that knows of more)."""
        if self._watch is not None:
            self._watch.wake()

    def watch(self, key: str) -> asyncio.Event:
        """An event set when this node's writer is done with item ``key`` (its outcome is
        recorded, or it was dropped); another node may finish it instead, unseen here."""
        return self._watchers.setdefault(key.lower(), asyncio.Event())

    def unwatch(self, key: str) -> None:
        self._watchers.pop(key.lower(), None)

    def _done(self, key: str) -> None:
        event = self._watchers.pop(key.lower(), None)
        if event is not None:
            event.set()

    async def flush_figures(self, *, force: bool = False) -> None:
        """Store the figures that changed (at most once a second unless ``force``)."""
        now = time.monotonic()
        if not self.figures.dirty or (not force and now - self._last_flush < 1.0):
            return
        self._last_flush = now
        dirty, self.figures.dirty = self.figures.dirty, set()
        for hub in dirty:
            figures = self.figures.by_hub[hub]
            try:
                await self.store.write(
                    Collection.HUB_WRITERS,
                    f"{hub}/{self.node}",
                    msgspec.json.encode(figures),
                    index={"hub": hub},
                )
            except ProvisioningError as exc:
                log.warning("the hub writer could not store its figures: %s", exc)
                self.figures.dirty.add(hub)

    # --- one item -----------------------------------------------------------------------------

    async def work(self, record: Record) -> None:
        """Work one item this node holds (claimed, or written leased to it: a request works it
        outside the loop, which then stores the figures it changed within about a second)."""
        try:
            await self._work(
                _Holder(self, record.id, record.etag, msgspec.json.decode(record.doc, type=OutboxItem))
            )
        finally:
            if self.figures.dirty and not self._flush_soon:
                self.wake()

    async def work_many(self, records: list[Record]) -> None:
        """Work the items a claim returned: new identities of one remote hub in bulk calls
        (:meth:`_bulk`), the rest one by one, concurrently."""
        holders = [_Holder(self, r.id, r.etag, msgspec.json.decode(r.doc, type=OutboxItem)) for r in records]
        by_hub: dict[str, list[_Holder]] = {}
        singles: list[_Holder] = []
        for holder in holders:
            bulk = _bulkable(holder.item) and holder.item.hub not in self._no_bulk
            (by_hub.setdefault(holder.item.hub, []) if bulk else singles).append(holder)
        jobs = [self._work(holder) for holder in singles]
        for hub, group in by_hub.items():
            if len(group) > 1:
                jobs.append(self._bulk(hub, group))
            else:
                jobs.extend(self._work(holder) for holder in group)
        await asyncio.gather(*jobs)

    async def _work(self, holder: _Holder) -> None:
        try:
            if holder.item.kind is ItemKind.ASSIGN:
                await self._assign(holder)
            else:
                await self._remove(holder)
        except _LostLease:
            log.info("outbox item %s: another writer holds it now", holder.key)
        except HubError as exc:
            try:
                await self._failed(holder, exc)
            except _LostLease:
                log.info("outbox item %s: another writer holds it now", holder.key)
        except Exception as exc:  # the database failed, a hub's link is unusable, or our bug
            log.exception("outbox item %s: unexpected failure", holder.key)
            with contextlib.suppress(Exception):
                if holder.item.attempts + 1 < self.max_attempts:
                    await self._put_back(holder, f"{type(exc).__name__}: {exc}", None)
                else:  # give up, so that the device's polls end
                    await self._failed(holder, HubError(f"{type(exc).__name__}: {exc}", hub=holder.item.hub))

    async def _bulk(self, host: str, holders: list[_Holder]) -> None:
        """Create new identities with their twins in bulk calls (at most 100 devices a call, one
        call against the budget). Each item is checkpointed first (resolved as new, bulk tried),
        so that after a crash the single path redoes it idempotently; a device the hub already
        has goes the single path (which reads it first); a call that failed as a whole puts the
        items back (a throttled one may be tried in bulk again)."""
        linked = await self.ctx.linked_hubs(max_age=1.0)
        hub = linked.get(host)
        backend = self.hubs.for_hub(hub) if hub is not None else None
        put_many = getattr(backend, "put_many", None)
        if hub is None or put_many is None:
            await asyncio.gather(*(self._work(holder) for holder in holders))
            return
        now = utc_iso(self.clock())
        ready: list[_Holder] = []
        for holder in holders:
            item = holder.item
            assert item.change is not None
            item.bulk_tried, item.resolved, item.existed = True, True, False
            item.twin = item.change.change().put.twin.resolve(None, None, now=now)
            try:
                await holder.checkpoint()
            except _LostLease:
                continue
            ready.append(holder)
        for start in range(0, len(ready), BULK_LIMIT):
            chunk = ready[start : start + BULK_LIMIT]
            specs = [(h.item.change.change().put, h.item.twin) for h in chunk if h.item.change is not None]
            try:
                refused: dict[str, HubError] = await self._call(hub, functools.partial(put_many, specs))
            except HubError as exc:
                if not exc.transient and exc.status in (400, 404, 405, 501):
                    # The hub does not serve bulk calls (the request was refused as a whole:
                    # nothing was written): this node writes to it one identity at a time.
                    log.info("IoT hub %s does not take bulk registry calls (%s): writing singly", host, exc)
                    self._no_bulk.add(host)
                    for h in chunk:
                        h.item.resolved, h.item.existed, h.item.twin = False, None, None
                    await asyncio.gather(*(self._work(h) for h in chunk))
                    continue
                if isinstance(exc, HubThrottledError):  # nothing was written: bulk again later
                    for h in chunk:
                        h.item.bulk_tried, h.item.resolved, h.item.existed, h.item.twin = (
                            False,
                            False,
                            None,
                            None,
                        )
                await asyncio.gather(*(self._failed_safely(h, exc) for h in chunk))
                continue
            self.figures.of(host, self.node).bulk_calls += 1
            jobs = []
            for h in chunk:
                assert h.item.change is not None
                error = refused.get(h.item.change.put.device_id)
                if isinstance(error, HubDeviceExistsError):
                    h.item.resolved, h.item.existed, h.item.twin = False, None, None
                    jobs.append(self._work(h))
                elif error is not None:
                    jobs.append(self._failed_safely(h, error))
                else:
                    h.item.written = True
                    jobs.append(self._work(h))
            await asyncio.gather(*jobs)

    async def _failed_safely(self, holder: _Holder, exc: HubError) -> None:
        try:
            await self._failed(holder, exc)
        except _LostLease:
            log.info("outbox item %s: another writer holds it now", holder.key)

    async def _call(self, hub: LinkedHub | None, call: Callable[[], Awaitable[T]]) -> T:
        """One hub call, paced by the hub's budget and counted."""
        name = hub.host_name.lower() if hub else "?"
        budget = await self.share.of(name, hub.registry_write_budget()) if hub else None
        await self.pacer.acquire(name, budget)
        self.figures.of(name, self.node).calls += 1
        try:
            return await call()
        except HubError as exc:
            if exc.retry_after is not None or exc.status == 429:
                self.figures.of(name, self.node).throttled += 1
                self.pacer.pause(name, exc.retry_after or 1.0)
            raise

    async def _assign(self, holder: _Holder) -> None:
        item = holder.item
        assert item.change is not None
        change = item.change.change()
        linked = await self.ctx.linked_hubs(max_age=1.0)
        hub = linked.get(item.hub)
        if hub is None:
            raise HubError(f"IoT hub {item.hub} is no longer linked.", hub=item.hub)
        old_hub = linked.get(change.remove.hub) if change.remove else None
        new, old = self.hubs.for_hub(hub), self.hubs.for_hub(old_hub) if change.remove else None
        put = change.put
        if not item.resolved:
            await self._resolve(holder, change, hub, new, old_hub, old)
        if not item.written:
            if isinstance(new, RemoteHub):  # it knows whether the identity exists: one call
                remote, exists = new, item.existed
                await self._call(hub, lambda: remote.put_identity(put, exists=exists))
            else:
                await self._call(hub, lambda: new.put_identity(put))
            if item.twin is not None:
                twin = item.twin
                await self._call(hub, lambda: new.apply_twin(item.hub, put.device_id, twin))
            item.written = True
            await holder.checkpoint()
        remove = change.remove
        if remove is not None and remove != put.ref and old is not None:
            await self._call(old_hub, lambda: old.delete_identity(remove.hub, remove.device_id))
        assert item.outcome is not None
        outcome = msgspec.convert(item.outcome, RegistrationRecord)
        if await self._finish(holder, outcome):
            self.figures.of(item.hub, self.node).written += 1
        else:
            # The record was deleted (or replaced) while the identity was being written: an
            # identity this item created goes again; one that existed before stays.
            if item.existed is False:
                log.info(
                    "registration %s changed meanwhile: deleting identity %s again",
                    item.registration_id,
                    put.device_id,
                )
                await self._call(hub, lambda: new.delete_identity(item.hub, put.device_id))
            await holder.delete()

    async def _resolve(
        self,
        holder: _Holder,
        change: IdentityChange,
        hub: LinkedHub,
        new: HubBackend,
        old_hub: LinkedHub | None,
        old: HubBackend | None,
    ) -> None:
        item, put = holder.item, change.put
        removed = None
        if change.remove is not None and old is not None and put.twin.source is TwinSource.MIGRATE:
            ref = change.remove
            removed_twin = await self._call(old_hub, lambda: old.read_twin(ref.hub, ref.device_id))
            removed = _stub(ref.device_id, ref.hub, removed_twin)
        current = await self._call(hub, lambda: new.read_twin(item.hub, put.device_id))
        existing = _stub(put.device_id, item.hub, current)
        item.twin = put.twin.resolve(existing, removed, now=utc_iso(self.clock()))
        item.existed = current is not None
        item.previous_twin = current
        item.resolved = True
        await holder.checkpoint()

    async def _finish(self, holder: _Holder, outcome: RegistrationRecord) -> bool:
        """Write the outcome over the item's ``assigning`` record and delete the item, in one
        transaction; ``False`` (nothing written) when the record is no longer that."""
        item = holder.item
        assert item.registration_id is not None and item.operation_id is not None
        for _ in range(3):
            current = await self.store.get(Collection.REGISTRATIONS, item.registration_id)
            if current is None or not _is_interim(current, item.operation_id):
                return False
            try:
                await self.store.write_atomic(
                    [
                        records.write(item.registration_id, outcome, current),
                        (Collection.HUB_OUTBOX, Delete(holder.key, holder.etag)),
                    ]
                )
                self._done(holder.key)
                return True
            except (ConflictError, PreconditionFailedError, NotFoundError):
                check = await self.store.get(Collection.HUB_OUTBOX, holder.key)
                if check is None or check.etag != holder.etag:
                    raise _LostLease() from None
        return False

    async def _remove(self, holder: _Holder) -> None:
        item = holder.item
        assert item.target is not None
        target = item.target
        linked = await self.ctx.linked_hubs(max_age=1.0)
        hub = linked.get(target.hub)
        backend = self.hubs.for_hub(hub)
        if item.kind is ItemKind.DELETE:
            await self._call(hub, lambda: backend.delete_identity(target.hub, target.device_id))
        else:
            await self._call(hub, lambda: backend.disable_identity(target.hub, target.device_id))
        self.figures.of(item.hub, self.node).removed += 1
        log.info("deprovisioning: %s identity %s in %s", item.kind.value, target.device_id, target.hub)
        await holder.delete()

    # --- failures -----------------------------------------------------------------------------

    async def _failed(self, holder: _Holder, exc: HubError) -> None:
        item = holder.item
        if exc.transient and item.attempts + 1 < self.max_attempts:
            self.figures.of(item.hub, self.node).retried += 1
            log.info("outbox item %s: %s; retrying", holder.key, exc)
            await self._put_back(holder, str(exc), exc.retry_after)
            return
        self.figures.of(item.hub, self.node).failed += 1
        log.warning("outbox item %s failed for good: %s", holder.key, exc)
        if item.kind is not ItemKind.ASSIGN:
            await holder.delete()
            return
        try:
            await self._compensate(holder)
        except HubError as again:
            if again.transient and item.attempts + 1 < self.max_attempts * 2:
                await self._put_back(holder, f"{exc} (compensation: {again})", again.retry_after)
                return
            log.error("outbox item %s: compensation failed: %s", holder.key, again)
        assert item.outcome is not None
        decided = msgspec.convert(item.outcome, RegistrationRecord)
        failed = fail_in_hub(Decision(decided), str(exc)).record
        if not await self._finish(holder, failed):
            await holder.delete()

    async def _compensate(self, holder: _Holder) -> None:
        """Undo what the item may have written: delete an identity it created, restore a twin
        it replaced."""
        item = holder.item
        if not item.resolved or item.change is None:
            return
        linked = await self.ctx.linked_hubs(max_age=1.0)
        hub = linked.get(item.hub)
        if hub is None:
            return
        backend, device_id = self.hubs.for_hub(hub), item.change.put.device_id
        if item.existed is False:
            await self._call(hub, lambda: backend.delete_identity(item.hub, device_id))
        elif item.twin is not None and item.previous_twin is not None:
            previous = item.previous_twin
            await self._call(hub, lambda: backend.apply_twin(item.hub, device_id, previous))

    async def _put_back(self, holder: _Holder, error: str, retry_after: float | None) -> None:
        item = holder.item
        item.attempts += 1
        item.last_error = error[:500]
        delay = retry_after if retry_after is not None else min(60.0, 0.5 * 2**item.attempts)
        delay *= random.uniform(1.0, 1.5)
        await holder.save(due=self.clock() + delay, owner=None)


def _bulkable(item: OutboxItem) -> bool:
    """Whether a bulk create may do the item's writes: a registration's identity that is
    probably new, not started, not tried in bulk before, whose twin needs no read."""
    return (
        item.kind is ItemKind.ASSIGN
        and item.change is not None
        and item.change.probably_new
        and not (item.resolved or item.written or item.bulk_tried)
        and item.change.put.twin.source is not TwinSource.MIGRATE
    )


def _stub(device_id: str, hub: str, twin: Twin | None) -> HubDevice | None:
    if twin is None:
        return None
    return HubDevice(
        device_id=device_id,
        hub=hub,
        authentication=DeviceAuthentication(type=AuthenticationType.SAS),
        twin=twin,
    )


def _is_interim(record: Record, operation_id: str) -> bool:
    stored = records.decode(record)
    return stored.operation_id == operation_id and stored.status is RegistrationStatus.ASSIGNING


class _Holder:
    """The item as this writer holds it: its key, the etag of its last write, the document."""

    def __init__(self, writer: HubWriter, key: str, etag: str, item: OutboxItem) -> None:
        self.writer, self.key, self.etag, self.item = writer, key, etag, item

    async def save(self, *, due: float, owner: str | None) -> None:
        _, write = item_write(
            self.key, self.item, due=due, owner=owner, mode=WriteMode.UPDATE, if_match=self.etag
        )
        assert not isinstance(write, Delete)
        try:
            record = await self.writer.store.write(
                Collection.HUB_OUTBOX,
                write.id,
                write.doc,
                index=write.index,
                mode=write.mode,
                if_match=write.if_match,
            )
        except (PreconditionFailedError, NotFoundError):
            raise _LostLease() from None
        self.etag = record.etag

    async def checkpoint(self) -> None:
        """Store the item's progress, renewing the lease."""
        await self.save(due=self.writer.clock() + self.writer.lease, owner=self.writer.node)

    async def delete(self) -> None:
        try:
            await self.writer.store.delete(Collection.HUB_OUTBOX, self.key, if_match=self.etag)
        except (PreconditionFailedError, NotFoundError):
            raise _LostLease() from None
        self.writer._done(self.key)
