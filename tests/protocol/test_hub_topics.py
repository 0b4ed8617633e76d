"""IoT Hub's device topics, property bags and user name: what the official SDKs send and expect."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provisiond.errors import LocalProtocolError, RemoteProtocolError
from provisiond.protocol import hub_topics as t


def test_python_sdk_telemetry_topic_with_system_and_custom_properties() -> None:
    # What azure-iot-device 2.14 publishes for Message(b"x", message_id="m 1", content_type=
    # "application/json") with custom_properties {"b": "2", "a": "1/x"}: $-keys quoted too.
    topic = "devices/dev%201/messages/events/%24.mid=m%201&%24.ct=application%2Fjson&a=1%2Fx&b=2"
    pub = t.parse_publication(topic)
    assert pub.kind is t.PublicationKind.TELEMETRY
    assert pub.device_id == "dev 1"
    assert pub.properties == {"$.mid": "m 1", "$.ct": "application/json", "a": "1/x", "b": "2"}


@pytest.mark.parametrize(
    "topic",
    ["devices/d1/messages/events/", "devices/d1/messages/events"],
    ids=["trailing-slash", "no-trailing-slash"],
)
def test_telemetry_without_properties(topic: str) -> None:
    pub = t.parse_publication(topic)
    assert pub.device_id == "d1" and pub.properties == {}


def test_null_and_empty_property_values() -> None:
    assert t.decode_property_bag("flag&empty=&k=v") == {"flag": None, "empty": "", "k": "v"}
    assert t.encode_property_bag([("flag", None), ("empty", ""), ("$.to", "/devices/d")]) == (
        "flag&empty=&%24.to=%2Fdevices%2Fd"
    )


@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=12), st.one_of(st.none(), st.text(max_size=12))),
        max_size=6,
        unique_by=lambda kv: kv[0],
    )
)
def test_property_bag_round_trip(pairs: list[tuple[str, str | None]]) -> None:
    assert t.decode_property_bag(t.encode_property_bag(pairs)) == dict(pairs)


def test_twin_requests() -> None:
    get = t.parse_publication("$iothub/twin/GET/?$rid=abc-1")
    assert get.kind is t.PublicationKind.TWIN_GET and get.rid == "abc-1"
    patch = t.parse_publication("$iothub/twin/PATCH/properties/reported/?$rid=7&$version=3")
    assert patch.kind is t.PublicationKind.TWIN_REPORTED and patch.rid == "7" and patch.version == 3
    assert t.parse_publication(t.twin_get_topic("r1")).rid == "r1"
    assert t.parse_publication(t.twin_reported_topic("r2")).kind is t.PublicationKind.TWIN_REPORTED


def test_method_response() -> None:
    pub = t.parse_publication("$iothub/methods/res/200/?$rid=1f")
    assert pub.kind is t.PublicationKind.METHOD_RESPONSE and pub.status == 200 and pub.rid == "1f"
    assert t.parse_publication(t.method_response_topic(404, "2a")).status == 404


@pytest.mark.parametrize(
    "topic",
    [
        "devices/d1/messages/devicebound/x",  # devices may not publish downstream topics
        "devices//messages/events/",
        "devices/a/b/messages/events/",
        "devices/d1/messages/eventsX",
        "$iothub/twin/GET/",  # no $rid
        "$iothub/twin/GET/?$rid=",
        "$iothub/twin/GET/?rid=1",
        "$iothub/twin/PATCH/properties/reported/?$rid=1&$version=x",
        "$iothub/twin/PATCH/properties/desired/?$version=1",
        "$iothub/methods/res/abc/?$rid=1",
        "$iothub/methods/res/200?$rid=1",
        "$iothub/methods/POST/m/?$rid=1",
        "$dps/registrations/PUT/iotdps-register/?$rid=1",
        "$iothub/twin/GET/?$rid=1&$rid=2",
        "$iothub/twin/GET/?$rid=1&flag",
    ],
)
def test_topics_a_device_may_not_publish(topic: str) -> None:
    with pytest.raises(RemoteProtocolError):
        t.parse_publication(topic)


def test_twin_response_topic_rid_first_every_item_key_value() -> None:
    topic = t.twin_response_topic(204, "9", version=5)
    assert topic == "$iothub/twin/res/204/?$rid=9&$version=5"
    # What the Python SDK does with it: split on "?", then "&", then "=", index pair[1].
    query = topic.split("?")[1]
    assert all(len(item.split("=")) == 2 for item in query.split("&"))
    parsed = t.parse_twin_response_topic(topic)
    assert (parsed.status, parsed.rid, parsed.version) == (204, "9", 5)
    assert t.twin_response_topic(200, "x") == "$iothub/twin/res/200/?$rid=x"


def test_desired_and_method_request_topics() -> None:
    assert t.desired_patch_topic(12) == "$iothub/twin/PATCH/properties/desired/?$version=12"
    topic = t.method_request_topic("reboot now", "00ff")
    assert topic == "$iothub/methods/POST/reboot%20now/?$rid=00ff"
    parsed = t.parse_method_request_topic(topic)
    assert parsed.name == "reboot now" and parsed.rid == "00ff"


def test_c2d_topic_quotes_the_bag_but_not_the_device_id() -> None:
    topic = t.c2d_topic(
        "d:1", [("$.mid", "m"), ("$.to", "/devices/d:1/messages/devicebound"), ("iothub-ack", "full")]
    )
    # The Python SDK matches ``devices/{id}/messages/devicebound`` with the raw id.
    assert topic == (
        "devices/d:1/messages/devicebound/%24.mid=m&%24.to=%2Fdevices%2Fd%3A1%2Fmessages%2Fdevicebound&iothub-ack=full"
    )


@pytest.mark.parametrize("device_id", ["", "a/b", "a#", "a+b", "a b"])
def test_c2d_topics_refuse_ids_a_topic_cannot_hold(device_id: str) -> None:
    with pytest.raises(LocalProtocolError):
        t.c2d_topic(device_id)


@pytest.mark.parametrize("rid", ["", "a&b", "a/b", "a b", "#"])
def test_hub_made_rids_are_checked(rid: str) -> None:
    with pytest.raises(LocalProtocolError):
        t.method_request_topic("m", rid)


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        ("devices/d1/messages/devicebound/#", t.Filter.C2D),
        ("devices/d%201/messages/devicebound/#", None),
        ("devices/other/messages/devicebound/#", None),
        ("$iothub/twin/res/#", t.Filter.TWIN_RESPONSES),
        ("$iothub/twin/PATCH/properties/desired/#", t.Filter.DESIRED_PATCHES),
        ("$iothub/methods/POST/#", t.Filter.METHODS),
        ("#", None),
        ("$iothub/#", None),
        ("devices/d1/messages/events/#", None),
    ],
)
def test_classify_filter(topic_filter: str, expected: t.Filter | None) -> None:
    assert t.classify_filter(topic_filter, "d1") is expected


def test_quoted_device_id_filter() -> None:
    assert t.classify_filter("devices/d%201/messages/devicebound/#", "d 1") is t.Filter.C2D
    assert t.classify_filter("devices/d 1/messages/devicebound/#", "d 1") is t.Filter.C2D


@pytest.mark.parametrize(
    ("username", "host", "device", "module", "version"),
    [
        # Python (azure-iot-device 2.14)
        (
            "hub.local/dev-1/?api-version=2019-10-01&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0",
            "hub.local",
            "dev-1",
            None,
            "2019-10-01",
        ),
        # Node
        (
            "hub.local/dev-1/?api-version=2021-04-12&DeviceClientType=azure-iot-device%2F1.18",
            "hub.local",
            "dev-1",
            None,
            "2021-04-12",
        ),
        # C, with a model id
        (
            "hub.local/dev-1/?api-version=2020-09-30&DeviceClientType=iothubclient%2F1.11&model-id=dtmi:x;1",
            "hub.local",
            "dev-1",
            None,
            "2020-09-30",
        ),
        # A module, and no query at all
        ("hub.local/dev-1/mod/?api-version=2021-04-12", "hub.local", "dev-1", "mod", "2021-04-12"),
        ("hub.local/dev-1", "hub.local", "dev-1", None, None),
    ],
)
def test_parse_hub_username(
    username: str, host: str, device: str, module: str | None, version: str | None
) -> None:
    parsed = t.parse_hub_username(username)
    assert (parsed.host_name, parsed.device_id, parsed.module_id, parsed.api_version) == (
        host,
        device,
        module,
        version,
    )


def test_model_id_and_client_type_unquoted() -> None:
    parsed = t.parse_hub_username("h/d/?api-version=1&DeviceClientType=a%2Fb&model-id=dtmi%3Ax%3B1")
    assert parsed.client_type == "a/b" and parsed.model_id == "dtmi:x;1"


@pytest.mark.parametrize(
    "username",
    [
        "",
        "hub-only",
        "/dev/?api-version=1",
        "h//?api-version=1",
        "h/a/b/c/?api-version=1",
        "0ne00000001/registrations/r1/api-version=2019-03-31",
    ],
)
def test_bad_hub_usernames(username: str) -> None:
    with pytest.raises(RemoteProtocolError):
        t.parse_hub_username(username)


def test_build_hub_username_round_trip() -> None:
    username = t.build_hub_username("h.example", "d1", client_type="provisiond/0.1")
    parsed = t.parse_hub_username(username)
    assert (parsed.host_name, parsed.device_id, parsed.client_type) == ("h.example", "d1", "provisiond/0.1")


@pytest.mark.parametrize(
    "topic",
    [
        "$iothub/methods/res/²/?$rid=1",  # str.isdigit takes it, int refuses it: a ValueError
        "$iothub/methods/res/٢٠٠/?$rid=1",  # Arabic-Indic digits, which int reads as 200
        "$iothub/twin/PATCH/properties/reported/?$rid=1&$version=²",
    ],
)
def test_numbers_in_a_devices_topic_are_ascii_digits(topic: str) -> None:
    """A device chose these topics: anything but ASCII digits is a protocol error, never a
    ValueError that ended the device's session with a traceback."""
    with pytest.raises(RemoteProtocolError):
        t.parse_publication(topic)
