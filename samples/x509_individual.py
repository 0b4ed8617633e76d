"""Provision a device of an individual X.509 enrollment (a self-signed certificate).

    python samples/x509_individual.py --data-dir data \
        --cert certs/sample-x509-01.pem --key certs/sample-x509-01.key

The registration id is the certificate's subject CN; the certificate is presented in the TLS
handshake, so no key or token is sent.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from provisiond.device import ProvisioningDeviceClient, X509Security


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the data directory of provisiond serve")
    parser.add_argument("--cert", type=Path, required=True, help="the device certificate (PEM)")
    parser.add_argument("--key", type=Path, required=True, help="its private key (PEM)")
    parser.add_argument("--key-password", help="the key's password, if it is encrypted")
    args = parser.parse_args()

    service = json.loads((args.data_dir / "connection.json").read_text())
    security = X509Security.from_pem_files(args.cert, args.key, password=args.key_password)
    with ProvisioningDeviceClient.create(
        service["globalEndpoint"], service["idScope"], security, ca_file=service["caCertificate"]
    ) as client:
        result = client.register()

    print(f"{result.status.value}: device {result.device_id!r} on hub {result.assigned_hub!r}")


if __name__ == "__main__":
    main()
