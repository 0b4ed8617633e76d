"""A remote IoT hub for bench/remote_hub.py: IoT Hub's identity registry REST API (the calls
provisiond's hub writer makes: devices, twins, statistics), IoT Hub's SAS rules and error bodies,
and IoT Hub's throttle (429 with Retry-After: a token bucket of a number of calls a second with
bursts of one second's worth), in its own process. Identities are kept in memory; ``GET /_stats`` (no auth) tells the bench what the hub
saw. It stands in for a second provisiond whose built-in hub serves the registry REST API
(issue 11) until that API is on main.

    python bench/_hub_peer.py --port P --cert CHAIN --key KEY --policy-key B64 [--rate-limit N]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from provisiond.protocol.sas import parse_sas_token, verify_signature

HOST = "127.0.0.1"
POLICY = "iothubowner"


class Hub:
    def __init__(self, key: str, rate_limit: int | None) -> None:
        self.key = key
        self.rate_limit = rate_limit
        self.devices: dict[str, dict[str, Any]] = {}
        self.twins: dict[str, dict[str, Any]] = {}
        self.tokens = float(rate_limit or 0)
        self.refilled = time.monotonic()
        self.calls = 0
        self.throttled = 0
        self.first: float | None = None
        self.last: float | None = None


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {"Message": f"ErrorCode:{code};{message}", "ExceptionMessage": "Tracking ID:bench-peer"}
    return JSONResponse(body, status, headers={"iothub-errorcode": code, **(headers or {})})


def app(hub: Hub) -> Starlette:
    def guard(request: Request) -> Response | None:
        now = time.monotonic()
        try:
            token = parse_sas_token(request.headers.get("authorization", ""))
        except Exception:
            return _error(401, "IotHubUnauthorizedAccess", "Unauthorized")
        if token.key_name != POLICY or token.resource.lower() != HOST or not verify_signature(token, hub.key):
            return _error(401, "IotHubUnauthorizedAccess", "Unauthorized")
        hub.calls += 1
        hub.first = hub.first or now
        hub.last = now
        if hub.rate_limit is not None:
            # A token bucket: rate_limit calls a second, bursts of at most one second's worth.
            hub.tokens = min(float(hub.rate_limit), hub.tokens + (now - hub.refilled) * hub.rate_limit)
            hub.refilled = now
            if hub.tokens < 1.0:
                hub.throttled += 1
                return _error(429, "ThrottlingException", "Wait 1 seconds", {"Retry-After": "1"})
            hub.tokens -= 1.0
        return None

    async def device(request: Request) -> Response:
        if (refused := guard(request)) is not None:
            return refused
        device_id = request.path_params["id"]
        stored = hub.devices.get(device_id)
        if request.method == "GET":
            return JSONResponse(stored) if stored else _error(404, "DeviceNotFound", device_id)
        if request.method == "DELETE":
            if stored is None:
                return _error(404, "DeviceNotFound", device_id)
            del hub.devices[device_id]
            hub.twins.pop(device_id, None)
            return Response(status_code=204)
        try:
            body = json.loads(await request.body())
        except ClientDisconnect:  # the writer's node was killed mid-request (the soak)
            return Response(status_code=499)
        if_match = request.headers.get("if-match")
        if stored is None and if_match:
            return _error(404, "DeviceNotFound", device_id)
        if stored is not None and not if_match:
            return _error(409, "DeviceAlreadyExists", device_id)
        new = {**body, "etag": base64.b64encode(os.urandom(6)).decode()}
        hub.devices[device_id] = new
        hub.twins.setdefault(device_id, {"tags": {}, "properties": {"desired": {}, "reported": {}}})
        return JSONResponse(new)

    async def twin(request: Request) -> Response:
        if (refused := guard(request)) is not None:
            return refused
        device_id = request.path_params["id"]
        if device_id not in hub.devices:
            return _error(404, "DeviceNotFound", device_id)
        stored = hub.twins[device_id]
        if request.method == "PUT":
            try:
                body = json.loads(await request.body())
            except ClientDisconnect:
                return Response(status_code=499)
            stored["tags"] = body.get("tags") or {}
            stored["properties"]["desired"] = (body.get("properties") or {}).get("desired") or {}
        return JSONResponse({"deviceId": device_id, **stored})

    async def bulk(request: Request) -> Response:
        if (refused := guard(request)) is not None:
            return refused
        errors = []
        try:
            entries = json.loads(await request.body())
        except ClientDisconnect:
            return Response(status_code=499)
        for entry in entries:
            device_id = entry["id"]
            if entry.get("importMode") != "create" or device_id in hub.devices:
                errors.append(
                    {"deviceId": device_id, "errorCode": "DeviceAlreadyExists", "errorStatus": "exists"}
                )
                continue
            hub.devices[device_id] = {
                "deviceId": device_id,
                "status": entry.get("status", "enabled"),
                "authentication": entry.get("authentication") or {},
                "etag": base64.b64encode(os.urandom(6)).decode(),
            }
            hub.twins[device_id] = {
                "tags": entry.get("tags") or {},
                "properties": {
                    "desired": (entry.get("properties") or {}).get("desired") or {},
                    "reported": {},
                },
            }
        result = {"isSuccessful": not errors, "errors": errors, "warnings": []}
        return JSONResponse(result, 400 if errors else 200)

    async def statistics(request: Request) -> Response:
        if (refused := guard(request)) is not None:
            return refused
        return JSONResponse({"totalDeviceCount": len(hub.devices)})

    async def stats(request: Request) -> Response:
        return JSONResponse(
            {
                "calls": hub.calls,
                "throttled": hub.throttled,
                "seconds": (hub.last - hub.first) if hub.first and hub.last else 0.0,
                "devices": sorted(hub.devices),
                "twinTags": {d: t["tags"] for d, t in hub.twins.items()},
            }
        )

    async def reset(request: Request) -> Response:
        if not request.query_params.get("keepDevices"):
            hub.devices.clear()
            hub.twins.clear()
        hub.calls = hub.throttled = 0
        hub.first = hub.last = None
        limit = request.query_params.get("rateLimit")
        hub.rate_limit = int(limit) if limit else None
        hub.tokens, hub.refilled = float(hub.rate_limit or 0), time.monotonic()
        return Response(status_code=204)

    return Starlette(
        routes=[
            Route("/devices", bulk, methods=["POST"]),
            Route("/devices/{id}", device, methods=["GET", "PUT", "DELETE"]),
            Route("/twins/{id}", twin, methods=["GET", "PUT"]),
            Route("/statistics/devices", statistics, methods=["GET"]),
            Route("/_stats", stats, methods=["GET"]),
            Route("/_reset", reset, methods=["POST"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--policy-key", required=True)
    parser.add_argument("--rate-limit", type=int, default=None)
    args = parser.parse_args()
    uvicorn.run(
        app(Hub(args.policy_key, args.rate_limit)),
        host="127.0.0.1",
        port=args.port,
        ssl_certfile=args.cert,
        ssl_keyfile=args.key,
        log_level="warning",
        lifespan="off",
    )


if __name__ == "__main__":
    main()
