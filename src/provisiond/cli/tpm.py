"""``provisiond tpm``: operator tools for TPM 2.0 devices.

``tpm ek`` prints what enrolling a TPM device takes: its endorsement key (the base64
TPM2B_PUBLIC DPS enrollments hold) and the registration id the device SDKs derive from it.
``tpm srk`` prints the storage root key, which an enrollment may name too. Both read the keys at
the standard persistent handles and create them from the standard templates if missing, as the
device will (device-protocol.md §5.4). Needs the ``tpm`` extra (tpm2-pytss).
"""

from __future__ import annotations

from typing import Any

import click

from ..device.tpm import DEFAULT_TCTI, TpmSecurity
from ._common import CONTEXT, echo_json, json_option, print_fields

__all__ = ["tpm"]

_tcti_option = click.option(
    "--tcti",
    envvar="PROVISIOND_TCTI",
    default=DEFAULT_TCTI,
    show_default=True,
    metavar="TCTI",
    help="How to reach the TPM: device:/dev/tpmrm0 (hardware), swtpm:host=H,port=P or mssim:host=H,port=P "
    "(simulators), tabrmd: (access broker). [env PROVISIOND_TCTI]",
)


@click.group(context_settings=CONTEXT)
def tpm() -> None:
    """Read a TPM's identity, to enroll the device it is in.

    \b
      provisiond tpm ek --tcti device:/dev/tpmrm0
      provisiond enrollment create REGISTRATION_ID --tpm-ek EK --data-dir DIR
      provisiond device register --data-dir DIR --tpm device:/dev/tpmrm0
    """


def _keys(tcti: str) -> dict[str, Any]:
    with TpmSecurity(tcti=tcti) as security:
        return {
            "registrationId": security.registration_id,
            "endorsementKey": security.endorsement_key_b64,
            "storageRootKey": security.storage_root_key_b64,
            "tcti": tcti,
        }


@tpm.command("ek")
@_tcti_option
@json_option
def ek(tcti: str, as_json: bool) -> None:
    """Print the endorsement key (base64 TPM2B_PUBLIC) and the registration id derived from it.

    The EK is read at 0x81010001, or created there from the TCG default RSA-2048 template.
    """
    doc = _keys(tcti)
    if as_json:
        echo_json({k: doc[k] for k in ("registrationId", "endorsementKey", "tcti")})
        return
    print_fields(
        "TPM endorsement key",
        [("Registration ID", doc["registrationId"]), ("Endorsement key", doc["endorsementKey"])],
    )
    # DIR as in the group's help: this runs where the TPM is, which knows no service to name
    click.echo(
        "\nEnroll it with (DIR: the --data-dir of the `provisiond serve` to enroll it in):\n"
        f"  provisiond enrollment create {doc['registrationId']} --tpm-ek {doc['endorsementKey']}"
        " --data-dir DIR"
    )


@tpm.command("srk")
@_tcti_option
@json_option
def srk(tcti: str, as_json: bool) -> None:
    """Print the storage root key (base64 TPM2B_PUBLIC).

    Optional in an enrollment (--tpm-srk): when enrolled, registration fails once the SRK changes
    (e.g. after the TPM is cleared). Read at 0x81000001, or created there if missing.
    """
    doc = _keys(tcti)
    if as_json:
        echo_json({k: doc[k] for k in ("registrationId", "storageRootKey", "tcti")})
        return
    print_fields(
        "TPM storage root key",
        [("Registration ID", doc["registrationId"]), ("Storage root key", doc["storageRootKey"])],
    )
