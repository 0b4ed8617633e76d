"""The app's router picks, for every request, the route Starlette's own router would pick.

``ShapedRouter`` narrows the routes by the path's first segment before running their regexes.
Here both routers get the app's real route table (every path and method of the service, admin,
hub and device APIs, made case-insensitive with the optional trailing slash by
``route_table``), each route answering with its own path and method, and the same requests:
every route's path filled in, upper-cased, with a trailing slash, with the wrong method (405),
paths that collide across APIs, and paths no route has (404)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route, Router
from starlette.types import Receive, Scope, Send

from provisiond.service.app import create_app
from provisiond.service.http import AsgiEndpoint, DirectRoutes, ShapedRouter, UnknownPaths, route_table
from provisiond.service.settings import Settings

_PARAM = re.compile(r"\{[^}]+\}")


class _Echo(AsgiEndpoint):
    """Answers with its route's path and methods, and the path parameters it was given."""

    def __init__(self, route: Route) -> None:
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        text = f"{self.route.path} {sorted(self.route.methods or ())} {scope.get('path_params')}"
        await PlainTextResponse(text)(scope, receive, send)


def _echo(route: Route) -> Route:
    return Route(route.path, _Echo(route), methods=list(route.methods or ()))


def _real_routes(tmp_path: Path) -> list[BaseRoute]:
    settings = Settings(data_dir=tmp_path, host="localhost", https_port=8443, mqtt_port=0, amqp_port=0)
    return list(create_app(settings).routes)


def _requests(routes: list[BaseRoute]) -> list[tuple[str, str]]:
    paths = {"/", "/nothing", "//x", "/registrations", "/registrations/registrations/query", "/a/b/c/d/e/f"}
    for route in routes:
        if isinstance(route, Route):
            for value in ("registrations", "x1", "QUERY"):
                filled = _PARAM.sub(value, route.path)
                paths |= {filled, filled.upper(), filled + "/", filled.lower() + "//"}
    methods = ("GET", "PUT", "POST", "DELETE", "PATCH")
    return sorted(itertools.product(methods, paths))


def _app(router: Router) -> Starlette:
    app = Starlette()
    app.router = router
    return app


async def test_the_shaped_router_answers_as_starlettes(tmp_path: Path) -> None:
    real = _real_routes(tmp_path)
    assert any(isinstance(r, Route) and r.path.startswith("/{") for r in real)  # the device routes

    def table() -> list[BaseRoute]:  # fresh routes each time: route_table changes their regexes
        return route_table([_echo(r) for r in real if isinstance(r, Route)])

    plain, shaped = _app(Router(table())), _app(ShapedRouter(table()))
    requests = _requests(real)
    assert len(requests) > 1000
    seen: set[int] = set()
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=plain), base_url="https://h") as a,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=shaped), base_url="https://h") as b,
    ):
        for method, path in requests:
            expected = await a.request(method, path)
            actual = await b.request(method, path)
            assert (actual.status_code, actual.text) == (expected.status_code, expected.text), (method, path)
            seen.add(expected.status_code)
    assert {200, 404, 405} <= seen


async def test_direct_routes_answer_as_the_router(tmp_path: Path) -> None:
    """``DirectRoutes`` in front of the router: every request gets the router's answer (HEAD,
    405, 404, case and trailing slashes, a scope that is another API's first segment), and the
    device routes' requests are answered without reaching the router."""
    real = _real_routes(tmp_path)

    def table() -> list[BaseRoute]:
        return route_table([_echo(r) for r in real if isinstance(r, Route)])

    routed: list[str] = []
    inner = _app(ShapedRouter(table()))

    async def counted(scope: Scope, receive: Receive, send: Send) -> None:
        routed.append(scope["path"])
        await inner(scope, receive, send)

    plain = _app(Router(table()))
    direct = DirectRoutes(counted, routes=table())
    requests = _requests(real) + [(method, path) for method, path in _requests(real) if method == "GET"]
    requests += [("HEAD", path) for _, path in requests]
    literal = {
        r.path.split("/")[1].lower() for r in real if isinstance(r, Route) and not r.path.startswith("/{")
    }
    taken = 0
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=plain), base_url="https://h") as a,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=direct), base_url="https://h") as b,
    ):
        for method, path in requests:
            expected = await a.request(method, path)
            before = len(routed)
            actual = await b.request(method, path)
            assert (actual.status_code, actual.text) == (expected.status_code, expected.text), (method, path)
            device = (
                expected.status_code == 200
                and expected.text.startswith("/{scope}/")
                and method != "HEAD"
                and path.split("/")[1].lower() not in literal
            )
            assert (len(routed) == before) == device, (method, path)
            taken += device
    assert taken >= 20  # the device routes' requests, in every case and with the slashes


def test_direct_routes_step_aside_for_routes_they_cannot_call() -> None:
    """A parameter route the router must call itself (a function endpoint, which relies on the
    app's exception handling; route middleware; a body limit) turns ``DirectRoutes`` off: every
    request goes to the app."""
    echo = _Echo(Route("/{a}/c", PlainTextResponse("x")))

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("x")

    for route in (
        Route("/{a}/b", endpoint, methods=["GET"]),
        Route("/{a}/b", echo, methods=["GET"], max_body_size=10),
        Route(
            "/{a}/b",
            echo,
            methods=["GET"],
            middleware=[Middleware(UnknownPaths, routes=[], not_found=endpoint)],
        ),
        Route("/{a}/b", PlainTextResponse("x"), methods=["GET"]),
        Route("/{a}/b", echo),  # no methods: any
    ):
        direct = DirectRoutes(_app(Router([])), routes=[Route("/{a}/c", echo, methods=["GET"]), route])
        assert direct._direct == ()  # what the middleware decided
    both = [Route("/{a}/c", echo, methods=["GET"]), Route("/{a}/b", echo, methods=["PUT"])]
    assert len(DirectRoutes(_app(Router([])), routes=both)._direct) == 2


def test_the_plain_api_version_is_starlettes() -> None:
    """``require_api_version`` reads a query that needs no decoding itself: the same value as
    Starlette's parsed query, or it leaves the query to Starlette."""
    from starlette.datastructures import QueryParams

    from provisiond.service.http import _plain_api_version

    queries = [
        b"",
        b"api-version=2021-10-01",
        b"x=1&api-version=2019-03-31&y",
        b"api-version=2018-01-01&api-version=2021-10-01",  # the last one, as Starlette's
        b"api-version",
        b"api-version=",
        b"xapi-version=2021-10-01",
        b"api-version=2021-10-01-preview&&",
        b"api-version=2021%2D10%2D01",
        b"api-version=a+b",
    ]
    for query in queries:
        plain = _plain_api_version(query)
        parsed = QueryParams(query.decode("latin-1")).get("api-version")
        assert plain is None or plain == parsed, query
    assert _plain_api_version(b"api-version=2021%2D10%2D01") is None  # left to Starlette
