"""Provision a device of a symmetric-key enrollment group: the device key is derived from the
group key and the registration id, so any number of devices share one enrollment.

    python samples/symmetric_key_group.py --data-dir data \
        --registration-id sample-group-device-01 --group-key "$GROUP_KEY"

In production the group key stays at the factory and each device gets only its derived key
(`provisiond group device-key GROUP REGISTRATION_ID`); then use symmetric_key_individual.py.
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
    parser.add_argument("--group-key", default=os.environ.get("GROUP_KEY"), help="[env GROUP_KEY]")
    args = parser.parse_args()
    if not args.group_key:
        parser.error("give --group-key (or set GROUP_KEY)")

    service = json.loads((args.data_dir / "connection.json").read_text())
    security = SymmetricKeySecurity.from_group_key(
        registration_id=args.registration_id, group_key=args.group_key
    )
    with ProvisioningDeviceClient.create(
        service["globalEndpoint"], service["idScope"], security, ca_file=service["caCertificate"]
    ) as client:
        result = client.register()

    group = result.registration_state.symmetric_key if result.registration_state else None
    print(f"{result.status.value}: device {result.device_id!r} on hub {result.assigned_hub!r}")
    print(f"enrollment group: {group.enrollment_group_id if group else None}")


if __name__ == "__main__":
    main()
