"""TPM attestation on the service side, against a real ``provisiond serve`` and real simulated
TPMs (swtpm): the device's requests are raw HTTPS, as an SDK sends them, and the TPM work
(activating the service's blobs, signing with TPM2_HMAC) is done in swtpm.

Covered: enrollment validation; the 401 challenge body; a blob the TPM activates; the full
registration with the hub key wrapped in the result; and the failures: wrong EK, EK of another
enrollment, SRK mismatch, used and replaced challenges, tampered blobs, a token signed with
another key. Expiry and single use across two service nodes are tested in-process on both
storage backends (a clock that jumps ahead; two stores on one database).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import secrets
import sqlite3
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest

from provisiond.attestation import symmetric_key as sk
from provisiond.attestation.tpm import TpmAttestor
from provisiond.device.tpm import TpmSecurity
from provisiond.errors import (
    AuthenticationError,
    InvalidIdError,
    RequestError,
    TpmCommandError,
    TpmFormatError,
)
from provisiond.models import AttestationMechanism, AttestationType, IndividualEnrollment, TpmAttestation
from provisiond.protocol import tpm
from provisiond.protocol.messages import TpmChallenge
from provisiond.protocol.sas import build_sas_token
from provisiond.service.sources import StoreSources
from provisiond.storage import Collection, open_store
from tests._server import RunningServer
from tests._swtpm import Swtpm

V = {"api-version": "2021-06-01"}


@pytest.fixture(scope="module")
def tpm_a(swtpm_factory: Callable[[], Swtpm]) -> Iterator[TpmSecurity]:
    security = TpmSecurity(tcti=swtpm_factory().tcti)
    yield security
    security.close()


@pytest.fixture(scope="module")
def tpm_b(swtpm_factory: Callable[[], Swtpm]) -> Iterator[TpmSecurity]:
    security = TpmSecurity(tcti=swtpm_factory().tcti)
    yield security
    security.close()


@pytest.fixture
def admin(server: RunningServer) -> Iterator[Any]:
    client = server.client()
    yield client
    client.close()


def uid(prefix: str = "tpm") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def enroll(
    admin: Any, registration_id: str, ek: bytes, srk: bytes | None = None, *, replace: bool = False
) -> Any:
    tpm_doc = {"endorsementKey": base64.b64encode(ek).decode()}
    if srk is not None:
        tpm_doc["storageRootKey"] = base64.b64encode(srk).decode()
    return admin.put(
        f"/enrollments/{registration_id}",
        {"registrationId": registration_id, "attestation": {"type": "tpm", "tpm": tpm_doc}},
        if_match="*" if replace else None,
    )


class Device:
    """Raw HTTPS calls as a TPM device makes them; its TPM is ``security`` (on swtpm)."""

    def __init__(self, server: RunningServer, security: TpmSecurity, registration_id: str) -> None:
        self.server = server
        self.security = security
        self.registration_id = registration_id
        self.http = httpx.Client(
            base_url=server.base_url, verify=ssl.create_default_context(cafile=server.ca_file), timeout=10
        )

    @property
    def resource(self) -> str:
        return f"{self.server.id_scope}/registrations/{self.registration_id}"

    def body(self, **tpm_fields: str) -> dict[str, Any]:
        keys = {
            "endorsementKey": self.security.endorsement_key_b64,
            "storageRootKey": self.security.storage_root_key_b64,
            **tpm_fields,
        }
        return {"registrationId": self.registration_id, "tpm": {k: v for k, v in keys.items() if v}}

    def register(self, token: str | None = None, body: dict[str, Any] | None = None) -> httpx.Response:
        return self.http.put(
            f"/{self.server.id_scope}/registrations/{self.registration_id}/register",
            params=V,
            json=self.body() if body is None else body,
            headers={"Authorization": token} if token else {},
        )

    def challenge(self) -> dict[str, Any]:
        r = self.register()
        assert r.status_code == 401, r.text
        body: dict[str, Any] = r.json()
        return body

    def activate(self, challenge: dict[str, Any]) -> str:
        """Activate the challenge in the TPM; a SAS token signed by the imported key."""
        self.security.answer_challenge(msgspec.convert(challenge, TpmChallenge))
        token = self.security.sas_token(self.resource, int(time.time()) + 3600)
        assert token is not None
        return token

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def device_a(server: RunningServer, admin: Any, tpm_a: TpmSecurity) -> Iterator[Device]:
    """TPM A, enrolled under a fresh registration id."""
    device = Device(server, tpm_a, uid())
    enroll(admin, device.registration_id, tpm_a.endorsement_key)
    yield device
    device.close()


def assert_denied(r: httpx.Response, status: int, code: int, *words: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["errorCode"] == code, body
    for word in words:
        assert word.lower() in body["message"].lower(), body["message"]
    message: str = body["message"]
    return message


def hub_device(server: RunningServer, hub: str, device_id: str) -> dict[str, Any]:
    """The stored hub identity, keys included (the admin API strips them)."""
    with sqlite3.connect(server.data_dir / "provisiond.db") as db:
        row = db.execute("SELECT doc FROM hub_devices WHERE key = ?", (f"{hub}/{device_id}",)).fetchone()
    assert row is not None
    doc: dict[str, Any] = msgspec.json.decode(row[0])
    return doc


# --- enrollments ---------------------------------------------------------------------------------


def test_a_tpm_enrollment_takes_the_ek_of_a_real_tpm_and_an_optional_srk(
    admin: Any, tpm_a: TpmSecurity
) -> None:
    rid = uid()
    created = enroll(admin, rid, tpm_a.endorsement_key)
    assert created["attestation"] == {"type": "tpm", "tpm": {"endorsementKey": tpm_a.endorsement_key_b64}}
    updated = enroll(admin, rid, tpm_a.endorsement_key, tpm_a.storage_root_key, replace=True)
    assert updated["attestation"]["tpm"]["storageRootKey"] == tpm_a.storage_root_key_b64
    assert (
        admin.get(f"/enrollments/{rid}")["attestation"]["tpm"]["endorsementKey"] == tpm_a.endorsement_key_b64
    )


@pytest.mark.parametrize(
    ("tpm_doc", "words"),
    [
        pytest.param(
            {"endorsementKey": "not base64!"}, "endorsementKey is not valid base64", id="not-base64"
        ),
        pytest.param(
            {"endorsementKey": base64.b64encode(b"\x00\x10" + b"\x00" * 8).decode()},
            "endorsementKey is truncated",
            id="truncated",
        ),
        pytest.param({"endorsementKey": "SRK"}, "is not an RSA-2048 endorsement key", id="srk-as-ek"),
        pytest.param(
            {"endorsementKey": "EK", "storageRootKey": base64.b64encode(b"\x00\x02\x00\x01").decode()},
            "storageRootKey is truncated",
            id="bad-srk",
        ),
        pytest.param({"endorsementKey": ""}, "endorsementKey is required", id="empty"),
    ],
)
def test_a_tpm_enrollment_with_a_bad_key_is_a_400_that_names_the_field(
    admin: Any, tpm_a: TpmSecurity, tpm_doc: dict[str, str], words: str
) -> None:
    keys = {"EK": tpm_a.endorsement_key_b64, "SRK": tpm_a.storage_root_key_b64}
    doc = {field: keys.get(value, value) for field, value in tpm_doc.items()}
    rid = uid()
    with pytest.raises(RequestError) as caught:
        admin.put(f"/enrollments/{rid}", {"registrationId": rid, "attestation": {"type": "tpm", "tpm": doc}})
    assert words in caught.value.message
    assert caught.value.error_code == 400004


def test_a_tpm_registration_id_follows_the_dps_id_rules(admin: Any, tpm_a: TpmSecurity) -> None:
    with pytest.raises(RequestError) as caught:
        enroll(admin, "bad id!", tpm_a.endorsement_key)
    assert caught.value.error_code == InvalidIdError.error_code
    derived = tpm.registration_id(tpm_a.endorsement_key)
    assert enroll(admin, derived, tpm_a.endorsement_key)["registrationId"] == derived
    admin.delete(f"/enrollments/{derived}")


# --- the challenge -------------------------------------------------------------------------------


def test_a_register_without_a_token_gets_the_challenge_body_and_the_tpm_activates_it(
    device_a: Device,
) -> None:
    r = device_a.register()
    assert r.status_code == 401
    body = r.json()
    # C SDK: keyName required, status must be absent (device-protocol.md §2.3).
    assert set(body) == {"message", "authenticationKey", "keyName"}
    assert body["keyName"] == "registration"
    blob = tpm.ActivationBlob.from_b64(body["authenticationKey"])
    assert blob.enc_uri_data == b""
    token = device_a.activate(body)  # ActivateCredential + Import + Load in swtpm: no error
    assert "skn=registration" in token


def test_the_full_registration_passes_and_the_result_wraps_the_hub_key_for_the_tpm(
    server: RunningServer, device_a: Device
) -> None:
    token = device_a.activate(device_a.challenge())
    r = device_a.register(token)
    assert r.status_code == 202, r.text
    op = r.json()
    state = op["registrationState"]
    assert op["status"] == state["status"] == "assigned"
    assert state["deviceId"] == device_a.registration_id and state["assignedHub"]
    assert state["substatus"] == "initialAssignment"
    wrapped = state["tpm"]["authenticationKey"]
    assert tpm.ActivationBlob.from_b64(wrapped)

    # The same token authenticates the poll of that operation.
    poll = device_a.http.get(
        f"/{server.id_scope}/registrations/{device_a.registration_id}/operations/{op['operationId']}",
        params=V,
        headers={"Authorization": token},
    )
    assert poll.status_code == 200 and poll.json()["registrationState"]["tpm"]["authenticationKey"] == wrapped

    # The hub identity has SAS keys; the TPM imports the primary one from the result.
    identity = hub_device(server, state["assignedHub"], state["deviceId"])
    keys = identity["authentication"]["symmetricKey"]
    assert identity["authentication"]["type"] == "sas" and keys["primaryKey"] != keys["secondaryKey"]
    device_a.security._import(tpm.ActivationBlob.from_b64(wrapped), "the test's")
    data = b"builtin-hub/devices/x\n1700000000"
    expected = hmac.new(base64.b64decode(keys["primaryKey"]), data, hashlib.sha256).digest()
    assert device_a.security.sign(data) == expected


def test_a_used_challenge_cannot_register_again(device_a: Device) -> None:
    token = device_a.activate(device_a.challenge())
    assert device_a.register(token).status_code == 202
    assert_denied(device_a.register(token), 401, 401022, "already used", "single use")
    # A new challenge starts over.
    assert device_a.register(device_a.activate(device_a.challenge())).status_code == 202


def test_a_replaced_challenge_no_longer_counts(device_a: Device) -> None:
    old_token = device_a.activate(device_a.challenge())
    device_a.challenge()  # a newer challenge replaces the pending one
    assert_denied(
        device_a.register(old_token), 401, 401002, "not signed with the key of the pending", "newer"
    )


def test_a_token_signed_with_another_key_is_refused(device_a: Device) -> None:
    device_a.activate(device_a.challenge())
    forged = build_sas_token(
        device_a.resource, secrets.token_bytes(32), int(time.time()) + 3600, key_name="registration"
    )
    assert_denied(
        device_a.register(forged), 401, 401002, "not signed with the key of the pending TPM challenge"
    )


def test_a_token_without_a_pending_challenge_is_refused(device_a: Device) -> None:
    forged = build_sas_token(device_a.resource, secrets.token_bytes(32), int(time.time()) + 3600)
    assert_denied(device_a.register(forged), 401, 401022, "No TPM challenge is pending")


def test_a_tampered_blob_is_refused_by_the_tpm(device_a: Device) -> None:
    challenge = device_a.challenge()
    blob = tpm.ActivationBlob.from_b64(challenge["authenticationKey"])

    def flip(data: bytes, at: int) -> bytes:
        return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]

    tampered = [
        ("credential", {"credential_blob": flip(blob.credential_blob, 40)}, "ActivateCredential"),
        ("secret", {"secret": flip(blob.secret, 100)}, "ActivateCredential"),
        ("duplicate", {"duplicate": flip(blob.duplicate, 60)}, "TPM2_Import"),
        ("key", {"object_public": flip(blob.object_public, len(blob.object_public) - 1)}, "TPM2_Import"),
    ]
    for what, change, step in tampered:
        altered = dataclasses.replace(blob, **change)
        with pytest.raises(TpmCommandError) as caught:
            device_a.security.answer_challenge(TpmChallenge(authentication_key=altered.b64()))
        assert step in caught.value.message, (what, caught.value.message)
        assert "not made for this TPM" in caught.value.message, (what, caught.value.message)
    with pytest.raises(TpmFormatError, match="truncated"):
        truncated = base64.b64encode(blob.marshal()[:300]).decode()
        device_a.security.answer_challenge(TpmChallenge(authentication_key=truncated))
    # The untouched blob still works: the TPM refused, nothing was imported half-way.
    assert device_a.register(device_a.activate(challenge)).status_code == 202


def test_a_wrong_ek_gets_no_challenge(server: RunningServer, device_a: Device, tpm_b: TpmSecurity) -> None:
    impostor = Device(server, tpm_b, device_a.registration_id)  # another TPM, same registration id
    try:
        message = assert_denied(impostor.register(), 401, 401021, "not the one of the individual enrollment")
        assert tpm.registration_id(tpm_b.endorsement_key) in message  # names the presented TPM
        assert tpm.registration_id(device_a.security.endorsement_key) in message  # and the enrolled one
    finally:
        impostor.close()


def test_the_ek_of_another_enrollment_is_refused(
    server: RunningServer, admin: Any, device_a: Device, tpm_b: TpmSecurity
) -> None:
    other = Device(server, tpm_b, uid())
    enroll(admin, other.registration_id, tpm_b.endorsement_key)
    try:
        # TPM B is enrolled (under its own id); it cannot register as A's enrollment.
        assert other.register(other.activate(other.challenge())).status_code == 202
        stolen_id = Device(server, tpm_b, device_a.registration_id)
        try:
            assert_denied(
                stolen_id.register(), 401, 401021, f"individual enrollment {device_a.registration_id!r}"
            )
            # Nor with a challenge answered for its own id: the token's audience is its own id.
            token_for_b = other.activate(other.challenge())
            assert_denied(
                stolen_id.register(token_for_b), 401, 401004, "check the ID scope and the registration id"
            )
        finally:
            stolen_id.close()
    finally:
        other.close()


def test_an_enrolled_srk_must_match(
    server: RunningServer, admin: Any, tpm_a: TpmSecurity, tpm_b: TpmSecurity
) -> None:
    device = Device(server, tpm_a, uid())
    enroll(admin, device.registration_id, tpm_a.endorsement_key, tpm_b.storage_root_key)
    try:
        assert_denied(device.register(), 401, 401021, "storage root key is not the one")
        enroll(admin, device.registration_id, tpm_a.endorsement_key, tpm_a.storage_root_key, replace=True)
        assert device.register(device.activate(device.challenge())).status_code == 202
    finally:
        device.close()


def test_the_request_must_carry_an_srk_and_a_tpm_enrollment(
    server: RunningServer, admin: Any, device_a: Device
) -> None:
    no_srk = device_a.body(storageRootKey="")
    assert_denied(device_a.register(body=no_srk), 400, 400004, "tpm.storageRootKey is required")
    bad_ek = device_a.body(endorsementKey=device_a.security.storage_root_key_b64)
    assert_denied(
        device_a.register(body=bad_ek), 400, 400004, "tpm.endorsementKey is not an RSA-2048 endorsement key"
    )
    unknown = Device(server, device_a.security, uid())
    try:
        assert_denied(
            unknown.register(), 401, 401020, "No individual enrollment is named", "provisiond tpm ek"
        )
        admin.put(
            f"/enrollments/{unknown.registration_id}",
            {"registrationId": unknown.registration_id, "attestation": {"type": "symmetricKey"}},
        )
        assert_denied(unknown.register(), 401, 401020, "uses symmetricKey attestation, not TPM")
    finally:
        unknown.close()


def test_the_retried_register_must_present_the_challenged_keys(device_a: Device, tpm_b: TpmSecurity) -> None:
    token = device_a.activate(device_a.challenge())
    swapped = device_a.body(storageRootKey=tpm_b.storage_root_key_b64)
    assert_denied(
        device_a.register(token, body=swapped), 401, 401021, "another endorsement or storage root key"
    )
    # Without tpm in the body (.NET over AMQP sends none) the challenge's keys are used.
    assert device_a.register(token, body={"registrationId": device_a.registration_id}).status_code == 202


# --- in-process: expiry, and single use across two service nodes -------------------------------


async def _enroll_in_store(store: Any, registration_id: str, ek: bytes) -> None:
    enrollment = IndividualEnrollment(
        registration_id=registration_id,
        attestation=AttestationMechanism(
            type=AttestationType.TPM, tpm=TpmAttestation(endorsement_key=base64.b64encode(ek).decode())
        ),
    )
    await store.write(Collection.ENROLLMENTS, registration_id, msgspec.json.encode(enrollment))


async def test_challenges_expire_and_are_single_use_across_nodes(store_url: str, tpm_a: TpmSecurity) -> None:
    now = [1_000_000.0]
    node1, node2 = open_store(store_url), open_store(store_url)
    await node1.open()
    await node2.open()
    try:
        one = TpmAttestor(StoreSources(node1), StoreSources(node1), clock=lambda: now[0], ttl=60)
        two = TpmAttestor(StoreSources(node2), StoreSources(node2), clock=lambda: now[0], ttl=60)
        rid = uid()
        await _enroll_in_store(node1, rid, tpm_a.endorsement_key)

        blob = await one.challenge(rid, tpm_a.endorsement_key, tpm_a.storage_root_key)
        tpm_a.answer_challenge(TpmChallenge(authentication_key=blob.b64()))
        token = sk.check_device_token(
            tpm_a.sas_token(f"scope/registrations/{rid}", int(time.time()) + 600),
            "scope",
            rid,
            now=int(time.time()),
            clock_skew=0,
        )
        # A poll may present it on any node before the register; then two registers race.
        proof = await two.authenticate(token, rid, consume=False)
        assert proof.endorsement_key.tpm2b() == tpm_a.endorsement_key
        outcomes = await asyncio.gather(
            one.authenticate(token, rid, consume=True),
            two.authenticate(token, rid, consume=True),
            return_exceptions=True,
        )
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], AuthenticationError), outcomes
        assert "already used" in errors[0].message

        now[0] += 61
        with pytest.raises(AuthenticationError, match="expired 1 s ago") as caught:
            await two.authenticate(token, rid, consume=False)
        assert caught.value.error_code == 401022
    finally:
        await node1.close()
        await node2.close()
