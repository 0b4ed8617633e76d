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

__all__ = ["raise_if_cancelling"]


def raise_if_cancelling() -> None:
    """Raise :class:`asyncio.CancelledError` if the current task has been asked to stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
