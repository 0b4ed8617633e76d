"""The MQTT and AMQP device endpoints' CPU per registration without TLS or sockets: each
device's session runs over an in-memory stream in this process, fed the bytes
``bench/cpu.py``'s load generator sends (``bench/_transports.py``), one step per read, against
the real gateway, registrar and a fresh SQLite store; the registrar alone (no transport) is the
baseline. CPU is this process's (``time.process_time``). What it leaves out (TLS, the listener
and its guard, the socket writes) is what ``bench/cpu.py`` adds.

    python bench/transports_inprocess.py [--devices 3000] [--concurrency 32] [--profile amqp] [--layers]

The phases "amqp, answered at once" and "mqtt, answered at once" are the endpoints with the
registrar's answer replaced by one it gave before (the endpoint, its protocol machines and
codec, with the gateway's token check): what the endpoint itself costs. ``--profile amqp`` (or
``mqtt``, ``amqp-alone``) prints cProfile's top functions of that phase. ``--layers`` adds a
second table, AMQP's layers against MQTT's, sessions one after another (the least CPU of five
rounds): each endpoint answered at once, AMQP's codec alone (decoding a device's frames and its
message; encoding the server's frames and answer), the reads and writes a session makes, and
the objects a finished session leaves in reference cycles (freed only by the cycle
collector). Nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import gc
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
        mqtt_alone = MqttEndpoint(_AnsweredAtOnce(gateway), MQTT)  # type: ignore[arg-type]
        mqtt_again = [
            [*mqtt_steps(scope, r, derive_device_key(key, r)), _mqtt_done()]
            for r in (f"n-{i:07d}" for i in range(n))
        ]
        await _phase("mqtt, answered at once", mqtt_again, session(mqtt_alone), args.concurrency, False)
        if args.layers:
            await _layers(alone, again, mqtt_alone, mqtt_again)
        if failed:
            print(f"# {failed} sessions did not read an assigned answer", file=sys.stderr)
        return failed
    finally:
        await store.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _frames(data: bytes) -> list[bytes]:
    """The AMQP frames of ``data`` (protocol headers left out)."""
    frames, i = [], 0
    while i < len(data):
        if data[i : i + 4] == b"AMQP":
            i += 8
            continue
        size = int.from_bytes(data[i : i + 4], "big")
        frames.append(data[i : i + size])
        i += size
    return frames


async def _layers(
    amqp: Any, amqp_devices: list[list[bytes]], mqtt: Any, mqtt_devices: list[list[bytes]]
) -> None:
    """The second table (``--layers``): see the module docstring."""
    import uuid

    from provisiond.protocol.amqp.frames import frame_at, write_frame
    from provisiond.protocol.amqp.message import decode_message, encode_message
    from provisiond.protocol.amqp.performatives import Data, Message, Properties, Transfer

    async def least(run: Callable[[list[bytes]], Any], items: list[list[bytes]]) -> float:
        rounds = []
        for _ in range(5):
            gc.collect()
            started = time.process_time()
            for item in items:
                await run(item)
            rounds.append((time.process_time() - started) / len(items) * 1e6)
        return min(rounds)

    async def amqp_session(steps: list[bytes]) -> None:
        await amqp(MemoryStream(steps))

    async def mqtt_session(steps: list[bytes]) -> None:
        await mqtt(MemoryStream(steps))

    sample = MemoryStream(amqp_devices[0])
    await amqp(sample)
    server = [frame_at(f, 1 << 20) for f in _frames(bytes(sample.sent))]
    device_frames = [_frames(b"".join(steps)) for steps in amqp_devices]

    async def decode(frames: list[bytes]) -> None:
        for data in frames:
            found = frame_at(data, 1 << 20)
            if found is not None and type(found[0].performative) is Transfer:
                decode_message(found[0].payload)

    async def encode(_: Any) -> None:
        buffer = bytearray()
        for found in server:
            assert found is not None
            frame = found[0]
            payload = frame.payload
            if type(frame.performative) is Transfer:  # the answer: a new message each time
                answer = Message(properties=Properties(message_id=str(uuid.uuid4())), body=(Data(payload),))
                payload = encode_message(answer)
            write_frame(buffer, frame.type, frame.channel, frame.performative, payload)

    def cycles(run: Callable[[list[bytes]], Any], items: list[list[bytes]]) -> Callable[[], Awaitable[float]]:
        async def count() -> float:
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                for item in items:
                    await run(item)
                gc.collect()
                left = len(gc.garbage)
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
            return left / len(items)

        return count

    few = min(len(amqp_devices), 50)
    print("\n| layer, sessions one after another | AMQP | MQTT |")
    print("|---|---|---|")
    amqp_cpu, mqtt_cpu = await least(amqp_session, amqp_devices), await least(mqtt_session, mqtt_devices)
    print(f"| CPU µs per session, answered at once | {amqp_cpu:.0f} | {mqtt_cpu:.0f} |")
    print(
        f"| of which AMQP's codec: decoding a device's frames and message | {await least(decode, device_frames):.0f} | |"
    )
    print(
        f"| of which AMQP's codec: encoding the server's frames and answer | {await least(encode, device_frames):.0f} | |"
    )

    class Counted(MemoryStream):
        reads = writes = 0

        async def receive(self, max_bytes: int = 65536) -> bytes:
            self.reads += 1
            return await super().receive(max_bytes)

        async def send(self, data: bytes) -> None:
            self.writes += 1
            await super().send(data)

    counted = [Counted(amqp_devices[0]), Counted(mqtt_devices[0])]
    await amqp(counted[0])
    await mqtt(counted[1])
    print(
        f"| reads, writes, bytes written per session | {counted[0].reads}, {counted[0].writes}, "
        f"{len(counted[0].sent)} | {counted[1].reads}, {counted[1].writes}, {len(counted[1].sent)} |"
    )
    left_amqp = await cycles(amqp_session, amqp_devices[:few])()
    left_mqtt = await cycles(mqtt_session, mqtt_devices[:few])()
    print(f"| objects left in reference cycles per session | {left_amqp:.1f} | {left_mqtt:.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--profile", choices=["amqp", "mqtt", "amqp-alone"])
    parser.add_argument("--layers", action="store_true", help="AMQP's layers against MQTT's (see above)")
    import uvloop

    sys.exit(1 if uvloop.run(main(parser.parse_args())) else 0)
