"""Registration throughput over HTTPS: N simulated devices, each on its own new TLS connection,
registering with symmetric keys against one ``provisiond serve`` on this machine.

For each server configuration it prints registrations per second, the p50/p99 time from the
start of the TCP connect to the assigned answer, and the ratio to the same server stack
answering a trivial request (``GET /healthz``) on a new TLS connection: the ceiling this
machine and stack allow for "one device, one new connection".

    python bench/registrations.py [--devices 3000] [--concurrency 200] [--configs ec,rsa,ec-2w,ec-resume]

Configurations: ``ec`` (ECDSA P-256 server certificate, 1 worker), ``rsa`` (RSA-2048),
``ec-2w`` (2 worker processes), ``ec-resume`` (clients resume TLS sessions). The load
generator runs on the same 2 cores as the server (in ``--clients`` processes), so absolute
figures are a floor; the ratios are what compare.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import re
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_summary, percentile, start_server, terminate_on_signals

from provisiond import pki
from provisiond.protocol.sas import build_sas_token

API_VERSION = "2021-06-01"


@dataclass(frozen=True)
class Job:
    host: str
    port: int
    ca_file: str
    id_scope: str
    devices: list[tuple[str, str]]  # (registration id, key)
    concurrency: int
    resume: bool
    trivial: bool


class _ResumingContext(ssl.SSLContext):
    """Client context that offers the last session it saw (asyncio has no session parameter)."""

    saved: ssl.SSLSession | None = None

    def wrap_bio(
        self,
        incoming: Any,
        outgoing: Any,
        server_side: bool = False,
        server_hostname: Any = None,
        session: Any = None,
    ) -> ssl.SSLObject:  # type: ignore[override]
        return super().wrap_bio(
            incoming, outgoing, server_side, server_hostname, session=session or self.saved
        )


def _client_context(ca_file: str, resume: bool) -> ssl.SSLContext:
    ctx: ssl.SSLContext = (
        _ResumingContext(ssl.PROTOCOL_TLS_CLIENT) if resume else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    )
    ctx.load_verify_locations(ca_file)
    ctx.check_hostname = True
    return ctx


async def _one(job: Job, ctx: ssl.SSLContext, reg_id: str, key: str) -> tuple[float, bool]:
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(job.host, job.port, ssl=ctx, server_hostname="localhost")
    if isinstance(ctx, _ResumingContext):
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.session is not None:
            ctx.saved = ssl_object.session
    if job.trivial:
        request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    else:
        token = build_sas_token(
            f"{job.id_scope}/registrations/{reg_id}", key, int(time.time()) + 3600, key_name="registration"
        )
        body = json.dumps({"registrationId": reg_id}).encode()
        request = (
            f"PUT /{job.id_scope}/registrations/{reg_id}/register?api-version={API_VERSION} HTTP/1.1\r\n"
            f"Host: localhost\r\nAuthorization: {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
    writer.write(request)
    data = await reader.read()
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass
    ok = (
        data.startswith(b"HTTP/1.1 200")
        if job.trivial
        else (b" 202 " in data[:20] and b'"status":"assigned"' in data)
    )
    return time.perf_counter() - start, ok


async def _run_job(job: Job) -> tuple[list[float], int, float]:
    ctx = _client_context(job.ca_file, job.resume)
    semaphore = asyncio.Semaphore(job.concurrency)
    latencies: list[float] = []
    failures = 0

    async def device(reg_id: str, key: str) -> None:
        nonlocal failures
        async with semaphore:
            try:
                elapsed, ok = await _one(job, ctx, reg_id, key)
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
                failures += 1
                return
            if ok:
                latencies.append(elapsed)
            else:
                failures += 1

    start = time.perf_counter()
    await asyncio.gather(*(device(r, k) for r, k in job.devices))
    return latencies, failures, time.perf_counter() - start


def _worker(job: Job) -> tuple[list[float], int, float]:
    try:
        import uvloop

        return uvloop.run(_run_job(job))
    except ImportError:  # pragma: no cover
        return asyncio.run(_run_job(job))


def _load(jobs: list[Job]) -> tuple[list[float], int, float]:
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        results = pool.map(_worker, jobs)
    wall = time.perf_counter() - start
    latencies = [x for r in results for x in r[0]]
    return latencies, sum(r[1] for r in results), wall


_LUA = """
local requests = {}
%s
local counter = 0
local offset = 0
local threads = 0
function setup(thread)
  thread:set("offset", threads)
  threads = threads + 1
end
function init(args)
  counter = offset
end
function request()
  counter = counter + 1
  return requests[(counter %% #requests) + 1]
end
"""


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _wrk(
    port: int, scope: str, devices: list[tuple[str, str]], args: argparse.Namespace, trivial: bool, root: Path
) -> dict[str, float]:
    """Drive the server with wrk (C, cheap on CPU): every request on a new TLS connection
    (``Connection: close``), cycling over the devices (later rounds are re-registrations)."""
    lines = []
    for i, (reg, key) in enumerate(devices, start=1):
        if trivial:
            lines.append(f'requests[{i}] = wrk.format("GET", "/healthz", {{["Connection"] = "close"}})')
            continue
        token = build_sas_token(
            f"{scope}/registrations/{reg}", key, int(time.time()) + 3600, key_name="registration"
        )
        body = json.dumps({"registrationId": reg})
        path = f"/{scope}/registrations/{reg}/register?api-version={API_VERSION}"
        lines.append(
            f'requests[{i}] = wrk.format("PUT", {_lua_string(path)}, {{["Authorization"] = {_lua_string(token)}, '
            f'["Content-Type"] = "application/json", ["Connection"] = "close"}}, {_lua_string(body)})'
        )
    script = root / ("trivial.lua" if trivial else "register.lua")
    script.write_text(_LUA % "\n".join(lines))
    command = [
        "wrk",
        "-t",
        str(args.clients),
        "-c",
        str(args.concurrency),
        "-d",
        f"{args.duration}s",
        "--latency",
        "-s",
        str(script),
        f"https://127.0.0.1:{port}",
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        if m is None:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    failures = int(errors.group(1)) if errors else 0
    if socket_errors:
        failures += sum(int(x) for x in socket_errors.groups())
    return {"rate": rate, "p50": pct("50"), "p99": pct("99"), "total": total, "failures": failures}


def _split(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[i::parts] for i in range(parts)]


def run_config(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    data_dir = root / name
    extra: list[str] = []
    if name.startswith("rsa"):
        ca = pki.make_root_ca("bench RSA CA", key_type="rsa")
        server = pki.make_server_cert(ca, ["localhost"], ["127.0.0.1"], key_type="rsa")
        prefix = root / f"{name}-server"
        pki.write_issued(pki.Issued(server.cert, server.key, (ca.cert,)), prefix, chain=True)
        pki.write_certificates(root / f"{name}-ca.pem", [ca.cert])
        extra += ["--server-cert", str(pki.chain_path(prefix)), "--server-key", str(pki.key_path(prefix))]
    if name.endswith("-2w"):
        extra += ["--workers", "2"]
    server = start_server(data_dir, *extra)
    try:
        ca_file = str(root / f"{name}-ca.pem") if name.startswith("rsa") else server.ca_file
        port = int(server.info["httpsPort"])
        scope = str(server.info["idScope"])
        devices = []
        with server.api() as api:
            batch: list[dict[str, Any]] = []
            for i in range(args.devices):
                key = base64.b64encode(f"bench-key-{i:08d}-padding-bytes!".encode()).decode()
                reg = f"bench-{i:07d}"
                devices.append((reg, key))
                batch.append(
                    {
                        "registrationId": reg,
                        "attestation": {
                            "type": "symmetricKey",
                            "symmetricKey": {"primaryKey": key, "secondaryKey": key},
                        },
                    }
                )
                if len(batch) == 300:
                    api.request(
                        "POST", "/enrollments", json.dumps({"mode": "create", "enrollments": batch}).encode()
                    )
                    batch = []
            if batch:
                api.request(
                    "POST", "/enrollments", json.dumps({"mode": "create", "enrollments": batch}).encode()
                )
        if args.load == "wrk":
            if name.endswith("-resume"):
                raise SystemExit("wrk cannot resume TLS sessions: run ec-resume with --load python")
            ceiling = _wrk(port, scope, devices, args, True, root)
            reg = _wrk(port, scope, devices, args, False, root)
            return {
                "config": name,
                "registrations": reg["total"],
                "failures": reg["failures"],
                "reg_per_s": reg["rate"],
                "p50_ms": reg["p50"],
                "p99_ms": reg["p99"],
                "ceiling_per_s": ceiling["rate"],
                "ceiling_failures": ceiling["failures"],
                "ceiling_p50_ms": ceiling["p50"],
                "ratio": reg["rate"] / ceiling["rate"] if ceiling["rate"] else 0.0,
            }
        resume = name.endswith("-resume")
        per = max(1, args.concurrency // args.clients)

        def jobs(trivial: bool) -> list[Job]:
            return [
                Job("127.0.0.1", port, ca_file, scope, part, per, resume, trivial)
                for part in _split(devices, args.clients)
            ]

        _load([Job("127.0.0.1", port, ca_file, scope, devices[:50], 10, resume, True)])  # warm-up
        ceiling_lat, ceiling_fail, ceiling_wall = _load(jobs(True))
        reg_lat, reg_fail, reg_wall = _load(jobs(False))
        ceiling_rate = len(ceiling_lat) / ceiling_wall
        reg_rate = len(reg_lat) / reg_wall
        return {
            "config": name,
            "registrations": len(reg_lat),
            "failures": reg_fail,
            "reg_per_s": reg_rate,
            "p50_ms": percentile(reg_lat, 50) * 1000,
            "p99_ms": percentile(reg_lat, 99) * 1000,
            "ceiling_per_s": ceiling_rate,
            "ceiling_failures": ceiling_fail,
            "ceiling_p50_ms": percentile(ceiling_lat, 50) * 1000,
            "ratio": reg_rate / ceiling_rate if ceiling_rate else 0.0,
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=3000)
    parser.add_argument(
        "--concurrency", type=int, default=200, help="devices in flight at once (all clients)"
    )
    parser.add_argument("--clients", type=int, default=2, help="load generator processes")
    parser.add_argument("--configs", default="ec,rsa,ec-2w,ec-resume")
    parser.add_argument(
        "--load",
        choices=["python", "wrk"],
        default="python",
        help="load generator: asyncio clients (latency includes connect+handshake) or wrk (cheaper on CPU; "
        "latency from request write; needs the wrk command)",
    )
    parser.add_argument("--duration", type=int, default=15, help="seconds per wrk run")
    args = parser.parse_args()
    print(
        f"# registration bench: {args.devices} devices, concurrency {args.concurrency}, {args.clients} client processes"
    )
    print(f"# {machine_summary()}")
    rows = []
    with terminate_on_signals(), tempfile.TemporaryDirectory(prefix="provisiond-bench-reg-") as tmp:
        for name in args.configs.split(","):
            row = run_config(name.strip(), args, Path(tmp))
            rows.append(row)
            print(
                f"{row['config']:<10} {row['reg_per_s']:8.0f} reg/s  p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                f"ceiling {row['ceiling_per_s']:7.0f} req/s  ratio {row['ratio']:.2f}  failures {row['failures']}",
                flush=True,
            )
    print()
    print("| config | registrations/s | p50 ms | p99 ms | trivial TLS req/s (ceiling) | ratio | failures |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['config']} | {row['reg_per_s']:.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
            f"{row['ceiling_per_s']:.0f} | {row['ratio']:.2f} | {row['failures']} |"
        )


if __name__ == "__main__":
    main()
