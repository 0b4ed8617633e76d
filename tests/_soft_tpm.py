"""A TPM's part of DPS's TPM attestation done in software, for in-process tests that need no
TPM libraries: an EK and an SRK whose private keys are here, TPM2_ActivateCredential and
TPM2_Import of the service's activation blob (device-protocol.md §5.6), written from TPM 2.0
Part 1 §24 independently of ``provisiond.protocol.tpm``'s maker (its KDFa is reused; KDFa is
checked against tpm2-pytss in tests/protocol/test_tpm.py). The real TPM path is tested against
swtpm (tests/service/test_tpm.py)."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import struct

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from provisiond.protocol import tpm

__all__ = ["SoftTpm"]


def _area(template: tpm.PublicArea, key: rsa.RSAPrivateKey) -> tpm.PublicArea:
    modulus = key.public_key().public_numbers().n.to_bytes(256, "big")
    return tpm.PublicArea(
        type=template.type,
        name_alg=template.name_alg,
        object_attributes=template.object_attributes,
        auth_policy=template.auth_policy,
        parameters=template.parameters,
        unique=modulus,
    )


@functools.cache
def _private_key(name: str) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def _split_tpm2b(data: bytes) -> tuple[bytes, bytes]:
    (size,) = struct.unpack(">H", data[:2])
    return data[2 : 2 + size], data[2 + size :]


def _decrypt_cfb(key: bytes, data: bytes) -> bytes:
    decryptor = Cipher(algorithms.AES(key), CFB(bytes(16))).decryptor()
    return decryptor.update(data) + decryptor.finalize()


def _unprotect(seed: bytes, name: bytes, protected: bytes) -> bytes:
    """Check the outer HMAC and decrypt (Part 1 §24.4: AES-128 under KDFa(seed, "STORAGE"))."""
    integrity, encrypted = _split_tpm2b(protected)
    hmac_key = tpm.kdfa(tpm.Alg.SHA256, seed, b"INTEGRITY", b"", b"", 256)
    if not hmac.compare_digest(integrity, hmac.new(hmac_key, encrypted + name, "sha256").digest()):
        raise ValueError("integrity check failed")
    return _decrypt_cfb(tpm.kdfa(tpm.Alg.SHA256, seed, b"STORAGE", name, b"", 128), encrypted)


class SoftTpm:
    """A TPM with an EK and an SRK (``name`` picks the keys; the same name, the same TPM)."""

    def __init__(self, name: str = "a") -> None:
        self._ek_key = _private_key(f"{name}/ek")
        self._srk_key = _private_key(f"{name}/srk")
        self.ek = _area(tpm.EK_TEMPLATE, self._ek_key)
        self.srk = _area(tpm.SRK_TEMPLATE, self._srk_key)

    @property
    def ek_b64(self) -> str:
        return base64.b64encode(self.ek.tpm2b()).decode()

    @property
    def srk_b64(self) -> str:
        return base64.b64encode(self.srk.tpm2b()).decode()

    def _oaep_decrypt(self, key: rsa.RSAPrivateKey, data: bytes, label: bytes) -> bytes:
        return key.decrypt(data, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), label))

    def activate(self, authentication_key: str) -> bytes:
        """The HMAC key of an activation blob: ActivateCredential with the EK (bound to the
        SRK's name) gives the inner wrapper key, which unwraps the duplicate imported under the
        SRK.

        :raises ValueError: the blob is not for this TPM.
        """
        blob = tpm.ActivationBlob.from_b64(authentication_key)
        seed = self._oaep_decrypt(self._ek_key, blob.secret, b"IDENTITY\x00")
        credential, _ = _split_tpm2b(_unprotect(seed, self.srk.name(), blob.credential_blob))
        obj = blob.object_public_area()
        seed = self._oaep_decrypt(self._srk_key, blob.in_sym_seed, b"DUPLICATE\x00")
        inner = _decrypt_cfb(credential, _unprotect(seed, obj.name(), blob.duplicate))
        digest, sensitive_2b = _split_tpm2b(inner)
        if digest != hashlib.sha256(sensitive_2b + obj.name()).digest():
            raise ValueError("inner integrity check failed")
        sensitive, _ = _split_tpm2b(sensitive_2b)
        _auth, rest = _split_tpm2b(sensitive[2:])  # after the TPMT_SENSITIVE's type
        _seed_value, rest = _split_tpm2b(rest)
        key, _ = _split_tpm2b(rest)
        return key
