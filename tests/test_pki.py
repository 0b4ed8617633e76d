"""provisiond.pki: certificate profiles, chains, PKCS#12, files, and the service's dev PKI."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import re
import socket
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from provisiond import pki
from provisiond.errors import ConfigurationError


@pytest.fixture(scope="module")
def root() -> pki.Issued:
    return pki.make_root_ca("Test Root CA")


@pytest.fixture(scope="module")
def intermediate(root: pki.Issued) -> pki.Issued:
    return pki.make_intermediate_ca("Test Intermediate CA", root)


@pytest.fixture(scope="module")
def device(intermediate: pki.Issued) -> pki.Issued:
    return pki.make_device_cert("device-001", intermediate)


def ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


def assert_key_identifiers(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert isinstance(ski, x509.SubjectKeyIdentifier) and isinstance(aki, x509.AuthorityKeyIdentifier)
    issuer_ski = ext(issuer, x509.SubjectKeyIdentifier).value
    assert isinstance(issuer_ski, x509.SubjectKeyIdentifier)
    assert aki.key_identifier == issuer_ski.digest


def client_verifier(*anchors: x509.Certificate) -> x509.verification.ClientVerifier:
    # Device certificates have no SAN, so the end-entity policy must not demand one (libraries.md §1).
    return (
        PolicyBuilder()
        .store(Store(list(anchors)))
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
        )
        .build_client_verifier()
    )


def test_root_ca_profile(root: pki.Issued) -> None:
    cert = root.cert
    assert root.is_self_signed and root.chain == ()
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value == x509.BasicConstraints(ca=True, path_length=None)
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical
    assert isinstance(usage.value, x509.KeyUsage) and usage.value.key_cert_sign and usage.value.crl_sign
    assert_key_identifiers(cert, cert)


def test_intermediate_ca_profile(root: pki.Issued, intermediate: pki.Issued) -> None:
    cert = intermediate.cert
    cert.verify_directly_issued_by(root.cert)
    assert ext(cert, x509.BasicConstraints).value == x509.BasicConstraints(ca=True, path_length=0)
    assert ext(cert, x509.KeyUsage).critical
    assert_key_identifiers(cert, root.cert)
    assert intermediate.chain == ()  # the root is never part of a chain


def test_device_chain_verifies_from_the_root_and_from_the_intermediate(
    root: pki.Issued, intermediate: pki.Issued, device: pki.Issued
) -> None:
    assert device.chain == (intermediate.cert,)
    assert device.presented_chain == [device.cert, intermediate.cert]
    assert_key_identifiers(device.cert, intermediate.cert)
    eku = ext(device.cert, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage) and list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        ext(device.cert, x509.SubjectAlternativeName)
    assert ext(device.cert, x509.BasicConstraints).value == x509.BasicConstraints(ca=False, path_length=None)

    verified = client_verifier(root.cert).verify(device.cert, list(device.chain))
    assert verified.chain == [device.cert, intermediate.cert, root.cert]
    client_verifier(intermediate.cert).verify(device.cert, [])


def test_chain_below_a_second_intermediate(root: pki.Issued, intermediate: pki.Issued) -> None:
    lower = pki.make_intermediate_ca("Lower CA", intermediate, path_length=None)
    leaf = pki.make_device_cert("deep-device", lower)
    assert leaf.chain == (lower.cert, intermediate.cert)


def test_self_signed_device(root: pki.Issued) -> None:
    device = pki.make_device_cert("lonely-device")
    assert device.is_self_signed and device.chain == ()
    assert_key_identifiers(device.cert, device.cert)
    with pytest.raises(VerificationError):
        client_verifier(root.cert).verify(device.cert, [])


def test_expired_device_certificate_through_overrides(intermediate: pki.Issued) -> None:
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    end = dt.datetime(2021, 1, 1, tzinfo=dt.UTC)
    device = pki.make_device_cert("old-device", intermediate, not_before=start, not_after=end)
    assert device.cert.not_valid_before_utc == start
    assert device.cert.not_valid_after_utc == end
    short = pki.make_device_cert("short-device", None, not_before=start, days=2)
    assert short.cert.not_valid_after_utc - start == dt.timedelta(days=2, minutes=5)
    with pytest.raises(ValueError, match="later"):
        pki.make_device_cert("x", not_before=end, not_after=start)


def test_server_certificate_profile(root: pki.Issued) -> None:
    server = pki.make_server_cert(root, ["localhost", "dps.example.test", "10.0.0.7"], ["::1"])
    san = ext(server.cert, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "dps.example.test"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    ]
    eku = ext(server.cert, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage) and list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert_key_identifiers(server.cert, root.cert)
    assert server.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    with pytest.raises(ValueError, match="at least one"):
        pki.make_server_cert(root, [])


def test_rsa_keys() -> None:
    ca = pki.make_root_ca("RSA Root", key_type="rsa")
    server = pki.make_server_cert(ca, ["localhost"], key_type="rsa")
    assert server.cert.signature_hash_algorithm is not None
    assert isinstance(server.cert.signature_hash_algorithm, hashes.SHA256)
    usage = ext(server.cert, x509.KeyUsage).value
    assert isinstance(usage, x509.KeyUsage) and usage.key_encipherment
    with pytest.raises(ValueError, match="unknown key type"):
        pki.generate_key("dsa")  # type: ignore[arg-type]


def test_verification_certificate_proves_possession(root: pki.Issued, intermediate: pki.Issued) -> None:
    for ca in (root, intermediate):
        proof = pki.make_verification_cert("2F6A9C1B0E", ca)
        assert proof.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "2F6A9C1B0E"
        proof.cert.verify_directly_issued_by(ca.cert)
        assert_key_identifiers(proof.cert, ca.cert)
    other = pki.make_root_ca("Someone else")
    with pytest.raises(ValueError):
        pki.make_verification_cert("2F6A9C1B0E", other).cert.verify_directly_issued_by(root.cert)


def test_pkcs12_round_trip(device: pki.Issued) -> None:
    data = pki.to_pkcs12(device, "s3cret")
    back = pki.load_pkcs12(data, "s3cret")
    assert back.cert == device.cert
    assert back.chain == device.chain
    assert back.key.public_key() == device.key.public_key()
    with pytest.raises(ValueError, match="wrong password"):
        pki.load_pkcs12(data, "wrong")
    with pytest.raises(ValueError, match="wrong password"):
        pki.load_pkcs12(b"not pkcs12", "s3cret")
    with pytest.raises(ValueError, match="non-empty password"):
        pki.to_pkcs12(device, "")


def test_certificate_info(root: pki.Issued) -> None:
    key = pki.generate_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Contoso, Ltd"),
            x509.NameAttribute(NameOID.COMMON_NAME, "leaf"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(0x80FF)  # top bit set: DER adds a 00 octet
        .not_valid_before(dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
        .sign(root.key, hashes.SHA256())
    )
    info = pki.certificate_info(cert)
    assert info["subjectName"] == r"CN=leaf, O=Contoso\, Ltd, C=US"
    assert info["issuerName"] == "CN=Test Root CA"
    assert info["serialNumber"] == "0080FF"
    assert info["notBeforeUtc"] == "2024-01-02T03:04:05Z"
    assert info["notAfterUtc"] == "2025-01-02T03:04:05Z"
    assert info["version"] == 3
    assert re.fullmatch(r"[0-9A-F]{40}", str(info["sha1Thumbprint"]))
    assert re.fullmatch(r"[0-9A-F]{64}", str(info["sha256Thumbprint"]))
    assert info["sha256Thumbprint"] == cert.fingerprint(hashes.SHA256()).hex().upper()


def test_load_pem_chain(device: pki.Issued) -> None:
    text = pki.certificate_pem(*device.presented_chain).decode()
    assert pki.load_pem_chain(text) == device.presented_chain
    assert pki.load_pem_chain(text.encode()) == device.presented_chain
    with pytest.raises(ValueError):
        pki.load_pem_chain("no certificate here")


def test_load_certificate_in_every_form_clients_send(device: pki.Issued) -> None:
    pem = pki.certificate_pem(device.cert)
    b64_pem = base64.b64encode(pem).decode()
    forms = {
        "pem": pem.decode(),
        "pem-with-blank-lines": f"\n\n{pem.decode()}\n",
        "base64-der": base64.b64encode(pki.certificate_der(device.cert)).decode(),
        "base64-pem": b64_pem,  # the C service client's form
        "base64-pem-wrapped": "\r\n".join(b64_pem[i : i + 76] for i in range(0, len(b64_pem), 76)),
    }
    for form, text in forms.items():
        assert pki.load_certificate(text) == device.cert, form
    for junk, words in [
        ("no certificate here", "neither PEM text nor base64"),
        (base64.b64encode(b"\x30\x03\x02\x01\x01").decode(), "."),  # base64 of DER that is no certificate
        (pki.certificate_pem(*device.presented_chain).decode(), "2 certificates where one was expected"),
    ]:
        with pytest.raises(ValueError, match=words):
            pki.load_certificate(junk)


def test_load_certificate_keeps_der_that_ends_in_a_whitespace_byte() -> None:
    # The last DER byte is the signature's: any value, a space or a line feed included (a loader
    # that strips the decoded bytes breaks about 1 certificate in 40).
    for _ in range(2000):
        cert = pki.make_device_cert("whitespace-tail").cert
        der = pki.certificate_der(cert)
        if der[-1:] in (b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x0c"):
            break
    else:  # pragma: no cover - (1 - 6/256) ** 2000 is about 1e-21
        pytest.fail("no certificate ended in a whitespace byte")
    assert pki.load_certificate(base64.b64encode(der).decode()) == cert


def test_write_and_read_a_credential(tmp_path: Path, device: pki.Issued) -> None:
    prefix = tmp_path / "out" / "device.example.com"  # dots in the name are kept
    written = pki.write_issued(device, prefix)
    assert [p.name for p in written] == [
        "device.example.com.pem",
        "device.example.com.key",
        "device.example.com-chain.pem",
    ]
    assert stat.S_IMODE(pki.key_path(prefix).stat().st_mode) == 0o600
    assert pki.load_pem_chain(pki.chain_path(prefix).read_bytes()) == device.presented_chain
    back = pki.read_issued(prefix)
    assert back.cert == device.cert and back.chain == device.chain

    lonely = pki.make_device_cert("lonely")
    assert len(pki.write_issued(lonely, tmp_path / "lonely")) == 2  # no intermediates, no chain file
    assert len(pki.write_issued(lonely, tmp_path / "lonely", chain=True)) == 3

    with pytest.raises(ConfigurationError, match="no such file"):
        pki.read_issued(tmp_path / "missing")
    pki.write_private_key(pki.key_path(prefix), pki.generate_key())
    with pytest.raises(ConfigurationError, match="is not the key of"):
        pki.read_issued(prefix)


def test_encrypted_private_key_round_trip(device: pki.Issued) -> None:
    pem = pki.private_key_pem(device.key, "pw")
    assert b"ENCRYPTED" in pem
    assert pki.load_private_key(pem, "pw").public_key() == device.key.public_key()
    with pytest.raises(ValueError):
        pki.load_private_key(pem)


# --- ensure_dev_pki --------------------------------------------------------------------------


def server_cert(files: pki.ServerTlsFiles) -> x509.Certificate:
    return pki.load_pem_chain(files.cert_file.read_bytes())[0]


def test_ensure_dev_pki_creates_then_reuses(tmp_path: Path) -> None:
    files = pki.ensure_dev_pki(tmp_path, ["dps.example.test"])
    assert files.ca_file == tmp_path / "pki" / "ca.pem"
    assert stat.S_IMODE(files.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "pki" / "ca.key").stat().st_mode) == 0o600
    chain = pki.load_pem_chain(files.cert_file.read_bytes())
    ca = x509.load_pem_x509_certificate(files.ca_file.read_bytes())
    assert chain[1] == ca
    chain[0].verify_directly_issued_by(ca)
    san = ext(chain[0], x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    names = set(san.get_values_for_type(x509.DNSName))
    assert {"localhost", "dps.example.test", socket.gethostname().lower()} <= names
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")} <= set(
        san.get_values_for_type(x509.IPAddress)
    )

    before = {p.name: p.read_bytes() for p in (tmp_path / "pki").iterdir()}
    assert (
        pki.ensure_dev_pki(tmp_path, ["DPS.example.test"]) == files
    )  # host names compare case-insensitively
    assert {p.name: p.read_bytes() for p in (tmp_path / "pki").iterdir()} == before


def test_ensure_dev_pki_reissues_for_a_new_host_name_or_near_expiry(tmp_path: Path) -> None:
    files = pki.ensure_dev_pki(tmp_path)
    ca_pem = files.ca_file.read_bytes()
    first = server_cert(files)

    pki.ensure_dev_pki(tmp_path, ["new.example.test", "192.0.2.10"])
    second = server_cert(files)
    assert second.serial_number != first.serial_number
    san = ext(second, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert "new.example.test" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("192.0.2.10") in san.get_values_for_type(x509.IPAddress)
    assert files.ca_file.read_bytes() == ca_pem  # the CA clients trust stays

    soon = second.not_valid_after_utc - dt.timedelta(days=10)
    pki.ensure_dev_pki(tmp_path, ["new.example.test", "192.0.2.10"], now=soon)
    assert server_cert(files).serial_number != second.serial_number
    assert files.ca_file.read_bytes() == ca_pem


def test_ensure_dev_pki_replaces_a_damaged_server_certificate_but_not_the_ca(tmp_path: Path) -> None:
    files = pki.ensure_dev_pki(tmp_path)
    files.cert_file.write_text("garbage")
    pki.ensure_dev_pki(tmp_path)
    server_cert(files).verify_directly_issued_by(x509.load_pem_x509_certificate(files.ca_file.read_bytes()))

    (tmp_path / "pki" / "ca.key").write_text("garbage")
    with pytest.raises(ConfigurationError, match="ca"):
        pki.ensure_dev_pki(tmp_path)


def test_ensure_dev_pki_refuses_an_expired_ca(tmp_path: Path) -> None:
    files = pki.ensure_dev_pki(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca_file.read_bytes())
    with pytest.raises(ConfigurationError, match="expired"):
        pki.ensure_dev_pki(tmp_path, now=ca.not_valid_after_utc + dt.timedelta(days=1))
