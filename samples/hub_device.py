"""Provision a device with the official Azure IoT device SDK, then connect it to the IoT hub it
was assigned (provisiond's built-in hub) and exchange telemetry, its twin and a direct method.

    python samples/hub_device.py --data-dir data \
        --registration-id sample-hub-device --symmetric-key "$KEY"

It uses azure-iot-device (`pip install azure-iot-device`), unmodified. The SDK connects to the
standard ports only (8883 for MQTT, 443 for MQTT over WebSockets), so provisiond must serve them:
`provisiond serve --data-dir data --https-port 443 --mqtt-port 8883` (README, "Running on the
standard ports"). The CA certificate comes from DATA_DIR/connection.json. The hub's host name
(`assignedHub`) need not resolve: the SDK is told to connect to --gateway-host (default
localhost), and signs its tokens for the hub's name. See samples/README.md, section 7.

Steps:
1. register with DPS (ProvisioningDeviceClient): the answer names the hub and the device id;
2. connect to that hub (IoTHubDeviceClient) with the same key;
3. send --messages telemetry messages (read them with `provisiond hub monitor-events`);
4. read the twin (what the enrollment's initial twin gave it) and report properties;
5. answer direct methods (`provisiond hub invoke-method DEVICE --mn NAME`) and print
   cloud-to-device messages (`provisiond hub send-c2d DEVICE --data TEXT`) until --wait seconds
   pass, or one method named 'stop' arrives.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from azure.iot.device import (
    IoTHubDeviceClient,
    Message,
    MethodRequest,
    MethodResponse,
    ProvisioningDeviceClient,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the data directory of provisiond serve")
    parser.add_argument("--registration-id", required=True)
    parser.add_argument("--symmetric-key", default=os.environ.get("DEVICE_KEY"), help="[env DEVICE_KEY]")
    parser.add_argument("--gateway-host", default="localhost", help="where the hub is [default: localhost]")
    parser.add_argument("--websockets", action="store_true", help="MQTT over WebSockets (port 443)")
    parser.add_argument("--messages", type=int, default=3, help="telemetry messages to send [default: 3]")
    parser.add_argument("--wait", type=float, default=300, help="seconds to answer methods [default: 300]")
    args = parser.parse_args()
    if not args.symmetric_key:
        parser.error("give --symmetric-key (or set DEVICE_KEY)")
    service = json.loads((args.data_dir / "connection.json").read_text())
    ca = Path(service["caCertificate"]).read_text()

    # 1. Provision: DPS says which hub the device belongs to, under which device id.
    provisioning = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=args.gateway_host,
        registration_id=args.registration_id,
        id_scope=service["idScope"],
        symmetric_key=args.symmetric_key,
        server_verification_cert=ca,
        websockets=args.websockets,
    )
    result = provisioning.register()
    state = result.registration_state
    print(
        f"provisioned: {result.status}, device {state.device_id!r} on hub {state.assigned_hub!r}", flush=True
    )
    if result.status != "assigned":
        raise SystemExit(1)

    # 2. Connect to the assigned hub.
    client = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=args.symmetric_key,
        hostname=state.assigned_hub,
        device_id=state.device_id,
        gateway_hostname=args.gateway_host,
        server_verification_cert=ca,
        websockets=args.websockets,
    )
    stop = threading.Event()

    def on_method(request: MethodRequest) -> None:
        print(f"method {request.name!r} called with {json.dumps(request.payload)}", flush=True)
        answer: dict[str, Any] = {"method": request.name, "received": request.payload, "at": time.time()}
        client.send_method_response(MethodResponse.create_from_method_request(request, 200, answer))
        if request.name == "stop":
            stop.set()

    def on_message(message: Message) -> None:
        data = message.data.decode("utf-8", "replace") if isinstance(message.data, bytes) else message.data
        print(
            f"cloud-to-device message {data!r}, properties {json.dumps(message.custom_properties)}",
            flush=True,
        )

    client.on_method_request_received = on_method  # subscribes to methods
    client.on_message_received = on_message  # and to cloud-to-device messages
    client.connect()
    print("connected to the hub", flush=True)
    try:
        # 3. Telemetry, with an application property and JSON content.
        for n in range(args.messages):
            message = Message(json.dumps({"temperature": 20.0 + n, "n": n}))
            message.content_type, message.content_encoding = "application/json", "utf-8"
            message.custom_properties["sample"] = "hub_device"
            client.send_message(message)
        print(f"sent {args.messages} telemetry messages", flush=True)

        # 4. The twin: read it, report properties.
        twin = client.get_twin()
        print(f"twin: desired {json.dumps(twin.get('desired', {}))}", flush=True)
        client.patch_twin_reported_properties({"firmware": "1.0.0", "sample": "hub_device"})
        reported = client.get_twin()["reported"]
        print(f"reported properties now at $version {reported['$version']}", flush=True)

        # 5. Direct methods, until 'stop' or --wait seconds.
        print(f"answering direct methods for {args.wait:g} s ('stop' ends)", flush=True)
        stop.wait(args.wait)
    finally:
        client.shutdown()
    print("done", flush=True)


if __name__ == "__main__":
    main()
