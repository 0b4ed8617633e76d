"""``provisiond pki``: the files each command writes, and its errors."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from provisiond import pki
from provisiond.cli import cli


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def run(runner: CliRunner, *args: str | Path) -> Result:
    return runner.invoke(cli, ["pki", *map(str, args)], catch_exceptions=False)


@pytest.fixture
def ca_dir(runner: CliRunner, tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    assert run(runner, "root", "--out-dir", out, "--cn", "CLI Root").exit_code == 0
    result = run(runner, "intermediate", "--ca", out / "root", "--cn", "CLI Intermediate", "--out-dir", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    "command", [[], ["root"], ["intermediate"], ["device"], ["pkcs12"], ["verification-cert"], ["show"]]
)
def test_every_command_has_help(runner: CliRunner, command: list[str]) -> None:
    result = run(runner, *command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_root_and_intermediate(ca_dir: Path) -> None:
    root = pki.read_issued(ca_dir / "root")
    inter = pki.read_issued(ca_dir / "intermediate")
    assert root.is_self_signed
    inter.cert.verify_directly_issued_by(root.cert)
    assert pki.load_pem_chain((ca_dir / "intermediate-chain.pem").read_bytes()) == [inter.cert]
    assert stat.S_IMODE((ca_dir / "root.key").stat().st_mode) == 0o600


def test_device_under_the_intermediate_prints_what_it_wrote(runner: CliRunner, ca_dir: Path) -> None:
    result = run(
        runner, "device", "--ca", ca_dir / "intermediate", "--cn", "cli-device-01", "--out-dir", ca_dir
    )
    assert result.exit_code == 0, result.output
    for name in ("cli-device-01.pem", "cli-device-01.key", "cli-device-01-chain.pem"):
        assert f"wrote {ca_dir / name}" in result.output
    device = pki.read_issued(ca_dir / "cli-device-01")
    inter = pki.read_issued(ca_dir / "intermediate")
    assert device.presented_chain == [device.cert, inter.cert]
    assert str(pki.certificate_info(device.cert)["sha256Thumbprint"]) in result.output


def test_self_signed_device_without_chain_and_validity(runner: CliRunner, tmp_path: Path) -> None:
    result = run(runner, "device", "--cn", "solo", "--out-dir", tmp_path, "--no-chain", "--days", "2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["solo.key", "solo.pem"]
    device = pki.read_issued(tmp_path / "solo")
    assert device.is_self_signed
    lifetime = device.cert.not_valid_after_utc - device.cert.not_valid_before_utc
    assert lifetime.days == 2


def test_pkcs12_then_show(runner: CliRunner, ca_dir: Path) -> None:
    run(runner, "device", "--ca", ca_dir / "intermediate", "--cn", "pfx-device", "--out-dir", ca_dir)
    out = ca_dir / "pfx-device.pfx"
    args: list[str | Path] = ["--cert", ca_dir / "pfx-device.pem", "--key", ca_dir / "pfx-device.key"]
    result = run(
        runner, "pkcs12", *args, "--chain", ca_dir / "pfx-device-chain.pem", "--password", "pw", "--out", out
    )
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    bundle = pki.load_pkcs12(out.read_bytes(), "pw")
    assert bundle.presented_chain == pki.read_issued(ca_dir / "pfx-device").presented_chain

    shown = run(runner, "show", out, "--password", "pw")
    assert shown.exit_code == 0
    assert "subjectName:      CN=pfx-device" in shown.output
    assert "issuerName:       CN=CLI Root" in shown.output  # the intermediate is listed too

    wrong = run(runner, "show", out, "--password", "nope")
    assert wrong.exit_code == 1
    assert "wrong password" in wrong.output


def test_pkcs12_prompts_for_the_password(runner: CliRunner, ca_dir: Path) -> None:
    run(runner, "device", "--cn", "prompted", "--out-dir", ca_dir)
    args: list[str | Path] = [
        "--cert",
        ca_dir / "prompted.pem",
        "--key",
        ca_dir / "prompted.key",
        "--out",
        ca_dir / "p.pfx",
    ]
    result = runner.invoke(cli, ["pki", "pkcs12", *map(str, args)], input="pw\npw\n")
    assert result.exit_code == 0, result.output
    assert (
        pki.load_pkcs12((ca_dir / "p.pfx").read_bytes(), "pw").cert.subject.rfc4514_string() == "CN=prompted"
    )


def test_pkcs12_with_an_encrypted_key_and_a_wrong_password(runner: CliRunner, tmp_path: Path) -> None:
    device = pki.make_device_cert("locked")
    pki.write_certificates(tmp_path / "locked.pem", [device.cert])
    (tmp_path / "locked.key").write_bytes(pki.private_key_pem(device.key, "right"))
    args: list[str | Path] = [
        "--cert",
        tmp_path / "locked.pem",
        "--key",
        tmp_path / "locked.key",
        "--out",
        tmp_path / "l.pfx",
    ]
    bad = run(runner, "pkcs12", *args, "--key-password", "wrong", "--password", "pw")
    assert bad.exit_code == 1
    assert "Error:" in bad.output and not (tmp_path / "l.pfx").exists()
    good = run(runner, "pkcs12", *args, "--key-password", "right", "--password", "pw")
    assert good.exit_code == 0, good.output


def test_verification_cert(runner: CliRunner, ca_dir: Path) -> None:
    out = ca_dir / "proof.pem"
    result = run(runner, "verification-cert", "--ca", ca_dir / "root.pem", "--code", "0A1B2C3D", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    proof = x509.load_pem_x509_certificate(out.read_bytes())
    assert proof.subject.rfc4514_string() == "CN=0A1B2C3D"
    proof.verify_directly_issued_by(pki.read_issued(ca_dir / "root").cert)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["device", "--ca", "{d}/missing", "--cn", "x", "--out-dir", "{d}"],
            "no such file",
            id="missing-ca",
        ),
        pytest.param(
            ["device", "--ca", "{d}/leaf", "--cn", "x", "--out-dir", "{d}"], "not a CA", id="leaf-as-ca"
        ),
        pytest.param(["root", "--cn", "again", "--out-dir", "{d}"], "exists; pass --force", id="overwrite"),
        pytest.param(
            ["intermediate", "--ca", "{d}/intermediate", "--cn", "x", "--out-dir", "{d}"],
            "path length 0",
            id="pathlen-0",
        ),
        pytest.param(["device", "--cn", "a/b", "--out-dir", "{d}"], "cannot be a file name", id="bad-name"),
        pytest.param(
            [
                "pkcs12",
                "--cert",
                "{d}/root.pem",
                "--key",
                "{d}/leaf.key",
                "--password",
                "p",
                "--out",
                "{d}/x.pfx",
            ],
            "is not the key of",
            id="key-mismatch",
        ),
    ],
)
def test_errors_print_the_cause_and_exit_non_zero(
    runner: CliRunner, ca_dir: Path, args: list[str], message: str
) -> None:
    run(runner, "device", "--cn", "leaf", "--out-dir", ca_dir)
    result = runner.invoke(cli, ["pki", *(a.format(d=ca_dir) for a in args)])
    assert result.exit_code != 0
    assert message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
