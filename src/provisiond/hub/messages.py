"""The built-in hubs' messages as stored: telemetry a device sent (``Stream.HUB_EVENTS``) and
cloud-to-device messages waiting for their device (``Stream.HUB_C2D``), each stream partitioned
per device, ``{hubHostName}/{deviceId}`` (:func:`partition`). Pure models (msgspec, camelCase,
the body as bytes: base64 in JSON)."""

from __future__ import annotations

import msgspec

__all__ = ["CloudToDeviceMessage", "TelemetryEvent", "partition"]


def partition(hub: str, device_id: str) -> str:
    """The stream partition of a device: the hub's host name lower-cased, then the device id
    (IoT Hub device ids are case-sensitive)."""
    return f"{hub.lower()}/{device_id}"


class _Model(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    pass


class TelemetryEvent(_Model):
    """One telemetry message a device published (and the hub acknowledged once it was stored).

    ``properties`` are the application properties of the topic's property bag;
    ``system_properties`` IoT Hub's system properties under their AMQP names (``message-id``,
    ``correlation-id``, ``content-type``, ``content-encoding``, ``user-id``, ...).
    """

    device_id: str
    enqueued_time: str
    module_id: str | None = None
    properties: dict[str, str] = msgspec.field(default_factory=dict)
    system_properties: dict[str, str] = msgspec.field(default_factory=dict)
    body: bytes = b""


class CloudToDeviceMessage(_Model):
    """One cloud-to-device message queued for a device until it is delivered and acknowledged,
    or expires. ``ack`` is IoT Hub's feedback request (``none``, ``positive``, ``negative``,
    ``full``); ``delivery_count`` counts deliveries without an acknowledgement."""

    message_id: str
    to: str
    expiry_time_utc: str
    enqueued_time: str
    correlation_id: str | None = None
    user_id: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    ack: str = "none"
    properties: dict[str, str] = msgspec.field(default_factory=dict)
    body: bytes = b""
    delivery_count: int = 0
