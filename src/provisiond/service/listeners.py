"""Extra listeners that run beside the HTTPS server in every worker: the MQTT port (issue 4)
and the AMQP port (issue 6). Each transport module appends a starter to :data:`STARTERS`; the
app's lifespan starts them all and closes them at shutdown.

A starter takes the service context and the registrar, and returns the ``asyncio.Server`` it
started (or ``None`` when its port is disabled, i.e. set to 0).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

    from .context import ServiceContext
    from .registrar import Registrar

__all__ = ["STARTERS", "Starter", "running_listeners"]

log = logging.getLogger("provisiond.listeners")

Starter = Callable[["ServiceContext", "Registrar"], Awaitable["asyncio.Server | None"]]

#: Filled by the transport modules at import (see ``provisiond.service.app``).
STARTERS: list[Starter] = []


@contextlib.asynccontextmanager
async def running_listeners(ctx: ServiceContext, registrar: Registrar) -> AsyncIterator[None]:
    """Start every registered listener; close them all on exit."""
    servers = []
    try:
        for start in STARTERS:
            server = await start(ctx, registrar)
            if server is not None:
                servers.append(server)
        yield
    finally:
        for server in servers:
            server.close()
        for server in servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
