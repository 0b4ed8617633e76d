"""``provisiond device``: act as a device against a provisioning service (any DPS-compatible one).

``device register`` builds a security provider from the flags, registers with the public
client (:mod:`provisiond.device`) and prints the outcome. The service is found through
``--data-dir`` (the ``connection.json`` a local ``provisiond serve`` writes) or
``--endpoint``/``--id-scope``/``--ca-file``; flags win over the file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import msgspec
from rich.table import Table

from ..device import ProvisioningDeviceClient, RegistrationResult, RetryPolicy, TransportKind
from ..device.security import SecurityProvider, SymmetricKeySecurity, X509Security
from ._common import CONTEXT, DATA_DIR_ENV, console, echo_json, json_option, load_json_arg

__all__ = ["device"]

_EXISTING_FILE = click.Path(dir_okay=False, exists=True, path_type=Path)


@click.group(context_settings=CONTEXT)
def device() -> None:
    """Act as a device: register with a provisioning service over its device API.

    \b
    Typical use against a local `provisiond serve --data-dir DIR`:
      provisiond device register --data-dir DIR --registration-id dev-1 --symmetric-key KEY
      provisiond device register --data-dir DIR --registration-id dev-2 --group-key GROUPKEY
      provisiond device register --data-dir DIR --cert certs/dev-3-chain.pem --key certs/dev-3.key
      provisiond device register --data-dir DIR --pkcs12 dev-4.pfx --password secret
      provisiond device register --data-dir DIR --tpm swtpm:host=127.0.0.1,port=2321
    """


@dataclass(frozen=True)
class _Service:
    endpoint: str
    id_scope: str
    ca_file: Path | None


def _service(
    data_dir: Path | None,
    endpoint: str | None,
    id_scope: str | None,
    ca_file: Path | None,
    transport: TransportKind = TransportKind.HTTPS,
) -> _Service:
    info: dict[str, Any] = {}
    if data_dir is not None:
        path = data_dir / "connection.json"
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise click.BadParameter(
                f"cannot read {path} ({exc}); is `provisiond serve --data-dir {data_dir}` running?",
                param_hint="--data-dir",
            ) from None
        info = loaded if isinstance(loaded, dict) else {}
    if not endpoint and transport is TransportKind.MQTT and info.get("host") and info.get("mqttPort"):
        endpoint = f"{info['host']}:{info['mqttPort']}"  # MQTT over WebSockets shares the HTTPS port
    if not endpoint and transport is TransportKind.AMQP and info.get("host") and info.get("amqpPort"):
        endpoint = f"{info['host']}:{info['amqpPort']}"  # so does AMQP over WebSockets
    endpoint = endpoint or info.get("globalEndpoint")
    id_scope = id_scope or info.get("idScope")
    if not endpoint or not id_scope:
        raise click.UsageError(
            "No service to register with: give --data-dir DIR (its connection.json names the service), "
            "or --endpoint HOST:PORT and --id-scope SCOPE."
        )
    ca = ca_file or (Path(info["caCertificate"]) if info.get("caCertificate") else None)
    return _Service(str(endpoint), str(id_scope), ca)


def _security(
    *,
    registration_id: str | None,
    symmetric_key: str | None,
    group_key: str | None,
    cert: Path | None,
    key: Path | None,
    chain: Path | None,
    key_password: str | None,
    pkcs12: Path | None,
    password: str | None,
    tpm: str | None = None,
) -> SecurityProvider:
    chosen = [name for name, value in (("--symmetric-key", symmetric_key), ("--group-key", group_key),
                                       ("--cert", cert), ("--pkcs12", pkcs12), ("--tpm", tpm)) if value is not None]  # fmt: skip
    if len(chosen) != 1:
        raise click.UsageError(
            "Give exactly one attestation: --symmetric-key KEY, --group-key KEY (each with --registration-id), "
            "--cert PEM --key PEM, --pkcs12 FILE, or --tpm TCTI."
            + (f" Got {', '.join(chosen)}." if chosen else "")
        )
    if tpm is not None:
        from ..device.tpm import TpmSecurity  # the tpm extra; imported only when asked for

        return TpmSecurity(tcti=tpm, registration_id=registration_id)
    if cert is None and (key or chain or key_password):
        raise click.UsageError("--key, --chain and --key-password go with --cert.")
    if pkcs12 is None and password is not None:
        raise click.UsageError("--password goes with --pkcs12 (a PEM key's password is --key-password).")
    if symmetric_key is not None or group_key is not None:
        if not registration_id:
            raise click.UsageError(f"{chosen[0]} needs --registration-id.")
        if group_key is not None:
            return SymmetricKeySecurity.from_group_key(registration_id=registration_id, group_key=group_key)
        assert symmetric_key is not None
        return SymmetricKeySecurity(registration_id=registration_id, symmetric_key=symmetric_key)
    if cert is not None:
        if key is None:
            raise click.UsageError("--cert needs --key (the device's private key, PEM).")
        return X509Security.from_pem_files(
            cert, key, chain_file=chain, password=key_password, registration_id=registration_id
        )
    assert pkcs12 is not None
    return X509Security.from_pkcs12(pkcs12, password, registration_id=registration_id)


def _document(registration_id: str, result: RegistrationResult) -> dict[str, Any]:
    return {
        "registrationId": registration_id,
        "status": result.status.value,
        "assignedHub": result.assigned_hub,
        "deviceId": result.device_id,
        "substatus": result.substatus.value if result.substatus else None,
        "payload": result.payload,
        "operationId": result.operation_id,
        "registrationState": msgspec.to_builtins(result.registration_state),
    }


def _print_result(doc: dict[str, Any]) -> None:
    table = Table(title="Registration result", title_justify="left", show_header=False)
    table.add_column("Field", style="bold")
    table.add_column("Value", overflow="fold")
    rows = [
        ("Status", doc["status"]),
        ("Assigned hub", doc["assignedHub"]),
        ("Device ID", doc["deviceId"]),
        ("Substatus", doc["substatus"]),
        ("Payload", None if doc["payload"] is None else json.dumps(doc["payload"])),
        ("Registration ID", doc["registrationId"]),
        ("Operation ID", doc["operationId"]),
    ]
    for name, value in rows:
        table.add_row(name, "" if value is None else str(value))
    console().print(table)


@device.command("register")
@click.option(
    "--data-dir",
    envvar=DATA_DIR_ENV,
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Data directory of a local `provisiond serve`: endpoint, ID scope and CA come from its "
    f"connection.json. [env {DATA_DIR_ENV}]",
)
@click.option("--endpoint", metavar="HOST:PORT", help="The service's global device endpoint.")
@click.option("--id-scope", metavar="SCOPE", help="The service's ID scope.")
@click.option(
    "--ca-file",
    type=_EXISTING_FILE,
    help="CA certificate (PEM) to trust for the service's TLS certificate "
    "[default: caCertificate of connection.json, else the system trust store]",
)
@click.option(
    "--registration-id", metavar="ID", help="Registration id [X.509 default: the certificate's CN]."
)
@click.option("--symmetric-key", metavar="KEY", help="Symmetric key attestation: the device's key (base64).")
@click.option(
    "--group-key", metavar="KEY", help="Group symmetric key (base64); the device key is derived from it."
)
@click.option(
    "--cert", type=_EXISTING_FILE, help="X.509: device certificate (PEM), optionally followed by its chain."
)
@click.option("--key", type=_EXISTING_FILE, help="X.509: the device's private key (PEM).")
@click.option("--chain", type=_EXISTING_FILE, help="X.509: intermediate CA certificates to present (PEM).")
@click.option(
    "--key-password", metavar="PASSWORD", envvar="PROVISIOND_KEY_PASSWORD", help="Password of --key."
)
@click.option(
    "--pkcs12", type=_EXISTING_FILE, help="X.509: PKCS#12 file with the key, certificate and chain."
)
@click.option(
    "--password", metavar="PASSWORD", envvar="PROVISIOND_PKCS12_PASSWORD", help="Password of --pkcs12."
)
@click.option(
    "--tpm",
    metavar="TCTI",
    help="TPM 2.0: how to reach the device's TPM (device:/dev/tpmrm0, swtpm:host=H,port=P, mssim:...); "
    "the registration id defaults to the one derived from its EK (`provisiond tpm ek`).",
)
@click.option("--payload", metavar="JSON|@FILE", help="Custom data for the service's allocation.")
@click.option(
    "--force",
    is_flag=True,
    help="Send DPS's forceRegistration flag (no effect: every register re-runs the assignment).",
)
@click.option(
    "--transport",
    type=click.Choice([kind.value for kind in TransportKind]),
    default=TransportKind.HTTPS.value,
    show_default=True,
    help="The device protocol: HTTPS, MQTT over TLS (with --data-dir: the server's mqttPort; else "
    "--endpoint's port, default 8883), MQTT over WebSockets (the HTTPS port, default 443), AMQP over TLS "
    "(the server's amqpPort, or --endpoint's port, default 5671) or AMQP over WebSockets (the HTTPS port).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Seconds the whole registration (retries and polls included) may take.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every request and decision to stderr.")
@json_option
def register(
    data_dir: Path | None,
    endpoint: str | None,
    id_scope: str | None,
    ca_file: Path | None,
    registration_id: str | None,
    symmetric_key: str | None,
    group_key: str | None,
    cert: Path | None,
    key: Path | None,
    chain: Path | None,
    key_password: str | None,
    pkcs12: Path | None,
    password: str | None,
    tpm: str | None,
    payload: str | None,
    force: bool,
    transport: str,
    timeout: float,
    verbose: bool,
    as_json: bool,
) -> None:
    """Register a device and print where it was assigned.

    Exactly one attestation: --symmetric-key or --group-key (with --registration-id),
    --cert and --key (X.509, PEM), --pkcs12 (X.509), or --tpm (TPM 2.0).

    When the registration fails, the error is printed on stderr, with the DPS errorCode (and the
    trackingId the service logged it under) when the service answered, and the exit status is 1.
    Flags that cannot work (no attestation or two, a key that is not base64, an unreadable
    certificate or key) exit with 2 before anything is sent.
    """
    if verbose:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for name in ("provisiond.device", "provisiond.protocol"):
            logging.getLogger(name).setLevel(logging.DEBUG)
    service = _service(data_dir, endpoint, id_scope, ca_file, TransportKind(transport))
    data = load_json_arg(payload, "--payload") if payload is not None else None
    try:
        security = _security(
            registration_id=registration_id,
            symmetric_key=symmetric_key,
            group_key=group_key,
            cert=cert,
            key=key,
            chain=chain,
            key_password=key_password,
            pkcs12=pkcs12,
            password=password,
            tpm=tpm,
        )
        with ProvisioningDeviceClient.create(
            service.endpoint,
            service.id_scope,
            security,
            TransportKind(transport),
            ca_file=service.ca_file,
            retry=RetryPolicy(total_timeout=timeout),
        ) as client:
            result = client.register(data, force=force)
    except ValueError as exc:  # a malformed endpoint or registration id
        raise click.UsageError(str(exc)) from exc
    doc = _document(security.registration_id, result)
    if as_json:
        echo_json(doc)
    else:
        _print_result(doc)
