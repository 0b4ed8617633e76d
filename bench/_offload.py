"""TLS terminated by HAProxy in front of ``provisiond serve --front-port`` (docs/tls-front.md):
the measurement of ``bench/tls_front.py --offload``, and the HAProxy configuration of
``tls_front.py``'s ``haproxy`` front (HAProxy answering the trivial request itself, beside nginx).

``--offload`` runs one ``provisiond serve`` with its own TLS port and its trusted front's plain
port (``--front-port``, ``--trusted-front 127.0.0.1``), and HAProxy (Debian's package, 2.6 here)
from **samples/haproxy/haproxy.cfg itself**, the documented configuration: no session resumption
(every handshake a full one, so that X.509 intermediates arrive on every connection), the
presented chain in ``X-Provisiond-Client-Cert`` and ``X-Provisiond-Client-Chain``, server-side
connections reused. The ``haproxy-resume`` front is the same file with ``tune.ssl.cachesize
4096``: what turning resumption off costs. A front's CPU is that of ``provisiond serve`` plus,
for the HAProxy fronts, HAProxy's (the "of which HAProxy" column).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
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
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 10s
frontend dps
    bind 127.0.0.1:{port} ssl crt {pem} verify optional ca-file {ca} ca-ignore-err all crt-ignore-err all
    http-request del-header X-Provisiond-Client-Cert
    http-request del-header X-Provisiond-Client-Chain
    http-request set-header X-Provisiond-Client-Cert %[ssl_c_der,base64] if {{ ssl_c_used }}
    http-request set-header X-Provisiond-Client-Chain %[ssl_c_chain_der,base64] if {{ ssl_c_used }}
    http-request return status 404 content-type application/json string '{{"errorCode":404000}}'
"""

#: the documented configuration, which --offload runs
SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "haproxy" / "haproxy.cfg"


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


def write_haproxy_conf(
    work: Path, *, port: int, cert_chain: Path, key: Path, ca: Path, session_cache: int = 4096
) -> Path:
    """HAProxy answering every request 404 itself, with the TLS settings of the sample config
    (and its certificate file: chain and key in one PEM) in ``work``; ``session_cache`` 0: no
    resumption, as samples/haproxy/haproxy.cfg."""
    pem = work / "haproxy.pem"
    pem.write_bytes(cert_chain.read_bytes() + key.read_bytes())
    pem.chmod(0o600)
    conf = work / "haproxy.cfg"
    conf.write_text(HAPROXY_CONF.format(port=port, pem=pem, ca=ca, cache=session_cache))
    return conf


@contextlib.contextmanager
def sample_haproxy(
    work: Path, pki_dir: Path, *, port: int, front_port: int, resume: bool
) -> Iterator[subprocess.Popen[bytes]]:
    """HAProxy from samples/haproxy/haproxy.cfg (with ``resume``: ``tune.ssl.cachesize 4096``
    instead of 0), on ``port``, forwarding to provisiond's front port: yields its process once
    it listens."""
    from tls_front import _wait_for_port

    binary = haproxy_binary()
    assert binary is not None, "haproxy is not installed"
    text = SAMPLE.read_text()
    if resume:
        assert "    tune.ssl.cachesize 0\n" in text
        text = text.replace("    tune.ssl.cachesize 0\n", "    tune.ssl.cachesize 4096\n")
    conf = work / f"haproxy-{port}.cfg"
    conf.write_text(text)
    pem = work / "haproxy.pem"
    pem.write_bytes((pki_dir / "server-chain.pem").read_bytes() + (pki_dir / "server.key").read_bytes())
    pem.chmod(0o600)
    env = {
        **os.environ,
        "DPS_BIND": f"127.0.0.1:{port}",
        "DPS_CERT": str(pem),
        "DPS_VERIFY_CA": str(pki_dir / "ca.pem"),
        "PROVISIOND_FRONT": f"127.0.0.1:{front_port}",
    }
    with open(conf.with_suffix(".out"), "ab") as out:
        process = subprocess.Popen([binary, "-db", "-f", str(conf)], stdout=out, stderr=out, env=env)
    try:
        _wait_for_port(port, process, "haproxy")
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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

    from provisiond import pki
    from provisiond.protocol.sas import derive_device_key

    names = args.offload_fronts.split(",")
    front_port = free_port()
    server = start_server(
        work / "data",
        "--log-level",
        "info",
        "--front-port",
        str(front_port),
        "--trusted-front",
        "127.0.0.1",
        *args.server_arg,
    )
    second = None
    stack = contextlib.ExitStack()
    try:
        info, pki_dir = server.info, work / "data" / "pki"
        scope = info["idScope"]
        #: front -> (its TLS port, provisiond's pid, HAProxy's pid or 0)
        fronts: dict[str, tuple[int, int, int]] = {"provisiond": (int(info["httpsPort"]), server.pid, 0)}
        for name in ("haproxy", "haproxy-resume"):
            if name in names:
                port = free_port()
                haproxy = stack.enter_context(
                    sample_haproxy(
                        work, pki_dir, port=port, front_port=front_port, resume=name == "haproxy-resume"
                    )
                )
                fronts[name] = (port, server.pid, haproxy.pid)
        if "provisiond-2w" in names:
            # a second `provisiond serve`, two worker processes, on the same database
            second = start_server(work / "data", "--log-level", "info", "--workers", "2", *args.server_arg)
            fronts["provisiond-2w"] = (int(second.info["httpsPort"]), second.pid, 0)
        fronts = {name: fronts[name] for name in names if name in fronts}
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
            for front, (tls_port, _pid, _hp) in fronts.items():
                statuses = _resumed_x509(work, tls_port, scope, intermediate, f"oxr{front}")
                print(
                    f"# {front}: an X.509 device registering, then again on its resumed TLS session "
                    f"(1.2 and 1.3): {', '.join(statuses)}",
                    flush=True,
                )
        results: Results = {}
        for rnd in range(args.rounds):
            for phase in phases:
                for number, (front, (tls_port, pid, haproxy_pid)) in enumerate(fronts.items()):
                    tag = f"{number}r{rnd}"
                    if phase in ("trivial", "group"):
                        if phase == "group":
                            names = [f"og{tag}-{i:06d}" for i in range(args.devices)]
                            requests = work / f"group-{tag}.tsv"
                            devices = [(n, derive_device_key(group_key, n)) for n in names]
                            write_requests(requests, device_lines(scope, devices, expiry))
                        else:
                            requests = trivial
                        hp_before = process_tree_cpu(haproxy_pid) if haproxy_pid else 0.0
                        run = run_wrk(
                            f"https://127.0.0.1:{tls_port}",
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
                        hp_before = process_tree_cpu(haproxy_pid) if haproxy_pid else 0.0
                        run = run_x509(
                            tls_port,
                            conns,
                            expect=b"404" if phase == "x509-trivial" else b"2",
                            concurrency=args.connections,
                            processes=2,
                            pid=pid,
                        )
                    haproxy_cpu = process_tree_cpu(haproxy_pid) - hp_before if haproxy_pid else 0.0
                    run.cpu += haproxy_cpu  # the front's CPU: provisiond's and HAProxy's
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
        stack.close()
        if second is not None:
            second.stop()
        server.stop()


def print_table(results: Results) -> None:
    def cpu(runs: list[Any], field: str = "cpu") -> float:
        requests = sum(r.requests for r in runs)
        return sum(getattr(r, field) for r in runs) / requests * 1e6 if requests else float("nan")

    def ratio(a: float, b: float) -> str:
        # A tiny run (the smoke test's) can read no CPU tick at all: no ratio then.
        return f"{a / b:.2f}" if b else "-"

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
        spread = "/".join(f"{r.cpu / max(r.requests, 1) * 1e6:.0f}" for r in runs)
        against_trivial = ratio(cpu(trivial), cpu(runs)) if trivial else "-"
        versus = ratio(cpu(runs), cpu(own)) if own else "-"
        print(
            f"| {front} | {phase} | {rate:.0f} | {cpu(runs):.0f} ({spread}) | {cpu(runs, 'db_cpu'):.0f} "
            f"| {against_trivial} | {versus} | {sum(r.bad_status for r in runs)} |"
        )
