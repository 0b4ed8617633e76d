"""Transports: the seam between the sans-io registration flow and the network.

A :class:`Transport` carries one request of the flow (:class:`~provisiond.protocol.registration.SendRegister`
or :class:`~provisiond.protocol.registration.SendPoll`) and returns what came back as a
:class:`~provisiond.protocol.registration.Reply`. It makes no decisions: retries, polling and
error interpretation live in :mod:`provisiond.protocol.registration`. Failures to talk at all
are raised as :class:`~provisiond.errors.TransportError` (``ConnectError``, ``TimeoutError``),
translated once, at this boundary.

* :class:`HttpsTransport`: DPS's HTTPS device API (device-protocol.md §2), HTTP/1.1 on one
  keep-alive TLS connection (:mod:`provisiond.device._http`: asyncio streams and h11).
* :class:`MockTransport`: answers from a function, for tests (like ``httpx.MockTransport``).
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import logging
import os
import ssl
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote, urlsplit

from .. import __version__
from ..errors import ConfigurationError, ConnectError, RemoteProtocolError, TimeoutError, TransportError
from ..protocol.messages import encode
from ..protocol.registration import Reply, Request, SendPoll, SendRegister, parse_retry_after
from ._http import HttpConnection, HttpResponse
from .security import SecurityProvider

if TYPE_CHECKING:
    import httpx

__all__ = [
    "DEFAULT_API_VERSION",
    "USER_AGENT",
    "HttpsTransport",
    "MockTransport",
    "Transport",
    "TransportKind",
    "client_ssl_context",
]

logger = logging.getLogger(__name__)

#: The api-version the client sends (the C SDK's; provisiond accepts every version the SDKs send).
DEFAULT_API_VERSION = "2021-06-01"
USER_AGENT = f"provisiond-device/{__version__}"
#: Lifetime of the SAS tokens the transport signs (as the Python and Node SDKs: one hour).
DEFAULT_SAS_TTL = 3600


class TransportKind(enum.Enum):
    """The transports :meth:`AsyncProvisioningDeviceClient.create` can build by name."""

    HTTPS = "https"
    MQTT = "mqtt"
    MQTT_WS = "mqtt-ws"
    AMQP = "amqp"
    AMQP_WS = "amqp-ws"


class Transport(ABC):
    """Carries the flow's requests. Subclasses implement :meth:`send` (and :meth:`close` when
    they hold connections)."""

    @abstractmethod
    async def send(self, request: Request) -> Reply:
        """Send one request and return the service's answer, whatever its status.

        :raises TransportError: no answer (cannot connect, TLS refused, timed out, reset).
        """

    async def close(self) -> None:
        """Release connections. The default has none to release."""
        return None

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


Handler = Callable[[Request], Reply | Awaitable[Reply]]


class MockTransport(Transport):
    """Answers each request with ``handler(request)``; the handler may be sync or async and may
    raise a :class:`~provisiond.errors.TransportError` to simulate a network failure."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler

    async def send(self, request: Request) -> Reply:
        reply = self._handler(request)
        if inspect.isawaitable(reply):
            reply = await reply
        return reply


def client_ssl_context(
    *, ca_file: str | os.PathLike[str] | None = None, security: SecurityProvider | None = None
) -> ssl.SSLContext:
    """A TLS client context that trusts ``ca_file`` (else the system's CAs) and presents the
    security provider's client certificate, if it has one. Shared by every transport.

    Without a client certificate the context is built once per CA file (while the file is
    unchanged) and shared by every client in the process: loading a CA store costs more than
    the rest of a registration's client-side work. Do not modify it; pass ``ssl_context`` to a
    transport for a context of your own.

    :raises ConfigurationError: the CA file cannot be read.
    """
    credential = security.tls_client_certificate() if security is not None else None
    if credential is None:
        return _shared_trust_context(ca_file)
    ctx = _trust_context(ca_file)
    credential.load_into(ctx)
    return ctx


def _trust_context(ca_file: str | os.PathLike[str] | None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"Cannot load the CA certificates in {ca_file}: {exc}") from exc


#: Shared trust-only contexts, by (CA file, its modification time and size); a few at most.
_SHARED: dict[tuple[str | None, int, int], ssl.SSLContext] = {}
_SHARED_MAX = 8
_SHARED_LOCK = threading.Lock()


def _shared_trust_context(ca_file: str | os.PathLike[str] | None) -> ssl.SSLContext:
    key: tuple[str | None, int, int] = (None, 0, 0)
    if ca_file is not None:
        path = os.path.abspath(ca_file)
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise ConfigurationError(f"Cannot load the CA certificates in {ca_file}: {exc}") from exc
        key = (path, stat.st_mtime_ns, stat.st_size)
    with _SHARED_LOCK:
        ctx = _SHARED.get(key)
    if ctx is None:
        ctx = _trust_context(ca_file)
        with _SHARED_LOCK:
            if len(_SHARED) >= _SHARED_MAX:
                del _SHARED[next(iter(_SHARED))]
            ctx = _SHARED.setdefault(key, ctx)
    return ctx


def _load_client_certificate(ctx: ssl.SSLContext, security: SecurityProvider | None) -> None:
    credential = security.tls_client_certificate() if security is not None else None
    if credential is not None:
        credential.load_into(ctx)


# --- what every transport's constructor uses (package-internal, not in __all__; the MQTT and AMQP
# transports get them through their base, ._stream.StreamTransport) --------------------------------


def check_options(
    *, id_scope: str, ssl_context: ssl.SSLContext | None, ca_file: str | os.PathLike[str] | None
) -> None:
    """The checks every transport's constructor starts with.

    :raises ValueError: both ``ssl_context`` and ``ca_file``, or a malformed ID scope.
    """
    if ssl_context is not None and ca_file is not None:
        raise ValueError("Give ssl_context or ca_file, not both.")
    if not id_scope or "/" in id_scope:
        raise ValueError(f"{id_scope!r} is not an ID scope.")


def tls_context(
    ssl_context: ssl.SSLContext | None,
    *,
    ca_file: str | os.PathLike[str] | None,
    security: SecurityProvider,
) -> ssl.SSLContext:
    """``ssl_context`` with the security provider's client certificate loaded into it, or, without
    one, a :func:`client_ssl_context` trusting ``ca_file``.

    :raises ConfigurationError: the CA file or the client certificate cannot be loaded.
    """
    if ssl_context is None:
        return client_ssl_context(ca_file=ca_file, security=security)
    _load_client_certificate(ssl_context, security)
    return ssl_context


class _Exchange(Protocol):
    """Sends one HTTP request and reads the whole answer (the network, or an httpx transport)."""

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> HttpResponse: ...

    async def close(self) -> None: ...


class HttpsTransport(Transport):
    """DPS's HTTPS device API (device-protocol.md §2.1, §2.2): HTTP/1.1 on one keep-alive TLS
    connection, which serves the register and the polls while it lives.

    :param host: the global endpoint, ``host`` or ``host:port`` (``https://`` is allowed).
    :param id_scope: the service's ID scope.
    :param security: signs SAS tokens (key attestation) or supplies the TLS client
        certificate (X.509).
    :param ssl_context: the TLS context to use; the security provider's client certificate is
        loaded into it. Give this or ``ca_file``, not both.
    :param ca_file: PEM file of the CAs that may sign the service's certificate (default: the
        system's trust store).
    :param timeout: seconds for each network operation (connect, write, read).
    :param api_version: the ``api-version`` query parameter.
    :param sas_ttl: lifetime in seconds of the SAS tokens it signs.
    :param http_transport: an httpx transport to send through instead of the network (tests,
        an in-process ASGI app, a custom proxy setup); TLS settings are then its business.
    :raises ValueError: a malformed host, or both ``ssl_context`` and ``ca_file``.
    :raises ConfigurationError: the CA file or the client certificate cannot be loaded.
    """

    def __init__(
        self,
        *,
        host: str,
        id_scope: str,
        security: SecurityProvider,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
        api_version: str = DEFAULT_API_VERSION,
        sas_ttl: int = DEFAULT_SAS_TTL,
        http_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        check_options(id_scope=id_scope, ssl_context=ssl_context, ca_file=ca_file)
        if not timeout > 0 or sas_ttl <= 0:
            raise ValueError("timeout and sas_ttl must be positive.")
        self.host = parse_endpoint(host)
        self.id_scope = id_scope
        self.api_version = api_version
        self._security = security
        self._sas_ttl = sas_ttl
        self._headers = [
            ("Accept", "application/json"),
            ("Content-Type", "application/json; charset=utf-8"),
            ("User-Agent", USER_AGENT),
        ]
        own_context = ssl_context is not None or security.tls_client_certificate() is not None
        ssl_context = tls_context(ssl_context, ca_file=ca_file, security=security)
        hostname, port = split_endpoint(self.host, default_port=443)
        self._http: _Exchange
        if http_transport is not None:
            self._http = _HttpxExchange(self.host, timeout, transport=http_transport)
        elif _environment_proxy():
            # HTTPS_PROXY / ALL_PROXY name a proxy: httpx reads them (and NO_PROXY) and speaks
            # to it (CONNECT, proxy authentication), as this transport always did. httpcore sets
            # its ALPN on the context it is given: never the shared one.
            verify = ssl_context if own_context else _trust_context(ca_file)
            self._http = _HttpxExchange(self.host, timeout, verify=verify)
        else:
            authority = self.host.removesuffix(":443")
            self._http = HttpConnection(
                host=hostname, port=port, authority=authority, ssl_context=ssl_context, timeout=timeout
            )

    async def send(self, request: Request) -> Reply:
        prefix = f"/{_segment(self.id_scope)}/registrations/{_segment(request.registration_id)}"
        query = f"?api-version={_segment(self.api_version)}"
        headers = self._authorization(request.registration_id)
        if isinstance(request, SendRegister):
            method, target, body = "PUT", f"{prefix}/register{query}", encode(request.body)
            if request.force:
                target += "&forceRegistration=true"
        elif isinstance(request, SendPoll):
            method, target, body = "GET", f"{prefix}/operations/{_segment(request.operation_id)}{query}", b""
        else:  # pragma: no cover - the Request union is closed
            raise TypeError(f"cannot send {request!r}")
        response = await self._http.request(method, target, headers, body)
        logger.debug("%s %s -> %d", method, target.partition("?")[0], response.status)
        if not 100 <= response.status <= 599:  # HTTP's own parser lets three digits through
            raise RemoteProtocolError(
                f"{self.host} answered with status {response.status}, not an HTTP status."
            )
        return Reply(
            status=response.status,
            body=response.body,
            retry_after=parse_retry_after(response.header(b"retry-after")),
        )

    def _authorization(self, registration_id: str) -> list[tuple[str, str]]:
        resource = f"{self.id_scope}/registrations/{registration_id}"
        token = self._security.sas_token(resource, int(time.time()) + self._sas_ttl)
        return [*self._headers, ("Authorization", token)] if token else self._headers

    async def close(self) -> None:
        await self._http.close()

    def __repr__(self) -> str:
        return f"<HttpsTransport https://{self.host} id_scope={self.id_scope!r}>"


class _HttpxExchange:
    """Requests through httpx: a caller's httpx transport (``HttpsTransport(http_transport=...)``),
    or httpx's own with the proxy the environment names."""

    def __init__(
        self,
        host: str,
        timeout: float,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: ssl.SSLContext | None = None,
    ) -> None:
        import httpx

        self._host = host
        self._client = httpx.AsyncClient(
            base_url=f"https://{host}",
            timeout=timeout,
            follow_redirects=False,
            transport=transport,
            verify=verify if verify is not None else True,
        )

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> HttpResponse:
        with _map_httpx_exceptions(self._host):
            response = await self._client.request(method, target, headers=headers, content=body or None)
            data = await response.aread()
        return HttpResponse(response.status_code, [(k.lower(), v) for k, v in response.headers.raw], data)

    async def close(self) -> None:
        await self._client.aclose()


#: The variables that name a proxy for HTTPS, as httpx's ``trust_env`` reads them.
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _environment_proxy() -> bool:
    """Whether the environment names a proxy for HTTPS (httpx then applies ``NO_PROXY``)."""
    return any(os.environ.get(name) for name in _PROXY_VARIABLES)


@contextlib.contextmanager
def _map_httpx_exceptions(host: str) -> Iterator[None]:
    """Translate httpx's exceptions into ours, keeping the cause (httpx's ``map_httpcore_exceptions``)."""
    import httpx

    try:
        yield
    except httpx.TimeoutException as exc:
        raise TimeoutError(
            f"{host} did not answer in time ({type(exc).__name__}: {exc or 'no details'})"
        ) from exc
    except httpx.ConnectError as exc:
        raise ConnectError(f"Cannot connect to {host}: {exc or 'no details'}") from exc
    except httpx.RequestError as exc:  # network, protocol, proxy and decoding failures
        raise TransportError(
            f"The exchange with {host} failed ({type(exc).__name__}: {exc or 'no details'})"
        ) from exc


def _segment(value: str) -> str:
    return quote(value, safe="")


def parse_endpoint(host: str) -> str:
    """``host[:port]`` from a global endpoint (``https://`` is allowed), validated.

    :raises ValueError: not a ``host[:port]``, or a port out of range.
    """
    text = host.strip()
    for scheme in ("https://", "HTTPS://"):
        text = text.removeprefix(scheme)
    text = text.rstrip("/")
    if not text or "/" in text or "://" in text or any(c.isspace() for c in text):
        raise ValueError(f"{host!r} is not an endpoint host[:port].")
    split_endpoint(text, default_port=443, original=host)
    return text


def split_endpoint(endpoint: str, *, default_port: int, original: str | None = None) -> tuple[str, int]:
    """The host name (IPv6 without brackets) and port of ``host[:port]``; ``default_port``
    when it names none.

    :raises ValueError: not a ``host[:port]``, or a port out of range.
    """
    shown = endpoint if original is None else original
    try:
        parts = urlsplit(f"https://{endpoint}")
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{shown!r} is not an endpoint host[:port]: {exc}") from exc
    if not parts.hostname or parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"{shown!r} is not an endpoint host[:port].")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"{shown!r} has an invalid port.")
    return parts.hostname, port or default_port
