"""``provisiond serve`` as a new user meets it: the banner comes once every port listens, a port
that cannot be listened on is one line naming it and its flag, and connection.json's endpoint
has the form the SDKs expect (``host:port``; plain ``host`` on 443: see tests/interop)."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._server import RunningServer, free_port

BANNER = "provisiond is running."


def _serve_command(data_dir: Path, https: int, mqtt: int, amqp: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "provisiond",
        "serve",
        "--data-dir",
        str(data_dir),
        "--bind",
        "127.0.0.1",
        "--https-port",
        str(https),
        "--mqtt-port",
        str(mqtt),
        "--amqp-port",
        str(amqp),
        *extra,
    ]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")}


@pytest.fixture
def held_port() -> Iterator[tuple[socket.socket, int]]:
    """A port on 127.0.0.1 that another program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock, sock.getsockname()[1]


@pytest.mark.parametrize(
    ("taken", "flag"), [("https", "--https-port"), ("mqtt", "--mqtt-port"), ("amqp", "--amqp-port")]
)
def test_a_taken_port_is_one_line_naming_it_and_its_flag(
    tmp_path: Path, held_port: tuple[socket.socket, int], taken: str, flag: str
) -> None:
    ports = {"https": free_port(), "mqtt": free_port(), "amqp": free_port()}
    ports[taken] = held_port[1]
    data_dir = tmp_path / "data"
    proc = subprocess.run(
        _serve_command(data_dir, ports["https"], ports["mqtt"], ports["amqp"]),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert BANNER not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr  # no traceback, no log lines before it
    assert lines[0].startswith(f"Error: {taken.upper()} port {held_port[1]} on 127.0.0.1 is in use"), lines
    assert lines[0].endswith(
        f"choose another with {flag}"
        + ("." if taken == "https" else f" (0 turns {taken.upper()} over TLS off).")
    )
    # nothing claims a running service
    assert not (data_dir / "connection.json").exists()


def test_the_same_port_twice_is_refused(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.run(
        _serve_command(tmp_path / "data", port, free_port(), port),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"Error: --https-port and --amqp-port are both {port}: give each its own port.\n"


def test_a_region_that_is_no_name_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        _serve_command(tmp_path / "data", free_port(), free_port(), free_port(), "--region", "west;europe"),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 2 and "--region" in proc.stderr and "letters and digits" in proc.stderr
    assert not (tmp_path / "data" / "connection.json").exists()


def _read_until(proc: subprocess.Popen[bytes], text: str, limit: float = 120.0) -> str:
    """stdout of ``proc`` up to the line holding ``text`` ("" if it exits first); ``limit`` only
    keeps a broken server from hanging the test run."""
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    seen = b""
    give_up = time.monotonic() + limit
    while time.monotonic() < give_up:
        if not selector.select(timeout=1):
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            return ""
        seen += chunk
        if text.encode() in seen:
            return seen.decode()
    return ""


@pytest.mark.parametrize("workers", [1, 2])
def test_the_banner_comes_once_every_port_listens(tmp_path: Path, workers: int) -> None:
    """Whoever reads the banner can connect at once to each of the three ports."""
    https, mqtt, amqp = free_port(), free_port(), free_port()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with open(data_dir / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            _serve_command(data_dir, https, mqtt, amqp, "--workers", str(workers)),
            stdout=subprocess.PIPE,
            stderr=log,
            env=_env(),
        )
    try:
        output = _read_until(proc, BANNER)
        assert BANNER in output, (data_dir / "serve.log").read_text()
        for port in (https, mqtt, amqp):
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                pass
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


def test_connection_json_names_host_and_port_off_443(server: RunningServer) -> None:
    endpoint = f"localhost:{server.port}"
    assert server.info["globalEndpoint"] == endpoint
    assert server.connection_string.startswith(f"HostName={endpoint};SharedAccessKeyName=")


def test_the_serving_process_settles_its_garbage_collector() -> None:
    """``settle_garbage_collector``, which serve calls in each serving process before it
    serves: start-up's cyclic garbage is collected first, not frozen; what lives is exempt from
    the collector's later full collections; the youngest generation waits for 10,000 new
    objects. In a process of its own: freezing is for life."""
    script = """
import gc, weakref
from provisiond.service.app import settle_garbage_collector

class Node:
    pass

a, b = Node(), Node()
a.peer, b.peer = b, a
dead = weakref.ref(a)
del a, b  # a cycle: garbage that only the collector frees
settle_garbage_collector()
assert dead() is None, "start-up garbage was frozen"
assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()
assert gc.get_threshold() == (10_000, 10, 10), gc.get_threshold()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
