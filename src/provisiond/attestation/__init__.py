"""Attestation on the service side: one :class:`~provisiond.attestation.base.Attestor` per
attestation type (symmetric key, X.509, TPM). The checks are pure; what the attestors read
(enrollments, CA certificates, TPM challenges) comes through the protocols of :mod:`.base`, so
this package imports nothing from ``storage`` or ``service`` (tests/test_layering.py)."""
