"""``provisiond enrollment import`` against a real server: bulk loading, per-row reports, re-runs,
request sizing."""

from __future__ import annotations

import base64
import csv
import json
import uuid
from pathlib import Path
from typing import Any, cast

import msgspec
from click.testing import CliRunner, Result

from provisiond import pki
from provisiond.cli import cli
from provisiond.cli.enroll_import import MAX_REQUEST_BYTES, make_batches, read_rows, run_import
from provisiond.errors import DpsCode, RequestError
from provisiond.models import (
    BulkEnrollmentOperation,
    BulkEnrollmentOperationResult,
    BulkOperationMode,
    IndividualEnrollment,
)
from provisiond.service_client import ServiceClient
from tests._server import RunningServer
from tests._tpm_keys import software_ek

_CLEAN_ENV: dict[str, str | None] = {"PROVISIOND_CONNECTION_STRING": None, "PROVISIOND_DATA_DIR": None}
_HEADER = ["registrationId", "deviceId", "attestationType", "provisioningStatus", "iotHubs", "initialTwin"]


def invoke(server: RunningServer, *args: Any) -> Result:
    return CliRunner().invoke(cli, [*map(str, args), "--data-dir", str(server.data_dir)], env=_CLEAN_ENV)


def import_json(server: RunningServer, path: Path, *args: Any, exit_code: int = 0) -> dict[str, Any]:
    result = invoke(server, "enrollment", "import", path, "--json", *args)
    assert result.exit_code == exit_code, (result.output, result.exception)
    outcome: dict[str, Any] = json.loads(result.stdout)
    return outcome


def enrollments(server: RunningServer, where: str) -> list[dict[str, Any]]:
    result = invoke(server, "enrollment", "list", "--where", where, "--json")
    assert result.exit_code == 0, result.output
    items: list[dict[str, Any]] = json.loads(result.stdout)
    return items


def write_csv(path: Path, rows: list[list[str]], header: list[str] = _HEADER) -> Path:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def test_csv_of_1500_rows_with_bad_rows_then_rerun(server: RunningServer, tmp_path: Path) -> None:
    prefix = f"imp-{uuid.uuid4().hex[:8]}"
    rows = [[f"{prefix}-{i:05d}", prefix, "", "enabled", "", ""] for i in range(1500)]
    # line numbers: the header is line 1, rows[i] is line i + 2
    rows[100][2] = "password"  # line 102: unknown attestation type
    rows[200][5] = "{not json"  # line 202: bad initialTwin
    rows[300][0] = ""  # line 302: no registrationId
    rows[400][0] = f"{prefix}-00007"  # line 402: duplicate of line 9
    rows[500][0] = f"{prefix}-00008".upper()  # line 502: duplicate of line 10 (ids are case-insensitive)
    rows[600][4] = server.info["builtinHub"]
    source = write_csv(tmp_path / "devices.csv", rows)
    report = tmp_path / "report.csv"

    result = invoke(server, "enrollment", "import", source, "--report", report)
    assert result.exit_code == 1, (result.output, result.exception)
    assert "1500 rows: 1495 created, 0 skipped (already exist), 5 failed." in result.stdout
    with report.open(newline="") as fh:
        failures = list(csv.DictReader(fh))
    assert [(int(f["row"]), f["registrationId"]) for f in failures] == [
        (102, f"{prefix}-00100"),
        (202, f"{prefix}-00200"),
        (302, ""),
        (402, f"{prefix}-00007"),
        (502, f"{prefix}-00008".upper()),
    ]
    messages = [f["message"] for f in failures]
    assert "attestationType 'password'" in messages[0]
    assert "initialTwin is not valid JSON" in messages[1]
    assert "registrationId is empty" in messages[2]
    assert messages[3] == f"registrationId '{prefix}-00007' is already on row 9"
    assert "already on row 10" in messages[4]
    for line in (102, 202, 302, 402, 502):
        assert str(line) in result.stdout  # the printed report names the rows too

    imported = enrollments(server, f"deviceId = '{prefix}'")
    assert len(imported) == 1495
    by_id = {e["registrationId"]: e for e in imported}
    assert by_id[f"{prefix}-00600"]["iotHubs"] == [server.info["builtinHub"]]
    assert f"{prefix}-00100" not in by_id

    # the same file again: everything that exists is skipped; only the bad rows fail
    again = import_json(server, source, exit_code=1)
    assert (again["rows"], again["written"], again["skipped"], again["failed"]) == (1500, 0, 1495, 5)
    assert [f["row"] for f in again["failures"]] == [102, 202, 302, 402, 502]
    assert all(f["errorCode"] is None for f in again["failures"])  # none came from the service
    assert len(enrollments(server, f"deviceId = '{prefix}'")) == 1495


def test_update_mode_overwrites_and_keeps_keys(server: RunningServer, tmp_path: Path) -> None:
    prefix = f"imp-upd-{uuid.uuid4().hex[:8]}"
    key = base64.b64encode(b"k" * 32).decode()
    header = ["registrationId", "deviceId", "primaryKey"]
    first = write_csv(
        tmp_path / "a.csv", [[f"{prefix}-{i}", prefix, key if i == 0 else ""] for i in range(3)], header
    )
    assert import_json(server, first)["written"] == 3
    keys_before = json.loads(invoke(server, "enrollment", "keys", f"{prefix}-1", "--json").stdout)

    second = write_csv(
        tmp_path / "b.csv",
        [[f"{prefix}-{i}", f"{prefix}-v2", ""] for i in range(4)],
        ["registrationId", "deviceId", "primaryKey"],
    )
    created = import_json(server, second)  # create mode: 3 exist, 1 is new
    assert (created["written"], created["skipped"], created["failed"]) == (1, 3, 0)
    assert len(enrollments(server, f"deviceId = '{prefix}'")) == 3

    updated = import_json(server, second, "--mode", "update")
    assert (updated["written"], updated["skipped"], updated["failed"]) == (4, 0, 0)
    assert len(enrollments(server, f"deviceId = '{prefix}-v2'")) == 4
    # rows without keys keep the stored ones
    assert json.loads(invoke(server, "enrollment", "keys", f"{prefix}-1", "--json").stdout) == keys_before
    assert (
        json.loads(invoke(server, "enrollment", "keys", f"{prefix}-0", "--json").stdout)["symmetricKey"][
            "primaryKey"
        ]
        == key
    )


def test_jsonl_import(server: RunningServer, tmp_path: Path) -> None:
    prefix = f"imp-jl-{uuid.uuid4().hex[:8]}"
    device = pki.make_device_cert(f"{prefix}-x509")
    pem = pki.certificate_pem(device.cert).decode()
    ek = software_ek()
    lines = [
        json.dumps({"registrationId": f"{prefix}-sym", "deviceId": prefix}),
        "",
        json.dumps(
            {
                "registrationId": f"{prefix}-x509",
                "deviceId": prefix,
                "attestation": {
                    "type": "x509",
                    "x509": {"clientCertificates": {"primary": {"certificate": pem}}},
                },
                "initialTwin": {"tags": {"line": 3}},
                "etag": '"ignored"',
            }
        ),
        json.dumps(
            {
                "registrationId": f"{prefix}-tpm",
                "deviceId": prefix,
                "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}},
            }
        ),
        "{broken",
        json.dumps({"registrationId": f"{prefix}-bad-type", "deviceId": 7}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"registrationId": "bad id!", "deviceId": prefix}),
    ]
    source = tmp_path / "devices.jsonl"
    source.write_text("\n".join(lines) + "\n")
    outcome = import_json(server, source, exit_code=1)
    assert (outcome["written"], outcome["failed"]) == (3, 4)
    failures = {f["row"]: f for f in outcome["failures"]}
    assert sorted(failures) == [5, 6, 7, 8]
    assert "not valid JSON" in failures[5]["message"]
    assert "$.deviceId" in failures[6]["message"]
    assert "expected a JSON object" in failures[7]["message"]
    # rejected by the service itself, with its error code
    assert failures[8]["registrationId"] == "bad id!"
    assert failures[8]["errorCode"] == 400005
    assert "Invalid registrationId" in failures[8]["message"]

    types = {
        e["registrationId"]: e["attestation"]["type"] for e in enrollments(server, f"deviceId = '{prefix}'")
    }
    assert types == {f"{prefix}-sym": "symmetricKey", f"{prefix}-x509": "x509", f"{prefix}-tpm": "tpm"}


def test_invalid_id_in_csv_reported_with_the_service_error_code(
    server: RunningServer, tmp_path: Path
) -> None:
    prefix = f"imp-id-{uuid.uuid4().hex[:8]}"
    source = write_csv(
        tmp_path / "ids.csv",
        [
            [f"{prefix}-ok", prefix, "", "", "", ""],
            ["has space", prefix, "", "", "", ""],
            [f"{prefix}-ok2", prefix, "", "", "", ""],
        ],
    )
    report = tmp_path / "report.csv"
    outcome = import_json(server, source, "--report", report, exit_code=1)
    assert outcome["written"] == 2
    [failure] = outcome["failures"]
    assert (failure["row"], failure["registrationId"], failure["errorCode"]) == (3, "has space", 400005)
    assert "400005" in report.read_text()


def test_x509_certificate_path_relative_to_the_csv(server: RunningServer, tmp_path: Path) -> None:
    prefix = f"imp-crt-{uuid.uuid4().hex[:8]}"
    certs = tmp_path / "certs"
    certs.mkdir()
    device = pki.make_device_cert(f"{prefix}-a")
    pki.write_issued(device, certs / "a")
    der_b64 = base64.b64encode(pki.certificate_der(pki.make_device_cert(f"{prefix}-b").cert)).decode()
    header = ["registrationId", "deviceId", "attestationType", "certificate"]
    source = write_csv(
        tmp_path / "x509.csv",
        [
            [f"{prefix}-a", prefix, "x509", "certs/a.pem"],
            [f"{prefix}-b", prefix, "X509", der_b64],
            [f"{prefix}-c", prefix, "x509", ""],
            [f"{prefix}-d", prefix, "x509", "certs/missing.pem"],
        ],
        header,
    )
    outcome = import_json(server, source, exit_code=1)
    assert outcome["written"] == 2
    assert [(f["row"], f["message"]) for f in outcome["failures"]] == [
        (4, "attestationType x509 needs a certificate (PEM file or base64 DER)"),
        (5, "certificate 'certs/missing.pem' is neither a PEM file nor base64 DER"),
    ]
    subjects = {
        e["registrationId"]: e["attestation"]["x509"]["clientCertificates"]["primary"]["info"]["subjectName"]
        for e in enrollments(server, f"deviceId = '{prefix}'")
    }
    assert subjects == {f"{prefix}-a": f"CN={prefix}-a", f"{prefix}-b": f"CN={prefix}-b"}


def test_batches_stay_under_the_request_limit(server: RunningServer, tmp_path: Path) -> None:
    """Rows with 20 KB initial twins (within IoT Hub's 32 KB of desired properties, in 4 KB
    strings): at most four fit in a 96 KB request, so 100 per batch must be split by size; one
    120 KB row cannot be sent at all."""
    prefix = f"imp-big-{uuid.uuid4().hex[:8]}"

    def twin(kilobytes: int, fill: str) -> str:
        return json.dumps({"properties": {"desired": {f"k{i}": fill * 4000 for i in range(kilobytes // 4)}}})

    rows = [[f"{prefix}-{i}", prefix, "", "", "", twin(20, "x")] for i in range(12)]
    rows.append([f"{prefix}-huge", prefix, "", "", "", twin(120, "y")])
    source = write_csv(tmp_path / "big.csv", rows)

    parsed = read_rows(source, "csv")
    batches = list(make_batches(parsed, 100))
    assert len(batches) >= 3
    for batch in batches:
        body = msgspec.json.encode(
            BulkEnrollmentOperation(
                enrollments=[row.enrollment for row in batch if row.enrollment], mode=BulkOperationMode.CREATE
            )
        )
        assert len(body) < MAX_REQUEST_BYTES

    outcome = import_json(server, source, exit_code=1)
    assert (outcome["written"], outcome["failed"]) == (12, 1)
    [failure] = outcome["failures"]
    assert failure["row"] == 14 and "a bulk request takes at most" in failure["message"]
    assert len(enrollments(server, f"deviceId = '{prefix}'")) == 12


def test_small_batch_size_and_format_flag(server: RunningServer, tmp_path: Path) -> None:
    prefix = f"imp-bs-{uuid.uuid4().hex[:8]}"
    source = tmp_path / "devices.txt"
    write_csv(source, [[f"{prefix}-{i}", prefix, "symmetricKey", "disabled", "", ""] for i in range(7)])
    result = invoke(server, "enrollment", "import", source)
    assert result.exit_code == 2 and "--format" in result.output
    outcome = import_json(server, source, "--format", "csv", "--batch-size", "2")
    assert outcome["written"] == 7
    assert {e["provisioningStatus"] for e in enrollments(server, f"deviceId = '{prefix}'")} == {"disabled"}


def test_bad_header_is_refused_before_sending(server: RunningServer, tmp_path: Path) -> None:
    source = write_csv(tmp_path / "bad.csv", [["a", "b"]], ["registrationId", "colour"])
    result = invoke(server, "enrollment", "import", source)
    assert result.exit_code == 2 and "unknown column(s) 'colour'" in result.output
    source = write_csv(tmp_path / "noid.csv", [["a"]], ["deviceId"])
    result = invoke(server, "enrollment", "import", source)
    assert result.exit_code == 2 and "registrationId column is required" in result.output


class _RefusesWholeRequests:
    """A stand-in for ServiceClient whose bulk endpoint refuses (400) any request holding a row
    with deviceId 'poison', as a service that validates more strictly than the client would."""

    def __init__(self) -> None:
        self.requests = 0
        self.enrollments = self

    def bulk(
        self, mode: BulkOperationMode, items: list[IndividualEnrollment]
    ) -> BulkEnrollmentOperationResult:
        self.requests += 1
        if any(item.device_id == "poison" for item in items):
            raise RequestError("Invalid bulk enrollment operation: poison", error_code=DpsCode.INVALID_BODY)
        return BulkEnrollmentOperationResult(is_successful=True)


def test_a_request_refused_as_a_whole_is_split_to_find_the_row(tmp_path: Path) -> None:
    rows = [[f"split-{i}", "poison" if i in (3, 9) else "fine", "", "", "", ""] for i in range(16)]
    parsed = read_rows(write_csv(tmp_path / "split.csv", rows), "csv")
    client = _RefusesWholeRequests()
    result = run_import(cast(ServiceClient, client), parsed, mode=BulkOperationMode.CREATE, batch_size=100)
    assert result.written == 14
    assert [(f.row, f.registration_id, f.error_code) for f in result.failures] == [
        (5, "split-3", 400004),
        (11, "split-9", 400004),
    ]
    assert client.requests < 16 * 2  # halving, not one request per row and more
