"""Manage a running provisiond (or Azure DPS, for the service API) through its REST API.

Command tree (each group is loaded lazily by :mod:`provisiond.cli`)::

    enrollment  create | show | list | update | enable | disable | delete | keys | import
    group       create | show | list | update | enable | disable | delete | keys | device-key
    registration show | list | delete | deprovision
    hub         list | show | stats | add | update | remove | device ... | policy ... | monitor-events | send-c2d | invoke-method
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
from typing import Any, TypeVar

import click
import msgspec

from ..errors import AuthorizationError
from ..models import (
    AttestationMechanism,
    AttestationType,
    Deprovision,
    DeviceRegistrationState,
    EnrollmentGroup,
    IndividualEnrollment,
    ProvisioningStatus,
)
from ..protocol.sas import derive_device_key
from ..service_client import EnrollmentsClient, ServiceClient
from ._common import (
    CONTEXT,
    connected,
    echo_json,
    etag_option,
    json_option,
    print_fields,
    print_table,
    query_text,
)
from ._enrollment_flags import (
    ENROLLMENTS,
    GROUPS,
    EnumChoice,
    Kind,
    apply_common_flags,
    common_enrollment_options,
    group_attestation,
    individual_attestation,
)
from .enroll_import import import_command
from .hub_ops import invoke_method, monitor_events, send_c2d
from .hub_registry import hub_device, hub_policy
from .manage_admin import ca, hub, policy, settings


def _deprovision_option(func: Any) -> Any:
    return click.option(
        "--deprovision",
        type=EnumChoice(*Deprovision),
        default=None,
        help="Also disable or delete the identities the deleted registration records named, in "
        "their hubs [default: leave them, as DPS does].",
    )(func)


__all__ = ["ca", "enrollment", "group", "hub", "policy", "registration", "settings"]

hub.add_command(hub_device)
hub.add_command(hub_policy)
hub.add_command(monitor_events)
hub.add_command(send_c2d)
hub.add_command(invoke_method)

E = TypeVar("E", IndividualEnrollment, EnrollmentGroup)
T = TypeVar("T")

_QUERY_PAGE = 1000
_WHERE_HELP = "Filter: conditions `field = 'value'` joined by AND (or a whole SELECT). Fields: {fields}."


# --- shared pieces -------------------------------------------------------------------------------


def _where_option(fields: str) -> Callable[[Any], Any]:
    return click.option("--where", metavar="CONDITIONS", help=_WHERE_HELP.format(fields=fields))


_limit_option = click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Show at most N items.")


def _page(limit: int | None) -> int:
    return min(limit or _QUERY_PAGE, _QUERY_PAGE)


def _first(items: Iterator[T], limit: int | None) -> Iterator[T]:
    return islice(items, limit) if limit else items


def _attestation_label(attestation: AttestationMechanism | None) -> str:
    if attestation is None:
        return ""
    x509 = attestation.x509
    if (
        attestation.type is AttestationType.X509
        and x509
        and x509.ca_references
        and not x509.signing_certificates
    ):
        return "x509 (CA ref)"
    return attestation.type.value


def _key_fields(mechanism: AttestationMechanism) -> list[tuple[str, Any]]:
    """What identifies a device under an attestation mechanism (secrets included)."""
    fields: list[tuple[str, Any]] = [("Attestation", mechanism.type)]
    sym, tpm = mechanism.symmetric_key, mechanism.tpm
    fields += [
        ("Primary key", sym.primary_key if sym else None),
        ("Secondary key", sym.secondary_key if sym else None),
        ("Endorsement key", tpm.endorsement_key if tpm else None),
        ("Storage root key", tpm.storage_root_key if tpm else None),
    ]
    x509 = mechanism.x509
    for certificates in (x509.client_certificates, x509.signing_certificates) if x509 else ():
        for slot, cert in (
            ("Primary", certificates and certificates.primary),
            ("Secondary", certificates and certificates.secondary),
        ):
            if cert and cert.info:
                fields.append(
                    (f"{slot} certificate", f"{cert.info.subject_name} (SHA-1 {cert.info.sha1_thumbprint})")
                )
    refs = x509.ca_references if x509 else None
    fields += [
        ("Primary CA", refs.primary if refs else None),
        ("Secondary CA", refs.secondary if refs else None),
    ]
    return fields


def _status(state: DeviceRegistrationState) -> str | None:
    return state.status.value if state.status else None


def _summary(kind: Kind[E], doc: E) -> list[tuple[str, Any]]:
    state = doc.registration_state if isinstance(doc, IndividualEnrollment) else None
    custom = doc.custom_allocation_definition
    return [
        ("Id", _id_of(doc)),
        ("Device id", doc.device_id if isinstance(doc, IndividualEnrollment) else None),
        ("Status", doc.provisioning_status),
        ("IoT hubs", doc.iot_hubs or doc.iot_hub_host_name),
        ("Allocation", doc.allocation_policy),
        ("Webhook", custom.webhook_url if custom else None),
        ("IoT Edge", (doc.capabilities.iot_edge if doc.capabilities else None) or None),
        ("Registration", f"{_status(state)} on {state.assigned_hub}" if state else None),
        ("Etag", doc.etag),
        ("Updated", doc.last_updated_date_time_utc),
    ]


def _id_of(doc: IndividualEnrollment | EnrollmentGroup) -> str:
    return doc.registration_id if isinstance(doc, IndividualEnrollment) else doc.enrollment_group_id


def _print_record(kind: Kind[E], verb: str, doc: E, mechanism: AttestationMechanism | None) -> None:
    fields = _summary(kind, doc) + _key_fields(mechanism or doc.attestation)
    print_fields(f"{verb} {kind.label} {_id_of(doc)!r}:", fields)


def _output_written(client: ServiceClient, kind: Kind[E], verb: str, doc: E, as_json: bool) -> None:
    """Print a created or updated record; with a symmetric key, also its keys (so that a device
    can be provisioned straight away)."""
    mechanism = None
    if doc.attestation.type is AttestationType.SYMMETRIC_KEY:
        mechanism = kind.operations(client).attestation_mechanism(_id_of(doc))
        doc = msgspec.structs.replace(doc, attestation=mechanism)
    if as_json:
        echo_json(doc)
        return
    _print_record(kind, verb, doc, mechanism)
    if mechanism is not None:
        try:
            scope = client.settings.get().id_scope
        except AuthorizationError:  # a policy without ServiceConfig: the hint is optional
            return
        click.echo(
            f"Devices provision with ID scope {scope} at https://{client.connection.host} "
            f"(trust the service's CA certificate)."
        )


def _list_rows(items: Iterator[IndividualEnrollment | EnrollmentGroup]) -> Iterator[list[Any]]:
    for doc in items:
        hubs = doc.iot_hubs or doc.iot_hub_host_name
        if isinstance(doc, IndividualEnrollment):
            state = doc.registration_state
            yield [
                doc.registration_id,
                doc.device_id,
                _attestation_label(doc.attestation),
                doc.provisioning_status,
                hubs,
                f"{_status(state)} ({state.assigned_hub or '-'})" if state else "",
                doc.last_updated_date_time_utc,
            ]
        else:
            yield [
                doc.enrollment_group_id,
                _attestation_label(doc.attestation),
                doc.provisioning_status,
                hubs,
                doc.allocation_policy,
                doc.last_updated_date_time_utc,
            ]


_LIST_COLUMNS: Mapping[Kind[Any], list[str]] = {
    ENROLLMENTS: [
        "Registration id",
        "Device id",
        "Attestation",
        "Status",
        "IoT hubs",
        "Registration",
        "Updated",
    ],
    GROUPS: ["Group id", "Attestation", "Status", "IoT hubs", "Allocation", "Updated"],
}


def _add_shared_commands(group_cmd: click.Group, kind: Kind[E], id_name: str) -> None:
    """show, list, enable, disable, delete and keys: the same for enrollments and groups."""
    label = kind.label

    @group_cmd.command("show", help=f"Print one {label} as JSON (secrets stripped unless --keys).")
    @click.argument("id", metavar=id_name)
    @click.option(
        "--keys", is_flag=True, help="Include the attestation secrets (symmetric keys, certificates)."
    )
    @connected()
    def show(client: ServiceClient, id: str, keys: bool) -> None:
        operations = kind.operations(client)
        doc = operations.get(id)
        if keys:
            doc = msgspec.structs.replace(doc, attestation=operations.attestation_mechanism(id))
        echo_json(doc)

    @group_cmd.command("list", help=f"List {label}s (a paged query; --where filters on the server).")
    @_where_option(kind.where_fields)
    @_limit_option
    @json_option
    @connected()
    def list_(client: ServiceClient, where: str | None, limit: int | None, as_json: bool) -> None:
        query = query_text(kind.collection, where)
        items = _first(kind.operations(client).query(query, page_size=_page(limit)), limit)
        if as_json:
            echo_json(list(items))
        else:
            count = print_table(f"{label.capitalize()}s", _LIST_COLUMNS[kind], _list_rows(items))
            click.echo(f"{count} {label}{'' if count == 1 else 's'}.")

    def _set_status(client: ServiceClient, id: str, status: ProvisioningStatus) -> None:
        kind.operations(client).modify(
            id, lambda doc: msgspec.structs.replace(doc, provisioning_status=status)
        )
        click.echo(f"{label.capitalize()} {id!r} is {status.value}.")

    @group_cmd.command("enable", help=f"Let devices of the {label} provision again.")
    @click.argument("id", metavar=id_name)
    @connected()
    def enable(client: ServiceClient, id: str) -> None:
        _set_status(client, id, ProvisioningStatus.ENABLED)

    @group_cmd.command("disable", help=f"Refuse provisioning to devices of the {label} (it is kept).")
    @click.argument("id", metavar=id_name)
    @connected()
    def disable(client: ServiceClient, id: str) -> None:
        _set_status(client, id, ProvisioningStatus.DISABLED)

    @group_cmd.command(
        "delete",
        help=f"Delete the {label}. The identities its devices got stay in their hubs, as with DPS, "
        "unless --deprovision disables or deletes them"
        + (
            " (the group's registration records are deleted then too)."
            if label == "enrollment group"
            else "."
        ),
    )
    @click.argument("id", metavar=id_name)
    @etag_option
    @_deprovision_option
    @connected()
    def delete(client: ServiceClient, id: str, etag: str | None, deprovision: Deprovision | None) -> None:
        kind.operations(client).delete(id, if_match=etag, deprovision=deprovision)
        click.echo(f"Deleted {label} {id!r}{_deprovisioned(deprovision)}.")

    @group_cmd.command(
        "keys", help=f"Print the {label}'s attestation secrets (symmetric keys, certificates)."
    )
    @click.argument("id", metavar=id_name)
    @json_option
    @connected()
    def keys(client: ServiceClient, id: str, as_json: bool) -> None:
        mechanism = kind.operations(client).attestation_mechanism(id)
        if as_json:
            echo_json(mechanism)
        else:
            print_fields(f"Attestation of {label} {id!r}:", _key_fields(mechanism))


def _symmetric_key_options(func: Any, *, create: bool) -> Any:
    """--symmetric-key, --primary-key, --secondary-key; create's help says what omitting them
    gives, update's what switching to symmetric keys does (an omitted key is kept otherwise)."""
    generated = " [default: generated]" if create else ""
    func = click.option(
        "--secondary-key", metavar="KEY", help=f"Secondary symmetric key (base64){generated}."
    )(func)
    func = click.option("--primary-key", metavar="KEY", help=f"Primary symmetric key (base64){generated}.")(
        func
    )
    return click.option(
        "--symmetric-key",
        is_flag=True,
        help="Symmetric key attestation (the default)."
        if create
        else "Switch to symmetric key attestation (keys the flags do not give are generated).",
    )(func)


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
_INDIVIDUAL_ATTESTATION_FLAGS = (
    "symmetric_key",
    "primary_key",
    "secondary_key",
    "x509_cert",
    "x509_secondary",
    "tpm_ek",
    "tpm_srk",
)
_GROUP_ATTESTATION_FLAGS = ("symmetric_key", "primary_key", "secondary_key", "ca_cert", "ca_ref")


def _apply_flags(doc: E, flags: Mapping[str, Any]) -> E:
    """``doc`` with what the create/update flags ask for (an attestation no flag names stays)."""
    attestation: AttestationMechanism | None
    if isinstance(doc, IndividualEnrollment):
        attestation = individual_attestation(
            doc.attestation, **{name: flags[name] for name in _INDIVIDUAL_ATTESTATION_FLAGS}
        )
        if flags.get("device_id"):
            doc = msgspec.structs.replace(doc, device_id=flags["device_id"])
    else:
        attestation = group_attestation(
            doc.attestation, **{name: flags[name] for name in _GROUP_ATTESTATION_FLAGS}
        )
    if attestation is not None:
        doc = msgspec.structs.replace(doc, attestation=attestation)
    return apply_common_flags(doc, **{name: flags[name] for name in _COMMON_FLAGS})


def _create(client: ServiceClient, kind: Kind[E], id: str, flags: Mapping[str, Any], as_json: bool) -> None:
    operations: EnrollmentsClient[E] = kind.operations(client)
    created = operations.create(_apply_flags(kind.new(id), flags))
    _output_written(client, kind, "Created", created, as_json)


def _update(client: ServiceClient, kind: Kind[E], id: str, flags: Mapping[str, Any], as_json: bool) -> None:
    if not any(flags[name] not in (None, False, ()) for name in flags):
        raise click.UsageError("Nothing to change: give at least one flag (see --help).")
    updated = kind.operations(client).modify(id, lambda doc: _apply_flags(doc, flags))
    if as_json:
        echo_json(updated)
    else:
        _print_record(kind, "Updated", updated, None)


# --- enrollment ----------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def enrollment() -> None:
    """Manage individual enrollments: one device, one attestation (symmetric key, X.509, TPM)."""


def _individual_options(*, create: bool) -> Callable[[Any], Any]:
    """The flags of an individual enrollment's create (``create``) or update: the same flags, whose help
    names defaults only on create (on update, a flag left out keeps the stored value)."""
    return lambda func: _add_individual_options(func, create=create)


def _add_individual_options(func: Any, *, create: bool) -> Any:
    func = common_enrollment_options(create=create)(func)
    func = click.option(
        "--device-id",
        metavar="ID",
        help="IoT hub device id" + (" [default: the registration id]." if create else "."),
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
    return _symmetric_key_options(func, create=create)


@enrollment.command("create")
@click.argument("registration_id")
@_individual_options(create=True)
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
@_individual_options(create=False)
@json_option
@connected()
def enrollment_update(client: ServiceClient, registration_id: str, as_json: bool, **flags: Any) -> None:
    """Change an individual enrollment: read it, apply the flags, write it back with its etag
    (If-Match), so that a concurrent change is not overwritten. A flag left out keeps the
    current value, including the stored keys and certificates (the defaults of
    `enrollment create --help` are create's)."""
    _update(client, ENROLLMENTS, registration_id, flags, as_json)


_add_shared_commands(enrollment, ENROLLMENTS, "REGISTRATION_ID")
enrollment.add_command(import_command)


# --- group ---------------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def group() -> None:
    """Manage enrollment groups: many devices sharing a group key or a CA."""


def _group_options(*, create: bool) -> Callable[[Any], Any]:
    """The flags of an enrollment group's create (``create``) or update: the same flags, whose help
    names defaults only on create (on update, a flag left out keeps the stored value)."""
    return lambda func: _add_group_options(func, create=create)


def _add_group_options(func: Any, *, create: bool) -> Any:
    func = common_enrollment_options(create=create)(func)
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
    return _symmetric_key_options(func, create=create)


@group.command("create")
@click.argument("group_id")
@_group_options(create=True)
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
@_group_options(create=False)
@json_option
@connected()
def group_update(client: ServiceClient, group_id: str, as_json: bool, **flags: Any) -> None:
    """Change an enrollment group: read it, apply the flags, write it back with its etag
    (If-Match). A flag left out keeps the current value, including the stored keys and
    certificates (the defaults of `group create --help` are create's)."""
    _update(client, GROUPS, group_id, flags, as_json)


_add_shared_commands(group, GROUPS, "GROUP_ID")


@group.command("device-key")
@click.argument("group_id")
@click.argument("registration_id")
@click.option("--secondary", is_flag=True, help="Derive from the group's secondary key.")
@connected()
def group_device_key(client: ServiceClient, group_id: str, registration_id: str, secondary: bool) -> None:
    """Print the symmetric key of device REGISTRATION_ID in group GROUP_ID:
    base64(HMAC-SHA256(group key, registration id))."""
    mechanism = client.groups.attestation_mechanism(group_id)
    keys = mechanism.symmetric_key
    group_key = (keys.secondary_key if secondary else keys.primary_key) if keys else None
    if mechanism.type is not AttestationType.SYMMETRIC_KEY or not group_key:
        raise click.ClickException(
            f"Enrollment group {group_id!r} uses {mechanism.type.value} attestation, not a symmetric key."
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
    echo_json(client.registrations.get(registration_id))


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
    query = query_text("registrations", where)
    items = _first(client.registrations.query(group_id, query, page_size=_page(limit)), limit)
    if as_json:
        echo_json(list(items))
        return
    rows = (
        [r.registration_id, r.device_id, r.status, r.assigned_hub, r.last_updated_date_time_utc]
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
@_deprovision_option
@connected()
def registration_delete(
    client: ServiceClient, registration_id: str, etag: str | None, deprovision: Deprovision | None
) -> None:
    """Delete the registration record of REGISTRATION_ID (the device provisions afresh next
    time; its identity stays in its hub, as with DPS, unless --deprovision)."""
    client.registrations.delete(registration_id, if_match=etag, deprovision=deprovision)
    click.echo(f"Deleted the registration record of {registration_id!r}{_deprovisioned(deprovision)}.")


@registration.command("deprovision")
@click.argument("registration_id")
@click.option(
    "--delete",
    "delete_identity",
    is_flag=True,
    help="Delete the identity from its hub [default: disable it, which can be undone in the hub].",
)
@etag_option
@connected()
def registration_deprovision(
    client: ServiceClient, registration_id: str, delete_identity: bool, etag: str | None
) -> None:
    """Deprovision the device REGISTRATION_ID: delete its registration record and disable (or
    --delete) the identity it got in its hub, together (the same as `registration delete
    --deprovision`)."""
    mode = Deprovision.DELETE if delete_identity else Deprovision.DISABLE
    client.registrations.delete(registration_id, if_match=etag, deprovision=mode)
    click.echo(f"Deprovisioned {registration_id!r}{_deprovisioned(mode)}.")


def _deprovisioned(mode: Deprovision | None) -> str:
    if mode is None:
        return ""
    return f" (its identities {'deleted from' if mode is Deprovision.DELETE else 'disabled in'} their hubs)"
