"""Background loops stop on cancellation, and a shutdown never waits for ever on one that
does not (provisiond._cancel)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from provisiond._cancel import raise_if_cancelling, stop


async def test_a_retry_loop_that_swallowed_the_cancellation_stops_at_its_check() -> None:
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            try:
                await asyncio.sleep(10)  # a database call that turned the cancellation into an error
            except asyncio.CancelledError:
                pass
            raise_if_cancelling()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    await stop(task, "the loop", grace=5)
    assert task.cancelled() and rounds == 1


async def test_a_task_that_never_stops_is_logged_not_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="provisiond"):
        await stop(task, "the stubborn loop", grace=0.2)
    assert "the stubborn loop did not stop within 0.2 s" in caplog.text
    release.set()
    task.cancel()
    await asyncio.wait({task})
