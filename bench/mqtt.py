"""MQTT figures: registrations per second over MQTT (a new TLS connection per device), the
server memory held by idle MQTT connections, and the official Python SDK's ``register()`` time.

    python bench/mqtt.py [--devices 2000] [--concurrency 100] [--idle 10000] [--sdk 100] [--parts rate,idle,sdk]

* **rate**: N enrolled devices (symmetric keys), each opens its own TLS connection to the MQTT
  port and sends CONNECT + SUBSCRIBE + the register PUBLISH in one write (as the project's
  client does), waits for the answer, acknowledges it and disconnects. ``--clients`` load
  processes share the 2 cores with the server, so the absolute rate is a floor.
* **idle**: ``--idle`` connections that each CONNECT (keep-alive 0: the server closes them only
  after ``--session-idle-timeout``, 240 s) and SUBSCRIBE, then sit idle; they all come from
  127.0.0.1, so the server runs without connection caps. The figure is the server process's RSS after minus before
  (the clients live in this process and are not counted); the target is under 1 GiB for 10,000.
* **sdk**: ``--sdk`` devices provisioned one after another with the official
  ``azure-iot-device`` ``ProvisioningDeviceClient`` over MQTT (it connects to port 8883 only,
  so this part needs 8883 free on 127.0.0.1); p50 and p99 of the time from ``register()`` to
  its result (target: under 50 ms). It runs on a second server; rate and idle use free ports.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import resource
import ssl
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Server,
    human_bytes,
    machine_summary,
    percentile,
    port_is_free,
    rss_of,
    start_server,
    terminate_on_signals,
)

from provisiond.protocol.mqtt import MqttConnection, Publish, Role, Suback, Subscription
from provisiond.protocol.sas import build_sas_token
from provisiond.protocol.topics import RESPONSE_FILTER, build_username, register_topic

API_VERSION = "2021-06-01"
SDK_MQTT_PORT = 8883


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _context(ca_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca_file)
    return ctx


def _client(
    scope: str, reg: str, key: str, *, keep_alive: int, publish: bool
) -> tuple[MqttConnection, bytes]:
    """A client machine that queued CONNECT, SUBSCRIBE (and the register PUBLISH); its bytes."""
    client = MqttConnection(Role.CLIENT, clock=time.monotonic)
    token = build_sas_token(
        f"{scope}/registrations/{reg}", key, int(time.time()) + 3600, key_name="registration"
    )
    client.connect(
        client_id=reg,
        username=build_username(scope, reg, api_version=API_VERSION, client_version="bench"),
        password=token.encode(),
        keep_alive=keep_alive,
    )
    client.subscribe([Subscription(topic_filter=RESPONSE_FILTER)])
    if publish:
        client.publish(register_topic("1"), json.dumps({"registrationId": reg}).encode())
    return client, client.get_outbound_data()


# --- rate ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateJob:
    port: int
    ca_file: str
    scope: str
    devices: list[tuple[str, str]]
    concurrency: int


async def _register_one(job: RateJob, ctx: ssl.SSLContext, reg: str, key: str) -> tuple[float, str]:
    """Seconds taken and the outcome ("ok", or why not)."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", job.port, ssl=ctx, server_hostname="localhost"
    )
    machine, data = _client(job.scope, reg, key, keep_alive=60, publish=True)
    writer.write(data)
    outcome = "closed before the answer"
    while outcome == "closed before the answer":
        data = await reader.read(65536)
        if not data:
            break
        for packet in machine.feed_bytes(data):
            if isinstance(packet, Publish):
                machine.acknowledge(packet)
                assigned = (
                    packet.topic.startswith("$dps/registrations/res/202/")
                    and b'"status":"assigned"' in packet.payload
                )
                outcome = "ok" if assigned else f"answer {packet.topic[23:26]}: {packet.payload[:120]!r}"
    machine.disconnect()
    writer.write(machine.get_outbound_data())
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass
    return time.perf_counter() - start, outcome


async def _rate_job(job: RateJob) -> tuple[list[float], dict[str, int], float]:
    ctx = _context(job.ca_file)
    semaphore = asyncio.Semaphore(job.concurrency)
    latencies: list[float] = []
    failures: Counter[str] = Counter()

    async def device(reg: str, key: str) -> None:
        async with semaphore:
            try:
                elapsed, outcome = await _register_one(job, ctx, reg, key)
            except (OSError, ssl.SSLError) as exc:
                failures[f"{type(exc).__name__}: {exc}"] += 1
                return
            if outcome == "ok":
                latencies.append(elapsed)
            else:
                failures[outcome] += 1

    start = time.perf_counter()
    await asyncio.gather(*(device(r, k) for r, k in job.devices))
    return latencies, dict(failures), time.perf_counter() - start


def _rate_worker(job: RateJob) -> tuple[list[float], dict[str, int], float]:
    import uvloop

    return uvloop.run(_rate_job(job))


def _enroll(server: Server, devices: list[tuple[str, str]]) -> None:
    with server.api() as api:
        for start in range(0, len(devices), 300):
            batch = [
                {
                    "registrationId": reg,
                    "attestation": {
                        "type": "symmetricKey",
                        "symmetricKey": {"primaryKey": key, "secondaryKey": key},
                    },
                }
                for reg, key in devices[start : start + 300]
            ]
            api.request("POST", "/enrollments", json.dumps({"mode": "create", "enrollments": batch}).encode())


def _devices(prefix: str, count: int) -> list[tuple[str, str]]:
    return [
        (f"{prefix}-{i:07d}", base64.b64encode(f"{prefix}-key-{i:08d}-padding!!".encode()).decode())
        for i in range(count)
    ]


def bench_rate(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    devices = _devices("mqtt-rate", args.devices)
    _enroll(server, devices)
    port, ca, scope = int(server.info["mqttPort"]), server.ca_file, str(server.info["idScope"])
    per = max(1, args.concurrency // args.clients)
    jobs = [RateJob(port, ca, scope, devices[i :: args.clients], per) for i in range(args.clients)]
    _rate_worker(RateJob(port, ca, scope, devices[:20], 5))  # warm-up (re-registrations)
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        results = pool.map(_rate_worker, jobs)
    wall = time.perf_counter() - start
    latencies = [x for r in results for x in r[0]]
    failures: Counter[str] = Counter()
    for r in results:
        failures.update(r[1])
    return {
        "registrations": len(latencies),
        "failures": sum(failures.values()),
        "why": failures.most_common(5),
        "per_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


# --- idle connections ------------------------------------------------------------------------------


async def _idle(server: Server, count: int, opening: int) -> dict[str, Any]:
    port, ca, scope = int(server.info["mqttPort"]), server.ca_file, str(server.info["idScope"])
    ctx = _context(ca)
    key = base64.b64encode(b"idle-connections-do-not-register").decode()
    semaphore = asyncio.Semaphore(opening)
    writers: list[asyncio.StreamWriter] = []
    failures = 0

    async def open_one(i: int) -> None:
        nonlocal failures
        reg = f"idle-{i:06d}"
        async with semaphore:
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
                )
                machine, data = _client(scope, reg, key, keep_alive=0, publish=False)
                writer.write(data)
                got: list[Any] = []
                while not any(isinstance(p, Suback) for p in got):
                    data = await asyncio.wait_for(reader.read(4096), 30)
                    if not data:
                        raise ConnectionError("closed")
                    got += machine.feed_bytes(data)
                writers.append(writer)
            except (OSError, ssl.SSLError, TimeoutError):
                failures += 1

    await asyncio.sleep(1)
    before, _ = rss_of(server.pid)
    start = time.perf_counter()
    await asyncio.gather(*(open_one(i) for i in range(count)))
    opened_in = time.perf_counter() - start
    await asyncio.sleep(3)
    after, peak = rss_of(server.pid)
    for writer in writers:
        writer.close()
    await asyncio.sleep(1)
    return {
        "connections": len(writers),
        "failures": failures,
        "open_s": opened_in,
        "rss_before": before,
        "rss_after": after,
        "rss_peak": peak,
        "held": after - before,
        "per_connection": (after - before) / max(1, len(writers)),
    }


def bench_idle(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    return uvloop.run(_idle(server, args.idle, args.opening))


# --- the official SDK ------------------------------------------------------------------------------


def bench_sdk(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    from azure.iot.device import ProvisioningDeviceClient

    devices = _devices("sdk", args.sdk)
    _enroll(server, devices)
    ca_pem = Path(server.ca_file).read_text()
    times: list[float] = []
    for reg, key in devices:
        client = ProvisioningDeviceClient.create_from_symmetric_key(
            provisioning_host="localhost",
            registration_id=reg,
            id_scope=str(server.info["idScope"]),
            symmetric_key=key,
            server_verification_cert=ca_pem,
        )
        start = time.perf_counter()
        result = client.register()
        times.append(time.perf_counter() - start)
        if result.status != "assigned":
            raise RuntimeError(f"{reg}: {result}")
    return {
        "devices": len(times),
        "p50_ms": percentile(times, 50) * 1000,
        "p99_ms": percentile(times, 99) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=2000, help="registrations for the rate")
    parser.add_argument(
        "--concurrency", type=int, default=100, help="devices in flight at once (all clients)"
    )
    parser.add_argument("--clients", type=int, default=2, help="load generator processes for the rate")
    parser.add_argument("--idle", type=int, default=10_000, help="idle connections to hold")
    parser.add_argument("--opening", type=int, default=100, help="idle connections being opened at once")
    parser.add_argument("--sdk", type=int, default=100, help="devices provisioned with the official SDK")
    parser.add_argument("--parts", default="rate,idle,sdk")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",")}
    limit = _raise_fd_limit()  # the server, a child, inherits it
    print(f"# MQTT bench; open files limit {limit}")
    print(f"# {machine_summary()}")
    with terminate_on_signals(), tempfile.TemporaryDirectory(prefix="provisiond-bench-mqtt-") as tmp:
        if parts & {"rate", "idle"}:
            # One source address holds all the idle connections: no caps (the open-file reserve stays).
            server = start_server(
                Path(tmp) / "server", "--max-connections", "0", "--max-connections-per-address", "0"
            )
            try:
                if "rate" in parts:
                    r = bench_rate(server, args)
                    print(
                        f"rate: {r['per_s']:.0f} registrations/s over MQTT (new TLS connection each), "
                        f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, {r['registrations']} done, "
                        f"{r['failures']} failures",
                        flush=True,
                    )
                    for why, count in r["why"]:
                        print(f"  failed {count}x: {why}", flush=True)
                if "idle" in parts:
                    i = bench_idle(server, args)
                    print(
                        f"idle: {i['connections']} connections ({i['failures']} failures, opened in {i['open_s']:.1f} s): "
                        f"server RSS {human_bytes(i['rss_before'])} -> {human_bytes(i['rss_after'])} "
                        f"(+{human_bytes(i['held'])}, {human_bytes(i['per_connection'])} per connection; "
                        f"peak {human_bytes(i['rss_peak'])})",
                        flush=True,
                    )
            finally:
                server.stop()
        if "sdk" in parts:
            # The listeners use SO_REUSEPORT (workers share a port), so a second server on 8883
            # would silently share its connections: insist on a free port.
            if not port_is_free(SDK_MQTT_PORT):
                raise SystemExit(f"port {SDK_MQTT_PORT} on 127.0.0.1 is in use; the SDK part needs it")
            server = start_server(Path(tmp) / "sdk", "--mqtt-port", str(SDK_MQTT_PORT))
            try:
                s = bench_sdk(server, args)
                print(
                    f"sdk: azure-iot-device register() over MQTT, {s['devices']} devices: "
                    f"p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms",
                    flush=True,
                )
            finally:
                server.stop()


if __name__ == "__main__":
    main()
