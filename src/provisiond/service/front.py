"""The trusted front's listener: plain HTTP for a TLS-terminating proxy (HAProxy) that hands on
the client certificate chain the device presented, in request headers (docs/tls-front.md).

Off unless ``serve --front-port`` is given, and then only with ``--trusted-front``:

* **who may connect**: the listener's guard (:mod:`provisiond.service.guard`) closes every
  connection whose source address is not in the trusted list at accept, with a log line, before
  a byte is read. Nothing else can reach the headers below;
* **the client certificate**: the headers are the only source of it on this listener.
  :data:`CERT_HEADER` holds the leaf (HAProxy ``ssl_c_der``), :data:`CHAIN_HEADER` the
  certificates the client sent after it (``ssl_c_chain_der``), both base64 of DER. They become
  ``scope["extensions"]["tls"]["client_cert_chain"]`` (DER, leaf first), exactly what
  :mod:`provisiond.tls` gives the application on provisiond's own TLS. Malformed values (not
  strict base64, not whole DER SEQUENCEs, a chain without a leaf, a header given twice, more
  certificates than the attestation takes or more bytes than OpenSSL's default certificate list
  bound) are answered 400 with DPS's error body, and logged;
* **the client's address**: the rightmost ``X-Forwarded-For`` entry, the one the trusted front
  appended (one hop, as nginx's ``real_ip`` with one trusted proxy; not uvicorn's walk, which
  would let a device on a trusted address name any address). Without the header, the front's
  own address. It is what logs, the per-address rate limits and the refused-attestation limit see;
* **the scheme**: ``https`` (``wss`` for WebSockets): the device spoke TLS to the front.

The same ASGI app, the same HTTP protocol classes and the same guard deadlines as the HTTPS
listener serve it; only the per-address connection cap is off (every connection comes from the
front's address).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from starlette.requests import Request

from ..attestation.x509 import MAX_CHAIN
from ..errors import RequestError
from .guard import Listener
from .http import error_answer
from .settings import Settings

__all__ = [
    "CERT_HEADER",
    "CHAIN_HEADER",
    "MAX_CHAIN_BYTES",
    "FrontApp",
    "FrontHeaderError",
    "TrustedFronts",
    "chain_from_headers",
    "running_front",
]

log = logging.getLogger("provisiond.front")

#: The leaf the client presented: base64 of its DER (HAProxy: ``%[ssl_c_der,base64]``).
CERT_HEADER = b"x-provisiond-client-cert"
#: The certificates the client sent after its leaf: base64 of their DER, concatenated
#: (HAProxy: ``%[ssl_c_chain_der,base64]``).
CHAIN_HEADER = b"x-provisiond-client-chain"
#: The decoded certificates together, at most: OpenSSL's default bound on a peer's certificate
#: list (``SSL_CTX_set_max_cert_list``, 100 KiB), which provisiond's own TLS applies.
MAX_CHAIN_BYTES = 100 * 1024
_MAX_ENCODED = (MAX_CHAIN_BYTES + 2) // 3 * 4

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class FrontHeaderError(RequestError):
    """A header only the trusted front sets is malformed: 400, DPS's body."""


class TrustedFronts:
    """The addresses (or networks) ``--trusted-front`` names; a source address is trusted when one
    of them holds it (an IPv4-mapped IPv6 address counts as its IPv4 address).

    :raises ValueError: an entry is not an address or a network, or is every address (``/0``).
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)
        if not self.networks:
            raise ValueError("no trusted front address")
        for network in self.networks:
            if network.prefixlen == 0:
                raise ValueError(f"{network} trusts every address: name the front's addresses")
        self._seen: dict[str, bool] = {}

    def __call__(self, address: str) -> bool:
        known = self._seen.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return False
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            known = any(ip in network for network in self.networks)
            if len(self._seen) < 1024:
                self._seen[address] = known
        return known

    def __str__(self) -> str:
        return ",".join(map(str, self.networks))


def _decode(name: bytes, value: bytes) -> bytes:
    if len(value) > _MAX_ENCODED:
        raise FrontHeaderError(
            f"The {name.decode()} header is longer than {MAX_CHAIN_BYTES} bytes of DER allow."
        )
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise FrontHeaderError(f"The {name.decode()} header is not base64: {exc}.") from None


def split_der(name: bytes, blob: bytes) -> list[bytes]:
    """Concatenated DER certificates (each a definite-length ASN.1 SEQUENCE) as a list.

    :raises FrontHeaderError: ``blob`` is not a run of whole DER SEQUENCEs.
    """
    certs: list[bytes] = []
    at, size = 0, len(blob)
    while at < size:
        if size - at < 2 or blob[at] != 0x30:
            raise FrontHeaderError(f"The {name.decode()} header is not DER certificates (byte {at}).")
        first = blob[at + 1]
        if first < 0x80:
            length, head = first, 2
        else:
            count = first & 0x7F
            if not 1 <= count <= 3 or at + 2 + count > size or blob[at + 2] == 0:
                raise FrontHeaderError(f"The {name.decode()} header has a bad DER length (byte {at}).")
            length, head = int.from_bytes(blob[at + 2 : at + 2 + count], "big"), 2 + count
        end = at + head + length
        if end > size:
            raise FrontHeaderError(f"The {name.decode()} header ends inside a certificate (byte {at}).")
        certs.append(blob[at:end])
        at = end
    return certs


def chain_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[list[bytes], str | None]:
    """What the trusted front said about the client: its certificate chain (DER, leaf first, ``[]``
    for none) and the rightmost ``X-Forwarded-For`` address (``None`` without one).

    :raises FrontHeaderError: a malformed value (see the module docstring).
    """
    leaf = chain = None
    forwarded: list[bytes] = []
    for name, value in headers:
        if name == CERT_HEADER or name == CHAIN_HEADER:
            if (leaf if name == CERT_HEADER else chain) is not None:
                raise FrontHeaderError(f"The {name.decode()} header is given more than once.")
            if name == CERT_HEADER:
                leaf = value.strip()
            else:
                chain = value.strip()
        elif name == b"x-forwarded-for":
            forwarded.append(value)
    certs: list[bytes] = []
    if leaf:
        certs = split_der(CERT_HEADER, _decode(CERT_HEADER, leaf))
        if len(certs) != 1:
            raise FrontHeaderError(
                f"The {CERT_HEADER.decode()} header holds {len(certs)} certificates, not 1."
            )
        if chain:
            rest = split_der(CHAIN_HEADER, _decode(CHAIN_HEADER, chain))
            certs += rest[1:] if rest and rest[0] == certs[0] else rest  # a front that includes the leaf
    elif chain:
        raise FrontHeaderError(f"The {CHAIN_HEADER.decode()} header came without {CERT_HEADER.decode()}.")
    if len(certs) > MAX_CHAIN:
        raise FrontHeaderError(f"The client presented {len(certs)} certificates; at most {MAX_CHAIN}.")
    if sum(map(len, certs)) > MAX_CHAIN_BYTES:
        raise FrontHeaderError(f"The client's certificates exceed {MAX_CHAIN_BYTES} bytes.")
    client = None
    if forwarded:
        last = forwarded[-1].rsplit(b",", 1)[-1].strip().decode("latin-1")
        try:
            client = str(ipaddress.ip_address(last))
        except ValueError:
            raise FrontHeaderError(
                f"The last X-Forwarded-For entry {last[:64]!r} is not an address."
            ) from None
    return certs, client


class FrontApp:
    """The ASGI app of the front's listener: ``app`` with the TLS facts and the client's address
    taken from the trusted front's headers (see the module docstring)."""

    def __init__(self, app: App) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            try:
                chain, client = chain_from_headers(scope["headers"])
            except FrontHeaderError as exc:
                await self._refuse(scope, receive, send, exc)
                return
            scope.setdefault("extensions", {})["tls"] = {
                "client_cert_chain": chain,
                "tls_version": None,
                "cipher": None,
                "session_reused": False,
            }
            if client is not None:
                scope["client"] = (client, 0)
            scope["scheme"] = "https" if kind == "http" else "wss"
        await self._app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, exc: FrontHeaderError) -> None:
        front = scope.get("client")
        log.warning(
            "the trusted front %s sent a malformed header: %s", front[0] if front else "?", exc.message
        )
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await error_answer(Request(scope, receive), exc)(scope, receive, send)


def _bound_socket(settings: Settings) -> socket.socket:
    host, port = settings.front_bind, settings.front_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if settings.workers > 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.asynccontextmanager
async def running_front(settings: Settings, app: App) -> AsyncIterator[None]:
    """Serve ``app`` on the trusted front's listener of this worker while inside (nothing when
    ``settings.front_port`` is 0).

    :raises ConfigurationError: the port cannot be bound, or the trusted list is empty.
    """
    if not settings.front_port:
        yield
        return
    import uvicorn
    from uvicorn.server import ServerState

    from ..errors import ConfigurationError
    from ..tls import TlsHttpToolsProtocol, TlsWebSocketsProtocol

    try:
        trusted = TrustedFronts(settings.trusted_fronts)
    except ValueError as exc:
        raise ConfigurationError(f"--trusted-front: {exc}") from exc
    limits = dataclasses.replace(settings.connections, max_connections_per_address=0)
    config = uvicorn.Config(
        FrontApp(app),
        http="httptools",
        ws=TlsWebSocketsProtocol,
        lifespan="off",
        proxy_headers=False,  # FrontApp reads X-Forwarded-For, from the trusted front only
        log_config=None,
        access_log=False,
        timeout_keep_alive=int(limits.keep_alive_timeout) + 2,
    )
    config.load()
    state = ServerState()
    state.default_headers = list(config.encoded_headers)
    listener = Listener("front", None, limits, first_request="request head", allowed=trusted)
    loop = asyncio.get_running_loop()

    def make() -> asyncio.Protocol:
        return TlsHttpToolsProtocol(config=config, server_state=state, app_state={}, _loop=loop)

    try:
        sock = _bound_socket(settings)
    except OSError as exc:
        raise ConfigurationError(
            f"Cannot serve the trusted front's listener on {settings.front_bind}:{settings.front_port}: "
            f"{exc.strerror or exc}"
        ) from exc
    server = await loop.create_server(listener.protocol_factory(make), sock=sock)
    log.info(
        "serving plain HTTP for the trusted front %s on %s:%d",
        trusted,
        settings.front_bind,
        settings.front_port,
    )
    try:
        yield
    finally:
        server.close()
        for connection in list(state.connections):
            connection.shutdown()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 3)
        for task in list(state.tasks):
            task.cancel()
