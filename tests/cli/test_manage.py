"""The management commands (enrollment, group, registration, hub, ca, policy, settings) against a
real ``provisiond serve`` (the session's shared server: every test uses its own ids)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from provisiond import pki
from provisiond.cli import cli, main
from provisiond.errors import (
    AuthenticationError,
    AuthorizationError,
    ConfigurationError,
    InvalidQueryError,
    NotFoundError,
    PreconditionFailedError,
    ProvisioningError,
)
from provisiond.protocol.sas import derive_device_key
from tests._hub_peer import HubPeer
from tests._server import RunningServer, free_port
from tests._tpm_keys import software_ek

_CLEAN_ENV: dict[str, str | None] = {"PROVISIOND_CONNECTION_STRING": None, "PROVISIOND_DATA_DIR": None}


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def invoke(*args: Any, env: dict[str, str | None] | None = None) -> Result:
    """Run ``provisiond ARGS`` in-process (no connection flag added)."""
    return CliRunner().invoke(cli, [str(a) for a in args], env={**_CLEAN_ENV, **(env or {})})


def run(server: RunningServer, *args: Any) -> Result:
    """Run ``provisiond ARGS --data-dir DIR`` and require success."""
    result = invoke(*args, "--data-dir", server.data_dir)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def run_json(server: RunningServer, *args: Any) -> Any:
    return json.loads(run(server, *args).stdout)


def fails(
    server: RunningServer | None, *args: Any, env: dict[str, str | None] | None = None
) -> ProvisioningError:
    """Run a command that the service (or the client) refuses; return the error it raised
    (``provisiond``'s ``main()`` prints its message and exits with its exit_code)."""
    extra = ["--data-dir", server.data_dir] if server else []
    result = invoke(*args, *extra, env=env)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, ProvisioningError), (result.output, result.exception)
    return result.exception


def usage_error(server: RunningServer, *args: Any) -> Result:
    result = invoke(*args, "--data-dir", server.data_dir)
    assert result.exit_code == 2, (result.output, result.exception)
    return result


# --- the command tree ------------------------------------------------------------------------------


_GROUPS = ["enrollment", "group", "registration", "hub", "ca", "policy", "settings"]


def _management_commands() -> list[list[str]]:
    """Every management group and its subcommands (other groups are someone else's)."""
    out = []
    with click.Context(cli) as ctx:
        for name in _GROUPS:
            group = cli.get_command(ctx, name)
            assert isinstance(group, click.Group)
            out.append([name])
            for sub in group.list_commands(ctx):
                command = group.get_command(ctx, sub)
                if isinstance(command, click.Group):  # hub device ..., hub policy ...
                    out += [[name, sub, leaf] for leaf in command.list_commands(ctx)]
                else:
                    out.append([name, sub])
    return out


def test_every_management_command_has_help() -> None:
    commands = _management_commands()
    assert len(commands) > 40
    for command in commands:
        result = invoke(*command, "--help")
        assert result.exit_code == 0, (command, result.output)
        assert "Usage:" in result.output
        # a description, not just the usage line and the options
        assert result.output.split("Options:")[0].count("\n") >= 3, command
        if len(command) > 1:
            assert "--data-dir" in result.output, command


@pytest.mark.parametrize("group", ["enrollment", "group"])
def test_update_help_does_not_claim_create_defaults(group: str) -> None:
    """update takes create's flags, but a flag it is not given keeps the stored value: its help
    says so and shows none of the defaults that only create applies."""
    with click.Context(cli) as ctx:
        command_group = cli.get_command(ctx, group)
        assert isinstance(command_group, click.Group)
        create, update = (command_group.get_command(ctx, name) for name in ("create", "update"))
    assert create is not None and update is not None
    assert [p.opts for p in update.params] == [p.opts for p in create.params], "the same flags"

    updated = " ".join(invoke(group, "update", "--help").output.split())  # unwrapped
    options = updated.split("Options:")[1].split("--json")[0]
    assert "default" not in options.lower(), options
    assert "A flag left out keeps the current value" in updated
    assert "--webhook-url without it gets 2019-03-31" in options  # what update does do
    created = " ".join(invoke(group, "create", "--help").output.split())
    for default in ("[default: generated]", "(the default)", "[default: migrate]", "[default: 2019-03-31]"):
        assert default in created, default


# --- connection errors ---------------------------------------------------------------------------


def test_no_connection_given_is_a_usage_error() -> None:
    result = invoke("enrollment", "list")
    assert result.exit_code == 2
    assert "--connection-string" in result.output and "--data-dir" in result.output


def test_bad_connection_string() -> None:
    error = fails(
        None, "enrollment", "list", "--connection-string", "HostName=localhost:1;SharedAccessKey=abc"
    )
    assert isinstance(error, ConfigurationError)
    assert "sharedaccesskeyname" in error.message.lower()
    assert error.exit_code == 2


def test_data_dir_without_connection_json(tmp_path: Path) -> None:
    error = fails(None, "enrollment", "list", "--data-dir", tmp_path)
    assert isinstance(error, ConfigurationError) and "connection.json" in error.message


def test_unreachable_server(server: RunningServer) -> None:
    cs = (
        f"HostName=127.0.0.1:{free_port()};SharedAccessKeyName=owner;SharedAccessKey=YWJjZGVmZ2hpamtsbW5vcA=="
    )
    error = fails(None, "settings", "show", "--connection-string", cs, "--ca-file", server.ca_file)
    assert isinstance(error, ConfigurationError)
    assert "Cannot reach" in error.message


def test_connection_from_environment(server: RunningServer) -> None:
    result = invoke(
        "settings",
        "show",
        env={"PROVISIOND_CONNECTION_STRING": server.connection_string},
    )
    # no --ca-file and no data dir: the development CA is not trusted
    assert result.exit_code != 0
    result = invoke(
        "settings",
        "show",
        "--ca-file",
        server.ca_file,
        env={"PROVISIOND_CONNECTION_STRING": server.connection_string},
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["idScope"] == server.id_scope
    result = invoke("settings", "show", env={"PROVISIOND_DATA_DIR": str(server.data_dir)})
    assert result.exit_code == 0, result.output


def test_main_prints_the_service_error_and_exits_non_zero(server: RunningServer) -> None:
    """The real entry point: `Error: <message>` on stderr, the error's exit code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "provisiond",
            "registration",
            "show",
            uid("missing"),
            "--data-dir",
            str(server.data_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("Error: No device registration is named"), proc.stderr
    assert "Traceback" not in proc.stderr


def _main(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, list[str]]:
    """Run ``provisiond ARGS`` through the real entry point; its exit code and stderr lines."""
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    code = exited.value.code
    return code if isinstance(code, int) else 1, capsys.readouterr().err.splitlines()


_TRACKING = re.compile(r"^  \(errorCode (\d{6}), trackingId ([0-9a-f-]{36})\)$")


def _service_error(server: RunningServer, lines: list[str], error_code: int) -> None:
    """The last line names the errorCode and a trackingId that the service logged."""
    found = _TRACKING.match(lines[-1])
    assert found, lines
    assert int(found.group(1)) == error_code
    assert f"trackingId={found.group(2)}" in server.log()
    assert not any("If-Match" in line or "send its etag" in line for line in lines), lines


def test_service_errors_print_cli_advice_error_code_and_tracking_id(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in _CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    rid = uid("cli-advice")
    data = ["--data-dir", server.data_dir]
    main(["enrollment", "create", rid, *map(str, data)])
    capsys.readouterr()

    # 409: the service says "send its etag in If-Match"; the CLI names the command to use
    code, lines = _main(capsys, "enrollment", "create", rid, *data)
    assert code == 1
    assert lines[0] == f"Error: The individual enrollment {rid!r} already exists."
    assert lines[1] == f"  Use `provisiond enrollment update {rid}` to change it, or delete it first."
    _service_error(server, lines, 409201)

    # 412: a stale --etag (the service speaks of If-Match, a header the user never sent)
    code, lines = _main(capsys, "enrollment", "delete", rid, "--etag", '"stale"', *data)
    assert code == 1 and len(lines) == 3
    assert lines[0] == (
        f'Error: The individual enrollment {rid!r} no longer has the etag "stale": '
        "it changed since that etag was read."
    )
    assert lines[1] == f"  `provisiond enrollment show {rid}` prints its current etag (or leave out --etag)."
    _service_error(server, lines, 412001)

    # 412: nothing to replace
    root = pki.make_root_ca("CLI advice CA")
    pki.write_issued(root, tmp_path / "root")
    name = uid("cli-advice-ca")
    code, lines = _main(capsys, "ca", "upload", name, tmp_path / "root.pem", "--replace", *data)
    assert code == 1
    assert lines[:2] == [
        f"Error: There is no CA certificate {name!r} to replace.",
        "  Leave out --replace to upload it.",
    ]
    _service_error(server, lines, 412000)

    # 404: where to look
    code, lines = _main(capsys, "group", "show", uid("cli-nogroup"), *data)
    assert code == 1 and lines[1] == "  `provisiond group list` shows the enrollment groups there are."
    _service_error(server, lines, 404203)

    # 403 and 401: which credential to use
    policy = uid("cli-advice-pol")
    main(["policy", "create", policy, "--rights", "EnrollmentRead", *map(str, data)])
    capsys.readouterr()
    main(["policy", "connection-string", policy, *map(str, data)])
    limited = ["--connection-string", capsys.readouterr().out.strip(), "--ca-file", server.ca_file]
    code, lines = _main(capsys, "enrollment", "delete", rid, *limited)
    assert (
        code == 1
        and lines[0] == f"Error: Policy {policy!r} lacks the EnrollmentWrite right this operation needs."
    )
    assert "`provisiond policy update NAME --rights ...`" in lines[1]
    _service_error(server, lines, 403001)
    forged = (
        limited[1].split(";SharedAccessKey=")[0] + ";SharedAccessKey=" + base64.b64encode(b"x" * 32).decode()
    )
    code, lines = _main(
        capsys, "enrollment", "list", "--connection-string", forged, "--ca-file", server.ca_file
    )
    assert code == 1 and "--connection-string" in lines[1]
    _service_error(server, lines, 401002)

    # an error without advice still names its errorCode and trackingId
    code, lines = _main(capsys, "enrollment", "create", "bad id!", *data)
    assert code == 1 and len(lines) == 2 and lines[0].startswith("Error: Invalid registrationId")
    _service_error(server, lines, 400005)


# --- enrollments ---------------------------------------------------------------------------------


def test_enrollment_lifecycle(server: RunningServer) -> None:
    rid = uid("cli-enr")
    created = run(server, "enrollment", "create", rid)
    assert f"Created individual enrollment {rid!r}" in created.stdout
    assert f"ID scope {server.id_scope} at https://localhost:{server.port}" in created.stdout
    keys = run_json(server, "enrollment", "keys", rid, "--json")
    assert keys["type"] == "symmetricKey"
    assert keys["symmetricKey"]["primaryKey"] in created.stdout
    assert keys["symmetricKey"]["secondaryKey"] in created.stdout

    shown = run_json(server, "enrollment", "show", rid)
    assert shown["registrationId"] == rid and shown["provisioningStatus"] == "enabled"
    assert shown["attestation"] == {"type": "symmetricKey"}  # secrets stripped
    with_keys = run_json(server, "enrollment", "show", rid, "--keys")
    assert with_keys["attestation"] == keys

    listed = run_json(server, "enrollment", "list", "--where", f"registrationId = '{rid}'", "--json")
    assert [e["registrationId"] for e in listed] == [rid]
    table = run(server, "enrollment", "list", "--where", f"registrationId = '{rid}'").stdout
    assert rid in table and "1 individual enrollment." in table

    updated = run_json(
        server,
        "enrollment",
        "update",
        rid,
        "--device-id",
        f"{rid}-dev",
        "--edge",
        "--hub",
        server.info["builtinHub"],
        "--allocation-policy",
        "static",
        "--initial-twin",
        '{"tags": {"site": "lab"}, "properties": {"desired": {"interval": 5}}}',
        "--reprovision",
        "reset",
        "--json",
    )
    assert updated["deviceId"] == f"{rid}-dev"
    assert updated["capabilities"] == {"iotEdge": True}
    assert updated["iotHubs"] == [server.info["builtinHub"]]
    assert updated["allocationPolicy"] == "static"
    assert updated["initialTwin"]["tags"] == {"site": "lab"}
    assert updated["reprovisionPolicy"] == {"updateHubAssignment": True, "migrateDeviceData": False}
    assert run_json(server, "enrollment", "keys", rid, "--json") == keys  # kept through the update

    assert "is disabled" in run(server, "enrollment", "disable", rid).stdout
    disabled = run_json(
        server,
        "enrollment",
        "list",
        "--where",
        f"provisioningStatus = 'disabled' AND registrationId = '{rid}'",
        "--json",
    )
    assert [e["registrationId"] for e in disabled] == [rid]
    assert (
        run_json(
            server,
            "enrollment",
            "list",
            "--where",
            f"provisioningStatus = 'enabled' AND registrationId = '{rid}'",
            "--json",
        )
        == []
    )
    run(server, "enrollment", "enable", rid)
    assert run_json(server, "enrollment", "show", rid)["provisioningStatus"] == "enabled"

    error = fails(server, "enrollment", "delete", rid, "--etag", '"stale"')
    assert isinstance(error, PreconditionFailedError)
    etag = run_json(server, "enrollment", "show", rid)["etag"]
    assert (
        f"Deleted individual enrollment {rid!r}"
        in run(server, "enrollment", "delete", rid, "--etag", etag).stdout
    )
    error = fails(server, "enrollment", "show", rid)
    assert isinstance(error, NotFoundError) and rid in error.message


def test_enrollment_with_given_keys_and_twin_file(server: RunningServer, tmp_path: Path) -> None:
    rid = uid("cli-keys")
    primary = base64.b64encode(b"p" * 32).decode()
    secondary = base64.b64encode(b"s" * 32).decode()
    twin = tmp_path / "twin.json"
    twin.write_text('{"tags": {"from": "file"}}')
    created = run_json(
        server,
        "enrollment",
        "create",
        rid,
        "--primary-key",
        primary,
        "--secondary-key",
        secondary,
        "--initial-twin",
        f"@{twin}",
        "--disabled",
        "--json",
    )
    assert created["attestation"]["symmetricKey"] == {"primaryKey": primary, "secondaryKey": secondary}
    assert created["initialTwin"] == {"tags": {"from": "file"}}
    assert created["provisioningStatus"] == "disabled"
    # a new primary key only: the secondary stays
    new_primary = base64.b64encode(b"n" * 32).decode()
    run(server, "enrollment", "update", rid, "--primary-key", new_primary)
    assert run_json(server, "enrollment", "keys", rid, "--json")["symmetricKey"] == {
        "primaryKey": new_primary,
        "secondaryKey": secondary,
    }
    # create twice: the service's 409
    error = fails(server, "enrollment", "create", rid)
    assert error.http_status == 409 and "already exists" in error.message


def test_enrollment_webhook_and_reprovision(server: RunningServer) -> None:
    rid = uid("cli-hook")
    created = run_json(
        server,
        "enrollment",
        "create",
        rid,
        "--webhook-url",
        "https://alloc.example.net/api",
        "--reprovision",
        "never",
        "--json",
    )
    assert created["allocationPolicy"] == "custom"
    assert created["customAllocationDefinition"] == {
        "webhookUrl": "https://alloc.example.net/api",
        "apiVersion": "2019-03-31",
    }
    assert created["reprovisionPolicy"] == {"updateHubAssignment": False, "migrateDeviceData": False}
    updated = run_json(server, "enrollment", "update", rid, "--webhook-api-version", "2021-10-01", "--json")
    assert updated["customAllocationDefinition"]["apiVersion"] == "2021-10-01"
    updated = run_json(server, "enrollment", "update", rid, "--allocation-policy", "hashed", "--json")
    assert updated["allocationPolicy"] == "hashed"


def test_enrollment_x509_and_tpm(server: RunningServer, tmp_path: Path) -> None:
    rid = uid("cli-x509")
    device = pki.make_device_cert(rid)
    pki.write_issued(device, tmp_path / "device")
    second = pki.make_device_cert(rid)
    pki.write_issued(second, tmp_path / "second")
    created = run_json(server, "enrollment", "create", rid, "--x509-cert", tmp_path / "device.pem", "--json")
    info = created["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
    assert info["subjectName"] == f"CN={rid}"
    # add a secondary: the stored primary is kept
    run(server, "enrollment", "update", rid, "--x509-secondary", tmp_path / "second.pem")
    certs = run_json(server, "enrollment", "show", rid)["attestation"]["x509"]["clientCertificates"]
    assert certs["primary"]["info"]["sha1Thumbprint"] == info["sha1Thumbprint"]
    assert certs["secondary"]["info"]["sha1Thumbprint"] == pki.certificate_info(second.cert)["sha1Thumbprint"]
    assert "Primary certificate" in run(server, "enrollment", "keys", rid).stdout

    tpm_id = uid("cli-tpm")
    ek = software_ek()
    created = run_json(server, "enrollment", "create", tpm_id, "--tpm-ek", ek, "--json")
    assert created["attestation"] == {"type": "tpm", "tpm": {"endorsementKey": ek}}


def test_enrollment_flag_errors(server: RunningServer, tmp_path: Path) -> None:
    rid = uid("cli-flags")
    assert (
        "Choose one attestation"
        in usage_error(server, "enrollment", "create", rid, "--symmetric-key", "--tpm-ek", "AAAA").output
    )
    assert (
        "not valid JSON" in usage_error(server, "enrollment", "create", rid, "--initial-twin", "{nope").output
    )
    assert (
        "--initial-twin"
        in usage_error(server, "enrollment", "create", rid, "--initial-twin", '{"tags": 3}').output
    )
    not_pem = tmp_path / "x.pem"
    not_pem.write_text("hello")
    assert (
        "no PEM certificate"
        in usage_error(server, "enrollment", "create", rid, "--x509-cert", not_pem).output
    )
    assert "Nothing to change" in usage_error(server, "enrollment", "update", rid).output
    # the service's own validation comes back with its message
    error = fails(server, "enrollment", "create", rid, "--hub", "not-linked.example.net")
    assert "not linked" in error.message
    error = fails(server, "enrollment", "create", "bad id!")
    assert error.error_code == 400005
    error = fails(server, "enrollment", "list", "--where", "color = 'red'")
    assert error.error_code == InvalidQueryError.error_code and "Cannot filter on 'color'" in error.message


def test_enrollment_list_limit(server: RunningServer) -> None:
    prefix = uid("cli-lim")
    for i in range(3):
        run(server, "enrollment", "create", f"{prefix}-{i}", "--device-id", prefix)
    where = f"deviceId = '{prefix}'"
    assert len(run_json(server, "enrollment", "list", "--where", where, "--json")) == 3
    assert len(run_json(server, "enrollment", "list", "--where", where, "--limit", "2", "--json")) == 2
    # a whole SELECT is passed through
    full = run_json(
        server, "enrollment", "list", "--where", f"SELECT * FROM enrollments WHERE {where}", "--json"
    )
    assert len(full) == 3


# --- groups --------------------------------------------------------------------------------------


def test_group_lifecycle_and_device_key(server: RunningServer) -> None:
    gid = uid("cli-grp")
    created = run(server, "group", "create", gid)
    assert f"Created enrollment group {gid!r}" in created.stdout
    keys = run_json(server, "group", "keys", gid, "--json")["symmetricKey"]
    assert keys["primaryKey"] in created.stdout

    device_key = run(server, "group", "device-key", gid, "dev-001").stdout.strip()
    assert device_key == derive_device_key(keys["primaryKey"], "dev-001")
    secondary = run(server, "group", "device-key", gid, "dev-001", "--secondary").stdout.strip()
    assert secondary == derive_device_key(keys["secondaryKey"], "dev-001")

    shown = run_json(server, "group", "show", gid)
    assert shown["enrollmentGroupId"] == gid and shown["attestation"] == {"type": "symmetricKey"}
    assert run_json(server, "group", "show", gid, "--keys")["attestation"]["symmetricKey"] == keys

    run(
        server,
        "group",
        "update",
        gid,
        "--allocation-policy",
        "hashed",
        "--hub",
        server.info["builtinHub"],
        "--edge",
    )
    shown = run_json(server, "group", "show", gid)
    assert shown["allocationPolicy"] == "hashed" and shown["capabilities"] == {"iotEdge": True}
    assert run_json(server, "group", "keys", gid, "--json")["symmetricKey"] == keys

    run(server, "group", "disable", gid)
    listed = run_json(
        server,
        "group",
        "list",
        "--where",
        f"enrollmentGroupId = '{gid}' AND provisioningStatus = 'disabled'",
        "--json",
    )
    assert [g["enrollmentGroupId"] for g in listed] == [gid]
    run(server, "group", "enable", gid)
    table = run(server, "group", "list", "--where", f"enrollmentGroupId = '{gid}'").stdout
    assert gid in table and "enabled" in table

    # no registrations yet
    assert run_json(server, "registration", "list", gid, "--json") == []
    assert "0 registrations." in run(server, "registration", "list", gid).stdout

    run(server, "group", "delete", gid)
    assert isinstance(fails(server, "group", "show", gid), NotFoundError)
    assert isinstance(fails(server, "registration", "list", gid), NotFoundError)


def test_group_x509(server: RunningServer, tmp_path: Path) -> None:
    root = pki.make_root_ca("CLI group CA")
    pki.write_issued(root, tmp_path / "root")
    gid = uid("cli-grp-x509")
    created = run_json(server, "group", "create", gid, "--ca-cert", tmp_path / "root.pem", "--json")
    signing = created["attestation"]["x509"]["signingCertificates"]["primary"]
    assert signing["info"]["subjectName"] == "CN=CLI group CA"
    result = invoke("group", "device-key", gid, "dev-1", "--data-dir", server.data_dir)
    assert result.exit_code == 1 and "not a symmetric key" in result.output

    ref_id = uid("cli-grp-ref")
    created = run_json(server, "group", "create", ref_id, "--ca-ref", "some-ca", "--json")
    assert created["attestation"]["x509"] == {"caReferences": {"primary": "some-ca"}}


# --- registrations -------------------------------------------------------------------------------


def test_registration_show_and_delete_of_a_missing_id(server: RunningServer) -> None:
    rid = uid("cli-noreg")
    error = fails(server, "registration", "show", rid)
    assert isinstance(error, NotFoundError)
    assert error.message == f"No device registration is named {rid!r}."
    assert error.error_code == 404202 and error.exit_code == 1
    assert isinstance(fails(server, "registration", "delete", rid), NotFoundError)


# --- hubs ----------------------------------------------------------------------------------------


def test_hub_add_list_update_remove(server: RunningServer, hub_peer: HubPeer, tmp_path: Path) -> None:
    host = hub_peer.linked_hub().host_name
    hub_cs = hub_peer.connection_string()
    ca_file = tmp_path / "hub-ca.pem"
    ca_file.write_text(hub_peer.ca_pem)
    # --no-allocation: other tests' devices on the shared server are never sent to this hub
    added = run_json(
        server,
        "hub",
        "add",
        host,
        "--connection-string",
        hub_cs,
        "--ca-certificate",
        ca_file,
        "--weight",
        "3",
        "--no-allocation",
        "--tier",
        "S1",
        "--units",
        "2",
        "--json",
    )
    assert added["hostName"] == host and added["allocationWeight"] == 3
    assert added["applyAllocationPolicy"] is False and "connectionString" not in added
    assert added["tier"] == "S1" and added["units"] == 2 and added["caCertificate"] == hub_peer.ca_pem
    assert hub_peer.key not in run(server, "hub", "show", host).stdout
    hubs = {h["hostName"]: h for h in run_json(server, "hub", "list", "--json")}
    assert host in hubs and hubs[server.info["builtinHub"]]["builtin"] is True
    assert host in run(server, "hub", "list").stdout

    updated = run_json(server, "hub", "update", host, "--weight", "9", "--location", "westeurope", "--json")
    assert updated["allocationWeight"] == 9 and updated["location"] == "westeurope"
    assert updated["applyAllocationPolicy"] is False
    # show, as `az iot dps linked-hub show` (the connection string stays secret)
    assert run_json(server, "hub", "show", host) == updated
    assert isinstance(fails(server, "hub", "show", f"x{host}"), NotFoundError)
    assert "x509GroupAuthentication" not in updated  # selfSigned, as DPS, unless asked
    shown = run(server, "hub", "update", host, "--weight", "8").stdout
    assert "X.509 group devices  selfSigned" in shown
    assert "3.33333 registry operations/s (tier S1)" in shown and "caCertificate" in shown
    ca = run_json(
        server, "hub", "update", host, "--x509-group-authentication", "certificateAuthority", "--json"
    )
    assert ca["x509GroupAuthentication"] == "certificateAuthority" and ca["allocationWeight"] == 8
    result = invoke("hub", "update", host, "--x509-group-authentication", "ca", "--data-dir", server.data_dir)
    assert result.exit_code == 2 and "'ca' is not one of" in result.output

    # an enrollment may name the linked hub
    rid = uid("cli-hub-enr")
    run(server, "enrollment", "create", rid, "--hub", host)
    run(server, "enrollment", "delete", rid)

    assert "Unlinked" in run(server, "hub", "remove", host).stdout
    assert host not in {h["hostName"] for h in run_json(server, "hub", "list", "--json")}
    assert isinstance(fails(server, "hub", "remove", host), NotFoundError)
    error = fails(server, "hub", "remove", server.info["builtinHub"])
    assert "built-in" in error.message
    result = invoke("hub", "add", "x.example.net", "--data-dir", server.data_dir)
    assert result.exit_code == 2 and "--connection-string" in result.output


# --- CA certificates -----------------------------------------------------------------------------


def test_ca_upload_and_prove(server: RunningServer, tmp_path: Path) -> None:
    root = pki.make_root_ca("CLI proof CA")
    pki.write_issued(root, tmp_path / "root")
    name = uid("cli-ca")
    uploaded = run_json(server, "ca", "upload", name, tmp_path / "root.pem", "--json")
    assert uploaded["isVerified"] is False and uploaded["subject"] == "CN=CLI proof CA"

    proved = run_json(server, "ca", "prove", name, "--ca-key-prefix", tmp_path / "root", "--json")
    assert proved["isVerified"] is True
    assert run_json(server, "ca", "show", name)["isVerified"] is True
    assert name in {c["name"] for c in run_json(server, "ca", "list", "--json")}
    assert name in run(server, "ca", "list").stdout

    # a group referencing the verified CA
    gid = uid("cli-ca-grp")
    assert (
        run_json(server, "group", "create", gid, "--ca-ref", name, "--json")["attestation"]["type"] == "x509"
    )

    # the key of another CA is refused before anything is sent
    other = pki.make_root_ca("Someone else")
    pki.write_issued(other, tmp_path / "other")
    result = invoke("ca", "prove", name, "--ca-key-prefix", tmp_path / "other", "--data-dir", server.data_dir)
    assert result.exit_code == 1 and "is not the CA certificate uploaded" in result.output

    run(server, "ca", "delete", name)
    assert isinstance(fails(server, "ca", "show", name), NotFoundError)


def test_ca_verification_code_and_verify_by_hand(server: RunningServer, tmp_path: Path) -> None:
    root = pki.make_root_ca("CLI manual CA")
    pki.write_issued(root, tmp_path / "root")
    name = uid("cli-ca-man")
    run(server, "ca", "upload", name, tmp_path / "root.pem")
    code = run(server, "ca", "verification-code", name).stdout.strip()
    assert run_json(server, "ca", "show", name)["verificationCode"] == code

    wrong = pki.make_verification_cert("not-the-code", root)
    pki.write_issued(wrong, tmp_path / "wrong")
    error = fails(server, "ca", "verify", name, tmp_path / "wrong.pem")
    assert error.error_code == 400011

    proof = pki.make_verification_cert(code, root)
    pki.write_issued(proof, tmp_path / "proof")
    assert "Verified" in run(server, "ca", "verify", name, tmp_path / "proof.pem").stdout
    assert run_json(server, "ca", "show", name)["isVerified"] is True
    error = fails(server, "ca", "upload", name, tmp_path / "root.pem")
    assert error.http_status == 409
    assert (
        run_json(server, "ca", "upload", name, tmp_path / "root.pem", "--replace", "--json")["isVerified"]
        is False
    )
    run(server, "ca", "delete", name)


# --- policies ------------------------------------------------------------------------------------


def test_policy_with_a_limited_right(server: RunningServer) -> None:
    name = uid("cli-pol")
    created = run_json(
        server, "policy", "create", name, "--rights", "enrollmentread, RegistrationStatusRead", "--json"
    )
    assert created["rights"] == ["EnrollmentRead", "RegistrationStatusRead"]
    assert "primaryKey" not in created
    with_keys = run_json(server, "policy", "show", name, "--keys")
    cs = run(server, "policy", "connection-string", name).stdout.strip()
    assert cs.endswith(f";SharedAccessKeyName={name};SharedAccessKey={with_keys['primaryKey']}")
    assert cs.startswith(f"HostName=localhost:{server.port};")

    limited = ["--connection-string", cs, "--ca-file", server.ca_file]
    result = invoke("enrollment", "list", "--limit", "1", *limited)
    assert result.exit_code == 0, result.output
    result = invoke("enrollment", "create", uid("cli-pol-enr"), *limited)
    assert result.exit_code != 0
    assert isinstance(result.exception, AuthorizationError)
    assert "EnrollmentWrite" in result.exception.message and name in result.exception.message
    result = invoke("settings", "show", *limited)
    assert isinstance(result.exception, AuthorizationError) and "ServiceConfig" in result.exception.message

    run(server, "policy", "update", name, "--rights", "EnrollmentRead,EnrollmentWrite")
    result = invoke("enrollment", "create", uid("cli-pol-enr"), *limited)
    assert result.exit_code == 0, result.output
    # --rights repeated: every one counts, not only the last
    updated = run_json(
        server,
        "policy",
        "update",
        name,
        "--rights",
        "EnrollmentRead",
        "--rights",
        "RegistrationStatusRead,EnrollmentWrite",
        "--json",
    )
    assert updated["rights"] == ["EnrollmentRead", "EnrollmentWrite", "RegistrationStatusRead"]
    assert run_json(server, "policy", "show", name)["rights"] == updated["rights"]

    run(server, "policy", "update", name, "--regenerate-primary")
    result = invoke("enrollment", "list", "--limit", "1", *limited)
    assert isinstance(result.exception, AuthenticationError)
    secondary_cs = run(server, "policy", "connection-string", name, "--secondary").stdout.strip()
    assert secondary_cs.endswith(with_keys["secondaryKey"])  # the secondary key was kept

    assert name in {p["keyName"] for p in run_json(server, "policy", "list", "--json")}
    assert (
        "unknown right(s) Everything"
        in usage_error(server, "policy", "create", uid("cli-pol2"), "--rights", "Everything").output
    )
    run(server, "policy", "delete", name)
    assert isinstance(fails(server, "policy", "show", name), NotFoundError)


def test_policy_sas_token_authorizes_the_rest_api(server: RunningServer) -> None:
    """`policy sas-token` prints a token for an Authorization header: it authorizes what its
    policy may do, expires after --ttl, and --secondary signs with the other key."""
    name = uid("cli-tok")
    run(server, "policy", "create", name, "--rights", "EnrollmentRead")
    started = int(time.time())
    token = run(server, "policy", "sas-token", name, "--ttl", "120").stdout.strip()
    fields = dict(part.split("=", 1) for part in token.removeprefix("SharedAccessSignature ").split("&"))
    assert fields["skn"] == name and started + 120 <= int(fields["se"]) <= int(time.time()) + 120
    secondary = run(server, "policy", "sas-token", name, "--secondary").stdout.strip()
    with server.http() as http:
        for each in (token, secondary):
            r = http.get(
                f"/enrollments/{uid('none')}",
                params={"api-version": "2021-10-01"},
                headers={"Authorization": each},
            )
            assert r.status_code == 404, r.text  # authenticated; no such enrollment
        r = http.put(
            f"/enrollments/{uid('nope')}",
            params={"api-version": "2021-10-01"},
            json={"attestation": {"type": "symmetricKey"}},
            headers={"Authorization": token},
        )
        assert r.status_code == 403 and r.json()["errorCode"] == 403001, r.text  # no EnrollmentWrite
    run(server, "policy", "delete", name)


# --- settings ------------------------------------------------------------------------------------


def test_settings_show_and_set(server: RunningServer) -> None:
    shown = run_json(server, "settings", "show")
    assert shown["idScope"] == server.id_scope
    # set what is already there (the session's server is shared)
    updated = run_json(
        server,
        "settings",
        "set",
        "--allocation-policy",
        shown["allocationPolicy"],
        "--id-scope",
        shown["idScope"],
    )
    assert updated["idScope"] == server.id_scope
    assert "Nothing to change" in usage_error(server, "settings", "set").output
    error = fails(server, "settings", "set", "--id-scope", "nope")
    assert "ID scope" in error.message


@pytest.mark.parametrize("command", [["enrollment", "list", "--json"], ["hub", "list", "--json"]])
def test_json_output_is_a_list(server: RunningServer, command: list[str]) -> None:
    assert isinstance(run_json(server, *command), list)
