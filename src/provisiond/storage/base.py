"""The storage contract. Every backend (SQLite, PostgreSQL) implements :class:`Store` and passes
the one contract suite in ``tests/storage/test_contract.py``.

Theory of operation
-------------------
provisiond keeps every piece of state in the database; a service node holds nothing of its own,
so several nodes can share one PostgreSQL database. The store is a set of *collections*
(:class:`Collection`), each a table of JSON documents keyed by id, plus a few *index columns*
that the service derives from the document on every write (for lookups and query filters).

The store does not interpret documents: the service encodes them (msgspec, camelCase JSON) and
passes the bytes together with the index values. What the store guarantees:

- **Keys.** A record's key is ``Collection.key(id)``: the id lower-cased for collections whose
  ids are case-insensitive (enrollments, groups, registrations, ...), the id as given otherwise.
  Two ids that differ only in case are the same record there. The id as first written is kept
  and returned in :attr:`Record.id`.
- **Etags.** Every successful write gives the record a new etag, different from every etag the
  record had before (a quoted opaque string, ``"\\"<uuid>\\""``, as DPS writes them).
- **Conditional writes.** ``if_match`` is ``None`` (no condition), ``"*"`` (the record must
  exist) or an etag (the record must exist and carry that etag). Etags compare after stripping
  surrounding double quotes and a ``W/`` prefix. A failed condition raises
  :class:`~provisiond.errors.PreconditionFailedError` and writes nothing.
- **Write modes** (:class:`WriteMode`): CREATE raises :class:`~provisiond.errors.ConflictError`
  when the key exists; UPDATE raises :class:`~provisiond.errors.NotFoundError` when it does not;
  UPSERT does either. ``if_match`` is checked first: an etag or ``"*"`` on a missing record is a
  :class:`~provisiond.errors.PreconditionFailedError`.
- **Timestamps.** ``created`` is set on the first write and kept by later ones; ``updated`` is
  set on every write. Both are ISO 8601 UTC strings with a ``Z`` suffix and microseconds.
- **Atomicity.** Each write is all or nothing. :meth:`Store.write_many` applies each item
  independently (one failing item does not stop the others) and returns one outcome per item in
  order; it is one round trip/transaction for speed, not an all-or-nothing batch.
  :meth:`Store.write_atomic` is the all-or-nothing one: its items (writes and deletes, in any
  collections, at most one per record key) commit together in one transaction or not at all,
  even if the process dies half-way. Each item is decided by the rules above on its record as
  the transaction finds it (no two items share a key, so no item sees another's effect); the
  first item, in order, whose condition fails aborts the transaction and its contract error is
  raised, with nothing written. It is meant for a few records that belong together (a
  registration and its hub identity), not for bulk writes.
- **Text.** Ids, index values and filter values the service writes never contain NUL (U+0000),
  which PostgreSQL text cannot hold; reads do not assume it: an id with a NUL finds no record,
  a filter value with a NUL matches none, on every backend (a client may send anything).
- **Queries.** :meth:`Store.query` returns records in key order, filtered by equality on index
  columns (AND), at most ``limit`` of them, plus an opaque continuation token when more remain.
  Passing the token back continues after the last record returned, even if records were written
  in between (keyset paging: no record is returned twice; records created behind the cursor are
  not returned).
  :meth:`Store.continuation_after` makes the token that resumes after a given record (for a
  caller that filters a page further and stops in its middle).
- **Key prefixes.** In a collection with a :attr:`Collection.key_prefix_column` (the hub
  devices' ``hub``), a record whose value of that column is set has a key that starts with
  that value and ``/`` (``{hub}/{deviceId}``); a write that breaks this raises ``ValueError``
  and writes nothing. So a filter on that column is answered from a range of the keys, in the
  key's own index, without an index of its own.
- **Streams.** Append-only sequences of documents (:class:`Stream`: the built-in hubs'
  telemetry and queued cloud-to-device messages), each entry in a *partition* (a device).
  :meth:`Store.append` returns once its entries are committed (durable against a crash of the
  process); concurrent appends may be committed together (group commit). Every entry gets a
  ``seq`` that is unique across streams and increases in commit order: a reader that has seen
  seq N never finds a new entry at or below N later, so ``read(after=N)`` is a complete cursor.
  :meth:`Store.read` returns entries in seq order; :meth:`Store.remove` and :meth:`Store.trim`
  delete entries (by seq; by age and by count); :meth:`Store.last_seq` tells where a reader
  that wants only new entries (or those from a time on) starts.
- **Watches.** :meth:`Store.watch` gives a reader of a stream a :class:`StreamWatch` to wait on
  between reads instead of polling. While the watch is ``live``, every append another process
  or node commits to the stream after the watch was made wakes it (after the commit, so the
  woken reader's read finds the entries); a wake may also find nothing new. A watch that is not
  live (SQLite; PostgreSQL's listening connection lost) wakes only when it becomes live, and
  the reader polls at its own pace meanwhile. A store's own appends need not wake its watches
  (the appender knows what it appended). A claimable collection (see "Claims": the hub outbox)
  is watched the same way for *releases*: a write that leaves a record without an ``owner``
  (claimable by anyone once due: a new unleased item, an item put back) wakes the watch,
  after its commit, whether this store (always) or another process or node (while live)
  made it; claims, leased writes and deletes do not. :meth:`Store.next_due` says when the
  earliest record, leased ones included, comes due, which no write announces (a retry's
  backoff, the lease of a claimer that died).
- **Claims.** :meth:`Store.claim` leases due records of a collection that has ``due`` and
  ``owner`` index columns (the hub outbox): those whose ``due`` (an ISO time as the store
  writes them, so that text order is time order) is at or before ``now``, oldest first, each
  written with ``due`` set to the lease's end and ``owner`` to the claimer, a new etag, the
  document unchanged. Two claims, concurrent in any tasks, processes or nodes, never return
  the same record; a claimed record is not due again before its lease ends, and the claimer
  keeps it by conditional writes on the etag the claim returned (renewing the lease, putting
  it back with a later ``due``, deleting it), which fail once anyone else wrote it.
- **Settings.** A small key/value table for the service's own settings (ID scope, keys).
  :meth:`Store.setting_setdefault` is atomic across nodes: the first writer wins and every caller
  gets the winning value.
- **Errors.** Driver exceptions never escape: they become :class:`~provisiond.errors.StorageError`
  (with ``from exc``), except the contract errors above. When the database cannot be reached
  now (down, failing over, every connection busy, a lock held past the busy timeout), the error
  is its subclass :class:`~provisiond.errors.DatabaseUnavailableError` (503, ``retry_after``):
  the call was not acknowledged (a write may or may not have landed), and a retry may succeed.
  Such a call fails within seconds; it never waits for the database to come back.
- **Concurrency.** Methods are coroutine-safe: many tasks may call one store at once.
"""

from __future__ import annotations

import enum
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .._enums import IdentityEnum
from .._ids import uuid4_text
from ..errors import ProvisioningError
from ._watch import StreamWatch

__all__ = [
    "Collection",
    "Delete",
    "Entry",
    "Page",
    "Record",
    "Store",
    "Stream",
    "StreamWatch",
    "Write",
    "WriteMode",
    "etags_match",
    "is_wildcard",
    "new_etag",
    "released",
    "releases",
    "utc_iso",
    "utc_now",
    "utc_seconds",
]


#: The index columns a collection needs for :meth:`Store.claim`.
CLAIM_COLUMNS = ("due", "owner")


@dataclass(frozen=True, slots=True)
class _CollectionSpec:
    table: str
    label: str
    case_insensitive: bool
    index_columns: tuple[str, ...]
    key_prefix_column: str | None = None


class Collection(IdentityEnum):
    """The collections the store holds. ``value`` is the table's spec."""

    ENROLLMENTS = _CollectionSpec(
        "enrollments",
        "individual enrollment",
        True,
        ("device_id", "provisioning_status", "attestation_type", "iot_hub_host_name"),
    )
    ENROLLMENT_GROUPS = _CollectionSpec(
        "enrollment_groups",
        "enrollment group",
        True,
        ("provisioning_status", "attestation_type", "iot_hub_host_name"),
    )
    REGISTRATIONS = _CollectionSpec(
        "registrations",
        "device registration",
        True,
        ("device_id", "status", "assigned_hub", "enrollment_group_id", "operation_id"),
    )
    LINKED_HUBS = _CollectionSpec("linked_hubs", "linked IoT hub", True, ())
    CA_CERTIFICATES = _CollectionSpec("ca_certificates", "CA certificate", True, ())
    ACCESS_POLICIES = _CollectionSpec("access_policies", "shared access policy", True, ())
    # The built-in hub's device identities (with their twins), keyed "{hubHostName}/{deviceId}"
    # (the host name lower-cased: IoT Hub device ids are case-sensitive, host names are not).
    # Its ``hub`` is the key's prefix: a hub's identities are a range of the primary key, and
    # no separate (hub, key) index is written (schema 10).
    HUB_DEVICES = _CollectionSpec(
        "hub_devices", "hub device identity", False, ("hub", "status", "connection_state"), "hub"
    )
    # The built-in hubs' shared access policies (iothubowner, service, ...), keyed
    # "{hubHostName}/{keyName}" (case-insensitive, as IoT Hub's policy names are).
    HUB_POLICIES = _CollectionSpec("hub_access_policies", "IoT hub shared access policy", True, ("hub",))
    # Pending TPM challenges (attestation/tpm.py), one per registration id: single use through
    # conditional writes, expiry in the document. Shared by every node, like all state.
    TPM_CHALLENGES = _CollectionSpec("tpm_challenges", "TPM challenge", True, ())
    # The built-in hubs' persistent MQTT sessions (clean session 0): the subscriptions of each
    # device, keyed "{hubHostName}/{deviceId}" like the identities (service/hub_sessions.py).
    HUB_SESSIONS = _CollectionSpec("hub_sessions", "hub MQTT session", False, ())
    # The durable outbox of hub writes (hub/outbox.py), one item per registration id: ``hub`` is
    # the hub the item writes to (lower-cased host name), ``due`` when it may be claimed (ISO
    # time; a claimed item is due again when its lease expires), ``owner`` who holds it.
    HUB_OUTBOX = _CollectionSpec("hub_outbox", "hub outbox item", True, ("hub", "due", "owner"))
    # What the hub writers share per hub (hub/pacing.py): the write budget's pace and the figures.
    HUB_WRITERS = _CollectionSpec("hub_writers", "hub writer state", True, ("hub",))

    # The spec's fields as the member's own attributes, set once: ``member.value.table`` is two
    # Python calls per read (enum's ``value`` is a descriptor), and a registration reads them
    # about twenty times.
    table: str
    label: str
    index_columns: tuple[str, ...]
    #: Whether records can be claimed from it (``due`` and ``owner`` index columns: "Claims").
    claimable: bool
    #: The index column whose value, when set, is the start of the record's key up to its first
    #: ``/`` (the module docstring's "Key prefixes"), or ``None``.
    key_prefix_column: str | None
    _case_insensitive: bool

    def __init__(self, spec: _CollectionSpec) -> None:
        self.table = spec.table
        self.label = spec.label
        self.index_columns = spec.index_columns
        self.claimable = set(CLAIM_COLUMNS) <= set(spec.index_columns)
        self.key_prefix_column = spec.key_prefix_column
        self._case_insensitive = spec.case_insensitive

    def key(self, id: str) -> str:
        return id.lower() if self._case_insensitive else id


class Stream(enum.Enum):
    """The append-only streams the store holds (one table; ``value`` is the stream's name)."""

    #: Telemetry the built-in hubs acknowledged, partition ``{hubHostName}/{deviceId}``.
    HUB_EVENTS = "hub_events"
    #: Cloud-to-device messages waiting for their device, partition ``{hubHostName}/{deviceId}``.
    HUB_C2D = "hub_c2d"
    #: What the processes serving the built-in hubs tell each other (a method invoked on one
    #: node for a device connected to another, a desired patch, a new connection that closes the
    #: old one): short-lived, polled by every process (service/hub_broker.py).
    HUB_SIGNALS = "hub_signals"


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a stream. ``created`` is the store's commit-time stamp (ISO 8601 UTC)."""

    stream: Stream
    seq: int
    partition: str
    created: str
    doc: bytes


class WriteMode(enum.Enum):
    CREATE = "create"
    UPDATE = "update"
    UPSERT = "upsert"


@dataclass(frozen=True, slots=True)
class Record:
    """One stored document. ``doc`` is the JSON bytes the service wrote."""

    id: str
    etag: str
    created: str
    updated: str
    doc: bytes
    index: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Write:
    """One item of :meth:`Store.write_many` or :meth:`Store.write_atomic` (and the arguments of
    :meth:`Store.write`)."""

    id: str
    doc: bytes
    index: Mapping[str, str | None] = field(default_factory=dict)
    mode: WriteMode = WriteMode.UPSERT
    if_match: str | None = None
    #: With ``if_match`` naming one etag: the index values of the record of that etag, as read
    #: (its :attr:`Record.index`). A store may then leave the columns whose value does not
    #: change, and their indexes, alone (SQLite rewrites an index entry for every column an
    #: UPDATE sets, changed or not). The outcome is the same with or without it.
    index_before: Mapping[str, str | None] | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """A delete item of :meth:`Store.write_many` or :meth:`Store.write_atomic`."""

    id: str
    if_match: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    records: list[Record]
    continuation: str | None


def new_etag() -> str:
    """A fresh etag in DPS's shape: a quoted opaque string."""
    return f'"{uuid4_text()}"'


def _bare_etag(etag: str) -> str:
    etag = etag.strip()
    if etag.startswith("W/"):
        etag = etag[2:]
    return etag.strip('"')


def stored_etag(if_match: str) -> str:
    """``if_match`` (an etag, quoted or not, weak or not) in the form the store writes etags
    (:func:`new_etag`): what a stored etag equals when :func:`etags_match` says it matches."""
    return f'"{_bare_etag(if_match)}"'


def is_wildcard(if_match: str | None) -> bool:
    """Whether an If-Match value is the wildcard: ``*``, or ``"*"`` as the official IoT Hub
    service SDKs send it (``azure-iothub``'s ``_ensureQuoted('*')``, ``azure-iot-hub``'s
    ``_ensure_quoted``), which IoT Hub takes for the wildcard too."""
    return if_match is not None and _bare_etag(if_match) == "*"


def etags_match(if_match: str, etag: str) -> bool:
    """Whether an If-Match value matches a stored etag (the wildcard matches any)."""
    if is_wildcard(if_match):
        return True
    return _bare_etag(if_match) == _bare_etag(etag)


def utc_now() -> str:
    """The current time as the store writes it: ISO 8601 UTC with microseconds and ``Z``."""
    return utc_iso(time.time())


#: The last whole second :func:`utc_iso` formatted, and its text up to the seconds.
_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def utc_iso(seconds: float) -> str:
    """A Unix time as the store writes times (see :func:`utc_now`). Times come in bursts of the
    same second (a registration writes four): the date and time of day are formatted once per
    second, the microseconds every time."""
    global _second
    fraction, integral = math.modf(seconds)  # as datetime.fromtimestamp rounds
    whole, fraction = divmod(int(integral) * 1_000_000 + round(fraction * 1e6), 1_000_000)
    if whole != _second[0]:
        _second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_second[1]}.{fraction:06d}Z"


def utc_seconds(iso: str) -> float:
    """A time the store wrote (:func:`utc_iso`) as a Unix time."""
    return datetime.fromisoformat(iso).timestamp()


def releases(collection: Collection, item: Write | Delete) -> bool:
    """Whether a write item releases a record of a claimable collection (leaves it without an
    ``owner``): what wakes the collection's watches ("Watches" in the module docstring)."""
    return collection.claimable and isinstance(item, Write) and item.index.get("owner") is None


def released(items: Iterable[tuple[Collection, Write | Delete]]) -> Collection | None:
    """The claimable collection (the hub outbox) whose records the write ``items`` release, if
    any: whose watches a store wakes once they are committed."""
    for collection, item in items:
        if releases(collection, item):
            return collection
    return None


class Store(ABC):
    """The storage contract (see the module docstring for the rules every backend keeps)."""

    #: A short name for logs and the CLI ("sqlite", "postgresql").
    backend: str

    @abstractmethod
    async def open(self) -> None:
        """Connect, and bring the schema to the latest version (migrations run here, once,
        under a lock that makes concurrent ``open`` calls from several nodes safe)."""

    @abstractmethod
    async def close(self) -> None:
        """Release every connection. Idempotent."""

    @abstractmethod
    async def schema_version(self) -> int:
        """The number of the last migration applied."""

    async def ping(self) -> None:
        """One round trip to the database (readiness): returns when it answers, raises
        :class:`~provisiond.errors.DatabaseUnavailableError` (or another
        :class:`~provisiond.errors.StorageError`) when it does not."""
        await self.schema_version()

    @abstractmethod
    async def get(self, collection: Collection, id: str) -> Record | None:
        """The record whose key is ``collection.key(id)``, or ``None``."""

    @abstractmethod
    async def get_many(self, collection: Collection, ids: Sequence[str]) -> dict[str, Record]:
        """The records that exist among ``ids``, keyed by ``collection.key(id)``."""

    async def get_each(self, ids: Sequence[tuple[Collection, str]]) -> list[Record | None]:
        """One record (or ``None``) per ``(collection, id)``, in order: point reads across
        collections, which a backend may make in one round trip (PostgreSQL does)."""
        return [await self.get(collection, id) for collection, id in ids]

    async def write(
        self,
        collection: Collection,
        id: str,
        doc: bytes,
        *,
        index: Mapping[str, str | None] | None = None,
        mode: WriteMode = WriteMode.UPSERT,
        if_match: str | None = None,
    ) -> Record:
        """Write one record (rules: module docstring) and return it as stored. (A one-item
        :meth:`write_many`; a backend may override it with a faster path.)

        :raises ConflictError: CREATE on an existing key.
        :raises NotFoundError: UPDATE on a missing key.
        :raises PreconditionFailedError: ``if_match`` not satisfied.
        """
        [outcome] = await self.write_many(collection, [Write(id, doc, index or {}, mode, if_match)])
        if isinstance(outcome, ProvisioningError):
            raise outcome
        return outcome

    async def delete(self, collection: Collection, id: str, *, if_match: str | None = None) -> Record:
        """Delete one record and return what was deleted (a one-item :meth:`write_many`).

        :raises NotFoundError: no such key.
        :raises PreconditionFailedError: ``if_match`` not satisfied.
        """
        [outcome] = await self.write_many(collection, [Delete(id, if_match)])
        if isinstance(outcome, ProvisioningError):
            raise outcome
        return outcome

    @abstractmethod
    async def write_many(
        self, collection: Collection, items: Sequence[Write | Delete]
    ) -> list[Record | ProvisioningError]:
        """Apply each item independently, in order; one outcome per item (the stored or deleted
        record, or the contract error that item raised)."""

    @abstractmethod
    async def write_atomic(self, items: Sequence[tuple[Collection, Write | Delete]]) -> list[Record]:
        """Apply every item in one transaction: all of them, or none. Returns the stored (or
        deleted) record per item, in order. The first item whose condition fails (the same
        rules as :meth:`write` and :meth:`delete`) aborts the whole transaction and is raised;
        nothing is written. Items may span collections; at most one item per (collection, key).
        An empty ``items`` writes nothing and returns ``[]``.

        :raises ConflictError: a CREATE item on an existing key.
        :raises NotFoundError: an UPDATE item, or a delete, on a missing key.
        :raises PreconditionFailedError: an item's ``if_match`` not satisfied.
        :raises ValueError: two items on one (collection, key) (ids compared as
            :meth:`Collection.key` does), an item naming an unknown index column, or an item
            whose key does not start with its key prefix ("Key prefixes"); raised before
            anything is written.
        """

    @abstractmethod
    async def query(
        self,
        collection: Collection,
        *,
        filters: Mapping[str, str] | None = None,
        limit: int = 100,
        continuation: str | None = None,
    ) -> Page:
        """A page of records in key order. ``filters`` maps an index column (or ``"id"`` for the
        key, compared as ``collection.key(value)``) to the value it must equal.

        :raises ValueError: a filter names a column the collection does not index.
        """

    def continuation_after(self, collection: Collection, id: str) -> str:
        """The continuation token that resumes :meth:`query` right after the record ``id``, as
        if a page had ended there (for a caller that filters records further and stops in the
        middle of a page)."""
        from ._sql import encode_continuation  # the token format both backends share

        return encode_continuation(collection.key(id))

    async def query_all(
        self, collection: Collection, *, filters: Mapping[str, str] | None = None
    ) -> list[Record]:
        """Every record :meth:`query` matches, page after page (for small collections: hubs,
        policies, groups of one attestation type)."""
        records: list[Record] = []
        continuation: str | None = None
        while True:
            page = await self.query(collection, filters=filters, limit=1000, continuation=continuation)
            records += page.records
            if page.continuation is None:
                return records
            continuation = page.continuation

    @abstractmethod
    async def count(self, collection: Collection, *, filters: Mapping[str, str] | None = None) -> int:
        """How many records match ``filters`` (same rules as :meth:`query`)."""

    @abstractmethod
    async def claim(
        self,
        collection: Collection,
        *,
        now: str,
        until: str,
        owner: str,
        limit: int = 1,
        filters: Mapping[str, str] | None = None,
    ) -> list[Record]:
        """Lease at most ``limit`` due records (the module docstring's "Claims"): ``due <= now``
        and ``filters`` (equality on index columns), in ``due`` then key order; each is stored
        with ``due = until`` and ``owner = owner`` and returned as stored.

        :raises ValueError: the collection has no ``due`` and ``owner`` index columns, a filter
            names a column it does not index, or ``limit`` is below 1.
        """

    @abstractmethod
    async def next_due(self, collection: Collection) -> str | None:
        """The earliest ``due`` of the collection's records (a leased record's is its lease's
        end), ``None`` when it has none: when a claim may next find a record that no write
        since has released (the module docstring's "Watches").

        :raises ValueError: the collection has no ``due`` and ``owner`` index columns.
        """

    @abstractmethod
    async def get_setting(self, key: str) -> str | None:
        """A service setting, or ``None``."""

    @abstractmethod
    async def set_setting(self, key: str, value: str) -> None:
        """Set a service setting (last writer wins)."""

    @abstractmethod
    async def setting_setdefault(self, key: str, value: str) -> str:
        """Set ``key`` to ``value`` unless it is set; return the value now stored (atomic)."""

    # -- streams -------------------------------------------------------------------------------

    @abstractmethod
    async def append(self, stream: Stream, items: Sequence[tuple[str, bytes]]) -> list[Entry]:
        """Append ``(partition, doc)`` items; return their entries, in order, once they are
        committed. Concurrent calls may share one transaction."""

    @abstractmethod
    async def read(
        self, stream: Stream, *, after: int = 0, partition: str | None = None, limit: int = 100
    ) -> list[Entry]:
        """At most ``limit`` entries with ``seq > after`` (of ``partition`` when given), in seq order."""

    @abstractmethod
    async def remove(self, stream: Stream, seqs: Sequence[int]) -> int:
        """Delete the entries with these seqs; return how many existed."""

    @abstractmethod
    async def trim(
        self,
        stream: Stream,
        *,
        keep: int | None = None,
        before: str | None = None,
        partition: str | None = None,
    ) -> int:
        """Delete the entries created before ``before`` and, with ``keep``, all but the newest
        ``keep`` (of ``partition`` when given, else of the whole stream); return how many."""

    def watch(self, stream: Stream | Collection) -> StreamWatch:
        """A :class:`StreamWatch` on ``stream``, or on a claimable collection's releases (see
        "Watches" in the module docstring): make it before the first read (claim) it is to
        follow up, then read after the cursor (claim) each time :meth:`StreamWatch.wait`
        returns; close it when done. This one is never live, nor woken."""
        return StreamWatch(stream)

    @abstractmethod
    async def entry_count(self, stream: Stream, *, partition: str | None = None) -> int:
        """How many entries the stream (or one partition of it) holds."""

    @abstractmethod
    async def last_seq(self, stream: Stream, *, before: str | None = None) -> int:
        """The seq of the stream's newest entry (of the newest created before ``before``, an ISO
        8601 UTC time as the store writes them, when given); 0 when there is none. A reader
        that starts with ``read(after=last_seq(...))`` sees what is appended from then on (or
        from that time)."""
