"""A plain HTTPS client of a built-in hub's service REST API, built from an IoT Hub connection
string as the official service SDKs build theirs (``sr`` = the connection string's HostName,
``skn`` = its SharedAccessKeyName; iothub.md §3.1). No SDK code: the requests are written out,
so tests can send what the SDKs would not (a stale etag, another policy, a bad body)."""

from __future__ import annotations

import ssl
import time
from typing import Any

import httpx

from provisiond.protocol.sas import build_sas_token

API_VERSION = "2021-04-12"


def parse_connection_string(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(";") if part)


class HubService:
    """Requests to one built-in hub as one of its policies."""

    def __init__(self, connection_string: str, *, ca_file: str, port: int) -> None:
        fields = parse_connection_string(connection_string)
        self.host_name = fields["HostName"]
        self.key_name = fields["SharedAccessKeyName"]
        self.key = fields["SharedAccessKey"]
        self.http = httpx.Client(
            base_url=f"https://127.0.0.1:{port}",
            verify=ssl.create_default_context(cafile=ca_file),
            timeout=10,
        )
        self.port = port

    def token(self, *, key_name: str | None = None, key: str | None = None, ttl: int = 3600) -> str:
        return build_sas_token(
            self.host_name, key or self.key, int(time.time()) + ttl, key_name=key_name or self.key_name
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
        host: str | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        sent = {
            # the Host the SDKs send: the connection string's HostName (127.0.0.1 is dialled, the
            # server certificate covers localhost and the hub's names)
            "Host": host or self.host_name,
            "Authorization": token if token is not None else self.token(),
            **(headers or {}),
        }
        return self.http.request(
            method,
            path,
            params={"api-version": API_VERSION, **(params or {})},
            json=json,
            headers={k: v for k, v in sent.items() if v != ""},
        )

    def close(self) -> None:
        self.http.close()


def iothub_error(response: httpx.Response) -> tuple[int, str]:
    """The status and IoT Hub error name of an error response, checked for IoT Hub's shape (the
    legacy body the Node.js SDK parses, the ``iothub-errorcode`` header agreeing with it)."""
    body = response.json()
    assert set(body) == {"Message", "ExceptionMessage"}, body
    assert body["Message"].startswith("ErrorCode:"), body
    name = body["Message"][len("ErrorCode:") :].split(";", 1)[0]
    assert response.headers["iothub-errorcode"] == name
    assert body["ExceptionMessage"].startswith("Tracking ID:")
    return response.status_code, name
