"""What the management commands share: how they find the service, how they print, and the
helpers that turn command-line flags into DPS request bodies.

Nothing here talks to the service on its own; the commands in :mod:`provisiond.cli.manage`
and :mod:`provisiond.cli.enroll_import` do, through :class:`~provisiond.service_client.ServiceClient`.
"""

from __future__ import annotations

import base64
import functools
import json
import secrets
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import click
import msgspec
from rich.console import Console
from rich.table import Table

from ..errors import PreconditionFailedError, ProvisioningError
from ..models import InitialTwin
from ..service_client import ServiceClient
from ._errors import advise

__all__ = [
    "CONTEXT",
    "emit",
    "etag_option",
    "DEFAULT_WEBHOOK_API_VERSION",
    "ENROLLMENTS",
    "GROUPS",
    "Kind",
    "apply_common_flags",
    "common_enrollment_options",
    "connected",
    "console",
    "echo_json",
    "group_attestation",
    "individual_attestation",
    "json_option",
    "load_json_arg",
    "new_key",
    "open_client",
    "print_fields",
    "print_table",
    "query_text",
    "read_certificate_file",
    "read_modify_write",
    "seg",
]

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")

CONNECTION_ENV = "PROVISIOND_CONNECTION_STRING"
DATA_DIR_ENV = "PROVISIOND_DATA_DIR"
_RMW_ATTEMPTS = 3


# --- finding the service -------------------------------------------------------------------------


def _ca_from_data_dir(data_dir: Path) -> str | None:
    try:
        info = json.loads((data_dir / "connection.json").read_text())
    except (OSError, ValueError):
        return None
    ca = info.get("caCertificate") if isinstance(info, dict) else None
    return str(ca) if ca else None


def open_client(connection_string: str | None, data_dir: Path | None, ca_file: Path | None) -> ServiceClient:
    """The client for the service the flags name.

    ``--connection-string`` wins over ``--data-dir``; the CA to trust is ``--ca-file``, else the
    ``caCertificate`` of ``DATA_DIR/connection.json``, else the system's trust store.

    :raises click.UsageError: neither a connection string nor a data directory was given.
    :raises ConfigurationError: the connection string or connection.json is unusable.
    """
    if connection_string:
        ca: str | Path | None = ca_file or (_ca_from_data_dir(data_dir) if data_dir else None)
        return ServiceClient(connection_string, ca_file=ca)
    if data_dir is not None:
        return ServiceClient.from_data_dir(data_dir, **({"ca_file": ca_file} if ca_file else {}))
    raise click.UsageError(
        "No service to talk to: give --connection-string (or set "
        f"{CONNECTION_ENV}), or --data-dir DIR (or set {DATA_DIR_ENV}) to use the "
        "DIR/connection.json that `provisiond serve --data-dir DIR` writes."
    )


def connected(*, connection_string_flag: bool = True) -> Callable[[F], F]:
    """Add the shared connection options to a command and pass it an open ``client`` (first
    positional argument), closed when the command returns. An error the service answers leaves
    with advice in command-line terms when there is some (:mod:`provisiond.cli._errors`).

    ``connection_string_flag=False`` leaves ``--connection-string`` free for the command's own
    use (``hub add``): the service's connection string is then ``--service-connection-string``.
    """
    names = (
        ["--connection-string", "--service-connection-string"]
        if connection_string_flag
        else ["--service-connection-string"]
    )

    def decorator(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            cs = kwargs.pop("service_connection_string")
            data_dir = kwargs.pop("data_dir")
            ca_file = kwargs.pop("ca_file")
            with open_client(cs, data_dir, ca_file) as client:
                try:
                    return func(client, *args, **kwargs)
                except ProvisioningError as exc:
                    advise(exc, click.get_current_context())
                    raise

        options = [
            click.option(
                *names,
                "service_connection_string",
                envvar=CONNECTION_ENV,
                metavar="CS",
                help="The service's connection string: HostName=HOST:PORT;SharedAccessKeyName=...;"
                f"SharedAccessKey=... [env {CONNECTION_ENV}]",
            ),
            click.option(
                "--data-dir",
                envvar=DATA_DIR_ENV,
                type=click.Path(file_okay=False, path_type=Path),
                help="Data directory of a local `provisiond serve`: the connection comes from its "
                f"connection.json. [env {DATA_DIR_ENV}]",
            ),
            click.option(
                "--ca-file",
                type=click.Path(dir_okay=False, exists=True, path_type=Path),
                help="CA certificate (PEM) to trust for the service's TLS certificate "
                "[default: caCertificate of connection.json, else the system trust store]",
            ),
        ]
        decorated: Any = wrapper
        for option in reversed(options):
            decorated = option(decorated)
        result: F = decorated
        return result

    return decorator


#: click context settings of every management group.
CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

etag_option = click.option(
    "--etag", metavar="ETAG", help="Delete only if the stored record still has this etag (If-Match)."
)


def json_option(func: F) -> F:
    """``--json``: print machine-readable JSON instead of tables."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON (for scripts) instead of text and tables."
    )(func)


def seg(value: str) -> str:
    """One URL path segment (ids may hold ':' and '.', never '/')."""
    return quote(value, safe="")


# --- printing ------------------------------------------------------------------------------------


def console(*, stderr: bool = False) -> Console:
    """A rich console on the current stdout/stderr (looked up at call time, so that click's test
    runner captures it). Off a terminal it is wide, so that ids are never folded."""
    stream = sys.stderr if stderr else sys.stdout
    is_tty = getattr(stream, "isatty", lambda: False)()
    return Console(file=stream, width=None if is_tty else 200, highlight=False, soft_wrap=not is_tty)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def emit(as_json: bool, doc: Any, human: Callable[[Any], None]) -> None:
    """Print ``doc`` as JSON with --json, else in its human form."""
    if as_json:
        echo_json(doc)
    else:
        human(doc)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value)
    return str(value)


def print_table(
    title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, empty: str = "Nothing found."
) -> int:
    """Print rows as a rich table; return how many there were."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    count = 0
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
        count += 1
    out = console()
    if count:
        out.print(table)
    else:
        out.print(empty)
    return count


def print_fields(title: str, fields: Iterable[tuple[str, Any]]) -> None:
    """Print ``name  value`` lines under a title, leaving out empty values (plain text, so
    that keys and connection strings copy cleanly)."""
    shown = [
        (name, _cell(value)) for name, value in fields if value is not None and value != "" and value != []
    ]
    width = max((len(name) for name, _ in shown), default=0)
    click.echo(title)
    for name, value in shown:
        click.echo(f"  {name:<{width}}  {value}")


# --- reading flags -------------------------------------------------------------------------------


def load_json_arg(value: str, what: str) -> Any:
    """A JSON text, or ``@FILE`` holding one."""
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text()
        except OSError as exc:
            raise click.BadParameter(
                f"cannot read {value[1:]}: {exc.strerror or exc}", param_hint=what
            ) from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=what) from None


def read_certificate_file(path: Path, what: str) -> str:
    """The text of a PEM certificate file (checked to hold a PEM certificate)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint=what) from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise click.BadParameter(f"{path} holds no PEM certificate", param_hint=what)
    return text


def new_key() -> str:
    """A fresh symmetric key (64 random bytes, base64), as the service generates them."""
    return base64.b64encode(secrets.token_bytes(64)).decode("ascii")


def query_text(collection: str, where: str | None) -> str:
    """``SELECT * FROM collection [WHERE ...]``; a ``where`` that is already a whole SELECT is
    used as it is."""
    if not where or not where.strip():
        return f"SELECT * FROM {collection}"
    if where.lstrip().lower().startswith("select "):
        return where
    return f"SELECT * FROM {collection} WHERE {where}"


# --- enrollments and groups ----------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """Individual enrollments or enrollment groups: where they live and what they are called."""

    path: str
    id_field: str
    label: str
    collection: str

    def item(self, id: str) -> str:
        return f"{self.path}/{seg(id)}"


ENROLLMENTS = Kind("/enrollments", "registrationId", "individual enrollment", "enrollments")
GROUPS = Kind("/enrollmentGroups", "enrollmentGroupId", "enrollment group", "enrollmentGroups")

_REPROVISION = {
    "never": {"updateHubAssignment": False, "migrateDeviceData": False},
    "reset": {"updateHubAssignment": True, "migrateDeviceData": False},
    "migrate": {"updateHubAssignment": True, "migrateDeviceData": True},
}
#: The custom allocation webhook API version Azure's portal proposes (the request payload format).
DEFAULT_WEBHOOK_API_VERSION = "2019-03-31"


def common_enrollment_options(func: F) -> F:
    """The flags individual enrollments and groups share (create and update)."""
    options = [
        click.option(
            "--hub",
            "hubs",
            multiple=True,
            metavar="HOST",
            help="IoT hub the device may be assigned to (repeatable; sets iotHubs; must be linked: "
            "`provisiond hub list`).",
        ),
        click.option(
            "--allocation-policy",
            type=click.Choice(["hashed", "static", "geoLatency", "custom"]),
            help="How a hub is chosen [default: the service's].",
        ),
        click.option(
            "--webhook-url",
            metavar="URL",
            help="Custom allocation webhook (implies --allocation-policy custom).",
        ),
        click.option(
            "--webhook-api-version",
            metavar="V",
            help=f"API version sent to the custom allocation webhook [default: {DEFAULT_WEBHOOK_API_VERSION}].",
        ),
        click.option(
            "--disabled/--enabled",
            "disabled",
            default=None,
            help="Provisioning status [create default: enabled].",
        ),
        click.option("--edge/--no-edge", default=None, help="The device is an IoT Edge device."),
        click.option(
            "--initial-twin",
            metavar="JSON|@FILE",
            help='Initial twin: {"tags": {...}, "properties": {"desired": {...}}}, inline or @file.',
        ),
        click.option(
            "--reprovision",
            type=click.Choice(list(_REPROVISION)),
            help="On re-provisioning: never move the device, move it and reset its twin, or move it "
            "and migrate its data [default: migrate].",
        ),
    ]
    decorated: Any = func
    for option in reversed(options):
        decorated = option(decorated)
    result: F = decorated
    return result


def apply_common_flags(
    doc: dict[str, Any],
    *,
    hubs: Sequence[str] = (),
    allocation_policy: str | None = None,
    webhook_url: str | None = None,
    webhook_api_version: str | None = None,
    disabled: bool | None = None,
    edge: bool | None = None,
    initial_twin: str | None = None,
    reprovision: str | None = None,
) -> dict[str, Any]:
    """Set the fields the common flags give on an enrollment or group document (in place)."""
    if hubs:
        doc["iotHubs"] = list(dict.fromkeys(hubs))
    if webhook_api_version and not webhook_url:
        existing = doc.get("customAllocationDefinition")
        if not existing:
            raise click.UsageError("--webhook-api-version needs --webhook-url.")
        existing["apiVersion"] = webhook_api_version
    if webhook_url:
        doc["customAllocationDefinition"] = {
            "webhookUrl": webhook_url,
            "apiVersion": webhook_api_version or DEFAULT_WEBHOOK_API_VERSION,
        }
        if allocation_policy is None:
            allocation_policy = "custom"
    if allocation_policy is not None:
        doc["allocationPolicy"] = allocation_policy
    if disabled is not None:
        doc["provisioningStatus"] = "disabled" if disabled else "enabled"
    if edge is not None:
        doc["capabilities"] = {**(doc.get("capabilities") or {}), "iotEdge": edge}
    if initial_twin is not None:
        twin = load_json_arg(initial_twin, "--initial-twin")
        try:
            msgspec.convert(twin, InitialTwin)
        except msgspec.ValidationError as exc:
            raise click.BadParameter(str(exc), param_hint="--initial-twin") from None
        doc["initialTwin"] = twin
    if reprovision is not None:
        doc["reprovisionPolicy"] = dict(_REPROVISION[reprovision])
    return doc


def _same_type(existing: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any]:
    """The existing attestation when it has ``type_``, else an empty mapping."""
    if existing and existing.get("type") == type_:
        return existing
    return {}


def _symmetric(primary_key: str | None, secondary_key: str | None) -> dict[str, Any]:
    keys = {"primaryKey": primary_key, "secondaryKey": secondary_key}
    # Omitted keys: the service keeps the stored ones (same type) or generates new ones.
    return {"type": "symmetricKey", "symmetricKey": {k: v for k, v in keys.items() if v}}


def _one_kind(chosen: Mapping[str, bool]) -> str | None:
    kinds = [name for name, wanted in chosen.items() if wanted]
    if len(kinds) > 1:
        raise click.UsageError(f"Choose one attestation: {' or '.join(kinds)}.")
    return kinds[0] if kinds else None


def individual_attestation(
    existing: Mapping[str, Any] | None,
    *,
    symmetric_key: bool = False,
    primary_key: str | None = None,
    secondary_key: str | None = None,
    x509_cert: Path | None = None,
    x509_secondary: Path | None = None,
    tpm_ek: str | None = None,
    tpm_srk: str | None = None,
) -> dict[str, Any] | None:
    """The attestation an individual enrollment's flags ask for, or ``None`` when they name
    none (create: the caller uses a symmetric key; update: keeps what is stored).

    On update, what the flags leave out is kept from ``existing`` when the type stays the same
    (e.g. ``--x509-cert`` alone keeps the stored secondary certificate).
    """
    kind = _one_kind(
        {
            "a symmetric key (--symmetric-key/--primary-key/--secondary-key)": bool(
                symmetric_key or primary_key or secondary_key
            ),
            "X.509 (--x509-cert/--x509-secondary)": bool(x509_cert or x509_secondary),
            "TPM (--tpm-ek/--tpm-srk)": bool(tpm_ek or tpm_srk),
        }
    )
    if kind is None:
        return None
    if kind.startswith("a symmetric"):
        return _symmetric(primary_key, secondary_key)
    if kind.startswith("X.509"):
        old = (_same_type(existing, "x509").get("x509") or {}).get("clientCertificates") or {}
        primary = (
            {"certificate": read_certificate_file(x509_cert, "--x509-cert")}
            if x509_cert
            else old.get("primary")
        )
        if primary is None:
            raise click.UsageError("X.509 attestation needs --x509-cert (the device's certificate).")
        certs = {"primary": primary}
        secondary = (
            {"certificate": read_certificate_file(x509_secondary, "--x509-secondary")}
            if x509_secondary
            else old.get("secondary")
        )
        if secondary is not None:
            certs["secondary"] = secondary
        return {"type": "x509", "x509": {"clientCertificates": certs}}
    old_tpm = _same_type(existing, "tpm").get("tpm") or {}
    ek = tpm_ek or old_tpm.get("endorsementKey")
    if not ek:
        raise click.UsageError("TPM attestation needs --tpm-ek (the endorsement key, base64).")
    tpm = {"endorsementKey": ek}
    srk = tpm_srk or old_tpm.get("storageRootKey")
    if srk:
        tpm["storageRootKey"] = srk
    return {"type": "tpm", "tpm": tpm}


def group_attestation(
    existing: Mapping[str, Any] | None,
    *,
    symmetric_key: bool = False,
    primary_key: str | None = None,
    secondary_key: str | None = None,
    ca_cert: Path | None = None,
    ca_ref: str | None = None,
) -> dict[str, Any] | None:
    """The attestation an enrollment group's flags ask for, or ``None`` when they name none.

    ``--ca-cert`` and ``--ca-ref`` may be combined (both are X.509); on update a stored
    secondary signing certificate or CA reference is kept.
    """
    kind = _one_kind(
        {
            "a symmetric key (--symmetric-key/--primary-key/--secondary-key)": bool(
                symmetric_key or primary_key or secondary_key
            ),
            "X.509 (--ca-cert/--ca-ref)": bool(ca_cert or ca_ref),
        }
    )
    if kind is None:
        return None
    if kind.startswith("a symmetric"):
        return _symmetric(primary_key, secondary_key)
    old = _same_type(existing, "x509").get("x509") or {}
    x509: dict[str, Any] = {}
    if ca_cert:
        signing = {"primary": {"certificate": read_certificate_file(ca_cert, "--ca-cert")}}
        old_secondary = (old.get("signingCertificates") or {}).get("secondary")
        if old_secondary:
            signing["secondary"] = old_secondary
        x509["signingCertificates"] = signing
    if ca_ref:
        refs = {"primary": ca_ref}
        old_secondary_ref = (old.get("caReferences") or {}).get("secondary")
        if old_secondary_ref:
            refs["secondary"] = old_secondary_ref
        x509["caReferences"] = refs
    return {"type": "x509", "x509": x509}


# --- read-modify-write ---------------------------------------------------------------------------


def read_modify_write(
    client: ServiceClient, path: str, change: Callable[[dict[str, Any]], object]
) -> dict[str, Any]:
    """GET ``path``, apply ``change`` to the document (in place), PUT it back with ``If-Match``
    set to the etag that was read. When someone else wrote in between (412), start over with a
    fresh read, a few times."""
    for attempt in range(_RMW_ATTEMPTS):
        doc: dict[str, Any] = client.get(path)
        etag = doc.get("etag")
        change(doc)
        try:
            result: dict[str, Any] = client.put(path, doc, if_match=etag or "*")
            return result
        except PreconditionFailedError:
            if attempt + 1 == _RMW_ATTEMPTS:
                raise
    raise AssertionError("unreachable")  # pragma: no cover
