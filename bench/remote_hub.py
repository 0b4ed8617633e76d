"""Registrations into a remote IoT hub through the hub writer (docs/performance.md, "Remote hubs").

1. **Budgeted**: the hub throttles (429 + Retry-After; a token bucket at 110% of the budget with a
   burst of one second's worth) and is linked with ``writeBudgetPerSecond``; new devices register as
   fast as they can (their identities go in bulk calls), then a third of them again (identities
   that exist: one call at a time, the pacer saturated). Reported: registrations/s, the hub's
   calls/s against the budget (target ratio at least 0.9 when saturated) and the 429s the hub
   sent (target 0).
2. **Unpaced**: the same without a budget or a throttle: what the writer does against the hub
   directly; and against a second ``provisiond serve`` whose built-in hub serves IoT Hub's
   registry REST API (the real peer: no bulk calls there, one identity at a time).
3. **kill -9 soak**: devices keep registering (retrying as the SDKs do when their connection
   dies) while the registering provisiond is killed with SIGKILL several times and restarted on
   its database; afterwards: acknowledged registrations, lost (acknowledged but not assigned
   with its identity), orphaned (an identity without its assigned record), doubled (an identity
   in two hubs). Target 0 / 0 / 0.

The remote hub is bench/_hub_peer.py (IoT Hub's registry REST API in its own process).

    python bench/remote_hub.py [--devices 150] [--budget 15] [--soak-devices 200] [--kills 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Server, free_port, machine_summary, start_server, terminate_on_signals

from provisiond import pki
from provisiond.protocol.sas import build_sas_token, derive_device_key
from provisiond.service_client import ServiceClient

HUB = "127.0.0.1"  # not "localhost": that is the server's own built-in hub
V = "2021-06-01"
TWIN = {"tags": {"bench": "remote"}, "properties": {"desired": {"interval": 60}}}


class Peer:
    def __init__(self, root: Path) -> None:
        ca = pki.make_root_ca("bench hub CA")
        pki.write_issued(pki.make_server_cert(ca, [HUB], ["127.0.0.1"]), root / "peer", chain=True)
        self.ca_pem = pki.certificate_pem(ca.cert).decode()
        self.port = free_port()
        self.key = base64.b64encode(os.urandom(32)).decode()
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve().parent / "_hub_peer.py"),
                "--port",
                str(self.port),
                "--cert",
                str(pki.chain_path(root / "peer")),
                "--key",
                str(pki.key_path(root / "peer")),
                "--policy-key",
                self.key,
            ],
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("the hub peer did not start") from None
                time.sleep(0.05)
        ctx = httpx.create_ssl_context(verify=False)
        self.http = httpx.Client(base_url=f"https://127.0.0.1:{self.port}", verify=ctx, timeout=30)

    @property
    def connection_string(self) -> str:
        return f"HostName={HUB}:{self.port};SharedAccessKeyName=iothubowner;SharedAccessKey={self.key}"

    def reset(self, rate_limit: int | None, *, keep_devices: bool = False) -> None:
        params: dict[str, Any] = {"rateLimit": rate_limit} if rate_limit else {}
        if keep_devices:
            params["keepDevices"] = 1
        self.http.post("/_reset", params=params).raise_for_status()

    def stats(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.http.get("/_stats").json()
        return answer

    def stop(self) -> None:
        self.http.close()
        self.process.terminate()
        self.process.wait(10)


def link(admin: ServiceClient, peer: Peer, budget: float | None) -> None:
    try:
        admin.delete(f"/admin/linkedHubs/{HUB}")
    except Exception:
        pass
    body: dict[str, Any] = {
        "hostName": HUB,
        "connectionString": peer.connection_string,
        "caCertificate": peer.ca_pem,
        "applyAllocationPolicy": False,
    }
    if budget:
        body["writeBudgetPerSecond"] = budget
    admin.put(f"/admin/linkedHubs/{HUB}", body)


def group(admin: ServiceClient, name: str) -> str:
    admin.put(
        f"/enrollmentGroups/{name}",
        {
            "enrollmentGroupId": name,
            "attestation": {"type": "symmetricKey"},
            "iotHubs": [HUB],
            "allocationPolicy": "static",
            "initialTwin": TWIN,
        },
    )
    key: str = admin.post(f"/enrollmentGroups/{name}/attestationmechanism")["symmetricKey"]["primaryKey"]
    return key


class Fleet:
    """Devices registering like the SDKs: register, poll while 'assigning' (after Retry-After),
    retry a request whose connection died (against whichever node is up)."""

    def __init__(self, server: Server, group_key: str, prefix: str, count: int) -> None:
        self.server = server
        self.group_key = group_key
        self.ids = [f"{prefix}-{i:05d}" for i in range(count)]
        self.acknowledged: set[str] = set()
        self.outcome: dict[str, str] = {}
        self.ack_event = threading.Event()
        self.ack_target = 0

    def _client(self) -> httpx.AsyncClient:
        port = self.server.info["httpsPort"]
        return httpx.AsyncClient(
            base_url=f"https://localhost:{port}",
            verify=ssl.create_default_context(cafile=self.server.ca_file),
            timeout=30,
        )

    async def _device(self, reg: str, semaphore: asyncio.Semaphore) -> None:
        key = derive_device_key(self.group_key, reg)
        async with semaphore:
            while True:
                scope = self.server.info["idScope"]
                token = build_sas_token(
                    f"{scope}/registrations/{reg}", key, int(time.time()) + 3600, key_name="registration"
                )
                headers = {"Authorization": token}
                try:
                    async with self._client() as http:
                        r = await http.put(
                            f"/{scope}/registrations/{reg}/register",
                            params={"api-version": V},
                            json={"registrationId": reg},
                            headers=headers,
                        )
                        body = r.json()
                        if r.status_code != 202 or "operationId" not in body:
                            await asyncio.sleep(0.5)
                            continue
                        self.acknowledged.add(reg)
                        if self.ack_target and len(self.acknowledged) >= self.ack_target:
                            self.ack_event.set()
                        while body.get("status") == "assigning":
                            await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), 1.0))
                            r = await http.get(
                                f"/{scope}/registrations/{reg}/operations/{body['operationId']}",
                                params={"api-version": V},
                                headers=headers,
                            )
                            body = r.json()
                        self.outcome[reg] = body.get("status", "?")
                        return
                except (httpx.HTTPError, ValueError, OSError):
                    await asyncio.sleep(0.5)  # the node died: retry, as an SDK does

    async def run(self, concurrency: int) -> float:
        semaphore = asyncio.Semaphore(concurrency)
        start = time.perf_counter()
        await asyncio.gather(*(self._device(reg, semaphore) for reg in self.ids))
        return time.perf_counter() - start


def throughput(
    args: argparse.Namespace, root: Path, peer: Peer, budget: float | None
) -> dict[str, dict[str, Any]]:
    server = start_server(root / f"dps-{'budget' if budget else 'unpaced'}", "--assignment-budget", "2")
    try:
        with ServiceClient(server.connection_string, ca_file=server.ca_file) as admin:
            link(admin, peer, budget)
            key = group(admin, "bench")
        peer.reset(int(budget * 1.1) + 1 if budget else None)
        results: dict[str, dict[str, Any]] = {}
        fleet = Fleet(server, key, "dev", args.devices)
        results["new devices"] = measure(peer, fleet, args.concurrency, budget)
        if budget:
            # A flood of re-registrations (identities that exist: no bulk, one call at a time).
            again = Fleet(server, key, "dev", args.devices // 3)
            peer.reset(int(budget * 1.1) + 1, keep_devices=True)
            results["re-registrations"] = measure(peer, again, args.concurrency, budget)
        return results
    finally:
        server.stop()


def measure(peer: Peer, fleet: Fleet, concurrency: int, budget: float | None) -> dict[str, Any]:
    elapsed = asyncio.run(fleet.run(concurrency))
    stats = peer.stats()
    assigned = sum(1 for status in fleet.outcome.values() if status == "assigned")
    calls_per_s = stats["calls"] / stats["seconds"] if stats["seconds"] else 0.0
    return {
        "registrations": assigned,
        "registrations/s": assigned / elapsed,
        "hub calls": stats["calls"],
        "hub calls/s": calls_per_s,
        "budget": budget,
        "achieved/budget": calls_per_s / budget if budget else None,
        "429 from the hub": stats["throttled"],
    }


def provisiond_peer(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Unpaced, against a second provisiond's built-in hub (its registry REST API)."""
    hub_server = start_server(root / "peer-hub", "--host", "127.0.0.1")
    server = start_server(root / "dps-peer", "--assignment-budget", "2")
    try:
        info = hub_server.info
        with ServiceClient(server.connection_string, ca_file=server.ca_file) as admin:
            admin.put(
                f"/admin/linkedHubs/{info['builtinHub']}",
                {
                    "hostName": info["builtinHub"],
                    "connectionString": info["hubConnectionString"],
                    "caCertificate": Path(hub_server.ca_file).read_text(),
                    "applyAllocationPolicy": False,
                },
            )
            admin.put(
                "/enrollmentGroups/peer",
                {
                    "enrollmentGroupId": "peer",
                    "attestation": {"type": "symmetricKey"},
                    "iotHubs": [info["builtinHub"]],
                    "allocationPolicy": "static",
                    "initialTwin": TWIN,
                },
            )
            key = admin.post("/enrollmentGroups/peer/attestationmechanism")["symmetricKey"]["primaryKey"]
        fleet = Fleet(server, key, "peer", args.devices)
        elapsed = asyncio.run(fleet.run(args.concurrency))
        parts = dict(p.split("=", 1) for p in info["hubConnectionString"].split(";"))
        token = build_sas_token(
            info["builtinHub"],
            parts["SharedAccessKey"],
            int(time.time()) + 600,
            key_name=parts["SharedAccessKeyName"],
        )
        with httpx.Client(
            base_url=f"https://{parts['HostName']}",
            verify=ssl.create_default_context(cafile=hub_server.ca_file),
        ) as http:
            stats = http.get(
                "/statistics/devices", params={"api-version": "2021-04-12"}, headers={"Authorization": token}
            ).json()
        assigned = sum(1 for status in fleet.outcome.values() if status == "assigned")
        return {
            "registrations": assigned,
            "registrations/s": assigned / elapsed,
            "identities in the peer": stats.get("totalDeviceCount"),
        }
    finally:
        server.stop()
        hub_server.stop()


def soak(args: argparse.Namespace, root: Path, peer: Peer) -> dict[str, Any]:
    data_dir = root / "dps-soak"
    flags = ("--assignment-budget", "1", "--hub-write-lease", "2")
    server = start_server(data_dir, *flags)
    with ServiceClient(server.connection_string, ca_file=server.ca_file) as admin:
        link(admin, peer, None)
        key = group(admin, "soak")
    peer.reset(None)
    fleet = Fleet(server, key, "soak", args.soak_devices)
    done = threading.Event()

    def drive() -> None:
        asyncio.run(fleet.run(args.concurrency))
        done.set()

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    kills = 0
    for round_ in range(1, args.kills + 1):
        fleet.ack_target = args.soak_devices * round_ // (args.kills + 1)
        if not fleet.ack_event.wait(120) or done.is_set():
            break
        fleet.ack_event.clear()
        server.process.kill()
        server.process.wait(10)
        kills += 1
        restarted = start_server(data_dir, *flags)
        server.process, server.info, server.log_file = restarted.process, restarted.info, restarted.log_file
    thread.join(300)
    try:
        with ServiceClient(server.connection_string, ca_file=server.ca_file) as admin:
            records: dict[str, dict[str, Any]] = {}
            deadline = time.monotonic() + 60
            for reg in fleet.ids:
                while True:
                    try:
                        record = admin.get(f"/registrations/{reg}")
                    except Exception:
                        break
                    if record["status"] != "assigning" or time.monotonic() > deadline:
                        records[reg] = record
                        break
                    time.sleep(0.2)
            builtin = [h["hostName"] for h in admin.get("/admin/linkedHubs") if h.get("builtin")]
            in_builtin = {
                d["deviceId"] for h in builtin for d in admin.get(f"/admin/linkedHubs/{h}/devices") or []
            }
        stats = peer.stats()
        identities = set(stats["devices"])
        assigned = {
            r for r, rec in records.items() if rec["status"] == "assigned" and rec.get("assignedHub") == HUB
        }
        lost = {r for r in fleet.acknowledged if r not in assigned or r not in identities}
        lost |= {r for r in assigned if stats["twinTags"].get(r) != TWIN["tags"]}
        orphaned = identities - assigned
        doubled = identities & in_builtin
        return {
            "kills": kills,
            "devices": args.soak_devices,
            "acknowledged": len(fleet.acknowledged),
            "lost": len(lost),
            "orphaned": len(orphaned),
            "doubled": len(doubled),
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=150)
    parser.add_argument("--budget", type=float, default=15.0, help="writes a second")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--soak-devices", type=int, default=200)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    print(machine_summary())
    with terminate_on_signals(), tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        peer = Peer(root)
        try:
            results = {
                **{f"budgeted, {k}": v for k, v in throughput(args, root, peer, args.budget).items()},
                **{f"unpaced, {k}": v for k, v in throughput(args, root, peer, None).items()},
                "unpaced, a second provisiond's hub": provisiond_peer(args, root),
                "kill -9 soak": soak(args, root, peer),
            }
        finally:
            peer.stop()
    for name, figures in results.items():
        print(f"== {name} ==")
        for metric, value in figures.items():
            shown = f"{value:.2f}" if isinstance(value, float) else str(value)
            print(f"  {metric:<22} {shown}")


if __name__ == "__main__":
    main()
