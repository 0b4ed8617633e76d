"""The TPM security provider (provisiond.device.tpm) on swtpm: the project's client and CLI
provision a device end to end over HTTPS against a real ``provisiond serve``, the hub key the
result wraps ends up in the TPM, and tpm2-tools, an independent TSS, agrees on the keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner, Result

import provisiond.device.tpm as device_tpm
from provisiond.cli import cli
from provisiond.device import ProvisioningDeviceClient
from provisiond.device.tpm import TpmSecurity
from provisiond.errors import ConfigurationError, ServiceResponseError, TpmCommandError
from provisiond.protocol import tpm
from tests._server import RunningServer
from tests._swtpm import Swtpm, tpm_missing


@pytest.fixture(scope="module")
def simulator(swtpm_factory: Callable[[], Swtpm]) -> Swtpm:
    return swtpm_factory()


@pytest.fixture
def security(simulator: Swtpm) -> Iterator[TpmSecurity]:
    provider = TpmSecurity(tcti=simulator.tcti)
    yield provider
    provider.close()


@pytest.fixture
def admin(server: RunningServer) -> Iterator[Any]:
    client = server.client()
    yield client
    client.close()


def enroll(admin: Any, registration_id: str, security: TpmSecurity) -> None:
    admin.put(
        f"/enrollments/{registration_id}",
        {
            "registrationId": registration_id,
            "attestation": {"type": "tpm", "tpm": {"endorsementKey": security.endorsement_key_b64}},
        },
        if_match="*" if _exists(admin, registration_id) else None,
    )


def _exists(admin: Any, registration_id: str) -> bool:
    try:
        admin.get(f"/enrollments/{registration_id}")
    except LookupError:
        return False
    return True


def hub_primary_key(server: RunningServer, hub: str, device_id: str) -> bytes:
    with sqlite3.connect(server.data_dir / "provisiond.db") as db:
        row = db.execute("SELECT doc FROM hub_devices WHERE key = ?", (f"{hub}/{device_id}",)).fetchone()
    doc = msgspec.json.decode(row[0])
    return base64.b64decode(doc["authentication"]["symmetricKey"]["primaryKey"])


def client(server: RunningServer, security: TpmSecurity) -> ProvisioningDeviceClient:
    return ProvisioningDeviceClient.create(
        f"localhost:{server.port}", server.id_scope, security, ca_file=server.ca_file
    )


def test_a_simulated_tpm_provisions_with_the_client_and_holds_the_hub_key(
    server: RunningServer, admin: Any, security: TpmSecurity
) -> None:
    assert security.registration_id == tpm.registration_id(security.endorsement_key)
    enroll(admin, security.registration_id, security)
    with client(server, security) as device:
        first = device.register({"model": "tpm-sim"})
        assert first.status.value == "assigned" and first.device_id == security.registration_id
        assert first.registration_state is not None and first.registration_state.tpm is not None
        # complete_registration imported the hub key: the TPM now signs what the hub verifies.
        key = hub_primary_key(server, first.assigned_hub or "", first.device_id or "")
        data = f"{first.assigned_hub}/devices/{first.device_id}\n1900000000".encode()
        assert security.sign(data) == hmac.new(key, data, hashlib.sha256).digest()
        long_data = bytes(range(256)) * 9  # > TPM2B_MAX_BUFFER: an HMAC sequence
        assert security.sign(long_data) == hmac.new(key, long_data, hashlib.sha256).digest()

        # Registering again takes a fresh challenge (the first register goes without a token).
        again = device.register()
        assert again.status.value == "assigned" and again.operation_id != first.operation_id
        assert again.registration_state is not None and again.registration_state.tpm is not None
        assert (
            again.registration_state.tpm.authentication_key != first.registration_state.tpm.authentication_key
        )
        new_key = hub_primary_key(server, again.assigned_hub or "", again.device_id or "")
        assert security.sign(data) == hmac.new(new_key, data, hashlib.sha256).digest()


def test_an_unenrolled_tpm_is_refused_with_the_services_reason(
    server: RunningServer, swtpm_factory: Callable[[], Swtpm]
) -> None:
    with TpmSecurity(tcti=swtpm_factory().tcti) as stranger:
        with client(server, stranger) as device, pytest.raises(ServiceResponseError) as caught:
            device.register()
    assert caught.value.status_code == 401
    assert "No individual enrollment is named" in caught.value.message
    assert stranger.registration_id in caught.value.message


def test_an_enrollment_of_another_tpm_is_refused(
    server: RunningServer, admin: Any, security: TpmSecurity, swtpm_factory: Callable[[], Swtpm]
) -> None:
    with TpmSecurity(tcti=swtpm_factory().tcti) as other:
        registration_id = f"tpm-other-{uuid.uuid4().hex[:8]}"
        enroll(admin, registration_id, other)
        impostor = TpmSecurity(tcti=security.tcti, registration_id=registration_id)
        try:
            with client(server, impostor) as device, pytest.raises(ServiceResponseError) as caught:
                device.register()
        finally:
            impostor.close()
    assert caught.value.status_code == 401 and caught.value.error_code == 401021
    assert "is not the one of the individual enrollment" in caught.value.message


# --- CLI -----------------------------------------------------------------------------------------


def invoke(*args: Any) -> Result:
    env = {"PROVISIOND_CONNECTION_STRING": None, "PROVISIOND_DATA_DIR": None, "PROVISIOND_TCTI": None}
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def test_the_cli_reads_the_ek_enrolls_it_and_registers_the_device(
    server: RunningServer, swtpm_factory: Callable[[], Swtpm]
) -> None:
    simulator = swtpm_factory()
    result = invoke("tpm", "ek", "--tcti", simulator.tcti, "--json")
    assert result.exit_code == 0, result.output
    ek = json.loads(result.stdout)
    human = invoke("tpm", "ek", "--tcti", simulator.tcti)
    assert ek["registrationId"] in human.stdout and f"--tpm-ek {ek['endorsementKey']}" in human.stdout
    srk = json.loads(invoke("tpm", "srk", "--tcti", simulator.tcti, "--json").stdout)
    assert tpm.storage_root_key(base64.b64decode(srk["storageRootKey"]))

    # the command it prints enrolls the device as pasted, once DIR names the service's data dir
    [printed] = [line.strip() for line in human.stdout.splitlines() if "enrollment create" in line]
    assert printed.startswith("provisiond enrollment create ") and printed.endswith(" --data-dir DIR")
    created = invoke(*shlex.split(printed.replace(" DIR", f" {shlex.quote(str(server.data_dir))}"))[1:])
    assert created.exit_code == 0, created.output
    registered = invoke(
        "device", "register", "--data-dir", server.data_dir, "--tpm", simulator.tcti, "--json"
    )
    assert registered.exit_code == 0, (registered.output, registered.exception)
    doc = json.loads(registered.stdout)
    assert doc["status"] == "assigned" and doc["registrationId"] == ek["registrationId"]
    assert doc["registrationState"]["tpm"]["authenticationKey"]


def test_the_cli_explains_tpm_failures() -> None:
    result = invoke("tpm", "ek", "--tcti", "swtpm:host=127.0.0.1,port=1")
    assert result.exit_code == 1
    assert isinstance(result.exception, TpmCommandError)
    assert "Cannot reach a TPM through the TCTI 'swtpm:host=127.0.0.1,port=1'" in result.exception.message
    both = invoke(
        "device", "register", "--endpoint", "h:1", "--id-scope", "s", "--tpm", "x", "--symmetric-key", "AA=="
    )
    assert both.exit_code == 2 and "exactly one attestation" in both.output


def test_a_missing_tpm_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_tpm, "_IMPORT_ERROR", ImportError("No module named 'tpm2_pytss'"))
    with pytest.raises(ConfigurationError, match=r"pip install 'provisiond\[tpm\]'"):
        TpmSecurity(tcti="device:/dev/tpmrm0")


def test_the_service_and_the_cli_work_without_tpm2_pytss() -> None:
    # The server installs without libtss2: nothing outside TpmSecurity may need tpm2-pytss.
    code = (
        "import sys; sys.modules['tpm2_pytss'] = None\n"
        "import provisiond.service.app, provisiond.cli.serve, provisiond.cli.device, provisiond.cli.tpm\n"
        "from provisiond.cli import main\n"
        "main(['tpm', 'ek', '--tcti', 'device:/nonexistent'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr  # ConfigurationError's exit code, not a traceback
    assert "pip install 'provisiond[tpm]'" in done.stderr and "Traceback" not in done.stderr


# --- tpm2-tools as an independent peer -----------------------------------------------------------


def _tools(simulator: Swtpm, *args: str, cwd: Path) -> bytes:
    tool = shutil.which(args[0])
    if tool is None:
        pytest.skip(f"{args[0]} is missing: apt-get install tpm2-tools (.ci/run does)")
    env = {**os.environ, "TPM2TOOLS_TCTI": simulator.tcti}
    done = subprocess.run([tool, *args[1:]], cwd=cwd, env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def test_tpm2_tools_read_the_keys_the_provider_made_and_derive_the_same_ek(
    swtpm_factory: Callable[[], Swtpm], tmp_path: Path
) -> None:
    simulator = swtpm_factory()
    with TpmSecurity(tcti=simulator.tcti) as provider:
        ek, srk = provider.endorsement_key, provider.storage_root_key
    _tools(simulator, "tpm2_readpublic", "-c", "0x81010001", "-f", "tss", "-o", "ek.pub", cwd=tmp_path)
    _tools(simulator, "tpm2_readpublic", "-c", "0x81000001", "-f", "tss", "-o", "srk.pub", cwd=tmp_path)
    assert (tmp_path / "ek.pub").read_bytes() == ek
    assert (tmp_path / "srk.pub").read_bytes() == srk
    # tpm2_createek makes the TCG default EK: the very key the provider persisted.
    _tools(
        simulator,
        "tpm2_createek",
        "-G",
        "rsa",
        "-c",
        "ek.ctx",
        "-u",
        "created.pub",
        "-f",
        "tss",
        cwd=tmp_path,
    )
    assert (tmp_path / "created.pub").read_bytes() == ek
    _tools(simulator, "tpm2_flushcontext", "-t", cwd=tmp_path)


def test_the_provider_uses_an_ek_tpm2_tools_persisted(
    swtpm_factory: Callable[[], Swtpm], tmp_path: Path
) -> None:
    simulator = swtpm_factory()
    _tools(
        simulator, "tpm2_createek", "-G", "rsa", "-c", "0x81010001", "-u", "ek.pub", "-f", "tss", cwd=tmp_path
    )
    with TpmSecurity(tcti=simulator.tcti) as provider:
        assert provider.endorsement_key == (tmp_path / "ek.pub").read_bytes()
        assert provider.registration_id == tpm.registration_id((tmp_path / "ek.pub").read_bytes())


def test_the_tpm_sample_provisions_through_a_simulated_tpm(server: RunningServer) -> None:
    missing = tpm_missing()  # the sample starts its own swtpm
    if missing is not None:
        pytest.skip(missing)
    sample = Path(__file__).parents[2] / "samples" / "tpm_simulated.py"
    runs = [
        subprocess.run(
            [sys.executable, str(sample), "--data-dir", str(server.data_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        for _ in range(2)  # the second run is the same device (the TPM's state is kept)
    ]
    for done in runs:
        assert done.returncode == 0, done.stderr
        assert "assigned: device" in done.stdout and "hub SAS signature, computed in the TPM" in done.stdout
    first_id, second_id = (done.stdout.splitlines()[0] for done in runs)
    assert first_id == second_id and first_id.startswith("TPM registration id: ")
