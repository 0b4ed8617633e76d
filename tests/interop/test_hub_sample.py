"""samples/hub_device.py, run as a user runs it (samples/README.md, section 7): the official
azure-iot-device provisions a device of an enrollment, connects to its assigned built-in hub over
MQTT (and MQTT over WebSockets), sends telemetry, reads its twin (the enrollment's initial twin)
and reports properties, and answers direct methods invoked the way the README invokes them
(the admin call under ``provisiond hub invoke-method``). The SDK only connects to 8883 and 443:
the server runs on the standard ports, as tests/interop/test_hub_device_sdk.py's does."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._server import RunningServer, start_server, wait_for_free_ports

pytestmark = [pytest.mark.interop]

HTTPS_PORT, MQTT_PORT = 443, 8883
SAMPLE = Path(__file__).parents[2] / "samples" / "hub_device.py"
WAIT = 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    if taken := wait_for_free_ports((HTTPS_PORT, MQTT_PORT), WAIT):
        pytest.fail(
            f"port(s) {taken} on 127.0.0.1 are in use: the sample's SDK needs 8883 and 443", pytrace=False
        )
    running = start_server(
        tmp_path_factory.mktemp("sample-hub"), "--mqtt-port", str(MQTT_PORT), port=HTTPS_PORT
    )
    yield running
    running.stop()
    assert "Traceback" not in running.log(), running.log()[-5000:]


class Sample:
    """The sample as a child process; its output lines arrive in order."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SAMPLE), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._new:
                self.lines.append(line.rstrip("\n"))
                self._new.notify_all()

    def wait_for(self, text: str) -> str:
        with self._new:
            found = self._new.wait_for(lambda: any(text in line for line in self.lines), WAIT)
            assert found, f"the sample did not print {text!r}:\n" + "\n".join(self.lines)
            return next(line for line in self.lines if text in line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT)
        self._reader.join(WAIT)
        assert self.process.stdout is not None
        self.process.stdout.close()

    def output(self) -> str:
        return "\n".join(self.lines)


@pytest.mark.parametrize("websockets", [pytest.param(False, id="mqtt"), pytest.param(True, id="mqtt-ws")])
def test_the_sample_provisions_then_exchanges_telemetry_twin_and_methods(
    server: RunningServer, websockets: bool
) -> None:
    registration_id = f"sample-hub-{'ws' if websockets else 'mqtt'}"
    with server.client() as admin:
        admin.put(
            f"/enrollments/{registration_id}",
            {
                "registrationId": registration_id,
                "attestation": {"type": "symmetricKey"},
                "initialTwin": {"properties": {"desired": {"interval": 30}}},
            },
        )
        key = admin.post(f"/enrollments/{registration_id}/attestationmechanism")["symmetricKey"]["primaryKey"]
        args = [
            "--data-dir",
            str(server.data_dir),
            "--registration-id",
            registration_id,
            "--symmetric-key",
            key,
        ]
        sample = Sample(*args, *(["--websockets"] if websockets else []), "--wait", str(WAIT))
        try:
            hub = str(server.info["builtinHub"])
            assert sample.wait_for("provisioned:") == (
                f"provisioned: assigned, device {registration_id!r} on hub {hub!r}"
            )
            sample.wait_for("sent 3 telemetry messages")
            assert '"interval": 30' in sample.wait_for("twin: desired")
            sample.wait_for("reported properties now at $version 2")
            sample.wait_for("answering direct methods")

            admin.hub_messages.send_c2d(hub, registration_id, b"hello", properties={"kind": "greeting"})
            assert sample.wait_for("cloud-to-device message") == (
                'cloud-to-device message \'hello\', properties {"kind": "greeting"}'
            )
            answer = admin.hub_messages.invoke_method(hub, registration_id, "getInfo", {"verbose": True})
            assert answer.status == 200
            assert answer.payload["method"] == "getInfo" and answer.payload["received"] == {"verbose": True}
            admin.hub_messages.invoke_method(hub, registration_id, "stop")
            assert sample.process.wait(WAIT) == 0, sample.output()
        finally:
            sample.close()
        assert "method 'getInfo' called with {\"verbose\": true}" in sample.output()

        events = list(admin.hub_messages.events(hub, device_id=registration_id, after=0, quiet_timeout=1))
    assert [e.device_id for e in events] == [registration_id] * 3
    assert [e.properties for e in events] == [{"sample": "hub_device"}] * 3
    assert events[0].system_properties["content-type"] == "application/json"
    assert [e.body for e in events] == [b'{"temperature": %d.0, "n": %d}' % (20 + n, n) for n in range(3)]
