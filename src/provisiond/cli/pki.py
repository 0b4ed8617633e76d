"""``provisiond pki``: make a development PKI (like the Azure IoT SDK samples' certificate scripts)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import click
from cryptography import x509

from .. import pki as _pki
from ..errors import ProvisioningError

__all__ = ["pki"]

_KEY_TYPE = click.option(
    "--key-type",
    type=click.Choice(["ec", "rsa"]),
    default="ec",
    show_default=True,
    help="ECDSA P-256 or RSA 2048.",
)
_FORCE = click.option("--force", is_flag=True, help="Replace files that already exist.")


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn the causes users can fix into one-line messages and a non-zero exit."""
    try:
        yield
    except ProvisioningError as exc:
        raise click.ClickException(exc.message) from exc
    except FileNotFoundError as exc:
        raise click.ClickException(f"{exc.filename}: no such file") from exc
    except OSError as exc:
        raise click.ClickException(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from exc
    except (ValueError, TypeError) as exc:
        raise click.ClickException(str(exc)) from exc


def _prefix(value: str) -> Path:
    """``DIR/NAME``, also accepting ``DIR/NAME.pem`` or ``DIR/NAME.key``."""
    path = Path(value)
    return path.with_suffix("") if path.suffix in (".pem", ".key") else path


def _file_name(name: str) -> str:
    if not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
        raise click.BadParameter(f"{name!r} cannot be a file name; pass --name")
    return name


def _check_free(paths: list[Path], force: bool) -> None:
    if not force:
        for path in paths:
            if path.exists():
                raise click.ClickException(f"{path} exists; pass --force to replace it")


def _read_ca(prefix: str) -> _pki.Issued:
    with _errors():
        ca = _pki.read_issued(_prefix(prefix))
    try:
        is_ca = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise click.ClickException(f"{_pki.cert_path(_prefix(prefix))} is not a CA certificate")
    return ca


def _write(issued: _pki.Issued, prefix: Path, *, chain: bool | None, force: bool) -> None:
    paths = [_pki.cert_path(prefix), _pki.key_path(prefix)]
    if chain or (chain is None and issued.chain):
        paths.append(_pki.chain_path(prefix))
    _check_free(paths, force)
    with _errors():
        written = _pki.write_issued(issued, prefix, chain=chain)
    for path in written:
        click.echo(f"wrote {path}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def pki() -> None:
    """Make a development PKI: CAs, device certificates, PKCS#12 files, proof of possession.

    A credential on disk is a prefix DIR/NAME: NAME.pem holds the certificate alone, NAME.key its
    private key (PKCS#8 PEM, mode 0600), and NAME-chain.pem the certificate followed by its
    intermediate CAs (never the root), which is what a device presents. Options that take a CA
    (--ca) take such a prefix, e.g. --ca certs/root.

    \b
    Typical use:
      provisiond pki root --out-dir certs --cn "My Root CA"
      provisiond pki intermediate --ca certs/root --cn "My Intermediate CA" --out-dir certs
      provisiond pki device --ca certs/intermediate --cn my-device-01 --out-dir certs
      provisiond pki verification-cert --ca certs/root --code <CODE> --out certs/verification.pem
    These certificates are for development and tests, not for production devices.
    """


@pki.command()
@click.option(
    "--out-dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Where to write."
)
@click.option("--cn", required=True, help="Subject common name of the CA.")
@click.option("--name", default="root", show_default=True, help="File name prefix inside --out-dir.")
@click.option("--days", type=click.IntRange(min=1), default=3650, show_default=True, help="Validity in days.")
@_KEY_TYPE
@_FORCE
def root(out_dir: Path, cn: str, name: str, days: int, key_type: _pki.KeyType, force: bool) -> None:
    """Make a self-signed root CA: OUT_DIR/NAME.pem and OUT_DIR/NAME.key."""
    issued = _pki.make_root_ca(cn, key_type=key_type, days=days)
    _write(issued, out_dir / _file_name(name), chain=False, force=force)


@pki.command()
@click.option("--ca", "ca_prefix", required=True, help="Issuing CA prefix, e.g. certs/root.")
@click.option("--cn", required=True, help="Subject common name of the intermediate CA.")
@click.option(
    "--out-dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Where to write."
)
@click.option("--name", default="intermediate", show_default=True, help="File name prefix inside --out-dir.")
@click.option("--days", type=click.IntRange(min=1), default=1825, show_default=True, help="Validity in days.")
@_KEY_TYPE
@_FORCE
def intermediate(
    ca_prefix: str, cn: str, out_dir: Path, name: str, days: int, key_type: _pki.KeyType, force: bool
) -> None:
    """Make an intermediate CA signed by --ca: NAME.pem, NAME.key and NAME-chain.pem.

    It can sign device certificates but no further CAs (path length 0).
    """
    ca = _read_ca(ca_prefix)
    if ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0:
        raise click.ClickException(
            f"{ca_prefix} may sign device certificates only, not another CA (path length 0)"
        )
    issued = _pki.make_intermediate_ca(cn, ca, key_type=key_type, days=days)
    _write(issued, out_dir / _file_name(name), chain=True, force=force)


@pki.command()
@click.option("--cn", required=True, help="Subject common name: the device's registration id.")
@click.option(
    "--ca", "ca_prefix", default=None, help="Issuing CA prefix; omit for a self-signed certificate."
)
@click.option(
    "--out-dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Where to write."
)
@click.option("--name", default=None, help="File name prefix inside --out-dir  [default: the CN]")
@click.option("--days", type=click.IntRange(min=1), default=365, show_default=True, help="Validity in days.")
@click.option(
    "--chain/--no-chain",
    default=True,
    show_default=True,
    help="Also write NAME-chain.pem (certificate + intermediates) for the device client.",
)
@_KEY_TYPE
@_FORCE
def device(
    cn: str,
    ca_prefix: str | None,
    out_dir: Path,
    name: str | None,
    days: int,
    chain: bool,
    key_type: _pki.KeyType,
    force: bool,
) -> None:
    """Make a device certificate (client authentication) for X.509 attestation.

    Signed by --ca for enrollment groups, self-signed without it for individual enrollments
    (register its thumbprint, printed below, or the certificate itself).
    """
    ca = _read_ca(ca_prefix) if ca_prefix is not None else None
    issued = _pki.make_device_cert(cn, ca, key_type=key_type, days=days)
    _write(issued, out_dir / _file_name(name if name is not None else cn), chain=chain, force=force)
    info = _pki.certificate_info(issued.cert)
    click.echo(f"SHA-1 thumbprint:   {info['sha1Thumbprint']}")
    click.echo(f"SHA-256 thumbprint: {info['sha256Thumbprint']}")


@pki.command()
@click.option(
    "--cert", "cert_file", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Leaf PEM."
)
@click.option(
    "--key", "key_file", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Its key."
)
@click.option(
    "--chain",
    "chain_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM with intermediates (a NAME-chain.pem that starts with the leaf is fine).",
)
@click.option("--key-password", default=None, help="Password of an encrypted --key.")
@click.option(
    "--password",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    help="Password protecting the PKCS#12 file (prompted for if not given).",
)
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .pfx/.p12 to write."
)
@_FORCE
def pkcs12(
    cert_file: Path,
    key_file: Path,
    chain_file: Path | None,
    key_password: str | None,
    password: str,
    out: Path,
    force: bool,
) -> None:
    """Bundle a certificate, its key and its intermediates into a password-protected PKCS#12 file."""
    with _errors():
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = _pki.load_private_key(key_file.read_bytes(), key_password)
        chain = _pki.load_pem_chain(chain_file.read_bytes()) if chain_file is not None else []
    if cert.public_key() != key.public_key():
        raise click.ClickException(f"{key_file} is not the key of {cert_file}")
    issued = _pki.Issued(cert, key, tuple(c for c in chain if c != cert))
    _check_free([out], force)
    with _errors():
        data = _pki.to_pkcs12(issued, password)
        _pki.write_private_bytes(out, data)
    click.echo(f"wrote {out}")


@pki.command("verification-cert")
@click.option("--ca", "ca_prefix", required=True, help="The CA to prove possession of, e.g. certs/root.")
@click.option("--code", required=True, help="The verification code the service generated.")
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .pem to write."
)
@_FORCE
def verification_cert(ca_prefix: str, code: str, out: Path, force: bool) -> None:
    """Make the proof-of-possession certificate for a CA: subject CN = the verification code,
    signed by the CA's key. Upload it to finish verifying the CA."""
    ca = _read_ca(ca_prefix)
    issued = _pki.make_verification_cert(code, ca)
    _check_free([out], force)
    with _errors():
        _pki.write_certificates(out, [issued.cert])
    click.echo(f"wrote {out}")


@pki.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--password", default=None, help="Password of a PKCS#12 file.")
def show(file: Path, password: str | None) -> None:
    """Print what the service records about each certificate in a PEM or PKCS#12 FILE
    (subject, issuer, thumbprints, validity)."""
    with _errors():
        data = file.read_bytes()
        if b"-----BEGIN" in data:
            certs = _pki.load_pem_chain(data)
        else:
            issued = _pki.load_pkcs12(data, password)
            certs = issued.presented_chain
    for index, cert in enumerate(certs):
        if index:
            click.echo()
        for field, value in _pki.certificate_info(cert).items():
            click.echo(f"{field + ':':<18}{value}")
