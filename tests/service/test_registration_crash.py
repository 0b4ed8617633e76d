"""No acknowledged registration is lost across a kill -9: many group-derived devices register
concurrently over HTTPS, each on its own TLS connection, against a real ``provisiond serve``
(SQLite, which commits concurrent registrations together); the server is killed with SIGKILL
while registrations are in flight, started again on the same data directory, and every device
that had its ``assigned`` answer has its registration record (service API) and its identity in
the built-in hub (the hub's REST API), with the device id it was told."""

from __future__ import annotations

import asyncio
import signal
import ssl
import threading
import time
from pathlib import Path

import httpx

from provisiond.errors import NotFoundError
from provisiond.protocol.sas import build_sas_token, derive_device_key, generate_key
from tests._hub_service import HubService
from tests._server import RunningServer, start_server

#: Registrations answered before the kill (the rest are in flight or not sent yet).
ANSWERED_BEFORE_KILL = 300
IN_FLIGHT = 48
DEVICE_API = {"api-version": "2021-10-01"}


class Fleet:
    """Devices registering ``IN_FLIGHT`` at a time on a thread of their own, each on a new
    connection, until stopped; keeps the answers that said ``assigned``."""

    def __init__(self, server: RunningServer, group_key: str) -> None:
        self.server = server
        self.group_key = group_key
        self.assigned: dict[str, str] = {}  # registration id -> device id
        self.enough = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)

    async def _device(self, context: ssl.SSLContext, reg: str) -> None:
        resource = f"{self.server.id_scope}/registrations/{reg}"
        token = build_sas_token(
            resource, derive_device_key(self.group_key, reg), int(time.time()) + 600, key_name="registration"
        )
        async with httpx.AsyncClient(base_url=self.server.base_url, verify=context, timeout=30) as http:
            r = await http.put(
                f"/{resource}/register",
                params=DEVICE_API,
                json={"registrationId": reg},
                headers={"Authorization": token, "Connection": "close"},
            )
        if r.status_code == 202 and r.json().get("status") == "assigned":
            self.assigned[reg] = r.json()["registrationState"]["deviceId"]
            if len(self.assigned) >= ANSWERED_BEFORE_KILL:
                self.enough.set()

    async def _worker(self, context: ssl.SSLContext, first: int) -> None:
        n = first
        while not self._stop.is_set():
            try:
                await self._device(context, f"crash-{n:06d}")
            except (httpx.HTTPError, OSError):
                if self._stop.is_set():
                    return
                await asyncio.sleep(0.05)  # the server is gone: the test stops us soon
            n += IN_FLIGHT

    async def _run(self) -> None:
        context = ssl.create_default_context(cafile=self.server.ca_file)
        await asyncio.gather(*(self._worker(context, k) for k in range(IN_FLIGHT)))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, str]:
        self._stop.set()
        self._thread.join(60)
        return dict(self.assigned)


def test_no_acknowledged_registration_is_lost_across_a_kill_9(tmp_path: Path) -> None:
    data_dir = tmp_path / "crash"
    server = start_server(data_dir)
    group_key = generate_key()
    try:
        with server.client() as admin:
            admin.put(
                "/enrollmentGroups/crash",
                {
                    "enrollmentGroupId": "crash",
                    "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key}},
                },
            )
        fleet = Fleet(server, group_key)
        fleet.start()
        assert fleet.enough.wait(120), "too few registrations were answered"
        server.process.send_signal(signal.SIGKILL)  # while registrations are in flight
        server.process.wait(10)
        assigned = fleet.stop()
    finally:
        server.stop()
    assert len(assigned) >= ANSWERED_BEFORE_KILL

    restarted = start_server(data_dir)
    hub = HubService(restarted.info["hubConnectionString"], ca_file=restarted.ca_file, port=restarted.port)
    lost: list[str] = []
    try:
        with restarted.client() as admin:
            for reg, device_id in sorted(assigned.items()):
                try:
                    state = admin.get(f"/registrations/{reg}")
                except NotFoundError:
                    lost.append(f"{reg}: no record")
                    continue
                identity = hub.request("GET", f"/devices/{device_id}")
                if state.get("status") != "assigned" or state.get("deviceId") != device_id:
                    lost.append(f"{reg}: record {state}")
                elif identity.status_code != 200:
                    lost.append(f"{reg}: identity {identity.status_code}")
    finally:
        hub.close()
        restarted.stop()
    assert not lost, f"{len(lost)} acknowledged registrations lost, e.g. {lost[:5]}"
