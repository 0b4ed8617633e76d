"""The one TLS front of the service: a server context that lets every client certificate through,
and the glue that hands the presented chain to the application.

Why: DPS authenticates X.509 devices *after* the handshake and answers an unknown or forged
certificate with a JSON 401, not with a TLS alert. Python's ``ssl`` has no verify callback, so
with ``CERT_OPTIONAL`` and no CA loaded OpenSSL rejects every client certificate inside the
handshake. :func:`server_context` therefore installs an always-accept callback on the
``SSL_CTX`` behind the ``ssl.SSLContext`` through ``ctypes`` (see
``shared/reference/libraries.md`` §1). The application must verify the chain itself.

How the hack is kept honest:

* the ``SSL_CTX *`` is read from the first field of CPython's ``PySSLContext`` and checked against
  ``SSL_CTX_get_options`` before it is used, and the libssl found through ``_ssl`` must be the
  version ``ssl`` reports;
* after installing the callback we read it back (``SSL_CTX_get_verify_callback``);
* the first :func:`server_context` call of a process runs an in-memory handshake with a
  self-signed client certificate and checks that the server sees it;
* any failure raises :class:`~provisiond.errors.ConfigurationError` at startup.

Session resumption: a session resumed from a *stateless* ticket remembers only the leaf
certificate, not the intermediates the device sent. :func:`server_context` keeps resumption but
makes it stateful (``OP_NO_TICKET``: TLS 1.3 tickets then name a session in the server's cache,
TLS 1.2 uses session ids), so a resumed connection reports the same chain as the first one.

The chain reaches ASGI apps as ``scope["extensions"]["tls"]`` (see :class:`TlsScopeExtension`),
in the spirit of the ASGI TLS extension but with DER ``bytes`` instead of PEM strings, for both
``http`` and ``websocket`` scopes. Use :func:`uvicorn_config` to get a ``uvicorn.Config`` wired
with the context and the protocol classes below.

uvicorn itself serves plain TCP: every connection goes through the guard of
:mod:`provisiond.service.guard` (admission, the TLS handshake, deadlines), which hands the TLS
transport to the HTTP protocol classes below. They tell the guard where each request stands
(head received, body pending, response sent), and pass it on to WebSocket sessions as
``scope["extensions"]["provisiond.guard"]``.
"""

from __future__ import annotations

import _ssl
import asyncio
import ctypes
import functools
import logging
import os
import ssl
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from . import pki
from .errors import ConfigurationError, DpsCode
from .protocol.messages import error_body
from .service.guard import GUARD_INFO, NO_GUARD, Guard, Listener
from .service.settings import ConnectionLimits
from .storage import utc_now

if TYPE_CHECKING:
    from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope

__all__ = [
    "TlsH11Protocol",
    "TlsHttpToolsProtocol",
    "TlsScopeExtension",
    "TlsWebSocketsProtocol",
    "accept_any_client_certificate",
    "peer_chain",
    "server_context",
    "tls_extension",
    "uvicorn_config",
]

logger = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]

# --- the ctypes verify-callback hack -----------------------------------------------------------

_SSL_VERIFY_PEER = 0x01  # request a certificate; without FAIL_IF_NO_PEER_CERT none is fine too
_SSL_CTRL_SET_SESS_CACHE_SIZE = 42  # SSL_CTX_sess_set_cache_size is a macro over SSL_CTX_ctrl

_VerifyCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


def _accept_any(preverify_ok: int, x509_store_ctx: int | None) -> int:
    """OpenSSL's verify callback: 1 = carry on, whatever OpenSSL's own verdict was."""
    return 1


# OpenSSL keeps only a raw pointer to this: the module-level reference keeps it alive for ever.
_ACCEPT_ANY = _VerifyCallback(_accept_any)
_ACCEPT_ANY_ADDRESS = ctypes.cast(_ACCEPT_ANY, ctypes.c_void_p).value


@functools.cache
def _libssl() -> ctypes.CDLL:
    """libssl as ``_ssl`` links it, with the few functions we call declared."""
    if sys.implementation.name != "cpython":
        raise ConfigurationError(
            f"accepting any client certificate needs CPython's ssl module, not {sys.implementation.name}"
        )
    # dlopen() of the _ssl extension resolves symbols through the very libssl it links;
    # a statically linked _ssl has no __file__, and then the symbols are in the main program.
    path = getattr(_ssl, "__file__", None)
    try:
        lib = ctypes.CDLL(path)
        lib.SSL_CTX_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, _VerifyCallback]
        lib.SSL_CTX_set_verify.restype = None
        lib.SSL_CTX_get_verify_callback.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_verify_callback.restype = ctypes.c_void_p
        lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.OpenSSL_version_num.argtypes = []
        lib.OpenSSL_version_num.restype = ctypes.c_ulong
    except (OSError, AttributeError) as exc:
        raise ConfigurationError(f"cannot reach OpenSSL's SSL_CTX functions through {path}: {exc}") from exc
    if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise ConfigurationError(
            f"the libssl found through {path} ({lib.OpenSSL_version_num():#x}) is not the one the ssl "
            f"module uses ({ssl.OPENSSL_VERSION})"
        )
    return lib


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib: ctypes.CDLL) -> int:
    """The ``SSL_CTX *`` of ``ctx``: the first field after the object header of ``PySSLContext``
    (true for CPython 3.8 to 3.13). Checked against the options CPython reports before use."""
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != int(ctx.options):
        raise ConfigurationError(
            f"cannot locate the SSL_CTX of an ssl.SSLContext on Python {sys.version.split()[0]}; "
            "the accept-any-client-certificate hook does not support this version"
        )
    return pointer


def accept_any_client_certificate(ctx: ssl.SSLContext) -> None:
    """Make the server context ``ctx`` request a client certificate and accept any, or none.

    The handshake then succeeds with a self-signed certificate, a chain to an unknown root, an
    expired certificate or no certificate; :func:`peer_chain` tells the application what was sent.
    Do not assign ``ctx.verify_mode`` afterwards: on CPython 3.13 that installs a NULL callback and
    the hook is gone (3.11 and 3.12 keep it). Contexts from :func:`server_context` refuse it.

    :raises ConfigurationError: the hook cannot be installed on this Python.
    """
    lib = _libssl()
    _SSLCONTEXT_VERIFY_MODE.__set__(ctx, ssl.CERT_OPTIONAL)
    pointer = _ssl_ctx_pointer(ctx, lib)
    lib.SSL_CTX_set_verify(pointer, _SSL_VERIFY_PEER, _ACCEPT_ANY)
    if (
        lib.SSL_CTX_get_verify_callback(pointer) != _ACCEPT_ANY_ADDRESS
        or lib.SSL_CTX_get_verify_mode(pointer) != _SSL_VERIFY_PEER
    ):
        raise ConfigurationError("installing the accept-any-client-certificate callback had no effect")


_SSLCONTEXT_VERIFY_MODE = vars(ssl.SSLContext)["verify_mode"]  # the property ssl.py defines


class _AcceptAnyContext(ssl.SSLContext):
    """The context :func:`server_context` returns: its ``verify_mode`` is read-only, because
    assigning it removes the accept-any callback on CPython 3.13 and devices would then get TLS
    alerts instead of DPS's 401."""

    @property
    def verify_mode(self) -> ssl.VerifyMode:
        return ssl.VerifyMode(_SSLCONTEXT_VERIFY_MODE.__get__(self))

    @verify_mode.setter
    def verify_mode(self, value: int) -> None:
        raise RuntimeError(
            "the verify_mode of a provisiond.tls.server_context() is fixed: changing it would drop "
            "the accept-any-client-certificate callback"
        )


def _build_server_context(
    cert_file: StrPath,
    key_file: StrPath,
    *,
    min_version: ssl.TLSVersion,
    password: str | None,
    session_cache_size: int,
) -> ssl.SSLContext:
    ctx = _AcceptAnyContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = min_version  # the maximum stays at TLS 1.3
    try:
        ctx.load_cert_chain(cert_file, key_file, password)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot load the server certificate {cert_file} with key {key_file}: {exc}"
        ) from exc
    # Stateful resumption: stateless tickets lose the peer's intermediates (see the module docstring).
    # One TLS 1.3 ticket per connection instead of two halves the cache; the cache holds each
    # session's certificates (about 5 KB), so it is bounded.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 1
    accept_any_client_certificate(ctx)
    lib = _libssl()
    lib.SSL_CTX_ctrl(_ssl_ctx_pointer(ctx, lib), _SSL_CTRL_SET_SESS_CACHE_SIZE, session_cache_size, None)
    return ctx


def _pump(client: ssl.SSLObject, server: ssl.SSLObject, wires: tuple[ssl.MemoryBIO, ...]) -> None:
    """Run a handshake between two memory-BIO endpoints."""
    client_in, client_out, server_in, server_out = wires
    done = {id(client): False, id(server): False}
    for _ in range(20):
        for endpoint in (client, server):
            if not done[id(endpoint)]:
                try:
                    endpoint.do_handshake()
                    done[id(endpoint)] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            return
    raise ssl.SSLError("the self-test handshake did not finish")


@functools.cache
def _self_test() -> None:
    """Once per process: a server context made here must let a self-signed client certificate in
    and report it. Catches a hook that installs without error but does nothing."""
    client = pki.make_device_cert("provisiond-tls-self-test-device")
    server = pki.make_server_cert(pki.make_root_ca("provisiond-tls-self-test-ca"), ["localhost"])
    with tempfile.TemporaryDirectory(prefix="provisiond-tls-") as tmp:
        pki.write_issued(client, Path(tmp) / "client")
        pki.write_issued(server, Path(tmp) / "server")
        server_ctx = _build_server_context(
            pki.cert_path(Path(tmp) / "server"),
            pki.key_path(Path(tmp) / "server"),
            min_version=ssl.TLSVersion.TLSv1_2,
            password=None,
            session_cache_size=16,
        )
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.check_hostname = False
        client_ctx.verify_mode = ssl.CERT_NONE
        client_ctx.load_cert_chain(pki.cert_path(Path(tmp) / "client"), pki.key_path(Path(tmp) / "client"))
    wires = (ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO())
    client_end = client_ctx.wrap_bio(wires[0], wires[1], server_hostname="localhost")
    server_end = server_ctx.wrap_bio(wires[2], wires[3], server_side=True)
    try:
        _pump(client_end, server_end, wires)
        seen = peer_chain(server_end)
    except (ssl.SSLError, AttributeError, TypeError) as exc:
        raise ConfigurationError(
            f"the accept-any-client-certificate hook does not work on Python {sys.version.split()[0]}: {exc}"
        ) from exc
    if seen != [pki.certificate_der(client.cert)]:
        raise ConfigurationError("the TLS self-test server did not see the client certificate it was sent")
    logger.debug("TLS accept-any-client-certificate self-test passed")


def server_context(
    cert_file: StrPath,
    key_file: StrPath,
    *,
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    password: str | None = None,
    session_cache_size: int = 4096,
) -> ssl.SSLContext:
    """A TLS server context that requests a client certificate and lets any (or none) through.

    ``cert_file`` holds the server certificate followed by its chain, ``key_file`` its key. TLS 1.2
    and 1.3 are both offered by default (the official Python device SDK forces TLS 1.2).
    Sessions can be resumed (stateful, up to ``session_cache_size`` per process).

    :raises ConfigurationError: the files cannot be loaded, or the accept-any hook does not work here.
    """
    _self_test()
    return _build_server_context(
        cert_file, key_file, min_version=min_version, password=password, session_cache_size=session_cache_size
    )


# --- what the peer presented -------------------------------------------------------------------


def peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """The DER certificates the peer presented, its own first, then what it sent after it;
    ``[]`` when it sent none. Nothing here is verified."""
    leaf = ssl_object.getpeercert(binary_form=True)
    if leaf is None:  # also dodges 3.13.0's get_unverified_chain() crash without a peer certificate
        return []
    if sys.version_info >= (3, 13):
        chain = list(ssl_object.get_unverified_chain())
    else:
        # The same call, before it was public: a list of _ssl.Certificate, or None.
        raw = ssl_object._sslobj.get_unverified_chain()  # type: ignore[union-attr]  # private until 3.13
        chain = [cert.public_bytes(_ssl.ENCODING_DER) for cert in raw or ()]
    if not chain or chain[0] != leaf:
        # OpenSSL leaves the peer's own certificate out on the server side (CPython adds it back),
        # and a session resumed from a stateless ticket has no chain at all.
        chain.insert(0, leaf)
    return chain


_TLS_VERSIONS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class TlsScopeExtension(TypedDict):
    """``scope["extensions"]["tls"]`` as our protocol classes fill it.

    ``client_cert_chain``: the DER certificates the client presented, leaf first, ``[]`` for none.
    (The ASGI TLS extension has PEM strings here; DER bytes spare every request a conversion.)
    ``tls_version``: as in the ASGI extension, e.g. ``0x0304`` for TLS 1.3.
    ``cipher``: the OpenSSL cipher name, e.g. ``TLS_AES_256_GCM_SHA384``.
    ``session_reused``: the connection resumed an earlier session.
    """

    client_cert_chain: list[bytes]
    tls_version: int | None
    cipher: str | None
    session_reused: bool


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> TlsScopeExtension:
    """What a finished handshake on ``ssl_object`` tells the application."""
    cipher = ssl_object.cipher()
    version = ssl_object.version()
    return {
        "client_cert_chain": peer_chain(ssl_object),
        "tls_version": _TLS_VERSIONS.get(version) if version else None,
        "cipher": cipher[0] if cipher else None,
        "session_reused": bool(ssl_object.session_reused),
    }


# --- uvicorn -----------------------------------------------------------------------------------


class _TlsApp:
    """Wraps a connection's ASGI app to add the connection's TLS facts (and its guard) to each scope."""

    __slots__ = ("_app", "_guard", "_tls")

    def __init__(
        self,
        app: Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]],
        tls: TlsScopeExtension | None,
        guard: Guard,
    ) -> None:
        self._app = app
        self._tls = tls
        self._guard = guard

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] in ("http", "websocket"):
            extensions = cast("dict[str, Any]", scope.setdefault("extensions", {}))
            if self._tls is not None:
                # A fresh dict per request: an app that edits its scope cannot touch the next request's.
                tls: TlsScopeExtension = {
                    **self._tls,
                    "client_cert_chain": list(self._tls["client_cert_chain"]),
                }
                extensions["tls"] = tls
            extensions[GUARD_INFO] = self._guard
        await self._app(scope, receive, send)


class _TlsScopeMixin(asyncio.Protocol):
    """Reads the TLS facts once per connection and hands them to every request on it.

    uvicorn's HTTP and WebSocket protocols call ``self.app(scope, ...)`` per request (the scope is
    built in different places in each), so wrapping ``self.app`` when the connection is made
    covers all of them, including the WebSocket protocol uvicorn switches to on an upgrade (it
    gets the same TLS transport through its own ``connection_made``).
    """

    app: Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]
    guard: Guard = NO_GUARD

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.guard = transport.get_extra_info(GUARD_INFO) or NO_GUARD
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            tls = tls_extension(ssl_object)
            logger.debug("TLS connection: %d client certificate(s)", len(tls["client_cert_chain"]))
            self.app = _TlsApp(self.app, tls, self.guard)
        elif self.guard is not NO_GUARD:  # the trusted front's plain listener: the guard only
            self.app = _TlsApp(self.app, None, self.guard)


#: The most a request's head (its request line and headers) may take on the HTTPS port. httptools
#: keeps a head whole until it is complete and uvicorn bounds it only in time, so without this a
#: peer could make the server hold hundreds of MB for ``--header-timeout``. 64 KiB is four times
#: h11's default and leaves room for a trusted front's client-certificate headers.
MAX_HEAD_BYTES = 64 * 1024
#: The same on the trusted front's plain listener (``serve --front-port``), whose requests carry
#: the client's certificates in two headers: up to ``front.MAX_CHAIN_BYTES`` (100 KiB) of DER,
#: as base64, which the front refuses itself with DPS's 400 when there is more.
MAX_FRONT_HEAD_BYTES = MAX_HEAD_BYTES + 2 * (100 * 1024 * 4 // 3 + 4)


class TlsHttpToolsProtocol(_TlsScopeMixin, HttpToolsProtocol):
    """uvicorn's httptools HTTP/1.1 protocol with ``scope["extensions"]["tls"]``, telling its guard
    where each request stands (from httptools' callbacks), and refusing a request head over
    :data:`MAX_HEAD_BYTES` (431, DPS's error body)."""

    _in_message = False
    _in_head = True  # waiting for a request's head (the first, or the next on a kept-alive connection)
    _head_bytes = 0  # received while _in_head
    _head_limit = MAX_HEAD_BYTES

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if transport.get_extra_info("ssl_object") is None:  # the trusted front's listener
            self._head_limit = MAX_FRONT_HEAD_BYTES

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self._head_limit and not self.transport.is_closing():
            self._refuse_head()

    def _refuse_head(self) -> None:
        self._refuse(DpsCode.HEAD_TOO_LARGE, b"431 Request Header Fields Too Large", limit=self._head_limit)

    def send_400_response(self, msg: str) -> None:
        """What httptools could not parse (a bad Content-Length, a chunk size, an HTTP/2 preface,
        a NUL in the path...): DPS's body and a log line with the peer, instead of uvicorn's
        plain-text answer."""
        self._refuse(DpsCode.BAD_REQUEST, b"400 Bad Request", detail=msg.rstrip("."))

    def _refuse(self, code: DpsCode, status_line: bytes, **fields: object) -> None:
        """Answer ``code`` with DPS's error body before any handler runs, log it, close."""
        message = code.message(**fields)
        tracking_id = str(uuid.uuid4())
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "(unknown peer)"
        logger.info(
            "%s: request -> %d %d: %s [trackingId=%s]", peer, code.http_status, code, message, tracking_id
        )
        body = error_body(code, tracking_id, message, utc_now())
        self.transport.write(
            b"HTTP/1.1 %s\r\ncontent-type: application/json; charset=utf-8\r\n"
            b"x-ms-error-code: %d\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status_line, int(code), len(body), body)
        )
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = True

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._in_head, self._head_bytes = False, 0
        self.guard.head_received()
        self.guard.receiving()  # the body, if any (on_message_complete follows at once if none)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_message = False
        self._in_head = True
        self._between_requests()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._between_requests()

    def _between_requests(self) -> None:
        if self._in_message:
            return  # an early response: the rest of the body is still due
        if self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
            self.guard.busy()
        else:
            self.guard.idle()


class TlsH11Protocol(_TlsScopeMixin, H11Protocol):
    """uvicorn's h11 HTTP/1.1 protocol with ``scope["extensions"]["tls"]``, telling its guard
    where each request stands (from h11's states)."""

    def handle_events(self) -> None:
        super().handle_events()
        self._tell_guard()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._tell_guard()

    def _tell_guard(self) -> None:
        theirs, ours = self.conn.their_state, self.conn.our_state
        if theirs is not h11.IDLE:
            self.guard.head_received()
        if theirs is h11.SEND_BODY:
            self.guard.receiving()
        elif theirs in (h11.IDLE, h11.DONE) and ours in (h11.IDLE, h11.DONE):
            self.guard.idle()
        else:
            self.guard.busy()


class TlsWebSocketsProtocol(_TlsScopeMixin, WebSocketsSansIOProtocol):
    """uvicorn's (sans-io) websockets protocol with ``scope["extensions"]["tls"]``."""


@dataclass(frozen=True, slots=True)
class _ListenerSpec:
    cert_file: str
    key_file: str
    min_version: ssl.TLSVersion
    password: str | None
    limits: ConnectionLimits
    protocol: type[asyncio.Protocol]


class _HttpsFront:
    """What uvicorn takes for its HTTP protocol class: called per accepted TCP connection, it
    returns the guard (:class:`~provisiond.service.guard.GuardedConnection`) that runs the TLS
    handshake and then uvicorn's HTTP protocol. Picklable (``workers > 1`` pickles the config):
    each process builds its own listener (TLS context, admission) when it gets the object."""

    def __init__(self, spec: _ListenerSpec) -> None:
        self._spec = spec
        self._listener = self._build()  # here: a bad certificate fails at start, not at a connection

    def _build(self) -> Listener:
        spec = self._spec
        context = server_context(
            spec.cert_file, spec.key_file, min_version=spec.min_version, password=spec.password
        )
        return Listener("HTTPS", context, spec.limits, first_request="request head")

    def __getstate__(self) -> _ListenerSpec:
        return self._spec

    def __setstate__(self, spec: _ListenerSpec) -> None:
        self._spec = spec
        self._listener = self._build()

    def __call__(
        self,
        config: uvicorn.Config,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> asyncio.Protocol:
        protocol = self._spec.protocol

        def make() -> asyncio.Protocol:
            return protocol(config=config, server_state=server_state, app_state=app_state, _loop=_loop)  # type: ignore[call-arg]

        return self._listener.protocol_factory(make)()


_HTTP_PROTOCOLS: dict[str, type[asyncio.Protocol]] = {
    "httptools": TlsHttpToolsProtocol,
    "h11": TlsH11Protocol,
}


def uvicorn_config(
    app: Any,
    *,
    host: str,
    port: int,
    cert_file: StrPath,
    key_file: StrPath,
    key_password: str | None = None,
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    http: Literal["httptools", "h11"] = "httptools",
    limits: ConnectionLimits | None = None,
    **kwargs: Any,
) -> uvicorn.Config:
    """A ``uvicorn.Config`` serving ``app`` over TLS with :func:`server_context` and the protocol
    classes that put ``scope["extensions"]["tls"]`` into HTTP and WebSocket scopes, behind the
    guard of :mod:`provisiond.service.guard` with ``limits`` (default: :class:`ConnectionLimits`).

    ``kwargs`` go to ``uvicorn.Config`` unchanged (``log_level``, ``workers``, ``lifespan``, ...);
    ``http``, ``ws``, ``timeout_keep_alive`` and the ``ssl_*`` options are ours.

    :raises ConfigurationError: the server certificate or key cannot be loaded.
    """
    limits = limits or ConnectionLimits()
    front = _HttpsFront(
        _ListenerSpec(
            os.fspath(cert_file),
            os.fspath(key_file),
            min_version,
            key_password,
            limits,
            _HTTP_PROTOCOLS[http],
        )
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=cast("type[asyncio.Protocol]", front),
        ws=TlsWebSocketsProtocol,
        # The guard closes idle connections (and says so); uvicorn's own timer is a backstop.
        timeout_keep_alive=int(limits.keep_alive_timeout) + 2,
        # Devices connect here themselves: no X-Forwarded-For is theirs to set (uvicorn's default
        # honours it from 127.0.0.1 and ::1). A front's listener is service/front.py's.
        proxy_headers=False,
        **kwargs,
    )
