"""Fixtures that run swtpm, a TPM 2.0 simulator, on loopback: two free consecutive ports (the
TPM's and its control channel), a temporary state directory, stopped at teardown.

``swtpm`` (one TPM for the session) and ``swtpm_factory`` (more TPMs, e.g. a second device);
``Swtpm.tcti`` is the TCTI string for tpm2-pytss and tpm2-tools. Where swtpm or tpm2-pytss (the
device side's TSS) is missing, the tests that need a TPM are skipped, and the skip reason says
what to install (``.ci/run`` installs both).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Swtpm", "start_swtpm", "swtpm", "swtpm_factory", "tpm_missing"]

_INSTALL = "apt-get install -y swtpm swtpm-tools tpm2-tools libtss2-dev, then pip install tpm2-pytss"


def tpm_missing() -> str | None:
    """Why the tests that need a TPM cannot run here (``None`` when they can)."""
    if shutil.which("swtpm") is None:
        return f"swtpm (the TPM 2.0 simulator) is not installed: {_INSTALL}"
    try:
        import tpm2_pytss  # noqa: F401  (the device's TSS: TpmSecurity talks to the TPM through it)
    except ImportError as exc:
        return f"tpm2-pytss is not importable ({exc}): {_INSTALL}"
    return None


@dataclass
class Swtpm:
    port: int
    state_dir: Path
    process: subprocess.Popen[bytes]
    log_file: Path

    @property
    def tcti(self) -> str:
        """For tpm2-pytss (``ESAPI(tcti)``) and tpm2-tools (``TPM2TOOLS_TCTI``)."""
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _port_pair() -> int:
    """A free port P whose neighbour P+1 is free too (swtpm's control channel)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def start_swtpm(state_dir: Path, *, timeout: float = 10.0) -> Swtpm:
    """Start ``swtpm socket --tpm2`` with its state in ``state_dir`` and wait until it listens."""
    missing = tpm_missing()
    if missing is not None:
        pytest.skip(missing)
    executable = shutil.which("swtpm")
    assert executable is not None
    state_dir.mkdir(parents=True, exist_ok=True)
    log_file = state_dir / "swtpm.log"
    for _ in range(3):  # another process may take a port between the probe and swtpm's bind
        port = _port_pair()
        with open(log_file, "ab") as log:
            process = subprocess.Popen(
                [
                    executable,
                    "socket",
                    "--tpm2",
                    "--server",
                    f"type=tcp,port={port},bindaddr=127.0.0.1",
                    "--ctrl",
                    f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                    "--tpmstate",
                    f"dir={state_dir}",
                    "--flags",
                    "not-need-init,startup-clear",
                ],
                stdout=log,
                stderr=log,
            )
        running = Swtpm(port, state_dir, process, log_file)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return running
            except OSError:
                time.sleep(0.02)
        running.stop()
    raise RuntimeError(f"swtpm did not start:\n{log_file.read_text(errors='replace')}")


@pytest.fixture(scope="session")
def swtpm_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Swtpm]]:
    """Starts fresh simulated TPMs (each with its own endorsement seed); all stop at the end."""
    started: list[Swtpm] = []

    def start() -> Swtpm:
        running = start_swtpm(tmp_path_factory.mktemp("swtpm"))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture(scope="session")
def swtpm(swtpm_factory: Callable[[], Swtpm]) -> Swtpm:
    """One simulated TPM for the session."""
    return swtpm_factory()
