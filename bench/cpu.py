"""Server CPU per request: registrations against the trivial request, under ``wrk``, each on a
new TLS connection (``Connection: close``), as a fleet of distinct devices would arrive.

For each phase it reads the server's CPU time (utime + stime of ``provisiond serve`` and its
worker processes, from /proc) before and after, and prints requests per second, server CPU per
request, and the ratio of the trivial request's CPU to the phase's: 1.0 means a registration
costs the server no more than the TLS connection it arrives on; the goal is at least 0.8.

Phases (HTTPS):
- ``trivial``: ``GET /nothing`` answered 404 (the TLS handshake, one request, the close);
- ``group``: symmetric-key devices derived from one enrollment group, each registering once;
- ``individual``: symmetric-key individual enrollments, each registering once;
- ``reregister`` (with ``--preload``): preloaded devices (individual enrollments that have
  registered, with their built-in hub identities) registering again, spread over the table;
- ``x509-trivial`` and ``x509-group``: the same two with a client certificate, one per device
  (leaf and intermediate presented; the X.509 enrollment group holds the root). wrk cannot
  present a client certificate, so these two phases use a small asyncio load generator in two
  processes (full TLS handshakes, no session resumption, ``--x509-devices`` connections, each
  device once); ``x509-group`` is compared with ``x509-trivial``, made by the same generator,
  not with wrk's ``trivial`` (whose handshakes resume sessions).

Phases (MQTT, AMQP and HTTPS, ``bench/_transports.py``'s asyncio generator in two processes, each device
a new TLS connection resuming its slot's previous session as wrk does, ``--connections`` in
flight, at most ``--seconds``, group-derived devices as in ``group``):
- ``mqtt-group``: CONNECT, SUBSCRIBE, the register PUBLISH and its answer, each step awaited;
- ``amqp-group``: SASL PLAIN, open, begin, two links, the register transfer and its answer;
- ``mqtt-trivial``, ``amqp-trivial``: the TLS handshake on that listener, then the close;
- ``amqp-pipelined`` (a diagnostic): ``amqp-group`` with the SASL and AMQP setup sent in one
  write, two round trips fewer than the SDKs make;
- ``https-group``, ``https-trivial``: the HTTPS registration (and a TLS handshake on the HTTPS
  port) made by the same generator, so that the transports are also compared under one load.
A second table compares each with ``group`` (HTTPS under wrk) and with ``https-group`` in the
same run: the goal is a transport's CPU per registration within 1.2x an HTTPS registration's.

    python bench/cpu.py [--devices 20000] [--seconds 10] [--connections 64] [--threads 2]
                        [--db sqlite|postgresql|sqlite,postgresql]
                        [--phases trivial,group,individual,trivial,x509-trivial,x509-group] [--log-level info]

``--preload N`` runs each backend twice, each time on a fresh server: first over a database
holding ``--devices`` registered devices, then over one holding N (written through the store's
batch writes before the server starts, ``bench/_preload.py``); the table's "rate / first's"
column then compares each phase with the small database's.

    python bench/cpu.py --preload 1000000 --phases trivial,group,individual,reregister,trivial

``--db sqlite,postgresql`` runs the phases on each backend in turn (a fresh server each; for
PostgreSQL a throwaway cluster with PostgreSQL's default durability settings, ``bench/_pg.py``)
and prints one table: rate, wrk's p50/p99 (from the request's write to the answer: the connect
and handshake are not in it), the server's CPU per request and its ratio, the database server's
CPU per request (PostgreSQL's processes, from /proc too), and each phase's rate against the
first backend's.

``--pg-diagnose`` adds, after each PostgreSQL phase, where PostgreSQL's CPU went
(``bench/_pg.py`` ``diagnosis``): utime and stime per process type (backends, walwriter,
checkpointer, ...), ``pg_stat_wal`` per request (records, full-page images, bytes, writes and
flushes with their time), checkpoints and buffers written, rows inserted, updated and
HOT-updated per table, and the statements that took the time (``pg_stat_statements``: calls,
time, rows and WAL per request). It loads pg_stat_statements and turns on WAL I/O timing, which
cost a little CPU: compare figures taken with the same flags. ``--pg-setting NAME=VALUE``
(repeatable) starts the throwaway cluster with a setting beyond the defaults; the output's
header says so. Durability settings (fsync, synchronous_commit, full_page_writes,
wal_sync_method, wal_level) are refused: the bench keeps PostgreSQL's.

``--front haproxy`` sends the wrk and X.509 phases through HAProxy running
samples/haproxy/haproxy.cfg (TLS terminated there, no session resumption) in front of
``provisiond serve --front-port`` (docs/tls-front.md), and counts HAProxy's CPU with the
server's; the https/mqtt/amqp generator phases stay on provisiond's own ports.

``--callgrind`` runs the server under valgrind's callgrind and reports, instead of CPU time,
the **instructions** the server executed per request in each phase (instrumentation on only
during the phases, switched and read with ``callgrind_control``). Instructions do not vary with
the other work on the machine, so two versions compare in one run each; they leave out the
kernel's work (reads, writes, the TCP stack) and memory stalls, so the ratios they give are not
the CPU ratios. The server runs about 50 times slower: use few connections and short phases,

    python bench/cpu.py --callgrind --connections 4 --threads 1 --seconds 15 --devices 3000 \
        --phases trivial,group,https-trivial,https-group,mqtt-group,amqp-group

``--syscalls`` counts, in each phase, the server's system calls per request with ``perf stat``
on the kernel's tracepoints (``bench/_syscalls.py``): SQLite's WAL writes (``pwrite64``, of them
the 24-byte frame headers: the WAL frames), its locks (``fcntl``), ``getrandom``, ``futex``,
context switches, and with root SQLite's commits and checkpoints (uprobes on its library). The
table's "of it system" column is the kernel's share of the server's CPU (stime).

``--libraries`` samples the server with ``perf record`` during each phase and shares the phase's
CPU per request out by the library the samples landed in (``bench/_libraries.py``): the
interpreter (libpython), OpenSSL, the C library, the kernel, SQLite, compiled packages. A table
after the phases gives each phase's figures and their difference from the first phase's: what a
registration adds to the trivial request, library by library.

    python bench/cpu.py --libraries --phases trivial,group,individual

``--callgrind-dir DIR`` keeps each phase's dump (``callgrind.out.PID.N``, its phase named in the
file) for ``callgrind_annotate``.

wrk (Debian's package) is the load: it runs on the same cores as the server, and its CPU is not
counted (only the server's is). CPU per request is steadier on a shared machine than requests
per second; both are printed. Nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import free_port, machine_summary, start_server, terminate_on_signals
from _transports import run as run_transport

from provisiond import pki
from provisiond.protocol.sas import build_sas_token, derive_device_key

API_VERSION = "2021-06-01"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and every process below it, from /proc."""
    return sum(process_tree_times(root))


def process_tree_times(root: int) -> tuple[float, float]:
    """CPU seconds in user space and in the kernel (utime, stime) of ``root`` and every process
    below it, from /proc."""
    children: dict[int, list[int]] = {}
    times: dict[int, tuple[float, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid, ppid = int(entry.name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        times[pid] = (int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS)
    user = system = 0.0
    stack = [root]
    while stack:
        pid = stack.pop()
        pid_user, pid_system = times.get(pid, (0.0, 0.0))
        user, system = user + pid_user, system + pid_system
        stack += children.get(pid, [])
    return user, system


LUA = r"""
local requests = {}
local offset = 0
local counter = 0
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(args[1]) do
    local method, path, token, body = line:match("^(%S+)\t(%S+)\t([^\t]*)\t(.*)$")
    local headers = {["Connection"] = "close", ["Content-Type"] = "application/json"}
    if token ~= "" then headers["Authorization"] = token end
    table.insert(requests, wrk.format(method, path, headers, body ~= "" and body or nil))
  end
  offset = math.floor(#requests * id / tonumber(args[2]))
end

function request()
  counter = counter + 1
  return requests[(offset + counter - 1) % #requests + 1]
end

function done(summary, latency, requests)
  local statuses = ""
  io.write(string.format("WRK %d %d %d %d %d %d\n", summary.requests, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""

STATUS = re.compile(r"^WRK (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)$", re.M)


@dataclass
class Run:
    """What one phase's load measured."""

    requests: int
    seconds: float
    #: CPU seconds of the server's process tree during the phase
    cpu: float
    bad_status: int
    socket_errors: int
    #: latency percentiles in ms (wrk's: from the request's write, without connect and handshake)
    p50: float = float("nan")
    p99: float = float("nan")
    #: CPU seconds of the database server's processes (PostgreSQL; 0 for SQLite, in process)
    db_cpu: float = 0.0
    #: of ``cpu``, the seconds in the kernel (stime: system calls, the TCP stack, page faults)
    stime: float = 0.0


@dataclass
class Phase:
    name: str
    requests: int
    seconds: float
    cpu: float
    bad_status: int
    socket_errors: int
    p50: float = float("nan")
    p99: float = float("nan")
    db_cpu: float = 0.0
    #: the server's instructions during the phase (``--callgrind``), else None
    instructions: float | None = None
    #: of ``cpu``, the seconds in the kernel
    stime: float = 0.0

    @property
    def spent(self) -> float:
        """What the tables compare: giga-instructions with ``--callgrind``, else CPU seconds."""
        return self.instructions * 1e-9 if self.instructions is not None else self.cpu

    @property
    def cost(self) -> float:
        """Per request: thousands of instructions with ``--callgrind``, else CPU µs."""
        return self.spent / self.requests * 1e6 if self.requests else float("nan")

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.requests * 1e6 if self.requests else float("nan")

    @property
    def stime_us(self) -> float:
        return self.stime / self.requests * 1e6 if self.requests else float("nan")

    @property
    def db_cpu_us(self) -> float:
        return self.db_cpu / self.requests * 1e6 if self.requests else float("nan")


def run_wrk(
    url: str,
    requests_file: Path,
    script: Path,
    *,
    seconds: float,
    connections: int,
    threads: int,
    pid: int,
    db_pid: int | None = None,
) -> Run:
    db_before = process_tree_cpu(db_pid) if db_pid else 0.0
    before, started = process_tree_times(pid), time.monotonic()
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
            "--",
            str(requests_file),
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    elapsed, after = time.monotonic() - started, process_tree_times(pid)
    cpu, stime = sum(after) - sum(before), after[1] - before[1]
    db_cpu = process_tree_cpu(db_pid) - db_before if db_pid else 0.0
    match = STATUS.search(out)
    if match is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    done, bad, socket_errors, _timeouts, p50, p99 = (int(g) for g in match.groups())
    return Run(done, elapsed, cpu, bad, socket_errors, p50 / 1000, p99 / 1000, db_cpu, stime)


# -- --callgrind: the server's instructions per phase ---------------------------------------


class Callgrind:
    """The server under callgrind with its instrumentation off (start-up runs at valgrind's
    uninstrumented speed), switched on for each phase and read from a dump at its end."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        #: instructions a second of the idle server (its timers: the hub broker's poll, ...),
        #: taken off each phase: under valgrind a request lasts 50 times longer, so they count
        self.idle_rate = 0.0
        self._started = 0.0

    def measure_idle(self, pid: int, seconds: float = 5.0) -> None:
        self.start(pid)
        time.sleep(seconds)
        self.idle_rate = self.stop(pid, "idle") / seconds
        print(
            f"# the idle server: {self.idle_rate / 1e6:.2f} M instructions a second, taken off each phase",
            flush=True,
        )

    def wrapper(self) -> list[str]:
        return [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={self.out_dir / 'callgrind.out.%p'}",
        ]

    def start(self, pid: int) -> None:
        self._control("-z", pid)  # counters to zero, then count
        self._control("-i", "on", pid)
        self._started = time.monotonic()

    def stop(self, pid: int, label: str) -> float:
        """The instructions since :meth:`start`, from a dump named after the phase, less the idle
        server's over the same time."""
        self._control("-i", "off", pid)
        idle = self.idle_rate * (time.monotonic() - self._started)
        before = set(self.out_dir.glob(f"callgrind.out.{pid}.*"))
        self._control(f"--dump={label}", pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the dump is written after callgrind_control returns
            for dump in set(self.out_dir.glob(f"callgrind.out.{pid}.*")) - before:
                for line in dump.read_text().splitlines():
                    if line.startswith("totals:"):  # its last line: the dump is complete
                        return float(line.split()[1]) - idle
            time.sleep(0.2)
        raise RuntimeError(f"callgrind wrote no complete dump for phase {label} within 60 s")

    @staticmethod
    def _control(*args: str | int) -> None:
        # it exits 0 whether or not it found the process: its "OK." is the answer
        done = subprocess.run(["callgrind_control", *map(str, args)], capture_output=True, text=True)
        if "OK." not in done.stdout:
            raise RuntimeError(f"callgrind_control {args}: {done.stdout}{done.stderr}")


# -- X.509: wrk cannot present client certificates ---------------------------------------------


@dataclass(frozen=True)
class X509Job:
    port: int
    #: (request bytes, certificate chain file, key file) per connection
    connections: list[tuple[bytes, str, str]]
    concurrency: int
    #: the status line's code a request must get (b"2": any 2xx)
    expect: bytes


async def _x509_one(port: int, request: bytes, cert: str, key: str, expect: bytes) -> bool:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the server's CPU is measured, not the client's trust
    context.load_cert_chain(cert, key)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        writer.write(request)
        answer = await reader.read()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass
    return answer[9 : 9 + len(expect)] == expect


async def _x509_run(job: X509Job) -> tuple[int, int]:
    gate = asyncio.Semaphore(job.concurrency)
    bad = 0

    async def one(request: bytes, cert: str, key: str) -> None:
        nonlocal bad
        async with gate:
            try:
                ok = await _x509_one(job.port, request, cert, key, job.expect)
            except (OSError, ssl.SSLError):
                ok = False
            bad += not ok

    await asyncio.gather(*(one(*c) for c in job.connections))
    return len(job.connections), bad


def _x509_worker(job: X509Job) -> tuple[int, int]:
    return asyncio.run(_x509_run(job))


def run_x509(
    port: int,
    connections: list[tuple[bytes, str, str]],
    *,
    expect: bytes,
    concurrency: int,
    processes: int,
    pid: int,
    db_pid: int | None = None,
) -> Run:
    """Each connection once, from ``processes`` processes; like :func:`run_wrk`'s result (no
    latency percentiles)."""
    parts = [connections[i::processes] for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        # start the processes before the clock (their imports are not the server's work)
        list(pool.map(int, range(processes)))
        db_before = process_tree_cpu(db_pid) if db_pid else 0.0
        before, started = process_tree_times(pid), time.monotonic()
        results = list(
            pool.map(
                _x509_worker,
                [X509Job(port, part, max(1, concurrency // processes), expect) for part in parts],
            )
        )
        elapsed, after = time.monotonic() - started, process_tree_times(pid)
        db_cpu = process_tree_cpu(db_pid) - db_before if db_pid else 0.0
    cpu, stime = sum(after) - sum(before), after[1] - before[1]
    return Run(
        sum(r[0] for r in results), elapsed, cpu, sum(r[1] for r in results), 0, db_cpu=db_cpu, stime=stime
    )


def x509_devices(work: Path, count: int) -> tuple[str, list[tuple[str, str, str]]]:
    """A root CA (its PEM, for the group), and ``count`` devices (id, chain file, key file)
    issued by an intermediate CA below it."""
    root = pki.make_root_ca("provisiond bench root")
    intermediate = pki.make_intermediate_ca("provisiond bench intermediate", root)
    devices = issue_devices(work / "x509", intermediate, [f"x-{i:07d}" for i in range(count)])
    return pki.certificate_pem(root.cert).decode(), devices


def issue_devices(folder: Path, intermediate: pki.Issued, ids: Sequence[str]) -> list[tuple[str, str, str]]:
    """A device certificate below ``intermediate`` for each id, its chain (leaf and
    intermediate) and key written in ``folder`` (created): (id, chain file, key file)."""
    folder.mkdir()
    devices = []
    for reg in ids:
        issued = pki.make_device_cert(reg, intermediate)
        cert, key = folder / f"{reg}.pem", folder / f"{reg}.key"
        pki.write_certificates(cert, issued.presented_chain)
        pki.write_private_key(key, issued.key)
        devices.append((reg, str(cert), str(key)))
    return devices


def write_requests(path: Path, lines: list[tuple[str, str, str, str]]) -> None:
    with path.open("w") as out:
        for method, target, token, body in lines:
            out.write(f"{method}\t{target}\t{token}\t{body}\n")


def device_lines(
    id_scope: str, devices: list[tuple[str, str]], expiry: int
) -> list[tuple[str, str, str, str]]:
    lines = []
    for reg, key in devices:
        token = build_sas_token(f"{id_scope}/registrations/{reg}", key, expiry, key_name="registration")
        body = json.dumps({"registrationId": reg})
        lines.append(
            ("PUT", f"/{id_scope}/registrations/{reg}/register?api-version={API_VERSION}", token, body)
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=20000, help="distinct devices per registration phase")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--connections", type=int, default=64, help="requests in flight (wrk -c)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument(
        "--db",
        default="sqlite",
        help="backends to measure, in order, comma-separated: sqlite, postgresql (one table for all)",
    )
    parser.add_argument("--phases", default="trivial,group,individual,trivial,x509-trivial,x509-group")
    parser.add_argument(
        "--x509-devices", type=int, default=3000, help="connections (devices) of each X.509 phase"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the server's --log-level (info, its default, logs a line per registration)",
    )
    parser.add_argument(
        "--preload",
        type=int,
        default=0,
        help="run each backend twice: over --devices, then over this many enrolled and registered "
        "devices written into the database first (bench/_preload.py), adding the reregister phase",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="an extra argument for `provisiond serve` (repeat for several)",
    )
    parser.add_argument(
        "--pg-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a server setting for the throwaway PostgreSQL cluster beyond its defaults (repeat; "
        "printed with the figures). Durability settings (fsync, synchronous_commit, "
        "full_page_writes) are refused: the bench keeps PostgreSQL's",
    )
    parser.add_argument(
        "--pg-diagnose",
        action="store_true",
        help="after each PostgreSQL phase, print where its CPU went: per process type (user and "
        "system), WAL records, full-page images, bytes and flushes, checkpoints, rows and HOT "
        "updates, and the statements (pg_stat_statements, WAL I/O timing on: a little dearer)",
    )
    parser.add_argument(
        "--front",
        choices=["provisiond", "haproxy"],
        default="provisiond",
        help="haproxy: the wrk and X.509 phases through HAProxy running samples/haproxy/haproxy.cfg "
        "in front of `serve --front-port` (docs/tls-front.md), the CPU provisiond's and HAProxy's; "
        "the https/mqtt/amqp generator phases stay on provisiond's own ports",
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="count the server's instructions per request (valgrind's callgrind, on during the "
        "phases) instead of its CPU time: steady on a busy machine, about 50 times slower",
    )
    parser.add_argument(
        "--syscalls",
        action="store_true",
        help="count the server's system calls per request in each phase (perf stat on the kernel's "
        "tracepoints; with root also SQLite's commits and checkpoints): bench/_syscalls.py",
    )
    parser.add_argument(
        "--libraries",
        action="store_true",
        help="sample the server with perf record in each phase and share its CPU per request out "
        "by library (the interpreter, OpenSSL, the C library, the kernel, SQLite, ...), with each "
        "phase's difference from the first: bench/_libraries.py",
    )
    parser.add_argument(
        "--callgrind-dir",
        type=Path,
        help="keep callgrind's dumps here, one per phase (callgrind_annotate reads them); by "
        "default they go with the run's temporary directory",
    )
    args = parser.parse_args()
    durable = {"fsync", "synchronous_commit", "full_page_writes", "wal_sync_method", "wal_level"}
    if refused := [s for s in args.pg_setting if s.partition("=")[0] in durable]:
        parser.error(f"--pg-setting: the bench keeps PostgreSQL's durability settings; refused {refused}")
    backends = [name.strip() for name in args.db.split(",") if name.strip()]
    unknown = set(backends) - {"sqlite", "postgresql"}
    if unknown or not backends:
        parser.error(f"--db: unknown backend(s) {sorted(unknown)}; use sqlite, postgresql")
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    if args.callgrind and shutil.which("callgrind_control") is None:
        print("--callgrind needs valgrind (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    if args.syscalls:
        from _syscalls import available

        if (why := available()) is not None:
            print(why, file=sys.stderr)
            return 2
    if args.libraries:
        from _libraries import available as sampling

        if args.callgrind:
            parser.error("--libraries samples the server's CPU time; --callgrind counts instructions instead")
        if (why := sampling()) is not None:
            print(why, file=sys.stderr)
            return 2
    if args.callgrind and ("x509" in args.phases or args.preload or args.front != "provisiond"):
        parser.error(
            "--callgrind counts the wrk and generator phases of one server: no x509 phases, --preload or --front"
        )
    print(
        f"# server CPU per request (wrk, new TLS connection each), db {','.join(backends)}, "
        f"log level {args.log_level}, {args.connections} in flight"
    )
    print(f"# {machine_summary()}")
    if args.callgrind:
        print("# --callgrind: the server's instructions per request (k), not its CPU time")
    if "postgresql" in backends:
        print(
            "# PostgreSQL settings: "
            + (", ".join(args.pg_setting) + " (NOT the defaults)" if args.pg_setting else "the defaults")
            + (
                ", plus pg_stat_statements and track_wal_io_timing (--pg-diagnose)"
                if args.pg_diagnose
                else ""
            )
        )
    results: list[tuple[str, list[Phase]]] = []
    with terminate_on_signals():
        for backend in backends:
            for preload in (args.devices, args.preload) if args.preload else (0,):
                phases = _run_backend(backend, args, preload)
                if phases is None:
                    return 2
                results.append((f"{backend} {preload:,} devices" if preload else backend, phases))
    _print_table(results)
    _print_transports(results)
    return 0


def _run_backend(backend: str, args: argparse.Namespace, preload: int = 0) -> list[Phase] | None:
    """Start a server on ``backend`` (and a throwaway PostgreSQL cluster for it), run the phases."""
    with tempfile.TemporaryDirectory(prefix="provisiond-cpu-") as tmp:
        work = Path(tmp)
        extra: list[str] = []
        pg = None
        db_pid: int | None = None
        if backend == "postgresql":
            from _pg import PostgresCluster, find_bindir

            bindir = find_bindir()
            if bindir is None:
                print("PostgreSQL's server binaries are not installed", file=sys.stderr)
                return None
            pg = PostgresCluster(bindir, settings=args.pg_setting, diagnose=args.pg_diagnose)
            extra = ["--db", pg.start()]
            db_pid = int((pg.data / "postmaster.pid").read_text().split()[0])
        front_port = free_port()
        if args.front == "haproxy":
            extra += ["--front-port", str(front_port), "--trusted-front", "127.0.0.1"]
        try:
            server_args = (*extra, "--log-level", args.log_level, *args.server_arg)
            callgrind = None
            if args.callgrind:
                callgrind = Callgrind(args.callgrind_dir or work)
                callgrind.out_dir.mkdir(parents=True, exist_ok=True)
            server = start_server(
                work / "data",
                *server_args,
                timeout=600.0 if callgrind else 60.0,
                wrapper=callgrind.wrapper() if callgrind else (),
            )
            try:
                reregister: list[tuple[str, str]] = []
                if preload:
                    from _preload import preload as fill

                    db_url = (
                        extra[1]
                        if backend == "postgresql"
                        else f"sqlite:///{work / 'data' / 'provisiond.db'}"
                    )
                    server, reregister = fill(server, db_url, work, preload, server_args, args.devices)
                stats = pg.stats if pg is not None else None
                snapshot = pg.snapshot if pg is not None and args.pg_diagnose else None
                with contextlib.ExitStack() as stack:
                    front = None
                    if args.front == "haproxy":
                        front = _haproxy_front(stack, work, front_port)
                    syscalls = _syscall_counter(stack, server.pid) if args.syscalls else None
                    libraries = _library_sampler(stack, server.pid) if args.libraries else None
                    return _measure(
                        server,
                        work,
                        args,
                        backend,
                        db_pid,
                        reregister,
                        stats,
                        front,
                        snapshot,
                        callgrind,
                        syscalls,
                        libraries,
                    )
            finally:
                server.stop()
        finally:
            if pg is not None:
                pg.stop()


def _print_db_stats(
    name: str, before: dict[str, float], stats: Callable[[], dict[str, float]], requests: int
) -> None:
    """PostgreSQL's side of a phase (``bench/_pg.py`` ``stats``): its pool connections at the end,
    and per request the commits, WAL bytes and WAL flushes (fewer: larger batches); checkpoints
    and autovacuum runs during it."""
    time.sleep(1.5)  # backends report their statistics about a second after they go idle
    after = stats()
    d = {key: after[key] - before[key] for key in after}
    per = max(requests, 1)
    print(
        f"{'':<10} {name:<11} pg: {after['connections']:.0f} connections, {d['commits'] / per:.2f} commits/req, "
        f"{d['wal_bytes'] / per:,.0f} WAL bytes/req, {d['wal_syncs'] / per:.3f} WAL flushes/req, "
        f"{d['checkpoints']:.0f} checkpoints, {d['autovacuums']:.0f} autovacuum/analyze runs",
        flush=True,
    )


def _print_table(results: list[tuple[str, list[Phase]]]) -> None:
    """One table for every backend: rates, latency, CPU per request, the ratios to the trivial
    request and, with several backends, each phase's rate against the first backend's."""

    def baseline(phases: list[Phase], name: str) -> float:
        trivial = [p for p in phases if p.name == name]
        if not trivial:
            return float("nan")
        return _ratio(sum(p.spent for p in trivial), sum(p.requests for p in trivial)) * 1e6

    def mean_rate(phases: list[Phase], name: str) -> float:
        runs = [p for p in phases if p.name == name]
        return _ratio(sum(p.requests for p in runs), sum(p.seconds for p in runs))

    first_backend, first = results[0]
    print()
    cost = _cost_label(results)
    print(
        f"| db | phase | req/s | p50 ms | p99 ms | {cost} | of it system µs/req | ratio (trivial's / phase's) "
        f"| database CPU µs/req | rate / {first_backend}'s | non-2xx | socket errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for backend, phases in results:
        bases = {"wrk": baseline(phases, "trivial"), "x509": baseline(phases, "x509-trivial")}
        for p in phases:
            base = bases["x509" if p.name.startswith("x509") else "wrk"]
            versus = _ratio(p.rate, mean_rate(first, p.name))
            print(
                f"| {backend} | {p.name} | {p.rate:.0f} | {p.p50:.1f} | {p.p99:.1f} | {p.cost:.0f} | {p.stime_us:.0f} "
                f"| {_ratio(base, p.cost):.2f} | {p.db_cpu_us:.0f} | {versus:.2f} | {p.bad_status} | {p.socket_errors} |"
            )


def _syscall_counter(stack: contextlib.ExitStack, pid: int) -> Any:
    """``--syscalls``: a counter of the server's system calls (bench/_syscalls.py), with SQLite's
    uprobes while it lives."""
    from _syscalls import SyscallCounter, sqlite_probes

    counter = SyscallCounter(pid, stack.enter_context(sqlite_probes(pid)))
    stack.callback(counter.close)
    return counter


def _library_sampler(stack: contextlib.ExitStack, pid: int) -> Any:
    """``--libraries``: a sampler of the server's CPU by library (bench/_libraries.py)."""
    from _libraries import LibrarySampler

    sampler = LibrarySampler(pid)
    stack.callback(sampler.close)
    return sampler


def _haproxy_front(stack: contextlib.ExitStack, work: Path, front_port: int) -> tuple[int, int]:
    """``--front haproxy``: HAProxy from the sample config, forwarding to provisiond's front port
    (bench/_offload.py): (its TLS port, its pid)."""
    from _offload import sample_haproxy

    port = free_port()
    haproxy = stack.enter_context(
        sample_haproxy(work, work / "data" / "pki", port=port, front_port=front_port, resume=False)
    )
    print(f"# through HAProxy (samples/haproxy/haproxy.cfg) on port {port}", flush=True)
    return port, haproxy.pid


_CPU_LABEL = "server CPU µs/req"


def _cost_label(results: list[tuple[str, list[Phase]]]) -> str:
    """The tables' cost column: CPU time, or instructions with ``--callgrind``."""
    counted = any(p.instructions is not None for _, phases in results for p in phases)
    return "server k instructions/req (callgrind)" if counted else _CPU_LABEL


def _ratio(a: float, b: float) -> float:
    """``a / b``, or nan when ``b`` is 0 (a phase too short for the kernel's CPU clock ticks, or
    none ran): a table cell, never a ZeroDivisionError."""
    return a / b if b else float("nan")


def _measure(
    server,
    work: Path,
    args: argparse.Namespace,
    backend: str,
    db_pid: int | None,
    reregister: list[tuple[str, str]] | None = None,
    db_stats: Callable[[], dict[str, float]] | None = None,
    front: tuple[int, int] | None = None,
    db_snapshot: Callable[[], dict[str, Any]] | None = None,
    callgrind: Callgrind | None = None,
    syscalls: Any = None,
    libraries: Any = None,
) -> list[Phase]:  # type: ignore[no-untyped-def]
    info = server.info
    scope, port = info["idScope"], int(info["httpsPort"])
    if front is not None:  # --front haproxy: (HAProxy's port, its pid)
        port = front[0]
    api = server.api()
    expiry = int(time.time()) + 7200
    script = work / "bench.lua"
    script.write_text(LUA)
    files: dict[str, Path] = {}
    # trivial: a 404 on a new connection
    files["trivial"] = work / "trivial.tsv"
    write_requests(files["trivial"], [("GET", "/nothing", "", "")])
    # group: one symmetric-key group, devices derived from it
    group_key = base64.b64encode(os.urandom(64)).decode()
    api.request(
        "PUT",
        "/enrollmentGroups/bench-group",
        json.dumps(
            {
                "enrollmentGroupId": "bench-group",
                "attestation": {
                    "type": "symmetricKey",
                    "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key},
                },
            }
        ).encode(),
    )
    group_devices = [(f"g-{i:07d}", derive_device_key(group_key, f"g-{i:07d}")) for i in range(args.devices)]
    files["group"] = work / "group.tsv"
    write_requests(files["group"], device_lines(scope, group_devices, expiry))
    # individual: enrollments through the bulk API
    individual = [(f"i-{i:07d}", base64.b64encode(os.urandom(32)).decode()) for i in range(args.devices)]
    if "individual" in args.phases:
        for start in range(0, len(individual), 300):
            chunk = individual[start : start + 300]
            api.request(
                "POST",
                "/enrollments",
                json.dumps(
                    {
                        "mode": "create",
                        "enrollments": [
                            {
                                "registrationId": reg,
                                "attestation": {
                                    "type": "symmetricKey",
                                    "symmetricKey": {"primaryKey": key, "secondaryKey": key},
                                },
                            }
                            for reg, key in chunk
                        ],
                    }
                ).encode(),
            )
    files["individual"] = work / "individual.tsv"
    write_requests(files["individual"], device_lines(scope, individual, expiry))
    # reregister (--preload): preloaded devices registering again
    files["reregister"] = work / "reregister.tsv"
    write_requests(files["reregister"], device_lines(scope, reregister or [], expiry))
    x509_requests: dict[str, list[tuple[bytes, str, str]]] = {}
    if "x509" in args.phases:
        root_pem, x509 = x509_devices(work, args.x509_devices)
        # a new connection: the first one may have idled past the server's keep-alive timeout
        server.api().request(
            "PUT",
            "/enrollmentGroups/bench-x509",
            json.dumps(
                {
                    "enrollmentGroupId": "bench-x509",
                    "attestation": {
                        "type": "x509",
                        "x509": {"signingCertificates": {"primary": {"certificate": root_pem}}},
                    },
                }
            ).encode(),
        )
        x509_requests["x509-trivial"] = [
            (b"GET /nothing HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", cert, key)
            for _reg, cert, key in x509
        ]
        x509_requests["x509-group"] = [(_http_request(scope, reg), cert, key) for reg, cert, key in x509]
    url = f"https://127.0.0.1:{port}"
    if callgrind is not None:
        _warm_up(server, work, args, url, script, files["trivial"], scope, group_key, expiry)
        callgrind.measure_idle(server.pid)
    results: list[Phase] = []
    by_library: list[tuple[str, dict[str, float]]] = []
    for name in args.phases.split(","):
        stats_before = db_stats() if db_stats else None
        snapshot_before = db_snapshot() if db_snapshot else None
        front_before = process_tree_cpu(front[1]) if front is not None else 0.0
        if callgrind is not None:
            callgrind.start(server.pid)
        if syscalls is not None:
            syscalls.start()
        if libraries is not None:
            libraries.start()
        if name.split("-")[0] in _TRANSPORTS:
            run = _run_transport(name, server, group_key, args, db_pid)
        elif name.startswith("x509"):
            run = run_x509(
                port,
                x509_requests[name],
                expect=b"404" if name == "x509-trivial" else b"2",
                concurrency=args.connections,
                processes=2,
                pid=server.pid,
                db_pid=db_pid,
            )
        else:
            run = run_wrk(
                url,
                files[name],
                script,
                seconds=args.seconds,
                connections=args.connections,
                threads=args.threads,
                pid=server.pid,
                db_pid=db_pid,
            )
        instructions = callgrind.stop(server.pid, f"phase{len(results)}-{name}") if callgrind else None
        if front is not None:
            run.cpu += process_tree_cpu(front[1]) - front_before  # the front's CPU too
        bad = run.bad_status if name != "trivial" else 0  # a 404 is trivial's answer
        phase = Phase(
            name,
            run.requests,
            run.seconds,
            run.cpu,
            bad,
            run.socket_errors,
            run.p50,
            run.p99,
            run.db_cpu,
            instructions,
            run.stime,
        )
        results.append(phase)
        print(
            f"{backend:<10} {name:<11} {phase.rate:8.0f} req/s  p50 {phase.p50:6.1f} ms  p99 {phase.p99:6.1f} ms  "
            f"{phase.cpu_us:7.0f} us CPU/req (system {phase.stime_us:4.0f})  db {phase.db_cpu_us:5.0f} us/req  "
            + (f"{phase.cost:7.0f} k instructions/req  " if phase.instructions is not None else "")
            + f"non-2xx {phase.bad_status}  socket errors {phase.socket_errors}",
            flush=True,
        )
        if libraries is not None:
            by_library.append((name, libraries.stop(phase.cpu_us)))
            print(
                f"{'':<10} {name:<11} µs/req by library: "
                + ", ".join(f"{lib} {us:.0f}" for lib, us in by_library[-1][1].items() if us >= 1),
                flush=True,
            )
        if syscalls is not None:
            counts = syscalls.stop(phase.requests)
            print(
                f"{'':<10} {name:<11} per request: "
                + ", ".join(f"{label} {value:.3g}" for label, value in counts),
                flush=True,
            )
            wal = work / "data" / "provisiond.db-wal"
            if wal.exists():
                print(
                    f"{'':<10} {name:<11} SQLite's WAL file: {wal.stat().st_size / 2**20:.1f} MiB", flush=True
                )
        if stats_before is not None:
            _print_db_stats(name, stats_before, db_stats, phase.requests)
        if snapshot_before is not None and db_snapshot is not None:
            from _pg import diagnosis

            for line in diagnosis(snapshot_before, db_snapshot(), phase.requests):
                print(f"{'':<10} {name:<11} pg: {line}", flush=True)

    if by_library:
        from _libraries import print_table

        print_table(backend, by_library)
    return results


def _warm_up(  # type: ignore[no-untyped-def]
    server,
    work: Path,
    args: argparse.Namespace,
    url: str,
    script: Path,
    trivial: Path,
    scope: str,
    group_key: str,
    expiry: int,
) -> None:
    """``--callgrind``: each kind of phase once, uncounted, with devices of its own, before
    anything is counted: the first registrations of a process compile code (the AMQP codec's
    readers and writers, regular expressions, ...) and fill caches, which would otherwise count
    in the first phase that meets them (hundreds of requests under valgrind, not thousands)."""
    devices = [(f"w-{i:07d}", derive_device_key(group_key, f"w-{i:07d}")) for i in range(300)]
    warm = work / "warm-up.tsv"
    write_requests(warm, device_lines(scope, devices, expiry))
    for requests in (trivial, warm):
        run_wrk(
            url,
            requests,
            script,
            seconds=3,
            connections=args.connections,
            threads=args.threads,
            pid=server.pid,
        )
    for protocol in sorted({name.split("-")[0] for name in args.phases.split(",")} & set(_TRANSPORTS)):
        names = [f"w{protocol[0]}-{i:07d}" for i in range(100)]
        port = int(server.info[f"{protocol}Port"])
        run_transport(
            protocol,
            port,
            scope,
            group_key,
            names,
            concurrency=args.connections,
            seconds=3,
            processes=1,
            on_start=lambda: None,
        )
    print("# warmed up: a few seconds of each kind of phase, not counted", flush=True)


def _run_transport(name: str, server, group_key: str, args: argparse.Namespace, db_pid: int | None) -> Run:  # type: ignore[no-untyped-def]
    """An MQTT or AMQP phase (``bench/_transports.py``): group-derived devices of their own."""
    protocol, kind = name.split("-", 1)
    port = int(server.info[f"{protocol}Port"])
    names = [f"{protocol[0]}{kind[0]}-{i:07d}" for i in range(args.devices)]  # each phase its own devices
    marks: dict[str, float] = {}

    def start() -> None:
        marks["db"] = process_tree_cpu(db_pid) if db_pid else 0.0
        marks["user"], marks["system"] = process_tree_times(server.pid)

    done, bad, seconds, resumed = run_transport(
        {"group": protocol, "pipelined": f"{protocol}-pipelined"}.get(kind, "tls"),
        port,
        server.info["idScope"],
        group_key,
        names,
        concurrency=args.connections,
        seconds=args.seconds,
        processes=2,
        on_start=start,
    )
    user, system = process_tree_times(server.pid)
    cpu, stime = user + system - marks["user"] - marks["system"], system - marks["system"]
    print(f"# {name}: {resumed} of {done} connections resumed a TLS session", flush=True)
    db_cpu = process_tree_cpu(db_pid) - marks["db"] if db_pid else 0.0
    return Run(done, seconds, cpu, bad, 0, db_cpu=db_cpu, stime=stime)


#: The phases of bench/_transports.py's generator, by their name's first word.
_TRANSPORTS = ("https", "mqtt", "amqp")


def _print_transports(results: list[tuple[str, list[Phase]]]) -> None:
    """MQTT and AMQP against HTTPS in the same run: CPU per request and the ratios to wrk's
    ``group`` and to ``https-group`` (the same registration from this generator)."""

    def cpu_of(phases: list[Phase], name: str) -> float:
        runs = [p for p in phases if p.name == name]
        return _ratio(sum(p.spent for p in runs), sum(p.requests for p in runs)) * 1e6

    cost = _cost_label(results)
    unit = "µs" if cost == _CPU_LABEL else "k"
    for backend, phases in results:
        own = [p for p in phases if p.name.split("-")[0] in _TRANSPORTS]
        if not own:
            continue
        wrk, py = cpu_of(phases, "group"), cpu_of(phases, "https-group")
        print()
        print(
            f"| db | phase | req/s | {cost} | x group's (wrk, {wrk:.0f} {unit}) "
            f"| x https-group's ({py:.0f} {unit}) | failed |"
        )
        print("|---|---|---|---|---|---|---|")
        for p in own:
            print(
                f"| {backend} | {p.name} | {p.rate:.0f} | {p.cost:.0f} | {_ratio(p.cost, wrk):.2f} "
                f"| {_ratio(p.cost, py):.2f} | {p.bad_status} |"
            )


def _http_request(scope: str, reg: str) -> bytes:
    body = json.dumps({"registrationId": reg}).encode()
    return (
        f"PUT /{scope}/registrations/{reg}/register?api-version={API_VERSION} HTTP/1.1\r\n"
        f"Host: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


if __name__ == "__main__":
    sys.exit(main())
