"""A stand-in IoT hub for the hub writer's tests: IoT Hub's identity registry REST API (the
calls ``provisiond.hub.remote`` makes, with IoT Hub's status codes, error bodies and SAS
authentication) over real HTTPS on loopback, in a thread of the test process, with a fault
injector in front of it (429 with Retry-After, 5xx, slow answers).

Until the built-in hub's own registry REST API (issue 11, part "registry") is on main, this is
the writer's peer; the tests that need it say so. It keeps what it was told in memory, so a
test can compare the hub's identities with provisiond's records afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from provisiond import pki
from provisiond.errors import NotFoundError
from provisiond.protocol.sas import parse_sas_token, verify_signature
from tests._server import free_port

__all__ = ["Fault", "HubPeer", "hub_peer", "hub_peer_server"]


@dataclass
class Fault:
    """What the next matching request gets instead of an answer."""

    status: int | None = None  # answer this status (429, 503, ...)
    retry_after: float | None = None
    delay: float = 0.0  # answer after this long (then normally, unless status)
    method: str | None = None  # only requests of this method
    kind: str | None = None  # only requests of this kind ("devices", "twins")
    code: str | None = None  # the ErrorCode in the body


@dataclass
class HubPeer:
    host: str
    port: int
    key_name: str
    key: str
    ca_pem: str
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    twins: dict[str, dict[str, Any]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    answered: Counter[int] = field(default_factory=Counter)
    call_times: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Throttle as IoT Hub does: more calls than this in any second answer 429 (None: never).
    rate_limit: int | None = None
    #: Identities created by bulk calls.
    bulk_devices: int = 0

    @property
    def connection_string(self) -> str:
        return (
            f"HostName={self.host}:{self.port};SharedAccessKeyName={self.key_name};SharedAccessKey={self.key}"
        )

    def link(self, admin: Any, *, port: int | None = None, **fields: Any) -> str:
        """Link this hub to the provisiond of ``admin`` (replacing an earlier link of it); its
        host name, as linking requires, is the connection string's (``127.0.0.1``: ``localhost`` is the server's own built-in hub). ``port``:
        reach it there instead (a proxy in front of it)."""
        with contextlib.suppress(NotFoundError):
            admin.delete(f"/admin/linkedHubs/{self.host}")
        admin.put(
            f"/admin/linkedHubs/{self.host}",
            {
                "hostName": self.host,
                "connectionString": self.connection_string.replace(
                    f":{self.port};", f":{port or self.port};"
                ),
                "caCertificate": self.ca_pem,
                "applyAllocationPolicy": False,
                **fields,
            },
        )
        return self.host

    def inject(self, *faults: Fault) -> None:
        with self.lock:
            self.faults.extend(faults)

    def _fault(self, method: str, kind: str) -> Fault | None:
        with self.lock:
            for i, fault in enumerate(self.faults):
                if fault.method in (None, method) and fault.kind in (None, kind):
                    return self.faults.pop(i)
        return None


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {
        "Message": f"ErrorCode:{code};{message}",
        "ExceptionMessage": f"Tracking ID:peer-{time.time_ns()}",
    }
    return JSONResponse(body, status, headers={"iothub-errorcode": code, **(headers or {})})


def _app(peer: HubPeer) -> Starlette:
    async def guard(request: Request) -> Response | None:
        kind = request.url.path.split("/")[1]
        peer.calls[f"{request.method} {kind}"] += 1
        now = time.monotonic()
        peer.call_times.append(now)
        if peer.rate_limit is not None:
            recent = sum(1 for t in peer.call_times if t > now - 1.0)
            if recent > peer.rate_limit:
                return _error(429, "ThrottlingException", "Wait 1 seconds", {"Retry-After": "1"})
        if request.query_params.get("api-version") is None:
            return _error(400, "InvalidProtocolVersion", "api-version is missing")
        try:
            token = parse_sas_token(request.headers.get("authorization", ""))
        except Exception:
            return _error(401, "IotHubUnauthorizedAccess", "Unauthorized")
        if (
            token.key_name != peer.key_name
            or token.resource.lower() != peer.host.lower()
            or token.expiry < time.time()
            or not verify_signature(token, peer.key)
        ):
            return _error(401, "IotHubUnauthorizedAccess", "Unauthorized")
        fault = peer._fault(request.method, kind)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status is not None:
                headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
                code = fault.code or ("ThrottlingException" if fault.status == 429 else "ServerError")
                return _error(fault.status, code, "fault injected", headers)
        return None

    def answer(response: Response) -> Response:
        peer.answered[response.status_code] += 1
        return response

    async def device(request: Request) -> Response:
        refused = await guard(request)
        if refused is not None:
            return answer(refused)
        device_id = request.path_params["id"]
        stored = peer.devices.get(device_id)
        if request.method == "GET":
            if stored is None:
                return answer(_error(404, "DeviceNotFound", f"Device {device_id} not found"))
            return answer(JSONResponse(stored))
        if request.method == "DELETE":
            if stored is None:
                return answer(_error(404, "DeviceNotFound", f"Device {device_id} not found"))
            del peer.devices[device_id]
            peer.twins.pop(device_id, None)
            return answer(Response(status_code=204))
        body = json.loads(await request.body())
        if_match = request.headers.get("if-match")
        if stored is None and if_match:
            return answer(_error(404, "DeviceNotFound", f"Device {device_id} not found"))
        if stored is not None and not if_match:
            return answer(_error(409, "DeviceAlreadyExists", f"Device {device_id} already exists"))
        if body.get("deviceId") != device_id:
            return answer(_error(400, "ArgumentInvalid", "deviceId differs"))
        auth = body.get("authentication") or {}
        if auth.get("type") == "sas" and not (auth.get("symmetricKey") or {}).get("primaryKey"):
            auth["symmetricKey"] = {"primaryKey": _key(), "secondaryKey": _key()}
        new = {**body, "etag": base64.b64encode(os.urandom(6)).decode(), "authentication": auth}
        peer.devices[device_id] = new
        peer.twins.setdefault(device_id, {"tags": {}, "properties": {"desired": {}, "reported": {}}})
        return answer(JSONResponse(new))

    async def twin(request: Request) -> Response:
        refused = await guard(request)
        if refused is not None:
            return answer(refused)
        device_id = request.path_params["id"]
        if device_id not in peer.devices:
            return answer(_error(404, "DeviceNotFound", f"Device {device_id} not found"))
        stored = peer.twins[device_id]
        if request.method == "PUT":
            body = json.loads(await request.body())
            stored["tags"] = body.get("tags") or {}
            stored["properties"]["desired"] = (body.get("properties") or {}).get("desired") or {}
        return answer(JSONResponse({"deviceId": device_id, **stored}))

    async def bulk(request: Request) -> Response:
        refused = await guard(request)
        if refused is not None:
            return answer(refused)
        errors = []
        for entry in json.loads(await request.body()):
            device_id = entry["id"]
            if entry.get("importMode") != "create":
                errors.append({"deviceId": device_id, "errorCode": "ArgumentInvalid", "errorStatus": "mode"})
                continue
            if device_id in peer.devices:
                errors.append(
                    {"deviceId": device_id, "errorCode": "DeviceAlreadyExists", "errorStatus": "exists"}
                )
                continue
            peer.devices[device_id] = {
                "deviceId": device_id,
                "status": entry.get("status", "enabled"),
                "authentication": entry.get("authentication") or {},
                "etag": base64.b64encode(os.urandom(6)).decode(),
            }
            peer.twins[device_id] = {
                "tags": entry.get("tags") or {},
                "properties": {
                    "desired": (entry.get("properties") or {}).get("desired") or {},
                    "reported": {},
                },
            }
            peer.bulk_devices += 1
        result = {"isSuccessful": not errors, "errors": errors, "warnings": []}
        return answer(JSONResponse(result, 400 if errors else 200))

    async def statistics(request: Request) -> Response:
        refused = await guard(request)
        if refused is not None:
            return answer(refused)
        return answer(JSONResponse({"totalDeviceCount": len(peer.devices)}))

    return Starlette(
        routes=[
            Route("/devices", bulk, methods=["POST"]),
            Route("/devices/{id}", device, methods=["GET", "PUT", "DELETE"]),
            Route("/twins/{id}", twin, methods=["GET", "PUT"]),
            Route("/statistics/devices", statistics, methods=["GET"]),
        ]
    )


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture(scope="module")
def hub_peer_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubPeer]:
    """A running stand-in hub (module docstring) for a test module."""
    root = pki.make_root_ca("hub peer test CA")
    prefix = tmp_path_factory.mktemp("peer") / "peer"
    pki.write_issued(pki.make_server_cert(root, ["localhost", "127.0.0.1"]), prefix, chain=True)
    peer = HubPeer("127.0.0.1", free_port(), "iothubowner", _key(), pki.certificate_pem(root.cert).decode())
    config = uvicorn.Config(
        _app(peer),
        host="127.0.0.1",
        port=peer.port,
        ssl_certfile=str(pki.chain_path(prefix)),
        ssl_keyfile=str(pki.key_path(prefix)),
        log_level="warning",
        lifespan="off",
        timeout_keep_alive=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the hub peer did not start"
    yield peer
    server.should_exit = True
    thread.join(2)  # a daemon thread: idle keep-alive connections may hold it a little longer


@pytest.fixture
def hub_peer(hub_peer_server: HubPeer) -> HubPeer:
    """The module's stand-in hub, emptied and without faults for this test."""
    peer = hub_peer_server
    with peer.lock:
        peer.devices.clear()
        peer.twins.clear()
        peer.faults.clear()
        peer.calls.clear()
        peer.answered.clear()
        peer.call_times.clear()
        peer.rate_limit = None
        peer.bulk_devices = 0
    return peer
