"""``bench/cpu.py --libraries``: where the server's CPU goes in each phase, by library.

A registration's CPU beyond the trivial request's is spread over many small steps
(docs/performance.md, "Server CPU per registration"); what a profile of Python functions shows
leaves out what happens below them (OpenSSL, SQLite, the C library, the kernel) and how much of
it is the interpreter itself. This samples the server's process (all its threads) with
``perf record`` on the ``cpu-clock`` event while each phase runs, counts the samples by the
library (or executable, or the kernel) they landed in, and spreads the phase's CPU per request
(from /proc, as the main table) over them in those proportions:

- ``libpython3.x``: the interpreter (the bytecode loop, objects, dicts, the garbage collector);
- ``libcrypto``, ``libssl``: OpenSSL (handshakes, records, HMAC, random numbers);
- ``libc``: the C library (memory, copies, system call wrappers);
- ``kernel``: system calls, the network stack, page faults, the file system;
- ``libsqlite3``, and compiled Python packages by their module (``uvloop/loop``,
  ``msgspec/_core``, ``httptools/...``), and the standard library's C modules (``_ssl``, ...).

Samples are taken about a thousand times a second, so a phase of ``--seconds 8`` at one busy
core gives about 8,000: a library's figure is good to about a percent of the phase's CPU. The
sampling itself costs the server a few percent (each sample interrupts it): compare phases of
one run, or runs that both sample, not a sampled run with an unsampled one. The
table after the phases subtracts the first phase's figures from each other phase's: what a
registration adds to the trivial request, library by library.

It needs ``perf`` (Debian: linux-perf) and leave to sample the server (root, or
``kernel.perf_event_paranoid`` at most 1).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LibrarySampler", "available", "library_name", "print_table"]

#: Samples a second (a prime, so that sampling does not beat with periodic work).
FREQUENCY = 997

#: ``perf script -F ip,dso``'s line for a sample: the address, then the object file in parentheses.
_SAMPLE_LINE = re.compile(r"^\s*[0-9a-f]+ \((.*)\)\s*$")


def available() -> str | None:
    """Why ``--libraries`` cannot sample here, or None when it can."""
    if shutil.which("perf") is None:
        return "--libraries needs perf (Debian: apt-get install linux-perf)"
    probe = subprocess.run(
        ["perf", "record", "-q", "-e", "cpu-clock", "-o", "/dev/null", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"--libraries: perf cannot sample processes here: {probe.stderr.strip()[-300:]}"
    return None


def library_name(dso: str) -> str:
    """A short name for a sample's object file (its path, as ``perf script`` shows it)."""
    if dso.startswith("["):  # [kernel.kallsyms], [vdso], [unknown]
        return "kernel" if dso.startswith("[kernel") else dso.strip("[]")
    if "site-packages/" in dso:  # a compiled package: its module path
        dso = dso.rsplit("site-packages/", 1)[1]
    else:
        dso = dso.rsplit("/", 1)[-1]
    dso = re.sub(r"\.cpython-[^/]*\.so$", "", dso)
    return re.sub(r"\.so(\.[0-9.]+)?$", "", dso)


class LibrarySampler:
    """``perf record`` on the server for one phase at a time."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._dir = Path(tempfile.mkdtemp(prefix="provisiond-libraries-"))
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        data = self._dir / "perf.data"
        command = ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQUENCY)]
        command += ["-p", str(self.pid), "-o", str(data)]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self, cpu_us_per_request: float) -> dict[str, float]:
        """µs per request by library for the phase just ended (its samples' shares of
        ``cpu_us_per_request``), largest first."""
        process, self._process = self._process, None
        if process is None:
            return {}
        process.send_signal(signal.SIGINT)
        process.wait()
        data = self._dir / "perf.data"
        samples = subprocess.run(
            ["perf", "script", "-i", str(data), "-F", "ip,dso"], capture_output=True, text=True
        )
        data.unlink(missing_ok=True)
        counts: dict[str, int] = {}
        for line in samples.stdout.splitlines():
            if match := _SAMPLE_LINE.match(line):
                name = library_name(match.group(1))
                counts[name] = counts.get(name, 0) + 1
        total = sum(counts.values())  # none: a phase too short for a sample
        ranked = sorted(counts.items(), key=lambda count: -count[1])
        return {name: cpu_us_per_request * count / total for name, count in ranked if total}

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


def print_table(backend: str, phases: Sequence[tuple[str, dict[str, float]]], *, least: float = 5.0) -> None:
    """One table for a backend's phases: µs per request by library in each, and each later
    phase's difference from the first (a registration's extra over the trivial request). The
    libraries under ``least`` µs in every phase and difference are summed as "the rest"."""
    if not phases:
        return
    first_name, first = phases[0]
    names: list[str] = []
    for _, figures in phases:
        names += [name for name in figures if name not in names]

    def shown(name: str) -> bool:
        cells = [figures.get(name, 0.0) for _, figures in phases]
        cells += [abs(figures.get(name, 0.0) - first.get(name, 0.0)) for _, figures in phases[1:]]
        return max(cells) >= least

    kept = [name for name in names if shown(name)]
    rest = [name for name in names if name not in kept]
    rows = [(name, [name]) for name in kept] + ([("the rest", rest)] if rest else [])
    later = [name for name, _ in phases[1:]]
    print()
    print(f"{backend}: server CPU µs per request by library (perf record, cpu-clock; bench/_libraries.py)")
    print()
    print(
        "| library | "
        + " | ".join(name for name, _ in phases)
        + "".join(f" | {name} − {first_name}" for name in later)
        + " |"
    )
    print("|---" * (1 + len(phases) + len(later)) + "|")
    for label, members in [*rows, ("all", names)]:
        cells = [sum(figures.get(m, 0.0) for m in members) for _, figures in phases]
        diffs = [cell - cells[0] for cell in cells[1:]]
        print(
            f"| {label} | "
            + " | ".join(f"{cell:.0f}" for cell in cells)
            + "".join(f" | {diff:+.0f}" for diff in diffs)
            + " |"
        )
