"""The TLS front alone: provisiond's trivial request against nginx on the same certificate, key,
TLS settings and cores, under ``wrk`` (a new TLS connection per request, ``Connection: close``),
server CPU per request from /proc (``bench/cpu.py``'s measure).

Fronts (``--fronts``, each measured ``--rounds`` times, alternating, so that both see the same
minutes of a shared machine):

- ``provisiond``: ``provisiond serve`` (one worker, SQLite, log level info), ``GET /nothing``
  answered 404 with DPS's error body and its log line: the trivial request of ``bench/cpu.py``;
- ``provisiond-healthz``: the same server, ``GET /healthz`` (200, no routing miss, no log line):
  what the 404's error answer costs is the difference;
- ``nginx``: Debian's nginx, **one worker process**, the provisiond's own server certificate
  chain and key (DATA_DIR/pki), TLS 1.2 and 1.3, a server-side session cache of 4,096 sessions
  per worker and no session tickets (``ssl_session_tickets off``, as provisiond's
  ``OP_NO_TICKET``), a client certificate requested and any accepted
  (``ssl_verify_client optional_no_ca``, as provisiond's accept-any callback), ``return 404`` and
  an access log line per request (provisiond logs its 4xx);
- ``haproxy``: Debian's HAProxy, one thread, the same chain, key and TLS settings as nginx
  (``bench/_offload.py``'s: ``verify optional`` with every verification error ignored, a
  4,096-session cache, no tickets), the client's chain put into request headers, answering the
  404 itself (``http-request return``), no log (not in the default list);
- ``uvicorn-bare``: uvicorn with its own TLS (``--ssl-certfile``, uvloop, httptools) and a
  20-line ASGI app answering 404: no guard, no client certificate requested, no client chain
  handed to the app, no Starlette: the floor of Python's ssl under uvicorn on this machine;
  ``uvicorn-asyncio`` the same on asyncio's event loop, ``uvicorn-h11`` with h11 instead of
  httptools (not in the default list).

    python bench/tls_front.py [--seconds 10] [--connections 64] [--rounds 2]
                              [--fronts provisiond,provisiond-healthz,nginx,uvicorn-bare]
                              [--baseline-src ../other-checkout/src]

``--offload`` measures something else (``bench/_offload.py``): provisiond serving TLS itself
against **HAProxy terminating TLS** in front of ``provisiond serve --front-port`` (the same
process, docs/tls-front.md), HAProxy running samples/haproxy/haproxy.cfg itself (no session
resumption; ``haproxy-resume``: the same with it on), on one database: the trivial request,
group registrations (wrk), and with ``--x509-devices N`` X.509 group registrations (full
handshakes), each front's CPU (provisiond's and HAProxy's together).

    python bench/tls_front.py --offload [--offload-phases trivial,group,x509-trivial,x509-group]
                              [--offload-fronts provisiond,haproxy,haproxy-resume,provisiond-2w]
                              [--devices 20000] [--x509-devices 1500] [--seconds 8] [--rounds 3]

nginx is not a dependency of provisiond or of its tests: install it for this bench only
(Debian: ``apt-get install nginx``; the bench runs the binary in the foreground with its own
configuration in a temporary directory and never touches the system's). Nothing here asserts a
figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Server, free_port, machine_summary, start_server, terminate_on_signals
from cpu import LUA, Run, run_wrk, write_requests

NGINX_CONF = """
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {work}/nginx-access.log;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache builtin:4096;
        ssl_session_tickets off;
        ssl_verify_client optional_no_ca;
        location / {{ return 404; }}
    }}
}}
"""

BARE_APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b'{"errorCode":404000,"message":"No such resource."}'
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
"""


@dataclass
class Front:
    name: str
    url: str
    pid: int
    requests: Path


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


@contextmanager
def _process(command: list[str], log: Path, what: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out, start_new_session=True)
    try:
        _wait_for_port(port, process, what)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@contextmanager
def nginx(work: Path, cert: Path, key: Path) -> Iterator[tuple[int, int]]:
    """nginx in the foreground, one worker: (its master's pid, its port)."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, port=port, cert=cert, key=key))
    command = [binary, "-p", str(work), "-c", str(conf), "-g", "daemon off;"]
    with _process(command, work / "nginx.out", "nginx", port) as process:
        yield process.pid, port


@contextmanager
def haproxy(work: Path, cert: Path, key: Path, session_cache: int) -> Iterator[tuple[int, int]]:
    """HAProxy in the foreground, one thread, answering 404 itself (bench/_offload.py's TLS
    settings, the client's chain put into headers as for the app): (its pid, its port)."""
    import _offload

    port = free_port()
    conf = _offload.write_haproxy_conf(
        work,
        port=port,
        cert_chain=cert,
        key=key,
        ca=cert.with_name("ca.pem"),
        session_cache=session_cache,
    )
    command = [_offload.haproxy_binary() or "haproxy", "-db", "-f", str(conf)]
    with _process(command, work / "haproxy.out", "haproxy", port) as process:
        yield process.pid, port


#: the bare uvicorn variants: (event loop, HTTP parser)
BARE = {
    "uvicorn-bare": ("uvloop", "httptools"),
    "uvicorn-asyncio": ("asyncio", "httptools"),
    "uvicorn-h11": ("uvloop", "h11"),
}


@contextmanager
def uvicorn_bare(work: Path, cert: Path, key: Path, loop: str, http: str) -> Iterator[tuple[int, int]]:
    (work / "bare_app.py").write_text(BARE_APP)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "bare_app:app",
        "--app-dir",
        str(work),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--loop",
        loop,
        "--http",
        http,
        "--no-access-log",
        "--log-level",
        "warning",
        "--lifespan",
        "off",
    ]
    with _process(command, work / "uvicorn.out", "uvicorn", port) as process:
        yield process.pid, port


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measurement")
    parser.add_argument("--connections", type=int, default=64, help="requests in flight (wrk -c)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--rounds", type=int, default=2, help="measurements of each front, alternating")
    parser.add_argument("--fronts", default="provisiond,provisiond-healthz,nginx,uvicorn-bare")
    parser.add_argument(
        "--baseline-src",
        help="also measure a provisiond from this source tree (a src/ directory, e.g. another "
        "checkout's), as the 'provisiond (baseline)' front, in the same rounds",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="an extra argument for `provisiond serve` (repeat for several)",
    )
    parser.add_argument("--offload", action="store_true", help="provisiond against HAProxy terminating TLS")
    parser.add_argument("--offload-phases", default="trivial,group,x509-trivial,x509-group")
    parser.add_argument(
        "--offload-fronts",
        default="provisiond,haproxy",
        help="--offload: also haproxy-resume (the sample config with session resumption on: what "
        "turning it off costs) and provisiond-2w (`provisiond serve --workers 2` on the same database)",
    )
    parser.add_argument(
        "--haproxy-session-cache",
        type=int,
        default=4096,
        help="the haproxy front (answering 404 itself): its TLS session cache (tune.ssl.cachesize); 0: "
        "no resumption, as samples/haproxy/haproxy.cfg; --offload runs the sample itself",
    )
    parser.add_argument("--devices", type=int, default=20000, help="--offload: devices per group phase")
    parser.add_argument("--x509-devices", type=int, default=1500, help="--offload: devices per X.509 phase")
    args = parser.parse_args()
    if args.offload:
        return _offload(args)
    names = [n.strip() for n in args.fronts.split(",") if n.strip()]
    unknown = set(names) - {"provisiond", "provisiond-healthz", "nginx", "haproxy", *BARE}
    if unknown:
        parser.error(f"--fronts: unknown {sorted(unknown)}")
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    if "nginx" in names and shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        print("nginx is not installed (Debian: apt-get install nginx)", file=sys.stderr)
        return 2
    print(f"# the TLS front: wrk, new TLS connection each, {args.connections} in flight")
    print(f"# {machine_summary()}")
    with terminate_on_signals(), tempfile.TemporaryDirectory(prefix="provisiond-tls-front-") as tmp:
        results = _measure(Path(tmp), names, args)
    print()
    print("| front | req/s | p50 ms | p99 ms | server CPU µs/req | CPU / nginx's | runs |")
    print("|---|---|---|---|---|---|---|")
    base = _cpu_us(results.get("nginx", []))
    for name in names:
        runs = results[name]
        rate = sum(r.requests for r in runs) / sum(r.seconds for r in runs)
        cpu = _cpu_us(runs)
        spread = "/".join(f"{r.cpu / max(r.requests, 1) * 1e6:.0f}" for r in runs)
        versus = f"{cpu / base:.2f}" if base else "-"  # a tiny run can read no CPU tick
        print(
            f"| {name} | {rate:.0f} | {runs[-1].p50:.1f} | {runs[-1].p99:.1f} | {cpu:.0f} "
            f"| {versus} | {spread} |"
        )
    print(f"# load average at end {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def _offload(args: argparse.Namespace) -> int:
    import _offload

    if shutil.which("wrk") is None or _offload.haproxy_binary() is None:
        print("wrk and haproxy are needed (Debian: apt-get install wrk haproxy)", file=sys.stderr)
        return 2
    print(f"# HAProxy terminating TLS against provisiond's own: {args.connections} in flight")
    print(f"# {machine_summary()}")
    with terminate_on_signals(), tempfile.TemporaryDirectory(prefix="provisiond-offload-") as tmp:
        results = _offload.measure(Path(tmp), args)
    _offload.print_table(results)
    print(f"# load average at end {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def _cpu_us(runs: list[Run]) -> float:
    requests = sum(r.requests for r in runs)
    return sum(r.cpu for r in runs) / requests * 1e6 if requests else float("nan")


def _measure(work: Path, names: list[str], args: argparse.Namespace) -> dict[str, list[Run]]:
    script = work / "bench.lua"
    script.write_text(LUA)
    missing, healthz = work / "nothing.tsv", work / "healthz.tsv"
    write_requests(missing, [("GET", "/nothing", "", "")])
    write_requests(healthz, [("GET", "/healthz", "", "")])
    server = start_server(work / "data", "--log-level", "info", *args.server_arg)
    try:
        pki = work / "data" / "pki"
        cert, key = pki / "server-chain.pem", pki / "server.key"
        fronts: list[Front] = []
        url = f"https://127.0.0.1:{server.info['httpsPort']}"
        if "provisiond" in names:
            fronts.append(Front("provisiond", url, server.pid, missing))
        if "provisiond-healthz" in names:
            fronts.append(Front("provisiond-healthz", url, server.pid, healthz))
        with _others(work, names, cert, key, args) as others, _baseline(work, args) as baseline:
            for name, (pid, port) in others.items():
                fronts.append(Front(name, f"https://127.0.0.1:{port}", pid, missing))
            fronts.sort(key=lambda f: names.index(f.name))
            if baseline is not None:
                base_url = f"https://127.0.0.1:{baseline.info['httpsPort']}"
                fronts.insert(0, Front("provisiond (baseline)", base_url, baseline.pid, missing))
                names.insert(0, "provisiond (baseline)")
            results: dict[str, list[Run]] = {f.name: [] for f in fronts}
            for _round in range(args.rounds):
                for front in fronts:
                    run = run_wrk(
                        front.url,
                        front.requests,
                        script,
                        seconds=args.seconds,
                        connections=args.connections,
                        threads=args.threads,
                        pid=front.pid,
                    )
                    results[front.name].append(run)
                    print(
                        f"{front.name:<19} {run.requests / run.seconds:8.0f} req/s  "
                        f"{run.cpu / max(run.requests, 1) * 1e6:6.0f} us CPU/req  socket errors "
                        f"{run.socket_errors}  load {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
    finally:
        server.stop()
    return results


@contextmanager
def _baseline(work: Path, args: argparse.Namespace) -> Iterator[Server | None]:
    """A second ``provisiond serve`` from the source tree ``--baseline-src`` (its own data
    directory), measured in the same rounds: before and after a change, in the same minutes."""
    if not args.baseline_src:
        yield None
        return
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (args.baseline_src, previous) if p)
    try:
        server = start_server(work / "baseline", "--log-level", "info", *args.server_arg)
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def _others(
    work: Path, names: list[str], cert: Path, key: Path, args: argparse.Namespace
) -> Iterator[dict[str, tuple[int, int]]]:
    started: dict[str, tuple[int, int]] = {}
    with ExitStack() as stack:
        if "nginx" in names:
            folder = work / "nginx"
            folder.mkdir()
            started["nginx"] = stack.enter_context(nginx(folder, cert, key))
        if "haproxy" in names:
            folder = work / "haproxy"
            folder.mkdir()
            started["haproxy"] = stack.enter_context(haproxy(folder, cert, key, args.haproxy_session_cache))
        for name, (loop, http) in BARE.items():
            if name in names:
                folder = work / name
                folder.mkdir()
                started[name] = stack.enter_context(uvicorn_bare(folder, cert, key, loop, http))
        yield started


if __name__ == "__main__":
    sys.exit(main())
