"""Manage a running provisiond (or Azure DPS, for the service API) through its REST API.

Command tree (each group is loaded lazily by :mod:`provisiond.cli`)::

    enrollment  create | show | list | update | enable | disable | delete | keys | import
    group       create | show | list | update | enable | disable | delete | keys | device-key
    registration show | list | delete
    hub         list | show | add | update | remove
    ca          list | show | upload | verification-code | verify | prove | delete
    policy      list | show | create | update | delete | connection-string
    settings    show | set

Every command finds the service through ``--connection-string``, ``--data-dir`` or their
environment variables (see :func:`provisiond.cli._common.connected`). Errors the service
answers propagate as :class:`~provisiond.errors.ProvisioningError`; ``provisiond``'s ``main()``
prints their message and exits with their exit code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import click

from ..errors import AuthorizationError
from ..protocol.sas import derive_device_key
from ..service_client import ServiceClient
from ._common import (
    CONTEXT,
    ENROLLMENTS,
    GROUPS,
    Kind,
    apply_common_flags,
    common_enrollment_options,
    connected,
    echo_json,
    etag_option,
    group_attestation,
    individual_attestation,
    json_option,
    print_fields,
    print_table,
    query_text,
    read_modify_write,
    seg,
)
from .enroll_import import import_command
from .manage_admin import ca, hub, policy, settings

__all__ = ["ca", "enrollment", "group", "hub", "policy", "registration", "settings"]

_QUERY_PAGE = 1000
_WHERE_HELP = "Filter: conditions `field = 'value'` joined by AND (or a whole SELECT). Fields: {fields}."


# --- shared pieces -------------------------------------------------------------------------------


def _where_option(fields: str) -> Callable[[Any], Any]:
    return click.option("--where", metavar="CONDITIONS", help=_WHERE_HELP.format(fields=fields))


_limit_option = click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Show at most N items.")


def _query(client: ServiceClient, path: str, query: str, limit: int | None) -> Iterator[Any]:
    items = client.query(path, query, page_size=min(limit or _QUERY_PAGE, _QUERY_PAGE))
    return islice(items, limit) if limit else items


def _attestation_label(attestation: Mapping[str, Any] | None) -> str:
    if not attestation:
        return ""
    kind = str(attestation.get("type", ""))
    x509 = attestation.get("x509") or {}
    if kind == "x509" and x509.get("caReferences") and not x509.get("signingCertificates"):
        return "x509 (CA ref)"
    return kind


def _key_fields(mechanism: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """What identifies a device under an attestation mechanism (secrets included)."""
    fields: list[tuple[str, Any]] = [("Attestation", mechanism.get("type"))]
    sym = mechanism.get("symmetricKey") or {}
    fields += [("Primary key", sym.get("primaryKey")), ("Secondary key", sym.get("secondaryKey"))]
    tpm = mechanism.get("tpm") or {}
    fields += [
        ("Endorsement key", tpm.get("endorsementKey")),
        ("Storage root key", tpm.get("storageRootKey")),
    ]
    x509 = mechanism.get("x509") or {}
    for name in ("clientCertificates", "signingCertificates"):
        for slot in ("primary", "secondary"):
            info = ((x509.get(name) or {}).get(slot) or {}).get("info") or {}
            if info:
                fields.append(
                    (
                        f"{slot.capitalize()} certificate",
                        f"{info.get('subjectName')} (SHA-1 {info.get('sha1Thumbprint')})",
                    )
                )
    refs = x509.get("caReferences") or {}
    fields += [("Primary CA", refs.get("primary")), ("Secondary CA", refs.get("secondary"))]
    return fields


def _summary(kind: Kind, doc: Mapping[str, Any]) -> list[tuple[str, Any]]:
    state = doc.get("registrationState") or {}
    custom = doc.get("customAllocationDefinition") or {}
    return [
        ("Id", doc.get(kind.id_field)),
        ("Device id", doc.get("deviceId")),
        ("Status", doc.get("provisioningStatus")),
        ("IoT hubs", doc.get("iotHubs") or doc.get("iotHubHostName")),
        ("Allocation", doc.get("allocationPolicy")),
        ("Webhook", custom.get("webhookUrl")),
        ("IoT Edge", (doc.get("capabilities") or {}).get("iotEdge") or None),
        ("Registration", f"{state.get('status')} on {state.get('assignedHub')}" if state else None),
        ("Etag", doc.get("etag")),
        ("Updated", doc.get("lastUpdatedDateTimeUtc")),
    ]


def _print_record(kind: Kind, verb: str, doc: Mapping[str, Any], mechanism: Mapping[str, Any] | None) -> None:
    fields = _summary(kind, doc) + _key_fields(mechanism or doc.get("attestation") or {})
    print_fields(f"{verb} {kind.label} {doc.get(kind.id_field)!r}:", fields)


def _mechanism(client: ServiceClient, kind: Kind, id: str) -> dict[str, Any]:
    result: dict[str, Any] = client.post(f"{kind.item(id)}/attestationmechanism")
    return result


def _output_written(client: ServiceClient, kind: Kind, verb: str, doc: dict[str, Any], as_json: bool) -> None:
    """Print a created or updated record; with a symmetric key, also its keys (so that a device
    can be provisioned straight away)."""
    mechanism = None
    if (doc.get("attestation") or {}).get("type") == "symmetricKey":
        mechanism = _mechanism(client, kind, str(doc[kind.id_field]))
        doc = {**doc, "attestation": mechanism}
    if as_json:
        echo_json(doc)
        return
    _print_record(kind, verb, doc, mechanism)
    if mechanism is not None:
        try:
            scope = client.get("/admin/settings").get("idScope")
        except AuthorizationError:  # a policy without ServiceConfig: the hint is optional
            return
        click.echo(
            f"Devices provision with ID scope {scope} at https://{client.connection.host} "
            f"(trust the service's CA certificate)."
        )


def _list_rows(kind: Kind, items: Iterator[Any]) -> Iterator[list[Any]]:
    for doc in items:
        state = doc.get("registrationState") or {}
        hubs = doc.get("iotHubs") or doc.get("iotHubHostName")
        if kind is ENROLLMENTS:
            yield [
                doc.get(kind.id_field),
                doc.get("deviceId"),
                _attestation_label(doc.get("attestation")),
                doc.get("provisioningStatus"),
                hubs,
                f"{state.get('status')} ({state.get('assignedHub') or '-'})" if state else "",
                doc.get("lastUpdatedDateTimeUtc"),
            ]
        else:
            yield [
                doc.get(kind.id_field),
                _attestation_label(doc.get("attestation")),
                doc.get("provisioningStatus"),
                hubs,
                doc.get("allocationPolicy"),
                doc.get("lastUpdatedDateTimeUtc"),
            ]


_LIST_COLUMNS = {
    ENROLLMENTS.path: [
        "Registration id",
        "Device id",
        "Attestation",
        "Status",
        "IoT hubs",
        "Registration",
        "Updated",
    ],
    GROUPS.path: ["Group id", "Attestation", "Status", "IoT hubs", "Allocation", "Updated"],
}


def _add_shared_commands(group_cmd: click.Group, kind: Kind, id_name: str, where_fields: str) -> None:
    """show, list, enable, disable, delete and keys: the same for enrollments and groups."""
    label = kind.label

    @group_cmd.command("show", help=f"Print one {label} as JSON (secrets stripped unless --keys).")
    @click.argument("id", metavar=id_name)
    @click.option(
        "--keys", is_flag=True, help="Include the attestation secrets (symmetric keys, certificates)."
    )
    @connected()
    def show(client: ServiceClient, id: str, keys: bool) -> None:
        doc = client.get(kind.item(id))
        if keys:
            doc["attestation"] = _mechanism(client, kind, id)
        echo_json(doc)

    @group_cmd.command("list", help=f"List {label}s (a paged query; --where filters on the server).")
    @_where_option(where_fields)
    @_limit_option
    @json_option
    @connected()
    def list_(client: ServiceClient, where: str | None, limit: int | None, as_json: bool) -> None:
        items = _query(client, f"{kind.path}/query", query_text(kind.collection, where), limit)
        if as_json:
            echo_json(list(items))
        else:
            count = print_table(f"{label.capitalize()}s", _LIST_COLUMNS[kind.path], _list_rows(kind, items))
            click.echo(f"{count} {label}{'' if count == 1 else 's'}.")

    def _set_status(client: ServiceClient, id: str, status: str) -> None:
        def change(doc: dict[str, Any]) -> None:
            doc["provisioningStatus"] = status

        read_modify_write(client, kind.item(id), change)
        click.echo(f"{label.capitalize()} {id!r} is {status}.")

    @group_cmd.command("enable", help=f"Let devices of the {label} provision again.")
    @click.argument("id", metavar=id_name)
    @connected()
    def enable(client: ServiceClient, id: str) -> None:
        _set_status(client, id, "enabled")

    @group_cmd.command("disable", help=f"Refuse provisioning to devices of the {label} (it is kept).")
    @click.argument("id", metavar=id_name)
    @connected()
    def disable(client: ServiceClient, id: str) -> None:
        _set_status(client, id, "disabled")

    @group_cmd.command("delete", help=f"Delete the {label} (its registration records stay).")
    @click.argument("id", metavar=id_name)
    @etag_option
    @connected()
    def delete(client: ServiceClient, id: str, etag: str | None) -> None:
        client.delete(kind.item(id), if_match=etag)
        click.echo(f"Deleted {label} {id!r}.")

    @group_cmd.command(
        "keys", help=f"Print the {label}'s attestation secrets (symmetric keys, certificates)."
    )
    @click.argument("id", metavar=id_name)
    @json_option
    @connected()
    def keys(client: ServiceClient, id: str, as_json: bool) -> None:
        mechanism = _mechanism(client, kind, id)
        if as_json:
            echo_json(mechanism)
        else:
            print_fields(f"Attestation of {label} {id!r}:", _key_fields(mechanism))


def _symmetric_key_options(func: Any) -> Any:
    func = click.option(
        "--secondary-key", metavar="KEY", help="Secondary symmetric key (base64) [default: generated]."
    )(func)
    func = click.option(
        "--primary-key", metavar="KEY", help="Primary symmetric key (base64) [default: generated]."
    )(func)
    return click.option(
        "--symmetric-key", is_flag=True, help="Symmetric key attestation (the default on create)."
    )(func)


_ATTESTATION_FLAGS = {
    ENROLLMENTS.path: (
        "symmetric_key",
        "primary_key",
        "secondary_key",
        "x509_cert",
        "x509_secondary",
        "tpm_ek",
        "tpm_srk",
    ),
    GROUPS.path: ("symmetric_key", "primary_key", "secondary_key", "ca_cert", "ca_ref"),
}
_COMMON_FLAGS = (
    "hubs",
    "allocation_policy",
    "webhook_url",
    "webhook_api_version",
    "disabled",
    "edge",
    "initial_twin",
    "reprovision",
)


def _apply_flags(kind: Kind, doc: dict[str, Any], flags: Mapping[str, Any], *, creating: bool) -> None:
    """Set on ``doc`` what the create/update flags ask for."""
    attestation_flags = {name: flags[name] for name in _ATTESTATION_FLAGS[kind.path]}
    builder = individual_attestation if kind is ENROLLMENTS else group_attestation
    attestation = builder(doc.get("attestation"), **attestation_flags)
    if attestation is not None:
        doc["attestation"] = attestation
    elif creating:
        doc["attestation"] = {"type": "symmetricKey"}
    if flags.get("device_id"):
        doc["deviceId"] = flags["device_id"]
    apply_common_flags(doc, **{name: flags[name] for name in _COMMON_FLAGS})


def _create(client: ServiceClient, kind: Kind, id: str, flags: Mapping[str, Any], as_json: bool) -> None:
    doc: dict[str, Any] = {kind.id_field: id}
    _apply_flags(kind, doc, flags, creating=True)
    created = client.put(kind.item(id), doc)
    _output_written(client, kind, "Created", created, as_json)


def _update(client: ServiceClient, kind: Kind, id: str, flags: Mapping[str, Any], as_json: bool) -> None:
    if not any(flags[name] not in (None, False, ()) for name in flags):
        raise click.UsageError("Nothing to change: give at least one flag (see --help).")
    updated = read_modify_write(
        client, kind.item(id), lambda doc: _apply_flags(kind, doc, flags, creating=False)
    )
    if as_json:
        echo_json(updated)
    else:
        _print_record(kind, "Updated", updated, None)


# --- enrollment ----------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def enrollment() -> None:
    """Manage individual enrollments: one device, one attestation (symmetric key, X.509, TPM)."""


def _individual_options(func: Any) -> Any:
    func = common_enrollment_options(func)
    func = click.option(
        "--device-id", metavar="ID", help="IoT hub device id [default: the registration id]."
    )(func)
    func = click.option("--tpm-srk", metavar="B64", help="TPM storage root key (base64).")(func)
    func = click.option("--tpm-ek", metavar="B64", help="TPM attestation: the endorsement key (base64).")(
        func
    )
    func = click.option(
        "--x509-secondary",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="Secondary device certificate (PEM).",
    )(func)
    func = click.option(
        "--x509-cert",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="X.509 attestation: the device's certificate (PEM).",
    )(func)
    return _symmetric_key_options(func)


@enrollment.command("create")
@click.argument("registration_id")
@_individual_options
@json_option
@connected()
def enrollment_create(client: ServiceClient, registration_id: str, as_json: bool, **flags: Any) -> None:
    """Create the individual enrollment REGISTRATION_ID.

    Without an attestation flag the device uses a symmetric key that the service generates; the
    keys are printed, ready for a device to provision with (ID scope: `provisiond settings show`).
    """
    _create(client, ENROLLMENTS, registration_id, flags, as_json)


@enrollment.command("update")
@click.argument("registration_id")
@_individual_options
@json_option
@connected()
def enrollment_update(client: ServiceClient, registration_id: str, as_json: bool, **flags: Any) -> None:
    """Change an individual enrollment: read it, apply the flags, write it back with its etag
    (If-Match), so that a concurrent change is not overwritten. What no flag names is kept,
    including the stored keys and certificates."""
    _update(client, ENROLLMENTS, registration_id, flags, as_json)


_add_shared_commands(
    enrollment,
    ENROLLMENTS,
    "REGISTRATION_ID",
    "registrationId, deviceId, provisioningStatus, attestation.type, iotHubHostName",
)
enrollment.add_command(import_command)


# --- group ---------------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def group() -> None:
    """Manage enrollment groups: many devices sharing a group key or a CA."""


def _group_options(func: Any) -> Any:
    func = common_enrollment_options(func)
    func = click.option(
        "--ca-ref",
        metavar="NAME",
        help="X.509 attestation by a verified CA certificate of the service (caReferences.primary; see `provisiond ca`).",
    )(func)
    func = click.option(
        "--ca-cert",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="X.509 attestation by a signing (CA) certificate, PEM (signingCertificates.primary).",
    )(func)
    return _symmetric_key_options(func)


@group.command("create")
@click.argument("group_id")
@_group_options
@json_option
@connected()
def group_create(client: ServiceClient, group_id: str, as_json: bool, **flags: Any) -> None:
    """Create the enrollment group GROUP_ID.

    Without an attestation flag the group uses a symmetric key that the service generates;
    devices use keys derived from it (`provisiond group device-key`).
    """
    _create(client, GROUPS, group_id, flags, as_json)


@group.command("update")
@click.argument("group_id")
@_group_options
@json_option
@connected()
def group_update(client: ServiceClient, group_id: str, as_json: bool, **flags: Any) -> None:
    """Change an enrollment group: read it, apply the flags, write it back with its etag
    (If-Match). What no flag names is kept, including the stored keys and certificates."""
    _update(client, GROUPS, group_id, flags, as_json)


_add_shared_commands(
    group, GROUPS, "GROUP_ID", "enrollmentGroupId, provisioningStatus, attestation.type, iotHubHostName"
)


@group.command("device-key")
@click.argument("group_id")
@click.argument("registration_id")
@click.option("--secondary", is_flag=True, help="Derive from the group's secondary key.")
@connected()
def group_device_key(client: ServiceClient, group_id: str, registration_id: str, secondary: bool) -> None:
    """Print the symmetric key of device REGISTRATION_ID in group GROUP_ID:
    base64(HMAC-SHA256(group key, registration id))."""
    mechanism = _mechanism(client, GROUPS, group_id)
    keys = mechanism.get("symmetricKey") or {}
    group_key = keys.get("secondaryKey" if secondary else "primaryKey")
    if mechanism.get("type") != "symmetricKey" or not group_key:
        raise click.ClickException(
            f"Enrollment group {group_id!r} uses {mechanism.get('type')} attestation, not a symmetric key."
        )
    click.echo(derive_device_key(group_key, registration_id))


# --- registration --------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def registration() -> None:
    """Read and delete device registration records (what a device got when it provisioned)."""


@registration.command("show")
@click.argument("registration_id")
@connected()
def registration_show(client: ServiceClient, registration_id: str) -> None:
    """Print the registration record of REGISTRATION_ID as JSON."""
    echo_json(client.get(f"/registrations/{seg(registration_id)}"))


@registration.command("list")
@click.argument("group_id")
@_where_option("registrationId, deviceId, status, assignedHub")
@_limit_option
@json_option
@connected()
def registration_list(
    client: ServiceClient, group_id: str, where: str | None, limit: int | None, as_json: bool
) -> None:
    """List the registration records of the devices of enrollment group GROUP_ID."""
    items = _query(client, f"/registrations/{seg(group_id)}/query", query_text("registrations", where), limit)
    if as_json:
        echo_json(list(items))
        return
    rows = (
        [
            r.get("registrationId"),
            r.get("deviceId"),
            r.get("status"),
            r.get("assignedHub"),
            r.get("lastUpdatedDateTimeUtc"),
        ]
        for r in items
    )
    count = print_table(
        f"Registrations of group {group_id}",
        ["Registration id", "Device id", "Status", "Assigned hub", "Updated"],
        rows,
    )
    click.echo(f"{count} registration{'' if count == 1 else 's'}.")


@registration.command("delete")
@click.argument("registration_id")
@etag_option
@connected()
def registration_delete(client: ServiceClient, registration_id: str, etag: str | None) -> None:
    """Delete the registration record of REGISTRATION_ID (the device provisions afresh next time)."""
    client.delete(f"/registrations/{seg(registration_id)}", if_match=etag)
    click.echo(f"Deleted the registration record of {registration_id!r}.")
