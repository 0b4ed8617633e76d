"""Built-in hub figures: idle devices and the server's memory, telemetry acknowledged at QoS 1
(beside the ceiling of the same listener answering PINGREQs), and direct-method round trips.

    python bench/hub.py [--idle 10000] [--telemetry 100] [--seconds 10] [--window 16]
                        [--methods 1000] [--calls 2000] [--clients 2] [--parts idle,telemetry,methods]

Every device is provisioned the real way first: an enrollment group with a symmetric key, each
device registering over HTTPS (keep-alive connections), which creates its identity in the
built-in hub. Devices then connect to the hub over MQTT on TLS (the MQTT port), with a SAS
token signed by the key derived from the group's, as the official SDKs do (clean session 0,
the user name ``{hub}/{deviceId}/?api-version=...``).

* **idle**: ``--idle`` devices connect, subscribe to methods, desired properties and
  cloud-to-device messages (what an SDK client holds), and sit idle (keep-alive 1200 s). The
  figure is the server process's RSS after minus before (the clients live in this process);
  target: under 1 GiB for 10,000.
* **telemetry**: ``--telemetry`` devices connect. First each keeps ``--window`` PINGREQs in
  flight for ``--seconds``: PINGRESPs per second are the listener's ceiling (no storage
  involved). Then
  each keeps ``--window`` QoS 1 telemetry PUBLISHes (a 64-byte JSON body, two application
  properties) in flight for ``--seconds``: PUBACKs per second (the hub acknowledges only once
  the message is committed to the database) and the PUBLISH-to-PUBACK latency. Load runs in
  ``--clients`` processes, which share the 2 cores with the server. Target: 5,000 messages/s.
* **methods**: ``--methods`` devices connect and answer every method at once (status 200,
  the request's payload back); the service side invokes ``--calls`` methods through the admin
  call (``POST /admin/linkedHubs/{hub}/devices/{id}/methods``: the body, answer and path
  through the broker that the hub REST API's ``POST /twins/{id}/methods`` shares; one
  keep-alive connection, one call at a time, a device picked at random each time) and takes
  the round trip, request to answer. Target: p99 under 50 ms with 1,000 devices connected.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import multiprocessing
import random
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Server,
    human_bytes,
    machine_summary,
    percentile,
    rss_of,
    start_server,
    terminate_on_signals,
)

from provisiond.protocol.hub_topics import (
    build_hub_username,
    method_response_topic,
    parse_method_request_topic,
    telemetry_topic,
)
from provisiond.protocol.mqtt import (
    Connack,
    MqttConnection,
    Pingresp,
    Puback,
    Publish,
    QoS,
    Role,
    Suback,
    Subscription,
)
from provisiond.protocol.sas import build_sas_token, derive_device_key
from provisiond.service_client import ConnectionString

DPS_API = "2021-06-01"
HUB_API = "2021-04-12"
FILTERS = (
    "$iothub/methods/POST/#",
    "$iothub/twin/PATCH/properties/desired/#",
    "devices/{id}/messages/devicebound/#",
)


def _raise_fd_limit() -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _context(ca_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca_file)
    ctx.check_hostname = False  # the hub's name need not resolve here; the CA still verifies
    return ctx


# --- provisioning ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    """Devices provisioned into the built-in hub."""

    hub: str
    devices: list[tuple[str, str]]  # (device id, key)


async def _register_all(server: Server, group_key: str, ids: list[str], concurrency: int) -> None:
    scope, port = str(server.info["idScope"]), int(server.info["httpsPort"])
    ctx = ssl.create_default_context(cafile=server.ca_file)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for reg in ids:
        queue.put_nowait(reg)
    failures: list[str] = []

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        try:
            while not queue.empty():
                reg = queue.get_nowait()
                key = derive_device_key(group_key, reg)
                token = build_sas_token(
                    f"{scope}/registrations/{reg}", key, int(time.time()) + 3600, key_name="registration"
                )
                body = json.dumps({"registrationId": reg}).encode()
                writer.write(
                    (
                        f"PUT /{scope}/registrations/{reg}/register?api-version={DPS_API} HTTP/1.1\r\n"
                        f"Host: localhost\r\nAuthorization: {token}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n"
                    ).encode()
                    + body
                )
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                answer = await reader.readexactly(length)
                if b'"status":"assigned"' not in answer:
                    failures.append(f"{reg}: {head[:20]!r} {answer[:200]!r}")
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if failures:
        raise RuntimeError(f"{len(failures)} registrations failed, e.g. {failures[0]}")


def provision(server: Server, prefix: str, count: int) -> Fleet:
    group_key = base64.b64encode(f"bench-hub-{prefix}-group-key-padding-padding".encode()).decode()
    group = {
        "enrollmentGroupId": f"bench-hub-{prefix}",
        "attestation": {
            "type": "symmetricKey",
            "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key},
        },
    }
    with server.api() as api:
        api.request("PUT", f"/enrollmentGroups/bench-hub-{prefix}", json.dumps(group).encode())
    ids = [f"{prefix}-{i:06d}" for i in range(count)]
    import uvloop

    start = time.perf_counter()
    uvloop.run(_register_all(server, group_key, ids, concurrency=32))
    print(f"# provisioned {count} devices ({prefix}) in {time.perf_counter() - start:.1f} s", flush=True)
    return Fleet(str(server.info["builtinHub"]), [(d, derive_device_key(group_key, d)) for d in ids])


# --- a device ----------------------------------------------------------------------------------------


@dataclass
class Device:
    """One device's MQTT connection to the hub (the project's sans-io machine over asyncio)."""

    hub: str
    device_id: str
    key: str
    machine: MqttConnection = field(init=False)
    reader: asyncio.StreamReader = field(init=False)
    writer: asyncio.StreamWriter = field(init=False)

    async def connect(
        self, port: int, ctx: ssl.SSLContext, *, keep_alive: int, subscribe: tuple[str, ...]
    ) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=self.hub
        )
        self.machine = MqttConnection(Role.CLIENT, clock=time.monotonic)
        token = build_sas_token(f"{self.hub}/devices/{self.device_id}", self.key, int(time.time()) + 3600)
        self.machine.connect(
            client_id=self.device_id,
            username=build_hub_username(self.hub, self.device_id, api_version=HUB_API, client_type="bench"),
            password=token.encode(),
            keep_alive=keep_alive,
            clean_session=False,
        )
        if subscribe:
            self.machine.subscribe(
                Subscription(topic_filter=f.format(id=self.device_id), qos=QoS.AT_LEAST_ONCE)
                for f in subscribe
            )
        self.flush()
        wanted: tuple[type, ...] = (Suback,) if subscribe else (Connack,)
        while True:
            packets = await self.receive(30)
            for packet in packets:
                if isinstance(packet, Connack) and packet.return_code != 0:
                    raise ConnectionError(f"{self.device_id}: CONNACK {int(packet.return_code)}")
            if any(isinstance(p, wanted) for p in packets):
                return

    def flush(self) -> None:
        data = self.machine.get_outbound_data()
        if data:
            self.writer.write(data)

    async def receive(self, wait: float | None = None) -> list[Any]:
        data = await asyncio.wait_for(self.reader.read(65536), wait)
        if not data:
            raise ConnectionError(f"{self.device_id}: the hub closed the connection")
        return self.machine.feed_bytes(data)

    def close(self) -> None:
        self.writer.close()


async def _connect_all(
    fleet: Fleet, port: int, ca_file: str, *, keep_alive: int, subscribe: tuple[str, ...], opening: int = 100
) -> tuple[list[Device], int]:
    ctx = _context(ca_file)
    semaphore = asyncio.Semaphore(opening)
    devices: list[Device] = []
    failures = 0

    async def one(device_id: str, key: str) -> None:
        nonlocal failures
        async with semaphore:
            device = Device(fleet.hub, device_id, key)
            try:
                await device.connect(port, ctx, keep_alive=keep_alive, subscribe=subscribe)
                devices.append(device)
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
                failures += 1
                if failures <= 3:
                    print(f"# connect failed: {exc}", flush=True)

    await asyncio.gather(*(one(d, k) for d, k in fleet.devices))
    return devices, failures


# --- idle ----------------------------------------------------------------------------------------------


async def _idle(server: Server, fleet: Fleet) -> dict[str, Any]:
    await asyncio.sleep(1)
    before, _ = rss_of(server.pid)
    start = time.perf_counter()
    devices, failures = await _connect_all(
        fleet, int(server.info["mqttPort"]), server.ca_file, keep_alive=1200, subscribe=FILTERS
    )
    opened_in = time.perf_counter() - start
    await asyncio.sleep(3)
    after, peak = rss_of(server.pid)
    for device in devices:
        device.close()
    await asyncio.sleep(1)
    return {
        "devices": len(devices),
        "failures": failures,
        "open_s": opened_in,
        "before": before,
        "after": after,
        "peak": peak,
        "per_device": (after - before) / max(1, len(devices)),
    }


# --- telemetry ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TelemetryJob:
    hub: str
    devices: list[tuple[str, str]]
    port: int
    ca_file: str
    seconds: float
    window: int


async def _pings(device: Device, until: float, window: int) -> int:
    """PINGREQs kept ``window`` in flight (as many as the telemetry phase's PUBLISHes) until
    ``until``; the PINGRESPs counted."""
    count = in_flight = 0
    while True:
        while time.monotonic() < until and in_flight < window:
            device.machine.ping()
            in_flight += 1
        device.flush()
        if not in_flight:
            return count
        answered = sum(isinstance(p, Pingresp) for p in await device.receive(30))
        count += answered
        in_flight -= answered


async def _publishes(device: Device, until: float, window: int, latencies: list[float]) -> int:
    body = json.dumps({"temperature": 21.5, "humidity": 40, "device": device.device_id[:20]}).encode()
    topic = telemetry_topic(
        device.device_id, [("$.ct", "application/json"), ("$.ce", "utf-8"), ("level", "info")]
    )
    sent: dict[int, float] = {}
    acked = 0
    while True:
        now = time.monotonic()
        while now < until and len(sent) < window:
            packet_id = device.machine.publish(topic, body, qos=QoS.AT_LEAST_ONCE)
            assert packet_id is not None
            sent[packet_id] = now
        device.flush()
        if not sent:
            return acked
        for packet in await device.receive(30):
            if isinstance(packet, Puback) and packet.packet_id in sent:
                latencies.append(time.monotonic() - sent.pop(packet.packet_id))
                acked += 1


async def _telemetry_job(job: TelemetryJob) -> dict[str, Any]:
    fleet = Fleet(job.hub, job.devices)
    devices, failures = await _connect_all(fleet, job.port, job.ca_file, keep_alive=1200, subscribe=())
    until = time.monotonic() + job.seconds
    start = time.perf_counter()
    pings = sum(await asyncio.gather(*(_pings(d, until, job.window) for d in devices)))
    ping_wall = time.perf_counter() - start
    latencies: list[float] = []
    until = time.monotonic() + job.seconds
    start = time.perf_counter()
    acked = sum(await asyncio.gather(*(_publishes(d, until, job.window, latencies) for d in devices)))
    publish_wall = time.perf_counter() - start
    for device in devices:
        device.close()
    return {
        "devices": len(devices),
        "failures": failures,
        "pings": pings,
        "ping_wall": ping_wall,
        "acked": acked,
        "publish_wall": publish_wall,
        "latencies": latencies,
    }


def _telemetry_worker(job: TelemetryJob) -> dict[str, Any]:
    import uvloop

    return uvloop.run(_telemetry_job(job))


def bench_telemetry(server: Server, fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    port = int(server.info["mqttPort"])
    jobs = [
        TelemetryJob(
            fleet.hub, fleet.devices[i :: args.clients], port, server.ca_file, args.seconds, args.window
        )
        for i in range(args.clients)
    ]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        results = pool.map(_telemetry_worker, jobs)
    latencies = [x for r in results for x in r["latencies"]]
    return {
        "devices": sum(r["devices"] for r in results),
        "failures": sum(r["failures"] for r in results),
        "pings_per_s": sum(r["pings"] for r in results) / max(r["ping_wall"] for r in results),
        "acked_per_s": sum(r["acked"] for r in results) / max(r["publish_wall"] for r in results),
        "acked": sum(r["acked"] for r in results),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


# --- methods -------------------------------------------------------------------------------------------


async def _answer_methods(device: Device) -> None:
    try:
        while True:
            for packet in await device.receive():
                if isinstance(packet, Publish):
                    device.machine.acknowledge(packet)
                    if packet.topic.startswith("$iothub/methods/POST/"):
                        request = parse_method_request_topic(packet.topic)
                        device.machine.publish(
                            method_response_topic(200, request.rid),
                            packet.payload or b"null",
                            qos=QoS.AT_MOST_ONCE,
                        )
            device.flush()
    except (ConnectionError, OSError, asyncio.CancelledError):
        return


def _invoke_calls(server: Server, fleet: Fleet, calls: int) -> list[float]:
    cs = ConnectionString.parse(server.connection_string)
    _, _, port = cs.host.partition(":")
    conn = http.client.HTTPSConnection(
        "127.0.0.1", int(port or 443), context=ssl.create_default_context(cafile=server.ca_file), timeout=60
    )
    token = build_sas_token(cs.host, cs.key, int(time.time()) + 3600, key_name=cs.key_name)
    times: list[float] = []
    rng = random.Random(7)
    for i in range(calls):
        device_id = rng.choice(fleet.devices)[0]
        body = json.dumps(
            {"methodName": "echo", "payload": {"call": i}, "responseTimeoutInSeconds": 30}
        ).encode()
        start = time.perf_counter()
        conn.request(
            "POST",
            f"/admin/linkedHubs/{fleet.hub}/devices/{device_id}/methods?api-version={HUB_API}",
            body=body,
            headers={"Authorization": token, "Content-Type": "application/json"},
        )
        response = conn.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200 or json.loads(data) != {"status": 200, "payload": {"call": i}}:
            raise RuntimeError(f"call {i} on {device_id}: {response.status} {data[:300]!r}")
        times.append(elapsed)
    conn.close()
    return times


async def _methods(server: Server, fleet: Fleet, calls: int) -> dict[str, Any]:
    devices, failures = await _connect_all(
        fleet, int(server.info["mqttPort"]), server.ca_file, keep_alive=1200, subscribe=FILTERS[:1]
    )
    answering = [asyncio.ensure_future(_answer_methods(d)) for d in devices]
    connected = Fleet(fleet.hub, [(d.device_id, d.key) for d in devices])
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _invoke_calls, server, connected, 50)  # warm-up
    times = await loop.run_in_executor(None, _invoke_calls, server, connected, calls)
    for task in answering:
        task.cancel()
    for device in devices:
        device.close()
    return {
        "devices": len(devices),
        "failures": failures,
        "calls": len(times),
        "p50_ms": percentile(times, 50) * 1000,
        "p99_ms": percentile(times, 99) * 1000,
        "max_ms": max(times) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--idle", type=int, default=10_000, help="idle devices to hold")
    parser.add_argument("--telemetry", type=int, default=100, help="devices sending telemetry")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each telemetry phase")
    parser.add_argument("--window", type=int, default=16, help="QoS 1 publishes in flight per device")
    parser.add_argument("--clients", type=int, default=2, help="load generator processes for telemetry")
    parser.add_argument("--methods", type=int, default=1000, help="devices connected for the method calls")
    parser.add_argument("--calls", type=int, default=2000, help="direct methods invoked")
    parser.add_argument("--parts", default="idle,telemetry,methods")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",")}
    limit = _raise_fd_limit()
    print(f"# built-in hub bench; open files limit {limit}")
    print(f"# {machine_summary()}", flush=True)
    import uvloop

    with terminate_on_signals(), tempfile.TemporaryDirectory(prefix="provisiond-bench-hub-") as tmp:
        server = start_server(
            Path(tmp) / "server", "--max-connections", "0", "--max-connections-per-address", "0"
        )
        try:
            if "idle" in parts:
                fleet = provision(server, "idle", args.idle)
                i = uvloop.run(_idle(server, fleet))
                print(
                    f"idle: {i['devices']} devices connected ({i['failures']} failures, in {i['open_s']:.1f} s): "
                    f"server RSS {human_bytes(i['before'])} -> {human_bytes(i['after'])} "
                    f"(+{human_bytes(i['after'] - i['before'])}, {human_bytes(i['per_device'])} per device; "
                    f"peak {human_bytes(i['peak'])})",
                    flush=True,
                )
            if "telemetry" in parts:
                fleet = provision(server, "tele", args.telemetry)
                t = bench_telemetry(server, fleet, args)
                print(
                    f"telemetry: {t['devices']} devices ({t['failures']} failures): PINGREQ ceiling "
                    f"{t['pings_per_s']:,.0f}/s; QoS 1 telemetry {t['acked_per_s']:,.0f} messages/s acknowledged "
                    f"({t['acked']:,} in all, window {args.window}), PUBLISH to PUBACK p50 {t['p50_ms']:.1f} ms, "
                    f"p99 {t['p99_ms']:.1f} ms",
                    flush=True,
                )
            if "methods" in parts:
                fleet = provision(server, "meth", args.methods)
                m = uvloop.run(_methods(server, fleet, args.calls))
                print(
                    f"methods: {m['calls']} calls with {m['devices']} devices connected ({m['failures']} failures): "
                    f"round trip p50 {m['p50_ms']:.1f} ms, p99 {m['p99_ms']:.1f} ms, max {m['max_ms']:.1f} ms",
                    flush=True,
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
