"""Structurally valid TPM keys made in software, for tests that need an endorsement key an
enrollment accepts but no TPM (the TPM itself is tested against swtpm)."""

from __future__ import annotations

import base64
import functools

from cryptography.hazmat.primitives.asymmetric import rsa

from provisiond.protocol import tpm


@functools.cache
def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def software_ek(seed: int = 0) -> str:
    """Base64 TPM2B_PUBLIC of an RSA-2048 EK with the standard template (``seed`` varies it)."""
    modulus = _key().public_key().public_numbers().n + 2 * seed
    template = tpm.EK_TEMPLATE
    area = tpm.PublicArea(
        type=template.type,
        name_alg=template.name_alg,
        object_attributes=template.object_attributes,
        auth_policy=template.auth_policy,
        parameters=template.parameters,
        unique=modulus.to_bytes(256, "big"),
    )
    return base64.b64encode(area.tpm2b()).decode()
