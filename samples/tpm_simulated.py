"""Provision a device through a simulated TPM 2.0 (swtpm), end to end: enroll the TPM's
endorsement key, register with TPM attestation, and sign with the hub key the TPM now holds.

    python samples/tpm_simulated.py --data-dir data

Starts swtpm (apt-get install swtpm) on free loopback ports with its state in
DATA_DIR/sample-tpm (so later runs are the same device), or uses the TPM at --tcti
(e.g. device:/dev/tpmrm0 for real hardware). Needs the tpm extra: pip install 'provisiond[tpm]'.
The endpoint, ID scope, CA and service connection string come from DATA_DIR/connection.json,
which `provisiond serve --data-dir DATA_DIR` writes. See samples/README.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from provisiond.device import ProvisioningDeviceClient
from provisiond.device.tpm import TpmSecurity
from provisiond.service_client import ServiceClient


@contextlib.contextmanager
def simulated_tpm(state_dir: Path) -> Iterator[str]:
    """Run swtpm on two free consecutive loopback ports; yield its TCTI string."""
    executable = shutil.which("swtpm")
    if executable is None:
        raise SystemExit("swtpm is not installed: apt-get install swtpm swtpm-tools (or give --tcti)")
    state_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port_pair()
    process = subprocess.Popen(
        [
            executable,
            "socket",
            "--tpm2",
            "--server",
            f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl",
            f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
            "--tpmstate",
            f"dir={state_dir}",
            "--flags",
            "not-need-init,startup-clear",
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("swtpm did not start") from None
                time.sleep(0.05)
        yield f"swtpm:host=127.0.0.1,port={port}"
    finally:
        process.terminate()
        process.wait(5)


def _free_port_pair() -> int:
    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def enroll(service: dict[str, str], security: TpmSecurity) -> None:
    """Create (or update) the individual enrollment of this TPM, as an operator would with
    `provisiond enrollment create ID --tpm-ek EK --data-dir DIR` (the EK from `provisiond tpm ek`)."""
    admin = ServiceClient(service["serviceConnectionString"], ca_file=service["caCertificate"])
    try:
        path = f"/enrollments/{security.registration_id}"
        try:
            admin.get(path)
            exists = True
        except LookupError:
            exists = False
        body = {
            "registrationId": security.registration_id,
            "attestation": {"type": "tpm", "tpm": {"endorsementKey": security.endorsement_key_b64}},
        }
        admin.put(path, body, if_match="*" if exists else None)
    finally:
        admin.close()


def provision(service: dict[str, str], tcti: str, *, do_enroll: bool) -> None:
    with TpmSecurity(tcti=tcti) as security:
        print(f"TPM registration id: {security.registration_id}")
        print(f"endorsement key:     {security.endorsement_key_b64[:48]}...")
        if do_enroll:
            enroll(service, security)
            print("enrolled (individual enrollment, TPM attestation)")
        with ProvisioningDeviceClient.create(
            service["globalEndpoint"], service["idScope"], security, ca_file=service["caCertificate"]
        ) as client:
            result = client.register({"sample": "tpm_simulated"})
        print(f"{result.status.value}: device {result.device_id!r} on hub {result.assigned_hub!r}")
        # The result's authenticationKey wrapped the device's hub key; it is now in the TPM.
        expiry = int(time.time()) + 3600
        resource = f"{result.assigned_hub}/devices/{result.device_id}"
        signature = base64.b64encode(security.sign(f"{resource}\n{expiry}".encode())).decode()
        print(f"hub SAS signature, computed in the TPM: {signature}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the data directory of provisiond serve")
    parser.add_argument(
        "--tcti", help="use this TPM instead of starting swtpm (device:/dev/tpmrm0, swtpm:...)"
    )
    parser.add_argument(
        "--no-enroll", action="store_true", help="the TPM is enrolled already (with `provisiond tpm ek`)"
    )
    args = parser.parse_args()

    service = json.loads((args.data_dir / "connection.json").read_text())
    if args.tcti:
        provision(service, args.tcti, do_enroll=not args.no_enroll)
        return
    with simulated_tpm(args.data_dir / "sample-tpm") as tcti:
        provision(service, tcti, do_enroll=not args.no_enroll)


if __name__ == "__main__":
    main()
