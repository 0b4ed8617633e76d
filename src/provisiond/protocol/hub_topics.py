"""IoT Hub's device MQTT topics, property bags and CONNECT user name (iothub.md §1.2-§1.7): build
and parse, pure functions for both roles (the built-in hub's endpoint and a device).

==================  ===========================================================================
telemetry           ``devices/{id}/messages/events/{bag}``                  device -> hub
cloud-to-device     ``devices/{id}/messages/devicebound/{bag}``             hub -> device
twin GET            ``$iothub/twin/GET/?$rid={rid}``                        device -> hub
reported PATCH      ``$iothub/twin/PATCH/properties/reported/?$rid={rid}``  device -> hub
twin response       ``$iothub/twin/res/{status}/?$rid={rid}[&$version=n]``  hub -> device
desired PATCH       ``$iothub/twin/PATCH/properties/desired/?$version={n}`` hub -> device
method request      ``$iothub/methods/POST/{name}/?$rid={rid}``             hub -> device
method response     ``$iothub/methods/res/{status}/?$rid={rid}``            device -> hub
user name           ``{hostName}/{deviceId}/?api-version={v}&DeviceClientType={ua}[&model-id=..]``
==================  ===========================================================================

What the official SDKs require of what the hub sends (iothub.md §1.6):

* ``$rid`` is the **first** query item of a twin response (the C SDK's parser), and every
  query item has the form ``key=value`` (the Python SDK indexes ``pair[1]``);
* rids are opaque and echoed as the device sent them (hub-made rids use hex digits only);
* property bags quote keys and values with nothing safe (``%24.mid``, ``%2F``), as the Python
  SDK does; a property whose value is ``None`` is written as a bare key, an empty one as ``key=``.

Device ids in the topics a device publishes to are parsed unquoted (``devices/my%3Adev/...``
and ``devices/my:dev/...`` name the same device); the hub sends them raw, as IoT Hub does.
Anything that is not one of these topics raises :class:`~provisiond.errors.RemoteProtocolError`;
IoT Hub closes the connection of a device that publishes elsewhere.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from ..errors import LocalProtocolError, RemoteProtocolError
from .topics import ascii_digits

__all__ = [
    "SYSTEM_PROPERTIES",
    "Filter",
    "HubUsername",
    "MethodResponseTopic",
    "Publication",
    "PublicationKind",
    "TwinResponseTopic",
    "build_hub_username",
    "c2d_topic",
    "classify_filter",
    "decode_property_bag",
    "desired_patch_topic",
    "encode_property_bag",
    "method_request_topic",
    "method_response_topic",
    "parse_hub_username",
    "parse_method_request_topic",
    "parse_publication",
    "parse_twin_response_topic",
    "telemetry_topic",
    "twin_get_topic",
    "twin_reported_topic",
    "twin_response_topic",
]

_MAX_QUOTED = 200  # how much of a topic an error message quotes

#: The property bag's system keys and what IoT Hub calls them (message id, correlation id, ...).
SYSTEM_PROPERTIES: Mapping[str, str] = {
    "$.mid": "message-id",
    "$.cid": "correlation-id",
    "$.uid": "user-id",
    "$.ct": "content-type",
    "$.ce": "content-encoding",
    "$.exp": "absolute-expiry-time",
    "$.on": "output-name",
    "$.ifid": "interface-id",
    "$.to": "to",
}

TWIN_GET_PREFIX = "$iothub/twin/GET/"
TWIN_REPORTED_PREFIX = "$iothub/twin/PATCH/properties/reported/"
TWIN_DESIRED_PREFIX = "$iothub/twin/PATCH/properties/desired/"
TWIN_RESPONSE_PREFIX = "$iothub/twin/res/"
METHOD_REQUEST_PREFIX = "$iothub/methods/POST/"
METHOD_RESPONSE_PREFIX = "$iothub/methods/res/"


def _q(value: str) -> str:
    return quote(value, safe="")


# --- property bags ---------------------------------------------------------------------------------


def encode_property_bag(properties: Iterable[tuple[str, str | None]]) -> str:
    """``k=v&k2=v2`` with keys and values quoted (nothing safe); ``None`` values as bare keys."""
    items = []
    for key, value in properties:
        if not key:
            raise LocalProtocolError("A message property needs a name.")
        items.append(_q(key) if value is None else f"{_q(key)}={_q(value)}")
    return "&".join(items)


def decode_property_bag(bag: str) -> dict[str, str | None]:
    """The properties of a bag (keys and values unquoted; a bare key has the value ``None``).

    :raises RemoteProtocolError: a property without a name, or a name given twice.
    """
    properties: dict[str, str | None] = {}
    if not bag:
        return properties
    for item in bag.split("&"):
        if not item:
            continue
        raw_key, sep, raw_value = item.partition("=")
        key = unquote(raw_key)
        if not key or key in properties:
            raise RemoteProtocolError(
                f"The property bag {bag[:_MAX_QUOTED]!r} has an empty or repeated name."
            )
        properties[key] = unquote(raw_value) if sep else None
    return properties


def _query(query: str, topic: str) -> dict[str, str]:
    """A topic's ``?k=v&...`` items (values raw): every item must be ``k=v``, each key once."""
    items: dict[str, str] = {}
    for item in query.split("&"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or key in items:
            raise RemoteProtocolError(
                f"The topic {topic[:_MAX_QUOTED]!r} has a malformed or repeated item {key[:40]!r}."
            )
        items[key] = value
    return items


def _rid(items: Mapping[str, str], topic: str) -> str:
    rid = items.get("$rid")
    if not rid or any(c in rid for c in "&#+/") or any(c.isspace() for c in rid):
        raise RemoteProtocolError(f"The topic {topic[:_MAX_QUOTED]!r} has no usable $rid.")
    return rid


def _check_rid(rid: str) -> None:
    if not rid or any(c in rid for c in "&#+/$?=") or any(c.isspace() for c in rid):
        raise LocalProtocolError(f"{rid!r} cannot be a request id in an IoT Hub topic.")


# --- what a device publishes -----------------------------------------------------------------------


class PublicationKind(enum.Enum):
    TELEMETRY = "telemetry"
    TWIN_GET = "twin-get"
    TWIN_REPORTED = "twin-reported"
    METHOD_RESPONSE = "method-response"


@dataclass(frozen=True, slots=True, kw_only=True)
class Publication:
    """A device's PUBLISH topic, taken apart.

    ``device_id``: telemetry's (unquoted); ``properties``: telemetry's property bag;
    ``rid``: twin requests' and method responses' (raw); ``status``: a method response's;
    ``version``: the ``$version`` a reported patch may carry.
    """

    kind: PublicationKind
    device_id: str | None = None
    properties: dict[str, str | None] = field(default_factory=dict)
    rid: str | None = None
    status: int | None = None
    version: int | None = None


def parse_publication(topic: str) -> Publication:
    """The topic of a device's PUBLISH.

    :raises RemoteProtocolError: not a topic a device may publish to (or malformed).
    """
    if topic.startswith("devices/"):
        device_part, sep, rest = topic[len("devices/") :].partition("/messages/events")
        if not sep or not device_part or "/" in device_part or (rest and not rest.startswith("/")):
            raise RemoteProtocolError(f"{topic[:_MAX_QUOTED]!r} is not a topic a device may publish to.")
        return Publication(
            kind=PublicationKind.TELEMETRY,
            device_id=unquote(device_part),
            properties=decode_property_bag(rest[1:]),
        )
    for prefix, kind in (
        (TWIN_GET_PREFIX, PublicationKind.TWIN_GET),
        (TWIN_REPORTED_PREFIX, PublicationKind.TWIN_REPORTED),
    ):
        if topic.startswith(prefix):
            query = topic[len(prefix) :]
            if not query.startswith("?"):
                raise RemoteProtocolError(f"The twin topic {topic[:_MAX_QUOTED]!r} has no ?$rid=.")
            items = _query(query[1:], topic)
            version = items.get("$version")
            if version is not None and not ascii_digits(version):
                raise RemoteProtocolError(f"The twin topic {topic[:_MAX_QUOTED]!r} has a malformed $version.")
            return Publication(
                kind=kind, rid=_rid(items, topic), version=int(version) if version is not None else None
            )
    if topic.startswith(METHOD_RESPONSE_PREFIX):
        status_text, sep, query = topic[len(METHOD_RESPONSE_PREFIX) :].partition("/?")
        if not sep or not ascii_digits(status_text.removeprefix("-")) or len(status_text) > 10:
            raise RemoteProtocolError(f"The method response topic {topic[:_MAX_QUOTED]!r} has no status.")
        items = _query(query, topic)
        return Publication(
            kind=PublicationKind.METHOD_RESPONSE, rid=_rid(items, topic), status=int(status_text)
        )
    raise RemoteProtocolError(f"{topic[:_MAX_QUOTED]!r} is not a topic a device may publish to.")


def telemetry_topic(device_id: str, properties: Iterable[tuple[str, str | None]] = ()) -> str:
    """``devices/{id}/messages/events/`` and the property bag (device side)."""
    return f"devices/{_q(device_id)}/messages/events/{encode_property_bag(properties)}"


def twin_get_topic(rid: str) -> str:
    _check_rid(rid)
    return f"{TWIN_GET_PREFIX}?$rid={rid}"


def twin_reported_topic(rid: str) -> str:
    _check_rid(rid)
    return f"{TWIN_REPORTED_PREFIX}?$rid={rid}"


def method_response_topic(status: int, rid: str) -> str:
    _check_rid(rid)
    return f"{METHOD_RESPONSE_PREFIX}{int(status)}/?$rid={rid}"


# --- what the hub publishes ------------------------------------------------------------------------


def c2d_topic(device_id: str, properties: Iterable[tuple[str, str | None]] = ()) -> str:
    """``devices/{id}/messages/devicebound/{bag}``. The device id goes in raw, as IoT Hub sends
    it: the Python SDK recognises a cloud-to-device message by the unquoted
    ``devices/{id}/messages/devicebound`` (``mqtt_topic_iothub.is_c2d_topic``), and IoT Hub's
    device ids hold no character a topic level cannot (no ``/``, ``+``, ``#`` or space)."""
    if not device_id or any(c in device_id for c in "/+#") or any(c.isspace() for c in device_id):
        raise LocalProtocolError(f"{device_id!r} cannot be a device id in a topic.")
    return f"devices/{device_id}/messages/devicebound/{encode_property_bag(properties)}"


def twin_response_topic(status: int, rid: str, version: int | None = None) -> str:
    """``$rid`` first (C SDK), then ``$version`` when there is one (a reported patch's new version)."""
    if not 100 <= status <= 599:
        raise LocalProtocolError(f"{status!r} is not a status code.")
    if not rid or any(c in rid for c in "&#+") or any(c.isspace() for c in rid):
        raise LocalProtocolError(f"{rid!r} cannot be echoed in a twin response topic.")
    topic = f"{TWIN_RESPONSE_PREFIX}{status}/?$rid={rid}"
    if version is not None:
        topic += f"&$version={int(version)}"
    return topic


def desired_patch_topic(version: int) -> str:
    return f"{TWIN_DESIRED_PREFIX}?$version={int(version)}"


def method_request_topic(name: str, rid: str) -> str:
    if not name or "/" in name:
        raise LocalProtocolError(f"{name!r} cannot be a method name in a topic.")
    _check_rid(rid)
    return f"{METHOD_REQUEST_PREFIX}{_q(name)}/?$rid={rid}"


@dataclass(frozen=True, slots=True, kw_only=True)
class TwinResponseTopic:
    status: int
    rid: str
    version: int | None = None


def parse_twin_response_topic(topic: str) -> TwinResponseTopic:
    """A twin response (device side).

    :raises RemoteProtocolError: not a twin response topic.
    """
    if not topic.startswith(TWIN_RESPONSE_PREFIX):
        raise RemoteProtocolError(f"{topic[:_MAX_QUOTED]!r} is not a twin response topic.")
    status_text, sep, query = topic[len(TWIN_RESPONSE_PREFIX) :].partition("/?")
    if not sep or not ascii_digits(status_text) or len(status_text) != 3:
        raise RemoteProtocolError(f"The twin response topic {topic[:_MAX_QUOTED]!r} has no status.")
    items = _query(query, topic)
    version = items.get("$version")
    return TwinResponseTopic(
        status=int(status_text),
        rid=_rid(items, topic),
        version=int(version) if version is not None and ascii_digits(version) else None,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class MethodResponseTopic:
    name: str
    rid: str


def parse_method_request_topic(topic: str) -> MethodResponseTopic:
    """A method request (device side): the method's name and the rid to answer with.

    :raises RemoteProtocolError: not a method request topic.
    """
    if not topic.startswith(METHOD_REQUEST_PREFIX):
        raise RemoteProtocolError(f"{topic[:_MAX_QUOTED]!r} is not a method request topic.")
    name, sep, query = topic[len(METHOD_REQUEST_PREFIX) :].partition("/?")
    if not sep or not name:
        raise RemoteProtocolError(f"The method request topic {topic[:_MAX_QUOTED]!r} has no name.")
    return MethodResponseTopic(name=unquote(name), rid=_rid(_query(query, topic), topic))


# --- subscriptions ---------------------------------------------------------------------------------


class Filter(enum.Enum):
    """The topic filters IoT Hub allows a device to subscribe to."""

    C2D = "c2d"
    TWIN_RESPONSES = "twin-responses"
    DESIRED_PATCHES = "desired-patches"
    METHODS = "methods"


def classify_filter(topic_filter: str, device_id: str) -> Filter | None:
    """Which documented filter ``topic_filter`` is for ``device_id`` (``None``: not one IoT Hub
    has). The device id may be quoted or not, as in publications."""
    if topic_filter in ("$iothub/twin/res/#", "$iothub/twin/res/+/#"):
        return Filter.TWIN_RESPONSES
    if topic_filter in ("$iothub/twin/PATCH/properties/desired/#", "$iothub/twin/PATCH/properties/desired/+"):
        return Filter.DESIRED_PATCHES
    if topic_filter in ("$iothub/methods/POST/#", "$iothub/methods/POST/+/#"):
        return Filter.METHODS
    if topic_filter.startswith("devices/") and topic_filter.endswith("/messages/devicebound/#"):
        named = topic_filter[len("devices/") : -len("/messages/devicebound/#")]
        if named in (device_id, _q(device_id)):
            return Filter.C2D
    return None


# --- the CONNECT user name -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HubUsername:
    """``{hostName}/{deviceId}[/{moduleId}]/?{query}``, taken apart (query values unquoted)."""

    host_name: str
    device_id: str
    module_id: str | None = None
    api_version: str | None = None
    client_type: str | None = None
    model_id: str | None = None


def parse_hub_username(username: str) -> HubUsername:
    """IoT Hub's CONNECT user name: split at the first ``/?``; the left part is
    ``{hostName}/{deviceId}`` or ``{hostName}/{deviceId}/{moduleId}``; unknown query keys are
    ignored and any api-version is accepted (iothub.md §1.2). The SDKs send the ids unquoted.

    :raises RemoteProtocolError: not an IoT Hub user name.
    """
    head, sep, query = username.partition("/?")
    if not sep:
        head = head.rstrip("/")
    parts = head.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise RemoteProtocolError(
            f"The user name {username[:_MAX_QUOTED]!r} is not {{hostName}}/{{deviceId}}/?api-version=..."
        )
    values: dict[str, str] = {}
    for item in query.split("&") if query else ():
        key, _, value = item.partition("=")
        values.setdefault(key, unquote(value))
    return HubUsername(
        host_name=parts[0],
        device_id=parts[1],
        module_id=parts[2] if len(parts) == 3 else None,
        api_version=values.get("api-version") or None,
        client_type=values.get("DeviceClientType") or None,
        model_id=values.get("model-id") or None,
    )


def build_hub_username(
    host_name: str, device_id: str, *, api_version: str = "2021-04-12", client_type: str | None = None
) -> str:
    """The user name a device sends (device side)."""
    if not host_name or "/" in host_name or not device_id or "/" in device_id:
        raise LocalProtocolError(f"Cannot build a user name from {host_name!r} and {device_id!r}.")
    username = f"{host_name}/{device_id}/?api-version={api_version}"
    if client_type:
        username += f"&DeviceClientType={_q(client_type)}"
    return username
