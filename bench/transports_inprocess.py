"""The MQTT and AMQP device endpoints' CPU per registration without TLS or sockets: each
device's session runs over an in-memory stream in this process, fed the bytes
``bench/cpu.py``'s load generator sends (``bench/_transports.py``), one step per read, against
the real gateway, registrar and a fresh SQLite store; the registrar alone (no transport) is the
baseline. CPU is this process's (``time.process_time``). What it leaves out (TLS, the listener
and its guard, the socket writes) is what ``bench/cpu.py`` adds.

    python bench/transports_inprocess.py [--devices 3000] [--concurrency 32] [--profile amqp]

The phase "amqp, answered at once" is the AMQP endpoint with the registrar's answer replaced
by one it gave before (the endpoint, its connection and session machines and the codec, with
the gateway's token check): what the endpoint itself costs. ``--profile amqp`` (or ``mqtt``,
``amqp-alone``) prints cProfile's top functions of that phase. Nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import app_with_group, cpu_per_item
from _transports import ASSIGNED, amqp_steps, mqtt_steps

from provisiond.protocol.messages import DeviceRegistration
from provisiond.protocol.sas import build_sas_token, derive_device_key
from provisiond.service.amqp import AmqpEndpoint
from provisiond.service.gateway import AMQP, MQTT
from provisiond.service.guard import NO_GUARD
from provisiond.service.mqtt import MqttEndpoint
from provisiond.service.registrar import DeviceRequest
from provisiond.storage.sqlite import SqliteStore


class _AnsweredAtOnce:
    """The gateway, except that ``answer`` returns the first answer the real one gave again."""

    def __init__(self, gateway: Any) -> None:
        self._gateway = gateway
        self._answer: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gateway, name)

    async def answer(self, call: Any) -> Any:
        if self._answer is None:
            self._answer = await self._gateway.answer(call)
        return self._answer


class MemoryStream:
    """A ByteStream that hands the session one client step per read and keeps what it sends."""

    client_chain: list[bytes] = []
    peer = "memory"
    guard = NO_GUARD
    address = "127.0.0.1"

    def __init__(self, steps: list[bytes]) -> None:
        self.steps = list(steps)
        self.sent = bytearray()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return self.steps.pop(0) if self.steps else b""

    async def send(self, data: bytes) -> None:
        self.sent += data

    async def close(self) -> None:
        pass


def _mqtt_done() -> bytes:
    return b"\x40\x02\x00\x01\xe0\x00"  # PUBACK (the answer's packet id is 1 on a new session) and DISCONNECT


async def _phase(
    name: str, items: list[Any], run: Callable[[Any], Awaitable[None]], concurrency: int, profile: bool
) -> None:
    cpu = await cpu_per_item(items, run, concurrency, profile=profile, top=40)
    print(f"| {name} | {len(items)} | {cpu:.0f} |", flush=True)


async def main(args: argparse.Namespace) -> int:
    """Run the phases; the number of sessions that were not assigned."""
    tmp = Path(tempfile.mkdtemp(prefix="provisiond-transports-inprocess-"))
    store = SqliteStore(tmp / "provisiond.sqlite")
    await store.open()
    try:
        app, scope, key = await app_with_group(store, tmp)
        gateway = app.state.gateway
        n = args.devices
        amqp = AmqpEndpoint(gateway, AMQP)
        mqtt = MqttEndpoint(gateway, MQTT)
        amqp_devices = [
            amqp_steps(scope, r, derive_device_key(key, r)) for r in (f"a-{i:07d}" for i in range(n))
        ]
        mqtt_devices = [
            [*mqtt_steps(scope, r, derive_device_key(key, r)), _mqtt_done()]
            for r in (f"m-{i:07d}" for i in range(n))
        ]
        expiry = int(time.time()) + 3600
        direct = [
            DeviceRequest(
                id_scope=scope,
                registration_id=r,
                body=DeviceRegistration(registration_id=r),
                authorization=build_sas_token(
                    f"{scope}/registrations/{r}", derive_device_key(key, r), expiry, key_name="registration"
                ),
            )
            for r in (f"r-{i:07d}" for i in range(n))
        ]
        failed = 0

        def session(endpoint: Any) -> Callable[[list[bytes]], Awaitable[None]]:
            async def run(steps: list[bytes]) -> None:
                nonlocal failed
                stream = MemoryStream(steps)
                await endpoint(stream)
                failed += ASSIGNED not in stream.sent

            return run

        async def register(request: DeviceRequest) -> None:
            await app.state.registrar.register(request)

        print("| phase | devices | CPU µs per registration |")
        print("|---|---|---|")
        await _phase("registrar alone", direct, register, args.concurrency, False)
        await _phase("mqtt", mqtt_devices, session(mqtt), args.concurrency, args.profile == "mqtt")
        await _phase("amqp", amqp_devices, session(amqp), args.concurrency, args.profile == "amqp")
        alone = AmqpEndpoint(_AnsweredAtOnce(gateway), AMQP)  # type: ignore[arg-type]
        again = [amqp_steps(scope, r, derive_device_key(key, r)) for r in (f"b-{i:07d}" for i in range(n))]
        await _phase(
            "amqp, answered at once", again, session(alone), args.concurrency, args.profile == "amqp-alone"
        )
        if failed:
            print(f"# {failed} sessions did not read an assigned answer", file=sys.stderr)
        return failed
    finally:
        await store.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--profile", choices=["amqp", "mqtt", "amqp-alone"])
    import uvloop

    sys.exit(1 if uvloop.run(main(parser.parse_args())) else 0)
