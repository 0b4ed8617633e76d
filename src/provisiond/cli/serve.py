"""``provisiond serve``: run the service."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import ConfigurationError
from ..service import admission
from ..service.settings import ConnectionLimits, Settings
from ..storage import PoolSize

__all__ = ["connection_info", "serve"]

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("provisiond.serve")

#: Seconds the worker processes of ``--workers N`` get to start before serve stops waiting to
#: announce them (they keep starting; only the banner is not printed).
_WORKER_START_TIMEOUT = 120.0


def connection_info(
    settings: Settings,
    *,
    id_scope: str,
    owner_key: str,
    ca_file: Path | None,
    hubs: list[dict[str, str | None]] | None = None,
) -> dict[str, Any]:
    """What ``DIR/connection.json`` holds. These keys are a stable interface: automation reads them.

    The endpoint (``globalEndpoint`` and the connection string's ``HostName``) is ``host`` on
    the standard HTTPS port 443, as Azure writes it (the Node.js and C SDKs take the whole
    HostName as a host name), and ``host:port`` on any other port. ``hubs``: each built-in
    hub's ``hostName`` and ``connectionString`` (its ``iothubowner`` policy's, named the same
    way), the first built-in hub first: ``builtinHub`` and ``hubConnectionString`` are its.
    """
    from ..service.app import OWNER_POLICY

    endpoint = settings.host if settings.https_port == 443 else f"{settings.host}:{settings.https_port}"
    hubs = hubs or []
    return {
        "idScope": id_scope,
        "host": settings.host,
        "httpsPort": settings.https_port,
        "mqttPort": settings.mqtt_port,
        "amqpPort": settings.amqp_port,
        "globalEndpoint": endpoint,
        "serviceConnectionString": (
            f"HostName={endpoint};SharedAccessKeyName={OWNER_POLICY};SharedAccessKey={owner_key}"
        ),
        "caCertificate": str(ca_file) if ca_file else None,
        "builtinHub": settings.first_builtin_hub,
        "hubConnectionString": hubs[0]["connectionString"] if hubs else None,
        "builtinHubs": hubs,
        "database": _redacted(settings.db_url),
    }


def _redacted(url: str) -> str:
    """The database URL without its password."""
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not sep or not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{location}"


def _write_connection_json(data_dir: Path, info: dict[str, Any]) -> Path:
    path = data_dir / "connection.json"
    tmp = path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def _program() -> str:
    """How the person who started us runs provisiond (``.venv/bin/provisiond`` after ``make run``)."""
    argv0 = Path(sys.argv[0])
    if argv0.name != "provisiond":
        return "provisiond"
    on_path = shutil.which("provisiond")
    return "provisiond" if on_path and Path(on_path).resolve() == argv0.resolve() else str(argv0)


def _open_files(settings: Settings) -> str:
    """The banner's line about the open-file limit and the connection caps it gave."""
    limit = admission.open_file_limit()
    if limit.raised:
        how = f"raised from {limit.before:,} to the hard limit"
    elif limit.soft >= limit.hard:
        how = "the hard limit"
    else:
        how = f"could not raise it to the hard limit {limit.hard:,}"
    caps = settings.connections
    per_listener = f"{caps.max_connections:,}" if caps.max_connections else "no cap"
    per_address = f"{caps.max_connections_per_address:,}" if caps.max_connections_per_address else "no cap"
    return (
        f"{limit.soft:,} ({how}); connections per listener: {per_listener}, "
        f"per address: {per_address}, {caps.fd_reserve} kept free"
    )


def _banner(info: dict[str, Any], path: Path, settings: Settings) -> str:
    scope, endpoint, ca = info["idScope"], info["globalEndpoint"], info["caCertificate"]
    d = path.parent
    prog = _program()
    hub = info["builtinHub"]
    mqtt = f"mqtts://{hub}:{settings.mqtt_port}, " if settings.mqtt_port else ""
    hub_endpoint = hub if settings.https_port == 443 else f"{hub}:{settings.https_port}"
    return f"""
provisiond is running.
  Device endpoint (HTTPS)  https://{endpoint}   ID scope: {scope}
  Service API              https://{endpoint}   (Azure DPS service API 2021-10-01 + /admin)
  Trusted CA for clients   {ca}
  Built-in IoT hub         {hub}   (devices: {mqtt}wss://{hub_endpoint}/$iothub/websocket;
                           service API: https://{hub_endpoint}, hubConnectionString in connection.json)
  Connection details       {path}
  Open files               {_open_files(settings)}{_front_line(settings)}

Provision a first device (in another terminal):
  {prog} enrollment create my-first-device --data-dir {d}
  {prog} device register --data-dir {d} --registration-id my-first-device --symmetric-key <its primary key>
  {prog} registration show my-first-device --data-dir {d}
"""


def _front_line(settings: Settings) -> str:
    """The banner's line for ``--front-port`` (none when it is off)."""
    if not settings.front_port:
        return ""
    trusted = ",".join(settings.trusted_fronts)
    return (
        f"\n  Trusted front            http://{settings.front_bind}:{settings.front_port} "
        f"(plain HTTP, from {trusted} only; docs/tls-front.md)"
    )


@dataclasses.dataclass(frozen=True)
class _Prepared:
    settings: Settings  # with the first built-in hub and the server certificate resolved
    info: dict[str, Any]
    path: Path
    backend: str


async def _prepare(settings: Settings) -> _Prepared:
    """First-start initialization (ID scope, owner policy, built-in hubs and their policies),
    the development PKI unless the operator brought a certificate (its server certificate
    covers ``--host`` and every built-in hub's host name), and connection.json."""
    from ..hub.addressing import builtin_hub_names, first_builtin_hub, hub_connections
    from ..service.app import initialize, owner_key
    from ..storage import open_store

    store = open_store(settings.db_url, pool=settings.db_pool)
    await store.open()
    try:
        service_settings = await initialize(store, settings)
        assert service_settings.id_scope is not None
        first = await first_builtin_hub(store, explicit=settings.builtin_hub, host=settings.host)
        hubs = await builtin_hub_names(store, first)
        settings = dataclasses.replace(settings, builtin_hub=first)
        ca_file: Path | None = settings.server_cert
        if settings.server_cert is None:
            from ..pki import ensure_dev_pki

            files = ensure_dev_pki(settings.data_dir, [settings.host, *hubs])
            settings = dataclasses.replace(settings, server_cert=files.cert_file, server_key=files.key_file)
            ca_file = files.ca_file
        # The names a service token's sr may give: --host and what the certificate covers.
        from ..pki import certificate_names

        assert settings.server_cert is not None
        names = (*settings.extra_host_names, *certificate_names(settings.server_cert))
        settings = dataclasses.replace(settings, extra_host_names=tuple(dict.fromkeys(names)))
        info = connection_info(
            settings,
            id_scope=service_settings.id_scope,
            owner_key=await owner_key(store),
            ca_file=ca_file,
            hubs=await hub_connections(store, hubs, settings.https_port),
        )
        return _Prepared(settings, info, _write_connection_json(settings.data_dir, info), store.backend)
    finally:
        await store.close()


# --- the ports ---------------------------------------------------------------------------------


def _bind_probe(bind: str, port: int) -> list[socket.socket]:
    """Bind ``port`` on every address ``bind`` names, as the listeners will (SO_REUSEADDR, IPv6
    only on IPv6 sockets); the caller closes the sockets.

    :raises OSError: the port cannot be bound (in use, not permitted, no such address).
    """
    held: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
            bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            sock = socket.socket(family, kind, proto)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in held:
            sock.close()
        raise
    return held


def _check_ports(bind: str, *, https_port: int, mqtt_port: int, amqp_port: int) -> None:
    """Fail before anything starts when a port cannot be listened on: one line naming the port
    and the flag that changes it (the listeners bind for real later; this catches the usual
    case, a port another program or another provisiond holds, without a traceback).

    :raises ConfigurationError: a port is given twice, in use, or not permitted.
    """
    candidates = [
        (https_port, "--https-port", "HTTPS"),
        (mqtt_port, "--mqtt-port", "MQTT"),
        (amqp_port, "--amqp-port", "AMQP"),
    ]
    ports = [entry for entry in candidates if entry[0]]  # MQTT and AMQP are off at 0
    seen: dict[int, str] = {}
    for port, flag, _ in ports:
        if port in seen:
            raise ConfigurationError(f"{seen[port]} and {flag} are both {port}: give each its own port.")
        seen[port] = flag
    held: list[socket.socket] = []
    try:
        for port, flag, what in ports:
            off = "" if flag == "--https-port" else f" (0 turns {what} over TLS off)"
            try:
                held += _bind_probe(bind, port)
            except socket.gaierror as exc:
                raise ConfigurationError(f"Cannot listen on --bind {bind}: {exc.strerror}.") from None
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    why = "is in use (by another program, or another provisiond)"
                elif exc.errno == errno.EACCES:
                    why = (
                        "needs privileges to bind (below 1024: root, or the cap_net_bind_service capability)"
                    )
                else:
                    why = f"cannot be bound: {exc.strerror or exc}"
                raise ConfigurationError(
                    f"{what} port {port} on {bind} {why}; choose another with {flag}{off}."
                ) from None
    finally:
        for sock in held:
            sock.close()


def _front_options(port: int, bind: str, trusted: str | None, others: tuple[int, ...]) -> tuple[str, ...]:
    """``--front-port``'s companions checked: the trusted list (required, addresses or networks)
    and a port of its own that can be bound on ``--front-bind``.

    :raises click.UsageError: a missing or malformed --trusted-front.
    :raises ConfigurationError: the port is another listener's or cannot be bound.
    """
    from ..service.front import TrustedFronts

    if not port:
        return ()
    entries = tuple(e.strip() for e in (trusted or "").split(",") if e.strip())
    if not entries:
        raise click.UsageError("--front-port needs --trusted-front: the addresses of the TLS front.")
    try:
        TrustedFronts(entries)
    except ValueError as exc:
        raise click.UsageError(f"--trusted-front: {exc}") from None
    if port in others:
        raise ConfigurationError(f"--front-port {port} is another listener's port: give it its own.")
    try:
        for sock in _bind_probe(bind, port):
            sock.close()
    except OSError as exc:
        raise ConfigurationError(
            f"The front port {port} on {bind} cannot be bound: {exc.strerror or exc}; choose another with "
            "--front-port or --front-bind."
        ) from None
    return entries


def _pool_size(value: str) -> PoolSize:
    """``--db-pool-size`` parsed; a bad value is a usage error naming the flag."""
    try:
        return PoolSize.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--db-pool-size") from None


def _region(region: str | None) -> str | None:
    """``--region`` as given (``None`` when empty), with a log line saying how it compares."""
    from ..regions import NAME_RULE, is_azure_region, is_valid_name

    region = (region or "").strip() or None
    if region is None:
        return None
    if not is_valid_name(region):
        raise click.BadParameter(f"a region has {NAME_RULE}.", param_hint="--region")
    if is_azure_region(region):
        log.info("region %s: an Azure region (geoLatency measures distances to the hubs' locations)", region)
    else:
        log.info(
            "region %s is not an Azure region: geoLatency prefers the hubs located in %r, else any",
            region,
            region,
        )
    return region


def _announcing_server(config: uvicorn.Config, announce: Callable[[], None]) -> uvicorn.Server:
    """A uvicorn server that calls ``announce`` once it has started: the lifespan (which starts
    the MQTT and AMQP listeners) has finished and the HTTPS socket is listening."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                announce()

    return _Server(config)


def _run_workers(config: uvicorn.Config, sock: socket.socket, announce: Callable[[], None]) -> None:
    """``--workers N``: uvicorn's supervisor, calling ``announce`` once every worker has started
    (each one's listeners are bound and its HTTPS server serves)."""
    from uvicorn.supervisors import Multiprocess

    class _Supervisor(Multiprocess):
        def init_processes(self) -> None:
            super().init_processes()
            deadline = time.monotonic() + _WORKER_START_TIMEOUT
            waiting = list(self.processes)
            while waiting and time.monotonic() < deadline and not self.signal_queue:
                if not all(p.process.is_alive() for p in waiting):
                    return  # a worker failed to start; the supervisor stops the service
                waiting = [p for p in waiting if not p.is_ready(timeout=1)]
                if waiting:
                    time.sleep(0.1)
            if not waiting:
                announce()

    _Supervisor(config, sockets=[sock]).run()


def _run(settings: Settings) -> None:
    from ..service.app import WORKER_SETTINGS_ENV, create_app, settle_garbage_collector
    from ..tls import uvicorn_config

    prepared = asyncio.run(_prepare(settings))
    settings, info, path, backend = prepared.settings, prepared.info, prepared.path, prepared.backend
    common: dict[str, Any] = {
        "host": settings.bind,
        "port": settings.https_port,
        "cert_file": settings.server_cert,
        "key_file": settings.server_key,
        "limits": settings.connections,
        "log_level": "warning",
        # Idle TLS keep-alive peers may never answer close_notify: do not wait on them forever.
        "timeout_graceful_shutdown": 3,
    }

    def announce() -> None:  # once every listener is bound, not before
        click.echo(_banner(info, path, settings))

    log.info(
        "serving HTTPS on %s:%d with the %s store, %d worker process(es)",
        settings.bind,
        settings.https_port,
        backend,
        settings.workers,
    )
    if settings.workers == 1:
        app = create_app(settings)
        settle_garbage_collector()
        _announcing_server(uvicorn_config(app, **common), announce).run()
        return
    os.environ[WORKER_SETTINGS_ENV] = settings.to_json()
    os.environ["PROVISIOND_LOG_LEVEL"] = logging.getLevelName(logging.getLogger().level).lower()
    config = uvicorn_config(
        "provisiond.service.app:app_from_environment", factory=True, workers=settings.workers, **common
    )
    _run_workers(config, config.bind_socket(), announce)


@click.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("./provisiond-data"),
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_DATA_DIR",
    help="Holds everything: the SQLite database, the development PKI, connection.json.",
)
@click.option(
    "--host",
    default="localhost",
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_HOST",
    help="The host name devices and tools use to reach this service (in the server certificate, "
    "connection.json and the SAS audience).",
)
@click.option(
    "--bind",
    default="0.0.0.0",
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_BIND",
    help="Address to listen on.",
)
@click.option(
    "--https-port",
    type=click.IntRange(1, 65535),
    default=8443,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_HTTPS_PORT",
    help="HTTPS port for the device and service APIs (443 for the official SDKs).",
)
@click.option(
    "--mqtt-port",
    type=click.IntRange(0, 65535),
    default=8883,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_MQTT_PORT",
    help="MQTT 3.1.1 over TLS port for devices (8883 for the official SDKs; 0: off). MQTT over "
    "WebSockets is served on the HTTPS port either way.",
)
@click.option(
    "--mqtt-connect-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_MQTT_CONNECT_TIMEOUT",
    help="Seconds an MQTT connection may take to send its CONNECT before it is closed.",
)
@click.option(
    "--amqp-port",
    type=click.IntRange(0, 65535),
    default=5671,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_AMQP_PORT",
    help="AMQP 1.0 over TLS port for devices (5671 for the official SDKs; 0: off). AMQP over "
    "WebSockets (AMQPWSB10) is served on the HTTPS port either way.",
)
@click.option(
    "--db",
    default=None,
    show_envvar=True,
    envvar="PROVISIOND_DB",
    help="A SQLite file path (default DATA_DIR/provisiond.db) or a postgresql:// URL (the postgres "
    "extra; several hosts, postgresql://user@db1,db2/name, reach the one that accepts writes).",
)
@click.option(
    "--db-pool-size",
    default=str(PoolSize()),
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_DB_POOL_SIZE",
    callback=lambda _ctx, _param, value: _pool_size(value),
    help="PostgreSQL: the bounds of each worker's connection pool, MAX or MIN-MAX. The pool opens "
    "connections up to MAX as requests wait for one; every worker of every node has its own, plus "
    "one LISTEN connection, so nodes x workers x (MAX + 1) must stay within the server's "
    "max_connections (100 by default, 3 of them reserved for superusers).",
)
@click.option(
    "--server-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    show_envvar=True,
    envvar="PROVISIOND_SERVER_CERT",
    help="Your own server certificate (PEM, chain allowed); "
    "default: a development PKI generated in DATA_DIR/pki.",
)
@click.option(
    "--server-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    show_envvar=True,
    envvar="PROVISIOND_SERVER_KEY",
    help="The key of --server-cert (PEM).",
)
@click.option(
    "--builtin-hub",
    default=None,
    show_envvar=True,
    envvar="PROVISIOND_BUILTIN_HUB",
    help="Host name of the first IoT hub provisiond serves itself (identities and twins in its "
    "database; devices connect to it on these ports). Default: the one the database recorded on its "
    "first start, which is --host for a new database. The server certificate covers it.",
)
@click.option(
    "--region",
    default=None,
    show_envvar=True,
    envvar="PROVISIOND_REGION",
    help="This node's region: an Azure region (westeurope, 'West Europe') or a name of your own. "
    "geoLatency allocation picks among the candidate hubs whose location is nearest to it (the "
    "same name; else, between Azure regions, the shortest distance), by weight among equals "
    "(default: none; geoLatency then allocates as hashed).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_WORKERS",
    help="Worker processes sharing the HTTPS, MQTT and AMQP ports (each with its own database "
    "connections and rate-limit buckets).",
)
@click.option(
    "--rate-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    show_envvar=True,
    envvar="PROVISIOND_RATE_LIMIT",
    help="Device API limit: requests per second on this node (registrations, operation polls, status "
    "lookups), whoever sends them; each of --workers admits its share (default: none). Over it: "
    "429 + Retry-After.",
)
@click.option(
    "--device-rate-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    show_envvar=True,
    envvar="PROVISIOND_DEVICE_RATE_LIMIT",
    help="Device API limit: requests per minute per registration id, counted once the device "
    "attested, in each worker (default: none).",
)
@click.option(
    "--failed-attestation-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    show_envvar=True,
    envvar="PROVISIOND_FAILED_ATTESTATION_LIMIT",
    help="Device API limit: failed attestations per minute per source address (an IPv6 /64); a "
    "source over it gets 429 + Retry-After before any attestation (default: none).",
)
@click.option(
    "--assignment-budget",
    type=click.FloatRange(min=0, min_open=True),
    default=2.0,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_ASSIGNMENT_BUDGET",
    help="Seconds a register request waits for its assignment; a slower one (a custom allocation "
    "webhook, a slow or throttled remote hub) answers 'assigning' with Retry-After, and the device polls.",
)
@click.option(
    "--hub-write-lease",
    type=click.FloatRange(min=0.5),
    default=30.0,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_HUB_WRITE_LEASE",
    help="Seconds a node's hub writer holds a remote hub write it started; after a crash, another "
    "node (or this one, restarted) takes it over once the lease has run out. On PostgreSQL also the "
    "longest an idle writer goes without looking for work when nothing woke it (queued items wake "
    "it on every node); on SQLite it looks every 0.5 s.",
)
@click.option(
    "--webhook-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_WEBHOOK_TIMEOUT",
    help="Custom allocation: seconds a webhook may take to answer before the registration fails.",
)
@click.option(
    "--webhook-ca-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    show_envvar=True,
    envvar="PROVISIOND_WEBHOOK_CA_FILE",
    help="Custom allocation: a CA certificate file (PEM) webhooks' TLS certificates may chain to, "
    "besides the system CAs.",
)
@click.option(
    "--tls-handshake-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_TLS_HANDSHAKE_TIMEOUT",
    help="Seconds from a connection's accept to the end of its TLS handshake (every listener); also "
    "how long a closing connection waits for the peer's TLS close.",
)
@click.option(
    "--first-request-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_FIRST_REQUEST_TIMEOUT",
    help="Seconds from the TLS handshake to the first complete request head (HTTPS), CONNECT (MQTT) "
    "or protocol header (AMQP).",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_HEADER_TIMEOUT",
    help="HTTPS: seconds from the first byte of a later request on a kept-alive connection to the end of its head.",
)
@click.option(
    "--keep-alive-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_KEEP_ALIVE_TIMEOUT",
    help="HTTPS: seconds an idle kept-alive connection may wait for its next request.",
)
@click.option(
    "--session-idle-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=240.0,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_SESSION_IDLE_TIMEOUT",
    help="MQTT and AMQP: seconds a session may go without input (MQTT: also with keep-alive 0; "
    "1.5 times the device's keep-alive when that is shorter).",
)
@click.option(
    "--hub-activity-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_HUB_ACTIVITY_INTERVAL",
    help="Built-in hubs: seconds between two writes of the connected devices' lastActivityTime "
    "(batched: not a write per message).",
)
@click.option(
    "--hub-signal-poll",
    type=click.FloatRange(min=0, min_open=True),
    default=0.25,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_HUB_SIGNAL_POLL",
    help="Built-in hubs on PostgreSQL: seconds between two reads of the signal stream (methods, "
    "twin patches, messages for devices connected to another worker or node) when no notification "
    "came (LISTEN/NOTIFY wakes the reader at once; this is the safety net). On SQLite, and while "
    "the listening connection is lost, the stream is read every 20 ms.",
)
@click.option(
    "--min-receive-rate",
    type=click.FloatRange(min=0),
    default=240.0,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_MIN_RECEIVE_RATE",
    help="Bytes per second a device must keep up while the service waits for the rest of a request "
    "body, MQTT packet or AMQP frame (0: no minimum).",
)
@click.option(
    "--min-receive-rate-grace",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_MIN_RECEIVE_RATE_GRACE",
    help="Seconds before --min-receive-rate applies to something incomplete.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=0),
    default=None,
    show_envvar=True,
    envvar="PROVISIOND_MAX_CONNECTIONS",
    help="Concurrent connections per listener (HTTPS, MQTT, AMQP) and worker; more are refused at once "
    "(default: an equal share of the open-file limit less --fd-reserve; 0: no cap).",
)
@click.option(
    "--max-connections-per-address",
    type=click.IntRange(min=0),
    default=None,
    show_envvar=True,
    envvar="PROVISIOND_MAX_CONNECTIONS_PER_ADDRESS",
    help="Concurrent connections from one source address per listener and worker "
    "(default: a quarter of --max-connections; 0: no cap).",
)
@click.option(
    "--fd-reserve",
    type=click.IntRange(min=0),
    default=128,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_FD_RESERVE",
    help="Open files kept free for the database, logs and outgoing connections: connections that "
    "would use them are refused.",
)
@click.option(
    "--hub-events-retention",
    type=click.FloatRange(min=0, min_open=True),
    default=86400.0,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_HUB_EVENTS_RETENTION",
    help="Built-in hubs: seconds a telemetry event is kept (read with `provisiond hub monitor-events`).",
)
@click.option(
    "--hub-events-max-count",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_HUB_EVENTS_MAX_COUNT",
    help="Built-in hubs: telemetry events kept at most (every hub together); the oldest go first.",
)
@click.option(
    "--hub-trim-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_HUB_TRIM_INTERVAL",
    help="Built-in hubs: seconds between two trims of the telemetry to its retention (and of expired "
    "cloud-to-device messages), in every worker of every node.",
)
@click.option(
    "--front-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_FRONT_PORT",
    help="Plain-HTTP port for a TLS-terminating front (HAProxy) that hands on the client's certificate "
    "chain in headers (docs/tls-front.md); needs --trusted-front. 0: off.",
)
@click.option(
    "--front-bind",
    default="127.0.0.1",
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_FRONT_BIND",
    help="Address of the --front-port listener; anything but loopback must be chosen here.",
)
@click.option(
    "--trusted-front",
    default=None,
    show_envvar=True,
    envvar="PROVISIOND_TRUSTED_FRONT",
    help="Addresses or networks (comma-separated) allowed to connect to --front-port; connections from "
    "any other address are closed at accept. Only these can set the client certificate headers.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    show_envvar=True,
    envvar="PROVISIOND_LOG_LEVEL",
    help="What the log (standard error) shows: info a line per registration and per refused "
    "request (4xx), warning and error only what went wrong on the server's side, debug the "
    "transports' protocol steps too.",
)
def serve(
    data_dir: Path,
    host: str,
    bind: str,
    https_port: int,
    mqtt_port: int,
    mqtt_connect_timeout: float,
    amqp_port: int,
    db: str | None,
    db_pool_size: PoolSize,
    server_cert: Path | None,
    server_key: Path | None,
    builtin_hub: str | None,
    region: str | None,
    workers: int,
    rate_limit: float | None,
    device_rate_limit: float | None,
    failed_attestation_limit: float | None,
    assignment_budget: float,
    hub_write_lease: float,
    webhook_timeout: float,
    webhook_ca_file: Path | None,
    tls_handshake_timeout: float,
    first_request_timeout: float,
    header_timeout: float,
    keep_alive_timeout: float,
    session_idle_timeout: float,
    hub_activity_interval: float,
    hub_signal_poll: float,
    min_receive_rate: float,
    min_receive_rate_grace: float,
    max_connections: int | None,
    max_connections_per_address: int | None,
    fd_reserve: int,
    hub_events_retention: float,
    hub_events_max_count: int,
    hub_trim_interval: float,
    front_port: int,
    front_bind: str,
    trusted_front: str | None,
    log_level: str,
) -> None:
    """Run the provisioning service on its embedded default: SQLite in DATA_DIR, a development
    PKI generated on first start, and a built-in IoT hub.

    On start it checks that every port can be listened on (a taken one is an error naming its
    flag), writes DATA_DIR/connection.json (idScope, host, httpsPort, serviceConnectionString,
    caCertificate, ...), and prints the same once every listener is bound. Every option also
    reads the environment variable shown (PROVISIOND_*).
    """
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from ..service.http import lean_log_records, one_line_logs

    lean_log_records()
    one_line_logs()
    if (server_cert is None) != (server_key is None):
        raise click.UsageError("--server-cert and --server-key go together.")
    _check_ports(bind, https_port=https_port, mqtt_port=mqtt_port, amqp_port=amqp_port)
    trusted_fronts = _front_options(front_port, front_bind, trusted_front, (https_port, mqtt_port, amqp_port))
    data_dir = data_dir.absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    open_files = admission.raise_open_file_limit()  # before workers start: they inherit it
    limits = ConnectionLimits(
        tls_handshake_timeout=tls_handshake_timeout,
        first_request_timeout=first_request_timeout,
        header_timeout=header_timeout,
        keep_alive_timeout=keep_alive_timeout,
        min_receive_rate=min_receive_rate,
        min_receive_rate_grace=min_receive_rate_grace,
        max_connections=max_connections,
        max_connections_per_address=max_connections_per_address,
        fd_reserve=fd_reserve,
    )
    settings = Settings(
        data_dir=data_dir,
        host=host,
        bind=bind,
        https_port=https_port,
        mqtt_port=mqtt_port,
        mqtt_connect_timeout=mqtt_connect_timeout,
        session_idle_timeout=session_idle_timeout,
        hub_activity_interval=hub_activity_interval,
        hub_signal_poll=hub_signal_poll,
        connections=admission.resolve(
            limits,
            listeners=1 + bool(mqtt_port) + bool(amqp_port) + bool(front_port),
            open_files=open_files.soft,
        ),
        amqp_port=amqp_port,
        db=db,
        db_pool=db_pool_size,
        server_cert=server_cert,
        server_key=server_key,
        builtin_hub=builtin_hub,
        region=_region(region),
        rate_limit=rate_limit,
        device_rate_limit=device_rate_limit,
        failed_attestation_limit=failed_attestation_limit,
        workers=workers,
        webhook_timeout=webhook_timeout,
        assignment_budget=assignment_budget,
        hub_write_lease=hub_write_lease,
        webhook_ca_file=webhook_ca_file.absolute() if webhook_ca_file else None,
        hub_events_retention=hub_events_retention,
        hub_events_max_count=hub_events_max_count,
        hub_trim_interval=hub_trim_interval,
        front_port=front_port,
        front_bind=front_bind,
        trusted_fronts=trusted_fronts,
    )
    try:
        _run(settings)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise ConfigurationError(f"Cannot serve on port {https_port}: {exc.strerror or exc}") from exc
