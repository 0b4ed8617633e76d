"""Stopping background loops when their task is cancelled.

A cancellation that arrives inside a database call does not always come out of it as
:class:`asyncio.CancelledError`: psycopg cancels the query on the server and may end the wait
with a driver error (the store translates it to a storage error a retry loop catches) or,
in some paths, return normally. A loop that retries storage errors would then go on for ever
and its ``cancel(); await task`` would hang an app's shutdown. Every such loop calls
:func:`raise_if_cancelling` after handling an error and before waiting again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["raise_if_cancelling", "stop"]

log = logging.getLogger("provisiond")


def raise_if_cancelling() -> None:
    """Raise :class:`asyncio.CancelledError` if the current task has been asked to stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def stop(task: asyncio.Task[Any] | None, what: str, *, grace: float = 10.0) -> None:
    """Cancel a background ``task`` and wait for it to end, at most ``grace`` seconds: a loop
    that does not stop is logged as the defect it is instead of hanging the shutdown."""
    if task is None or task.done():
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=grace)
    if not done:
        log.error("%s did not stop within %g s of being cancelled; shutting down without it", what, grace)
    elif not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s ended with an error", what, exc_info=exc)
