"""``bench/cpu.py --syscalls``: what the server asks of the kernel in each phase, per request.

The part of a registration's CPU that instruction counts do not show is partly the kernel's
(docs/performance.md, "Server CPU per registration", the seventh round). This counts, with
``perf stat`` on the server's process during each phase, the system calls behind it: the
kernel's ``syscalls:sys_enter_*`` tracepoints count every call without slowing it (``strace``
stops the process at each one, and its slower server forms other batches):

- ``pwrite64``, of them the 24-byte ones: SQLite writes a WAL frame as a 24-byte header and
  then the page, so these are the **WAL frames** (pages written by commits);
- ``fcntl`` (SQLite's locks: a read transaction takes and drops a read mark of the WAL index,
  a write transaction the write lock), ``pread64``, ``fdatasync`` (checkpoints), ``openat``
  (SQLite's temporary files: a sub-journal larger than 64 KiB goes to one);
- ``getrandom``, ``futex`` (thread hand-offs), context switches and page faults;
- with a uprobe on SQLite's library, **commits** (``sqlite3WalFrames``, called once per
  commit) and checkpoints (``sqlite3WalCheckpoint``): registrations per commit is the group
  commit's batch. The probes need root; they are added for the run and removed after it.

It needs ``perf`` (Debian: linux-perf) and leave to trace the server (root, or
``kernel.perf_event_paranoid`` at most 1 with access to tracefs).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["SyscallCounter", "available", "sqlite_probes"]

#: (label, perf event, filter): what each phase counts.
_EVENTS = [
    ("pwrite64", "syscalls:sys_enter_pwrite64", None),
    ("of them WAL frames (24-byte)", "syscalls:sys_enter_pwrite64", "count == 24"),
    ("fcntl", "syscalls:sys_enter_fcntl", None),
    ("pread64", "syscalls:sys_enter_pread64", None),
    ("fdatasync", "syscalls:sys_enter_fdatasync", None),
    ("openat", "syscalls:sys_enter_openat", None),
    ("getrandom", "syscalls:sys_enter_getrandom", None),
    ("futex", "syscalls:sys_enter_futex", None),
    ("context switches", "context-switches", None),
    ("page faults", "page-faults", None),
]
_PROBES = [("SQLite commits", "sqlite3WalFrames"), ("SQLite checkpoints", "sqlite3WalCheckpoint")]


def available() -> str | None:
    """Why ``--syscalls`` cannot count here, or None when it can."""
    if shutil.which("perf") is None:
        return "--syscalls needs perf (Debian: apt-get install linux-perf)"
    probe = subprocess.run(
        ["perf", "stat", "-x", ",", "-e", _EVENTS[0][1], "true"], capture_output=True, text=True
    )
    if probe.returncode != 0 or "<not supported>" in probe.stderr:
        return f"--syscalls: perf cannot count the kernel's tracepoints here: {probe.stderr.strip()[-300:]}"
    return None


def _library(pid: int) -> str | None:
    """The SQLite library the server has mapped, from /proc/PID/maps."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            path = line.split()[-1]
            if "libsqlite3" in path and path.startswith("/"):
                return path
    return None


@contextlib.contextmanager
def sqlite_probes(pid: int) -> Iterator[list[tuple[str, str]]]:
    """Uprobes on the server's SQLite library for commits and checkpoints, removed afterwards:
    (label, perf event) of those that could be added (none without root or a library)."""
    library = _library(pid)
    added: list[tuple[str, str]] = []
    try:
        if library is not None:
            for label, function in _PROBES:
                made = subprocess.run(
                    ["perf", "probe", "-q", "-x", library, "-a", f"provisiond_bench_{function}={function}"],
                    capture_output=True,
                    text=True,
                )
                if made.returncode == 0:
                    added.append(
                        (label, f"probe_{Path(library).name.split('.')[0]}:provisiond_bench_{function}")
                    )
        yield added
    finally:
        for _, event in added:
            subprocess.run(["perf", "probe", "-q", "-d", event], capture_output=True)


class SyscallCounter:
    """``perf stat`` on the server (all its threads) for one phase at a time."""

    def __init__(self, pid: int, probes: list[tuple[str, str]]) -> None:
        self.pid = pid
        self.events = [*_EVENTS, *((label, event, None) for label, event in probes)]
        self._dir = Path(tempfile.mkdtemp(prefix="provisiond-syscalls-"))
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = ["perf", "stat", "-x", ",", "-o", str(self._dir / "stat.csv"), "-p", str(self.pid)]
        for _, event, condition in self.events:
            command += ["-e", event] + (["--filter", condition] if condition else [])
        self._process = subprocess.Popen(command, stderr=subprocess.DEVNULL)

    def stop(self, requests: int) -> list[tuple[str, float]]:
        """(label, count per request) for the phase just ended."""
        process, self._process = self._process, None
        if process is None:
            return []
        process.send_signal(signal.SIGINT)
        process.wait()
        values = []
        for line in (self._dir / "stat.csv").read_text().splitlines():
            if line and not line.startswith("#"):
                field = line.split(",")[0]  # "<not counted>" when an event could not be
                values.append(float(field) if field[:1].isdigit() else float("nan"))
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir.mkdir()
        per = max(requests, 1)
        return [(label, value / per) for (label, _, _), value in zip(self.events, values, strict=False)]

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
