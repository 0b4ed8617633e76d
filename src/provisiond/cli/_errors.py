"""How the command line reports a failure: the cause, advice in command-line terms, and for
an error the service answered, its errorCode and trackingId (the service logs the same line
under that tracking id).

The service's messages are written for its REST API ("to update it, send its etag in
If-Match"), and stay so. For the errors it knows (409 exists, 412 etag, 404, 401 and 403), a
management command rewords the error on its way out (:func:`advise`): its message becomes the
service's statement without the REST advice (DPS messages separate the two with ``"; "``), or
the command's own statement where the service's is about a header the user never sent (412),
and the command's advice, naming the command or flag to use, is added as a note (:pep:`678`).
:func:`render` prints the lot.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

import click

from ..errors import (
    AuthenticationError,
    AuthorizationError,
    ConflictError,
    DpsCode,
    NotFoundError,
    PreconditionFailedError,
    ProvisioningError,
)

__all__ = ["advise", "render"]

#: Command group (its path under ``provisiond``: ``hub policy`` is not ``policy``) -> what one of
#: its records is called, and what several are.
_WHAT = {
    "enrollment": ("individual enrollment", "individual enrollments"),
    "group": ("enrollment group", "enrollment groups"),
    "hub": ("linked IoT hub", "linked IoT hubs"),
    "ca": ("CA certificate", "CA certificates"),
    "policy": ("shared access policy", "shared access policies"),
    "registration": ("registration record", "registration records"),
    "hub device": ("device identity", "device identities"),
    "hub policy": ("hub policy", "hub policies"),
}
#: (group, command) -> the advice when the record it creates already exists (409).
_EXISTS = {
    ("enrollment", "create"): "Use `provisiond enrollment update {id}` to change it, or delete it first.",
    ("group", "create"): "Use `provisiond group update {id}` to change it, or delete it first.",
    ("hub", "add"): "Use `provisiond hub update {id}` to change it.",
    ("policy", "create"): "Use `provisiond policy update {id}` to change it.",
    ("ca", "upload"): "Add --replace to replace it (it must then be verified again).",
    ("hub device", "create"): "`provisiond hub device show {id}{hub}` prints it; delete it first.",
    ("hub policy", "create"): "`provisiond hub policy show {id}{hub}` prints it; delete it first.",
}
#: Commands that read a record and write it back with its etag (412: someone wrote in between).
_READ_MODIFY_WRITE = {"update", "enable", "disable"}


def _id(ctx: click.Context) -> str:
    """The value of the command's first argument (the id it acts on)."""
    for param in ctx.command.params:
        if isinstance(param, click.Argument) and param.name and ctx.params.get(param.name) is not None:
            return str(ctx.params[param.name])
    return ""


def _group(ctx: click.Context) -> str:
    """The command's group as typed: ``hub device`` for ``provisiond hub device show``."""
    names = []
    parent = ctx.parent
    while parent is not None and parent.parent is not None:
        names.append(parent.info_name or "")
        parent = parent.parent
    return " ".join(reversed(names))


def _hub_flag(params: Mapping[str, Any]) -> str:
    """`` --hub HOST`` when the command was given one (its commands name the option's value
    ``hub`` or ``hub_name``), so that the advised command looks in the same hub."""
    hub = params.get("hub") or params.get("hub_name")
    return f" --hub {shlex.quote(str(hub))}" if hub else ""


def _not_found(error: NotFoundError, group: str, command: str, params: Mapping[str, Any]) -> str | None:
    """Where to look when the record a command names does not exist (None: nowhere useful).
    The errorCode says which record it was: `hub invoke-method` names a hub and a device."""
    code = int(error.error_code)
    if code == DpsCode.HUB_DEVICE_NOT_ONLINE:  # the device exists: listing devices would not help
        if command == "invoke-method" and not params.get("connect_timeout"):
            return (
                "Give --connect-timeout SECONDS to wait for the device to connect and subscribe to methods."
            )
        return None
    if code == DpsCode.HUB_DEVICE_NOT_FOUND:  # the hub has no such identity
        return f"`provisiond hub device list{_hub_flag(params)}` lists the hub's device identities."
    if code == DpsCode.LINKED_HUB_NOT_FOUND:
        group = "hub"
    if group == "registration" and command != "list":
        return (
            "The device has not registered, or its record was deleted; "
            "`provisiond registration list GROUP_ID` lists the records of a group's devices."
        )
    listed = "group" if group == "registration" else group
    if listed in _WHAT:
        where = _hub_flag(params) if listed.startswith("hub ") else ""
        return f"`provisiond {listed} list{where}` shows the {_WHAT[listed][1]} there are."
    return None


def _advice(
    error: ProvisioningError, group: str, command: str, id: str, params: Mapping[str, Any]
) -> tuple[str | None, str | None]:
    """(the command's own statement or None for the service's, the advice or None)."""
    arg = shlex.quote(id)
    hub = _hub_flag(params) if group.startswith("hub ") else ""
    label = _WHAT.get(group, ("record", "records"))[0]
    if isinstance(error, AuthenticationError):
        return None, (
            "The service did not accept the credential: check --connection-string (or "
            "PROVISIOND_CONNECTION_STRING), or use --data-dir with the directory of the running "
            "service; `provisiond policy connection-string NAME` prints a current connection string."
        )
    if isinstance(error, AuthorizationError):
        if int(error.error_code) not in (DpsCode.FORBIDDEN, DpsCode.MISSING_RIGHT):
            return None, None  # refused for what it asks, not for who asks (a full queue: 403004)
        return None, (
            "Use the connection string of a policy that has this right (`provisiond policy list` "
            "shows each policy's rights), or grant it with `provisiond policy update NAME --rights ...`."
        )
    if isinstance(error, NotFoundError):
        if error.message.startswith("No such resource"):
            return None, None  # the service has no such API at all (not provisiond?): its message says so
        return None, _not_found(error, group, command, params)
    if isinstance(error, ConflictError):
        advice = _EXISTS.get((group, command))
        return None, advice.format(id=arg, hub=hub) if advice else None
    if isinstance(error, PreconditionFailedError):
        if params.get("etag"):
            return (
                f"The {label} {id!r} no longer has the etag {params['etag']}: it changed since that etag was read.",
                f"`provisiond {group} show {arg}{hub}` prints its current etag (or leave out --etag).",
            )
        if (group, command) == ("ca", "upload"):
            return f"There is no CA certificate {id!r} to replace.", "Leave out --replace to upload it."
        if command in _READ_MODIFY_WRITE:
            return (
                f"The {label} {id!r} kept changing while this command updated it.",
                "Someone else is writing it: run the command again.",
            )
    return None, None


def advise(error: ProvisioningError, ctx: click.Context) -> None:
    """Reword an error the service answered a management command with, when the command line
    knows it: the command's statement (or the service's without its REST advice) as the
    message, the command's advice as a note."""
    if error.tracking_id is None or ctx.parent is None:
        return
    statement, advice = _advice(error, _group(ctx), ctx.info_name or "", _id(ctx), ctx.params)
    if advice:
        error.message = statement or _statement(error.message)
        error.add_note(advice)


def _statement(message: str) -> str:
    """The service's message without its REST advice ("...; to update it, send its etag ...")."""
    return message.split("; ", 1)[0].rstrip(".") + "."


def render(error: ProvisioningError) -> str:
    """What ``provisiond`` prints for ``error`` on stderr (no trailing newline): the message,
    the notes, and the errorCode and trackingId of an error the service answered (unless the
    message names them already, as the device client's do)."""
    lines = [f"Error: {error.message}"]
    lines += [f"  {note}" for note in getattr(error, "__notes__", ())]
    if error.tracking_id and error.tracking_id not in error.message:
        lines.append(f"  (errorCode {error.error_code}, trackingId {error.tracking_id})")
    return "\n".join(lines)
