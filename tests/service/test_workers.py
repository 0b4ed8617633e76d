"""`provisiond serve --workers N`: several processes share the port and the database."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from provisiond.protocol.sas import build_sas_token
from tests._server import start_server

V = {"api-version": "2021-06-01"}


def test_two_workers_serve_the_same_data(tmp_path: Path) -> None:
    server = start_server(tmp_path / "workers", "--workers", "2")
    try:
        with server.client() as admin:
            for i in range(8):
                admin.put(
                    f"/enrollments/w-{i}",
                    {"registrationId": f"w-{i}", "attestation": {"type": "symmetricKey"}},
                )
            keys = {
                i: admin.post(f"/enrollments/w-{i}/attestationmechanism")["symmetricKey"]["primaryKey"]
                for i in range(8)
            }
            assert len(list(admin.query("/enrollments/query"))) == 8
        for i in range(8):
            # A new connection per device, so the kernel spreads them over the workers.
            with server.http() as device:
                token = build_sas_token(
                    f"{server.id_scope}/registrations/w-{i}", keys[i], int(time.time()) + 60
                )
                r = device.put(
                    f"/{server.id_scope}/registrations/w-{i}/register",
                    params=V,
                    json={},
                    headers={"Authorization": token},
                )
                assert r.status_code == 202 and r.json()["status"] == "assigned", r.text
        deadline = time.monotonic() + 5
        while (
            len(re.findall(r"registration w-\d assigned", server.log())) < 8 and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        # Worker processes log too (their logging is set up in the worker, not inherited).
        assert len(re.findall(r"registration w-\d assigned", server.log())) == 8
    finally:
        assert server.stop() == 0


def test_a_taken_device_port_fails_loudly(tmp_path: Path) -> None:
    """One worker binds its MQTT/AMQP ports without SO_REUSEPORT: a second service on the same
    port must fail to start with a message naming the port, not silently share it."""
    first = start_server(tmp_path / "first")
    try:
        mqtt_port = int(first.info["mqttPort"])
        with pytest.raises(RuntimeError) as failed:
            start_server(tmp_path / "second", "--mqtt-port", str(mqtt_port))
        assert f"MQTT port {mqtt_port} on 127.0.0.1 is in use" in str(failed.value)
        assert "--mqtt-port" in str(failed.value)
    finally:
        first.stop()
