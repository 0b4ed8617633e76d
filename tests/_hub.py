"""Helpers for the built-in hub's device tests: provision a device through DPS (HTTPS device
API), then connect it to its hub with paho-mqtt (the independent MQTT peer), and reach the
server's database from the test as another process would (a second node)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import queue
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho  # type: ignore[import-untyped]

from provisiond import pki
from provisiond.protocol.sas import build_sas_token
from provisiond.storage import Store, open_store
from tests._server import RunningServer

__all__ = [
    "HubPaho",
    "Provisioned",
    "hub_token",
    "hub_username",
    "poll_until",
    "provision_symmetric",
    "provision_x509",
    "server_store",
    "uid",
]

WAIT = 10.0
V = {"api-version": "2021-10-01"}


def uid(prefix: str = "hub") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Provisioned:
    """A device DPS assigned to a built-in hub: its hub, device id, and key or certificate."""

    hub: str
    device_id: str
    key: str | None = None
    cert: Path | None = None
    key_file: Path | None = None


def hub_username(hub: str, device_id: str) -> str:
    return f"{hub}/{device_id}/?api-version=2021-04-12&DeviceClientType=tests%2F1"


def hub_token(hub: str, device_id: str, key: str, *, ttl: int = 3600) -> str:
    return build_sas_token(f"{hub}/devices/{device_id}", key, int(time.time()) + ttl)


def _register(server: RunningServer, reg: str, token: str | None, ctx: ssl.SSLContext) -> dict[str, Any]:
    import httpx

    with httpx.Client(base_url=server.base_url, verify=ctx, timeout=10) as http:
        r = http.put(
            f"/{server.id_scope}/registrations/{reg}/register",
            params=V,
            json={"registrationId": reg},
            headers={"Authorization": token} if token else {},
        )
    assert r.status_code == 202 and r.json()["status"] == "assigned", r.text
    state: dict[str, Any] = r.json()["registrationState"]
    return state


def provision_symmetric(
    server: RunningServer, admin: Any, *, initial_twin: Any = None, device_id: str | None = None
) -> Provisioned:
    reg = uid("hsk")
    body: dict[str, Any] = {"registrationId": reg, "attestation": {"type": "symmetricKey"}}
    if initial_twin is not None:
        body["initialTwin"] = initial_twin
    if device_id is not None:
        body["deviceId"] = device_id
    admin.put(f"/enrollments/{reg}", body)
    key: str = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    token = build_sas_token(
        f"{server.id_scope}/registrations/{reg}", key, int(time.time()) + 600, key_name="registration"
    )
    state = _register(server, reg, token, ssl.create_default_context(cafile=server.ca_file))
    return Provisioned(state["assignedHub"], state["deviceId"], key=key)


def provision_x509(server: RunningServer, admin: Any, tmp: Path) -> Provisioned:
    reg = uid("hx")
    leaf = pki.make_device_cert(reg)
    prefix = tmp / reg
    pki.write_issued(leaf, prefix)
    admin.put(
        f"/enrollments/{reg}",
        {
            "registrationId": reg,
            "attestation": {
                "type": "x509",
                "x509": {
                    "clientCertificates": {
                        "primary": {"certificate": pki.certificate_pem(leaf.cert).decode()}
                    }
                },
            },
        },
    )
    ctx = ssl.create_default_context(cafile=server.ca_file)
    ctx.load_cert_chain(str(pki.cert_path(prefix)), str(pki.key_path(prefix)))
    state = _register(server, reg, None, ctx)
    return Provisioned(
        state["assignedHub"], state["deviceId"], cert=pki.cert_path(prefix), key_file=pki.key_path(prefix)
    )


class HubPaho:
    """paho-mqtt 1.6 as a device of a built-in hub: every callback lands in ``events``."""

    def __init__(
        self,
        server: RunningServer,
        device: Provisioned,
        *,
        password: str | None = None,
        username: str | None = None,
        client_id: str | None = None,
        clean_session: bool = False,
        keepalive: int = 60,
        websockets: bool = False,
        use_cert: bool | None = None,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.device = device
        self.client = paho.Client(
            client_id=client_id if client_id is not None else device.device_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
            transport="websockets" if websockets else "tcp",
        )
        ctx = ssl.create_default_context(cafile=server.ca_file)
        if use_cert or (use_cert is None and device.cert is not None):
            assert device.cert is not None
            ctx.load_cert_chain(str(device.cert), str(device.key_file))
        self.client.tls_set_context(ctx)
        # No reconnecting by itself (paho's loop would, after a second): a test that sees this
        # connection closed means it to stay closed (a reconnect would replace the device's
        # newer connection).
        self.client.reconnect_delay_set(min_delay=3600, max_delay=3600)
        if websockets:
            self.client.ws_set_options(path="/$iothub/websocket")
        if password is None and device.key is not None:
            password = hub_token(device.hub, device.device_id, device.key)
        self.client.username_pw_set(username or hub_username(device.hub, device.device_id), password)
        self.client.on_connect = lambda c, u, flags, rc: self._event("connack", rc, flags["session present"])
        self.client.on_subscribe = lambda c, u, mid, granted: self._event("suback", mid, tuple(granted))
        self.client.on_publish = lambda c, u, mid: self._event("puback", mid)
        self.client.on_message = lambda c, u, m: self._event("message", m.topic, m.qos, m.payload, m.dup)
        self.client.on_disconnect = lambda c, u, rc: self._event("disconnect", rc)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1)
        port = server.port if websockets else int(server.info["mqttPort"])
        self.client.connect("localhost", port, keepalive)
        self.client.loop_start()

    def _event(self, *event: Any) -> None:
        self.events.put(event)

    def next(self, kind: str, timeout: float = WAIT) -> tuple[Any, ...]:
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if event[0] == kind:
                return event

    def connack(self) -> tuple[int, int]:
        _, rc, session_present = self.next("connack")
        return rc, session_present

    def connected(self, *, session_present: int = 0) -> HubPaho:
        assert self.connack() == (0, session_present)
        return self

    def subscribe(self, *filters: str, qos: int = 1) -> tuple[int, ...]:
        self.client.subscribe([(f, qos) for f in filters])
        granted: tuple[int, ...] = self.next("suback")[2]
        return granted

    def publish(self, topic: str, payload: bytes = b"", qos: int = 1) -> int:
        info = self.client.publish(topic, payload, qos=qos)
        mid: int = info.mid
        return mid

    def message(self, timeout: float = WAIT) -> tuple[str, int, bytes, bool]:
        _, topic, qos, payload, dup = self.next("message", timeout)
        return topic, qos, payload, dup

    def twin_request(self, topic: str, body: bytes) -> tuple[str, Any]:
        self.publish(topic, body)
        response_topic, _, payload, _ = self.message()
        return response_topic, json.loads(payload) if payload else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.asynccontextmanager
async def server_store(server: RunningServer) -> AsyncIterator[Store]:
    """The server's database, opened from the test process (as another node would)."""
    store = open_store(f"sqlite:///{server.data_dir / 'provisiond.db'}")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def poll_until(check: Callable[[], Awaitable[bool]], seconds: float = WAIT) -> bool:
    """Whether ``check`` comes true within ``seconds`` (asked every 50 ms)."""
    deadline = time.monotonic() + seconds
    for _ in itertools.count():
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return False
