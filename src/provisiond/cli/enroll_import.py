"""``provisiond enrollment import``: load thousands of individual enrollments from a CSV or JSON
lines file through the bulk API (``POST /enrollments``), safely re-runnable.

The file is read and checked first: a malformed row (a missing registrationId, an unknown
attestation type, bad JSON, a registrationId already on an earlier row) is reported with its
row number and never sent. The other rows go out in bulk operations sized to stay under the
service's 96 KB request limit. The service answers per row; in create mode an "already exists"
answer (409xxx) counts as *skipped*, so running the same file again is harmless.
"""

from __future__ import annotations

import base64
import binascii
import csv
import enum
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import MethodNotAllowedError, ProvisioningError, RequestError, ThrottledError
from ..models import (
    AllocationPolicy,
    AttestationMechanism,
    AttestationType,
    BulkEnrollmentOperationResult,
    BulkOperationMode,
    CustomAllocationDefinition,
    IndividualEnrollment,
    InitialTwin,
    ProvisioningStatus,
    SymmetricKeyAttestation,
    TpmAttestation,
    X509Attestation,
    X509Certificates,
    X509CertificateWithInfo,
)
from ..service_client import ServiceClient
from ._common import connected, console, echo_json, print_table
from ._enrollment_flags import DEFAULT_WEBHOOK_API_VERSION, EnumChoice

__all__ = [
    "CSV_COLUMNS",
    "Failure",
    "Format",
    "ImportResult",
    "Row",
    "import_command",
    "make_batches",
    "read_rows",
    "run_import",
]

#: The bulk API's request limit (DPS's message size limit), and what the envelope may take.
MAX_REQUEST_BYTES = 96 * 1024
_ENVELOPE_BYTES = 512
_THROTTLE_RETRIES = 5
_MAX_THROTTLE_WAIT = 30.0
_PRINTED_FAILURES = 50
_INLINE_PEM = "-----BEGIN"

#: CSV columns (case-insensitive); only registrationId is required.
CSV_COLUMNS = (
    "registrationId",
    "deviceId",
    "attestationType",
    "primaryKey",
    "secondaryKey",
    "certificate",
    "endorsementKey",
    "storageRootKey",
    "iotHubHostName",
    "iotHubs",
    "provisioningStatus",
    "allocationPolicy",
    "initialTwin",
    "webhookUrl",
    "webhookApiVersion",
)
_COLUMN_BY_LOWER = {name.lower(): name for name in CSV_COLUMNS}
_READ_ONLY = ("etag", "registrationState", "createdDateTimeUtc", "lastUpdatedDateTimeUtc")
_HUB_SEPARATORS = re.compile(r"[;,\s]+")

M = TypeVar("M", bound=enum.Enum)


class Format(enum.Enum):
    """The file formats ``enrollment import`` reads."""

    CSV = "csv"
    JSONL = "jsonl"


@dataclass
class Row:
    """One row of the file: the enrollment to send, or why it cannot be sent."""

    number: int
    registration_id: str
    enrollment: IndividualEnrollment | None = None
    error: str | None = None
    size: int = 0


@dataclass(frozen=True)
class Failure:
    row: int
    registration_id: str
    error_code: int | None
    message: str


@dataclass
class ImportResult:
    rows: int = 0
    written: int = 0
    skipped: int = 0
    failures: list[Failure] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "written": self.written,
            "skipped": self.skipped,
            "failed": len(self.failures),
            "failures": [
                {
                    "row": f.row,
                    "registrationId": f.registration_id,
                    "errorCode": f.error_code,
                    "message": f.message,
                }
                for f in self.failures
            ],
        }


# --- reading -------------------------------------------------------------------------------------


class _RowError(ValueError):
    """A row that cannot become an enrollment (the message says why)."""


def _certificate(value: str, base_dir: Path) -> str:
    """A certificate cell: inline PEM, a path to a PEM file (relative to the working directory or
    the CSV's directory), or inline base64 DER."""
    text = value.strip()
    if text.startswith(_INLINE_PEM):
        return text
    for candidate in (Path(text), base_dir / text):
        try:
            if candidate.is_file():
                pem = candidate.read_text()
                if _INLINE_PEM not in pem:
                    raise _RowError(f"certificate file {text!r} holds no PEM certificate")
                return pem
        except OSError:  # e.g. a base64 text too long to be a file name
            continue
        except UnicodeDecodeError:
            raise _RowError(f"certificate file {text!r} is not a PEM text file") from None
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _RowError(f"certificate {text[:40]!r} is neither a PEM file nor base64 DER") from None
    return text


def _choice(value: str, members: Sequence[M], column: str) -> M:
    """The member whose wire value ``value`` spells (any case)."""
    for member in members:
        if str(member.value).lower() == value.strip().lower():
            return member
    raise _RowError(f"{column} {value!r} is not one of {', '.join(str(m.value) for m in members)}")


class _TwinCell(msgspec.Struct, rename="camel"):
    """The initialTwin column, decoded where its errors name ``$.initialTwin``."""

    initial_twin: InitialTwin


def _initial_twin(text: str) -> InitialTwin:
    try:
        twin = json.loads(text)
    except ValueError as exc:
        raise _RowError(f"initialTwin is not valid JSON: {exc}") from None
    try:
        return msgspec.convert({"initialTwin": twin}, _TwinCell).initial_twin
    except msgspec.ValidationError as exc:
        raise _RowError(str(exc)) from None


_ATTESTATION_TYPES = (AttestationType.SYMMETRIC_KEY, AttestationType.X509, AttestationType.TPM)
_POLICIES = (
    AllocationPolicy.HASHED,
    AllocationPolicy.STATIC,
    AllocationPolicy.GEO_LATENCY,
    AllocationPolicy.CUSTOM,
)


def _csv_attestation(get: Callable[[str], str], base_dir: Path) -> AttestationMechanism:
    kind = _choice(
        get("attestationType") or AttestationType.SYMMETRIC_KEY.value, _ATTESTATION_TYPES, "attestationType"
    )
    if kind is AttestationType.X509:
        if not get("certificate"):
            raise _RowError("attestationType x509 needs a certificate (PEM file or base64 DER)")
        primary = X509CertificateWithInfo(certificate=_certificate(get("certificate"), base_dir))
        x509 = X509Attestation(client_certificates=X509Certificates(primary=primary))
        return AttestationMechanism(type=kind, x509=x509)
    if kind is AttestationType.TPM:
        if not get("endorsementKey"):
            raise _RowError("attestationType tpm needs an endorsementKey")
        tpm = TpmAttestation(
            endorsement_key=get("endorsementKey"), storage_root_key=get("storageRootKey") or None
        )
        return AttestationMechanism(type=kind, tpm=tpm)
    keys = SymmetricKeyAttestation(
        primary_key=get("primaryKey") or None, secondary_key=get("secondaryKey") or None
    )
    return AttestationMechanism(type=kind, symmetric_key=keys)


def csv_enrollment(cells: dict[str, str], base_dir: Path) -> IndividualEnrollment:
    """The enrollment one CSV row describes (cells keyed by canonical column name).

    :raises _RowError: what is wrong with the row.
    """
    cleaned = {k: (v or "").strip() for k, v in cells.items()}

    def get(column: str) -> str:
        return cleaned.get(column, "")

    registration_id = get("registrationId")
    if not registration_id:
        raise _RowError("registrationId is empty")
    attestation = _csv_attestation(get, base_dir)
    status, policy, webhook = get("provisioningStatus"), get("allocationPolicy"), get("webhookUrl")
    return IndividualEnrollment(
        registration_id=registration_id,
        attestation=attestation,
        device_id=get("deviceId") or None,
        iot_hub_host_name=get("iotHubHostName") or None,
        iot_hubs=[h for h in _HUB_SEPARATORS.split(get("iotHubs")) if h] or None,
        provisioning_status=_choice(status, list(ProvisioningStatus), "provisioningStatus")
        if status
        else None,
        allocation_policy=_choice(policy, _POLICIES, "allocationPolicy") if policy else None,
        custom_allocation_definition=CustomAllocationDefinition(
            webhook_url=webhook, api_version=get("webhookApiVersion") or DEFAULT_WEBHOOK_API_VERSION
        )
        if webhook
        else None,
        initial_twin=_initial_twin(get("initialTwin")) if get("initialTwin") else None,
    )


def _checked(doc: Any) -> IndividualEnrollment:
    """``doc`` as an enrollment if it has the IndividualEnrollment shape (types the bulk API
    would refuse for the whole request are caught here, per row). Ids and keys are left to
    the service."""
    if not isinstance(doc, dict):
        raise _RowError(f"expected a JSON object, got {type(doc).__name__}")
    try:
        return msgspec.convert(doc, IndividualEnrollment)
    except msgspec.ValidationError as exc:
        raise _RowError(str(exc)) from None


def _csv_header(fieldnames: Sequence[str] | None, path: Path) -> list[str]:
    if not fieldnames:
        raise click.UsageError(f"{path} is empty: the first row must name the columns.")
    names = []
    unknown = []
    for name in fieldnames:
        canonical = _COLUMN_BY_LOWER.get((name or "").strip().lower())
        if canonical is None:
            unknown.append(name)
        names.append(canonical or name)
    if unknown:
        raise click.UsageError(
            f"{path}: unknown column(s) {', '.join(map(repr, unknown))}; the columns are: {', '.join(CSV_COLUMNS)}."
        )
    if "registrationId" not in names:
        raise click.UsageError(f"{path}: the registrationId column is required.")
    return names


def _read_csv(path: Path) -> Iterator[Row]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = _csv_header(next(reader, None), path)
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            number = reader.line_num
            cells = dict(zip(header, values, strict=False))
            rid = (cells.get("registrationId") or "").strip()
            if len(values) > len(header):
                yield Row(
                    number, rid, error=f"the row has {len(values)} values, the header {len(header)} columns"
                )
                continue
            try:
                yield Row(number, rid, enrollment=csv_enrollment(cells, path.parent))
            except _RowError as exc:
                yield Row(number, rid, error=str(exc))


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as exc:
                yield Row(number, "", error=f"not valid JSON: {exc}")
                continue
            rid = str(doc.get("registrationId") or "") if isinstance(doc, dict) else ""
            try:
                if isinstance(doc, dict):
                    doc = {k: v for k, v in doc.items() if k not in _READ_ONLY}
                    doc.setdefault("attestation", {"type": "symmetricKey"})
                yield Row(number, rid, enrollment=_checked(doc))
            except _RowError as exc:
                yield Row(number, rid, error=str(exc))


def read_rows(path: Path, fmt: Format | str) -> list[Row]:
    """Every row of the file, checked; a registrationId seen on an earlier row makes the row
    an error (which of the two should win is the file's author's call)."""
    rows = list(_read_csv(path) if Format(fmt) is Format.CSV else _read_jsonl(path))
    first_seen: dict[str, int] = {}
    for row in rows:
        if row.enrollment is None:
            continue
        key = row.registration_id.lower()
        if key in first_seen:
            row.enrollment, row.error = (
                None,
                f"registrationId {row.registration_id!r} is already on row {first_seen[key]}",
            )
            continue
        first_seen[key] = row.number
        row.size = len(msgspec.json.encode(row.enrollment))  # as ServiceClient encodes it
    return rows


# --- sending -------------------------------------------------------------------------------------


def make_batches(
    rows: Sequence[Row], batch_size: int, max_bytes: int = MAX_REQUEST_BYTES
) -> Iterator[list[Row]]:
    """Group sendable rows into bulk operations of at most ``batch_size`` rows whose request
    body stays under ``max_bytes``. (A row too large on its own is turned into an error.)"""
    budget = max_bytes - _ENVELOPE_BYTES
    batch: list[Row] = []
    used = 0
    for row in rows:
        if row.enrollment is None:
            continue
        if row.size > budget:
            row.enrollment, row.error = (
                None,
                f"the enrollment is {row.size} bytes; a bulk request takes at most {max_bytes}",
            )
            continue
        if batch and (len(batch) >= batch_size or used + row.size + 2 > budget):
            yield batch
            batch, used = [], 0
        batch.append(row)
        used += row.size + 2
    if batch:
        yield batch


def _post(
    client: ServiceClient, mode: BulkOperationMode, enrollments: list[IndividualEnrollment]
) -> BulkEnrollmentOperationResult:
    for attempt in range(_THROTTLE_RETRIES):
        try:
            return client.enrollments.bulk(mode, enrollments)
        except ThrottledError as exc:
            if attempt + 1 == _THROTTLE_RETRIES:
                raise
            time.sleep(min(max(exc.retry_after, 1), _MAX_THROTTLE_WAIT))
    raise AssertionError("unreachable")  # pragma: no cover


def send_batch(
    client: ServiceClient, batch: list[Row], mode: BulkOperationMode, result: ImportResult
) -> None:
    """Send one bulk operation and account for each row. When the service refuses the request
    as a whole (400), halve it until the row at fault is alone; other errors propagate."""
    try:
        answer = _post(client, mode, [row.enrollment for row in batch if row.enrollment is not None])
    except RequestError as exc:
        if isinstance(exc, MethodNotAllowedError):
            raise
        if len(batch) == 1:
            [row] = batch
            result.failures.append(Failure(row.number, row.registration_id, exc.error_code, exc.message))
            return
        half = len(batch) // 2
        send_batch(client, batch[:half], mode, result)
        send_batch(client, batch[half:], mode, result)
        return
    by_id = {row.registration_id.lower(): row for row in batch}
    failed = 0
    for error in answer.errors:
        rid = error.registration_id or ""
        sent = by_id.get(rid.lower())
        failed += 1
        if mode is BulkOperationMode.CREATE and error.error_code // 1000 == 409:
            result.skipped += 1
            continue
        result.failures.append(
            Failure(
                sent.number if sent else 0,
                sent.registration_id if sent else rid,
                error.error_code,
                error.error_status,
            )
        )
    result.written += len(batch) - failed


def run_import(
    client: ServiceClient,
    rows: Sequence[Row],
    *,
    mode: BulkOperationMode,
    batch_size: int,
    progress: Callable[[int], None] = lambda n: None,
    result: ImportResult | None = None,
) -> ImportResult:
    """Send every sendable row; return the counts and the failures (malformed rows included),
    in row order. ``result`` (when given) is filled in as rows are sent, so that it tells how
    far the import got when an error stops it."""
    result = result or ImportResult()
    result.rows = len(rows)
    try:
        for batch in make_batches(rows, batch_size):
            send_batch(client, batch, mode, result)
            progress(len(batch))
    finally:
        result.failures += [Failure(r.number, r.registration_id, None, r.error) for r in rows if r.error]
        result.failures.sort(key=lambda f: f.row)
    return result


# --- the command ---------------------------------------------------------------------------------


def _format_of(path: Path, fmt: Format | None) -> Format:
    if fmt:
        return fmt
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return Format.CSV
    if suffix in (".jsonl", ".ndjson", ".json"):
        return Format.JSONL
    raise click.UsageError(
        f"Cannot tell the format of {path.name} from its extension: give --format csv|jsonl."
    )


def _write_report(path: Path, failures: Sequence[Failure]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "registrationId", "errorCode", "message"])
        for f in failures:
            writer.writerow(
                [f.row, f.registration_id, "" if f.error_code is None else f.error_code, f.message]
            )


def _print_summary(result: ImportResult, mode: BulkOperationMode) -> None:
    if result.failures:
        shown = result.failures[:_PRINTED_FAILURES]
        print_table(
            "Rows that failed",
            ["Row", "Registration id", "Error code", "Message"],
            ([f.row, f.registration_id, f.error_code, f.message] for f in shown),
        )
        if len(result.failures) > len(shown):
            click.echo(
                f"... and {len(result.failures) - len(shown)} more (write them all with --report FILE)."
            )
    verb = "created" if mode is BulkOperationMode.CREATE else "written"
    click.echo(
        f"{result.rows} rows: {result.written} {verb}, {result.skipped} skipped (already exist), "
        f"{len(result.failures)} failed."
    )


@click.command("import")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--format", "fmt", type=EnumChoice(*Format), help="[default: from the extension]")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="Enrollments per bulk request (fewer when they would exceed the 96 KB request limit).",
)
@click.option(
    "--mode",
    type=EnumChoice(BulkOperationMode.CREATE, BulkOperationMode.UPDATE),
    default=BulkOperationMode.CREATE.value,
    show_default=True,
    help="create: add new enrollments, skip existing ones. update: create or overwrite.",
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write the failed rows to this CSV file (row, registrationId, errorCode, message).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@connected()
def import_command(
    client: ServiceClient,
    file: Path,
    fmt: Format | None,
    batch_size: int,
    mode: BulkOperationMode,
    report: Path | None,
    as_json: bool,
) -> None:
    """Load individual enrollments in bulk from FILE (CSV or JSON lines).

    \b
    CSV: a header row, then one enrollment per row. Columns (any case; only registrationId
    is required): registrationId, deviceId, attestationType (symmetricKey [default] | x509 |
    tpm), primaryKey, secondaryKey (generated when empty), certificate (x509: PEM file path,
    inline PEM, or base64 DER), endorsementKey, storageRootKey (tpm), iotHubHostName, iotHubs
    (separated by spaces or ';'), provisioningStatus (enabled | disabled), allocationPolicy,
    webhookUrl, webhookApiVersion, initialTwin (JSON).
    JSON lines: one IndividualEnrollment JSON object per line (as `enrollment list --json`
    prints them; attestation defaults to a symmetric key; read-only fields are dropped).

    Rows are numbered by their line in the file (the CSV header is line 1). A malformed row,
    or one whose registrationId appeared on an earlier row, is reported and not sent.

    \b
    Safe to re-run: in create mode (the default) an enrollment that already exists is left
    as it is and counted as skipped, not failed; its content is NOT compared with the row, so
    use --mode update to overwrite existing enrollments with the file's content (stored keys
    are kept when a row gives none).

    Exits with 1 when any row failed (the failures are listed, and written with --report).
    """
    rows = read_rows(file, _format_of(file, fmt))
    sendable = sum(1 for row in rows if row.enrollment is not None)
    err = console(stderr=True)
    result = ImportResult()
    try:
        with Progress(
            TextColumn("Importing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            disable=not err.is_terminal,
            transient=True,
        ) as bar:
            task = bar.add_task("import", total=sendable)
            run_import(
                client,
                rows,
                mode=mode,
                batch_size=batch_size,
                progress=lambda n: bar.advance(task, n),
                result=result,
            )
    except ProvisioningError:
        click.echo(
            f"The import stopped: {result.written} rows were written and {result.skipped} skipped "
            "before the error below; re-run to continue.",
            err=True,
        )
        if report is not None:
            _write_report(report, result.failures)
        raise
    if report is not None:
        _write_report(report, result.failures)
    if as_json:
        echo_json(result.as_dict())
    else:
        _print_summary(result, mode)
    if result.failures:
        raise click.exceptions.Exit(1)
