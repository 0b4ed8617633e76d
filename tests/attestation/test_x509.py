"""The pure X.509 attestation checks (the wire-level cases are in tests/service/test_device_api.py)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from provisiond import pki
from provisiond.attestation import x509 as x5
from provisiond.errors import AuthenticationError, DpsCode

# The checks' "now": an hour after import, so that certificates the tests make later (valid from
# the moment they are made) are valid at it however long the suite ran before this module's
# tests (a suite ordered differently failed here).
NOW = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)


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


def test_a_remembered_path_still_checks_every_leaf_and_every_date() -> None:
    """After one device's chain verifies, devices presenting the same intermediates have only
    their own link checked (_VerifiedPaths): a forged or expired leaf is still refused, and so
    is the whole path once an intermediate has expired."""
    root = pki.make_root_ca("root")
    inter = pki.make_intermediate_ca("inter", root, days=30)
    x5.verify_chain(chain_of(pki.make_device_cert("first", inter)), root.cert, NOW)
    assert x5._VERIFIED_PATHS.issuer(root.cert, (inter.cert,)) == inter.cert
    x5.verify_chain(chain_of(pki.make_device_cert("second", inter)), root.cert, NOW)

    # Signed by another key under the same issuer name, presented with the real intermediate.
    impostor_ca = pki.make_intermediate_ca("inter", root)
    forged = pki.make_device_cert("forged", impostor_ca)
    with pytest.raises(AuthenticationError, match="does not verify") as refused:
        x5.verify_chain(x5.PresentedChain(forged.cert, (inter.cert,)), root.cert, NOW)
    assert refused.value.error_code == DpsCode.X509_CHAIN_INVALID

    expired = pki.make_device_cert(
        "expired", inter, not_before=NOW - dt.timedelta(days=9), not_after=NOW - dt.timedelta(days=1)
    )
    with pytest.raises(AuthenticationError, match="expired"):
        x5.verify_chain(chain_of(expired), root.cert, NOW)

    later = NOW + dt.timedelta(days=60)  # the intermediate has expired, the leaf has not
    fresh = pki.make_device_cert("fresh", inter, not_before=NOW, days=365)
    with pytest.raises(AuthenticationError, match="intermediate certificate .* expired"):
        x5.verify_chain(chain_of(fresh), root.cert, later)


def _name_constrained_root(permitted_dns: str) -> pki.Issued:
    key = pki.generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "constrained root")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.NameConstraints(permitted_subtrees=[x509.DNSName(permitted_dns)], excluded_subtrees=None),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return pki.Issued(cert, key)


def _leaf_with_dns_name(cn: str, issuer: pki.Issued, dns: str) -> x509.Certificate:
    key = pki.generate_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=10))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )


def test_a_path_under_name_constraints_is_checked_whole_for_every_leaf() -> None:
    """A root's name constraints bind every leaf below it; checked against the intermediate
    alone (the remembered path's short check) a leaf outside them would pass."""
    root = _name_constrained_root("allowed.example")
    inter = pki.make_intermediate_ca("inter", root)
    inside = _leaf_with_dns_name("inside", inter, "dev.allowed.example")
    x5.verify_chain(x5.PresentedChain(inside, (inter.cert,)), root.cert, NOW)
    assert x5._VERIFIED_PATHS.issuer(root.cert, (inter.cert,)) is None
    outside = _leaf_with_dns_name("outside", inter, "dev.elsewhere.example")
    with pytest.raises(AuthenticationError, match="name constraints"):
        x5.verify_chain(x5.PresentedChain(outside, (inter.cert,)), root.cert, NOW)


def test_an_enrolled_certificate_with_an_extension_twice_fails_attestation_not_the_service() -> None:
    """An enrolled certificate whose extensions cannot be read (enrolled before that was refused)
    is no signer: a device presenting another certificate gets 401011, not a 500 (is_ca raised
    DuplicateExtension, a traceback for every such registration); a group anchored on it too."""
    from provisiond.certificates import certificate_pem, load_certificate
    from tests.factories import duplicate_extension_certificate

    broken = duplicate_extension_certificate("dev")
    with pytest.raises(x509.DuplicateExtension):
        broken.extensions  # noqa: B018
    assert x5.is_ca(broken) is False
    device = pki.make_device_cert("dev")
    with pytest.raises(AuthenticationError) as refused:
        x5.match_individual("dev", [broken], chain_of(device), NOW)
    assert refused.value.error_code == DpsCode.X509_CHAIN_INVALID
    assert x5.find_anchor(chain_of(device), [("group", broken)]) is None
    with pytest.raises(ValueError, match=r"extension 1\.3\.6\.1\.4\.1\.99999\.1 twice"):
        load_certificate(certificate_pem(broken).decode())  # and enrolling it is refused (400004)


def test_a_forbidden_key_algorithm_is_named_plainly_not_dumped() -> None:
    """An intermediate with an Ed25519 key (outside the verifier's policy): the verifier's
    message dumped the algorithm's parameters (a DSA prime of any size the peer chose made a
    300 KB error and log line); the error says it in one sentence."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    root = pki.make_root_ca("root")
    now = dt.datetime.now(dt.UTC)

    def issued(
        subject: str, public_key: object, issuer: x509.Name, signer: object, *, ca: bool
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        return builder.sign(signer, algorithm)  # type: ignore[arg-type]

    inter_key = ed25519.Ed25519PrivateKey.generate()
    inter = issued("inter", inter_key.public_key(), root.cert.subject, root.key, ca=True)
    leaf = issued(
        "dev", ec.generate_private_key(ec.SECP256R1()).public_key(), inter.subject, inter_key, ca=False
    )
    with pytest.raises(AuthenticationError) as refused:
        x5.verify_chain(x5.PresentedChain(leaf, (inter,)), root.cert, NOW)
    message = refused.value.message
    assert "public key algorithm is not allowed" in message and len(message) < 400, message
    assert "AlgorithmIdentifier" not in message


def test_a_ca_whose_key_usage_lacks_key_cert_sign_signs_no_device() -> None:
    """RFC 5280: a CA certificate with a keyUsage must allow keyCertSign. The permissive CA policy
    left that check out, and a chain through an intermediate allowed only digitalSignature was
    accepted; it is refused (401011), and the same intermediate with keyCertSign verifies."""
    from cryptography.hazmat.primitives.asymmetric import ec

    root = pki.make_root_ca("root")
    now = dt.datetime.now(dt.UTC)

    def chain(key_cert_sign: bool) -> x5.PresentedChain:
        inter_key = ec.generate_private_key(ec.SECP256R1())
        usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=key_cert_sign,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
        inter = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inter")]))
            .issuer_name(root.cert.subject)
            .public_key(inter_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .sign(root.key, hashes.SHA256())  # type: ignore[arg-type]
        )
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev")]))
            .issuer_name(inter.subject)
            .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(inter_key, hashes.SHA256())
        )
        return x5.PresentedChain(leaf, (inter,))

    x5.verify_chain(chain(key_cert_sign=True), root.cert, NOW)
    with pytest.raises(AuthenticationError, match="keyUsage lacks keyCertSign") as refused:
        x5.verify_chain(chain(key_cert_sign=False), root.cert, NOW)
    assert refused.value.error_code == DpsCode.X509_CHAIN_INVALID
