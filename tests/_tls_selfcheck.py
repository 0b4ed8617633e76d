"""Check the version-sensitive parts of provisiond.tls on the running Python, without pytest.

    python tests/_tls_selfcheck.py        # exit status 0 = every check passed

Needs provisiond's runtime dependencies (cryptography, uvicorn), not its test tools, so that it
can run under every CPython the project supports from a bare virtual environment. It exercises
the ctypes accept-any-client-certificate hook and ``peer_chain`` over in-memory handshakes
(``SSLObject``, as asyncio uses) and a socket pair (``SSLSocket``): a chain to an unknown root,
a self-signed certificate, no certificate, TLS 1.2 only, resumed sessions, and the guard against
assigning ``verify_mode`` after the hook (which drops it on CPython 3.13).
"""

from __future__ import annotations

import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from provisiond import pki, tls  # after the sys.path line on purpose


class _Certs:
    def __init__(self, directory: Path) -> None:
        root = pki.make_root_ca("Self-check Unknown Root")
        intermediate = pki.make_intermediate_ca("Self-check Intermediate", root)
        self.device = pki.make_device_cert("selfcheck-device", intermediate)
        self.self_signed = pki.make_device_cert("selfcheck-self-signed")
        server_ca = pki.make_root_ca("Self-check Server CA")
        server = pki.make_server_cert(server_ca, ["localhost"])
        self.directory = directory
        pki.write_issued(self.device, directory / "device", chain=True)
        pki.write_issued(self.self_signed, directory / "self-signed")
        pki.write_issued(server, directory / "server", chain=True)
        pki.write_certificates(directory / "server-ca.pem", [server_ca.cert])

    def server_context(self) -> ssl.SSLContext:
        return tls.server_context(self.directory / "server-chain.pem", self.directory / "server.key")

    def client_context(self, credential: str | None, *, tls12_only: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.directory / "server-ca.pem")  # strict on 3.13
        if tls12_only:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if credential == "device":
            ctx.load_cert_chain(self.directory / "device-chain.pem", self.directory / "device.key")
        elif credential == "self-signed":
            ctx.load_cert_chain(self.directory / "self-signed.pem", self.directory / "self-signed.key")
        return ctx


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """An in-memory handshake; returns (client, server) after the session tickets arrived."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for end in (client, server):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    try:
        client.read(1)  # take in the TLS 1.3 NewSessionTicket messages
    except ssl.SSLWantReadError:
        pass
    return client, server


def _ders(issued: pki.Issued) -> list[bytes]:
    return [pki.certificate_der(cert) for cert in issued.presented_chain]


def run_checks() -> list[tuple[str, str | None]]:
    """Every check as (name, None when it passed or the reason it failed)."""
    results: list[tuple[str, str | None]] = []

    def check(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # report every failure, not only the first
            results.append((name, f"{type(exc).__name__}: {exc}"))
        else:
            results.append((name, None))

    with tempfile.TemporaryDirectory() as tmp:
        certs = _Certs(Path(tmp))
        server_ctx = certs.server_context()

        def expect(credential: str | None, expected: list[bytes], *, tls12_only: bool = False) -> None:
            client, server = _handshake(server_ctx, certs.client_context(credential, tls12_only=tls12_only))
            seen = tls.peer_chain(server)
            assert seen == expected, f"server saw {len(seen)} certificate(s), expected {len(expected)}"
            if tls12_only:
                assert server.version() == "TLSv1.2", server.version()

        check("chain from an unknown root", lambda: expect("device", _ders(certs.device)))
        check("self-signed", lambda: expect("self-signed", _ders(certs.self_signed)))
        check("no certificate", lambda: expect(None, []))
        check("TLS 1.2 only", lambda: expect("device", _ders(certs.device), tls12_only=True))

        def resumed(tls12_only: bool) -> None:
            client_ctx = certs.client_context("device", tls12_only=tls12_only)
            first, _ = _handshake(server_ctx, client_ctx)
            again, server = _handshake(server_ctx, client_ctx, session=first.session)
            assert server.session_reused, "the session was not resumed"
            assert tls.peer_chain(server) == _ders(certs.device), "the resumed session lost the chain"

        check("resumed session keeps the chain (TLS 1.3)", lambda: resumed(False))
        check("resumed session keeps the chain (TLS 1.2)", lambda: resumed(True))

        def verify_mode_is_fixed() -> None:
            try:
                certs.server_context().verify_mode = ssl.CERT_OPTIONAL
            except RuntimeError:
                return
            raise AssertionError("assigning verify_mode of a server_context() was allowed")

        check("verify_mode of server_context() is read-only", verify_mode_is_fixed)

        def rehooked() -> None:
            # A plain context: assigning verify_mode drops the hook on 3.13; installing it again works.
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certs.directory / "server-chain.pem", certs.directory / "server.key")
            tls.accept_any_client_certificate(ctx)
            ctx.verify_mode = ssl.CERT_OPTIONAL
            tls.accept_any_client_certificate(ctx)
            _, server = _handshake(ctx, certs.client_context("self-signed"))
            assert tls.peer_chain(server) == _ders(certs.self_signed)

        check("accept_any_client_certificate on a plain context, twice", rehooked)

        def over_sockets() -> None:
            server_sock, client_sock = socket.socketpair()
            seen: list[bytes] = []

            def serve() -> None:
                with server_ctx.wrap_socket(server_sock, server_side=True) as conn:
                    seen.extend(tls.peer_chain(conn))
                    conn.sendall(b"ok")

            thread = threading.Thread(target=serve)
            thread.start()
            with certs.client_context("device").wrap_socket(client_sock, server_hostname="localhost") as conn:
                conn.recv(2)
            thread.join(5)
            assert seen == _ders(certs.device), f"SSLSocket: saw {len(seen)} certificate(s)"

        check("SSLSocket", over_sockets)
    return results


def main() -> int:
    version = sys.version.split()[0]
    results = run_checks()
    for name, failure in results:
        sys.stdout.write(
            f"{'ok  ' if failure is None else 'FAIL'} {name}{'' if failure is None else ': ' + failure}\n"
        )
    failed = sum(failure is not None for _, failure in results)
    sys.stdout.write(
        f"Python {version}, {ssl.OPENSSL_VERSION}: {len(results) - failed}/{len(results)} passed\n"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
