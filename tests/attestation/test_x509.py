"""The pure X.509 attestation checks (the wire-level cases are in tests/service/test_device_api.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from provisiond import pki
from provisiond.attestation import x509 as x5
from provisiond.errors import AuthenticationError, DpsCode

NOW = dt.datetime.now(dt.UTC)


def chain_of(issued: pki.Issued) -> x5.PresentedChain:
    return x5.parse_presented_chain([pki.certificate_der(c) for c in issued.presented_chain])


def test_an_individual_enrollment_matches_its_leaf_or_a_ca_that_signed_it() -> None:
    root = pki.make_root_ca("root")
    inter = pki.make_intermediate_ca("inter", root)
    leaf = pki.make_device_cert("dev", inter)
    x5.match_individual("dev", [leaf.cert], chain_of(leaf), NOW)  # the leaf itself
    x5.match_individual("dev", [inter.cert], chain_of(leaf), NOW)  # its signing CA, in the chain
    x5.match_individual("dev", [root.cert], chain_of(leaf), NOW)  # the issuer of the top
    with pytest.raises(AuthenticationError, match="not the certificate of the individual enrollment"):
        x5.match_individual("dev", [pki.make_device_cert("dev").cert], chain_of(leaf), NOW)
    # A leaf is never a signer, even when its name matches the issuer's.
    impostor = pki.make_device_cert("inter")
    with pytest.raises(AuthenticationError):
        x5.match_individual("dev", [impostor.cert], chain_of(leaf), NOW)


def test_the_walk_starts_at_the_first_intermediate_and_the_first_match_decides() -> None:
    root = pki.make_root_ca("root")
    upper = pki.make_intermediate_ca("upper", root, path_length=1)
    lower = pki.make_intermediate_ca("lower", upper)
    leaf = pki.make_device_cert("dev", lower)
    chain = chain_of(leaf)
    candidates = [("on-root", root.cert), ("on-upper", upper.cert), ("on-lower", lower.cert)]
    assert x5.find_anchor(chain, candidates) == ("on-lower", lower.cert)
    assert x5.find_anchor(chain, candidates[:2]) == ("on-upper", upper.cert)
    assert x5.find_anchor(chain, candidates[:1]) == ("on-root", root.cert)  # issuer of the top
    assert x5.find_anchor(chain, [("leaf", leaf.cert)]) is None  # the leaf is not a group anchor
    assert x5.find_anchor(chain, []) is None


def test_verify_chain_refuses_expired_and_foreign_chains() -> None:
    root = pki.make_root_ca("root")
    leaf = pki.make_device_cert(
        "dev", root, not_before=NOW - dt.timedelta(days=9), not_after=NOW - dt.timedelta(days=1)
    )
    with pytest.raises(AuthenticationError, match="expired") as expired:
        x5.verify_chain(chain_of(leaf), root.cert, NOW)
    assert expired.value.error_code == DpsCode.X509_EXPIRED
    other = pki.make_root_ca("root")  # same name, other key
    with pytest.raises(AuthenticationError, match="does not verify"):
        x5.verify_chain(chain_of(pki.make_device_cert("dev", root)), other.cert, NOW)


def test_the_presented_chain_must_parse_and_be_present() -> None:
    with pytest.raises(AuthenticationError) as none:
        x5.parse_presented_chain([])
    assert none.value.error_code == DpsCode.X509_NO_CERTIFICATE
    with pytest.raises(AuthenticationError, match="does not parse"):
        x5.parse_presented_chain([b"not a certificate"])
