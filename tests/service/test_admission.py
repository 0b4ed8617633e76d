"""The admission arithmetic and the throttled log, in-process (the real-socket checks are in
test_open_files.py and test_connection_deadlines.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from provisiond.service.admission import Admission, DescriptorBudget, ThrottledLog, resolve
from provisiond.service.settings import ConnectionLimits, Settings


def test_caps_come_from_the_open_file_limit_unless_given() -> None:
    auto = resolve(ConnectionLimits(), listeners=3, open_files=1024)
    assert (auto.max_connections, auto.max_connections_per_address) == ((1024 - 128) // 3, (1024 - 128) // 12)
    given = resolve(
        ConnectionLimits(max_connections=50, max_connections_per_address=0), listeners=3, open_files=1024
    )
    assert (given.max_connections, given.max_connections_per_address) == (50, 0)
    derived = resolve(ConnectionLimits(max_connections=0), listeners=3, open_files=1024)
    assert (derived.max_connections, derived.max_connections_per_address) == (
        0,
        0,
    )  # no cap, none per address


def test_connection_limits_travel_to_worker_processes() -> None:
    from pathlib import Path

    settings = Settings(
        data_dir=Path("/tmp/x"), connections=ConnectionLimits(max_connections=7, min_receive_rate=0)
    )
    assert Settings.from_json(settings.to_json()) == settings


def test_admission_counts_per_listener_per_address_and_the_reserve(caplog: pytest.LogCaptureFixture) -> None:
    events = ThrottledLog(logging.getLogger("test.admission"), "T")
    budget = DescriptorBudget(limit=100, reserve=0)
    admission = Admission(
        "T", ConnectionLimits(max_connections=3, max_connections_per_address=2), budget=budget, events=events
    )
    with caplog.at_level(logging.WARNING, logger="test.admission"):
        assert admission.admit("a") and admission.admit("a")
        assert not admission.admit("a")
        assert admission.admit("b")
        assert not admission.admit("c")
        admission.release("a")
        assert admission.admit("c")
    assert (admission.open, budget.in_use) == (3, 3)
    assert (
        "T refused a connection from a: 2 connections from that address (--max-connections-per-address 2)"
        in (caplog.text)
    )
    assert (
        "T refused a connection from c: this listener holds 3 connections (--max-connections 3)"
        in caplog.text
    )

    small = DescriptorBudget(limit=4, reserve=2)
    other = Admission(
        "U", ConnectionLimits(max_connections=0, max_connections_per_address=0), budget=small, events=events
    )
    assert other.admit("x") and other.admit("y") and not other.admit("z")
    assert "all its open files (4) but the reserve (--fd-reserve 2)" in caplog.text


async def test_the_throttled_log_holds_back_and_then_sums_up(caplog: pytest.LogCaptureFixture) -> None:
    events = ThrottledLog(logging.getLogger("test.throttle"), "T", interval=0.2, burst=2)
    with caplog.at_level(logging.INFO, logger="test.throttle"):
        for n in range(5):
            events.log(logging.INFO, "kind-a" if n % 2 else "kind-b", "line %d", n)
        assert [r.getMessage() for r in caplog.records] == ["T line 0", "T line 1"]
        for _ in range(50):
            if len(caplog.records) == 3:
                break
            await asyncio.sleep(0.05)
    assert caplog.records[2].getMessage() == (
        "T: 3 more like the above in the last 0.2 s, not logged one by one (kind-b: 2, kind-a: 1)"
    )


async def test_a_protocol_that_raises_on_the_peers_bytes_closes_its_connection_with_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The application's protocol raising on bytes a peer sent (uvicorn's WebSocket protocol
    did, on frames before the upgrade was accepted) closes that connection with one warning of
    the listener, not asyncio's "Fatal error" with a traceback; the listener serves on. A real
    listener on loopback (plain TCP, as the trusted front's), and a peer over a real socket."""
    from provisiond.service.guard import Listener

    class Raising(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            if data.startswith(b"boom"):
                raise AssertionError("the library's own assertion")

    listener = Listener(
        "TEST", None, resolve(ConnectionLimits(), listeners=1, open_files=1024), first_request="line"
    )
    server = await asyncio.get_running_loop().create_server(
        listener.protocol_factory(Raising), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    caplog.set_level(logging.DEBUG, logger="provisiond.connections")
    try:
        for _ in range(2):  # the listener serves on after the first failure
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"boom\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
            writer.close()
    finally:
        server.close()
        await server.wait_closed()
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 2 and all(
        "Raising failed on the peer's data: AssertionError" in r.getMessage() for r in lines
    )
    assert all(r.exc_info is None for r in lines) and not any(r.name == "asyncio" for r in caplog.records)
