"""``bench/cpu.py --preload N``: a database holding N devices that enrolled and registered, made
fast, for the phases to run against.

How: the running server gets one symmetric-key individual enrollment, and that device registers
over HTTPS (so its enrollment, registration record and built-in hub identity are what the
service writes). The server stops; the bench opens the store itself and writes N copies of those
three records through the store's batch writes (``Store.write_many``, a few thousand items per
transaction), each with its own registration id (``p-0000000``...), device id and keys (derived
from one master key: the bench can sign any device's token); then the server starts again on the
same database. The ids and keys of the copies are the template's with the
template's strings replaced (same lengths), the index columns likewise; the operation id
stays the template's.

The ``reregister`` phase then has ``--devices`` of the preloaded devices, spread over the whole
range (every (N / devices)-th), register again: a point read of the enrollment, of the record and
of the identity somewhere in a table of N rows, and an update of the record.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from _common import Server, start_server

from provisiond.protocol.sas import build_sas_token, derive_device_key
from provisiond.storage import Collection, Record, Store, Write, WriteMode, open_store

API_VERSION = "2021-06-01"
TEMPLATE = "p-tmpl000"  # the same length as the copies' ids
ID_FORMAT = "p-{:07d}"
BATCH = 2000


def device_id(i: int) -> str:
    return ID_FORMAT.format(i)


def device_key(master: str, reg: str) -> str:
    return derive_device_key(master, reg)


def _register_over_https(server: Server, scope: str, reg: str, key: str) -> dict[str, Any]:
    token = build_sas_token(
        f"{scope}/registrations/{reg}", key, int(time.time()) + 600, key_name="registration"
    )
    body = json.dumps({"registrationId": reg}).encode()
    request = (
        f"PUT /{scope}/registrations/{reg}/register?api-version={API_VERSION} HTTP/1.1\r\n"
        f"Host: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Authorization: {token}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    context = ssl.create_default_context(cafile=server.ca_file)
    context.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", int(server.info["httpsPort"])), timeout=30) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(request)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 2"):
        raise RuntimeError(f"the template device's registration failed: {answer[:500]!r}")
    result: dict[str, Any] = json.loads(payload)
    if result.get("status") != "assigned":
        raise RuntimeError(f"the template device was not assigned: {result}")
    return result


def _copy(record: Record, replace: list[tuple[bytes, bytes]], new_id: str) -> Write:
    doc = record.doc
    for old, new in replace:
        doc = doc.replace(old, new)
    index: dict[str, str | None] = {}
    for name, value in record.index.items():
        if isinstance(value, str):
            for old, new in replace:
                value = value.replace(old.decode(), new.decode())
        index[name] = value
    return Write(new_id, doc, index, WriteMode.CREATE)


async def _fill(db_url: str, hub: str, count: int, master: str, template_key: str) -> float:
    store: Store = open_store(db_url)
    await store.open()
    try:
        hub_id = f"{hub}/{TEMPLATE}"
        templates = {
            Collection.ENROLLMENTS: await store.get(Collection.ENROLLMENTS, TEMPLATE),
            Collection.REGISTRATIONS: await store.get(Collection.REGISTRATIONS, TEMPLATE),
            Collection.HUB_DEVICES: await store.get(Collection.HUB_DEVICES, hub_id),
        }
        missing = [c.label for c, r in templates.items() if r is None]
        if missing:
            raise RuntimeError(f"the template device has no {', '.join(missing)}")
        started = time.monotonic()
        for start in range(0, count, BATCH):
            writes: dict[Collection, list[Write]] = {c: [] for c in templates}
            for i in range(start, min(start + BATCH, count)):
                reg = device_id(i)
                key = device_key(master, reg)
                replace = [
                    (TEMPLATE.encode(), reg.encode()),
                    (template_key.encode(), key.encode()),
                ]
                for collection, record in templates.items():
                    assert record is not None
                    new_id = f"{hub}/{reg}" if collection is Collection.HUB_DEVICES else reg
                    writes[collection].append(_copy(record, replace, new_id))
            for collection, items in writes.items():
                for outcome in await store.write_many(collection, items):
                    if isinstance(outcome, Exception):
                        raise outcome
            done = min(start + BATCH, count)
            if done % 100_000 == 0 or done == count:
                rate = done / (time.monotonic() - started)
                print(f"# preloaded {done:,} devices ({rate:,.0f}/s)", file=sys.stderr, flush=True)
        return time.monotonic() - started
    finally:
        await store.close()


def preload(
    server: Server, db_url: str, work: Path, count: int, restart_args: tuple[str, ...], sample: int
) -> tuple[Server, list[tuple[str, str]]]:
    """Fill the database of ``server`` with ``count`` registered devices (see the module
    docstring); the server restarted on it, and ``sample`` of the devices (id, key), spread
    over the range, for the ``reregister`` phase."""
    api = server.api()
    scope, hub = str(server.info["idScope"]), str(server.info["builtinHub"]).lower()
    master = base64.b64encode(os.urandom(64)).decode()
    template_key = device_key(master, TEMPLATE)
    api.request(
        "PUT",
        f"/enrollments/{TEMPLATE}",
        json.dumps(
            {
                "registrationId": TEMPLATE,
                "attestation": {
                    "type": "symmetricKey",
                    "symmetricKey": {"primaryKey": template_key, "secondaryKey": template_key},
                },
            }
        ).encode(),
    )
    api.close()
    _register_over_https(server, scope, TEMPLATE, template_key)
    server.stop()
    seconds = asyncio.run(_fill(db_url, hub, count, master, template_key))
    print(f"# preloaded {count:,} devices in {seconds:.0f} s", flush=True)
    restarted = start_server(work / "data", *restart_args)
    step = max(1, count // max(1, sample))
    chosen = [device_id(i) for i in range(0, count, step)][:sample]
    return restarted, [(reg, device_key(master, reg)) for reg in chosen]
