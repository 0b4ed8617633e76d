"""Typed service settings. Flags and environment variables are parsed in the CLI and nowhere else."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..storage import PoolSize

__all__ = ["DEFAULT_BUILTIN_HUB", "MAX_BODY_BYTES", "ConnectionLimits", "Settings"]

#: DPS's maximum message size; larger request bodies are refused with a 400.
MAX_BODY_BYTES = 96 * 1024

#: The built-in hub's host name in databases created before it followed ``--host``.
DEFAULT_BUILTIN_HUB = "builtin-hub.provisiond.local"


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectionLimits:
    """What one connection may cost before it is closed or refused, on every TLS listener
    (HTTPS with its WebSockets, MQTT, AMQP); see :mod:`provisiond.service.guard` and
    :mod:`provisiond.service.admission`. Seconds, unless said otherwise."""

    #: From the TCP accept to the end of the TLS handshake; also how long a closing connection
    #: waits for the peer's TLS close_notify before the socket is dropped.
    tls_handshake_timeout: float = 10.0
    #: From the end of the handshake to the first complete request head (HTTPS), CONNECT (MQTT)
    #: or protocol header (AMQP).
    first_request_timeout: float = 10.0
    #: HTTPS: from the first byte of a later request on a kept-alive connection to the end of its head.
    header_timeout: float = 10.0
    #: HTTPS: how long a connection may wait for its next request after a response.
    keep_alive_timeout: float = 5.0
    #: Bytes per second a peer must keep up while the service waits for the rest of something
    #: (a request body, an MQTT packet, an AMQP frame), after :attr:`min_receive_rate_grace`. 0: off.
    min_receive_rate: float = 240.0
    min_receive_rate_grace: float = 5.0
    #: Concurrent connections per listener and per source address on one listener, in each
    #: worker process. None: derived from the open-file limit (see ``admission.resolve``); 0: no cap.
    max_connections: int | None = None
    max_connections_per_address: int | None = None
    #: Open files kept free for the database, logs and outgoing connections: a listener
    #: refuses connections that would eat into them.
    fd_reserve: int = 128


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What ``provisiond serve`` was asked to do."""

    data_dir: Path
    host: str = "localhost"
    bind: str = "0.0.0.0"
    https_port: int = 8443
    mqtt_port: int = 8883
    amqp_port: int = 5671
    db: str | None = None
    #: The server certificate (chain) and key every TLS listener uses (the development PKI's
    #: unless the operator brought their own).
    server_cert: Path | None = None
    server_key: Path | None = None
    #: The first built-in hub's host name (``--builtin-hub``). None: the one the database
    #: recorded on its first start, ``host`` for a new database (:mod:`provisiond.hub.addressing`);
    #: ``serve`` resolves it before the workers start.
    builtin_hub: str | None = None
    workers: int = 1
    #: PostgreSQL: the bounds of each worker's connection pool (``--db-pool-size``).
    db_pool: PoolSize = field(default_factory=PoolSize)
    max_body_bytes: int = MAX_BODY_BYTES
    #: Allowed clock skew for SAS token expiry checks, in seconds.
    clock_skew: int = 60
    #: Device API rate limits (None: off): device API requests per second on this node (each of
    #: ``workers`` admits its share), requests per minute per registration id (attested requests
    #: only), and failed attestations per minute per source address (both per worker).
    rate_limit: float | None = None
    device_rate_limit: float | None = None
    failed_attestation_limit: float | None = None
    #: Seconds a hub writer holds an outbox item it claimed (or checkpointed) before any other
    #: node may take it over (service/hub_writer.py; the recovery time after a crash). Also the
    #: longest the writer waits for work when its watch of the outbox is live (PostgreSQL).
    hub_write_lease: float = 30.0
    #: MQTT: seconds a connection may take to send its CONNECT (after the TLS handshake).
    mqtt_connect_timeout: float = 10.0
    #: MQTT and AMQP: seconds a session may go without input (MQTT: also with keep-alive 0, and
    #: never more than 1.5 times the device's keep-alive; AMQP: our open's idle-time-out).
    session_idle_timeout: float = 240.0
    #: Built-in hubs: seconds between two writes of the connected devices' ``lastActivityTime``.
    hub_activity_interval: float = 30.0
    #: Built-in hubs on PostgreSQL: seconds between two reads of the broker's signal stream when
    #: no notification woke it (service/hub_broker.py).
    hub_signal_poll: float = 0.25
    #: Deadlines and caps of every connection (flags ``--tls-handshake-timeout`` and the like).
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    #: Custom allocation: seconds a webhook may take to answer, and an extra CA file (PEM) its
    #: TLS certificate may chain to (the system CAs are trusted either way).
    webhook_timeout: float = 10.0
    webhook_ca_file: Path | None = None
    #: Seconds a register request waits for its assignment; a slower one (a custom allocation
    #: webhook) answers 202 ``assigning`` with Retry-After and finishes in the background.
    assignment_budget: float = 2.0
    #: This node's region (an Azure region name or one of the operator's): geoLatency allocation
    #: picks among the candidate hubs whose location is nearest to it (:mod:`provisiond.regions`).
    region: str | None = None
    #: Extra host names the server certificate and SAS ``sr`` checks accept.
    extra_host_names: tuple[str, ...] = field(default_factory=tuple)
    #: The built-in hubs' telemetry stream is bounded: events older than this many seconds, and
    #: all but the newest ``hub_events_max_count``, are trimmed every ``hub_trim_interval``
    #: seconds by every node (flags ``--hub-events-retention`` and the like).
    hub_events_retention: float = 86400.0
    hub_events_max_count: int = 100_000
    hub_trim_interval: float = 60.0
    #: The trusted front's plain-HTTP listener (service/front.py): port (0: off), address, and the
    #: addresses or networks allowed to connect to it (``--front-port``, ``--front-bind``,
    #: ``--trusted-front``).
    front_port: int = 0
    front_bind: str = "127.0.0.1"
    trusted_fronts: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        """For worker processes (see :func:`provisiond.service.app.app_from_environment`)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["connections"] = asdict(self.connections)
        data["db_pool"] = str(self.db_pool)
        return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()})

    @classmethod
    def from_json(cls, text: str) -> Settings:
        data = json.loads(text)
        for name in ("data_dir", "server_cert", "server_key", "webhook_ca_file"):
            if data.get(name) is not None:
                data[name] = Path(data[name])
        data["extra_host_names"] = tuple(data.get("extra_host_names") or ())
        data["trusted_fronts"] = tuple(data.get("trusted_fronts") or ())
        data["connections"] = ConnectionLimits(**data.get("connections", {}))
        data["db_pool"] = PoolSize.parse(data["db_pool"]) if "db_pool" in data else PoolSize()
        return cls(**data)

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.data_dir / 'provisiond.db'}"

    @property
    def host_names(self) -> tuple[str, ...]:
        return (self.host, *self.extra_host_names)

    @property
    def first_builtin_hub(self) -> str:
        """The first built-in hub's host name (``host`` until ``serve`` resolved it)."""
        return (self.builtin_hub or self.host).lower()
