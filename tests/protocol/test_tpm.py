"""TPM 2.0 marshalling and the service's half of credential activation, without a TPM.

Round trips of every structure, every truncation refused with TpmFormatError, the EK checks
with their messages, and cross-checks against tpm2-pytss (an independent implementation):
the same TPM2B_PUBLIC bytes and Names, the same KDFa, the same MakeCredential output for the
same seed, and a duplication blob that tpm2-pytss unwraps with the parent's private key. That
the blob also works in a real TPM is shown against swtpm in tests/service/test_tpm.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from provisiond.errors import TpmFormatError
from provisiond.protocol import tpm
from provisiond.protocol.tpm import (
    ActivationBlob,
    Alg,
    KeyedHashParameters,
    ObjectAttributes,
    PublicArea,
    RsaParameters,
    SymmetricDefinition,
)

_KEY = rsa.generate_private_key(65537, 2048)


def rsa_key(template: PublicArea = tpm.EK_TEMPLATE, key: rsa.RSAPrivateKey = _KEY) -> PublicArea:
    """``template`` with a software key's modulus (what a TPM would put in ``unique``)."""
    modulus = key.public_key().public_numbers().n.to_bytes(256, "big")
    return PublicArea(
        type=template.type,
        name_alg=template.name_alg,
        object_attributes=template.object_attributes,
        auth_policy=template.auth_policy,
        parameters=template.parameters,
        unique=modulus,
    )


EK = rsa_key()
SRK = rsa_key(tpm.SRK_TEMPLATE)


def counter(n: int) -> bytes:
    """Deterministic 'random' bytes."""
    return bytes(itertools.islice(itertools.cycle(range(1, 251)), n))


# --- marshalling ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "area",
    [
        pytest.param(tpm.EK_TEMPLATE, id="ek-template"),
        pytest.param(tpm.SRK_TEMPLATE, id="srk-template"),
        pytest.param(EK, id="ek"),
        pytest.param(tpm.hmac_key_public(b"k" * 32, b"s" * 32), id="hmac-key"),
        pytest.param(
            PublicArea(
                type=Alg.RSA,
                object_attributes=ObjectAttributes.SIGN_ENCRYPT | ObjectAttributes.USER_WITH_AUTH,
                parameters=RsaParameters(scheme=Alg.RSASSA, scheme_hash=Alg.SHA256, exponent=3),
                unique=b"\x01" * 256,
            ),
            id="rsa-signing-scheme",
        ),
        pytest.param(
            PublicArea(
                type=Alg.KEYEDHASH,
                parameters=KeyedHashParameters(scheme=Alg.XOR, hash_alg=Alg.SHA256, kdf=0x0007),
                unique=b"\x02" * 32,
            ),
            id="keyedhash-xor",
        ),
        pytest.param(
            PublicArea(type=Alg.KEYEDHASH, parameters=KeyedHashParameters(), unique=b""), id="keyedhash-null"
        ),
    ],
)
def test_public_area_round_trips(area: PublicArea) -> None:
    data = area.tpm2b()
    assert int.from_bytes(data[:2], "big") == len(data) - 2
    assert PublicArea.parse(data) == area
    assert PublicArea.parse_tpmt(area.marshal()) == area


def test_every_truncation_and_any_trailing_byte_is_refused() -> None:
    data = EK.tpm2b()
    for length in range(len(data)):
        with pytest.raises(TpmFormatError):
            PublicArea.parse(data[:length])
    with pytest.raises(TpmFormatError, match="unexpected byte"):
        PublicArea.parse(data + b"\x00")
    inner_longer = (len(data) - 1).to_bytes(2, "big") + data[2:] + b"\x00"  # size covers a stray byte
    with pytest.raises(TpmFormatError, match="unexpected byte"):
        PublicArea.parse(inner_longer)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_parsing_garbage_raises_tpm_format_error_or_succeeds(data: bytes) -> None:
    # h11's invariant: parse it, or raise our error, never anything else.
    for parse in (PublicArea.parse, tpm.endorsement_key, ActivationBlob.parse):
        try:
            parse(data)
        except TpmFormatError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=len(EK.tpm2b()) - 1), st.integers(min_value=0, max_value=255))
def test_a_changed_byte_is_either_refused_or_still_parses(offset: int, value: int) -> None:
    data = bytearray(EK.tpm2b())
    data[offset] = value
    try:
        tpm.endorsement_key(bytes(data))
    except TpmFormatError:
        pass


def test_activation_blob_round_trips_and_tolerates_a_missing_trailing_data_field() -> None:
    blob = tpm.make_activation_blob(EK, SRK, b"k" * 32, random=counter)
    raw = blob.marshal()
    assert ActivationBlob.parse(raw) == blob
    assert ActivationBlob.from_b64(blob.b64()) == blob
    assert raw.endswith(b"\x00\x00")  # the trailing TPM2B_DATA, empty (the C and .NET SDKs read it)
    assert ActivationBlob.parse(raw[:-2]) == blob
    for length in range(len(raw) - 2):
        with pytest.raises(TpmFormatError):
            ActivationBlob.parse(raw[:length])
    with pytest.raises(TpmFormatError, match="unexpected byte"):
        ActivationBlob.parse(raw + b"\x00")
    with pytest.raises(TpmFormatError, match="not base64"):
        ActivationBlob.from_b64("not base64!")
    assert blob.object_public_area().type == Alg.KEYEDHASH


def test_the_blob_has_the_six_fields_the_sdks_read() -> None:
    blob = tpm.make_activation_blob(EK, SRK, b"k" * 32, random=counter)
    assert len(blob.secret) == 256 and len(blob.in_sym_seed) == 256  # RSA-2048 OAEP
    integrity_size = int.from_bytes(blob.credential_blob[:2], "big")
    assert integrity_size == 32  # TPM2B_DIGEST(HMAC-SHA256) || encIdentity
    assert len(blob.credential_blob) == 2 + 32 + 2 + 16  # encIdentity = AES-CFB(TPM2B(16-byte credential))
    key = blob.object_public_area()
    assert key.object_attributes == ObjectAttributes.USER_WITH_AUTH | ObjectAttributes.SIGN_ENCRYPT
    assert key.parameters == KeyedHashParameters(scheme=Alg.HMAC, hash_alg=Alg.SHA256)
    assert blob.enc_uri_data == b""


# --- EK and SRK checks ---------------------------------------------------------------------------


def _variant(base: PublicArea, **changes: object) -> bytes:
    fields = {
        "type": base.type,
        "name_alg": base.name_alg,
        "object_attributes": base.object_attributes,
        "auth_policy": base.auth_policy,
        "parameters": base.parameters,
        "unique": base.unique,
    }
    fields.update(changes)
    return PublicArea(**fields).tpm2b()  # type: ignore[arg-type]


def test_the_standard_ek_passes() -> None:
    assert tpm.endorsement_key(EK.tpm2b()) == EK
    assert tpm.storage_root_key(SRK.tpm2b()) == SRK
    assert tpm.EK_TEMPLATE.auth_policy == tpm.EK_AUTH_POLICY


@pytest.mark.parametrize(
    ("data", "words"),
    [
        pytest.param(_variant(EK, name_alg=Alg.SHA1), "name algorithm is SHA1", id="sha1"),
        pytest.param(
            _variant(
                EK, parameters=RsaParameters(symmetric=tpm.AES_128_CFB, key_bits=1024), unique=b"\x01" * 128
            ),
            "RSA-1024",
            id="rsa-1024",
        ),
        pytest.param(
            _variant(EK, object_attributes=EK.object_attributes | ObjectAttributes.SIGN_ENCRYPT),
            "signing key",
            id="signing",
        ),
        pytest.param(
            _variant(EK, object_attributes=EK.object_attributes & ~ObjectAttributes.RESTRICTED),
            "lacks the attribute(s) restricted",
            id="not-restricted",
        ),
        pytest.param(
            _variant(EK, object_attributes=EK.object_attributes & ~ObjectAttributes.FIXED_TPM),
            "lacks the attribute(s) fixedTPM",
            id="not-fixed-tpm",
        ),
        pytest.param(
            _variant(
                EK,
                parameters=RsaParameters(
                    symmetric=SymmetricDefinition(algorithm=Alg.AES, key_bits=256, mode=Alg.CFB)
                ),
            ),
            "AES-256-CFB, not AES-128-CFB",
            id="aes-256",
        ),
        pytest.param(_variant(EK, auth_policy=b""), "authPolicy is not PolicySecret", id="no-ek-policy"),
        pytest.param(SRK.tpm2b(), "lacks the attribute(s) adminWithPolicy", id="srk-as-ek"),
        pytest.param(tpm.hmac_key_public(b"k", b"s").tpm2b(), "not an RSA key", id="keyedhash"),
        pytest.param(b"\x00\x0a\x00\x23\x00\x0b\x00\x03\x00\x72\x00\x00", "ECC key", id="ecc"),
        pytest.param(EK.marshal(), "endorsement key", id="tpmt-without-size"),
    ],
)
def test_an_ek_that_is_not_an_rsa_2048_endorsement_key_is_refused_with_the_reason(
    data: bytes, words: str
) -> None:
    with pytest.raises(TpmFormatError) as caught:
        tpm.endorsement_key(data)
    assert words.lower() in str(caught.value).lower()
    assert "endorsement key" in str(caught.value)


def test_an_srk_needs_not_be_fixed_but_must_be_a_storage_key() -> None:
    srk = _variant(SRK, object_attributes=ObjectAttributes.RESTRICTED | ObjectAttributes.DECRYPT)
    assert tpm.storage_root_key(srk)
    with pytest.raises(TpmFormatError, match="storage root key is not an RSA-2048 storage key"):
        tpm.storage_root_key(_variant(SRK, object_attributes=ObjectAttributes.DECRYPT))


@pytest.mark.parametrize("parse", [tpm.endorsement_key, tpm.storage_root_key])
def test_a_modulus_no_rsa_2048_key_has_is_refused(parse: Callable[[bytes], PublicArea]) -> None:
    """An even modulus passes cryptography's checks but fails OpenSSL's encryption (the
    activation blob); a clear top bit is a smaller key in 256 bytes."""
    area = EK if parse is tpm.endorsement_key else SRK
    n = int.from_bytes(area.unique, "big")
    with pytest.raises(TpmFormatError, match="modulus is even"):
        parse(_variant(area, unique=(n ^ 1).to_bytes(256, "big")))
    with pytest.raises(TpmFormatError, match="2047-bit modulus, not RSA-2048"):
        parse(_variant(area, unique=(n >> 1 | 1).to_bytes(256, "big")))


def test_registration_id_is_lower_case_base32_of_the_ek_sha256_without_padding() -> None:
    ek = EK.tpm2b()
    rid = tpm.registration_id(ek)
    assert len(rid) == 52 and rid == rid.lower() and "=" not in rid
    assert base64.b32decode(rid.upper() + "====") == hashlib.sha256(ek).digest()


# --- KDFa, MakeCredential, duplication (cross-checked with tpm2-pytss) ---------------------------


def test_kdfa_is_sp800_108_counter_mode() -> None:
    # One block by hand: HMAC(key, u32(1) || label || 0 || u || v || u32(bits)).
    expected = hmac.new(b"key", b"\x00\x00\x00\x01STORAGE\x00uv\x00\x00\x01\x00", "sha256").digest()
    assert tpm.kdfa(Alg.SHA256, b"key", b"STORAGE", b"u", b"v", 256) == expected
    assert tpm.kdfa(Alg.SHA256, b"key", b"STORAGE\x00", b"u", b"v", 256) == expected  # NUL-terminated label
    assert len(tpm.kdfa(Alg.SHA256, b"key", b"X", b"", b"", 520)) == 65


@pytest.mark.parametrize("bits", [128, 256, 384, 1024])
def test_kdfa_matches_tpm2_pytss(bits: int) -> None:
    crypto = pytest.importorskip("tpm2_pytss.internal.crypto")
    for label in (b"STORAGE", b"INTEGRITY", b"IDENTITY"):
        ours = tpm.kdfa(Alg.SHA256, b"\x07" * 32, label, b"name", b"", bits)
        assert ours == crypto._kdfa(Alg.SHA256, b"\x07" * 32, label, b"name", b"", bits)


def test_make_credential_matches_tpm2_pytss_for_the_same_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    utils = pytest.importorskip("tpm2_pytss.utils")
    types = pytest.importorskip("tpm2_pytss.types")
    crypto = pytest.importorskip("tpm2_pytss.internal.crypto")
    seed = bytes(range(32))
    credential = b"\xaa" * 16
    name = SRK.name()
    ours_blob, ours_secret = tpm.make_credential(EK, credential, name, random=lambda n: seed[:n])
    monkeypatch.setattr(crypto.secrets, "token_bytes", lambda n: seed[:n])
    public, _ = types.TPM2B_PUBLIC.unmarshal(EK.tpm2b())
    theirs_blob, _ = utils.make_credential(public, credential, types.TPM2B_NAME(name))
    # The encrypted seed is randomized by OAEP; everything derived from the seed must agree.
    assert ours_blob == bytes(theirs_blob)
    label = b"IDENTITY\x00"
    sha = padding.OAEP(
        mgf=padding.MGF1(tpm._HASHES[Alg.SHA256][1]()), algorithm=tpm._HASHES[Alg.SHA256][1](), label=label
    )
    assert _KEY.decrypt(ours_secret, sha) == seed


def test_names_and_public_bytes_match_tpm2_pytss() -> None:
    types = pytest.importorskip("tpm2_pytss.types")
    for area in (EK, SRK, tpm.hmac_key_public(b"k" * 32, b"s" * 32)):
        theirs, consumed = types.TPM2B_PUBLIC.unmarshal(area.tpm2b())
        assert consumed == len(area.tpm2b())
        assert bytes(theirs.marshal()) == area.tpm2b()
        assert bytes(theirs.get_name()) == area.name()


def test_the_duplicate_unwraps_with_tpm2_pytss_and_the_srk_private_key() -> None:
    utils = pytest.importorskip("tpm2_pytss.utils")
    types = pytest.importorskip("tpm2_pytss.types")
    constants = pytest.importorskip("tpm2_pytss.constants")
    key, seed_value, inner_key = b"\x11" * 32, b"\x22" * 32, b"\x33" * 16
    public = tpm.hmac_key_public(key, seed_value)
    sensitive = tpm._sensitive(key, seed_value)
    duplicate, in_sym_seed = tpm.duplicate(SRK, public, sensitive, inner_key)

    pem = _KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    parent_public, _ = types.TPMT_PUBLIC.unmarshal(SRK.marshal())
    unwrapped = utils.unwrap(
        parent_public,
        types.TPMT_SENSITIVE.from_pem(pem),
        types.TPM2B_PUBLIC.unmarshal(public.tpm2b())[0],
        types.TPM2B_PRIVATE(duplicate),
        types.TPM2B_ENCRYPTED_SECRET(secret=in_sym_seed),
        inner_key,
        types.TPMT_SYM_DEF_OBJECT(
            algorithm=constants.TPM2_ALG.AES,
            keyBits=types.TPMU_SYM_KEY_BITS(aes=128),
            mode=types.TPMU_SYM_MODE(aes=constants.TPM2_ALG.CFB),
        ),
    )
    assert bytes(unwrapped.sensitiveArea.sensitive.bits) == key
    assert bytes(unwrapped.sensitiveArea.seedValue) == seed_value
    assert bytes(unwrapped.marshal()) == sensitive
    # unique = H(seedValue || key), which TPM2_Load checks.
    assert public.unique == hashlib.sha256(seed_value + key).digest()
