"""The device transports' own TLS listeners, beside the HTTPS server in every worker: the MQTT
port and the AMQP port. The app factory (:func:`provisiond.service.app.create_app`) builds the
list (each transport module has a ``tls_listener(gateway)``), and its lifespan starts them with
:func:`running_listeners` and closes them at shutdown. Nothing registers itself at import.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .streams import SessionHandler, start_tls_listener

if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["TlsListener", "running_listeners"]

log = logging.getLogger("provisiond.listeners")


@dataclass(frozen=True, kw_only=True)
class TlsListener:
    """A TLS listener of one device transport: its name in logs, the session handler of each
    connection, the port (0: off), the flag that sets the port (for messages), and what a
    connection owes first (for the guard's logs)."""

    name: str
    handler: SessionHandler
    port: int
    flag: str
    first_request: str


@contextlib.asynccontextmanager
async def running_listeners(settings: Settings, listeners: Sequence[TlsListener]) -> AsyncIterator[None]:
    """Start ``listeners`` (those whose port is not 0); close them all on exit.

    :raises ConfigurationError: a port cannot be bound (the worker does not start).
    """
    servers = []
    try:
        for listener in listeners:
            server = await start_tls_listener(
                settings,
                listener.handler,
                port=listener.port,
                name=listener.name,
                flag=listener.flag,
                first_request=listener.first_request,
            )
            if server is not None:
                servers.append(server)
        yield
    finally:
        for server in servers:
            server.close()
        for server in servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
