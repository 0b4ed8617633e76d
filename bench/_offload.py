"""TLS terminated by HAProxy in front of provisiond's app over plain HTTP: a bench-only harness
for ``bench/tls_front.py --offload`` (not a feature of provisiond: ``provisiond serve`` has no
plain-HTTP listener and no trusted-proxy setting).

HAProxy (Debian's package, 2.6 here) terminates TLS with provisiond's own certificate chain and
key and the same TLS settings (TLS 1.2 and 1.3, a client certificate requested and any accepted,
a stateful session cache, no session tickets), and hands each request on over plain HTTP on
loopback, reusing its server-side connections, with what the client presented in two headers:

- ``X-Client-Cert``: ``ssl_c_der`` base64-encoded (the leaf, DER);
- ``X-Client-Chain``: ``ssl_c_chain_der`` base64-encoded (the certificates the client sent
  after its leaf, DER, concatenated; HAProxy's documentation: "It currently does not support
  resumed sessions");

both deleted from what the client sent first, so that only HAProxy's values arrive.

The app side (``python bench/_offload.py app --data-dir D --port P``) is provisiond's own app
(``create_app``, on the settings of the ``provisiond serve`` that initialised DATA_DIR: the same
database) under uvicorn's plain HTTP protocol (httptools, uvloop), with an ASGI wrapper that
turns the two headers into ``scope["extensions"]["tls"]["client_cert_chain"]`` as provisiond's
TLS front fills it (DER, leaf first), and uvicorn's proxy-headers middleware for the client's
address (``X-Forwarded-For`` from 127.0.0.1 only). With ``--haproxy CONF`` the app process also
starts HAProxy as its child, so that the CPU of the process tree is the whole front's.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

HAPROXY_CONF = """
global
    nbthread 1
    maxconn 4096
    # provisiond: a stateful cache of 4,096 sessions per process, no tickets (tls.py); 0: none
    tune.ssl.cachesize {cache}
    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets
defaults
    mode http
    option forwardfor
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 10s
frontend dps
    bind 127.0.0.1:{port} ssl crt {pem} verify optional ca-file {ca} ca-ignore-err all crt-ignore-err all
    http-request del-header X-Client-Cert
    http-request del-header X-Client-Chain
    http-request set-header X-Client-Cert %[ssl_c_der,base64] if {{ ssl_c_used }}
    http-request set-header X-Client-Chain %[ssl_c_chain_der,base64] if {{ ssl_c_used }}
{answer}
"""

#: HAProxy forwarding to the app
_FORWARD = """    default_backend app
backend app
    server app 127.0.0.1:{app_port}"""

#: HAProxy answering the trivial request itself (tls_front.py's ``haproxy`` front, beside nginx)
_ANSWER_404 = (
    """    http-request return status 404 content-type application/json string '{"errorCode":404000}'"""
)


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


def write_haproxy_conf(
    work: Path,
    *,
    port: int,
    app_port: int | None,
    cert_chain: Path,
    key: Path,
    ca: Path,
    session_cache: int = 4096,
) -> Path:
    """HAProxy's configuration (and its certificate file: chain and key in one PEM) in ``work``;
    without ``app_port`` HAProxy answers every request 404 itself; ``session_cache`` 0: no
    resumption (every handshake full, as an X.509 device's intermediates need behind HAProxy)."""
    pem = work / "haproxy.pem"
    pem.write_bytes(cert_chain.read_bytes() + key.read_bytes())
    pem.chmod(0o600)
    conf = work / "haproxy.cfg"
    answer = _ANSWER_404 if app_port is None else _FORWARD.format(app_port=app_port)
    conf.write_text(HAPROXY_CONF.format(port=port, pem=pem, ca=ca, answer=answer, cache=session_cache))
    return conf


def split_der(blob: bytes) -> list[bytes]:
    """Concatenated DER certificates (each an ASN.1 SEQUENCE) split into a list.

    :raises ValueError: ``blob`` is not a run of whole DER SEQUENCEs.
    """
    certs, at = [], 0
    while at < len(blob):
        if blob[at] != 0x30 or at + 2 > len(blob):
            raise ValueError("not a DER SEQUENCE")
        first = blob[at + 1]
        if first < 0x80:
            length, head = first, 2
        else:
            count = first & 0x7F
            if not 1 <= count <= 4 or at + 2 + count > len(blob):
                raise ValueError("bad DER length")
            length, head = int.from_bytes(blob[at + 2 : at + 2 + count], "big"), 2 + count
        end = at + head + length
        if end > len(blob):
            raise ValueError("truncated DER")
        certs.append(blob[at:end])
        at = end
    return certs


Scope = MutableMapping[str, Any]
App = Callable[[Scope, Any, Any], Awaitable[None]]


class ChainFromHeaders:
    """``scope["extensions"]["tls"]`` from HAProxy's two headers (DER, leaf first), as
    provisiond's TLS front fills it; no headers: no client certificate."""

    def __init__(self, app: App) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            leaf = chain = b""
            for name, value in scope["headers"]:
                if name == b"x-client-cert":
                    leaf = value
                elif name == b"x-client-chain":
                    chain = value
            certs: list[bytes] = []
            if leaf:
                certs.append(base64.b64decode(leaf))
                if chain:
                    certs += split_der(base64.b64decode(chain))
            scope.setdefault("extensions", {})["tls"] = {
                "client_cert_chain": certs,
                "tls_version": None,
                "cipher": None,
                "session_reused": False,
            }
        await self._app(scope, receive, send)


# -- the measurement (bench/tls_front.py --offload) ---------------------------------------------

#: (front, phase) -> the runs of that phase on that front, in order
Results = dict[tuple[str, str], list[Any]]


def _x509_set(work: Path, intermediate: Any, prefix: str, count: int) -> list[tuple[str, str, str]]:
    """``count`` devices below ``intermediate``: (registration id, chain file, key file)."""
    from cpu import issue_devices

    return issue_devices(work / prefix, intermediate, [f"{prefix}-{i:06d}" for i in range(count)])


def _resumed_x509(work: Path, port: int, scope: str, intermediate: Any, prefix: str) -> list[str]:
    """Status lines of one X.509 device (leaf and intermediate) registering on a full handshake
    and then again on the session it resumes, over TLS 1.2 and TLS 1.3: behind HAProxy the
    intermediates are lost on resumption (its ``ssl_c_chain_der``), behind provisiond they are not."""
    import socket
    import ssl

    from cpu import _http_request

    statuses = []
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ((reg, cert, key),) = _x509_set(work, intermediate, f"{prefix}{version.name[-1]}", 1)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the front's behaviour is looked at, not its trust
        context.minimum_version = context.maximum_version = version
        context.load_cert_chain(cert, key)
        session = None
        for _ in range(2):
            with context.wrap_socket(socket.create_connection(("127.0.0.1", port)), session=session) as tls:
                tls.sendall(_http_request(scope, reg))
                answer = b""
                while chunk := tls.recv(65536):
                    answer += chunk
                kind = "resumed" if tls.session_reused else "full"
                statuses.append(f"{version.name} {kind} {answer[9:12].decode(errors='replace')}")
                session = tls.session
    return statuses


def measure(work: Path, args: argparse.Namespace) -> Results:
    """provisiond serving TLS itself against HAProxy terminating TLS in front of the same app over
    plain HTTP, on one database, phase by phase, alternating, ``args.rounds`` times.

    Phases: ``trivial`` (wrk, ``GET /nothing``, 404), ``group`` (wrk, symmetric-key devices of
    one enrollment group, each registering once), and with ``args.x509_devices``:
    ``x509-trivial`` and ``x509-group`` (cpu.py's generator: full handshakes, a leaf and an
    intermediate presented, an X.509 enrollment group holding the root). Each (front, phase,
    round) has devices of its own: every registration is a first one.
    """
    import time

    from _common import free_port, start_server
    from cpu import LUA, _http_request, device_lines, process_tree_cpu, run_wrk, run_x509, write_requests
    from tls_front import _wait_for_port

    from provisiond import pki
    from provisiond.protocol.sas import derive_device_key

    server = start_server(work / "data", "--log-level", "info", *args.server_arg)
    second = None
    app_process = None
    try:
        info, pki_dir = server.info, work / "data" / "pki"
        scope = info["idScope"]
        app_port, port = free_port(), free_port()
        conf = write_haproxy_conf(
            work,
            port=port,
            app_port=app_port,
            cert_chain=pki_dir / "server-chain.pem",
            key=pki_dir / "server.key",
            ca=pki_dir / "ca.pem",
            session_cache=args.haproxy_session_cache,
        )
        log = open(work / "app.log", "ab")
        command = [sys.executable, __file__, "app", "--data-dir", str(work / "data"), "--port", str(app_port)]
        app_process = subprocess.Popen([*command, "--haproxy", str(conf)], stdout=log, stderr=log)
        log.close()
        _wait_for_port(app_port, app_process, "the plain-HTTP app")
        _wait_for_port(port, app_process, "HAProxy")
        haproxy_pid = int(conf.with_suffix(".pid").read_text())
        fronts = {
            "provisiond": (int(info["httpsPort"]), server.pid),
            "haproxy": (port, app_process.pid),
        }
        if "provisiond-2w" in args.offload_fronts.split(","):
            # a second `provisiond serve`, two worker processes, on the same database
            second = start_server(work / "data", "--log-level", "info", "--workers", "2", *args.server_arg)
            fronts["provisiond-2w"] = (int(second.info["httpsPort"]), second.pid)
        fronts = {name: fronts[name] for name in args.offload_fronts.split(",") if name in fronts}
        api = server.api()
        group_key = base64.b64encode(os.urandom(64)).decode()
        api.request(
            "PUT",
            "/enrollmentGroups/offload-group",
            json.dumps(
                {
                    "enrollmentGroupId": "offload-group",
                    "attestation": {
                        "type": "symmetricKey",
                        "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key},
                    },
                }
            ).encode(),
        )
        script = work / "bench.lua"
        script.write_text(LUA)
        trivial = work / "trivial.tsv"
        write_requests(trivial, [("GET", "/nothing", "", "")])
        expiry = int(time.time()) + 7200
        phases = [p for p in args.offload_phases.split(",") if p]
        intermediate = None
        if any(p.startswith("x509") for p in phases):
            root = pki.make_root_ca("provisiond offload bench root")
            intermediate = pki.make_intermediate_ca("provisiond offload bench intermediate", root)
            server.api().request(
                "PUT",
                "/enrollmentGroups/offload-x509",
                json.dumps(
                    {
                        "enrollmentGroupId": "offload-x509",
                        "attestation": {
                            "type": "x509",
                            "x509": {
                                "signingCertificates": {
                                    "primary": {"certificate": pki.certificate_pem(root.cert).decode()}
                                }
                            },
                        },
                    }
                ).encode(),
            )
            for front, (front_port, _pid) in fronts.items():
                statuses = _resumed_x509(work, front_port, scope, intermediate, f"oxr{front}")
                print(
                    f"# {front}: an X.509 device registering, then again on its resumed TLS session "
                    f"(1.2 and 1.3): {', '.join(statuses)}",
                    flush=True,
                )
        results: Results = {}
        for rnd in range(args.rounds):
            for phase in phases:
                for number, (front, (front_port, pid)) in enumerate(fronts.items()):
                    tag = f"{number}r{rnd}"
                    if phase in ("trivial", "group"):
                        if phase == "group":
                            names = [f"og{tag}-{i:06d}" for i in range(args.devices)]
                            requests = work / f"group-{tag}.tsv"
                            devices = [(n, derive_device_key(group_key, n)) for n in names]
                            write_requests(requests, device_lines(scope, devices, expiry))
                        else:
                            requests = trivial
                        hp_before = process_tree_cpu(haproxy_pid)
                        run = run_wrk(
                            f"https://127.0.0.1:{front_port}",
                            requests,
                            script,
                            seconds=args.seconds,
                            connections=args.connections,
                            threads=args.threads,
                            pid=pid,
                        )
                    else:
                        devices_x = _x509_set(work, intermediate, f"ox{tag}{phase[5]}", args.x509_devices)
                        if phase == "x509-trivial":
                            request = b"GET /nothing HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                            conns = [(request, c, k) for _r, c, k in devices_x]
                        else:
                            conns = [(_http_request(scope, r), c, k) for r, c, k in devices_x]
                        hp_before = process_tree_cpu(haproxy_pid)
                        run = run_x509(
                            front_port,
                            conns,
                            expect=b"404" if phase == "x509-trivial" else b"2",
                            concurrency=args.connections,
                            processes=2,
                            pid=pid,
                        )
                    haproxy_cpu = process_tree_cpu(haproxy_pid) - hp_before if front == "haproxy" else 0.0
                    run.db_cpu = haproxy_cpu  # this table's "of which HAProxy"
                    if phase == "trivial":
                        run.bad_status = 0  # a 404 is its answer
                    results.setdefault((front, phase), []).append(run)
                    print(
                        f"{front:<10} {phase:<12} {run.requests / run.seconds:6.0f} req/s  "
                        f"{run.cpu / max(run.requests, 1) * 1e6:6.0f} us CPU/req "
                        f"(HAProxy {haproxy_cpu / max(run.requests, 1) * 1e6:4.0f})  bad {run.bad_status}  "
                        f"socket errors {run.socket_errors}  load {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
        return results
    finally:
        if app_process is not None and app_process.poll() is None:
            app_process.send_signal(signal.SIGINT)
            try:
                app_process.wait(15)
            except subprocess.TimeoutExpired:
                app_process.kill()
        if second is not None:
            second.stop()
        server.stop()


def print_table(results: Results) -> None:
    def cpu(runs: list[Any], field: str = "cpu") -> float:
        return sum(getattr(r, field) for r in runs) / sum(r.requests for r in runs) * 1e6

    print()
    print(
        "| front | phase | req/s | server CPU µs/req (rounds) | of which HAProxy | "
        "ratio (its trivial / phase) | CPU / provisiond's | non-2xx |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (front, phase), runs in results.items():
        trivial = results.get((front, "x509-trivial" if phase.startswith("x509") else "trivial"))
        own = results.get(("provisiond", phase))
        rate = sum(r.requests for r in runs) / sum(r.seconds for r in runs)
        spread = "/".join(f"{r.cpu / r.requests * 1e6:.0f}" for r in runs)
        ratio = f"{cpu(trivial) / cpu(runs):.2f}" if trivial else "-"
        versus = f"{cpu(runs) / cpu(own):.2f}" if own else "-"
        print(
            f"| {front} | {phase} | {rate:.0f} | {cpu(runs):.0f} ({spread}) | {cpu(runs, 'db_cpu'):.0f} "
            f"| {ratio} | {versus} | {sum(r.bad_status for r in runs)} |"
        )


# -- the app side ---------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In HAProxy's process before exec: SIGTERM when this process dies (uvicorn ends its process
    by re-raising the signal that stopped it, before any ``finally`` here runs)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _serve_app(args: argparse.Namespace) -> None:
    import uvicorn

    from provisiond.service.app import create_app
    from provisiond.service.http import lean_log_records
    from provisiond.service.settings import Settings

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    lean_log_records()
    data_dir = Path(args.data_dir).absolute()
    info = json.loads((data_dir / "connection.json").read_text())
    settings = Settings(
        data_dir=data_dir,
        bind="127.0.0.1",
        https_port=args.port,
        mqtt_port=0,
        amqp_port=0,
        builtin_hub=info.get("builtinHub") or info.get("host"),
        server_cert=data_dir / "pki" / "server-chain.pem",
        server_key=data_dir / "pki" / "server.key",
    )
    haproxy = None
    if args.haproxy:
        binary = haproxy_binary()
        assert binary is not None, "haproxy is not installed"
        out = open(Path(args.haproxy).with_suffix(".out"), "ab")
        haproxy = subprocess.Popen(
            [binary, "-db", "-f", args.haproxy], stdout=out, stderr=out, preexec_fn=_die_with_parent
        )
        (Path(args.haproxy).with_suffix(".pid")).write_text(str(haproxy.pid))
    try:
        uvicorn.run(
            ChainFromHeaders(create_app(settings)),
            host="127.0.0.1",
            port=args.port,
            http="httptools",
            loop="uvloop",
            log_level="warning",
            access_log=False,
            proxy_headers=True,
            forwarded_allow_ips="127.0.0.1",
            timeout_keep_alive=60,
        )
    finally:
        if haproxy is not None:
            haproxy.send_signal(signal.SIGTERM)
            try:
                haproxy.wait(10)
            except subprocess.TimeoutExpired:
                haproxy.kill()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    app = sub.add_parser("app", help="provisiond's app over plain HTTP, the chain from HAProxy's headers")
    app.add_argument("--data-dir", required=True, help="initialised by `provisiond serve`")
    app.add_argument("--port", type=int, required=True)
    app.add_argument("--log-level", default="info")
    app.add_argument("--haproxy", help="a configuration file: start HAProxy with it as this process's child")
    args = parser.parse_args()
    _serve_app(args)


if __name__ == "__main__":
    main()
