"""Provision one device of an individual enrollment with symmetric key attestation.

    python samples/symmetric_key_individual.py --data-dir data \
        --registration-id sample-device-01 --symmetric-key "$KEY"

The endpoint, ID scope and CA certificate come from DATA_DIR/connection.json, which
`provisiond serve --data-dir DATA_DIR` writes. See samples/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from provisiond.device import ProvisioningDeviceClient, SymmetricKeySecurity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the data directory of provisiond serve")
    parser.add_argument("--registration-id", required=True)
    parser.add_argument("--symmetric-key", default=os.environ.get("DEVICE_KEY"), help="[env DEVICE_KEY]")
    args = parser.parse_args()
    if not args.symmetric_key:
        parser.error("give --symmetric-key (or set DEVICE_KEY)")

    service = json.loads((args.data_dir / "connection.json").read_text())
    security = SymmetricKeySecurity(registration_id=args.registration_id, symmetric_key=args.symmetric_key)
    with ProvisioningDeviceClient.create(
        service["globalEndpoint"], service["idScope"], security, ca_file=service["caCertificate"]
    ) as client:
        result = client.register({"sample": "symmetric_key_individual"})

    print(f"{result.status.value}: device {result.device_id!r} on hub {result.assigned_hub!r}")


if __name__ == "__main__":
    main()
