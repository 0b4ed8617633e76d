"""Fixtures that run a real ``provisiond serve`` process on loopback (TLS, free ports)."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisiond.protocol.sas import build_sas_token
from provisiond.service_client import ConnectionString, ServiceClient

__all__ = ["RunningServer", "free_port", "server", "start_server"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RunningServer:
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_file: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.info["httpsPort"])

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def ca_file(self) -> str:
        return str(self.info["caCertificate"])

    @property
    def connection_string(self) -> str:
        return str(self.info["serviceConnectionString"])

    @property
    def id_scope(self) -> str:
        return str(self.info["idScope"])

    def client(self) -> ServiceClient:
        return ServiceClient(self.connection_string, ca_file=self.ca_file)

    def http(self, **kwargs: Any) -> httpx.Client:
        """A plain HTTPS client trusting the server's CA (no auth header)."""
        return httpx.Client(
            base_url=self.base_url,
            verify=ssl.create_default_context(cafile=self.ca_file),
            timeout=10,
            **kwargs,
        )

    def token(self, *, ttl: int = 3600, key_name: str | None = None, key: str | None = None) -> str:
        cs = ConnectionString.parse(self.connection_string)
        return build_sas_token(
            cs.host, key or cs.key, int(time.time()) + ttl, key_name=key_name or cs.key_name
        )

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def wait_for_log(self, *words: str, timeout: float = 10.0) -> str:
        """The first log line that holds all ``words``, waiting for the server to write it
        (a refusal is answered before its log line is flushed)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log().splitlines():
                if all(word in line for word in words):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line with {words}:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def start_server(
    data_dir: Path,
    *extra: str,
    port: int | None = None,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> RunningServer:
    """Start ``provisiond serve`` and wait until it answers; its stderr goes to DATA_DIR/serve.log.
    ``env`` adds environment variables (PROVISIOND_* from the test's own environment are dropped);
    ``preexec_fn`` runs in the child before it starts (to lower its limits, say)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conn = data_dir / "connection.json"
    conn.unlink(missing_ok=True)
    log_file = data_dir / "serve.log"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")} | (env or {})
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "provisiond",
                "serve",
                "--data-dir",
                str(data_dir),
                "--bind",
                "127.0.0.1",
                "--https-port",
                str(port),
                "--mqtt-port",
                str(free_port()),
                "--amqp-port",
                str(free_port()),
                *extra,
            ],
            stdout=log,
            stderr=log,
            env=child_env,
            preexec_fn=preexec_fn,
        )
    running = RunningServer(data_dir, process, log_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"provisiond serve exited with {process.returncode}:\n{running.log()}")
        if conn.exists():
            try:
                running.info = json.loads(conn.read_text())
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return running
            except (ValueError, OSError):
                pass
        time.sleep(0.05)
    running.stop()
    raise RuntimeError(f"provisiond serve did not start within {timeout} s:\n{running.log()}")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the session (tests use their own ids, so they don't collide)."""
    running = start_server(tmp_path_factory.mktemp("server"))
    yield running
    running.stop()


def port_is_free(port: int) -> bool:
    """Whether ``port`` on 127.0.0.1 can be bound now (one in TIME_WAIT counts as free)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_free_ports(ports: tuple[int, ...], timeout: float) -> list[int]:
    """Wait up to ``timeout`` seconds for ``ports`` on 127.0.0.1 to be free (another test module
    may be finishing with them); return those still taken."""
    deadline = time.monotonic() + timeout
    while (taken := [port for port in ports if not port_is_free(port)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return taken
