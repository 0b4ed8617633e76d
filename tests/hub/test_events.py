"""The built-in hubs' telemetry, read side, over real TLS against ``provisiond serve``: the
NDJSON events endpoint (start, resume, filters, errors), ``provisiond hub monitor-events``,
and the stream's retention (the periodic trim in the server, and the trim rule itself)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from provisiond.cli import cli
from provisiond.hub.events import EventLog, Retention
from provisiond.service_client import ServiceClient
from provisiond.storage import Store, Stream, utc_iso
from tests._hub_peer import HOST, HubPeer
from tests._server import RunningServer, start_server
from tests.hub._ops import append_events, builtin_hub, read_stream, telemetry, uid

EVENTS = "/admin/linkedHubs/{hub}/events"


@pytest.fixture()
def admin(server: RunningServer) -> Iterator[ServiceClient]:
    with server.client() as client:
        yield client


def lines(server: RunningServer, hub: str, **params: Any) -> list[dict[str, Any]]:
    """The whole NDJSON answer of a stream that ends (``timeout`` seconds of quiet)."""
    with server.http() as http:
        response = http.get(
            EVENTS.format(hub=hub),
            params={"api-version": "2021-10-01", "timeout": 1, **params},
            headers={"Authorization": server.token()},
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines() if line]


def events_of(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if "seq" in d]


def test_the_stream_from_a_time_resumes_after_a_seq_and_filters_by_device(server: RunningServer) -> None:
    hub = builtin_hub(server)
    d1, d2 = uid("ev"), uid("ev")
    start = int(time.time() * 1000) - 1
    stored = append_events(
        server,
        hub,
        [
            telemetry(
                d1,
                b'{"t":21.5}',
                properties={"alert": "no"},
                system_properties={"content-type": "application/json"},
            ),
            telemetry(d2, b"\x00\xffbinary"),
            telemetry(d1, b"third"),
        ],
    )
    append_events(server, "other-hub.example.com", [telemetry(d1, b"elsewhere")])

    docs = lines(server, hub, enqueuedTime=start)
    assert docs[0] == {"cursor": docs[0]["cursor"]} and docs[0]["cursor"] < stored[0].seq
    got = [e for e in events_of(docs) if e["deviceId"] in (d1, d2)]
    assert [e["seq"] for e in got] == [e.seq for e in stored]
    assert [base64.b64decode(e["body"]) for e in got] == [b'{"t":21.5}', b"\x00\xffbinary", b"third"]
    assert got[0]["properties"] == {"alert": "no"}
    assert got[0]["systemProperties"] == {"content-type": "application/json"}
    assert got[0]["deviceId"] == d1 and "enqueuedTime" in got[0]
    assert docs[-1] == {"cursor": docs[-1]["cursor"]} and docs[-1]["cursor"] >= stored[-1].seq
    assert all(base64.b64decode(e["body"]) != b"elsewhere" for e in events_of(docs)), "another hub's event"

    resumed = events_of(lines(server, hub, after=stored[1].seq))
    assert [e["seq"] for e in resumed if e["deviceId"] in (d1, d2)] == [stored[2].seq]
    only_d2 = events_of(lines(server, hub, after=stored[0].seq - 1, deviceId=d2))
    assert [e["seq"] for e in only_d2] == [stored[1].seq]


def test_without_a_start_the_stream_sends_what_arrives_from_then_on(server: RunningServer) -> None:
    hub = builtin_hub(server)
    device = uid("live")
    [old] = append_events(server, hub, [telemetry(device, b"before")])
    with (
        server.http() as http,
        http.stream(
            "GET",
            EVENTS.format(hub=hub),
            params={"api-version": "2021-10-01", "deviceId": device, "timeout": 20},
            headers={"Authorization": server.token()},
        ) as response,
    ):
        assert response.status_code == 200
        received = response.iter_lines()
        first = json.loads(next(received))
        assert first["cursor"] >= old.seq, "the stream starts at its end"
        [new] = append_events(server, hub, [telemetry(device, b"after")])
        event = json.loads(next(line for line in received if line))
        assert (event["seq"], base64.b64decode(event["body"])) == (new.seq, b"after")


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"after": "x"}, 400, "after must be an integer"),
        ({"after": "-3"}, 400, "must not be negative"),
        ({"enqueuedTime": "yesterday"}, 400, "neither an ISO 8601 time"),
        ({"timeout": "1.5"}, 400, "timeout must be an integer"),
    ],
)
def test_bad_parameters_are_400s(
    server: RunningServer, params: dict[str, str], status: int, words: str
) -> None:
    with server.http() as http:
        response = http.get(
            EVENTS.format(hub=builtin_hub(server)),
            params={"api-version": "2021-10-01", **params},
            headers={"Authorization": server.token()},
        )
    assert response.status_code == status and words in response.json()["message"], response.text


def test_the_stream_is_authorized_and_only_for_builtin_hubs(
    server: RunningServer, admin: ServiceClient, hub_peer: HubPeer
) -> None:
    with server.http() as http:
        no_token = http.get(EVENTS.format(hub=builtin_hub(server)), params={"api-version": "2021-10-01"})
        assert no_token.status_code == 401
        auth = {"Authorization": server.token()}
        missing = http.get(
            EVENTS.format(hub="nope.example.com"), params={"api-version": "2021-10-01"}, headers=auth
        )
        assert missing.status_code == 404 and missing.json()["errorCode"] == 404204
        # a linked hub provisiond does not keep itself (a stand-in hub that answers the link check)
        remote = HOST
        admin.put(f"/admin/linkedHubs/{remote}", hub_peer.body(applyAllocationPolicy=False))
        try:
            foreign = http.get(EVENTS.format(hub=remote), params={"api-version": "2021-10-01"}, headers=auth)
        finally:  # the other tests of the session's server provision into the built-in hub alone
            admin.delete(f"/admin/linkedHubs/{remote}")
        assert foreign.status_code == 400 and "not a built-in hub" in foreign.json()["message"]
    assert "GET /admin/linkedHubs/nope.example.com/events -> 404 404204" in server.log()


def test_monitor_events_prints_events_as_az_does(server: RunningServer) -> None:
    hub = builtin_hub(server)
    device = uid("mon")
    start = int(time.time() * 1000) - 1
    [first, second] = append_events(
        server,
        hub,
        [
            telemetry(
                device,
                b'{"temperature": 21.5}',
                properties={"level": "info"},
                system_properties={"message-id": "m1"},
            ),
            telemetry(device, b"plain text"),
        ],
    )
    result = CliRunner().invoke(
        cli,
        [
            "hub",
            "monitor-events",
            "--data-dir",
            str(server.data_dir),
            "-d",
            device,
            "--enqueued-time",
            str(start),
            "--timeout",
            "1",
            "--properties",
            "all",
            "--compact",
        ],
        env={"PROVISIOND_CONNECTION_STRING": None, "PROVISIOND_DATA_DIR": None},
    )
    assert result.exit_code == 0, (result.output, result.exception)
    printed = [json.loads(line)["event"] for line in result.stdout.splitlines()]
    assert [e["payload"] for e in printed] == [{"temperature": 21.5}, "plain text"]
    assert printed[0]["origin"] == device and printed[0]["module"] == ""
    assert printed[0]["properties"] == {"system": {"message-id": "m1"}, "application": {"level": "info"}}
    assert printed[0]["annotations"]["iothub-connection-device-id"] == device
    assert [e["annotations"]["x-opt-sequence-number"] for e in printed] == [first.seq, second.seq]
    assert "Starting event monitor" in result.stderr and "Stopped after 2 event(s)" in result.stderr

    resumed = CliRunner().invoke(
        cli,
        [
            "hub",
            "monitor-events",
            "--data-dir",
            str(server.data_dir),
            "-d",
            device,
            "--after",
            str(first.seq),
            "--timeout",
            "1",
            "--max-events",
            "1",
        ],
        env={"PROVISIOND_CONNECTION_STRING": None, "PROVISIOND_DATA_DIR": None},
    )
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout) == {"event": {"origin": device, "module": "", "payload": "plain text"}}


def test_every_server_trims_the_stream_to_its_retention(tmp_path: Any) -> None:
    server = start_server(tmp_path / "retention", "--hub-events-max-count", "3", "--hub-trim-interval", "0.2")
    try:
        hub = builtin_hub(server)
        stored = append_events(server, hub, [telemetry("counted", str(i).encode()) for i in range(10)])
        deadline = time.monotonic() + 30
        while len(kept := read_stream(server, Stream.HUB_EVENTS)) > 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [e.seq for e in kept] == [e.seq for e in stored[-3:]], "the newest three stay"
        assert "Retention: 7 telemetry events" in server.log()
    finally:
        server.stop()


async def test_the_trim_drops_events_by_age_and_by_count(store: Store) -> None:
    log = EventLog(store)
    entries = await store.append(Stream.HUB_EVENTS, [("hub/d", str(i).encode()) for i in range(5)])
    created = time.time()
    assert await log.trim(Retention(max_age=3600, max_count=10), now=created) == 0
    assert await log.trim(Retention(max_age=3600, max_count=2), now=created) == 3
    assert [e.seq for e in await store.read(Stream.HUB_EVENTS)] == [e.seq for e in entries[-2:]]
    # An hour and a bit later, by age: everything (created is the store's stamp, ~ now).
    assert await log.trim(Retention(max_age=3600, max_count=10), now=created + 3700) == 2
    assert await store.entry_count(Stream.HUB_EVENTS) == 0
    assert utc_iso(created).endswith("Z")


def test_event_log_start_is_the_end_of_the_stream(server: RunningServer) -> None:
    """``after`` omitted and no enqueuedTime: what was stored before is never sent."""
    hub = builtin_hub(server)
    device = uid("end")
    append_events(server, hub, [telemetry(device, b"old")])
    assert events_of(lines(server, hub, deviceId=device)) == []
