"""``provisiond hub device ...`` and ``provisiond hub policy ...`` against a running server: the
identities and policies they make are the ones the hub's service REST API serves."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from provisiond.errors import NotFoundError
from tests._hub_service import HubService, iothub_error
from tests._server import RunningServer, start_server
from tests.cli.test_manage import _main, _service_error, fails, invoke, run, run_json


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_hub_devices_and_policies(server: RunningServer) -> None:
    device_id = uid("cli-dev")
    created = run_json(server, "hub", "device", "create", device_id, "--json")
    assert created["deviceId"] == device_id and created["authentication"]["type"] == "sas"
    key = created["authentication"]["symmetricKey"]["primaryKey"]
    text = run(server, "hub", "device", "create", uid("cli-dev")).stdout
    assert f"HostName=localhost:{server.port};DeviceId=" in text  # the device's connection string

    thumb = "AB" * 20
    x509 = run_json(
        server, "hub", "device", "create", uid("cli-x509"), "--x509-thumbprint", thumb, "--disabled", "--json"
    )
    assert (
        x509["authentication"]["x509Thumbprint"]["primaryThumbprint"] == thumb
        and x509["status"] == "disabled"
    )
    assert (
        invoke(
            "hub",
            "device",
            "create",
            "x",
            "--x509-thumbprint",
            thumb,
            "--primary-key",
            key,
            "--data-dir",
            server.data_dir,
        ).exit_code
        == 2
    )

    listed = {d["deviceId"]: d for d in run_json(server, "hub", "device", "list", "--json")}
    assert device_id in listed and key not in str(listed[device_id])  # keys left out
    assert device_id in run(server, "hub", "device", "list").stdout
    assert run_json(server, "hub", "device", "show", device_id)["deviceId"] == device_id

    # the iothubowner connection string the CLI prints opens the hub's REST API
    owner = run(server, "hub", "policy", "connection-string").stdout.strip()
    assert owner == server.info["hubConnectionString"]
    hub = HubService(owner, ca_file=server.ca_file, port=server.port)
    try:
        assert (
            hub.request("GET", f"/devices/{device_id}").json()["authentication"]["symmetricKey"]["primaryKey"]
            == key
        )

        names = {p["keyName"] for p in run_json(server, "hub", "policy", "list", "--json")}
        assert {"iothubowner", "service", "device", "registryRead", "registryReadWrite"} <= names
        assert "primaryKey" not in run_json(server, "hub", "policy", "show", "service")
        assert run_json(server, "hub", "policy", "show", "service", "--keys")["primaryKey"]

        name = uid("reader")
        made = run_json(server, "hub", "policy", "create", name, "--rights", "RegistryRead", "--json")
        assert made["rights"] == ["RegistryRead"] and "primaryKey" not in made
        reader = HubService(
            run(server, "hub", "policy", "connection-string", name).stdout.strip(),
            ca_file=server.ca_file,
            port=server.port,
        )
        try:
            assert reader.request("GET", f"/devices/{device_id}").status_code == 200
            assert (
                iothub_error(reader.request("DELETE", f"/devices/{device_id}", headers={"If-Match": "*"}))[0]
                == 401
            )
            run(server, "hub", "policy", "delete", name)
            assert iothub_error(reader.request("GET", f"/devices/{device_id}"))[0] == 401
        finally:
            reader.close()
        assert (
            invoke(
                "hub", "policy", "create", "x", "--rights", "Everything", "--data-dir", server.data_dir
            ).exit_code
            == 2
        )

        assert "Deleted" in run(server, "hub", "device", "delete", device_id).stdout
        assert iothub_error(hub.request("GET", f"/devices/{device_id}")) == (404, "DeviceNotFound")
        assert isinstance(fails(server, "hub", "device", "show", device_id), NotFoundError)
        assert isinstance(fails(server, "hub", "device", "list", "--hub", "nowhere.example"), NotFoundError)
    finally:
        hub.close()


def test_hub_errors_advise_the_command_that_finds_the_record(
    server: RunningServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device the hub lacks is worded one way by every command and points at `hub device list`
    (not at `hub list`, which is for a hub the service lacks); a device that is not connected is
    404103 and points at --connect-timeout; `hub device` and `hub policy` are not the top-level
    `device` and `policy` groups."""
    for name in ("PROVISIOND_CONNECTION_STRING", "PROVISIOND_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    data = ["--data-dir", server.data_dir]
    device_id, ghost = uid("cli-offline"), uid("cli-ghost")
    run(server, "hub", "device", "create", device_id)  # an identity, not connected

    code, lines = _main(capsys, "hub", "invoke-method", device_id, "--mn", "reboot", *data)
    assert code == 1 and lines[:2] == [
        f"Error: Cannot invoke method 'reboot' on device {device_id!r}: it is not connected.",
        "  Give --connect-timeout SECONDS to wait for the device to connect and subscribe to methods.",
    ], lines
    _service_error(server, lines, 404103)

    missing = [
        ("hub", "invoke-method", ghost, "--mn", "reboot"),
        ("hub", "send-c2d", ghost, "--data", "hi"),
        ("hub", "device", "show", ghost),
        ("hub", "device", "delete", ghost),
    ]
    for args in missing:
        code, lines = _main(capsys, *args, *data)
        assert code == 1 and lines[:2] == [
            f"Error: Device {ghost!r} does not exist in IoT hub 'localhost'.",
            "  `provisiond hub device list` lists the hub's device identities.",
        ], (args, lines)
        _service_error(server, lines, 404001)

    code, lines = _main(capsys, "hub", "send-c2d", ghost, "--hub", "nowhere.example", *data)
    assert code == 1 and lines[1] == "  `provisiond hub list` shows the linked IoT hubs there are.", lines
    _service_error(server, lines, 404204)

    # hub policy and hub device commands advise hub policy and hub device commands
    _, lines = _main(capsys, "hub", "policy", "show", uid("nopol"), "--hub", "localhost", *data)
    assert lines[1] == "  `provisiond hub policy list --hub localhost` shows the hub policies there are.", (
        lines
    )
    _, lines = _main(capsys, "hub", "device", "create", device_id, *data)
    assert lines[:2] == [
        f"Error: Device {device_id!r} already exists in IoT hub 'localhost'.",
        f"  `provisiond hub device show {device_id}` prints it; delete it first.",
    ], lines
    _, lines = _main(capsys, "hub", "device", "delete", device_id, "--etag", '"stale"', *data)
    assert (
        lines[1]
        == f"  `provisiond hub device show {device_id}` prints its current etag (or leave out --etag)."
    )


def test_commands_without_hub_use_the_first_built_in_hub(tmp_path: Path) -> None:
    """With a second built-in hub whose name sorts first, the commands that take --hub still
    default to the first one, the hub connection.json names."""
    running = start_server(tmp_path / "data")
    try:
        first = running.info["builtinHub"]
        with running.client() as admin:
            admin.put("/admin/linkedHubs/a-second.local", {"hostName": "a-second.local", "builtin": True})
            assert [hub.host_name for hub in admin.hubs.list()][0] == first
        device_id = uid("first")
        run(running, "hub", "device", "create", device_id)
        assert device_id in {d["deviceId"] for d in run_json(running, "hub", "device", "list", "--json")}
        assert device_id not in run(running, "hub", "device", "list", "--hub", "a-second.local").stdout
        assert run(running, "hub", "policy", "connection-string").stdout.startswith(f"HostName={first}")
    finally:
        running.stop()
