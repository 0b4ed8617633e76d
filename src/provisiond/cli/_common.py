"""What the management commands share: how they find the service, how they print, and how
they read flags (the enrollment documents the flags make are :mod:`provisiond.cli._enrollment_flags`').

Nothing here talks to the service on its own; the commands in :mod:`provisiond.cli.manage`
and :mod:`provisiond.cli.enroll_import` do, through the typed clients of
:class:`~provisiond.service_client.ServiceClient`.
"""

from __future__ import annotations

import base64
import enum
import functools
import json
import secrets
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import click
import msgspec
from rich.console import Console
from rich.table import Table

from ..errors import ProvisioningError
from ..service_client import ServiceClient, seg
from ._errors import advise

__all__ = [
    "CONTEXT",
    "builtin_hub",
    "emit",
    "etag_option",
    "connected",
    "console",
    "echo_json",
    "json_option",
    "load_json_arg",
    "new_key",
    "open_client",
    "print_fields",
    "print_table",
    "query_text",
    "read_certificate_file",
    "seg",
    "with_options",
]

F = TypeVar("F", bound=Callable[..., Any])

CONNECTION_ENV = "PROVISIOND_CONNECTION_STRING"
DATA_DIR_ENV = "PROVISIOND_DATA_DIR"


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
        return with_options(cast(F, wrapper), options)  # wraps(func): func's signature, less the flags

    return decorator


def with_options(func: F, options: Sequence[Callable[[Any], Any]]) -> F:
    """``func`` decorated with click ``options``, the first one listed first in ``--help``."""
    decorated: Any = func
    for option in reversed(options):
        decorated = option(decorated)
    result: F = decorated
    return result


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


# --- printing ------------------------------------------------------------------------------------


def console(*, stderr: bool = False) -> Console:
    """A rich console on the current stdout/stderr (looked up at call time, so that click's test
    runner captures it). Off a terminal it is wide, so that ids are never folded."""
    stream = sys.stderr if stderr else sys.stdout
    is_tty = getattr(stream, "isatty", lambda: False)()
    return Console(file=stream, width=None if is_tty else 200, highlight=False, soft_wrap=not is_tty)


def echo_json(data: Any) -> None:
    """``data`` (a model, a list of models, or plain JSON data) as indented JSON, in the shape
    the service answers (camelCase, unset fields left out)."""
    click.echo(json.dumps(msgspec.to_builtins(data), indent=2))


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
    if isinstance(value, enum.Enum):
        return str(value.value)
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


def builtin_hub(client: ServiceClient, hub: str | None) -> str:
    """``hub``, else the first built-in hub (the one connection.json names: the service lists it
    first)."""
    if hub:
        return hub
    for linked in client.hubs.list():
        if linked.builtin:
            return linked.host_name
    raise click.UsageError("The service has no built-in hub; name one with --hub.")
