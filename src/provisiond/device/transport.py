"""Transports: the seam between the sans-io registration flow and the network.

A :class:`Transport` carries one request of the flow (:class:`~provisiond.protocol.registration.SendRegister`
or :class:`~provisiond.protocol.registration.SendPoll`) and returns what came back as a
:class:`~provisiond.protocol.registration.Reply`. It makes no decisions: retries, polling and
error interpretation live in :mod:`provisiond.protocol.registration`. Failures to talk at all
are raised as :class:`~provisiond.errors.TransportError` (``ConnectError``, ``TimeoutError``),
translated once, at this boundary.

* :class:`HttpsTransport`: DPS's HTTPS device API on httpx (device-protocol.md §2).
* :class:`MockTransport`: answers from a function, for tests (like ``httpx.MockTransport``).
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import logging
import os
import ssl
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from urllib.parse import quote

import httpx

from .. import __version__
from ..errors import ConfigurationError, ConnectError, TimeoutError, TransportError
from ..protocol.messages import encode
from ..protocol.registration import Reply, Request, SendPoll, SendRegister, parse_retry_after
from .security import SecurityProvider

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

    :raises ConfigurationError: the CA file cannot be read.
    """
    try:
        ctx = ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"Cannot load the CA certificates in {ca_file}: {exc}") from exc
    _load_client_certificate(ctx, security)
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


@contextlib.contextmanager
def _map_httpx_exceptions(host: str) -> Iterator[None]:
    """Translate httpx's exceptions into ours, keeping the cause (httpx's ``map_httpcore_exceptions``)."""
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


class HttpsTransport(Transport):
    """DPS's HTTPS device API (device-protocol.md §2.1, §2.2) on an ``httpx.AsyncClient``.

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
        ssl_context = tls_context(ssl_context, ca_file=ca_file, security=security)
        self._client = httpx.AsyncClient(
            base_url=f"https://{self.host}",
            verify=ssl_context,
            timeout=timeout,
            follow_redirects=False,
            transport=http_transport,
            headers={
                "Accept": "application/json",
                "Content-Type": "application/json; charset=utf-8",
                "User-Agent": USER_AGENT,
            },
        )

    async def send(self, request: Request) -> Reply:
        prefix = f"/{_segment(self.id_scope)}/registrations/{_segment(request.registration_id)}"
        params = {"api-version": self.api_version}
        headers = self._authorization(request.registration_id)
        with _map_httpx_exceptions(self.host):
            if isinstance(request, SendRegister):
                if request.force:
                    params["forceRegistration"] = "true"
                response = await self._client.put(
                    f"{prefix}/register", params=params, headers=headers, content=encode(request.body)
                )
            elif isinstance(request, SendPoll):
                response = await self._client.get(
                    f"{prefix}/operations/{_segment(request.operation_id)}", params=params, headers=headers
                )
            else:  # pragma: no cover - the Request union is closed
                raise TypeError(f"cannot send {request!r}")
            body = await response.aread()
        logger.debug("%s %s -> %d", response.request.method, response.request.url.path, response.status_code)
        return Reply(
            status=response.status_code,
            body=body,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )

    def _authorization(self, registration_id: str) -> dict[str, str]:
        resource = f"{self.id_scope}/registrations/{registration_id}"
        token = self._security.sas_token(resource, int(time.time()) + self._sas_ttl)
        return {"Authorization": token} if token else {}

    async def close(self) -> None:
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"<HttpsTransport https://{self.host} id_scope={self.id_scope!r}>"


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
    try:
        port = httpx.URL(f"https://{text}").port
    except httpx.InvalidURL as exc:
        raise ValueError(f"{host!r} is not an endpoint host[:port]: {exc}") from exc
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"{host!r} has an invalid port.")
    return text
