"""The built-in hubs' stored messages (hub/messages.py): how a device's property bag becomes a
telemetry event, the bag of a cloud-to-device message, expiry, and the stored JSON round trip."""

from __future__ import annotations

from urllib.parse import unquote

from provisiond.hub.messages import (
    AckMode,
    CloudToDeviceMessage,
    c2d_properties,
    c2d_to,
    decode_c2d,
    decode_event,
    encode_c2d,
    encode_event,
    partition,
    telemetry_event,
)
from provisiond.protocol.hub_topics import c2d_topic, decode_property_bag

NOW = "2025-01-02T03:04:05.000006Z"


def test_a_property_bag_splits_into_system_and_application_properties() -> None:
    bag = decode_property_bag("%24.mid=m1&%24.ct=application%2Fjson&%24.ce=utf-8&color=red&flag&empty=")
    event = telemetry_event("dev-1", bag, b'{"t":1}', enqueued_time=NOW, auth_method="sas")
    assert event.properties == {"color": "red", "flag": None, "empty": ""}
    assert event.system_properties["message-id"] == "m1"
    assert event.system_properties["content-type"] == "application/json"
    assert event.system_properties["content-encoding"] == "utf-8"
    assert event.system_properties["iothub-connection-device-id"] == "dev-1"
    assert event.system_properties["iothub-enqueuedtime"] == NOW
    assert '"type":"sas"' in event.system_properties["iothub-connection-auth-method"]
    assert decode_event(encode_event(event)) == event


def test_retain_and_will_become_iot_hubs_application_properties() -> None:
    event = telemetry_event("d", {}, b"", enqueued_time=NOW, auth_method="x509", retain=True, will=True)
    assert event.properties == {"mqtt-retain": "true", "iothub-MessageType": "Will"}


def test_a_cloud_to_device_bag_carries_the_keys_the_sdks_read() -> None:
    message = CloudToDeviceMessage(
        message_id="m/1",
        to=c2d_to("dev:1"),
        enqueued_time=NOW,
        correlation_id="c",
        properties={"b": "2", "a": None},
        ack=AckMode.FULL,
        body=b"\x00\xff",
    )
    topic = c2d_topic("dev:1", c2d_properties(message))
    # The device id is not quoted in topics (the Python SDK matches it raw).
    assert topic.startswith("devices/dev:1/messages/devicebound/%24.mid=m%2F1&%24.to=%2Fdevices%2Fdev%3A1")
    bag = decode_property_bag(topic.split("/", 4)[4])
    assert bag == {
        "$.mid": "m/1",
        "$.to": "/devices/dev:1/messages/devicebound",
        "$.cid": "c",
        "iothub-ack": "full",
        "a": None,
        "b": "2",
    }
    assert list(bag)[-2:] == ["a", "b"], "application properties come last, sorted"
    assert unquote(topic).count("devicebound") == 2
    assert decode_c2d(encode_c2d(message)) == message


def test_expiry_compares_store_times() -> None:
    message = CloudToDeviceMessage(message_id="m", to="/devices/d/messages/devicebound", enqueued_time=NOW)
    assert not message.expired("9999-01-01T00:00:00.000000Z"), "no expiry: never"
    timed = CloudToDeviceMessage(
        message_id="m", to="t", enqueued_time=NOW, expiry_time_utc="2025-01-02T03:04:06.000000Z"
    )
    assert not timed.expired(NOW)
    assert timed.expired("2025-01-02T03:04:06.000000Z")


def test_partitions_fold_the_host_name_only() -> None:
    assert partition("Hub.Example.Local", "Dev-1") == "hub.example.local/Dev-1"
