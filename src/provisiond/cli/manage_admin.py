"""The management-plane command groups: linked IoT hubs, CA certificates (proof of
possession), shared access policies and service settings, all through provisiond's ``/admin``
API (Azure keeps these in its Resource Manager). Re-exported by :mod:`provisiond.cli.manage`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec
from cryptography.hazmat.primitives.serialization import Encoding

from .. import pki
from ..models import (
    AllocationPolicy,
    CaCertificate,
    CertificateUpload,
    HubTier,
    HubWriterReport,
    LinkedHub,
    Right,
    ServiceSettingsPatch,
    SharedAccessPolicy,
    X509GroupAuthentication,
)
from ..protocol.sas import build_sas_token
from ..service_client import ServiceClient
from ._common import (
    CONTEXT,
    connected,
    echo_json,
    emit,
    etag_option,
    json_option,
    new_key,
    print_fields,
    print_table,
    read_certificate_file,
)
from ._enrollment_flags import EnumChoice

__all__ = ["ca", "hub", "policy", "settings"]


T = TypeVar("T")


def _given(value: T | None, current: T | None) -> T | None:
    """What a flag sets: ``value`` when given, else the ``current`` one."""
    return current if value is None else value


# --- hub -----------------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def hub() -> None:
    """Manage the IoT hubs devices can be assigned to.

    In `hub add` and `hub update`, --connection-string is the hub's; give the service's connection
    as --service-connection-string (or --data-dir, or the environment variables).
    """


def _print_hub(verb: str, hub: LinkedHub) -> None:
    print_fields(
        f"{verb} IoT hub {hub.host_name!r}:",
        [
            ("Allocation weight", hub.allocation_weight),
            ("Used by allocation", hub.apply_allocation_policy),
            ("Built in", hub.builtin),
            ("Location", hub.location),
            ("X.509 group devices", hub.x509_group_authentication or X509GroupAuthentication.SELF_SIGNED),
            ("Tier", f"{hub.tier.value} x {hub.units or 1}" if hub.tier else None),
            ("Write budget", _budget(hub)),
            (
                "TLS trust",
                None if hub.builtin else ("caCertificate" if hub.ca_certificate else "system store"),
            ),
            ("Etag", hub.etag),
        ],
    )


@hub.command("list")
@json_option
@connected()
def hub_list(client: ServiceClient, as_json: bool) -> None:
    """List the linked IoT hubs (their connection strings are never shown)."""
    hubs = client.hubs.list()
    if as_json:
        echo_json(hubs)
        return
    rows = (
        [h.host_name, h.allocation_weight, h.apply_allocation_policy, h.builtin or False, h.location]
        for h in hubs
    )
    print_table("Linked IoT hubs", ["Host name", "Weight", "Allocation", "Built in", "Location"], rows)


@hub.command("show")
@click.argument("host")
@click.option(
    "--stats",
    is_flag=True,
    help='For a remote hub, add the hub writer\'s figures (as `hub stats --json`) under "writer".',
)
@connected()
def hub_show(client: ServiceClient, host: str, stats: bool) -> None:
    """Print the linked IoT hub HOST as JSON (its connection string is never shown)."""
    linked = client.hubs.get(host)
    if not stats or linked.builtin:
        echo_json(linked)
        return
    echo_json({**msgspec.to_builtins(linked), "writer": msgspec.to_builtins(client.hubs.writer(host))})


@hub.command("stats")
@click.argument("host")
@json_option
@connected()
def hub_stats(client: ServiceClient, host: str, as_json: bool) -> None:
    """The hub writer's figures for the remote hub HOST, summed over the provisiond nodes since
    they were first kept: its write budget, outbox items queued, registry calls, identities
    written, throttled answers (429), retries, failures, deprovisionings."""
    emit(as_json, client.hubs.writer(host), _print_writer)


def _print_writer(report: HubWriterReport) -> None:
    budget = report.budget_per_second
    print_fields(
        f"Hub writer for {report.hub!r}:",
        [
            ("Write budget", "none (the hub's 429s pace the writes)" if budget is None else f"{budget:g}/s"),
            ("Queued", report.queued),
            ("Registry calls", f"{report.calls} ({report.bulk_calls} bulk)"),
            ("Written", report.written),
            ("Throttled (429)", report.throttled),
            ("Retried", report.retried),
            ("Failed", report.failed),
            ("Deprovisioned", report.removed),
            ("Nodes", report.nodes),
        ],
    )


def _budget(hub: LinkedHub) -> str | None:
    budget = hub.registry_write_budget()
    if hub.builtin:
        return None
    if budget is None:
        return "none (the hub's 429s pace the writes)"
    how = "given" if hub.write_budget_per_second is not None else f"tier {hub.tier.value if hub.tier else ''}"
    return f"{budget:g} registry operations/s ({how})"


def _hub_options(func: Any) -> Any:
    func = click.option(
        "--ca-certificate",
        "ca_certificate",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        metavar="PEM",
        help="A PEM file of the CA the hub's TLS certificate chains to (a hub behind a private "
        "CA) [add default: the system's trust store].",
    )(func)
    func = click.option(
        "--write-budget",
        "write_budget",
        type=click.FloatRange(min=0, min_open=True, max=100_000),
        metavar="N",
        help="Registry operations a second provisiond may spend on this hub [default: what --tier "
        "and --units allow].",
    )(func)
    func = click.option(
        "--units", type=click.IntRange(1, 200), help="The hub's units (with --tier) [add default: 1]."
    )(func)
    func = click.option(
        "--tier",
        type=EnumChoice(*HubTier),
        help="The hub's tier: its registry throttle (100 operations a minute a unit on F1, B1, B2, "
        "S1, S2; 5,000 on B3, S3) sets the write budget.",
    )(func)
    func = click.option(
        "--x509-group-authentication",
        "x509_group_authentication",
        type=EnumChoice(*X509GroupAuthentication),
        help="How X.509 group devices are created in this hub: selfSigned with the device "
        "certificate's thumbprint, as DPS does, or certificateAuthority [add default: selfSigned].",
    )(func)
    func = click.option(
        "--location", metavar="REGION", help="The hub's location (for geoLatency allocation)."
    )(func)
    func = click.option(
        "--allocation/--no-allocation",
        "allocation",
        default=None,
        help="Whether allocation policies may choose this hub [add default: yes]; "
        "enrollments naming it in --hub can still use it.",
    )(func)
    return click.option(
        "--weight", type=click.IntRange(1, 1000), help="Allocation weight, 1-1000 [add default: 1]."
    )(func)


@hub.command("add")
@click.argument("host")
@click.option(
    "--connection-string",
    "--hub-connection-string",
    "hub_connection_string",
    required=True,
    metavar="CS",
    help="The hub's connection string (HostName=...;SharedAccessKeyName=...;SharedAccessKey=...), "
    "with registry write rights.",
)
@_hub_options
@json_option
@connected(connection_string_flag=False)
def hub_add(
    client: ServiceClient,
    host: str,
    hub_connection_string: str,
    weight: int | None,
    allocation: bool | None,
    location: str | None,
    x509_group_authentication: X509GroupAuthentication | None,
    tier: HubTier | None,
    units: int | None,
    write_budget: float | None,
    ca_certificate: Path | None,
    as_json: bool,
) -> None:
    """Link the IoT hub HOST (its host name), as DPS does: provisiond reads the hub's registry
    with the connection string's policy first and refuses with the hub's error if that fails."""
    hub = LinkedHub(
        host_name=host,
        connection_string=hub_connection_string,
        allocation_weight=weight or 1,
        apply_allocation_policy=True if allocation is None else allocation,
        location=location or None,
        x509_group_authentication=x509_group_authentication,
        tier=tier,
        units=units,
        write_budget_per_second=write_budget,
        ca_certificate=read_certificate_file(ca_certificate, "--ca-certificate") if ca_certificate else None,
    )
    emit(as_json, client.hubs.put(hub), lambda d: _print_hub("Linked", d))


@hub.command("update")
@click.argument("host")
@click.option(
    "--connection-string",
    "--hub-connection-string",
    "hub_connection_string",
    metavar="CS",
    help="A new connection string for the hub [default: keep the stored one].",
)
@_hub_options
@json_option
@connected(connection_string_flag=False)
def hub_update(
    client: ServiceClient,
    host: str,
    hub_connection_string: str | None,
    weight: int | None,
    allocation: bool | None,
    location: str | None,
    x509_group_authentication: X509GroupAuthentication | None,
    tier: HubTier | None,
    units: int | None,
    write_budget: float | None,
    ca_certificate: Path | None,
    as_json: bool,
) -> None:
    """Change a linked hub (read, modify, write back with its etag; a new connection string or
    CA certificate is checked against the hub first)."""
    changes = (
        hub_connection_string,
        weight,
        allocation,
        location,
        x509_group_authentication,
        tier,
        units,
        write_budget,
        ca_certificate,
    )
    if all(change is None for change in changes):
        raise click.UsageError(
            "Nothing to change: give --connection-string, --weight, --[no-]allocation, --location, "
            "--x509-group-authentication, --tier, --units, --write-budget or --ca-certificate."
        )
    ca_pem = read_certificate_file(ca_certificate, "--ca-certificate") if ca_certificate else None

    def change(hub: LinkedHub) -> LinkedHub:
        return msgspec.structs.replace(
            hub,
            connection_string=_given(hub_connection_string, hub.connection_string),
            allocation_weight=_given(weight, hub.allocation_weight),
            apply_allocation_policy=_given(allocation, hub.apply_allocation_policy),
            location=_given(location, hub.location),
            x509_group_authentication=_given(x509_group_authentication, hub.x509_group_authentication),
            tier=_given(tier, hub.tier),
            units=_given(units, hub.units),
            write_budget_per_second=_given(write_budget, hub.write_budget_per_second),
            ca_certificate=_given(ca_pem, hub.ca_certificate),
        )

    emit(as_json, client.hubs.modify(host, change), lambda d: _print_hub("Updated", d))


@hub.command("remove")
@click.argument("host")
@etag_option
@connected()
def hub_remove(client: ServiceClient, host: str, etag: str | None) -> None:
    """Unlink the IoT hub HOST (the built-in hub cannot be removed; use --no-allocation)."""
    client.hubs.delete(host, if_match=etag)
    click.echo(f"Unlinked IoT hub {host!r}.")


# --- ca ------------------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def ca() -> None:
    """Manage CA certificates and their proof of possession (for X.509 enrollment groups)."""


def _print_ca(verb: str, ca: CaCertificate) -> None:
    print_fields(
        f"{verb} CA certificate {ca.name!r}:",
        [
            ("Subject", ca.subject),
            ("Verified", bool(ca.is_verified)),
            ("SHA-1 thumbprint", ca.thumbprint),
            ("Expires", ca.expiry),
            ("Verification code", ca.verification_code),
        ],
    )


@ca.command("list")
@json_option
@connected()
def ca_list(client: ServiceClient, as_json: bool) -> None:
    """List the CA certificates."""
    cas = client.certificates.list()
    if as_json:
        echo_json(cas)
        return
    rows = ([c.name, c.subject, bool(c.is_verified), c.thumbprint, c.expiry] for c in cas)
    print_table("CA certificates", ["Name", "Subject", "Verified", "SHA-1 thumbprint", "Expires"], rows)


@ca.command("show")
@click.argument("name")
@connected()
def ca_show(client: ServiceClient, name: str) -> None:
    """Print the CA certificate NAME as JSON."""
    echo_json(client.certificates.get(name))


@ca.command("upload")
@click.argument("name")
@click.argument("pem_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--verified", is_flag=True, help="Mark it verified without proof of possession.")
@click.option(
    "--replace", is_flag=True, help="Replace a CA certificate of that name (it becomes unverified)."
)
@json_option
@connected()
def ca_upload(
    client: ServiceClient, name: str, pem_file: Path, verified: bool, replace: bool, as_json: bool
) -> None:
    """Upload the CA certificate in PEM_FILE as NAME. Then prove you hold its key
    (`provisiond ca prove`, or verification-code + verify) unless --verified."""
    upload = CertificateUpload(certificate=read_certificate_file(pem_file, "PEM_FILE"), is_verified=verified)
    result = client.certificates.upload(name, upload, if_match="*" if replace else None)
    emit(as_json, result, lambda d: _print_ca("Uploaded", d))


@ca.command("verification-code")
@click.argument("name")
@json_option
@connected()
def ca_verification_code(client: ServiceClient, name: str, as_json: bool) -> None:
    """Print a fresh verification code for NAME: sign a certificate whose subject CN is the code
    with the CA's key, then `provisiond ca verify NAME CERT`."""
    result = client.certificates.generate_verification_code(name)
    emit(as_json, result, lambda d: click.echo(d.verification_code))


@ca.command("verify")
@click.argument("name")
@click.argument("pem_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@json_option
@connected()
def ca_verify(client: ServiceClient, name: str, pem_file: Path, as_json: bool) -> None:
    """Verify NAME with the proof-of-possession certificate in PEM_FILE (subject CN = the
    verification code, signed by the CA)."""
    result = client.certificates.verify(name, read_certificate_file(pem_file, "PEM_FILE"))
    emit(as_json, result, lambda d: _print_ca("Verified", d))


@ca.command("prove")
@click.argument("name")
@click.option(
    "--ca-key-prefix",
    required=True,
    type=click.Path(path_type=Path),
    metavar="PREFIX",
    help="The CA as written by `provisiond pki`: PREFIX.pem and PREFIX.key.",
)
@json_option
@connected()
def ca_prove(client: ServiceClient, name: str, ca_key_prefix: Path, as_json: bool) -> None:
    """The whole proof of possession in one step: get a verification code, sign the verification
    certificate with the CA's key (PREFIX.key), and verify NAME with it."""
    issued = pki.read_issued(ca_key_prefix)
    stored = client.certificates.get(name)
    local = str(pki.certificate_info(issued.cert)["sha256Thumbprint"])
    if (stored.sha256_thumbprint or "").upper() != local:
        raise click.ClickException(
            f"{pki.cert_path(ca_key_prefix)} is not the CA certificate uploaded as {name!r} "
            f"(SHA-256 {local} vs {stored.sha256_thumbprint})."
        )
    code = client.certificates.generate_verification_code(name).verification_code
    assert code is not None, "the service answered generateVerificationCode without a code"
    proof = pki.make_verification_cert(code, issued)
    result = client.certificates.verify(name, proof.cert.public_bytes(Encoding.PEM).decode("ascii"))
    emit(as_json, result, lambda d: _print_ca("Verified", d))


@ca.command("delete")
@click.argument("name")
@etag_option
@connected()
def ca_delete(client: ServiceClient, name: str, etag: str | None) -> None:
    """Delete the CA certificate NAME."""
    client.certificates.delete(name, if_match=etag)
    click.echo(f"Deleted CA certificate {name!r}.")


# --- policy --------------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def policy() -> None:
    """Manage shared access policies: named keys with rights on the service API."""


_RIGHTS = {right.value.lower(): right for right in Right}


def _parse_rights(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[Right] | None:
    """Every right of every --rights (each comma-separated, any case); None when there is none."""
    if not value:
        return None
    names = [n for item in value for n in item.replace(";", ",").replace(" ", ",").split(",") if n]
    unknown = [n for n in names if n.lower() not in _RIGHTS]
    if unknown or not names:
        raise click.BadParameter(
            f"unknown right(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(r.value for r in Right)}"
        )
    return sorted({_RIGHTS[n.lower()] for n in names}, key=lambda right: right.value)


def _rights_option(required: bool) -> Callable[[Any], Any]:
    return click.option(
        "--rights",
        callback=_parse_rights,
        required=required,
        multiple=True,
        metavar="R1,R2",
        help="Rights, comma-separated or repeated (--rights A --rights B): "
        + ", ".join(r.value for r in Right)
        + ".",
    )


def _without_keys(policy: SharedAccessPolicy) -> SharedAccessPolicy:
    return msgspec.structs.replace(policy, primary_key=None, secondary_key=None)


def _print_policy(verb: str, policy: SharedAccessPolicy) -> None:
    print_fields(
        f"{verb} shared access policy {policy.key_name!r}:",
        [
            ("Rights", policy.rights),
            ("Primary key", policy.primary_key),
            ("Secondary key", policy.secondary_key),
            ("Etag", policy.etag),
        ],
    )


@policy.command("list")
@json_option
@connected()
def policy_list(client: ServiceClient, as_json: bool) -> None:
    """List the shared access policies (without keys)."""
    policies = client.policies.list()
    if as_json:
        echo_json(policies)
        return
    print_table("Shared access policies", ["Name", "Rights"], ([p.key_name, p.rights] for p in policies))


@policy.command("show")
@click.argument("name")
@click.option("--keys", is_flag=True, help="Include the policy's keys.")
@connected()
def policy_show(client: ServiceClient, name: str, keys: bool) -> None:
    """Print the policy NAME as JSON."""
    echo_json(client.policies.get(name, keys=keys))


@policy.command("create")
@click.argument("name")
@_rights_option(required=True)
@click.option("--primary-key", metavar="KEY", help="Primary key (base64) [default: generated].")
@click.option("--secondary-key", metavar="KEY", help="Secondary key (base64) [default: generated].")
@json_option
@connected()
def policy_create(
    client: ServiceClient,
    name: str,
    rights: list[Right],
    primary_key: str | None,
    secondary_key: str | None,
    as_json: bool,
) -> None:
    """Create the policy NAME with --rights. Its keys are generated unless given; print a
    connection string with `provisiond policy connection-string NAME`."""
    new = SharedAccessPolicy(
        key_name=name, rights=rights, primary_key=primary_key or None, secondary_key=secondary_key or None
    )
    result = _without_keys(client.policies.put(new))
    emit(as_json, result, lambda d: _print_policy("Created", d))


@policy.command("update")
@click.argument("name")
@_rights_option(required=False)
@click.option("--primary-key", metavar="KEY", help="New primary key (base64).")
@click.option("--secondary-key", metavar="KEY", help="New secondary key (base64).")
@click.option("--regenerate-primary", is_flag=True, help="Replace the primary key with a fresh random one.")
@click.option(
    "--regenerate-secondary", is_flag=True, help="Replace the secondary key with a fresh random one."
)
@json_option
@connected()
def policy_update(
    client: ServiceClient,
    name: str,
    rights: list[Right] | None,
    primary_key: str | None,
    secondary_key: str | None,
    regenerate_primary: bool,
    regenerate_secondary: bool,
    as_json: bool,
) -> None:
    """Change the rights or keys of the policy NAME (read, modify, write back with its etag).
    Keys not named stay as they are; connection strings made with a replaced key stop working."""
    if regenerate_primary and primary_key or regenerate_secondary and secondary_key:
        raise click.UsageError("Give a key or ask to regenerate it, not both.")
    primary = new_key() if regenerate_primary else primary_key
    secondary = new_key() if regenerate_secondary else secondary_key
    if rights is None and primary is None and secondary is None:
        raise click.UsageError(
            "Nothing to change: give --rights, a key, or --regenerate-primary/--regenerate-secondary."
        )

    def change(policy: SharedAccessPolicy) -> SharedAccessPolicy:
        return msgspec.structs.replace(
            policy,
            rights=_given(rights, policy.rights),
            primary_key=_given(primary, policy.primary_key),
            secondary_key=_given(secondary, policy.secondary_key),
        )

    result = _without_keys(client.policies.modify(name, change))
    emit(as_json, result, lambda d: _print_policy("Updated", d))


@policy.command("delete")
@click.argument("name")
@etag_option
@connected()
def policy_delete(client: ServiceClient, name: str, etag: str | None) -> None:
    """Delete the policy NAME (the last policy with ServiceConfig cannot be deleted)."""
    client.policies.delete(name, if_match=etag)
    click.echo(f"Deleted shared access policy {name!r}.")


@policy.command("connection-string")
@click.argument("name")
@click.option("--secondary", is_flag=True, help="Use the policy's secondary key.")
@connected()
def policy_connection_string(client: ServiceClient, name: str, secondary: bool) -> None:
    """Print a connection string for this service signed with the policy NAME's key."""
    keys = client.policies.get(name, keys=True)
    key = keys.secondary_key if secondary else keys.primary_key
    click.echo(
        f"HostName={client.connection.host};SharedAccessKeyName={keys.key_name or name};SharedAccessKey={key}"
    )


@policy.command("sas-token")
@click.argument("name")
@click.option("--secondary", is_flag=True, help="Sign with the policy's secondary key.")
@click.option(
    "--ttl",
    type=click.IntRange(1, 365 * 24 * 3600),
    default=3600,
    show_default=True,
    metavar="SECONDS",
    help="How long the token is valid.",
)
@connected()
def policy_sas_token(client: ServiceClient, name: str, secondary: bool, ttl: int) -> None:
    """Print a SAS token for this service's REST API signed with the policy NAME's key, for an
    Authorization header (curl -H "Authorization: $(provisiond policy sas-token NAME ...)")."""
    keys = client.policies.get(name, keys=True)
    key = keys.secondary_key if secondary else keys.primary_key
    if not key:
        raise click.ClickException(
            f"The policy {name!r} has no {'secondary' if secondary else 'primary'} key."
        )
    expiry = int(time.time()) + ttl
    click.echo(build_sas_token(client.connection.host, key, expiry, key_name=keys.key_name or name))


# --- settings ------------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def settings() -> None:
    """Show or change the service settings (ID scope, default allocation policy)."""


@settings.command("show")
@connected()
def settings_show(client: ServiceClient) -> None:
    """Print the service settings as JSON (idScope is what devices need)."""
    echo_json(client.settings.get())


@settings.command("set")
@click.option(
    "--allocation-policy",
    type=EnumChoice(AllocationPolicy.HASHED, AllocationPolicy.STATIC, AllocationPolicy.GEO_LATENCY),
    help="Default allocation policy for enrollments that set none.",
)
@click.option(
    "--id-scope", metavar="SCOPE", help="The ID scope ('0ne' and 8 hex digits); devices must use the new one."
)
@connected()
def settings_set(
    client: ServiceClient, allocation_policy: AllocationPolicy | None, id_scope: str | None
) -> None:
    """Change service settings; prints the result as JSON."""
    if allocation_policy is None and not id_scope:
        raise click.UsageError("Nothing to change: give --allocation-policy or --id-scope.")
    patch = ServiceSettingsPatch(id_scope=id_scope or None, allocation_policy=allocation_policy)
    echo_json(client.settings.update(patch))
