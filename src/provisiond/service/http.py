"""HTTP plumbing shared by the HTTPS endpoints (service API, admin API, device API): DPS error
responses and their log lines, JSON responses, bounded body reads, the api-version rule, and the
one place where exceptions become responses. The error body itself is DPS's wire message
(:func:`provisiond.protocol.messages.error_body`), which the MQTT and AMQP endpoints answer
with too, through the device gateway (:mod:`provisiond.service.gateway`)."""

from __future__ import annotations

import abc
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec
from starlette._utils import get_route_path  # what Starlette's router matches against
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, Router, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import BodyTooLargeError, InvalidBodyError, MissingApiVersionError, ProvisioningError
from ..protocol import bounded_json
from ..protocol.messages import error_body
from ..storage import utc_now

__all__ = [
    "ApiHandler",
    "AsgiEndpoint",
    "DirectRoutes",
    "ErrorRenderer",
    "OneLineFormatter",
    "ShapedRouter",
    "UnknownPaths",
    "api_version_of",
    "decode_body",
    "error_answer",
    "error_headers",
    "error_response",
    "handle_errors",
    "json_response",
    "lean_log_records",
    "one_line_logs",
    "path_shown",
    "read_body",
    "receive_body",
    "require_api_version",
    "retry_after_of",
    "route_table",
    "shown_path",
    "tracking_id",
]

log = logging.getLogger("provisiond.http")

T = TypeVar("T")
ApiHandler = Callable[[Request], Awaitable[Response]]
#: How an API renders an error as a response (DPS's body; a built-in hub's API, IoT Hub's).
ErrorRenderer = Callable[[ProvisioningError, str], Response]

_API_VERSION = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(-preview)?$")
_JSON = "application/json; charset=utf-8"
_encoder = msgspec.json.Encoder()


def tracking_id(request: Request) -> str:
    """The request's tracking id (made on first use, echoed in error bodies and logs)."""
    tid: str | None = request.scope.get("provisiond.tracking_id")
    if tid is None:
        tid = str(uuid.uuid4())
        request.scope["provisiond.tracking_id"] = tid
    return tid


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response; ``content`` is a msgspec struct, a builtin, or already-encoded bytes."""
    body = content if isinstance(content, bytes) else _encoder.encode(content)
    return Response(body, status_code=status, headers=headers, media_type=_JSON)


def error_response(exc: ProvisioningError, tid: str) -> Response:
    """DPS's ProvisioningServiceErrorDetails body (:func:`~provisiond.protocol.messages.error_body`,
    the one every transport answers with) plus the ``x-ms-error-code`` header, and Retry-After
    when the error carries one."""
    body = error_body(exc.error_code, tid, exc.message, utc_now())
    return json_response(body, exc.http_status, error_headers(exc.error_code, retry_after_of(exc)))


def retry_after_of(exc: ProvisioningError) -> int | None:
    """The seconds after which ``exc`` says to come back (429, 503), if it says so."""
    retry_after = getattr(exc, "retry_after", None)
    return retry_after if isinstance(retry_after, int) else None


def error_headers(error_code: int, retry_after: int | None) -> dict[str, str]:
    """The headers of an error answer: ``x-ms-error-code`` and, when given, ``Retry-After``."""
    headers = {"x-ms-error-code": str(int(error_code))}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return headers


def shown_path(request: Request) -> str:
    """The path as the client sent it, for a log line: still percent-encoded (so that no byte
    the client chose can break the line), without the query string, cut at 300 characters."""
    return path_shown(request.scope)


def path_shown(scope: Scope) -> str:
    """:func:`shown_path` of an HTTP scope."""
    raw = scope.get("raw_path") or scope["path"].encode("utf-8")
    text = bytes(raw).partition(b"?")[0].decode("ascii", "backslashreplace")
    if not text.isprintable():
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= 300 else text[:300] + "..."


def error_answer(
    request: Request, exc: ProvisioningError, render: ErrorRenderer = error_response
) -> Response:
    """The error response for ``exc`` (DPS's, unless ``render`` says otherwise), and the log
    line an operator needs to see what the client asked for: method, path, status, errorCode,
    message and tracking id (INFO for 4xx, ERROR for 5xx). Every error the HTTP endpoints
    answer goes through here."""
    tid = tracking_id(request)
    response = render(exc, tid)
    level = logging.ERROR if response.status_code >= 500 else logging.INFO
    code = exc.iothub_code if render is not error_response else exc.error_code
    log.log(
        level,
        "%s %s -> %d %d: %s [trackingId=%s]",
        request.method,
        shown_path(request),
        response.status_code,
        code,
        exc.message,
        tid,
    )
    return response


def lean_log_records() -> None:
    """Stop the logging module from collecting, for every record, what provisiond's log formats
    never show: the caller's file, line and function (a walk up the stack), the thread's name
    and the multiprocessing process name (the logging HOWTO's "Optimization"). Every 4xx and 5xx
    answer logs a line (:func:`error_answer`), so that line should cost little. The process id
    stays: worker processes show it."""
    logging.logThreads = False
    logging.logMultiprocessing = False
    setattr(logging, "_srcfile", None)  # noqa: B010  # the documented switch; private name


#: Control characters (and Unicode's line breaks) as escapes: a record stays one line whatever
#: a peer put into its message (a twin key with a newline forged a log line of its own).
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {
    0x0A: "\\n",
    0x0D: "\\r",
    0x09: "\\t",
    0x85: "\\x85",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


class OneLineFormatter(logging.Formatter):
    """A formatter whose message is always one line: control characters are escaped (a
    traceback, which follows the message, keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # logging's name
        if not record.message.isprintable():  # one C pass; escaping only when it is needed
            record.message = record.message.translate(_CONTROL)
        return super().formatMessage(record)


def one_line_logs() -> None:
    """Give the root logger's handlers a :class:`OneLineFormatter` with their format."""
    for handler in logging.getLogger().handlers:
        current = handler.formatter or logging.Formatter()
        handler.setFormatter(OneLineFormatter(current._fmt, current.datefmt))


def handle_errors(handler: ApiHandler, *, render: ErrorRenderer = error_response) -> ApiHandler:
    """Wrap an endpoint: provisiond errors become error bodies (DPS's, unless ``render`` says
    otherwise) with a log line that says why; anything else is our bug, logged with its
    traceback and answered as a 500."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ProvisioningError as exc:
            return error_answer(request, exc, render)
        except Exception:
            tid = tracking_id(request)
            log.exception(
                "%s %s -> 500: internal error [trackingId=%s]", request.method, shown_path(request), tid
            )
            return render(
                ProvisioningError(f"Internal error; the service log has the details under trackingId {tid}."),
                tid,
            )

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def require_api_version(request: Request) -> str:
    """The request's ``api-version``: any date from 2018 on (``-preview`` allowed).

    :raises MissingApiVersionError: absent or not such a date.
    """
    return api_version_of(request.scope)


def api_version_of(scope: Scope) -> str:
    """:func:`require_api_version` of an HTTP scope."""
    query: bytes = scope.get("query_string", b"")
    version = _plain_api_version(query)
    if version is None:
        version = QueryParams(query).get("api-version")
    if not version:
        raise MissingApiVersionError("The api-version query parameter is required (for example 2021-10-01).")
    match = _API_VERSION.match(version)
    if match is None or int(match.group(1)) < 2018:
        raise MissingApiVersionError(
            f"Unsupported api-version {version[:40]!r}: use a date from 2018 on, such as 2021-10-01."
        )
    return version


def _plain_api_version(query: bytes) -> str | None:
    """The query's last ``api-version`` when no parameter needs decoding (what every SDK
    sends: ``api-version=2021-10-01``), without building Starlette's parsed query (about
    10 µs of every device request); ``None`` otherwise, and the caller parses the query."""
    # find, not `in`: bytes' `in` tries its operand as an int first (a TypeError made and dropped)
    if query.find(b"%") >= 0 or query.find(b"+") >= 0:
        return None
    version = None
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if name == b"api-version":
            version = value.decode("ascii", "replace")
    return version


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes without reading them all.

    :raises BodyTooLargeError: the body is larger than ``limit``.
    :raises InvalidBodyError: the connection closed before the body's end.
    """
    return await receive_body(request.headers.get("content-length"), request.receive, limit)


async def receive_body(declared: str | None, receive: Receive, limit: int) -> bytes:
    """:func:`read_body` from an ASGI ``receive``, given the Content-Length header (or
    ``None``); the body must not have been read yet."""
    if declared is not None:
        try:
            if int(declared) > limit:
                raise BodyTooLargeError(
                    f"The request body ({declared} bytes) exceeds the {limit}-byte limit."
                )
        except ValueError:
            raise InvalidBodyError("The Content-Length header is not a number.") from None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLargeError(f"The request body exceeds the {limit}-byte limit.")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        elif message["type"] == "http.disconnect":  # the device left, or its connection was closed (too slow)
            raise InvalidBodyError(
                f"The client closed the connection after {size} bytes of its body"
                + (f" (of {declared} announced)." if declared is not None else ".")
            )


def decode_body(body: bytes, type_: type[T], what: str) -> T:
    """Decode JSON into ``type_``; malformed JSON, JSON nested deeper than
    :data:`~provisiond.protocol.bounded_json.MAX_DEPTH` (refused before decoding) or a field of
    the wrong type is a 400 that names the field (msgspec's message, e.g. "Expected `str`, got
    `int` - at `$.registrationId`")."""
    if not body.strip():
        raise InvalidBodyError(f"The request body is empty; expected {what} as JSON.")
    try:
        return bounded_json.decode(body, type_)
    except msgspec.ValidationError as exc:
        raise InvalidBodyError(f"Invalid {what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidBodyError(f"The request body is not valid JSON: {exc}") from None


def route_table(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """``routes``, matched the way DPS matches paths: case-insensitively (the Node.js service
    SDK posts to ``/enrollmentgroups/{id}/attestationmechanism``) and with or without a trailing
    slash (the C service SDK posts bulk operations to ``/enrollments/``). Path parameters keep
    the case the client sent. Decided here, once, for every route of the app (service, admin and
    device API alike), not per route."""
    for route in routes:
        if isinstance(route, Route | WebSocketRoute):
            pattern = route.path_regex.pattern
            if not pattern.endswith("/$"):
                pattern = pattern.removesuffix("$") + "/?$"
            route.path_regex = re.compile(pattern, re.IGNORECASE)
    return list(routes)


def _first_segment(route: BaseRoute) -> str | None:
    """The literal first segment of ``route``'s path, lower-cased; ``None`` when it is a
    parameter (or the route is of a kind that has no plain path)."""
    path = route.path if isinstance(route, Route | WebSocketRoute) else None
    if path is None:
        return None
    first = path[1:].partition("/")[0]
    return None if "{" in first else first.lower()


class ShapedRouter(Router):
    """Starlette's router, with the routes a path's first segment can reach picked before the
    regexes run. Starlette tries every route's regex in order: about 47 routes, 40-60 µs of
    every request, the device registration's included (its routes start with a parameter, the
    ID scope, and came after the service, admin and hub routes). Here a request's candidates
    are the routes whose first segment is that literal (case-insensitively) and those whose
    first segment is a parameter, in the original order, so that the route that answers is the
    one Starlette's router would have chosen (tests/service/test_routing.py). The routes are
    indexed at construction: add none afterwards."""

    def __init__(self, routes: Sequence[BaseRoute], **kwargs: Any) -> None:
        super().__init__(routes, **kwargs)
        firsts = [(route, _first_segment(route)) for route in self.routes]

        def subset(first: str | None) -> Router:
            chosen = [route for route, its in firsts if its is None or its == first]
            return Router(chosen, redirect_slashes=self.redirect_slashes, default=self.default)

        self._anywhere = subset(None)
        self._by_first = {first: subset(first) for _, first in firsts if first is not None}

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await super().app(scope, receive, send)
            return
        scope.setdefault("router", self)
        first = get_route_path(scope)[1:].partition("/")[0].lower()
        await self._by_first.get(first, self._anywhere).app(scope, receive, send)


_GROUP_NAME = re.compile(r"\(\?P<\w+>")


class UnknownPaths:
    """ASGI middleware: an HTTP request whose path no route of ``routes`` can match is answered
    by ``not_found`` at once. Starlette's router would try every route, then every route again
    with the trailing slash flipped (which :func:`route_table` already allows), then raise the
    404 as an exception for its exception middleware to answer: about a hundred regular
    expressions and a raise per unknown path, most of the cost of a 404 (the trivial request
    of ``bench/cpu.py``).

    One expression decides: the union of the routes' patterns (their group names dropped,
    case-insensitive). It matches at least what the routes match, so a request any route would
    serve reaches the router as before; a route of another kind (a mount) turns the shortcut off.
    WebSocket and lifespan scopes, and requests under a ``root_path``, pass through."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Sequence[BaseRoute],
        not_found: Callable[[Request], Awaitable[Response]],
    ) -> None:
        self.app = app
        self._not_found = not_found
        self._known: re.Pattern[str] | None = None
        if all(isinstance(route, Route | WebSocketRoute) for route in routes):
            patterns = [
                _GROUP_NAME.sub("(?:", route.path_regex.pattern)
                for route in routes
                if isinstance(route, Route)
            ]
            self._known = re.compile("|".join(f"(?:{p})" for p in patterns) or "(?!)", re.IGNORECASE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        known = self._known
        # Under a root path (never set by serve) the router's own rules apply.
        if known is not None and scope["type"] == "http" and not scope.get("root_path"):
            if known.match(scope["path"]) is None:
                response = await self._not_found(Request(scope, receive))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AsgiEndpoint(abc.ABC):
    """A route's endpoint that is an ASGI app answering every request itself, errors included
    (it raises nothing: no exception handler of the app is needed), so that
    :class:`DirectRoutes` may call it without the app's layers."""

    @abc.abstractmethod
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...


class DirectRoutes:
    """ASGI middleware: the routes whose path starts with a parameter (the device API's
    ``/{idScope}/registrations/...``) called directly, without the layers between the app's
    entry and a route's endpoint: the exception middleware, the router and
    :class:`UnknownPaths`' expression. About a dozen coroutine frames and two
    regular-expression passes per request, on the path every device registration over HTTPS
    takes.

    It answers what the router would answer, and nothing else: a request is taken here only
    when its first path segment is not the literal first segment of any route (the router
    would then try the parameter routes only, :class:`ShapedRouter`) and one of those routes
    matches it fully, path and method. ``HEAD`` (answered by a ``GET`` route), a ``405``, a
    ``404`` and requests under a ``root_path`` go on to the app. Every parameter route must be
    a plain :class:`~starlette.routing.Route` whose endpoint is an :class:`AsgiEndpoint` (no
    route middleware, no body limit); any other turns this off."""

    def __init__(self, app: ASGIApp, *, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        literal: set[str] = set()
        direct: list[tuple[re.Pattern[str], frozenset[str], AsgiEndpoint]] = []
        for route in routes:
            first = _first_segment(route)
            if first is not None:
                literal.add(first)
            elif (
                isinstance(route, Route)
                and route.methods
                and isinstance(route.endpoint, AsgiEndpoint)
                and route.app is route.endpoint
            ):
                direct.append((route.path_regex, frozenset(route.methods - {"HEAD"}), route.endpoint))
            else:
                direct = []
                break
        self._literal = frozenset(literal)
        self._direct = tuple(direct)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._direct and not scope.get("root_path"):
            path = scope["path"]
            method = scope["method"]
            if path[1:].partition("/")[0].lower() not in self._literal:
                for regex, methods, endpoint in self._direct:
                    match = regex.match(path)
                    if match is not None and method in methods:
                        scope["path_params"] = match.groupdict()
                        scope["endpoint"] = endpoint
                        await endpoint(scope, receive, send)
                        return
                # no route, or the router's 405 (HEAD: a GET route's)
        await self.app(scope, receive, send)
