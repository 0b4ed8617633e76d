"""TPM 2.0 structures and the service's half of credential activation. Pure: no TPM, no I/O;
random bytes come from the ``random`` callable the caller passes.

Theory of operation
===================

A TPM device proves itself to DPS without sharing a secret in advance (device-protocol.md
§2.3, §5.4-5.6). The device sends the public parts of two keys that never leave its TPM: the
endorsement key (EK, enrolled by the operator) and the storage root key (SRK). Both travel as a
marshalled ``TPM2B_PUBLIC``: a big-endian ``u16`` size, then the ``TPMT_PUBLIC``.

The service answers with an **activation blob** (:class:`ActivationBlob`) of six ``TPM2B``
fields that only that TPM can open:

1. ``credential_blob`` and 2. ``secret``: TPM2_MakeCredential (:func:`make_credential`) of a
   random 16-byte credential, encrypted to the EK and bound to the SRK's Name, so that
   TPM2_ActivateCredential(SRK, EK) on the device's TPM (and no other) recovers it;
3. ``duplicate`` and 4. ``in_sym_seed``: the duplication (:func:`duplicate`) of a fresh HMAC
   key under the SRK, with the credential as the inner wrapper key, so that TPM2_Import only
   works after the activation;
5. ``object_public``: the HMAC key's public area (:func:`hmac_key_public`);
6. ``enc_uri_data``: an empty ``TPM2B_DATA`` (the SDKs read its size).

The device then signs SAS tokens with TPM2_HMAC under the imported key, which the service
verifies with the key it made (:func:`make_activation_blob` returns both).

Every ``parse`` here raises :class:`~provisiond.errors.TpmFormatError` (a ``ValueError``) that
names the structure and what is wrong with it; nothing else escapes for malformed input.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from ..errors import TpmFormatError

__all__ = [
    "EK_AUTH_POLICY",
    "EK_HANDLE",
    "EK_TEMPLATE",
    "IDENTITY_KEY_HANDLE",
    "SRK_HANDLE",
    "SRK_TEMPLATE",
    "AES_128_CFB",
    "ActivationBlob",
    "Alg",
    "KeyedHashParameters",
    "ObjectAttributes",
    "PublicArea",
    "RsaParameters",
    "SymmetricDefinition",
    "duplicate",
    "endorsement_key",
    "hmac_key_public",
    "kdfa",
    "make_activation_blob",
    "make_credential",
    "registration_id",
    "storage_root_key",
]

Random = Callable[[int], bytes]

#: Persistent handles every SDK uses (device-protocol.md §5.4).
EK_HANDLE = 0x81010001
SRK_HANDLE = 0x81000001
IDENTITY_KEY_HANDLE = 0x81000100

#: PolicySecret(TPM_RH_ENDORSEMENT): the EK's authPolicy in the TCG EK template.
EK_AUTH_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")

_MAX_TPM2B = 0xFFFF


class Alg(enum.IntEnum):
    """TPM_ALG_ID values this module knows."""

    RSA = 0x0001
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    KEYEDHASH = 0x0008
    XOR = 0x000A
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    RSASSA = 0x0014
    RSAES = 0x0015
    RSAPSS = 0x0016
    OAEP = 0x0017
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CFB = 0x0043


class ObjectAttributes(enum.IntFlag):
    """TPMA_OBJECT bits."""

    FIXED_TPM = 0x00000002
    ST_CLEAR = 0x00000004
    FIXED_PARENT = 0x00000010
    SENSITIVE_DATA_ORIGIN = 0x00000020
    USER_WITH_AUTH = 0x00000040
    ADMIN_WITH_POLICY = 0x00000080
    NO_DA = 0x00000400
    ENCRYPTED_DUPLICATION = 0x00000800
    RESTRICTED = 0x00010000
    DECRYPT = 0x00020000
    SIGN_ENCRYPT = 0x00040000


_HASHES: dict[Alg, tuple[str, type[hashes.HashAlgorithm]]] = {
    Alg.SHA1: ("sha1", hashes.SHA1),
    Alg.SHA256: ("sha256", hashes.SHA256),
    Alg.SHA384: ("sha384", hashes.SHA384),
    Alg.SHA512: ("sha512", hashes.SHA512),
}
# Schemes whose TPMU details are a hash algorithm (TPMS_SCHEME_HASH); RSAES has none.
_RSA_SCHEMES_WITH_HASH = {Alg.RSASSA, Alg.RSAPSS, Alg.OAEP}


def _hash_name(alg: int) -> str:
    try:
        return _HASHES[Alg(alg)][0]
    except (ValueError, KeyError):
        raise TpmFormatError(f"Unsupported hash algorithm 0x{alg:04x}.") from None


def _digest(alg: int, *parts: bytes) -> bytes:
    h = hashlib.new(_hash_name(alg))
    for part in parts:
        h.update(part)
    return h.digest()


def _digest_size(alg: int) -> int:
    return hashlib.new(_hash_name(alg)).digest_size


def _alg_name(value: int) -> str:
    try:
        return Alg(value).name
    except ValueError:
        return f"0x{value:04x}"


# --- marshalling helpers -------------------------------------------------------------------------


class _Reader:
    """Reads big-endian TPM types from ``data``, raising TpmFormatError when it runs out."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.offset = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if self.offset + n > len(self.data):
            raise TpmFormatError(
                f"{self.what} is truncated: {n} more byte(s) needed at offset {self.offset}, "
                f"{len(self.data) - self.offset} left."
            )
        chunk = self.data[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def u16(self) -> int:
        value: int = struct.unpack(">H", self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def tpm2b(self) -> bytes:
        return self.take(self.u16())

    def done(self) -> None:
        if self.offset != len(self.data):
            raise TpmFormatError(
                f"{self.what} has {len(self.data) - self.offset} unexpected byte(s) after offset {self.offset}."
            )


def _tpm2b(data: bytes) -> bytes:
    if len(data) > _MAX_TPM2B:
        raise ValueError(f"{len(data)} bytes do not fit a TPM2B")
    return struct.pack(">H", len(data)) + data


# --- TPMT_PUBLIC ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SymmetricDefinition:
    """TPMT_SYM_DEF_OBJECT; ``algorithm`` NULL means none."""

    algorithm: int = Alg.NULL
    key_bits: int = 0
    mode: int = Alg.NULL

    def marshal(self) -> bytes:
        if self.algorithm == Alg.NULL:
            return struct.pack(">H", Alg.NULL)
        return struct.pack(">HHH", self.algorithm, self.key_bits, self.mode)

    @classmethod
    def unmarshal(cls, reader: _Reader) -> SymmetricDefinition:
        algorithm = reader.u16()
        if algorithm == Alg.NULL:
            return cls()
        return cls(algorithm=algorithm, key_bits=reader.u16(), mode=reader.u16())


AES_128_CFB = SymmetricDefinition(algorithm=Alg.AES, key_bits=128, mode=Alg.CFB)


@dataclass(frozen=True, slots=True, kw_only=True)
class RsaParameters:
    """TPMS_RSA_PARMS. ``exponent`` 0 means the default, 65537."""

    symmetric: SymmetricDefinition = field(default_factory=SymmetricDefinition)
    scheme: int = Alg.NULL
    scheme_hash: int | None = None
    key_bits: int = 2048
    exponent: int = 0

    def marshal(self) -> bytes:
        scheme = struct.pack(">H", self.scheme)
        if self.scheme in _RSA_SCHEMES_WITH_HASH:
            scheme += struct.pack(">H", self.scheme_hash or Alg.NULL)
        return self.symmetric.marshal() + scheme + struct.pack(">HI", self.key_bits, self.exponent)

    @classmethod
    def unmarshal(cls, reader: _Reader) -> RsaParameters:
        symmetric = SymmetricDefinition.unmarshal(reader)
        scheme = reader.u16()
        scheme_hash = reader.u16() if scheme in _RSA_SCHEMES_WITH_HASH else None
        return cls(
            symmetric=symmetric,
            scheme=scheme,
            scheme_hash=scheme_hash,
            key_bits=reader.u16(),
            exponent=reader.u32(),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyedHashParameters:
    """TPMS_KEYEDHASH_PARMS: the scheme (HMAC, XOR or NULL) and its hash (and XOR's KDF)."""

    scheme: int = Alg.NULL
    hash_alg: int | None = None
    kdf: int | None = None

    def marshal(self) -> bytes:
        out = struct.pack(">H", self.scheme)
        if self.scheme == Alg.HMAC:
            out += struct.pack(">H", self.hash_alg or Alg.NULL)
        elif self.scheme == Alg.XOR:
            out += struct.pack(">HH", self.hash_alg or Alg.NULL, self.kdf or Alg.NULL)
        return out

    @classmethod
    def unmarshal(cls, reader: _Reader) -> KeyedHashParameters:
        scheme = reader.u16()
        if scheme == Alg.HMAC:
            return cls(scheme=scheme, hash_alg=reader.u16())
        if scheme == Alg.XOR:
            return cls(scheme=scheme, hash_alg=reader.u16(), kdf=reader.u16())
        if scheme != Alg.NULL:
            raise TpmFormatError(f"Unknown keyed-hash scheme {_alg_name(scheme)}.")
        return cls()


@dataclass(frozen=True, slots=True, kw_only=True)
class PublicArea:
    """TPMT_PUBLIC of an RSA or KEYEDHASH object (the types DPS's protocol uses).

    ``unique`` is the RSA modulus, or the keyed-hash object's digest.
    """

    type: int
    name_alg: int = Alg.SHA256
    object_attributes: ObjectAttributes = ObjectAttributes(0)
    auth_policy: bytes = b""
    parameters: RsaParameters | KeyedHashParameters
    unique: bytes = b""

    def marshal(self) -> bytes:
        """The TPMT_PUBLIC bytes (what the Name hashes)."""
        return (
            struct.pack(">HHI", self.type, self.name_alg, int(self.object_attributes))
            + _tpm2b(self.auth_policy)
            + self.parameters.marshal()
            + _tpm2b(self.unique)
        )

    def tpm2b(self) -> bytes:
        """The TPM2B_PUBLIC bytes (what travels on the wire)."""
        return _tpm2b(self.marshal())

    def name(self) -> bytes:
        """The object's Name: ``u16(nameAlg) || H_nameAlg(TPMT_PUBLIC)``."""
        return struct.pack(">H", self.name_alg) + _digest(self.name_alg, self.marshal())

    @classmethod
    def parse(cls, data: bytes, what: str = "TPM2B_PUBLIC") -> PublicArea:
        """Parse a TPM2B_PUBLIC (size, then exactly one TPMT_PUBLIC)."""
        outer = _Reader(data, what)
        inner = outer.tpm2b()
        outer.done()
        return cls.parse_tpmt(inner, what)

    @classmethod
    def parse_tpmt(cls, data: bytes, what: str = "TPMT_PUBLIC") -> PublicArea:
        """Parse a TPMT_PUBLIC (no size prefix)."""
        reader = _Reader(data, what)
        type_ = reader.u16()
        name_alg = reader.u16()
        attributes = ObjectAttributes(reader.u32())
        auth_policy = reader.tpm2b()
        parameters: RsaParameters | KeyedHashParameters
        if type_ == Alg.RSA:
            parameters = RsaParameters.unmarshal(reader)
        elif type_ == Alg.KEYEDHASH:
            parameters = KeyedHashParameters.unmarshal(reader)
        elif type_ == Alg.ECC:
            raise TpmFormatError(f"{what} is an ECC key; only RSA keys are supported (as by DPS).")
        else:
            raise TpmFormatError(f"{what} has object type {_alg_name(type_)}; expected RSA or KEYEDHASH.")
        unique = reader.tpm2b()
        reader.done()
        return cls(
            type=type_,
            name_alg=name_alg,
            object_attributes=attributes,
            auth_policy=auth_policy,
            parameters=parameters,
            unique=unique,
        )

    def rsa_public_key(self) -> rsa.RSAPublicKey:
        """The RSA public key (``cryptography``) of an RSA object."""
        if not isinstance(self.parameters, RsaParameters):
            raise TpmFormatError("Not an RSA key.")
        exponent = self.parameters.exponent or 65537
        modulus = int.from_bytes(self.unique, "big")
        if modulus % 2 == 0:  # cryptography takes it, and OpenSSL then fails to encrypt with it
            raise TpmFormatError("The RSA public key is invalid: its modulus is even.")
        try:
            return rsa.RSAPublicNumbers(exponent, modulus).public_key()
        except ValueError as exc:
            raise TpmFormatError(f"The RSA public key is invalid: {exc}") from None


EK_TEMPLATE = PublicArea(
    type=Alg.RSA,
    name_alg=Alg.SHA256,
    object_attributes=ObjectAttributes.FIXED_TPM
    | ObjectAttributes.FIXED_PARENT
    | ObjectAttributes.SENSITIVE_DATA_ORIGIN
    | ObjectAttributes.ADMIN_WITH_POLICY
    | ObjectAttributes.RESTRICTED
    | ObjectAttributes.DECRYPT,
    auth_policy=EK_AUTH_POLICY,
    parameters=RsaParameters(symmetric=AES_128_CFB, key_bits=2048),
    unique=bytes(256),  # TCG EK Credential Profile, template L-1 (what tpm2_createek makes)
)
"""The TCG default RSA-2048 EK template (the EK the SDKs and tpm2-tools create)."""

SRK_TEMPLATE = PublicArea(
    type=Alg.RSA,
    name_alg=Alg.SHA256,
    object_attributes=ObjectAttributes.FIXED_TPM
    | ObjectAttributes.FIXED_PARENT
    | ObjectAttributes.SENSITIVE_DATA_ORIGIN
    | ObjectAttributes.USER_WITH_AUTH
    | ObjectAttributes.NO_DA
    | ObjectAttributes.RESTRICTED
    | ObjectAttributes.DECRYPT,
    parameters=RsaParameters(symmetric=AES_128_CFB, key_bits=2048),
    unique=b"",  # as the C SDK's template
)
"""The RSA-2048 storage root key template of the SDKs (device-protocol.md §5.4)."""


# --- EK and SRK validation -----------------------------------------------------------------------


def _storage_key(data: bytes, what: str, *, endorsement: bool) -> PublicArea:
    key = PublicArea.parse(data, what)
    problems: list[str] = []
    if key.type != Alg.RSA or not isinstance(key.parameters, RsaParameters):
        raise TpmFormatError(f"The {what} is a {_alg_name(key.type)} object, not an RSA key.")
    modulus_bits = int.from_bytes(key.unique, "big").bit_length()
    if key.parameters.key_bits != 2048 or modulus_bits != 2048:
        problems.append(
            f"it is RSA-{key.parameters.key_bits} with a {modulus_bits}-bit modulus, not RSA-2048"
        )
    if key.name_alg != Alg.SHA256:
        problems.append(f"its name algorithm is {_alg_name(key.name_alg)}, not SHA256")
    needed = ObjectAttributes.RESTRICTED | ObjectAttributes.DECRYPT
    if endorsement:
        needed |= (
            ObjectAttributes.FIXED_TPM | ObjectAttributes.FIXED_PARENT | ObjectAttributes.ADMIN_WITH_POLICY
        )
    missing = needed & ~key.object_attributes
    if missing:
        problems.append(f"it lacks the attribute(s) {_flags(missing)}")
    if endorsement and key.auth_policy != EK_AUTH_POLICY:
        # The SDKs (and provisiond's device) satisfy the EK's policy with PolicySecret(ENDORSEMENT).
        problems.append("its authPolicy is not PolicySecret(TPM_RH_ENDORSEMENT) (the TCG default EK's)")
    if ObjectAttributes.SIGN_ENCRYPT in key.object_attributes:
        problems.append("it is a signing key, not a decryption (storage) key")
    if key.parameters.symmetric != AES_128_CFB:
        sym = key.parameters.symmetric
        problems.append(
            f"its symmetric algorithm is {_alg_name(sym.algorithm)}-{sym.key_bits}-{_alg_name(sym.mode)}, not AES-128-CFB"
        )
    if key.parameters.scheme != Alg.NULL:
        problems.append(f"its scheme is {_alg_name(key.parameters.scheme)}, not NULL")
    if problems:
        raise TpmFormatError(
            f"The {what} is not an RSA-2048 {('endorsement' if endorsement else 'storage')} key: "
            + "; ".join(problems)
            + "."
        )
    key.rsa_public_key()  # the modulus must make a usable key
    return key


_ATTRIBUTE_NAMES = {  # the spelling of TPM 2.0 Part 2 (TPMA_OBJECT)
    ObjectAttributes.FIXED_TPM: "fixedTPM",
    ObjectAttributes.ST_CLEAR: "stClear",
    ObjectAttributes.FIXED_PARENT: "fixedParent",
    ObjectAttributes.SENSITIVE_DATA_ORIGIN: "sensitiveDataOrigin",
    ObjectAttributes.USER_WITH_AUTH: "userWithAuth",
    ObjectAttributes.ADMIN_WITH_POLICY: "adminWithPolicy",
    ObjectAttributes.NO_DA: "noDA",
    ObjectAttributes.ENCRYPTED_DUPLICATION: "encryptedDuplication",
    ObjectAttributes.RESTRICTED: "restricted",
    ObjectAttributes.DECRYPT: "decrypt",
    ObjectAttributes.SIGN_ENCRYPT: "sign",
}


def _flags(flags: ObjectAttributes) -> str:
    return "|".join(name for flag, name in _ATTRIBUTE_NAMES.items() if flag in flags)


def endorsement_key(data: bytes, what: str = "endorsement key") -> PublicArea:
    """Parse and check an EK: a TPM2B_PUBLIC of an RSA-2048, SHA-256, fixedTPM, restricted
    decryption key with AES-128-CFB (the TCG default EK, and what DPS accepts).

    :raises TpmFormatError: what is wrong with it.
    """
    return _storage_key(data, what, endorsement=True)


def storage_root_key(data: bytes, what: str = "storage root key") -> PublicArea:
    """Parse and check an SRK: an RSA-2048, SHA-256, restricted decryption key with AES-128-CFB.

    :raises TpmFormatError: what is wrong with it.
    """
    return _storage_key(data, what, endorsement=False)


def registration_id(endorsement_key_tpm2b: bytes) -> str:
    """The registration id the SDKs derive from an EK: lower-case base32 (RFC 4648) of
    SHA-256 of the TPM2B_PUBLIC bytes, '=' stripped (device-protocol.md §5.4)."""
    digest = hashlib.sha256(endorsement_key_tpm2b).digest()
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()


# --- KDFa, MakeCredential, duplication -----------------------------------------------------------


def kdfa(hash_alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """TPM 2.0 Part 1 §11.4.10.2 KDFa (SP 800-108 counter mode with HMAC): the ``bits`` first
    bits of ``HMAC(key, u32(i) || label || 0x00 || contextU || contextV || u32(bits))``, i = 1.."""
    name = _hash_name(hash_alg)
    if label.endswith(b"\x00"):
        label = label[:-1]
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        message = (
            struct.pack(">I", counter) + label + b"\x00" + context_u + context_v + struct.pack(">I", bits)
        )
        out += hmac.new(key, message, name).digest()
    out = out[: (bits + 7) // 8]
    if bits % 8:  # unused in this protocol: mask the leading bits as the spec says
        out = bytes([out[0] & ((1 << (bits % 8)) - 1)]) + out[1:]
    return out


def _cfb(key: bytes, data: bytes) -> bytes:
    # TPM convention: AES-CFB (full-block feedback) with an all-zero IV.
    encryptor = Cipher(algorithms.AES(key), CFB(bytes(16))).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def _symmetric_key_bytes(key: PublicArea) -> int:
    assert isinstance(key.parameters, RsaParameters)
    sym = key.parameters.symmetric
    if sym.algorithm != Alg.AES or sym.mode != Alg.CFB or sym.key_bits not in (128, 192, 256):
        raise TpmFormatError(
            f"The key's symmetric algorithm must be AES-CFB, not {_alg_name(sym.algorithm)}."
        )
    return sym.key_bits // 8


def _encrypt_seed(key: PublicArea, label: bytes, random: Random) -> tuple[bytes, bytes]:
    """A fresh seed (nameAlg digest size) and its RSA-OAEP encryption to ``key``."""
    seed = random(_digest_size(key.name_alg))
    algorithm = _HASHES[Alg(key.name_alg)][1]()
    encrypted = key.rsa_public_key().encrypt(
        seed, padding.OAEP(mgf=padding.MGF1(algorithm), algorithm=algorithm, label=label)
    )
    return seed, encrypted


def _protect(key: PublicArea, seed: bytes, name: bytes, data: bytes) -> bytes:
    """Part 1 §24.4: ``TPM2B(HMAC(integrityKey, enc || name)) || enc`` with
    ``enc = AES-CFB(KDFa(seed, "STORAGE", name), data)`` (the credential blob and the outer
    wrapper of a duplicate have this one shape)."""
    enc = _cfb(kdfa(key.name_alg, seed, b"STORAGE", name, b"", _symmetric_key_bytes(key) * 8), data)
    hmac_key = kdfa(key.name_alg, seed, b"INTEGRITY", b"", b"", _digest_size(key.name_alg) * 8)
    integrity = hmac.new(hmac_key, enc + name, _hash_name(key.name_alg)).digest()
    return _tpm2b(integrity) + enc


def make_credential(
    key: PublicArea, credential: bytes, object_name: bytes, *, random: Random = secrets.token_bytes
) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software: ``credential`` for the TPM holding ``key`` (the EK),
    bound to ``object_name`` (the Name of the key the device activates with, the SRK's here).

    :returns: the contents of the TPM2B_ID_OBJECT (credentialBlob) and of the
        TPM2B_ENCRYPTED_SECRET (secret), without their size prefixes.
    """
    if len(credential) > _digest_size(key.name_alg):
        raise ValueError("The credential must not be longer than the key's name digest.")
    seed, secret = _encrypt_seed(key, b"IDENTITY\x00", random)
    return _protect(key, seed, object_name, _tpm2b(credential)), secret


def hmac_key_public(sensitive: bytes, seed_value: bytes, *, hash_alg: int = Alg.SHA256) -> PublicArea:
    """The public area of an importable HMAC key (device-protocol.md §5.6 step 3): KEYEDHASH,
    userWithAuth|sign (fixedTPM/fixedParent clear, as TPM2_Import requires), empty auth
    policy, HMAC scheme, and ``unique = H(seedValue || key)``."""
    return PublicArea(
        type=Alg.KEYEDHASH,
        name_alg=hash_alg,
        object_attributes=ObjectAttributes.USER_WITH_AUTH | ObjectAttributes.SIGN_ENCRYPT,
        parameters=KeyedHashParameters(scheme=Alg.HMAC, hash_alg=hash_alg),
        unique=_digest(hash_alg, seed_value, sensitive),
    )


def _sensitive(key: bytes, seed_value: bytes) -> bytes:
    """TPM2B_SENSITIVE of a keyed-hash object with an empty authValue."""
    tpmt = struct.pack(">H", Alg.KEYEDHASH) + _tpm2b(b"") + _tpm2b(seed_value) + _tpm2b(key)
    return _tpm2b(tpmt)


def duplicate(
    parent: PublicArea,
    obj: PublicArea,
    sensitive: bytes,
    inner_key: bytes,
    *,
    random: Random = secrets.token_bytes,
) -> tuple[bytes, bytes]:
    """Part 1 §23.3 duplication of an object for import under ``parent``, with an inner
    wrapper (AES-CFB under ``inner_key``) and an outer one (seed encrypted to ``parent``).

    :param sensitive: the object's TPM2B_SENSITIVE bytes.
    :returns: the contents of the TPM2B_PRIVATE (duplicate) and of the TPM2B_ENCRYPTED_SECRET
        (inSymSeed), without their size prefixes.
    """
    name = obj.name()
    inner = _tpm2b(_digest(obj.name_alg, sensitive, name)) + sensitive
    enc_sensitive = _cfb(inner_key, inner)
    seed, in_sym_seed = _encrypt_seed(parent, b"DUPLICATE\x00", random)
    return _protect(parent, seed, name, enc_sensitive), in_sym_seed


# --- the activation blob -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivationBlob:
    """DPS's ``authenticationKey`` (device-protocol.md §5.5): six TPM2B fields, held here
    without their size prefixes. ``object_public`` is the TPMT_PUBLIC of the key to import."""

    credential_blob: bytes
    secret: bytes
    duplicate: bytes
    in_sym_seed: bytes
    object_public: bytes
    enc_uri_data: bytes = b""

    def marshal(self) -> bytes:
        return b"".join(
            _tpm2b(part)
            for part in (
                self.credential_blob,
                self.secret,
                self.duplicate,
                self.in_sym_seed,
                self.object_public,
                self.enc_uri_data,
            )
        )

    def b64(self) -> str:
        return base64.b64encode(self.marshal()).decode("ascii")

    @classmethod
    def parse(cls, data: bytes) -> ActivationBlob:
        """Parse the blob; the trailing TPM2B_DATA may be absent (read as empty), nothing may
        follow it.

        :raises TpmFormatError: truncated, or with bytes left over.
        """
        reader = _Reader(data, "The activation blob")
        fields = [reader.tpm2b() for _ in range(5)]
        uri = reader.tpm2b() if reader.offset < len(data) else b""
        reader.done()
        if not all(fields):
            raise TpmFormatError("The activation blob has an empty field.")
        return cls(
            credential_blob=fields[0],
            secret=fields[1],
            duplicate=fields[2],
            in_sym_seed=fields[3],
            object_public=fields[4],
            enc_uri_data=uri,
        )

    @classmethod
    def from_b64(cls, text: str) -> ActivationBlob:
        try:
            raw = base64.b64decode(text, validate=True)
        except ValueError:
            raise TpmFormatError("The activation blob is not base64.") from None
        return cls.parse(raw)

    def object_public_area(self) -> PublicArea:
        return PublicArea.parse_tpmt(self.object_public, "The activation blob's objectPublic")


def make_activation_blob(
    ek: PublicArea,
    srk: PublicArea,
    key: bytes,
    *,
    random: Random = secrets.token_bytes,
) -> ActivationBlob:
    """The blob that gives the TPM holding ``ek`` and ``srk`` the HMAC key ``key``, and
    nobody else (device-protocol.md §5.6). Import needs the 16-byte credential (the inner
    wrapper key), which only ActivateCredential with this EK, bound to this SRK, recovers."""
    credential = random(16)
    credential_blob, secret = make_credential(ek, credential, srk.name(), random=random)
    seed_value = random(_digest_size(Alg.SHA256))
    public = hmac_key_public(key, seed_value)
    dup, in_sym_seed = duplicate(srk, public, _sensitive(key, seed_value), credential, random=random)
    return ActivationBlob(
        credential_blob=credential_blob,
        secret=secret,
        duplicate=dup,
        in_sym_seed=in_sym_seed,
        object_public=public.marshal(),
    )
