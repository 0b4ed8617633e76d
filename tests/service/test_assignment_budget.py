"""A slow assignment (a custom allocation webhook) answers 202 'assigning' with Retry-After,
finishes in the background, and the device's polls see 202 and then 200 with the result."""

from __future__ import annotations

import time
from pathlib import Path

from provisiond.device import ProvisioningDeviceClient, SymmetricKeySecurity
from provisiond.models import RegistrationStatus
from provisiond.protocol.sas import build_sas_token
from tests._server import start_server
from tests.service.test_webhook import answer_json, start_hook

V = {"api-version": "2021-06-01"}


def test_a_slow_webhook_makes_the_device_poll(tmp_path: Path) -> None:
    hook = start_hook()
    server = start_server(tmp_path / "budget", "--assignment-budget", "0.3")
    try:
        builtin = server.info["builtinHub"]
        url = hook.route(answer_json({"iotHubHostName": builtin, "payload": {"slow": True}}, delay=1.5))
        with server.client() as admin:
            enrollment = {
                "registrationId": "slow-1",
                "attestation": {"type": "symmetricKey"},
                "allocationPolicy": "custom",
                "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"},
            }
            admin.put("/enrollments/slow-1", enrollment)
            admin.put("/enrollments/slow-2", {**enrollment, "registrationId": "slow-2"})
            key1 = admin.post("/enrollments/slow-1/attestationmechanism")["symmetricKey"]["primaryKey"]
            key2 = admin.post("/enrollments/slow-2/attestationmechanism")["symmetricKey"]["primaryKey"]
        # At the wire: 202 assigning with Retry-After, polls 202 while it runs, then 200.
        token = build_sas_token(f"{server.id_scope}/registrations/slow-1", key1, int(time.time()) + 600)
        with server.http(headers={"Authorization": token}) as device:
            started = time.monotonic()
            first = device.put(f"/{server.id_scope}/registrations/slow-1/register", params=V, json={})
            assert time.monotonic() - started < 1.2, "the request must not wait for the webhook"
            assert first.status_code == 202 and first.json()["status"] == "assigning", first.text
            assert int(first.headers["retry-after"]) >= 1
            operation = first.json()["operationId"]
            poll = device.get(f"/{server.id_scope}/registrations/slow-1/operations/{operation}", params=V)
            assert poll.status_code == 202 and poll.json()["status"] == "assigning"
            deadline = time.monotonic() + 10
            while poll.status_code == 202 and time.monotonic() < deadline:
                time.sleep(0.2)
                poll = device.get(f"/{server.id_scope}/registrations/slow-1/operations/{operation}", params=V)
            assert poll.status_code == 200, poll.text
            state = poll.json()["registrationState"]
            assert poll.json()["status"] == "assigned" and state["assignedHub"] == builtin
            assert state["payload"] == {"slow": True}
        # The project's client polls by itself and gets the result.
        security = SymmetricKeySecurity(registration_id="slow-2", symmetric_key=key2)
        with ProvisioningDeviceClient.create(
            server.info["globalEndpoint"], server.id_scope, security, ca_file=server.ca_file
        ) as client:
            result = client.register()
        assert result.status is RegistrationStatus.ASSIGNED and result.payload == {"slow": True}
        assert "is taking longer than 0.3 s: answering 'assigning'" in server.log()
    finally:
        server.stop()
        hook.server.shutdown()
        hook.server.server_close()
