"""Attestation: produce (device side) and verify (service side) device proofs. Pure: no I/O."""
