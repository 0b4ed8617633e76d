"""Cloud-to-device messages, service side: what a sender asks for, IoT Hub's bounds, and the
enqueue into ``Stream.HUB_C2D`` (partition ``{hub}/{deviceId}``; the device session delivers
and removes them).

IoT Hub's rules (docs: iot-hub-devguide-messages-c2d.md):

- a device queue holds at most :data:`MAX_QUEUE_DEPTH` (50) messages; one more is refused
  (403004 DeviceMaximumQueueDepthExceeded) until the device takes some;
- every message expires: at the sender's ``expiryTimeUtc``, else :data:`DEFAULT_TTL` (1 h)
  after it was sent; an expiry more than :data:`MAX_TTL` (48 h, the longest time to live a hub
  can be configured with) ahead, or in the past, is refused; expired messages are never
  delivered and do not count toward the queue depth;
- ``messageId`` is the sender's or a new UUID; ``iothub-ack`` is ``none`` (the default),
  ``positive``, ``negative`` or ``full``; a message (body and properties) is at most
  :data:`MAX_MESSAGE_BYTES` (64 KB).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgspec

from ..errors import AuthorizationError, IotHubCode, RequestError
from ..protocol.hub_topics import c2d_topic
from ..storage import Collection, Entry, Store, Stream, utc_iso
from .events import parse_enqueued_time
from .messages import (
    AckMode,
    CloudToDeviceMessage,
    c2d_properties,
    c2d_to,
    decode_c2d,
    encode_c2d,
    new_message_id,
    partition,
)
from .registry import device_not_found

__all__ = [
    "ACKS",
    "DEFAULT_TTL",
    "MAX_MESSAGE_BYTES",
    "MAX_QUEUE_DEPTH",
    "MAX_TTL",
    "CloudToDeviceRequest",
    "Enqueued",
    "enqueue",
    "purge_expired",
]

log = logging.getLogger("provisiond.hub")

MAX_QUEUE_DEPTH = 50
DEFAULT_TTL = 3600.0
MAX_TTL = 48 * 3600.0
MAX_MESSAGE_BYTES = 64 * 1024
ACKS = tuple(mode.value for mode in AckMode)


class CloudToDeviceRequest(msgspec.Struct, kw_only=True):
    """What a sender gives (``provisiond hub send-c2d``, the admin REST call)."""

    body: bytes = b""
    message_id: str | None = None
    correlation_id: str | None = None
    user_id: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    ack: str | None = None
    #: An absolute time (ISO 8601, or Unix milliseconds); None: :data:`DEFAULT_TTL` from now.
    expiry_time_utc: str | None = None
    properties: dict[str, str] = msgspec.field(default_factory=dict)


class Enqueued(msgspec.Struct, rename="camel", kw_only=True):
    """The answer to a send: the message as queued (without its body) and the queue's depth."""

    message_id: str
    expiry_time_utc: str
    enqueued_time: str
    queue_depth: int
    ack: str


#: IoT Hub's bound on a message id and a correlation id; provisiond holds the other system
#: properties (user id, content type and encoding) to it too.
MAX_SYSTEM_PROPERTY = 128
#: MQTT's bound on a topic name, which carries the properties to the device.
_MAX_TOPIC_BYTES = 65535


def _system_properties(request: CloudToDeviceRequest) -> dict[str, str | None]:
    return {
        "messageId": request.message_id,
        "correlationId": request.correlation_id,
        "userId": request.user_id,
        "contentType": request.content_type,
        "contentEncoding": request.content_encoding,
    }


def _size(request: CloudToDeviceRequest) -> int:
    """Body and properties, the system ones included."""
    properties = [*request.properties.items(), *_system_properties(request).items()]
    return len(request.body) + sum(len(k.encode()) + len((v or "").encode()) for k, v in properties)


def _check(request: CloudToDeviceRequest, now: float) -> tuple[AckMode, str]:
    """The ack and the expiry of a request within IoT Hub's bounds. :raises RequestError:"""
    try:
        ack = AckMode((request.ack or "none").lower())
    except ValueError:
        raise RequestError(
            f"ack must be one of {', '.join(ACKS)}, not {(request.ack or '')[:40]!r}."
        ) from None
    for name, value in _system_properties(request).items():
        if value is not None and len(value) > MAX_SYSTEM_PROPERTY:
            raise RequestError(
                f"{name} is {len(value)} characters; IoT Hub takes at most {MAX_SYSTEM_PROPERTY}."
            )
    if _size(request) > MAX_MESSAGE_BYTES:
        raise RequestError(
            f"The message (body and properties, {_size(request)} bytes) exceeds IoT Hub's "
            f"{MAX_MESSAGE_BYTES}-byte limit for cloud-to-device messages."
        )
    for name in request.properties:
        if not name or name.startswith("$") or name.lower().startswith("iothub-"):
            raise RequestError(
                f"Application property name {name[:64]!r} is empty or reserved ($..., iothub-...)."
            )
    if request.expiry_time_utc is None:
        return ack, utc_iso(now + DEFAULT_TTL)
    expiry = parse_enqueued_time(request.expiry_time_utc, field="expiryTimeUtc")
    if expiry <= utc_iso(now):
        raise RequestError(f"expiryTimeUtc {expiry} is in the past: the message would never be delivered.")
    if expiry > utc_iso(now + MAX_TTL):
        raise RequestError(
            f"expiryTimeUtc {expiry} is more than {MAX_TTL / 3600:.0f} hours ahead, IoT Hub's longest time to live."
        )
    return ack, expiry


def _decode(entry: Entry) -> CloudToDeviceMessage | None:
    try:
        return decode_c2d(entry.doc)
    except msgspec.DecodeError as exc:
        log.warning("Cloud-to-device entry %d of %s does not decode: %s", entry.seq, entry.partition, exc)
        return None


async def purge_expired(store: Store, entries: Sequence[Entry], *, now: float) -> list[Entry]:
    """Remove the expired messages (and those that do not decode) among ``entries``; return the
    ones that stay."""
    stamp = utc_iso(now)
    gone: list[int] = []
    kept: list[Entry] = []
    for entry in entries:
        message = _decode(entry)
        if message is None or message.expired(stamp):
            gone.append(entry.seq)
        else:
            kept.append(entry)
    if gone:
        await store.remove(Stream.HUB_C2D, gone)
    return kept


async def enqueue(
    store: Store, hub: str, device_id: str, request: CloudToDeviceRequest, *, now: float
) -> tuple[CloudToDeviceMessage, Enqueued]:
    """Queue a message for ``device_id`` in the built-in hub ``hub`` (IoT Hub's bounds, module
    docstring). The caller tells the device's session (the broker's ``notify_c2d``).

    :raises NotFoundError: no such device identity (404001 DeviceNotFound).
    :raises AuthorizationError: the queue is full (403004 DeviceMaximumQueueDepthExceeded).
    :raises RequestError: an ack, expiry, property or size out of bounds.
    """
    ack, expiry = _check(request, now)
    if await store.get(Collection.HUB_DEVICES, partition(hub, device_id)) is None:
        raise device_not_found(hub, device_id)
    key = partition(hub, device_id)
    queued = await store.read(Stream.HUB_C2D, partition=key, limit=MAX_QUEUE_DEPTH * 2)
    kept = await purge_expired(store, queued, now=now)
    if len(kept) >= MAX_QUEUE_DEPTH:
        raise AuthorizationError(
            f"The queue of device {device_id!r} holds {len(kept)} messages, IoT Hub's maximum of "
            f"{MAX_QUEUE_DEPTH}; the device must take some first.",
            error_code=IotHubCode.DEVICE_MAXIMUM_QUEUE_DEPTH_EXCEEDED,
        )
    message = CloudToDeviceMessage(
        message_id=request.message_id or new_message_id(),
        to=c2d_to(device_id),
        expiry_time_utc=expiry,
        enqueued_time=utc_iso(now),
        correlation_id=request.correlation_id,
        user_id=request.user_id,
        content_type=request.content_type,
        content_encoding=request.content_encoding,
        ack=ack,
        properties=dict[str, str | None](request.properties),
        body=request.body,
    )
    topic = len(c2d_topic(device_id, c2d_properties(message)).encode())
    if topic > _MAX_TOPIC_BYTES:  # properties that URL-encode to three times their size
        raise RequestError(
            f"The message's properties make an MQTT topic of {topic} bytes, over MQTT's {_MAX_TOPIC_BYTES}: "
            "the device could never receive it."
        )
    await store.append(Stream.HUB_C2D, [(key, encode_c2d(message))])
    return message, Enqueued(
        message_id=message.message_id,
        expiry_time_utc=expiry,
        enqueued_time=message.enqueued_time,
        queue_depth=len(kept) + 1,
        ack=ack.value,
    )
