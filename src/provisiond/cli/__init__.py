"""The ``provisiond`` command line. Each command group lives in its own module and is loaded
lazily, so that ``provisiond --help`` stays fast and a missing optional extra only breaks the
group that needs it."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from .. import __version__
from ..errors import ProvisioningError

__all__ = ["cli", "main"]

# command name -> (module, attribute, one-line help)
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("provisiond.cli.serve", "serve", "Run the provisioning service."),
    "enrollment": ("provisiond.cli.manage", "enrollment", "Manage individual enrollments."),
    "group": ("provisiond.cli.manage", "group", "Manage enrollment groups."),
    "registration": ("provisiond.cli.manage", "registration", "Read and delete device registration records."),
    "hub": ("provisiond.cli.manage", "hub", "Manage linked IoT hubs."),
    "ca": ("provisiond.cli.manage", "ca", "Manage CA certificates and their proof of possession."),
    "policy": ("provisiond.cli.manage", "policy", "Manage shared access policies."),
    "settings": ("provisiond.cli.manage", "settings", "Show or change the service settings."),
    "pki": ("provisiond.cli.pki", "pki", "Make a development PKI: CAs, device certificates, PKCS#12."),
    "device": ("provisiond.cli.device", "device", "Act as a device: register with a provisioning service."),
    "tpm": ("provisiond.cli.tpm", "tpm", "Read a TPM's endorsement key and registration id, to enroll it."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = _COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module_name, attr, _ = entry
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # an optional extra is missing
            raise click.ClickException(f"'{cmd_name}' is not available: {exc}") from exc
        command: click.Command = getattr(module, attr)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="provisiond")
def cli() -> None:
    """provisiond: a device provisioning service compatible with Azure IoT Hub DPS.

    Start with `provisiond serve --data-dir DIR`; the other commands manage a running service
    through its REST API (they find it through --connection-string, PROVISIOND_CONNECTION_STRING,
    or DIR/connection.json with --data-dir).
    """


def main(argv: list[str] | None = None) -> Any:
    """Entry point: domain errors print their cause (with advice, errorCode and trackingId when
    there are some) and exit non-zero, never a traceback."""
    try:
        return cli.main(args=argv, prog_name="provisiond", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ProvisioningError as exc:
        from ._errors import render

        click.echo(render(exc), err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
