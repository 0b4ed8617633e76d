"""No acknowledged telemetry is lost across a kill -9: a device (paho, QoS 1, many messages in
flight) publishes to a built-in hub of a real ``provisiond serve`` over TLS; the server is
killed with SIGKILL while messages are in flight, started again on the same data directory, and
every message the device had a PUBACK for is read back through the events stream
(``GET /admin/linkedHubs/{hub}/events``), exactly once."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from tests._hub import HubPaho, provision_symmetric
from tests._server import RunningServer, start_server

#: Acknowledged messages to wait for before the kill (the rest are in flight or unsent).
ACKED_BEFORE_KILL = 300
MAX_MESSAGES = 60_000


class Publisher:
    """Publishes numbered messages at QoS 1 until stopped, keeping which ones were acknowledged.
    paho's message ids are unique below :data:`MAX_MESSAGES` (they wrap at 65535)."""

    def __init__(self, client: HubPaho, topic: str) -> None:
        self.client = client.client
        self.topic = topic
        self._numbers: dict[int, int] = {}  # mid -> n (written by the publishing thread only)
        self._acked_mids: set[int] = set()  # written by paho's network thread only
        self._enough = threading.Event()
        self._stop = threading.Event()
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(400)
        self.client.on_publish = self._on_puback
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_puback(self, _c: Any, _u: Any, mid: int) -> None:
        # paho calls this holding its own locks: take none here (publish() takes them too)
        self._acked_mids.add(mid)
        if len(self._acked_mids) >= ACKED_BEFORE_KILL:
            self._enough.set()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set() and n < MAX_MESSAGES:
            info = self.client.publish(self.topic, json.dumps({"n": n}).encode(), qos=1)
            if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
                time.sleep(0.005)
                continue
            self._numbers[info.mid] = n
            n += 1
            if info.rc != paho.MQTT_ERR_SUCCESS:
                return  # the connection is gone

    def start(self) -> None:
        self._thread.start()

    def wait_enough(self, timeout: float) -> bool:
        return self._enough.wait(timeout)

    def stop(self) -> set[int]:
        """Stop publishing; the numbers of the acknowledged messages."""
        self._stop.set()
        self._thread.join(10)
        return {self._numbers[mid] for mid in set(self._acked_mids) if mid in self._numbers}


def stored_numbers(server: RunningServer, hub: str, device_id: str) -> list[int]:
    """Every event of the device still stored, in order (the events stream from the start)."""
    numbers: list[int] = []
    with server.http() as http:
        with http.stream(
            "GET",
            f"/admin/linkedHubs/{hub}/events",
            params={"api-version": "2021-10-01", "after": "0", "deviceId": device_id, "timeout": "2"},
            headers={"Authorization": server.token()},
            timeout=60,
        ) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                doc = json.loads(line) if line.strip() else {}
                if "body" in doc:
                    numbers.append(json.loads(base64.b64decode(doc["body"]))["n"])
    return numbers


# paho-mqtt 1.6's network thread dies with ssl.SSLEOFError when the server vanishes in the middle
# of a TLS write (Client._packet_write catches ConnectionError, not SSLError): that is the kill.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_no_acknowledged_message_is_lost_across_a_kill_9(tmp_path: Path) -> None:
    data_dir = tmp_path / "crash"
    server = start_server(data_dir)
    try:
        with server.client() as admin:
            device = provision_symmetric(server, admin)
        client = HubPaho(server, device, clean_session=True).connected()
        publisher = Publisher(client, f"devices/{device.device_id}/messages/events/kind=crash")
        publisher.start()
        assert publisher.wait_enough(60), "the device did not get enough acknowledgements"
        server.process.send_signal(signal.SIGKILL)  # while messages are in flight
        server.process.wait(10)
        acked = publisher.stop()
        client.client.loop_stop()
    finally:
        server.stop()
    assert len(acked) >= ACKED_BEFORE_KILL

    restarted = start_server(data_dir)
    try:
        stored = stored_numbers(restarted, device.hub, device.device_id)
    finally:
        restarted.stop()
    missing = sorted(acked - set(stored))
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:10]}"
    assert len(stored) == len(set(stored)), "an event is stored twice"
