"""The device client and ``provisiond device register`` against a real ``provisiond serve``
over HTTPS (the session's shared server; every test uses its own ids)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from provisiond import pki
from provisiond.cli import cli
from provisiond.device import (
    AsyncProvisioningDeviceClient,
    HttpsTransport,
    ProvisioningDeviceClient,
    RegistrationResult,
    RetryPolicy,
    SecurityProvider,
    SymmetricKeySecurity,
    Transport,
    X509Security,
)
from provisiond.errors import ConnectError, ServiceResponseError
from provisiond.models import RegistrationStatus
from provisiond.protocol.registration import Reply, Request
from provisiond.service_client import ServiceClient
from tests._server import RunningServer, start_server


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def pem(*certs: Any) -> str:
    return pki.certificate_pem(*certs).decode()


@pytest.fixture(scope="module")
def admin(server: RunningServer) -> Iterator[ServiceClient]:
    with server.client() as client:
        yield client


def register_sync(server: RunningServer, security: SecurityProvider, **kwargs: Any) -> RegistrationResult:
    with ProvisioningDeviceClient.create(
        server.info["globalEndpoint"], server.id_scope, security, ca_file=server.ca_file
    ) as client:
        return client.register(**kwargs)


async def register_async(
    server: RunningServer, security: SecurityProvider, **kwargs: Any
) -> RegistrationResult:
    async with AsyncProvisioningDeviceClient.create(
        server.info["globalEndpoint"], server.id_scope, security, "https", ca_file=server.ca_file
    ) as client:
        return await client.register(**kwargs)


def enroll_symmetric(admin: ServiceClient, reg: str, **extra: Any) -> str:
    admin.put(
        f"/enrollments/{reg}", {"registrationId": reg, "attestation": {"type": "symmetricKey"}, **extra}
    )
    key: str = admin.post(f"/enrollments/{reg}/attestationmechanism")["symmetricKey"]["primaryKey"]
    return key


def x509_group(admin: ServiceClient) -> tuple[str, pki.Issued, pki.Issued]:
    """An X.509 enrollment group whose signing certificate is a root; devices are issued by an
    intermediate under it."""
    root = pki.make_root_ca("Client Root " + uid("r"))
    intermediate = pki.make_intermediate_ca("Client Intermediate " + uid("i"), root)
    gid = uid("xg")
    admin.put(
        f"/enrollmentGroups/{gid}",
        {
            "enrollmentGroupId": gid,
            "attestation": {
                "type": "x509",
                "x509": {"signingCertificates": {"primary": {"certificate": pem(root.cert)}}},
            },
        },
    )
    return gid, root, intermediate


# --- the library ---------------------------------------------------------------------------------


async def test_symmetric_key_individual_sync_and_async(server: RunningServer, admin: ServiceClient) -> None:
    reg = uid("sk")
    security = SymmetricKeySecurity(registration_id=reg, symmetric_key=enroll_symmetric(admin, reg))
    first = await register_async(server, security, payload={"model": "x1"})
    assert first.status is RegistrationStatus.ASSIGNED and first.device_id == reg and first.assigned_hub
    assert first.registration_state is not None and first.registration_state.registration_id == reg

    again = await asyncio.to_thread(register_sync, server, security, force=True)
    assert (again.assigned_hub, again.device_id, again.status) == (first.assigned_hub, reg, first.status)


def test_x509_individual_self_signed(server: RunningServer, admin: ServiceClient, tmp_path: Path) -> None:
    reg = uid("x")
    leaf = pki.make_device_cert(reg)
    pki.write_issued(leaf, tmp_path / "dev")
    admin.put(
        f"/enrollments/{reg}",
        {
            "registrationId": reg,
            "attestation": {
                "type": "x509",
                "x509": {"clientCertificates": {"primary": {"certificate": pem(leaf.cert)}}},
            },
        },
    )
    security = X509Security.from_pem_files(pki.cert_path(tmp_path / "dev"), pki.key_path(tmp_path / "dev"))
    result = register_sync(server, security)
    assert result.device_id == reg and security.registration_id == reg
    state = result.registration_state
    assert state is not None and state.x509 is not None and state.x509.certificate_info is not None
    assert state.x509.certificate_info.subject_name == f"CN={reg}"


async def test_x509_group_with_an_intermediate(
    server: RunningServer, admin: ServiceClient, tmp_path: Path
) -> None:
    gid, _root, intermediate = x509_group(admin)
    # PEM: the chain file holds the leaf and the intermediate.
    reg = uid("xd")
    pki.write_issued(pki.make_device_cert(reg, intermediate), tmp_path / "pem", chain=True)
    from_pem = X509Security.from_pem_files(pki.chain_path(tmp_path / "pem"), pki.key_path(tmp_path / "pem"))
    result = await register_async(server, from_pem)
    assert result.device_id == reg
    assert result.registration_state is not None and result.registration_state.x509 is not None
    assert result.registration_state.x509.enrollment_group_id == gid

    # PKCS#12 with its chain, from the blocking client.
    reg2 = uid("xd")
    (tmp_path / "dev.pfx").write_bytes(pki.to_pkcs12(pki.make_device_cert(reg2, intermediate), "pfx-pass"))
    result2 = await asyncio.to_thread(
        register_sync, server, X509Security.from_pkcs12(tmp_path / "dev.pfx", "pfx-pass")
    )
    assert result2.device_id == reg2

    # Without the intermediate, the service cannot tie the leaf to the group.
    reg3 = uid("xd")
    leaf_only = pki.make_device_cert(reg3, intermediate)
    bare = X509Security.from_issued(pki.Issued(leaf_only.cert, leaf_only.key))
    with pytest.raises(ServiceResponseError) as info:
        await register_async(server, bare)
    assert info.value.status_code == 401


def test_an_untrusted_service_certificate_is_a_connect_error(server: RunningServer, tmp_path: Path) -> None:
    other_ca = pki.make_root_ca("Not The Service CA")
    (tmp_path / "ca.pem").write_bytes(pki.certificate_pem(other_ca.cert))
    security = SymmetricKeySecurity(registration_id=uid("sk"), symmetric_key="AAAA")
    with (
        pytest.raises(ConnectError, match="certificate verify failed"),
        ProvisioningDeviceClient.create(
            server.info["globalEndpoint"], server.id_scope, security, ca_file=tmp_path / "ca.pem"
        ) as client,
    ):
        client.register()


# --- the CLI -------------------------------------------------------------------------------------


def device_register(server: RunningServer, *args: Any) -> Result:
    return CliRunner().invoke(
        cli,
        ["device", "register", "--data-dir", str(server.data_dir), *map(str, args)],
        env={
            "PROVISIOND_DATA_DIR": None,
            "PROVISIOND_KEY_PASSWORD": None,
            "PROVISIOND_PKCS12_PASSWORD": None,
        },
    )


def test_cli_symmetric_key_and_group_key(server: RunningServer, admin: ServiceClient) -> None:
    reg = uid("cli")
    key = enroll_symmetric(admin, reg)
    result = device_register(
        server, "--registration-id", reg, "--symmetric-key", key, "--payload", '{"a": 1}'
    )
    assert result.exit_code == 0, (result.output, result.exception)
    for label in ("Status", "assigned", "Assigned hub", "Device ID", reg, "Substatus", "Payload"):
        assert label in result.output

    gid = uid("cg")
    admin.put(f"/enrollmentGroups/{gid}", {"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}})
    group_key = admin.post(f"/enrollmentGroups/{gid}/attestationmechanism")["symmetricKey"]["primaryKey"]
    reg2 = uid("cli")
    result = device_register(server, "--registration-id", reg2, "--group-key", group_key, "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    doc = json.loads(result.output)
    assert doc["status"] == "assigned" and doc["deviceId"] == reg2 and doc["assignedHub"]
    assert doc["registrationState"]["symmetricKey"]["enrollmentGroupId"] == gid


def test_cli_x509_pem_and_pkcs12(server: RunningServer, admin: ServiceClient, tmp_path: Path) -> None:
    gid, _root, intermediate = x509_group(admin)
    reg = uid("cx")
    leaf = pki.make_device_cert(reg, intermediate)
    pki.write_issued(leaf, tmp_path / "dev", chain=True)
    (tmp_path / "dev-enc.key").write_bytes(pki.private_key_pem(leaf.key, "kp"))
    result = device_register(
        server,
        "--cert",
        pki.cert_path(tmp_path / "dev"),
        "--chain",
        pki.chain_path(tmp_path / "dev"),
        "--key",
        tmp_path / "dev-enc.key",
        "--key-password",
        "kp",
        "--json",
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.output)["registrationState"]["x509"]["enrollmentGroupId"] == gid

    (tmp_path / "dev.pfx").write_bytes(pki.to_pkcs12(leaf, "pp"))
    result = device_register(server, "--pkcs12", tmp_path / "dev.pfx", "--password", "pp", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.output)["deviceId"] == reg


def test_cli_errors_print_the_cause_and_exit_non_zero(server: RunningServer, admin: ServiceClient) -> None:
    reg = uid("cli")
    enroll_symmetric(admin, reg)
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "provisiond",
            "device",
            "register",
            "--data-dir",
            str(server.data_dir),
            "--registration-id",
            reg,
            "--symmetric-key",
            "AAAA",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 1, process
    assert (
        "HTTP 401" in process.stderr and "errorCode 401" in process.stderr and "trackingId" in process.stderr
    )

    usage = device_register(server, "--symmetric-key", "AAAA")
    assert usage.exit_code == 2 and "needs --registration-id" in usage.output
    both = device_register(server, "--registration-id", reg, "--symmetric-key", "AAAA", "--group-key", "AAAA")
    assert both.exit_code == 2 and "exactly one attestation" in both.output
    not_base64 = subprocess.run(
        [*process.args[:-1], "not base64!"],  # the same command, a key that is not base64
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert not_base64.returncode == 2 and "is not base64" in not_base64.stderr, not_base64

    # --help says what the user sees, as checked above, in the user's terms
    shown = " ".join(device_register(server, "--help").output.split())
    assert "the exit status is 1" in shown and "exit with 2" in shown and "DPS errorCode" in shown
    assert "ProvisioningError" not in shown and "main()" not in shown


# --- throttling ----------------------------------------------------------------------------------


class RecordingTransport(Transport):
    """Delegates to a real transport and records the status of every answer."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.statuses: list[int] = []

    async def send(self, request: Request) -> Reply:
        reply = await self.inner.send(request)
        self.statuses.append(reply.status)
        return reply

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture(scope="module")
def throttled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server that takes 4 registrations a second (burst of 4), then answers 429 + Retry-After."""
    running = start_server(tmp_path_factory.mktemp("throttled"), "--rate-limit", "4")
    yield running
    running.stop()


async def test_a_burst_over_the_rate_limit_is_absorbed_by_retries(throttled_server: RunningServer) -> None:
    server = throttled_server
    with server.client() as admin:
        gid = uid("burst")
        admin.put(
            f"/enrollmentGroups/{gid}", {"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}}
        )
        group_key = admin.post(f"/enrollmentGroups/{gid}/attestationmechanism")["symmetricKey"]["primaryKey"]

    async def one(reg: str) -> tuple[RegistrationResult, list[int]]:
        security = SymmetricKeySecurity.from_group_key(registration_id=reg, group_key=group_key)
        https = HttpsTransport(
            host=server.info["globalEndpoint"],
            id_scope=server.id_scope,
            security=security,
            ca_file=server.ca_file,
        )
        transport = RecordingTransport(https)
        policy = RetryPolicy(max_attempts=8, initial_backoff=0.5, total_timeout=30)
        async with AsyncProvisioningDeviceClient(
            security=security, transport=transport, retry=policy
        ) as client:
            return await client.register(), transport.statuses

    outcomes = await asyncio.gather(*(one(uid("bd")) for _ in range(10)))
    assert all(result.status is RegistrationStatus.ASSIGNED for result, _ in outcomes)
    statuses = [status for _, seen in outcomes for status in seen]
    assert statuses.count(202) == 10 and statuses.count(429) >= 1 and set(statuses) <= {202, 429}
