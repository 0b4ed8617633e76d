"""CPU per registration without TLS or sockets: the steadier half of ``bench/cpu.py``.

The app of ``create_app`` over a fresh SQLite store, called as ASGI in this process (no uvicorn,
no TLS): a group-derived device's ``PUT .../register`` against ``GET /nothing`` (404), the
device gateway (``DeviceGateway.answer``: what every transport hands over, no HTTP), and the
registrar alone (``Registrar.register``), then the same devices again (a re-registration: the
record's and the identity's updates). Each phase registers devices of its own, each once,
``--concurrency`` at a time; CPU is this process's (``time.process_time``: the event loop and
the store's threads). What it leaves out (the TLS front, uvicorn) is what ``bench/cpu.py`` adds.

    python bench/cpu_inprocess.py [--devices 4000] [--concurrency 32] [--profile] [--db postgresql]
                                  [--callgrind]

``--callgrind`` runs the same under valgrind's callgrind and prints, instead of CPU time, the
instructions this process executes per request in each phase (instrumentation switched on for
the phase only, as ``bench/cpu.py --callgrind`` does for the server; the app's idle
instructions, its timers, taken off). Instructions do not move with the machine's load: a
change of a few percent shows in one run of each version. About 40 times slower: use
``--devices 2000``.

``--profile`` prints cProfile's top functions of the ASGI registrations (by own time).
``--db postgresql`` runs the same over a throwaway PostgreSQL cluster (``bench/_pg.py``, default
durability settings) and adds two columns: the **round trips** to the database per request (each
time the driver waits for the server's answer: psycopg's I/O generators woken by a readable socket, counted
by wrapping ``AsyncConnection.wait``) and the statements per request (``AsyncCursor.execute``).
CPU is then this process's only (the database server's is not in it).
Nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from provisiond.protocol.messages import DeviceRegistration
from provisiond.protocol.sas import build_sas_token, derive_device_key
from provisiond.service.gateway import HTTPS, Credential, DeviceCall, Operation
from provisiond.service.registrar import DeviceRequest, Registrar
from provisiond.storage.base import Store
from provisiond.storage.sqlite import SqliteStore

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import app_with_group, cpu_per_item
from cpu import Callgrind, process_tree_cpu

Call = tuple[str, str, str, dict[str, str], bytes]


async def _asgi(app: Any, call: Call) -> int:
    method, path, query, headers, body = call
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 443),
        "extensions": {"tls": {"client_cert_chain": ()}},
        "state": {},
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects early
        raise AssertionError("unreachable")

    status: list[int] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0]


class _Driver:
    """Counts what psycopg sends and waits for (``--db postgresql``)."""

    round_trips = 0
    statements = 0
    #: The postmaster: the database's CPU is its process tree's (``bench/cpu.py``'s reading).
    db_pid: int | None = None

    @classmethod
    def install(cls) -> None:
        import psycopg

        wait, execute = psycopg.AsyncConnection.wait, psycopg.AsyncCursor.execute

        def counting(gen: Any) -> Any:
            # psycopg's I/O generators yield what they wait for and get back what is ready; a
            # wait that ends with the socket readable is an answer the server had not sent
            # yet: a round trip, as the client sees it.
            value: Any = None
            while True:
                try:
                    state = gen.send(value)
                except StopIteration as stop:
                    return stop.value
                value = yield state
                if value and int(value) & 1:  # Ready.R or Ready.RW
                    cls.round_trips += 1

        async def counted_wait(self: Any, gen: Any, *args: Any, **kwargs: Any) -> Any:
            return await wait(self, counting(gen), *args, **kwargs)

        async def counted_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
            cls.statements += 1
            return await execute(self, *args, **kwargs)

        psycopg.AsyncConnection.wait = counted_wait  # type: ignore[method-assign]
        psycopg.AsyncCursor.execute = counted_execute  # type: ignore[method-assign]


#: Set in the process that runs under callgrind: where its dumps go (``--callgrind``).
_CALLGRIND_DIR = "PROVISIOND_BENCH_CALLGRIND_DIR"


def _callgrind() -> Callgrind | None:
    """The callgrind control of this process, when ``--callgrind`` runs it under valgrind."""
    out = os.environ.get(_CALLGRIND_DIR)
    return Callgrind(Path(out)) if out else None


_METER = _callgrind()


async def _measure_idle(seconds: float = 3.0) -> None:
    """The app's own instructions a second while no request runs (its timers), for the phases."""
    if _METER is not None:
        _METER.start(os.getpid())
        await asyncio.sleep(seconds)
        _METER.idle_rate = _METER.stop(os.getpid(), "idle") / seconds


async def _phase(
    name: str, items: list[Any], run: Callable[[Any], Awaitable[None]], concurrency: int, profile: bool
) -> None:
    trips, statements = _Driver.round_trips, _Driver.statements
    db_before = process_tree_cpu(_Driver.db_pid) if _Driver.db_pid else 0.0
    if _METER is not None:
        _METER.start(os.getpid())
    cpu = await cpu_per_item(items, run, concurrency, profile=profile)
    if _METER is not None:  # k instructions, not µs
        cpu = _METER.stop(os.getpid(), re.sub(r"\W+", "-", name).strip("-")) / len(items) / 1000
    trips = (_Driver.round_trips - trips) / len(items)
    statements = (_Driver.statements - statements) / len(items)
    db_cpu = (process_tree_cpu(_Driver.db_pid) - db_before) / len(items) * 1e6 if _Driver.db_pid else 0.0
    print(
        f"| {name} | {len(items)} | {cpu:.0f} | {trips:.2f} | {statements:.2f} | {db_cpu:.0f} |", flush=True
    )


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="provisiond-cpu-inprocess-"))
    cluster = None
    store: Store
    if args.db == "postgresql":
        from _pg import PostgresCluster, find_bindir

        from provisiond.storage.postgres import PostgresStore

        bindir = find_bindir()
        if bindir is None:
            raise SystemExit("PostgreSQL's server binaries are not installed")
        cluster = PostgresCluster(bindir)
        store = PostgresStore(cluster.start())
        _Driver.install()
        _Driver.db_pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
    else:
        store = SqliteStore(tmp / "provisiond.sqlite")
    try:
        await store.open()
        await _run(args, tmp, store)
    finally:
        await store.close()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def _run(args: argparse.Namespace, tmp: Path, store: Store) -> None:
    app, scope, key = await app_with_group(store, tmp)
    registrar = app.state.registrar
    expiry = int(time.time()) + 3600

    def token(reg: str) -> str:
        resource = f"{scope}/registrations/{reg}"
        return build_sas_token(resource, derive_device_key(key, reg), expiry, key_name="registration")

    def http_call(reg: str) -> Call:
        body = json.dumps({"registrationId": reg}).encode()
        headers = {"Host": "localhost", "Authorization": token(reg), "Content-Type": "application/json"}
        return ("PUT", f"/{scope}/registrations/{reg}/register", "api-version=2021-06-01", headers, body)

    http_calls = [http_call(f"h-{i:07d}") for i in range(args.devices)]
    trivial: list[Call] = [("GET", "/nothing", "", {"Host": "localhost"}, b"")] * args.devices
    direct = [
        DeviceRequest(
            id_scope=scope,
            registration_id=reg,
            body=DeviceRegistration(registration_id=reg),
            authorization=token(reg),
        )
        for reg in (f"r-{i:07d}" for i in range(args.devices))
    ]

    async def asgi(expected: int) -> Callable[[Call], Awaitable[None]]:
        async def run(call: Call) -> None:
            status = await _asgi(app, call)
            if status != expected:
                raise RuntimeError(f"{call[0]} {call[1]} answered {status}, not {expected}")

        return run

    async def register(request: DeviceRequest) -> None:
        await registrar.register(request)

    gateway = app.state.gateway
    gateway_calls = [
        DeviceCall(
            credential=Credential(id_scope=scope, registration_id=reg, authorization=token(reg)),
            operation=Operation.REGISTER,
            transport=HTTPS,
            payload=json.dumps({"registrationId": reg}).encode(),
            peer="127.0.0.1",
            describe=f"PUT /{scope}/registrations/{reg}/register",
        )
        for reg in (f"g-{i:07d}" for i in range(args.devices))
    ]

    async def answer(call: DeviceCall) -> None:
        status = (await gateway.answer(call)).status
        if status != 202:
            raise RuntimeError(f"the gateway answered {status}, not 202")

    print(f"# {args.db}, {args.devices} devices, {args.concurrency} in flight")
    measure = "k instructions per request (callgrind)" if _METER is not None else "CPU µs per request"
    print(
        f"| phase | requests | {measure} | database round trips per request | statements per request "
        "| database CPU µs per request |"
    )
    print("|---|---|---|---|---|---|")
    async with app.router.lifespan_context(app):
        assert isinstance(registrar, Registrar)
        await _measure_idle()
        await _phase("trivial (ASGI)", trivial, await asgi(404), args.concurrency, False)
        await _phase("register (ASGI)", http_calls, await asgi(202), args.concurrency, args.profile)
        await _phase("gateway (no HTTP)", gateway_calls, answer, args.concurrency, False)
        await _phase("registrar alone", direct, register, args.concurrency, False)
        await _phase("registrar again (re-registration)", direct, register, args.concurrency, False)
        await _phase("trivial (ASGI)", trivial, await asgi(404), args.concurrency, False)


def _under_callgrind(argv: list[str]) -> int:
    """Run this script again, with ``argv``, under callgrind with its instrumentation off."""
    if shutil.which("callgrind_control") is None:
        print("--callgrind needs valgrind (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    out = Path(tempfile.mkdtemp(prefix="provisiond-callgrind-"))
    try:
        command = [*Callgrind(out).wrapper(), f"--log-file={out / 'valgrind.log'}", sys.executable, __file__]
        return subprocess.run([*command, *argv], env={**os.environ, _CALLGRIND_DIR: str(out)}).returncode
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--callgrind", action="store_true", help="count instructions (see above)")
    arguments = parser.parse_args()
    if arguments.callgrind and _METER is None:
        sys.exit(_under_callgrind(sys.argv[1:]))
    try:
        import uvloop  # what uvicorn runs on when installed
    except ImportError:
        asyncio.run(main(arguments))
    else:
        uvloop.run(main(arguments))
