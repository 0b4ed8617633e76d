"""Cloud-to-device delivery for one device connection to a built-in hub
(:mod:`provisiond.service.hub_mqtt`): the messages of ``Stream.HUB_C2D`` in the device's
partition go out at the QoS the device was granted for ``devices/{id}/messages/devicebound/#``,
at most :data:`C2D_WINDOW` awaiting their PUBACK; a PUBACK removes the message; an expired one
is dropped undelivered (one log line); QoS 0 is delivered at most once; a message published to
an earlier connection of a persistent session goes out again with DUP (the stored session
remembers the newest sequence number published, :attr:`C2dDelivery.sent`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from ..errors import StorageError
from ..hub.messages import CloudToDeviceMessage, c2d_properties, decode_c2d
from ..protocol.hub_topics import Filter, c2d_topic
from ..protocol.mqtt import MqttConnection, QoS, State
from ..storage import Store, Stream, utc_iso

__all__ = ["C2D_WINDOW", "DeviceConnection", "C2dDelivery"]

log = logging.getLogger("provisiond.hub")

#: Cloud-to-device messages awaiting their PUBACK at once, per device.
C2D_WINDOW = 10


class DeviceConnection(Protocol):
    """What the hub publishes through: one device's MQTT connection (:mod:`.hub_mqtt`)."""

    hub: str
    device_id: str
    machine: MqttConnection

    @property
    def key(self) -> str: ...

    @property
    def who(self) -> str: ...

    def granted(self, kind: Filter) -> QoS | None: ...

    def publish(self, topic: str, payload: bytes, qos: QoS, *, dup: bool = False) -> int | None: ...


class C2dDelivery:
    """The cloud-to-device queue of one connection: a pump task reading the device's partition
    past :attr:`cursor`, and the packet ids awaiting their PUBACK."""

    def __init__(self, connection: DeviceConnection, store: Store, clock: Callable[[], float]) -> None:
        self._connection = connection
        self._store = store
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self.cursor = 0
        self._inflight: dict[int, int] = {}  # packet id -> seq
        #: The newest seq published (this or an earlier connection of the session).
        self.sent = 0
        self._sent_before = 0

    def restore(self, sent: int) -> None:
        """A stored session's newest seq published: those up to it go out again with DUP."""
        self.sent = self._sent_before = sent

    @property
    def sent_since_restore(self) -> bool:
        """Whether this connection published newer messages than the session remembered."""
        return self.sent > self._sent_before

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def acknowledged(self, packet_id: int) -> None:
        """The device's PUBACK of ``packet_id``: the message is removed, the next may go."""
        seq = self._inflight.pop(packet_id, None)
        if seq is None:
            return
        try:
            await self._store.remove(Stream.HUB_C2D, [seq])
        except StorageError as exc:
            log.warning(
                "MQTT %s: cannot remove an acknowledged cloud-to-device message (%s)",
                self._connection.who,
                exc.message,
            )
        self.wake()

    def wake(self) -> None:
        """New messages may wait, or the device subscribed: run the pump (again)."""
        connection = self._connection
        if connection.granted(Filter.C2D) is None or connection.machine.state is not State.CONNECTED:
            return
        if self._task is not None:
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        connection, store = self._connection, self._store
        try:
            while True:
                self._again = False
                qos = connection.granted(Filter.C2D)
                room = C2D_WINDOW - len(self._inflight)
                if qos is None or room <= 0 or connection.machine.state is not State.CONNECTED:
                    return
                entries = await store.read(
                    Stream.HUB_C2D, partition=connection.key, after=self.cursor, limit=room
                )
                now = utc_iso(self._clock())
                done: list[int] = []
                for entry in entries:
                    self.cursor = entry.seq
                    message = decode_c2d(entry.doc)
                    if message.expired(now):
                        log.info(
                            "MQTT %s: cloud-to-device message %r expired undelivered: dropped",
                            connection.who,
                            message.message_id[:128],
                        )
                        done.append(entry.seq)
                        continue
                    packet_id = self._send(message, qos, dup=entry.seq <= self._sent_before)
                    self.sent = max(self.sent, entry.seq)
                    if packet_id is not None:
                        self._inflight[packet_id] = entry.seq
                    elif connection.machine.state is State.CONNECTED:
                        done.append(entry.seq)  # QoS 0: delivered at most once
                if done:
                    await store.remove(Stream.HUB_C2D, done)
                if len(entries) == room:
                    continue  # more may be waiting once the window has room
                if not self._again:
                    return
        except StorageError as exc:
            log.warning("MQTT %s: cannot read the cloud-to-device queue (%s)", connection.who, exc.message)
        finally:
            self._task = None

    def _send(self, message: CloudToDeviceMessage, qos: QoS, *, dup: bool) -> int | None:
        topic = c2d_topic(self._connection.device_id, c2d_properties(message))
        return self._connection.publish(topic, message.body, qos, dup=dup)
