"""A node rides through a PostgreSQL failover: a primary with a synchronous standby, the node on
a multi-host URL with ``target_session_attrs=read-write``, registrations under load (HTTPS,
symmetric key); the primary's postmaster is killed (SIGKILL) and the standby promoted.

While the database is gone, requests fail fast with DPS's retryable 503 + Retry-After over
HTTPS, MQTT and AMQP (never a hang: every client call has a timeout, and one that runs out
fails the test), ``/readyz`` says not ready while ``/healthz`` stays up; afterwards the node serves registrations and service
reads again by itself (its hub broker listening for notifications there too), and every
registration it answered ``assigned`` is on the new primary.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from provisiond.device import AmqpTransport, MqttTransport, SymmetricKeySecurity
from provisiond.protocol.messages import DeviceRegistration
from provisiond.protocol.registration import Reply, SendRegister
from provisiond.protocol.sas import build_sas_token, derive_device_key
from tests._postgres import ReplicatedPair
from tests._server import RunningServer, start_server

pytestmark = pytest.mark.postgres

V = {"api-version": "2021-06-01"}
#: Generous bound on any single request: a call that takes longer is a hang.
CLIENT_TIMEOUT = 15.0
#: Bound on each phase of the test (the node noticing the failure, the node recovering).
PHASE_TIMEOUT = 20.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = PHASE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Answer:
    registration_id: str
    status: int | None  # None: no answer (the error says why)
    body: dict[str, object] = field(default_factory=dict)
    retry_after: str | None = None
    error: str | None = None
    at: float = field(default_factory=time.monotonic)


class Devices:
    """Threads registering new devices of one symmetric-key group, as fast as they are answered;
    after a 503 a device retries its registration, as the SDKs do."""

    def __init__(self, server: RunningServer, group_key: str, threads: int = 3) -> None:
        self.server, self.group_key = server, group_key
        self.answers: list[Answer] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(CLIENT_TIMEOUT + 5)
            assert not thread.is_alive(), "a device thread hung"

    def snapshot(self) -> list[Answer]:
        with self.lock:
            return list(self.answers)

    def _run(self, n: int) -> None:
        context = ssl.create_default_context(cafile=self.server.ca_file)
        with httpx.Client(base_url=self.server.base_url, verify=context, timeout=CLIENT_TIMEOUT) as http:
            count = 0
            while not self.stopping.is_set():
                count += 1
                reg = f"failover-{n}-{count}"
                while not self.stopping.is_set():
                    answer = self._register(http, reg)
                    with self.lock:
                        self.answers.append(answer)
                    if answer.status != 503:
                        break
                    time.sleep(0.1)  # a real device waits Retry-After; the test keeps it short

    def _register(self, http: httpx.Client, reg: str) -> Answer:
        scope = self.server.id_scope
        key = derive_device_key(self.group_key, reg)
        token = build_sas_token(
            f"{scope}/registrations/{reg}", key, int(time.time()) + 3600, key_name="registration"
        )
        try:
            response = http.put(
                f"/{scope}/registrations/{reg}/register",
                params=V,
                json={"registrationId": reg},
                headers={"Authorization": token},
            )
        except httpx.HTTPError as exc:
            return Answer(reg, None, error=f"{type(exc).__name__}: {exc}")
        try:
            body = response.json()
        except ValueError:
            body = {"notJson": response.text[:200]}
        return Answer(reg, response.status_code, body, response.headers.get("retry-after"))


class Probe:
    """A thread asking ``/readyz`` and ``/healthz`` over and over, and what each answered."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.answers: list[tuple[str, float, int | None, str | None]] = []  # path, time, status, Retry-After
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        context = ssl.create_default_context(cafile=self.server.ca_file)
        with httpx.Client(base_url=self.server.base_url, verify=context, timeout=CLIENT_TIMEOUT) as http:
            while not self.stopping.is_set():
                for path in ("/readyz", "/healthz"):
                    try:
                        response = http.get(path)
                        status, retry_after = response.status_code, response.headers.get("retry-after")
                    except httpx.HTTPError:
                        status, retry_after = None, None
                    self.answers.append((path, time.monotonic(), status, retry_after))
                time.sleep(0.05)

    def of(self, path: str) -> list[tuple[float, int | None, str | None]]:
        """(time, status, Retry-After) of each answer on ``path``, in order."""
        return [(at, status, retry) for p, at, status, retry in list(self.answers) if p == path]


async def register_over_mqtt_and_amqp(server: RunningServer, group_key: str) -> list[Reply]:
    replies = []
    for transport_class, port in (
        (MqttTransport, server.info["mqttPort"]),
        (AmqpTransport, server.info["amqpPort"]),
    ):
        reg = f"failover-{transport_class.__name__.lower()}"
        security = SymmetricKeySecurity.from_group_key(registration_id=reg, group_key=group_key)
        async with transport_class(
            host=f"localhost:{port}",
            id_scope=server.id_scope,
            security=security,
            ca_file=server.ca_file,
            timeout=CLIENT_TIMEOUT,
        ) as transport:
            replies.append(
                await transport.send(
                    SendRegister(registration_id=reg, body=DeviceRegistration(registration_id=reg))
                )
            )
    return replies


def test_a_node_rides_through_a_postgres_failover(
    replicated_postgres: ReplicatedPair, tmp_path: Path
) -> None:
    pair = replicated_postgres
    server = start_server(tmp_path / "node", "--db", pair.multi_host_url)
    devices: Devices | None = None
    probe = Probe(server)
    try:
        with server.client() as admin:
            admin.put(
                "/enrollmentGroups/failover",
                {"enrollmentGroupId": "failover", "attestation": {"type": "symmetricKey"}},
            )
            group_key = admin.post("/enrollmentGroups/failover/attestationmechanism")["symmetricKey"][
                "primaryKey"
            ]
        devices = Devices(server, group_key)
        probe.thread.start()
        devices.start()
        wait_for(
            lambda: sum(a.status == 202 for a in devices.snapshot()) >= 20, "registrations before the failure"
        )
        assert probe.of("/readyz")[-1][1] == 200

        pair.primary.kill()
        killed_at = time.monotonic()
        # The node notices by itself: registrations get 503, readiness says not ready ...
        wait_for(
            lambda: (
                sum(a.status == 503 and a.at > killed_at for a in devices.snapshot()) >= 10
                and sum(status == 503 and at > killed_at for at, status, _ in probe.of("/readyz")) >= 3
            ),
            "the node to report the database unavailable",
        )
        # ... over MQTT and AMQP too, with their spelling of Retry-After.
        for reply in asyncio.run(register_over_mqtt_and_amqp(server, group_key)):
            assert reply.status == 503 and reply.retry_after is not None and reply.retry_after >= 1, reply
            assert json.loads(reply.body)["errorCode"] == 503000, reply
        pair.standby.promote()
        promoted_at = time.monotonic()
        # ... and finds the new primary by itself, without a restart.
        wait_for(
            lambda: (
                any(a.status == 202 and a.at > promoted_at for a in devices.snapshot())
                and any(status == 200 and at > promoted_at for at, status, _ in probe.of("/readyz"))
            ),
            "registrations and readiness on the new primary",
        )
        with server.client() as admin:
            assert admin.get("/enrollmentGroups/failover")["enrollmentGroupId"] == "failover"

        # The hub broker's listening connection (LISTEN, outside the pool) follows it too.
        def listening_on_the_new_primary() -> bool:
            with psycopg.connect(pair.standby.url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %'"
                ).fetchone()
            return row is not None and row[0] == 1

        wait_for(listening_on_the_new_primary, "the listening connection on the new primary")
        devices.stop()
    finally:
        probe.stopping.set()
        if devices is not None:
            devices.stopping.set()
        probe.thread.join(CLIENT_TIMEOUT + 5)
        server.stop()

    answers = devices.snapshot()
    # Never a hang, never a connection dropped: every request got an answer ...
    assert [a for a in answers if a.status is None] == []
    # ... and each answer is an assignment or DPS's retryable "unavailable".
    for answer in answers:
        if answer.status == 202:
            assert answer.body["status"] == "assigned", answer
        else:
            assert answer.status == 503, answer
            assert answer.retry_after is not None and int(answer.retry_after) >= 1, answer
            assert answer.body["errorCode"] == 503000 and answer.body["trackingId"], answer
    retried = [a for a in answers if a.status == 503]
    assert retried, "no request was answered during the switch"

    # Nothing acknowledged was lost: every registration answered "assigned" (and its identity
    # in the built-in hub) is on the new primary.
    assigned = {a.registration_id.lower() for a in answers if a.status == 202}
    with psycopg.connect(pair.standby.url, autocommit=True) as conn:
        records = dict(conn.execute("SELECT key, status FROM registrations").fetchall())
        identities = {key.rsplit("/", 1)[1].lower() for (key,) in conn.execute("SELECT key FROM hub_devices")}
    assert {reg: records.get(reg) for reg in assigned} == dict.fromkeys(assigned, "assigned")
    assert assigned <= identities

    # Readiness: ready, then not ready (with Retry-After), then ready again; liveness all along.
    statuses = [status for _, status, _ in probe.of("/readyz")]
    first_down = statuses.index(503)
    assert 200 in statuses[:first_down] and 200 in statuses[first_down:]
    assert all(retry is not None for _, status, retry in probe.of("/readyz") if status == 503)
    assert {status for _, status, _ in probe.of("/healthz")} == {200}

    assert "Traceback" not in server.log()
