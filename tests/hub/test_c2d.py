"""Cloud-to-device messages, service side, over real TLS against ``provisiond serve``: the admin
REST call and ``provisiond hub send-c2d`` queue a message with IoT Hub's bounds (50 a device,
expiry 1 h by default and at most 48 h, message id, properties, ack), expired messages neither
count nor stay."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner

from provisiond.cli import cli
from provisiond.hub.messages import CloudToDeviceMessage, partition
from provisiond.service_client import ServiceClient
from provisiond.storage import Stream, utc_iso
from tests._server import RunningServer, start_server
from tests.hub._ops import append_c2d, builtin_hub, provision, read_stream, uid

SEND = "/admin/linkedHubs/{hub}/devices/{device}/messages/deviceBound"
_ENV: dict[str, str | None] = {"PROVISIOND_CONNECTION_STRING": None, "PROVISIOND_DATA_DIR": None}


@pytest.fixture()
def admin(server: RunningServer) -> Iterator[ServiceClient]:
    with server.client() as client:
        yield client


def queued(server: RunningServer, device: str) -> list[CloudToDeviceMessage]:
    part = partition(builtin_hub(server), device)
    return [
        msgspec.json.decode(e.doc, type=CloudToDeviceMessage)
        for e in read_stream(server, Stream.HUB_C2D, part)
    ]


def send(server: RunningServer, device: str, body: bytes = b"hi", **headers: str) -> Any:
    with server.http() as http:
        return http.post(
            SEND.format(hub=builtin_hub(server), device=device),
            params={"api-version": "2021-10-01"},
            content=body,
            headers={"Authorization": server.token(), **headers},
        )


def seconds_until(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - time.time()


def test_a_message_is_queued_with_its_fields(server: RunningServer, admin: ServiceClient) -> None:
    device, _ = provision(server, admin)
    answer = send(
        server,
        device,
        b'{"cmd":"reboot"}',
        **{
            "iothub-messageid": "m-1",
            "iothub-correlationid": "c-1",
            "iothub-ack": "full",
            "iothub-contenttype": "application/json",
            "iothub-app-priority": "high",
            "iothub-app-empty": "",
        },
    )
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert (doc["messageId"], doc["ack"], doc["queueDepth"]) == ("m-1", "full", 1)
    assert 3590 < seconds_until(doc["expiryTimeUtc"]) <= 3600, "IoT Hub's default time to live: one hour"
    [message] = queued(server, device)
    assert message.body == b'{"cmd":"reboot"}'
    assert (message.message_id, message.correlation_id, message.ack.value) == ("m-1", "c-1", "full")
    assert message.content_type == "application/json"
    assert message.properties == {"priority": "high", "empty": ""}
    assert message.to == f"/devices/{device}/messages/devicebound"
    assert message.expiry_time_utc == doc["expiryTimeUtc"] and message.delivery_count == 0

    second = send(server, device).json()
    assert second["queueDepth"] == 2 and second["ack"] == "none"
    assert len(second["messageId"]) == 36, "a new UUID when the sender gives none"


def test_send_c2d_command(server: RunningServer, admin: ServiceClient) -> None:
    device, _ = provision(server, admin)
    expiry = utc_iso(time.time() + 7200)
    result = CliRunner().invoke(
        cli,
        [
            "hub",
            "send-c2d",
            device,
            "--data-dir",
            str(server.data_dir),
            "--data",
            "héllo",
            "--mid",
            "cli-1",
            "--props",
            "a=1;b=2",
            "-p",
            "c=3",
            "--ack",
            "positive",
            "--expiry",
            expiry,
            "--json",
        ],
        env=_ENV,
    )
    assert result.exit_code == 0, (result.output, result.exception)
    doc = json.loads(result.stdout)
    assert (doc["messageId"], doc["ack"], doc["expiryTimeUtc"], doc["queueDepth"]) == (
        "cli-1",
        "positive",
        expiry,
        1,
    )
    [message] = queued(server, device)
    assert message.body == "héllo".encode() and message.properties == {"a": "1", "b": "2", "c": "3"}

    text = CliRunner().invoke(
        cli,
        ["hub", "send-c2d", device, "--data-dir", str(server.data_dir), "--data-base64", "AP8="],
        env=_ENV,
    )
    assert text.exit_code == 0, text.output
    assert (
        f"Queued a cloud-to-device message for {device!r}" in text.stdout
        and "Messages queued  2" in text.stdout
    )
    assert queued(server, device)[1].body == b"\x00\xff"

    missing = CliRunner().invoke(
        cli, ["hub", "send-c2d", uid("ghost"), "--data-dir", str(server.data_dir)], env=_ENV
    )
    assert missing.exit_code == 1 and "does not exist in IoT hub" in str(missing.exception)


def test_the_queue_holds_fifty_messages_and_expired_ones_do_not_count(
    server: RunningServer, admin: ServiceClient
) -> None:
    device, _ = provision(server, admin)
    hub = builtin_hub(server)
    gone = CloudToDeviceMessage(
        message_id="expired",
        to=f"/devices/{device}/messages/devicebound",
        expiry_time_utc=utc_iso(time.time() - 1),
        enqueued_time=utc_iso(time.time() - 3600),
    )
    append_c2d(server, hub, device, [gone] * 10)
    for i in range(50):
        answer = send(server, device, str(i).encode())
        assert answer.status_code == 200 and answer.json()["queueDepth"] == i + 1, answer.text
    full = send(server, device)
    assert full.status_code == 403, full.text
    assert full.json()["errorCode"] == 403004 and "maximum of 50" in full.json()["message"]
    assert len(queued(server, device)) == 50 and all(
        m.message_id != "expired" for m in queued(server, device)
    )
    assert "-> 403 403004" in server.log()
    # The command line says so, without advice about policies' rights (it is no question of rights).
    refused = CliRunner().invoke(
        cli, ["hub", "send-c2d", device, "--data-dir", str(server.data_dir), "--data", "x"], env=_ENV
    )
    assert refused.exit_code == 1 and "maximum of 50" in str(refused.exception)
    assert not getattr(refused.exception, "__notes__", None), refused.exception.__notes__


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ({"iothub-ack": "sometimes"}, "ack must be one of"),
        ({"iothub-expiry": "2001-01-01T00:00:00Z"}, "in the past"),
        ({"iothub-expiry": utc_iso(time.time() + 49 * 3600)}, "48 hours"),
        ({"iothub-expiry": "soon"}, "expiryTimeUtc 'soon' is neither an ISO 8601 time"),
        ({"iothub-app-$reserved": "x"}, "reserved"),
        # System properties count and are bounded: a 100 KB correlation id was queued, and the
        # device was disconnected on every connection by a topic over MQTT's 65,535 bytes.
        ({"iothub-correlationid": "c" * 129}, "at most 128"),
        ({"iothub-messageid": "m" * 129}, "at most 128"),
        # Properties that URL-encode to three times their size (within the 64 KB of the message).
        ({f"iothub-app-p{n}": "%" * 8000 for n in range(4)}, "over MQTT's 65535"),
    ],
)
def test_out_of_bounds_messages_are_400s(
    server: RunningServer, admin: ServiceClient, headers: dict[str, str], words: str
) -> None:
    device, _ = provision(server, admin)
    answer = send(server, device, **headers)
    assert answer.status_code == 400 and words in answer.json()["message"], answer.text
    assert queued(server, device) == []


def test_too_large_unknown_device_and_auth(server: RunningServer, admin: ServiceClient) -> None:
    device, _ = provision(server, admin)
    big = send(server, device, b"x" * (64 * 1024 + 1))
    assert big.status_code == 400 and "exceeds" in big.json()["message"]
    ghost = send(server, uid("ghost"))
    assert ghost.status_code == 404 and ghost.json()["errorCode"] == 404001
    with server.http() as http:
        anonymous = http.post(
            SEND.format(hub=builtin_hub(server), device=device),
            params={"api-version": "2021-10-01"},
            content=b"x",
        )
    assert anonymous.status_code == 401
    assert queued(server, device) == []


def test_the_periodic_pass_drops_expired_messages(tmp_path: Any) -> None:
    server = start_server(tmp_path / "c2d-expiry", "--hub-trim-interval", "0.2")
    try:
        hub = builtin_hub(server)
        now = time.time()
        stale = CloudToDeviceMessage(
            message_id="old",
            to="/devices/d/messages/devicebound",
            expiry_time_utc=utc_iso(now - 5),
            enqueued_time=utc_iso(now - 60),
        )
        fresh = msgspec.structs.replace(stale, message_id="new", expiry_time_utc=utc_iso(now + 3600))
        append_c2d(server, hub, "d", [stale, fresh, stale])
        deadline = time.monotonic() + 30
        while len(left := read_stream(server, Stream.HUB_C2D)) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [msgspec.json.decode(e.doc, type=CloudToDeviceMessage).message_id for e in left] == ["new"]
        assert "2 expired cloud-to-device messages removed" in server.log()
    finally:
        server.stop()
