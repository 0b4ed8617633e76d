"""DPS's MQTT topics and CONNECT user name (device-protocol.md §3.1, §3.2): build and parse,
pure functions shared by the service endpoint and the device client.

=========  ====================================================================================
register   ``$dps/registrations/PUT/iotdps-register/?$rid={rid}``
poll       ``$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={op}``
response   ``$dps/registrations/res/{status}/?$rid={rid}[&retry-after={seconds}]``
subscribe  ``$dps/registrations/res/#``
user name  ``{idScope}/registrations/{registrationId}/api-version={v}&ClientVersion={ua}``
=========  ====================================================================================

What the SDKs require of a response topic, and why it is built the way it is:

* ``$rid`` is the **first** property (the .NET SDK's regex ``^\\$dps/registrations/res/(.*?)/\\?\\$rid=(.*?)$``);
* the rid is echoed **byte for byte** as the device sent it: the Python SDK sends a URL-quoted
  uuid, .NET and C send the packet id, Node a uuid; none unquotes what it gets back the same way;
* the only ``$`` is the one of ``$rid`` (the Python SDK splits the topic on ``$``);
* ``retry-after`` is **lower case** (Python looks it up in a dict, C with ``memcmp``).

Request topics are parsed by key, not position; the rid is kept raw, the operation id is
URL-unquoted (the Python SDK quotes it). Anything that is not one of these topics raises
:class:`~provisiond.errors.RemoteProtocolError`: DPS allows only its documented topics.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from urllib.parse import quote, unquote

from ..errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "REGISTER_PREFIX",
    "RESPONSE_FILTER",
    "RESPONSE_PREFIX",
    "STATUS_PREFIX",
    "RequestKind",
    "RequestTopic",
    "ResponseTopic",
    "Username",
    "ascii_digits",
    "build_username",
    "is_response_filter",
    "parse_request_topic",
    "parse_response_topic",
    "parse_username",
    "register_topic",
    "response_topic",
    "status_topic",
]

REGISTER_PREFIX = "$dps/registrations/PUT/iotdps-register/?"
STATUS_PREFIX = "$dps/registrations/GET/iotdps-get-operationstatus/?"
RESPONSE_PREFIX = "$dps/registrations/res/"
#: The filter every SDK subscribes to for its responses.
RESPONSE_FILTER = "$dps/registrations/res/#"
_API_VERSION_MARK = "/api-version="
_MAX_TOPIC_CHARS = 200  # how much of a topic an error message quotes


class RequestKind(enum.Enum):
    REGISTER = "register"
    STATUS = "status"


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestTopic:
    """A device's request: its kind, its rid (raw, as sent) and, for a poll, the operation id."""

    kind: RequestKind
    rid: str
    operation_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseTopic:
    """The service's answer: the HTTP-like status, the rid (raw), the retry-after seconds."""

    status: int
    rid: str
    retry_after: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Username:
    """The CONNECT user name, taken apart. ``client_version`` is URL-unquoted."""

    id_scope: str
    registration_id: str
    api_version: str | None = None
    client_version: str | None = None


# --- requests (device -> service) ------------------------------------------------------------------


def ascii_digits(text: str) -> bool:
    """Whether ``text`` is ASCII digits only: ``str.isdigit`` also takes "²" (which ``int``
    refuses) and "٢" (which it reads as 2), and a peer chose the text."""
    return text.isascii() and text.isdigit()


def _echoable(rid: str) -> bool:
    """Whether a rid can be echoed in a response topic: no property separator, no second
    ``$`` (Python splits on it) and no wildcard (a topic name cannot hold one)."""
    return not any(c in rid for c in "&$#+")


def _check_rid(rid: str) -> None:
    if not rid or not _echoable(rid) or any(c.isspace() for c in rid):
        raise LocalProtocolError(f"{rid!r} cannot be a request id in a DPS topic.")


def register_topic(rid: str) -> str:
    """The topic of a register request."""
    _check_rid(rid)
    return f"{REGISTER_PREFIX}$rid={rid}"


def status_topic(rid: str, operation_id: str) -> str:
    """The topic of an operation status request (a poll)."""
    _check_rid(rid)
    if not operation_id:
        raise LocalProtocolError("A status request needs an operation id.")
    return f"{STATUS_PREFIX}$rid={rid}&operationId={quote(operation_id, safe='')}"


def parse_request_topic(topic: str) -> RequestTopic:
    """A device's register or status topic.

    :raises RemoteProtocolError: not a DPS request topic, or without ``$rid`` (or, for a
        status request, without ``operationId``).
    """
    if topic.startswith(REGISTER_PREFIX):
        kind = RequestKind.REGISTER
    elif topic.startswith(STATUS_PREFIX):
        kind = RequestKind.STATUS
    else:
        raise RemoteProtocolError(f"{topic[:_MAX_TOPIC_CHARS]!r} is not a DPS request topic.")
    query = topic[len(REGISTER_PREFIX if kind is RequestKind.REGISTER else STATUS_PREFIX) :]
    properties = _properties(query, topic)
    rid = properties.get("$rid")
    if rid is None or not _echoable(rid):
        raise RemoteProtocolError(f"The request topic {topic[:_MAX_TOPIC_CHARS]!r} has no usable $rid.")
    if kind is RequestKind.REGISTER:
        return RequestTopic(kind=kind, rid=rid)
    operation_id = unquote(properties.get("operationId", ""))
    if not operation_id:
        raise RemoteProtocolError(
            f"The status request topic {topic[:_MAX_TOPIC_CHARS]!r} has no operationId."
        )
    return RequestTopic(kind=kind, rid=rid, operation_id=operation_id)


# --- responses (service -> device) -----------------------------------------------------------------


def response_topic(status: int, rid: str, retry_after: int | None = None) -> str:
    """The topic of the answer to request ``rid``: ``$rid`` first, ``retry-after`` lower case,
    the rid exactly as the device sent it."""
    if not 100 <= status <= 599:
        raise LocalProtocolError(f"{status!r} is not a status code.")
    if not _echoable(rid):
        raise LocalProtocolError(f"{rid!r} cannot be echoed in a response topic.")
    topic = f"{RESPONSE_PREFIX}{status}/?$rid={rid}"
    if retry_after is not None:
        topic += f"&retry-after={int(retry_after)}"
    return topic


def parse_response_topic(topic: str) -> ResponseTopic:
    """The service's response topic.

    :raises RemoteProtocolError: not a DPS response topic, no status or no ``$rid``.
    """
    if not topic.startswith(RESPONSE_PREFIX):
        raise RemoteProtocolError(f"{topic[:_MAX_TOPIC_CHARS]!r} is not a DPS response topic.")
    status_text, sep, query = topic[len(RESPONSE_PREFIX) :].partition("/?")
    if not sep or not ascii_digits(status_text) or not 100 <= int(status_text) <= 599:
        raise RemoteProtocolError(f"The response topic {topic[:_MAX_TOPIC_CHARS]!r} carries no status code.")
    properties = _properties(query, topic)
    rid = properties.get("$rid")
    if rid is None:
        raise RemoteProtocolError(f"The response topic {topic[:_MAX_TOPIC_CHARS]!r} has no $rid.")
    return ResponseTopic(status=int(status_text), rid=rid, retry_after=properties.get("retry-after"))


def is_response_filter(topic_filter: str) -> bool:
    """Whether a SUBSCRIBE topic filter asks for DPS responses (``$dps/registrations/res/#``
    or a narrower filter under it)."""
    return topic_filter.startswith(RESPONSE_PREFIX) or topic_filter == "$dps/registrations/res"


def _properties(query: str, topic: str) -> dict[str, str]:
    properties: dict[str, str] = {}
    for item in query.split("&"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or key in properties:
            raise RemoteProtocolError(
                f"The topic {topic[:_MAX_TOPIC_CHARS]!r} has a malformed or repeated property {key[:40]!r}."
            )
        properties[key] = value
    return properties


# --- the CONNECT user name -------------------------------------------------------------------------


def build_username(
    id_scope: str, registration_id: str, *, api_version: str, client_version: str | None = None
) -> str:
    """``{idScope}/registrations/{registrationId}/api-version={v}[&ClientVersion={ua}]`` (the
    client version URL-quoted, as the Python SDK does)."""
    if not id_scope or "/" in id_scope or not registration_id or "/" in registration_id:
        raise LocalProtocolError(f"Cannot build a user name from {id_scope!r} and {registration_id!r}.")
    username = f"{id_scope}/registrations/{registration_id}{_API_VERSION_MARK}{api_version}"
    if client_version:
        username += f"&ClientVersion={quote(client_version, safe='')}"
    return username


def parse_username(username: str) -> Username:
    """The CONNECT user name, parsed up to the first ``/api-version=``; the rest is an optional
    query string (``api-version``, ``ClientVersion``, others ignored). The SDKs differ: .NET and
    Node escape the client version, Python quotes it, C sends ``1.15.0`` unencoded.

    :raises RemoteProtocolError: not ``{idScope}/registrations/{registrationId}[/api-version=...]``.
    """
    head, mark, tail = username.partition(_API_VERSION_MARK)
    id_scope, sep, registration_id = head.partition("/registrations/")
    if not sep or not id_scope or "/" in id_scope or not registration_id or "/" in registration_id:
        raise RemoteProtocolError(
            f"The user name {username[:_MAX_TOPIC_CHARS]!r} is not "
            "{idScope}/registrations/{registrationId}/api-version=..."
        )
    api_version = client_version = None
    if mark:
        api_version, _, rest = tail.partition("&")
        for item in rest.split("&"):
            key, _, value = item.partition("=")
            if key == "ClientVersion":
                client_version = unquote(value)
    return Username(
        id_scope=id_scope,
        registration_id=registration_id,
        api_version=api_version or None,
        client_version=client_version,
    )
