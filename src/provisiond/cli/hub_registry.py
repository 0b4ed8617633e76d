"""``provisiond hub device ...`` and ``provisiond hub policy ...``: a built-in hub's identities and
its shared access policies, through provisiond's ``/admin`` API (as ``az iot hub device-identity``
and ``az iot hub policy`` do for Azure's hubs). Added to the ``hub`` group by
:mod:`provisiond.cli.manage`.

Every command takes ``--hub HOST``; without it, the first built-in hub the service links.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import click

from ..service_client import ServiceClient, seg
from ._common import (
    CONTEXT,
    builtin_hub,
    connected,
    echo_json,
    emit,
    etag_option,
    json_option,
    print_fields,
    print_table,
)

__all__ = ["hub_device", "hub_policy"]

_RIGHTS = ["RegistryRead", "RegistryWrite", "ServiceConnect", "DeviceConnect"]


def _hub_option(func: Any) -> Any:
    return click.option(
        "--hub", "hub_name", metavar="HOST", help="The built-in hub [default: the first built-in hub]."
    )(func)


def _base(client: ServiceClient, hub: str | None) -> str:
    return f"/admin/linkedHubs/{seg(builtin_hub(client, hub))}"


def _endpoint(client: ServiceClient, hub: str) -> str:
    """How clients name ``hub``: its host name, with the service's port when it is not 443."""
    _, sep, port = client.connection.host.rpartition(":")
    return f"{hub}:{port}" if sep and port.isdigit() and port != "443" else hub


# --- hub device ----------------------------------------------------------------------------------


@click.group("device", context_settings=CONTEXT)
def hub_device() -> None:
    """Manage the device identities of a built-in hub (those DPS assigned, and those made here)."""


def _devices(client: ServiceClient, base: str) -> Iterator[dict[str, Any]]:
    continuation: str | None = None
    while True:
        headers = {"x-ms-continuation": continuation} if continuation else None
        response = client.request("GET", f"{base}/devices", headers=headers)
        yield from response.json()
        continuation = response.headers.get("x-ms-continuation")
        if not continuation:
            return


@hub_device.command("list")
@_hub_option
@json_option
@connected()
def device_list(client: ServiceClient, hub_name: str | None, as_json: bool) -> None:
    """List the identities of a built-in hub (keys left out)."""
    devices = list(_devices(client, _base(client, hub_name)))
    if as_json:
        echo_json(devices)
        return
    print_table(
        "Device identities",
        ["Device id", "Status", "Authentication", "Connection", "Last activity"],
        (
            [
                d["deviceId"],
                d.get("status"),
                d.get("authentication", {}).get("type"),
                d.get("connectionState"),
                d.get("lastActivityTime"),
            ]
            for d in devices
        ),
    )


@hub_device.command("show")
@click.argument("device_id")
@_hub_option
@connected()
def device_show(client: ServiceClient, device_id: str, hub_name: str | None) -> None:
    """Print the identity DEVICE_ID with its twin as JSON (keys left out)."""
    echo_json(client.get(f"{_base(client, hub_name)}/devices/{seg(device_id)}"))


@hub_device.command("create")
@click.argument("device_id")
@_hub_option
@click.option("--primary-key", metavar="KEY", help="Primary symmetric key (base64) [default: generated].")
@click.option("--secondary-key", metavar="KEY", help="Secondary symmetric key (base64) [default: generated].")
@click.option(
    "--x509-thumbprint",
    metavar="HEX",
    help="Authenticate with an X.509 certificate (selfSigned): its SHA-1 or SHA-256 thumbprint.",
)
@click.option(
    "--secondary-thumbprint", metavar="HEX", help="A second accepted thumbprint (with --x509-thumbprint)."
)
@click.option("--disabled", is_flag=True, help="Create the identity disabled (it cannot connect).")
@click.option("--edge", is_flag=True, help="Mark it an IoT Edge device (capabilities.iotEdge).")
@json_option
@connected()
def device_create(
    client: ServiceClient,
    device_id: str,
    hub_name: str | None,
    primary_key: str | None,
    secondary_key: str | None,
    x509_thumbprint: str | None,
    secondary_thumbprint: str | None,
    disabled: bool,
    edge: bool,
    as_json: bool,
) -> None:
    """Create the identity DEVICE_ID in a built-in hub (as `az iot hub device-identity create`);
    print it with its keys and, for a key, the device's connection string."""
    if x509_thumbprint and (primary_key or secondary_key):
        raise click.UsageError("Give keys or --x509-thumbprint, not both.")
    if secondary_thumbprint and not x509_thumbprint:
        raise click.UsageError("--secondary-thumbprint goes with --x509-thumbprint.")
    authentication: dict[str, Any]
    if x509_thumbprint:
        thumbprints = {"primaryThumbprint": x509_thumbprint, "secondaryThumbprint": secondary_thumbprint}
        authentication = {
            "type": "selfSigned",
            "x509Thumbprint": {k: v for k, v in thumbprints.items() if v},
        }
    else:
        keys = {"primaryKey": primary_key, "secondaryKey": secondary_key}
        authentication = {"type": "sas", "symmetricKey": {k: v for k, v in keys.items() if v}}
    body: dict[str, Any] = {
        "deviceId": device_id,
        "status": "disabled" if disabled else "enabled",
        "authentication": authentication,
    }
    if edge:
        body["capabilities"] = {"iotEdge": True}
    hub = builtin_hub(client, hub_name)
    device = client.put(f"/admin/linkedHubs/{seg(hub)}/devices/{seg(device_id)}", body)
    if as_json:
        echo_json(device)
        return
    key = (device.get("authentication", {}).get("symmetricKey") or {}).get("primaryKey")
    print_fields(
        f"Created device {device_id!r} in IoT hub {hub!r}:",
        [
            ("Status", device.get("status")),
            ("Authentication", device.get("authentication", {}).get("type")),
            ("Primary key", key),
            (
                "Secondary key",
                (device.get("authentication", {}).get("symmetricKey") or {}).get("secondaryKey"),
            ),
            (
                "Connection string",
                f"HostName={_endpoint(client, hub)};DeviceId={device_id};SharedAccessKey={key}"
                if key
                else None,
            ),
            ("Etag", device.get("etag")),
        ],
    )


@hub_device.command("delete")
@click.argument("device_id")
@_hub_option
@etag_option
@connected()
def device_delete(client: ServiceClient, device_id: str, hub_name: str | None, etag: str | None) -> None:
    """Delete the identity DEVICE_ID (a connected device is disconnected; a DPS registration
    record stays, and the device's next registration creates the identity again)."""
    client.delete(f"{_base(client, hub_name)}/devices/{seg(device_id)}", if_match=etag)
    click.echo(f"Deleted device {device_id!r}.")


# --- hub policy ----------------------------------------------------------------------------------


@click.group("policy", context_settings=CONTEXT)
def hub_policy() -> None:
    """Manage a built-in hub's shared access policies (iothubowner, service, registryRead, ...),
    which sign the hub's service API requests (the connection strings of the service SDKs)."""


@hub_policy.command("list")
@_hub_option
@json_option
@connected()
def policy_list(client: ServiceClient, hub_name: str | None, as_json: bool) -> None:
    """List the hub's policies (without keys)."""
    policies = client.get(f"{_base(client, hub_name)}/sharedAccessPolicies")
    if as_json:
        echo_json(policies)
        return
    print_table(
        "Hub shared access policies", ["Name", "Rights"], ([p["keyName"], p["rights"]] for p in policies)
    )


@hub_policy.command("show")
@click.argument("name")
@_hub_option
@click.option("--keys", is_flag=True, help="Include the policy's keys.")
@connected()
def policy_show(client: ServiceClient, name: str, hub_name: str | None, keys: bool) -> None:
    """Print the hub's policy NAME as JSON."""
    path = f"{_base(client, hub_name)}/sharedAccessPolicies/{seg(name)}"
    echo_json(client.post(f"{path}/listKeys") if keys else client.get(path))


@hub_policy.command("connection-string")
@click.argument("name", default="iothubowner")
@_hub_option
@connected()
def policy_connection_string(client: ServiceClient, name: str, hub_name: str | None) -> None:
    """Print the hub's service connection string for the policy NAME [default: iothubowner], for
    the official service SDKs (azure-iot-hub, azure-iothub) and scripts."""
    hub = builtin_hub(client, hub_name)
    policy = client.post(f"/admin/linkedHubs/{seg(hub)}/sharedAccessPolicies/{seg(name)}/listKeys")
    click.echo(
        f"HostName={_endpoint(client, hub)};SharedAccessKeyName={policy['keyName']};"
        f"SharedAccessKey={policy['primaryKey']}"
    )


@hub_policy.command("create")
@click.argument("name")
@_hub_option
@click.option(
    "--rights",
    required=True,
    metavar="RIGHT[,RIGHT...]",
    help="Comma-separated: " + ", ".join(_RIGHTS) + " (RegistryWrite implies RegistryRead).",
)
@click.option("--primary-key", metavar="KEY", help="Primary key (base64) [default: generated].")
@click.option("--secondary-key", metavar="KEY", help="Secondary key (base64) [default: generated].")
@json_option
@connected()
def policy_create(
    client: ServiceClient,
    name: str,
    hub_name: str | None,
    rights: str,
    primary_key: str | None,
    secondary_key: str | None,
    as_json: bool,
) -> None:
    """Create the hub's policy NAME with --rights (keys generated unless given)."""
    wanted = [r.strip() for r in rights.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in _RIGHTS]
    if unknown or not wanted:
        raise click.UsageError(f"--rights takes {', '.join(_RIGHTS)}; not {', '.join(unknown) or 'nothing'}.")
    body = {"keyName": name, "rights": wanted, "primaryKey": primary_key, "secondaryKey": secondary_key}
    made = client.put(
        f"{_base(client, hub_name)}/sharedAccessPolicies/{seg(name)}", {k: v for k, v in body.items() if v}
    )
    shown = {k: v for k, v in made.items() if k not in ("primaryKey", "secondaryKey")}
    emit(
        as_json,
        shown,
        lambda d: print_fields(
            f"Created hub policy {name!r}:", [("Rights", d["rights"]), ("Etag", d.get("etag"))]
        ),
    )


@hub_policy.command("delete")
@click.argument("name")
@_hub_option
@etag_option
@connected()
def policy_delete(client: ServiceClient, name: str, hub_name: str | None, etag: str | None) -> None:
    """Delete the hub's policy NAME (requests signed with its keys stop working at once)."""
    client.delete(f"{_base(client, hub_name)}/sharedAccessPolicies/{seg(name)}", if_match=etag)
    click.echo(f"Deleted hub policy {name!r}.")
