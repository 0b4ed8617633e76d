"""The built-in hubs' device endpoint: devices connect over MQTT 3.1.1 (and MQTT over
WebSockets) as they connect to IoT Hub (iothub.md §1), on the listener DPS uses.

Theory of operation
-------------------
One MQTT listener (and one WebSocket router) serves DPS and the hubs. The DPS endpoint
(:mod:`provisiond.service.mqtt`) reads the CONNECT and asks :meth:`HubEndpoint.claims`
whether its user name names a built-in hub (``{hubHostName}/{deviceId}/?api-version=...``);
if so it hands the stream and its MQTT machine, paused after the CONNECT, to
:meth:`HubEndpoint.serve`, which runs a :class:`_HubSession` to the end. The hub applies its
own limits from then on: messages up to IoT Hub's 256 KB, keep-alive enforced at 1.5 times the
device's interval but never past IoT Hub's 1,767 s, more publishes in flight.

* **CONNECT** (:mod:`provisiond.service.hub_auth`): the device's SAS token or X.509 client
  certificate against its identity, refusals with IoT Hub's return codes. A clean-session-0
  connection gets its stored session back (:mod:`provisiond.service.hub_sessions`: its
  subscriptions; CONNACK's session present says so); a clean one discards it. The session is
  attached to the broker (:mod:`provisiond.service.hub_broker`), which closes any older
  connection of the device, here or in another process, and the identity becomes
  ``Connected``.
* **SUBSCRIBE**: the documented filters only (``devices/{id}/messages/devicebound/#``,
  ``$iothub/twin/res/#``, ``$iothub/twin/PATCH/properties/desired/#``,
  ``$iothub/methods/POST/#``), at most :data:`MAX_SUBSCRIPTIONS`, granted at QoS 0 or 1 (a QoS 2
  request gets 1); anything else gets the failure code 0x80. A persistent session stores its
  subscriptions before the SUBACK.
* **PUBLISH** (a QoS 2 publish closes the connection, as IoT Hub does; so does a publish to a
  topic IoT Hub does not have, or telemetry on behalf of another device):

  - telemetry (``devices/{id}/messages/events/{bag}``) becomes a
    :class:`~provisiond.hub.messages.TelemetryEvent` appended to ``Stream.HUB_EVENTS``; the
    PUBACK goes out only once the append is committed (consecutive publishes of one read are
    appended together); QoS 0 telemetry is stored too. The retain flag becomes the
    ``mqtt-retain`` property; a Will on the telemetry topic is stored, with
    ``iothub-MessageType: Will``, when the connection ends without DISCONNECT;
  - twin GET answers ``$iothub/twin/res/200/?$rid=`` with the device's view of the twin;
    a reported-properties PATCH answers ``204`` with ``&$version={new reported version}``;
    errors answer their status with a JSON body carrying ``errorCode`` (what the Node.js SDK
    reads) and ``message`` (:mod:`provisiond.service.hub_twin_channel`, which also
    publishes the desired patches in version order);
  - a method response (``$iothub/methods/res/{status}/?$rid=``) goes to the broker.

  Every QoS 1 publish is acknowledged (the Python SDK publishes everything at QoS 1).
* **What the hub publishes**: twin responses and desired patches at the QoS the device was
  granted (desired patches carry ``$version`` in the topic and the body), method requests at QoS
  0 (as IoT Hub), cloud-to-device messages from ``Stream.HUB_C2D`` at the granted QoS, at most
  :data:`~provisiond.service.hub_c2d.C2D_WINDOW` awaiting their PUBACK; a PUBACK removes the
  message; an expired one is dropped undelivered; one published to an earlier connection goes
  out again with DUP (:mod:`provisiond.service.hub_c2d`).
* **The identity** learns ``connectionState`` at connect and close, and ``lastActivityTime``
  in batches (every ``--hub-activity-interval`` seconds, :data:`ACTIVITY_INTERVAL` by default;
  not per message).

Every close is one log line that names the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from ..errors import (
    LocalProtocolError,
    ProvisioningError,
    RemoteProtocolError,
    StorageError,
)
from ..hub.messages import (
    encode_event,
    partition,
    telemetry_event,
)
from ..hub.registry import HubRegistry
from ..protocol.hub_topics import (
    Filter,
    PublicationKind,
    classify_filter,
    method_request_topic,
    parse_hub_username,
    parse_publication,
)
from ..protocol.mqtt import (
    Connect,
    ConnectReturnCode,
    Disconnect,
    MqttConnection,
    Packet,
    Puback,
    Publish,
    QoS,
    State,
    SubackReturnCode,
    Subscribe,
    Unsubscribe,
)
from ..storage import Stream, utc_iso
from .context import ServiceContext
from .hub_auth import HubAuthenticator, Refused
from .hub_broker import HubBroker
from .hub_c2d import C2D_WINDOW, C2dDelivery
from .hub_sessions import SessionStore, StoredSession
from .hub_twin_channel import TwinChannel
from .streams import ByteStream, StreamClosed

__all__ = ["ACTIVITY_INTERVAL", "C2D_WINDOW", "MAX_MESSAGE_BYTES", "MAX_SUBSCRIPTIONS", "HubEndpoint"]

log = logging.getLogger("provisiond.hub")

#: IoT Hub's largest device-to-cloud message body.
MAX_MESSAGE_BYTES = 256 * 1024
#: The largest packet: a message, its topic (property bag) and the header.
MAX_PACKET = MAX_MESSAGE_BYTES + 64 * 1024 + 16
#: IoT Hub's cap on how long it waits for a silent client (1.5 x keep-alive, at most this).
MAX_IDLE = 1767.0
#: Publishes of the hub a device may leave unacknowledged before it is disconnected.
MAX_INFLIGHT = 256
MAX_SUBSCRIPTIONS = 5
#: Seconds between two writes of the devices' ``lastActivityTime`` (the default of
#: ``Settings.hub_activity_interval``).
ACTIVITY_INTERVAL = 30.0
_READ_SIZE = 65536
#: Output queued for a device that does not read it (its answers while an earlier write waits
#: for the peer) past which the session stops reading the device's requests, and how long the
#: device then has to read before it is disconnected. Without it a device that sends requests
#: (twin GETs at QoS 0, say) and never reads made the server hold gigabytes of answers.
MAX_UNREAD = 256 * 1024
UNREAD_TIMEOUT = 30.0
_GRANTED = {
    QoS.AT_MOST_ONCE: SubackReturnCode.GRANTED_QOS_0,
    QoS.AT_LEAST_ONCE: SubackReturnCode.GRANTED_QOS_1,
}
_json = msgspec.json.Encoder()


class HubEndpoint:
    """The built-in hubs' MQTT sessions for one worker (see the module docstring). Its
    :meth:`start` and :meth:`close` belong to the app's lifespan (the batched activity)."""

    def __init__(self, ctx: ServiceContext, broker: HubBroker, registry: HubRegistry) -> None:
        self.ctx = ctx
        self.broker = broker
        self.registry = registry
        self.sessions = SessionStore(ctx.store)
        self.auth = HubAuthenticator(ctx.store, clock_skew=ctx.settings.clock_skew)
        self._activity: dict[tuple[str, str], float] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._flusher = asyncio.get_running_loop().create_task(self._flush_activity_forever())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        with contextlib.suppress(ProvisioningError):
            await self._flush_activity()

    async def claims(self, connect: Connect) -> str | None:
        """The built-in hub (host name, lower-cased) a CONNECT is for, or None: a user name
        that begins with a built-in hub's host name is the hub's, anything else DPS's."""
        username = connect.username
        if not username or "/" not in username:
            return None
        host = username.split("/", 1)[0].lower()
        if host == self.ctx.settings.first_builtin_hub:
            return host
        try:
            hub = (await self.ctx.linked_hubs(max_age=1.0)).get(host)
        except StorageError:
            # The hub session refuses it with "server unavailable" if it looks like a hub's.
            return host if "/?" in username else None
        return host if hub is not None and hub.builtin else None

    async def serve(self, stream: ByteStream, machine: MqttConnection, hub: str, transport: str) -> None:
        """Run the session of a CONNECT that :meth:`claims` gave to ``hub``; the machine holds
        the CONNECT, not answered yet."""
        await _HubSession(self, stream, machine, hub, transport).run()

    # --- lastActivityTime, in batches ---------------------------------------------------------------

    def touch(self, hub: str, device_id: str) -> None:
        self._activity[(hub, device_id)] = self.ctx.clock()

    def forget(self, hub: str, device_id: str) -> None:
        self._activity.pop((hub, device_id), None)

    async def _flush_activity_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ctx.settings.hub_activity_interval)
            try:
                await self._flush_activity()
            except ProvisioningError as exc:
                log.warning("hub: cannot record the devices' last activity (%s)", exc.message)

    async def _flush_activity(self) -> None:
        activity, self._activity = self._activity, {}
        for (hub, device_id), when in activity.items():
            await self.registry.record_activity(hub, device_id, when=when)


class _HubSession:
    """One device's connection to a built-in hub (a :class:`~provisiond.service.hub_broker.DeviceSession`)."""

    def __init__(
        self, endpoint: HubEndpoint, stream: ByteStream, machine: MqttConnection, hub: str, transport: str
    ) -> None:
        self.endpoint = endpoint
        self.broker = endpoint.broker
        self.stream = stream
        self.machine = machine
        self.hub = hub
        self.transport = transport
        assert machine.connect_packet is not None
        self.connect: Connect = machine.connect_packet
        self.device_id = ""
        self.order = 0
        self.persistent = not self.connect.clean_session
        self.auth_method = "sas"
        self.expires: float | None = None  # monotonic, when the SAS token expires
        self.subscriptions: dict[str, tuple[Filter, QoS]] = {}
        self.orderly = False  # the device sent DISCONNECT: no Will, no log line at info
        self.replaced = False  # a newer connection of the device took over
        self.unread = False  # the device did not read what it was sent (MAX_UNREAD)
        self.attached = False
        self._session_present = False
        self._identity_created: str | None = None
        self._recv: asyncio.Future[bytes] | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._methods_waiters: list[asyncio.Future[bool]] = []
        self.c2d = C2dDelivery(self, endpoint.ctx.store, endpoint.ctx.clock)
        self.twin = TwinChannel(self, endpoint.registry, endpoint.ctx.clock)

    @property
    def key(self) -> str:
        return partition(self.hub, self.device_id)

    @property
    def who(self) -> str:
        return f"{self.stream.peer} {self.hub}/{self.device_id or '?'} [{self.transport}]"

    # --- the connection ----------------------------------------------------------------------------

    async def run(self) -> None:
        self.machine.set_limits(max_packet_size=MAX_PACKET, max_idle=MAX_IDLE, max_inflight=MAX_INFLIGHT)
        self.stream.guard.head_received()  # the CONNECT is in
        try:
            if await self._connect():
                await self._loop()
        except StreamClosed as exc:
            self.machine.close(f"the connection broke while sending ({exc or 'reset'})")
        finally:
            await self._end()

    async def _connect(self) -> bool:
        refusal = await self._admit()
        if refusal is not None:
            self.machine.refuse(refusal.code, refusal.reason)
            return False
        self.attached = True
        if self.machine.state is State.CLOSED:  # a newer connection of the device came first
            return False
        self.machine.accept(session_present=self._session_present)
        self._schedule_flush()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("MQTT %s: connected (keep-alive %d s)", self.who, self.connect.keep_alive)
        try:
            await self.endpoint.registry.set_connection_state(self.hub, self.device_id, connected=True)
        except ProvisioningError as exc:  # the database is down, or the record kept changing
            log.warning("MQTT %s: cannot record the connection state (%s)", self.who, exc.message)
        self.c2d.wake()
        pipelined = self.machine.feed_bytes(b"")
        if pipelined:
            await self._handle(pipelined)
            self._schedule_flush()
        return True

    async def _admit(self) -> Refused | None:
        """Authenticate the CONNECT, restore or discard the stored session, attach to the broker."""
        connect = self.connect
        try:
            username = parse_hub_username(connect.username or "")
        except RemoteProtocolError as exc:
            return Refused(ConnectReturnCode.BAD_USERNAME_OR_PASSWORD, exc.message)
        self.device_id = username.device_id
        if username.module_id is not None:
            return Refused(
                ConnectReturnCode.IDENTIFIER_REJECTED, "module identities are not served by the built-in hub"
            )
        if connect.client_id != username.device_id:
            return Refused(
                ConnectReturnCode.IDENTIFIER_REJECTED,
                f"the client id {connect.client_id[:128]!r} is not the user name's device id "
                f"{username.device_id[:128]!r}",
            )
        endpoint = self.endpoint
        try:
            found = await endpoint.registry.find(self.hub, self.device_id)
            result = await endpoint.auth.authenticate(
                found,
                hub=self.hub,
                device_id=self.device_id,
                password=connect.password,
                chain=self.stream.client_chain,
                now=endpoint.ctx.clock(),
            )
            if isinstance(result, Refused):
                return result
            assert found is not None
            self.auth_method = result.method
            if result.expires is not None:
                self.expires = time.monotonic() + (result.expires - endpoint.ctx.clock())
            self._identity_created = found.created
            self.twin.desired_version = found.twin.desired_version
            stored = await self._restore()
            await self.broker.attach(self)
        except StorageError as exc:
            return Refused(ConnectReturnCode.SERVER_UNAVAILABLE, f"the database failed: {exc.message}")
        self._session_present = stored is not None
        return None

    async def _restore(self) -> StoredSession | None:
        sessions = self.endpoint.sessions
        if not self.persistent:
            await sessions.discard(self.hub, self.device_id)
            return None
        stored = await sessions.load(self.hub, self.device_id, identity=self._identity_created)
        if stored is None:  # a new session exists from now on (a later CONNECT finds it)
            await sessions.save(self.hub, self.device_id, StoredSession(identity=self._identity_created))
            return None
        for topic_filter, qos in stored.subscriptions.items():
            kind = classify_filter(topic_filter, self.device_id)
            if kind is not None:
                self.subscriptions[topic_filter] = (kind, QoS(min(qos, 1)))
        self.c2d.restore(stored.c2d_sent)
        return stored

    async def _loop(self) -> None:
        machine = self.machine
        while machine.state is not State.CLOSED:
            if machine.outbound_pending > MAX_UNREAD:
                await self._wait_for_the_reader()
                continue
            data = await self._receive()
            if data is None:
                continue
            if not data:
                machine.close("the device closed the connection without DISCONNECT")
                break
            self.endpoint.touch(self.hub, self.device_id)
            try:
                packets = machine.feed_bytes(data)
            except RemoteProtocolError:
                break  # the machine closed itself and kept the reason
            await self._handle(packets)
            self._schedule_flush()

    async def _receive(self) -> bytes | None:
        """The next bytes; None when a deadline passed (the machine or the token decided) or
        the session was kicked; b"" when the device closed."""
        guard = self.stream.guard
        if self.machine.pending_input:
            guard.receiving()
        else:
            guard.busy()
        if self._recv is None:
            self._recv = asyncio.ensure_future(self.stream.receive(_READ_SIZE))
        now = time.monotonic()
        deadlines = [d for d in (self.machine.deadline(), self.expires) if d is not None]
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        await asyncio.wait({self._recv}, timeout=timeout)
        if self._recv.done():
            task, self._recv = self._recv, None
            return None if task.cancelled() else task.result()
        if self.expires is not None and time.monotonic() >= self.expires:
            self.machine.close("the SAS token expired (the device must reconnect with a new one)")
        else:
            self.machine.handle_deadline()
        return None

    async def _wait_for_the_reader(self) -> None:
        """Go on with nothing more of the device's until it has read what it was sent (see
        MAX_UNREAD)."""
        self._schedule_flush()
        flushing = self._flushing
        assert flushing is not None
        done, _ = await asyncio.wait({flushing}, timeout=UNREAD_TIMEOUT)
        if not done:
            self.kick(
                f"the device did not read its answers: {self.machine.outbound_pending} bytes more were "
                f"waiting after {UNREAD_TIMEOUT:g} s"
            )
            self.unread = True  # nothing more is sent: the close aborts what is queued
            flushing.cancel()
            await asyncio.wait({flushing})

    def kick(self, reason: str, *, replaced: bool = False) -> None:
        """Close the connection from outside (the broker)."""
        self.replaced = self.replaced or replaced
        self.machine.close(reason)
        if self._recv is not None:
            self._recv.cancel()

    async def _end(self) -> None:
        machine = self.machine
        if machine.state is not State.CLOSED:
            machine.close("closed")
        if self._recv is not None:
            self._recv.cancel()
        self.c2d.cancel()
        for waiter in self._methods_waiters:
            if not waiter.done():
                waiter.set_result(False)
        with contextlib.suppress(StreamClosed):
            if self._flushing is not None:
                await self._flushing
            if (data := machine.get_outbound_data()) and not self.unread:
                await self.stream.send(data)
        if self.attached:
            self.broker.detach(self)
            await self._after_close()
        level = logging.DEBUG if self.orderly else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "MQTT %s: closed: %s", self.who, machine.close_reason or "closed")

    async def _after_close(self) -> None:
        """The Will, what the stored session must remember, and (last: once it reads
        ``Disconnected``, the rest is done) the connection state."""
        self.twin.close()
        endpoint = self.endpoint
        endpoint.forget(self.hub, self.device_id)
        try:
            if not self.orderly:
                await self._send_will()
            if self.persistent and self.c2d.sent_since_restore:
                await endpoint.sessions.record_c2d_sent(
                    self.hub, self.device_id, self.c2d.sent, identity=self._identity_created
                )
            if not self.replaced:
                await endpoint.registry.set_connection_state(self.hub, self.device_id, connected=False)
        except ProvisioningError as exc:
            log.warning("MQTT %s: after the close: %s", self.who, exc.message)

    async def _send_will(self) -> None:
        will = self.connect.will
        if will is None:
            return
        try:
            publication = parse_publication(will.topic)
        except RemoteProtocolError:
            publication = None
        if publication is None or publication.kind is not PublicationKind.TELEMETRY:
            log.info(
                "MQTT %s: the Will's topic %r is not the device's telemetry topic: dropped",
                self.who,
                will.topic[:200],
            )
            return
        event = telemetry_event(
            self.device_id,
            publication.properties,
            will.message,
            enqueued_time=utc_iso(self.endpoint.ctx.clock()),
            auth_method=self.auth_method,
            retain=will.retain,
            will=True,
        )
        await self.endpoint.ctx.store.append(Stream.HUB_EVENTS, [(self.key, encode_event(event))])

    # --- sending -------------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while data := self.machine.get_outbound_data():
                await self.stream.send(data)
        except StreamClosed as exc:
            self.kick(f"the connection broke while sending ({exc or 'reset'})")
        finally:
            self._flushing = None

    def publish(self, topic: str, payload: bytes, qos: QoS, *, dup: bool = False) -> int | None:
        """Queue a publish of ours; None at QoS 0 or when the session closed."""
        if self.machine.state is not State.CONNECTED:
            return None
        try:
            packet_id = self.machine.publish(topic, payload, qos=qos, dup=dup and qos is QoS.AT_LEAST_ONCE)
        except LocalProtocolError as exc:
            self.kick(f"the device leaves too many publishes unacknowledged ({exc.message})")
            return None
        self._schedule_flush()
        return packet_id

    def granted(self, kind: Filter) -> QoS | None:
        granted = [qos for filter_kind, qos in self.subscriptions.values() if filter_kind is kind]
        return max(granted) if granted else None

    # --- what the broker asks ----------------------------------------------------------------------

    def methods_subscribed(self) -> bool:
        return self.granted(Filter.METHODS) is not None

    async def methods_subscription(self) -> bool:
        if self.methods_subscribed():
            return True
        if self.machine.state is State.CLOSED:
            return False
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._methods_waiters.append(waiter)
        try:
            return await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._methods_waiters.remove(waiter)

    def _ready_methods(self) -> None:
        if self.methods_subscribed():
            for waiter in self._methods_waiters:
                if not waiter.done():
                    waiter.set_result(True)

    def send_method(self, name: str, rid: str, payload: bytes) -> None:
        # IoT Hub publishes method requests at QoS 0 (the MQTT doc), whatever was granted.
        self.publish(method_request_topic(name, rid), payload, QoS.AT_MOST_ONCE)

    def send_desired(self, changes: Mapping[str, Any], version: int) -> None:
        self.twin.send_desired(changes, version)

    def wake_c2d(self) -> None:
        self.c2d.wake()

    # --- packets -----------------------------------------------------------------------------------

    async def _handle(self, packets: list[Packet]) -> None:
        telemetry: list[tuple[Publish, dict[str, str | None]]] = []
        # A DISCONNECT closes the machine as soon as it is read, but what the device sent before
        # it in the same read is still its telemetry: stored (nothing can be acknowledged any
        # more); its requests are not answered.
        disconnected = any(isinstance(packet, Disconnect) for packet in packets)
        for packet in packets:
            if isinstance(packet, Disconnect):  # the machine closed on it: an orderly end
                self.orderly = True
                break
            if self.machine.state is State.CLOSED and not disconnected:
                return
            if isinstance(packet, Publish):
                try:
                    publication = parse_publication(packet.topic)
                except RemoteProtocolError as exc:
                    self.machine.close(f"a publish to a topic IoT Hub does not have: {exc.message}")
                    return
                if publication.kind is PublicationKind.TELEMETRY:
                    if not self._own_telemetry(packet, publication.device_id):
                        return
                    telemetry.append((packet, publication.properties))
                    continue
                await self._store_telemetry(telemetry)
                if self.machine.state is not State.CLOSED:
                    await self._on_request(
                        packet, publication.kind, publication.rid or "", publication.status
                    )
                    if self.machine.outbound_pending > MAX_UNREAD:  # answers the device has not read
                        await self._wait_for_the_reader()
                continue
            await self._store_telemetry(telemetry)
            if self.machine.state is State.CLOSED:
                continue
            if isinstance(packet, Subscribe):
                await self._on_subscribe(packet)
            elif isinstance(packet, Unsubscribe):
                await self._on_unsubscribe(packet)
            elif isinstance(packet, Puback):
                await self.c2d.acknowledged(packet.packet_id)  # a cloud-to-device message
            # PINGREQ: the machine answered it; DISCONNECT: above.
        await self._store_telemetry(telemetry)

    def _own_telemetry(self, publish: Publish, device_id: str | None) -> bool:
        if device_id != self.device_id:
            self.machine.close(f"telemetry for another device ({(device_id or '')[:128]!r})")
            return False
        if len(publish.payload) > MAX_MESSAGE_BYTES:
            self.machine.close(
                f"a message of {len(publish.payload)} bytes; IoT Hub takes at most {MAX_MESSAGE_BYTES}"
            )
            return False
        return True

    async def _store_telemetry(self, batch: list[tuple[Publish, dict[str, str | None]]]) -> None:
        """Append the batch durably, then acknowledge each publish in order."""
        if not batch:
            return
        now = utc_iso(self.endpoint.ctx.clock())
        items = [
            (
                self.key,
                encode_event(
                    telemetry_event(
                        self.device_id,
                        properties,
                        publish.payload,
                        enqueued_time=now,
                        auth_method=self.auth_method,
                        retain=publish.retain,
                    )
                ),
            )
            for publish, properties in batch
        ]
        publishes = [publish for publish, _ in batch]
        batch.clear()
        try:
            await self.endpoint.ctx.store.append(Stream.HUB_EVENTS, items)
        except StorageError as exc:
            # Not acknowledged: the device sends them again on its next connection.
            self.machine.close(f"telemetry could not be stored ({exc.message})")
            return
        if self.machine.state is State.CLOSED:
            return  # closed while they were stored (the device disconnected, or was replaced)
        for publish in publishes:
            self.machine.acknowledge(publish)

    async def _on_request(
        self, publish: Publish, kind: PublicationKind, rid: str, status: int | None
    ) -> None:
        self.machine.acknowledge(publish)  # PUBACK first, then the response
        if kind is PublicationKind.METHOD_RESPONSE:
            assert status is not None
            self.broker.method_response(self, rid, status, publish.payload)
            return
        await self.twin.answer(publish, kind, rid)

    async def _on_subscribe(self, subscribe: Subscribe) -> None:
        codes: list[SubackReturnCode] = []
        before = dict(self.subscriptions)
        for subscription in subscribe.subscriptions:
            topic_filter = subscription.topic_filter
            kind = classify_filter(topic_filter, self.device_id)
            if kind is None or (
                topic_filter not in self.subscriptions and len(self.subscriptions) >= MAX_SUBSCRIPTIONS
            ):
                why = (
                    "not a topic filter IoT Hub has"
                    if kind is None
                    else f"over {MAX_SUBSCRIPTIONS} subscriptions"
                )
                log.info("MQTT %s: refused the subscription to %r (%s)", self.who, topic_filter[:200], why)
                codes.append(SubackReturnCode.FAILURE)
                continue
            qos = QoS.AT_MOST_ONCE if subscription.qos is QoS.AT_MOST_ONCE else QoS.AT_LEAST_ONCE
            self.subscriptions[topic_filter] = (kind, qos)
            codes.append(_GRANTED[qos])
        if self.persistent and self.subscriptions != before:
            try:
                await self.endpoint.sessions.save(self.hub, self.device_id, self._stored())
            except StorageError as exc:
                log.warning("MQTT %s: cannot store the session's subscriptions (%s)", self.who, exc.message)
                self.subscriptions = before
                codes = [SubackReturnCode.FAILURE] * len(codes)
        if self.machine.state is State.CONNECTED:
            self.machine.grant(subscribe, codes)
        self._ready_methods()
        self.c2d.wake()

    async def _on_unsubscribe(self, unsubscribe: Unsubscribe) -> None:
        removed = [f for f in unsubscribe.topic_filters if self.subscriptions.pop(f, None) is not None]
        if removed and self.persistent:
            try:
                await self.endpoint.sessions.save(self.hub, self.device_id, self._stored())
            except StorageError as exc:
                log.warning("MQTT %s: cannot store the session's subscriptions (%s)", self.who, exc.message)

    def _stored(self) -> StoredSession:
        return StoredSession(
            subscriptions={f: int(qos) for f, (_, qos) in self.subscriptions.items()},
            c2d_sent=self.c2d.sent,
            identity=self._identity_created,
        )
