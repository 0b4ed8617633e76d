"""DPS topics and the CONNECT user name: what every SDK sends parses, what the service builds
satisfies every SDK's parser (device-protocol.md §3.1, §3.2)."""

from __future__ import annotations

import re
import urllib.parse
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provisiond.errors import LocalProtocolError, RemoteProtocolError
from provisiond.protocol.topics import (
    RESPONSE_FILTER,
    RequestKind,
    RequestTopic,
    ResponseTopic,
    Username,
    build_username,
    is_response_filter,
    parse_request_topic,
    parse_response_topic,
    parse_username,
    register_topic,
    response_topic,
    status_topic,
)

# What the official SDKs publish (device-protocol.md §3.2).
PY_RID = urllib.parse.quote(str(uuid.uuid4()), safe="")


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        pytest.param(
            f"$dps/registrations/PUT/iotdps-register/?$rid={PY_RID}",
            RequestTopic(kind=RequestKind.REGISTER, rid=PY_RID),
            id="python-register",
        ),
        pytest.param(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            RequestTopic(kind=RequestKind.REGISTER, rid="1"),
            id="net-c-register",
        ),
        pytest.param(
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=4.abc%2Fdef",
            RequestTopic(kind=RequestKind.STATUS, rid="2", operation_id="4.abc/def"),
            id="python-poll-quoted-operation",
        ),
        pytest.param(
            "$dps/registrations/GET/iotdps-get-operationstatus/?operationId=op&$rid=7",
            RequestTopic(kind=RequestKind.STATUS, rid="7", operation_id="op"),
            id="properties-by-key",
        ),
        pytest.param(
            "$dps/registrations/PUT/iotdps-register/?$rid=",
            RequestTopic(kind=RequestKind.REGISTER, rid=""),
            id="empty-rid-is-echoed",
        ),
    ],
)
def test_request_topics_the_sdks_send(topic: str, expected: RequestTopic) -> None:
    assert parse_request_topic(topic) == expected


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("devices/x/messages/events/", id="iot-hub-topic"),
        pytest.param("$dps/registrations/PUT/iotdps-register/", id="no-query"),
        pytest.param("$dps/registrations/PUT/iotdps-register/?rid=1", id="rid-without-dollar"),
        pytest.param("$dps/registrations/PUT/iotdps-register/?$rid=1&$rid=2", id="repeated-rid"),
        pytest.param("$dps/registrations/PUT/iotdps-register/?$rid=a$b", id="second-dollar"),
        pytest.param("$dps/registrations/PUT/iotdps-register/?$rid", id="rid-without-value"),
        pytest.param(
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1", id="poll-without-operation"
        ),
        pytest.param("$dps/registrations/res/202/?$rid=1", id="a-response-topic"),
        pytest.param("$dps/registrations/put/iotdps-register/?$rid=1", id="lower-case-verb"),
    ],
)
def test_other_topics_are_refused(topic: str) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_request_topic(topic)


def test_builders_round_trip() -> None:
    assert parse_request_topic(register_topic("12")) == RequestTopic(kind=RequestKind.REGISTER, rid="12")
    assert register_topic("12") == "$dps/registrations/PUT/iotdps-register/?$rid=12"
    assert status_topic("13", "4.x/y") == (
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=13&operationId=4.x%2Fy"
    )
    assert parse_request_topic(status_topic("13", "4.x/y")).operation_id == "4.x/y"
    for bad in ("", "a&b", "a$b", "a b", "#"):
        with pytest.raises(LocalProtocolError):
            register_topic(bad)


# --- responses: every SDK's parser must accept what the service builds ----------------------------

NET_REGEX = re.compile(r"^\$dps/registrations/res/(.*?)/\?\$rid=(.*?)$")


def python_sdk_properties(topic: str) -> dict[str, str]:
    """azure-iot-device 2.14 mqtt_topic_provisioning.extract_properties_from_dps_response_topic."""
    properties = topic.split("$")[2]
    pairs = [entry.split("=") for entry in properties.split("&")]
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


def python_sdk_status(topic: str) -> str:
    return urllib.parse.unquote(topic.split("$")[1].split("/")[3])


@pytest.mark.parametrize("rid", [PY_RID, "1", "65535", "a%2Fb"])
@pytest.mark.parametrize("retry_after", [None, 3])
def test_response_topics_satisfy_the_sdk_parsers(rid: str, retry_after: int | None) -> None:
    topic = response_topic(202, rid, retry_after)
    assert topic.startswith(f"$dps/registrations/res/202/?$rid={rid}")  # $rid first, byte for byte
    assert topic.count("$") == 2  # Python splits on "$"
    net = NET_REGEX.match(topic)
    assert net is not None and net.group(1) == "202" and net.group(2).split("&")[0] == rid
    props = python_sdk_properties(topic)
    assert python_sdk_status(topic) == "202" and props["rid"] == urllib.parse.unquote(rid)
    if retry_after is None:
        assert "retry-after" not in topic
    else:
        assert topic.endswith("&retry-after=3") and props["retry-after"] == "3"  # lower case
    assert parse_response_topic(topic) == ResponseTopic(
        status=202, rid=rid, retry_after=None if retry_after is None else str(retry_after)
    )


def test_response_topic_checks() -> None:
    for status, rid in ((99, "1"), (600, "1"), (200, "a&b"), (200, "a$b"), (200, "+")):
        with pytest.raises(LocalProtocolError):
            response_topic(status, rid)
    for topic in (
        "$dps/registrations/res/abc/?$rid=1",
        "$dps/registrations/res/202?$rid=1",
        "$dps/registrations/res/202/?retry-after=1",
        "$dps/registrations/PUT/iotdps-register/?$rid=1",
    ):
        with pytest.raises(RemoteProtocolError):
            parse_response_topic(topic)


def test_response_filters() -> None:
    assert is_response_filter(RESPONSE_FILTER)
    assert is_response_filter("$dps/registrations/res/+/#")
    assert not is_response_filter("#") and not is_response_filter("$dps/registrations/PUT/#")


# --- user names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "expected"),
    [
        pytest.param(
            "0ne00000001/registrations/dev-1/api-version=2019-03-31&ClientVersion=azure-iot-device-provisioning-py%2F2.14.0%28x%29",
            Username(
                id_scope="0ne00000001",
                registration_id="dev-1",
                api_version="2019-03-31",
                client_version="azure-iot-device-provisioning-py/2.14.0(x)",
            ),
            id="python",
        ),
        pytest.param(
            "0ne00000001/registrations/dev-1/api-version=2021-06-01&ClientVersion=1.15.0",
            Username(
                id_scope="0ne00000001",
                registration_id="dev-1",
                api_version="2021-06-01",
                client_version="1.15.0",
            ),
            id="c-unencoded",
        ),
        pytest.param(
            "0ne00000001/registrations/dev-1/api-version=2019-03-31",
            Username(id_scope="0ne00000001", registration_id="dev-1", api_version="2019-03-31"),
            id="documented",
        ),
        pytest.param(
            "0ne00000001/registrations/dev-1",
            Username(id_scope="0ne00000001", registration_id="dev-1"),
            id="bare",
        ),
        pytest.param(
            "0ne00000001/registrations/dev.1:x/api-version=2019-03-31&ClientVersion=a/b=c&Other=1",
            Username(
                id_scope="0ne00000001",
                registration_id="dev.1:x",
                api_version="2019-03-31",
                client_version="a/b=c",
            ),
            id="unescaped-rest",
        ),
    ],
)
def test_usernames_the_sdks_send(username: str, expected: Username) -> None:
    assert parse_username(username) == expected


@pytest.mark.parametrize(
    "username",
    [
        "",
        "dev-1",
        "0ne/devices/dev-1",
        "/registrations/dev-1",
        "0ne/registrations/",
        "a/b/registrations/c",
        "0ne/registrations/a/b",
    ],
)
def test_malformed_usernames(username: str) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_username(username)


@given(
    scope=st.from_regex(r"\A0ne[0-9A-F]{8}\Z"),
    reg=st.from_regex(r"\A[a-z0-9][a-z0-9.:_-]{0,40}\Z"),
    version=st.text(max_size=30),
)
def test_property_username_round_trip(scope: str, reg: str, version: str) -> None:
    username = build_username(scope, reg, api_version="2021-06-01", client_version=version or None)
    parsed = parse_username(username)
    assert (parsed.id_scope, parsed.registration_id, parsed.api_version) == (scope, reg, "2021-06-01")
    assert parsed.client_version == (version or None)


@pytest.mark.parametrize("status", ["²", "٢٠٠", "２００"])
def test_a_response_status_is_ascii_digits(status: str) -> None:
    """What the service chose: a status that is not ASCII digits is a protocol error for the
    device client (it was a ValueError, or read as 200)."""
    with pytest.raises(RemoteProtocolError):
        parse_response_topic(f"$dps/registrations/res/{status}/?$rid=1")
