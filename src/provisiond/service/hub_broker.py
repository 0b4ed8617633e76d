"""The broker: the runtime link between the service side of the built-in hubs (the REST API,
the CLI, a twin write) and the devices connected to them over MQTT.

Theory of operation
-------------------
A device is connected to one process: one worker of one node. The service side may run in any
other (``--workers N``; several ``provisiond serve`` on one PostgreSQL database). The broker
of each process knows the sessions connected to it (:class:`DeviceSession`, one per device:
the MQTT endpoint attaches a session after its CONNECT is authenticated and detaches it when
it closes), and reaches the others through a **signal stream** (``Stream.HUB_SIGNALS``):
every process appends what another process must act on and reads the stream for what concerns
its own sessions: when woken (a :class:`~provisiond.storage.StreamWatch`: on PostgreSQL,
LISTEN/NOTIFY wakes every process once the append is committed), at most once per
:data:`POLL_INTERVAL` over time (a few reads back to back, then one per interval through a burst
of signals), and every ``fallback_interval`` seconds without a wake (a safety
net for a lost notification). On SQLite, and on PostgreSQL while the listening connection is
lost, the watch is not live and the broker polls every :data:`POLL_INTERVAL` seconds.

* **In-process fast path.** When the device's session is in this process, every operation acts
  on it directly; no signal is written or read.
* **Signals** are small JSON documents (:class:`Signal` and its kinds), in the partition of the
  device they are about (``{hub}/{deviceId}``), or of the process they answer
  (``node:{id}``). Seqs increase in commit order across every process, which orders them.
* **One connection per device id.** An attaching session appends a ``connected`` signal and
  takes the seq the store gave it as its *connection order*. A process that reads the signal
  (or attaches a session locally) closes each session of the device with an older order: of
  two connections, the newer survives, whichever process holds them (IoT Hub's rule, error
  400027 ``ConnectionForcefullyClosedOnNewConnection``).
* **Direct methods** (:meth:`HubBroker.invoke_method`): the request goes to the session with a
  fresh ``$rid``; the device's response (``$iothub/methods/res/{status}/?$rid=``) resolves the
  waiting call. For a device in another process the request is a ``method`` signal; the holder
  answers ``accepted`` at once and ``response`` when the device answered (or ``response`` with
  404103 when the device is not subscribed to methods). A device that no process accepts for
  within :data:`ACCEPT_WINDOW` is not online; with a connect timeout the call waits that long
  for the device to connect (anywhere) and to subscribe to methods, as IoT Hub does: a
  connection newer than the request makes the caller signal it again, with the same ``$rid``;
  a holder delivers each ``$rid`` once. Errors:
  :class:`~provisiond.errors.DeviceNotOnlineError` (404103) and
  :class:`~provisiond.errors.GatewayTimeoutError` (504101).
* **Desired properties, cloud-to-device messages, disconnects** are told to the session, or
  signalled to the process that holds it (``desired``, ``c2d``, ``disconnect``; a ``disconnect``
  older than the session's connection does not concern it, and the session drops a ``desired``
  version its twin already had when it connected). Messages
  themselves stay in the database (the twin; ``Stream.HUB_C2D``): a signal only says "look".

Signals are short-lived: every process deletes those older than :data:`SIGNAL_TTL` seconds.
A process starts reading at the end of the stream (what was signalled before it started
concerns sessions it does not have).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from .._cancel import raise_if_cancelling, stop
from ..errors import (
    DeviceNotOnlineError,
    GatewayTimeoutError,
    InvalidBodyError,
    IotHubCode,
    ProvisioningError,
    StorageError,
)
from ..hub.messages import partition
from ..storage import Entry, Store, Stream, StreamWatch, utc_iso

__all__ = [
    "ACCEPT_WINDOW",
    "FALLBACK_INTERVAL",
    "MAX_METHOD_PAYLOAD",
    "POLL_INTERVAL",
    "SIGNAL_TTL",
    "DeviceSession",
    "HubBroker",
    "MethodResult",
]

log = logging.getLogger("provisiond.hub")

#: Seconds between two reads of the signal stream: the poll when the store cannot wake the
#: broker (SQLite; PostgreSQL's listening connection lost); when it can, the broker reads at
#: most this often over time (a burst of signals is read in batches, not once per signal).
POLL_INTERVAL = 0.02
#: Seconds between two reads of the signal stream when the store can wake the broker and did
#: not (``serve --hub-signal-poll``).
#: A quarter of :data:`ACCEPT_WINDOW`: should a listening connection die silently (no FIN; TCP
#: keepalives notice within about 25 s), the holder of a device still reads a method request
#: and says it holds the device within the window.
FALLBACK_INTERVAL = 0.25
#: Seconds a process that invoked a method for a device it does not hold waits for another
#: process to say it holds it (the device is not online otherwise).
ACCEPT_WINDOW = 1.0
#: Seconds a signal is kept; every process deletes older ones every :data:`_TRIM_EVERY` s.
SIGNAL_TTL = 60.0
_TRIM_EVERY = 15.0
_READ_BATCH = 500
#: Reads of the signal stream the broker may make back to back when woken (a method call from
#: another process takes two or three: the request, the holder's ``accepted``, the answer)
#: before it falls back to one per :data:`POLL_INTERVAL`.
_READ_BURST = 4
#: IoT Hub's limit on a direct method's request and response payloads (bytes of JSON).
MAX_METHOD_PAYLOAD = 128 * 1024
_NODE_PREFIX = "node:"


# --- what the broker needs of a session ------------------------------------------------------------


class DeviceSession(Protocol):
    """A device connected to this process (the MQTT endpoint's session)."""

    hub: str  #: the hub's host name, lower-cased
    device_id: str
    #: The seq of the session's ``connected`` signal: of two sessions of one device, the
    #: greater is the newer (set by :meth:`HubBroker.attach`).
    order: int

    def kick(self, reason: str, *, replaced: bool = False) -> None:
        """Close the connection (``reason`` goes in the log line; ``replaced``: by a newer
        connection of the device, which owns the identity's connection state now)."""

    def methods_subscribed(self) -> bool:
        """Whether the device is subscribed to ``$iothub/methods/POST/#``."""

    async def methods_subscription(self) -> bool:
        """Wait until the device subscribes to methods (True) or the session closes (False)."""

    def send_method(self, name: str, rid: str, payload: bytes) -> None:
        """Publish a method request."""

    def send_desired(self, changes: Mapping[str, Any], version: int) -> None:
        """Publish a desired-properties patch (if the device subscribed to them)."""

    def wake_c2d(self) -> None:
        """Look for queued cloud-to-device messages."""


@dataclass(frozen=True, slots=True)
class MethodResult:
    """A device's answer to a direct method: its status and its JSON payload (decoded)."""

    status: int
    payload: Any


# --- signals ---------------------------------------------------------------------------------------


class Signal(msgspec.Struct, tag_field="kind", rename="camel", omit_defaults=True, kw_only=True, frozen=True):
    pass


class Connected(Signal, tag="connected", kw_only=True, frozen=True):
    """A session of the device attached (its seq is its connection order) in process ``node``
    (which closes its own older session itself, and may read this signal before it knows it
    wrote it)."""

    node: str = ""


class Disconnect(Signal, tag="disconnect", kw_only=True, frozen=True):
    """Close the device's sessions older than this signal."""

    reason: str


class Desired(Signal, tag="desired", kw_only=True, frozen=True):
    changes: dict[str, Any]
    version: int


class C2d(Signal, tag="c2d", kw_only=True, frozen=True):
    pass


class MethodRequest(Signal, tag="method", kw_only=True, frozen=True):
    rid: str
    name: str
    payload: bytes
    #: Unix time until which the holder may wait for the device to subscribe to methods.
    connect_deadline: float
    origin: str


class MethodAccepted(Signal, tag="accepted", kw_only=True, frozen=True):
    rid: str


class MethodResponse(Signal, tag="response", kw_only=True, frozen=True):
    rid: str
    status: int = 0
    payload: bytes = b""
    #: An IoT Hub errorCode instead of a device's answer (404103: not subscribed to methods).
    error: int | None = None


_AnySignal = Connected | Disconnect | Desired | C2d | MethodRequest | MethodAccepted | MethodResponse
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_AnySignal)


class _AttachWaiter:
    """Resolved when a session of the device attaches (here, or a ``connected`` signal from
    another process) *after* seq :attr:`after`: a ``connected`` signal older than the method
    request a caller just signalled says nothing new (the holder got the request already)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[None] = loop.create_future()
        self.after: int | None = None  # None until armed: remember what comes meanwhile
        self._seen = 0

    def offer(self, seq: int) -> None:
        self._seen = max(self._seen, seq)
        if self.after is not None and seq > self.after and not self.future.done():
            self.future.set_result(None)

    def arm(self, after: int) -> None:
        self.after = after
        self.offer(self._seen)


@dataclass
class _Call:
    """A method call this process waits on: accepted (a holder has the device), then answered."""

    accepted: asyncio.Event
    answered: asyncio.Future[MethodResponse]


# --- the broker ------------------------------------------------------------------------------------


class HubBroker:
    """One process's broker (see the module docstring). :meth:`start` and :meth:`close` belong
    to the app's lifespan.

    :param clock: Unix seconds (connect deadlines travel between processes as Unix times).
    :param poll_interval: seconds between two reads of the signal stream when the store cannot
        wake the broker; when it can, the broker reads at most that often over time (after a
        few reads at once).
    :param fallback_interval: seconds between two reads when the store can wake the broker and
        did not.
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        poll_interval: float = POLL_INTERVAL,
        fallback_interval: float = FALLBACK_INTERVAL,
        accept_window: float = ACCEPT_WINDOW,
    ) -> None:
        self._store = store
        self._clock = clock
        self._poll_interval = poll_interval
        self._fallback_interval = max(fallback_interval, poll_interval)
        self._accept_window = accept_window
        self.node = uuid.uuid4().hex[:16]
        self._sessions: dict[str, DeviceSession] = {}
        self._calls: dict[str, _Call] = {}
        self._relayed: dict[str, tuple[str, float]] = {}  # rid -> (origin node, expiry)
        self._taken: dict[str, float] = {}  # rid -> expiry: requests delivered here already
        self._attach_waiters: dict[str, set[_AttachWaiter]] = {}
        self._cursor = 0
        self._watch: StreamWatch | None = None
        self._poller: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start reading the signal stream at its end (and deleting old signals)."""
        watch = self._store.watch(Stream.HUB_SIGNALS)  # before the first read: no wake is missed
        try:
            self._cursor = await self._end_of_stream()
        except BaseException:
            watch.close()
            raise
        self._watch = watch
        self._poller = asyncio.get_running_loop().create_task(self._poll(watch))

    async def close(self) -> None:
        await stop(self._poller, "the hub broker's signal poll")
        self._poller = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        for task in list(self._tasks):
            task.cancel()
        for call in self._calls.values():
            if not call.answered.done():
                call.answered.cancel()

    async def _end_of_stream(self) -> int:
        cursor = 0
        while entries := await self._store.read(Stream.HUB_SIGNALS, after=cursor, limit=_READ_BATCH * 4):
            cursor = entries[-1].seq
        return cursor

    # --- sessions --------------------------------------------------------------------------------

    async def attach(self, session: DeviceSession) -> None:
        """Make ``session`` the device's connection: signal it (its order is the signal's seq)
        and close every older session of the device, here and elsewhere.

        :raises StorageError: the signal could not be written (the CONNECT is refused).
        """
        key = partition(session.hub, session.device_id)
        [entry] = await self._store.append(
            Stream.HUB_SIGNALS, [(key, _encoder.encode(Connected(node=self.node)))]
        )
        session.order = entry.seq
        current = self._sessions.get(key)
        if current is not None and current is not session:
            if current.order > session.order:  # a newer one attached while this one signalled
                session.kick("a newer connection of the device replaced it", replaced=True)
                return
            current.kick("a new connection of the device replaced it", replaced=True)
        self._sessions[key] = session
        for waiter in list(self._attach_waiters.get(key, ())):
            waiter.offer(session.order)

    def detach(self, session: DeviceSession) -> None:
        key = partition(session.hub, session.device_id)
        if self._sessions.get(key) is session:
            del self._sessions[key]

    def session(self, hub: str, device_id: str) -> DeviceSession | None:
        """The device's session in this process, if it has one."""
        return self._sessions.get(partition(hub, device_id))

    def connected_here(self, hub: str, device_id: str) -> bool:
        return partition(hub, device_id) in self._sessions

    # --- what the service side asks ----------------------------------------------------------------

    async def notify_desired(
        self, hub: str, device_id: str, changes: Mapping[str, Any], version: int
    ) -> None:
        """Tell the device about a desired-properties change (call it once the change is
        committed). Devices that are not connected read the twin when they come back."""
        session = self.session(hub, device_id)
        if session is not None:
            session.send_desired(changes, version)
            return
        await self._signal(partition(hub, device_id), Desired(changes=dict(changes), version=version))

    async def notify_c2d(self, hub: str, device_id: str) -> None:
        """Tell the device's session that a cloud-to-device message is queued for it."""
        session = self.session(hub, device_id)
        if session is not None:
            session.wake_c2d()
            return
        await self._signal(partition(hub, device_id), C2d())

    async def disconnect(self, hub: str, device_id: str, reason: str) -> None:
        """Close the device's connection wherever it is (the identity was deleted or disabled,
        its credentials changed)."""
        session = self.session(hub, device_id)
        if session is not None:
            session.kick(reason)
        await self._signal(partition(hub, device_id), Disconnect(reason=reason))

    async def invoke_method(
        self,
        hub: str,
        device_id: str,
        name: str,
        payload: Any,
        *,
        response_timeout: float,
        connect_timeout: float = 0.0,
    ) -> MethodResult:
        """Invoke direct method ``name`` on the device and return its answer.

        :param payload: the request's payload, any JSON value (``None``: ``null``).
        :param response_timeout: seconds the device has to answer once the request reached it.
        :param connect_timeout: seconds to wait for the device to connect and subscribe to
            methods when it has not (0: it must be ready now).
        :raises InvalidBodyError: the payload is over 128 KB of JSON (400004).
        :raises DeviceNotOnlineError: the device is not connected and subscribed to methods
            within the connect timeout (404103).
        :raises GatewayTimeoutError: the device did not answer in time (504101).
        """
        body = _encoder.encode(payload)
        if len(body) > MAX_METHOD_PAYLOAD:
            raise InvalidBodyError(
                f"The method payload has {len(body)} bytes of JSON; IoT Hub's limit is {MAX_METHOD_PAYLOAD}.",
                error_code=IotHubCode.ARGUMENT_INVALID,
            )
        connect_deadline = self._clock() + max(0.0, connect_timeout)
        rid = uuid.uuid4().hex
        call = _Call(asyncio.Event(), asyncio.get_running_loop().create_future())
        self._calls[rid] = call
        try:
            await self._deliver(hub, device_id, name, rid, body, connect_deadline, call)
            try:
                async with asyncio.timeout(response_timeout):
                    answer = await call.answered
            except TimeoutError:
                raise GatewayTimeoutError(
                    f"Device {device_id!r} did not answer method {name!r} within {response_timeout:g} s."
                ) from None
        finally:
            self._calls.pop(rid, None)
        if answer.error is not None:
            raise _not_online(device_id, name, "it is not subscribed to methods")
        return MethodResult(answer.status, _decode_payload(answer.payload))

    async def _deliver(
        self,
        hub: str,
        device_id: str,
        name: str,
        rid: str,
        body: bytes,
        connect_deadline: float,
        call: _Call,
    ) -> None:
        """Hand the request to the session that holds the device, here or elsewhere; return
        once it is on its way (its answer resolves ``call``).

        :raises DeviceNotOnlineError: no session took it by ``connect_deadline``.
        """
        key = partition(hub, device_id)
        while True:
            session = self._sessions.get(key)
            if session is not None:
                remaining = connect_deadline - self._clock()
                if await _methods_ready(session, remaining):
                    if rid not in self._taken:  # else this process's relay of it has it already
                        self._taken[rid] = self._clock() + SIGNAL_TTL
                        session.send_method(name, rid, body)
                    return
                if self._sessions.get(key) is session:  # connected, but not subscribed in time
                    raise _not_online(device_id, name, "it is not subscribed to methods")
                continue  # it closed while we waited: look again
            # Not here: ask the others, and wait for one of them to take it.
            waiter = self._attach_waiter(key)
            attached = waiter.future
            try:
                seq = await self._signal(
                    key,
                    MethodRequest(
                        rid=rid, name=name, payload=body, connect_deadline=connect_deadline, origin=self.node
                    ),
                )
            except BaseException:
                attached.cancel()
                raise
            # Only a connection newer than the request may need it again (a holder that read it
            # delivers it; a device that connects later is asked again, with the same $rid).
            waiter.arm(seq)
            if self._sessions.get(key) is not None:
                # It attached here while we signalled: its ``connected`` may be older than the
                # request, and the poll may have read the request before it attached (and
                # dropped it), so nothing would deliver it: deliver it here (once, by $rid).
                continue
            accepted = asyncio.ensure_future(call.accepted.wait())
            try:
                waits: set[asyncio.Future[Any]] = {accepted, attached, call.answered}
                await asyncio.wait(
                    waits,
                    timeout=self._accept_window,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if call.accepted.is_set() or call.answered.done():
                    return
                if attached.done():
                    continue  # the device connected here meanwhile
                remaining = connect_deadline - self._clock()
                if remaining <= 0:
                    raise _not_online(device_id, name, "it is not connected")
                # Wait for the device to connect (a ``connected`` signal from any process, or
                # a session attaching here, wakes us), then try again.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await asyncio.shield(attached)
                if not attached.done():
                    raise _not_online(device_id, name, "it did not connect within the connect timeout")
            finally:
                accepted.cancel()
                attached.cancel()

    def _attach_waiter(self, key: str) -> _AttachWaiter:
        waiter = _AttachWaiter(asyncio.get_running_loop())
        self._attach_waiters.setdefault(key, set()).add(waiter)

        def forget(_: asyncio.Future[None]) -> None:
            waiters = self._attach_waiters.get(key)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._attach_waiters[key]

        waiter.future.add_done_callback(forget)
        return waiter

    # --- what sessions report ------------------------------------------------------------------------

    def method_response(self, session: DeviceSession, rid: str, status: int, payload: bytes) -> None:
        """A device answered a method request (``$iothub/methods/res/{status}/?$rid=``)."""
        call = self._calls.get(rid)
        if call is not None:
            if not call.answered.done():
                call.answered.set_result(MethodResponse(rid=rid, status=status, payload=payload))
            return
        relayed = self._relayed.pop(rid, None)
        if relayed is not None:
            origin, _ = relayed
            self._spawn(
                self._signal(_NODE_PREFIX + origin, MethodResponse(rid=rid, status=status, payload=payload))
            )
            return
        log.info(
            "hub %s device %s answered a method request that nobody waits for ($rid=%s): late, or never sent",
            session.hub,
            session.device_id,
            rid[:64],
        )

    # --- signals ---------------------------------------------------------------------------------

    async def _signal(self, key: str, signal: Signal) -> int:
        """Append ``signal`` in partition ``key``; its seq."""
        [entry] = await self._store.append(Stream.HUB_SIGNALS, [(key, _encoder.encode(signal))])
        return entry.seq

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            if isinstance(exc, ProvisioningError):
                log.warning("hub broker: %s", exc.message)
            else:
                log.error("hub broker: internal error", exc_info=exc)

    async def _poll(self, watch: StreamWatch) -> None:
        last_trim = 0.0
        credit, credited = float(_READ_BURST), time.monotonic()
        while True:
            try:
                while True:
                    entries = await self._store.read(
                        Stream.HUB_SIGNALS, after=self._cursor, limit=_READ_BATCH
                    )
                    for entry in entries:
                        self._cursor = entry.seq
                        self._on_entry(entry)
                    if len(entries) < _READ_BATCH:
                        break
                now = time.monotonic()
                if now - last_trim >= _TRIM_EVERY:
                    last_trim = now
                    await self._store.trim(Stream.HUB_SIGNALS, before=utc_iso(self._clock() - SIGNAL_TTL))
                    self._expire_relayed()
            except StorageError as exc:
                raise_if_cancelling()  # (a cancellation inside a database call: see provisiond._cancel)
                log.warning("hub broker: cannot read the signal stream (%s); retrying", exc.message)
                await asyncio.sleep(1.0)
                continue
            raise_if_cancelling()
            await watch.wait(self._fallback_interval if watch.live else self._poll_interval)
            # Read at once when woken, but through a burst of signals no more often than the
            # poll would: up to _READ_BURST reads back to back, then one per poll interval.
            now = time.monotonic()
            credit, credited = min(_READ_BURST, credit + (now - credited) / self._poll_interval), now
            if credit < 1:
                await asyncio.sleep((1 - credit) * self._poll_interval)
                credit, credited = 1.0, time.monotonic()
            credit -= 1

    def _expire_relayed(self) -> None:
        now = self._clock()
        for rid in [rid for rid, (_, expiry) in self._relayed.items() if expiry < now]:
            del self._relayed[rid]
        for rid in [rid for rid, expiry in self._taken.items() if expiry < now]:
            del self._taken[rid]

    def _on_entry(self, entry: Entry) -> None:
        key = entry.partition
        if key.startswith(_NODE_PREFIX):
            if key == _NODE_PREFIX + self.node:
                self._on_answer(_decode(entry))
            return
        session = self._sessions.get(key)
        waiters = self._attach_waiters.get(key)
        if session is None and not waiters:
            return  # about a device this process does not hold nor waits for
        signal = _decode(entry)
        if signal is None:
            return
        if isinstance(signal, Connected):
            if session is not None and session.order < entry.seq and signal.node != self.node:
                session.kick("a new connection of the device (on another process) replaced it", replaced=True)
            for waiter in list(self._attach_waiters.get(key, ())):
                waiter.offer(entry.seq)
        elif session is None:
            return
        elif isinstance(signal, Disconnect):
            if session.order < entry.seq:  # not a session that connected after it was asked
                session.kick(signal.reason)
        elif isinstance(signal, Desired):
            # The session drops a version its twin had when it connected (and orders the rest).
            session.send_desired(signal.changes, signal.version)
        elif isinstance(signal, C2d):
            session.wake_c2d()
        elif isinstance(signal, MethodRequest):
            self._spawn(self._relay(session, signal))

    def _on_answer(self, signal: _AnySignal | None) -> None:
        if isinstance(signal, MethodAccepted):
            call = self._calls.get(signal.rid)
            if call is not None:
                call.accepted.set()
        elif isinstance(signal, MethodResponse):
            call = self._calls.get(signal.rid)
            if call is not None and not call.answered.done():
                call.answered.set_result(signal)

    async def _relay(self, session: DeviceSession, request: MethodRequest) -> None:
        """Deliver another process's method request to our session, and say so (or say the
        device is not subscribed to methods)."""
        origin = _NODE_PREFIX + request.origin
        if request.rid in self._taken:
            return  # asked again (the origin saw a connection that was not newer): delivered once
        self._taken[request.rid] = self._clock() + SIGNAL_TTL
        remaining = request.connect_deadline - self._clock()
        if await _methods_ready(session, remaining):
            # The response may come back before ``accepted`` is written: the origin takes either.
            self._relayed[request.rid] = (request.origin, self._clock() + SIGNAL_TTL)
            session.send_method(request.name, request.rid, request.payload)
            await self._signal(origin, MethodAccepted(rid=request.rid))
        else:
            await self._signal(
                origin, MethodResponse(rid=request.rid, error=int(IotHubCode.DEVICE_NOT_ONLINE))
            )


async def _methods_ready(session: DeviceSession, seconds: float) -> bool:
    """Whether the session is subscribed to methods, or subscribes within ``seconds``."""
    if session.methods_subscribed():
        return True
    if seconds <= 0:
        return False
    try:
        async with asyncio.timeout(seconds):
            return await session.methods_subscription()
    except TimeoutError:
        return False


def _decode(entry: Entry) -> _AnySignal | None:
    try:
        return _decoder.decode(entry.doc)
    except msgspec.MsgspecError as exc:  # a signal of a newer version, or a bug
        log.warning("hub broker: ignoring signal %d (%s)", entry.seq, exc)
        return None


def _decode_payload(payload: bytes) -> Any:
    """A device's method response payload: JSON (empty: ``null``). A payload that is not JSON
    is passed on as a string (IoT Hub expects JSON; the Python SDK always sends it)."""
    if not payload.strip():
        return None
    try:
        return msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return payload.decode("utf-8", "replace")


def _not_online(device_id: str, name: str, why: str) -> DeviceNotOnlineError:
    return DeviceNotOnlineError(f"Cannot invoke method {name!r} on device {device_id!r}: {why}.")
