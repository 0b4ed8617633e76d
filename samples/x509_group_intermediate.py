"""Provision a device of an X.509 enrollment group whose signing certificate is a root CA, with
a device certificate issued by an intermediate CA (with the asyncio client).

    python samples/x509_group_intermediate.py --data-dir data \
        --cert certs/sample-group-device-01-chain.pem --key certs/sample-group-device-01.key

The device must present its certificate *and* the intermediate, so that the service can link
it to the root: give a --cert file holding both (NAME-chain.pem from `provisiond pki device`),
or the leaf with --chain, or a PKCS#12 file with --pkcs12 and --password.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from provisiond.device import AsyncProvisioningDeviceClient, X509Security


async def provision(args: argparse.Namespace) -> None:
    service = json.loads((args.data_dir / "connection.json").read_text())
    if args.pkcs12:
        security = X509Security.from_pkcs12(args.pkcs12, args.password)
    else:
        security = X509Security.from_pem_files(args.cert, args.key, chain_file=args.chain)
    async with AsyncProvisioningDeviceClient.create(
        service["globalEndpoint"], service["idScope"], security, ca_file=service["caCertificate"]
    ) as client:
        result = await client.register()

    x509 = result.registration_state.x509 if result.registration_state else None
    print(f"{result.status.value}: device {result.device_id!r} on hub {result.assigned_hub!r}")
    if x509 and x509.signing_certificate_info:
        print(
            f"enrollment group: {x509.enrollment_group_id} (signed by {x509.signing_certificate_info.subject_name})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the data directory of provisiond serve")
    parser.add_argument(
        "--cert", type=Path, help="the device certificate, optionally followed by its chain (PEM)"
    )
    parser.add_argument("--key", type=Path, help="its private key (PEM)")
    parser.add_argument("--chain", type=Path, help="intermediate CA certificates (PEM)")
    parser.add_argument("--pkcs12", type=Path, help="a PKCS#12 file instead of --cert/--key")
    parser.add_argument("--password", help="the PKCS#12 file's password")
    args = parser.parse_args()
    if not args.pkcs12 and not (args.cert and args.key):
        parser.error("give --cert and --key, or --pkcs12")
    asyncio.run(provision(args))


if __name__ == "__main__":
    main()
