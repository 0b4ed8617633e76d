"""The built-in hubs' messages as they are stored: device-to-cloud telemetry
(:class:`TelemetryEvent`, in ``Stream.HUB_EVENTS``) and cloud-to-device messages
(:class:`CloudToDeviceMessage`, in ``Stream.HUB_C2D``), each entry in the partition of its
device (:func:`partition`). One model each, written by whoever accepts the message (the MQTT
endpoint for telemetry, the C2D send operation for cloud-to-device messages) and read by
whoever hands it on (``provisiond hub monitor-events`` and the event stream; the MQTT endpoint's
delivery). Pure: times are passed in.

Property names follow IoT Hub's:

* a telemetry event's ``systemProperties`` use the names IoT Hub gives the MQTT property bag's
  system keys (``$.mid`` is ``message-id``, ``$.ct`` ``content-type``: see
  :data:`~provisiond.protocol.hub_topics.SYSTEM_PROPERTIES`) plus what the hub adds
  (``iothub-connection-device-id``, ``iothub-connection-auth-method``,
  ``iothub-enqueuedtime``, ``iothub-message-source``); ``properties`` are the application's,
  as the device sent them (a property without a value is ``null``);
* a cloud-to-device message is delivered on ``devices/{id}/messages/devicebound/{bag}`` with
  the bag :func:`c2d_properties` makes: ``$.mid``, ``$.to``, ``$.cid``, ``$.uid``, ``$.ct``,
  ``$.ce``, ``$.exp``, ``iothub-ack`` (the keys the Python SDK reads,
  ``extract_message_properties_from_topic``), then the application properties.

Bodies are bytes (base64 in the stored JSON).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping

import msgspec

from ..protocol.hub_topics import SYSTEM_PROPERTIES

__all__ = [
    "AckMode",
    "CloudToDeviceMessage",
    "TelemetryEvent",
    "c2d_properties",
    "c2d_to",
    "decode_c2d",
    "decode_event",
    "encode_c2d",
    "encode_event",
    "new_message_id",
    "partition",
    "telemetry_event",
]

#: ``iothub-message-source`` of device telemetry.
MESSAGE_SOURCE = "Telemetry"
#: The application property IoT Hub puts on a telemetry message published with the retain
#: flag (IoT Hub stores nothing retained).
RETAIN_PROPERTY = "mqtt-retain"
#: The application property IoT Hub puts on a device's MQTT Will message, sent as telemetry.
MESSAGE_TYPE_PROPERTY = "iothub-MessageType"


def partition(hub: str, device_id: str) -> str:
    """A device's partition in the hub streams: ``{hubHostName lower-cased}/{deviceId}``."""
    return f"{hub.lower()}/{device_id}"


class _Stored(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True, frozen=True):
    pass


class TelemetryEvent(_Stored, frozen=True, kw_only=True):
    """One device-to-cloud message the hub acknowledged."""

    device_id: str
    module_id: str | None = None
    #: When the hub accepted it (ISO 8601 UTC, as the store writes times).
    enqueued_time: str
    #: Application properties (a property sent without ``=`` has the value ``None``).
    properties: dict[str, str | None] = msgspec.field(default_factory=dict)
    #: System properties, by IoT Hub's names (``message-id``, ``content-type``, ...).
    system_properties: dict[str, str] = msgspec.field(default_factory=dict)
    body: bytes = b""


class AckMode(enum.Enum):
    """``iothub-ack``: which delivery outcomes the sender asked to hear about."""

    NONE = "none"
    POSITIVE = "positive"
    NEGATIVE = "negative"
    FULL = "full"


class CloudToDeviceMessage(_Stored, frozen=True, kw_only=True):
    """One cloud-to-device message waiting for its device (removed once the device
    acknowledged it with a PUBACK, or dropped once it expired)."""

    message_id: str
    #: ``/devices/{deviceId}/messages/devicebound`` (:func:`c2d_to`).
    to: str
    #: When it was accepted (ISO 8601 UTC).
    enqueued_time: str
    #: After this moment it is dropped undelivered (ISO 8601 UTC); ``None``: never.
    expiry_time_utc: str | None = None
    correlation_id: str | None = None
    user_id: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    properties: dict[str, str | None] = msgspec.field(default_factory=dict)
    ack: AckMode = AckMode.NONE
    body: bytes = b""
    #: Deliveries before this one was stored (0 for a new message).
    delivery_count: int = 0

    def expired(self, now: str) -> bool:
        """Whether the message expired by ``now`` (ISO 8601 UTC, as the store writes times:
        such strings compare in time order)."""
        return self.expiry_time_utc is not None and self.expiry_time_utc <= now


def c2d_to(device_id: str) -> str:
    return f"/devices/{device_id}/messages/devicebound"


def c2d_properties(message: CloudToDeviceMessage) -> list[tuple[str, str | None]]:
    """The property bag of ``message``'s devicebound topic: the system keys IoT Hub sends,
    then the application properties (sorted by name, as the Python SDK sends its own)."""
    system = (
        ("$.mid", message.message_id),
        ("$.to", message.to),
        ("$.cid", message.correlation_id),
        ("$.uid", message.user_id),
        ("$.ct", message.content_type),
        ("$.ce", message.content_encoding),
        ("$.exp", message.expiry_time_utc),
    )
    bag: list[tuple[str, str | None]] = [(key, value) for key, value in system if value is not None]
    if message.ack is not AckMode.NONE:
        bag.append(("iothub-ack", message.ack.value))
    bag += sorted(message.properties.items())
    return bag


def telemetry_event(
    device_id: str,
    bag: Mapping[str, str | None],
    body: bytes,
    *,
    enqueued_time: str,
    auth_method: str,
    module_id: str | None = None,
    retain: bool = False,
    will: bool = False,
) -> TelemetryEvent:
    """The event a device's publish on ``devices/{id}/messages/events/{bag}`` becomes: the
    bag's system keys (``$.mid`` ...) as system properties under IoT Hub's names, the other
    keys as application properties, and what the hub adds (the connection's device id and
    authentication type, the enqueued time). ``retain`` (the publish's retain flag) and ``will``
    (a Will message the hub sends for a device that went away) add IoT Hub's application
    properties for them."""
    properties: dict[str, str | None] = {}
    system: dict[str, str] = {}
    for key, value in bag.items():
        name = SYSTEM_PROPERTIES.get(key)
        if name is None:
            properties[key] = value
        elif value is not None:
            system[name] = value
    if retain:
        properties[RETAIN_PROPERTY] = "true"
    if will:
        properties[MESSAGE_TYPE_PROPERTY] = "Will"
    system["iothub-connection-device-id"] = device_id
    system["iothub-connection-auth-method"] = (
        f'{{"scope":"device","type":"{auth_method}","issuer":"iothub","acceptingIpFilterRule":null}}'
    )
    system["iothub-enqueuedtime"] = enqueued_time
    system["iothub-message-source"] = MESSAGE_SOURCE
    return TelemetryEvent(
        device_id=device_id,
        module_id=module_id,
        enqueued_time=enqueued_time,
        properties=properties,
        system_properties=system,
        body=body,
    )


def new_message_id() -> str:
    """A message id for a cloud-to-device message sent without one."""
    return str(uuid.uuid4())


_event_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(TelemetryEvent)
_c2d_decoder = msgspec.json.Decoder(CloudToDeviceMessage)


def encode_event(event: TelemetryEvent) -> bytes:
    return _event_encoder.encode(event)


def decode_event(doc: bytes) -> TelemetryEvent:
    """:raises msgspec.ValidationError, msgspec.DecodeError: not a stored event (a bug)."""
    return _event_decoder.decode(doc)


def encode_c2d(message: CloudToDeviceMessage) -> bytes:
    return _event_encoder.encode(message)


def decode_c2d(doc: bytes) -> CloudToDeviceMessage:
    """:raises msgspec.ValidationError, msgspec.DecodeError: not a stored message (a bug)."""
    return _c2d_decoder.decode(doc)
