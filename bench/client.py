"""The device client's own cost: CPU per registration and memory, provisiond's client against a
lean asyncio client doing the same TLS handshake and sending the same request, over HTTPS,
MQTT and AMQP.

One ``provisiond serve`` (another process: its CPU is not counted) holds one symmetric-key
enrollment group; every registration is a distinct group-derived device. Each (client,
transport) runs in its own fresh Python process, which registers ``--devices`` devices after a
few warm-up ones, ``--inflight`` at a time, and reports:

- ``CPU/reg``: ``time.process_time()`` of that process over the measured registrations, per
  registration (user + system, all its threads: the sync client's loop thread included);
- ``RSS/conn``: RSS growth per client held open after its registration (``--hold`` of them);
- ``peak/reg``: tracemalloc's peak during one registration (mean over a few);
- the table's ratio column: CPU per registration against the lean client's on that transport.

Clients:

- ``lean``: asyncio streams, one ``ssl.SSLContext`` built once (TLS 1.3, certificate and host
  name verified against the service's CA, no session resumption, as the others), the request
  bytes built per device (SAS token signed per device): HTTPS sends the bytes provisiond's
  client sends (HTTP/1.1 keep-alive, closed after the answer), MQTT the CONNECT, SUBSCRIBE and PUBLISH
  in one write (frames from the project's MQTT codec, the answer parsed by hand), AMQP the
  project's sans-io AMQP connection driven by a minimal loop;
- ``async``: ``AsyncProvisioningDeviceClient.create(...)`` per device, ``await register()``,
  closed (what a user writes, docs/device-client.md);
- ``sync``: ``ProvisioningDeviceClient.create(...)`` per device, ``register()``, closed, from a
  plain thread as the samples do (one at a time).

``--transports https-x509`` adds X.509 devices of an enrollment group (leaf and intermediate
presented, the group holding the root) over HTTPS: there every client builds a TLS context of
its own, with the device's certificate, from PEM files (``X509Security.from_pem_files``; the
lean client ``load_cert_chain`` on the same files).

It also prints the import cost: RSS of a bare ``python`` against one that ran
``import provisiond.device``.

    python bench/client.py [--devices 300] [--inflight 1] [--rounds 2]
                           [--transports https,mqtt,amqp,https-x509] [--clients lean,async,sync]

Nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import human_bytes, machine_summary, rss_of, start_server, terminate_on_signals

from provisiond.protocol.sas import build_sas_token, derive_device_key

API_VERSION = "2021-06-01"
WARMUP = 5
TRACED = 5


def x509_files(cfg: dict[str, Any], reg: str) -> tuple[str, str]:
    """The device's chain (leaf, intermediate) and key files, issued before the run."""
    folder = Path(cfg["x509_dir"])
    return str(folder / f"{reg}.pem"), str(folder / f"{reg}.key")


def issue_x509(folder: Path, names: list[str]) -> str:
    """A root CA (its PEM, for the enrollment group) and, below an intermediate, a certificate
    and key file per device name."""
    from provisiond import pki

    root = pki.make_root_ca("provisiond client bench root")
    intermediate = pki.make_intermediate_ca("provisiond client bench intermediate", root)
    folder.mkdir(parents=True, exist_ok=True)
    for reg in names:
        issued = pki.make_device_cert(reg, intermediate)
        pki.write_certificates(folder / f"{reg}.pem", issued.presented_chain)
        pki.write_private_key(folder / f"{reg}.key", issued.key)
    return pki.certificate_pem(root.cert).decode()


# -- the lean clients ---------------------------------------------------------------------------


class Lean:
    """One SSL context for every registration; the request bytes built per device."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.ctx = ssl.create_default_context(cafile=cfg["ca"])
        self.host = cfg["host"]
        self.scope = cfg["scope"]
        self.user_agent = cfg["user_agent"]

    def token(self, reg: str) -> str:
        key = derive_device_key(self.cfg["group_key"], reg)
        return build_sas_token(
            f"{self.scope}/registrations/{reg}", key, int(time.time()) + 3600, key_name="registration"
        )

    async def _open(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, port, ssl=self.ctx, server_hostname=self.host)

    async def register(self, reg: str, *, hold: list[Any] | None = None) -> None:
        transport = self.cfg["transport"]
        if transport == "https-x509":
            # a context per device: it presents the device's certificate (from its PEM files)
            ctx = ssl.create_default_context(cafile=self.cfg["ca"])
            cert, key = x509_files(self.cfg, reg)
            ctx.load_cert_chain(cert, key)
            reader, writer = await asyncio.open_connection(
                self.host, self.cfg["https_port"], ssl=ctx, server_hostname=self.host
            )
            await self._https(reg, reader, writer, token=False)
        elif transport == "https":
            reader, writer = await self._open(self.cfg["https_port"])
            await self._https(reg, reader, writer)
        elif transport == "mqtt":
            reader, writer = await self._open(self.cfg["mqtt_port"])
            await self._mqtt(reg, reader, writer)
        else:
            reader, writer = await self._open(self.cfg["amqp_port"])
            await self._amqp(reg, reader, writer)
        if hold is not None:
            hold.append(writer)
            return
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass

    async def _https(
        self, reg: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, token: bool = True
    ) -> None:
        body = json.dumps({"registrationId": reg}, separators=(",", ":")).encode()
        quoted = urllib.parse.quote(reg, safe="")
        authorization = f"Authorization: {self.token(reg)}\r\n" if token else ""
        head = (
            f"PUT /{self.scope}/registrations/{quoted}/register?api-version={API_VERSION} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.cfg['https_port']}\r\nAccept: application/json\r\n"
            f"Content-Type: application/json; charset=utf-8\r\nUser-Agent: {self.user_agent}\r\n"
            f"{authorization}Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        writer.write(head + body)
        status_line = await reader.readuntil(b"\r\n")
        length = 0
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        answer = json.loads(await reader.readexactly(length))
        if status_line[9:10] != b"2" or answer.get("status") != "assigned":
            raise RuntimeError(f"{reg}: {status_line!r} {answer}")

    async def _mqtt(self, reg: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from provisiond.protocol._mqtt_packets import (
            Connect,
            Publish,
            QoS,
            Subscribe,
            Subscription,
            encode_packet,
        )
        from provisiond.protocol.topics import RESPONSE_FILTER, build_username

        username = build_username(self.scope, reg, api_version=API_VERSION, client_version=self.user_agent)
        body = json.dumps({"registrationId": reg}, separators=(",", ":")).encode()
        writer.write(
            encode_packet(Connect(client_id=reg, username=username, password=self.token(reg).encode()))
            + encode_packet(
                Subscribe(
                    packet_id=1,
                    subscriptions=(Subscription(topic_filter=RESPONSE_FILTER, qos=QoS.AT_LEAST_ONCE),),
                )
            )
            + encode_packet(
                Publish(
                    topic="$dps/registrations/PUT/iotdps-register/?$rid=1",
                    payload=body,
                    qos=QoS.AT_LEAST_ONCE,
                    packet_id=2,
                )
            )
        )
        buffer = b""
        while True:
            data = await reader.read(65536)
            if not data:
                raise RuntimeError(f"{reg}: the MQTT connection closed")
            buffer += data
            while len(buffer) >= 2:
                length, shift, i = 0, 0, 1
                while True:
                    byte = buffer[i]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    i += 1
                    if not byte & 0x80:
                        break
                if len(buffer) < i + length:
                    break
                kind, packet = buffer[0] >> 4, buffer[i : i + length]
                buffer = buffer[i + length :]
                if kind == 3:  # PUBLISH, QoS 1: topic, packet id, payload
                    size = int.from_bytes(packet[:2])
                    topic = packet[2 : 2 + size].decode()
                    packet_id = packet[2 + size : 4 + size]
                    writer.write(b"\x40\x02" + packet_id + b"\xe0\x00")  # PUBACK, DISCONNECT
                    if not topic.startswith(("$dps/registrations/res/200/", "$dps/registrations/res/202/")):
                        raise RuntimeError(f"{reg}: {topic}")
                    if json.loads(packet[4 + size :]).get("status") != "assigned":
                        raise RuntimeError(f"{reg}: {packet[4 + size :]!r}")
                    return

    async def _amqp(self, reg: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from provisiond.protocol.amqp import dps
        from provisiond.protocol.amqp.connection import Connection, ConnectionConfig, Side
        from provisiond.protocol.amqp.events import (
            LinkAttached,
            MessageReceived,
            SaslMechanismsReceived,
            SaslOutcomeReceived,
        )
        from provisiond.protocol.amqp.performatives import (
            Accepted,
            Data,
            Message,
            Properties,
            Role,
            Source,
            Target,
        )
        from provisiond.protocol.amqp.types import Symbol

        machine = Connection(
            Side.CLIENT,
            ConnectionConfig(
                container_id=str(uuid.uuid4()),
                hostname=self.host,
                use_sasl=True,
                idle_timeout=None,
                properties={Symbol(dps.CLIENT_VERSION_PROPERTY): self.user_agent},
            ),
            clock=time.monotonic,
        )
        resource = f"{self.scope}/registrations/{reg}"
        properties = {Symbol(dps.API_VERSION_PROPERTY): API_VERSION}
        attached: set[Any] = set()
        sender = receiver = None
        correlation = str(uuid.uuid4())
        writer.write(machine.get_outbound_data())
        while True:
            data = await reader.read(65536)
            if not data:
                raise RuntimeError(f"{reg}: the AMQP connection closed")
            for event in machine.feed_bytes(data):
                if isinstance(event, SaslMechanismsReceived):
                    machine.sasl_init("PLAIN", dps.plain_response(resource, self.token(reg)))
                elif isinstance(event, SaslOutcomeReceived):
                    machine.open()
                elif isinstance(event, LinkAttached):
                    attached.add(event.link)
                    if len(attached) == 2:
                        body = json.dumps({"registrationId": reg}, separators=(",", ":")).encode()
                        machine.send_message(
                            sender,  # type: ignore[arg-type]
                            Message(
                                properties=Properties(
                                    message_id=str(uuid.uuid4()), correlation_id=correlation
                                ),
                                application_properties={
                                    dps.OPERATION_TYPE: dps.OperationType.REGISTER.value,
                                    dps.FORCE_REGISTRATION: False,
                                },
                                body=(Data(body),),
                            ),
                        )
                elif isinstance(event, MessageReceived):
                    machine.settle(event.link, event.delivery_id, Accepted())
                    if json.loads(event.message.data or b"{}").get("status") != "assigned":
                        raise RuntimeError(f"{reg}: {event.message.data!r}")
                    machine.close()
                    writer.write(machine.get_outbound_data())
                    return
            if sender is None and machine.opened:
                channel = machine.begin()
                sender = machine.attach(
                    channel,
                    name=f"sender-{uuid.uuid4()}",
                    role=Role.SENDER,
                    target=Target(address=resource),
                    properties=properties,
                )
                receiver = machine.attach(
                    channel,
                    name=f"receiver-{uuid.uuid4()}",
                    role=Role.RECEIVER,
                    source=Source(address=resource),
                    properties=properties,
                )
                machine.grant_credit(receiver, 8)
            out = machine.get_outbound_data()
            if out:
                writer.write(out)


# -- provisiond's client, as a user calls it --------------------------------------------------


class Provisiond:
    def __init__(self, cfg: dict[str, Any], *, sync: bool) -> None:
        from provisiond import device

        self.device = device
        self.cfg = cfg
        self.sync = sync
        self.transport = cfg["transport"].removesuffix("-x509")
        self.endpoint = f"{cfg['host']}:{cfg[f'{self.transport}_port']}"

    def _client(self, reg: str) -> Any:
        if self.cfg["transport"].endswith("-x509"):
            cert, key = x509_files(self.cfg, reg)
            security = self.device.X509Security.from_pem_files(cert, key)
        else:
            security = self.device.SymmetricKeySecurity.from_group_key(
                registration_id=reg, group_key=self.cfg["group_key"]
            )
        cls = self.device.ProvisioningDeviceClient if self.sync else self.device.AsyncProvisioningDeviceClient
        return cls.create(self.endpoint, self.cfg["scope"], security, self.transport, ca_file=self.cfg["ca"])

    async def register(self, reg: str, *, hold: list[Any] | None = None) -> None:
        client = self._client(reg)
        result = await client.register()
        if hold is not None:
            hold.append(client)
        else:
            await client.close()
        if result.status.value != "assigned":
            raise RuntimeError(f"{reg}: {result}")

    def register_sync(self, reg: str, *, hold: list[Any] | None = None) -> None:
        client = self._client(reg)
        result = client.register()
        if hold is not None:
            hold.append(client)
        else:
            client.close()
        if result.status.value != "assigned":
            raise RuntimeError(f"{reg}: {result}")


# -- one (client, transport) run, in its own process --------------------------------------------


def _worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: warm-up, the measured registrations, tracemalloc, held clients.
    The sync client is called from a plain thread, as the samples do; the others on one loop."""
    one: Callable[..., None]
    batch: Callable[[list[str]], None]
    release: Callable[[list[Any]], None]
    if cfg["client"] == "sync":
        sync = Provisiond(cfg, sync=True)
        one = sync.register_sync

        def batch(names: list[str]) -> None:
            for reg in names:
                sync.register_sync(reg)

        def release(held: list[Any]) -> None:
            for client in held:
                client.close()

    else:
        loop = asyncio.new_event_loop()
        impl: Lean | Provisiond = Lean(cfg) if cfg["client"] == "lean" else Provisiond(cfg, sync=False)

        def one(reg: str, *, hold: list[Any] | None = None) -> None:
            loop.run_until_complete(impl.register(reg, hold=hold))

        async def gathered(names: list[str]) -> None:
            gate = asyncio.Semaphore(cfg["inflight"])

            async def each(reg: str) -> None:
                async with gate:
                    await impl.register(reg)

            await asyncio.gather(*(each(reg) for reg in names))

        def batch(names: list[str]) -> None:
            loop.run_until_complete(gathered(names))

        async def closed(held: list[Any]) -> None:
            for item in held:
                if isinstance(item, asyncio.StreamWriter):
                    item.close()
                else:
                    await item.close()

        def release(held: list[Any]) -> None:
            loop.run_until_complete(closed(held))

    prefix = f"{cfg['prefix']}-{cfg['client']}-{cfg['transport']}"
    for i in range(WARMUP):
        one(f"{prefix}-w{i}")
    names = [f"{prefix}-{i}" for i in range(cfg["devices"])]
    cpu, started = time.process_time(), time.monotonic()
    batch(names)
    cpu, elapsed = time.process_time() - cpu, time.monotonic() - started
    # tracemalloc's peak during one registration
    tracemalloc.start()
    peaks = []
    for i in range(TRACED):
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        one(f"{prefix}-t{i}")
        peaks.append(tracemalloc.get_traced_memory()[1] - base)
    tracemalloc.stop()
    # RSS growth per client (connection) held open after its registration
    held: list[Any] = []
    rss_before = rss_of(os.getpid())[0]
    for i in range(cfg["hold"]):
        one(f"{prefix}-h{i}", hold=held)
    rss_after = rss_of(os.getpid())[0]
    release(held)
    return {
        "cpu_us": cpu / cfg["devices"] * 1e6,
        "rate": cfg["devices"] / elapsed,
        "peak": sum(peaks) / len(peaks),
        "rss_per_conn": (rss_after - rss_before) / max(1, cfg["hold"]),
        "rss": rss_before,
    }


def run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, timeout=1800
    )
    if result.returncode != 0:
        raise RuntimeError(f"worker {cfg['client']}/{cfg['transport']} failed:\n{result.stderr[-3000:]}")
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def import_cost() -> tuple[int, int]:
    probe = "import os,sys;{};print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"
    bare = subprocess.run([sys.executable, "-c", probe.format("pass")], capture_output=True, text=True)
    loaded = subprocess.run(
        [sys.executable, "-c", probe.format("import provisiond.device")], capture_output=True, text=True
    )
    return int(bare.stdout) * 1024, int(loaded.stdout) * 1024


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=300, help="measured registrations per run")
    parser.add_argument("--inflight", type=int, default=1, help="registrations in flight (async clients)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each (client, transport), alternated")
    parser.add_argument("--hold", type=int, default=20, help="clients held open for the RSS figure")
    parser.add_argument(
        "--transports", default="https,mqtt,amqp", help="also https-x509: X.509 group devices over HTTPS"
    )
    parser.add_argument("--clients", default="lean,async,sync")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0

    from provisiond.device.transport import USER_AGENT

    transports = [t for t in args.transports.split(",") if t]
    clients = [c for c in args.clients.split(",") if c]
    print(machine_summary())
    with terminate_on_signals(), tempfile.TemporaryDirectory(prefix="provisiond-client-bench-") as tmp:
        server = start_server(Path(tmp) / "data")
        try:
            info = server.info
            group_key = base64.b64encode(os.urandom(64)).decode()
            with server.api() as api:
                api.request(
                    "PUT",
                    "/enrollmentGroups/bench-client",
                    json.dumps(
                        {
                            "enrollmentGroupId": "bench-client",
                            "attestation": {
                                "type": "symmetricKey",
                                "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key},
                            },
                        }
                    ).encode(),
                )
            x509_dir = Path(tmp) / "x509"
            if any(t.endswith("-x509") for t in transports):
                names = [
                    f"r{r}-{client}-{t}-{kind}{i}"
                    for r in range(args.rounds)
                    for t in transports
                    if t.endswith("-x509")
                    for client in clients
                    for kind, count in (("w", WARMUP), ("", args.devices), ("t", TRACED), ("h", args.hold))
                    for i in range(count)
                ]
                root_pem = issue_x509(x509_dir, names)
                with server.api() as api:
                    api.request(
                        "PUT",
                        "/enrollmentGroups/bench-client-x509",
                        json.dumps(
                            {
                                "enrollmentGroupId": "bench-client-x509",
                                "attestation": {
                                    "type": "x509",
                                    "x509": {"signingCertificates": {"primary": {"certificate": root_pem}}},
                                },
                            }
                        ).encode(),
                    )
            base = {
                "host": "localhost",
                "scope": info["idScope"],
                "ca": server.ca_file,
                "group_key": group_key,
                "https_port": int(info["httpsPort"]),
                "mqtt_port": int(info["mqttPort"]),
                "amqp_port": int(info["amqpPort"]),
                "user_agent": USER_AGENT,
                "devices": args.devices,
                "inflight": args.inflight,
                "hold": args.hold,
                "x509_dir": str(x509_dir),
            }
            results: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for round_ in range(args.rounds):
                for transport in transports:
                    for client in clients:
                        cfg = {**base, "transport": transport, "client": client, "prefix": f"r{round_}"}
                        results.setdefault((transport, client), []).append(run_worker(cfg))
        finally:
            server.stop()
    bare, loaded = import_cost()
    print(
        f"{args.devices} registrations per run, {args.inflight} in flight, {args.rounds} rounds; "
        f"load average at end {'/'.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"{'transport':10} {'client':6} {'CPU/reg µs':>18} {'x lean':>7} {'reg/s':>7} "
        f"{'RSS/conn':>10} {'peak/reg':>10}"
    )
    for transport in transports:
        lean = results.get((transport, "lean"))
        lean_cpu = min(r["cpu_us"] for r in lean) if lean else float("nan")
        for client in clients:
            runs = results[(transport, client)]
            cpus = sorted(r["cpu_us"] for r in runs)
            best = cpus[0]
            spread = f"{best:.0f}" + (f" ({cpus[-1]:.0f})" if len(cpus) > 1 else "")
            print(
                f"{transport:10} {client:6} {spread:>18} {best / lean_cpu:7.2f} "
                f"{max(r['rate'] for r in runs):7.0f} "
                f"{human_bytes(min(r['rss_per_conn'] for r in runs)):>10} "
                f"{human_bytes(min(r['peak'] for r in runs)):>10}"
            )
    print(
        f"import cost: bare python RSS {human_bytes(bare)}, after `import provisiond.device` "
        f"{human_bytes(loaded)} (+{human_bytes(loaded - bare)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
