"""A small client for provisiond's service and admin REST API (what the CLI uses).

It signs every request with a SAS token made from a connection string
(``HostName=host:port;SharedAccessKeyName=...;SharedAccessKey=...``) and turns DPS error bodies
back into the :mod:`provisiond.errors` classes, keeping the service's message and error code.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .errors import (
    AuthenticationError,
    AuthorizationError,
    ConfigurationError,
    ConflictError,
    MethodNotAllowedError,
    NotFoundError,
    PreconditionFailedError,
    ProvisioningError,
    RequestError,
    StorageError,
    ThrottledError,
)
from .protocol.sas import build_sas_token

__all__ = ["API_VERSION", "ConnectionString", "ServiceClient"]

API_VERSION = "2021-10-01"
_TOKEN_TTL = 3600
_BY_STATUS: dict[int, type[ProvisioningError]] = {
    400: RequestError,
    401: AuthenticationError,
    403: AuthorizationError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    409: ConflictError,
    412: PreconditionFailedError,
}


@dataclass(frozen=True)
class ConnectionString:
    host: str
    key_name: str
    key: str

    @classmethod
    def parse(cls, text: str) -> ConnectionString:
        """Parse ``HostName=...;SharedAccessKeyName=...;SharedAccessKey=...``.

        :raises ConfigurationError: a part is missing.
        """
        parts: dict[str, str] = {}
        for item in text.strip().split(";"):
            name, sep, value = item.partition("=")
            if sep:
                parts[name.strip().lower()] = value.strip()
        missing = [n for n in ("hostname", "sharedaccesskeyname", "sharedaccesskey") if not parts.get(n)]
        if missing:
            raise ConfigurationError(f"The connection string lacks {', '.join(missing)}.")
        return cls(parts["hostname"], parts["sharedaccesskeyname"], parts["sharedaccesskey"])

    def __str__(self) -> str:
        return f"HostName={self.host};SharedAccessKeyName={self.key_name};SharedAccessKey={self.key}"


class ServiceClient:
    """Blocking client for the service and admin API of one provisiond (or Azure DPS)."""

    def __init__(
        self,
        connection_string: str | ConnectionString,
        *,
        ca_file: Path | str | None = None,
        timeout: float = 30.0,
        api_version: str = API_VERSION,
    ) -> None:
        self.connection = (
            connection_string
            if isinstance(connection_string, ConnectionString)
            else ConnectionString.parse(connection_string)
        )
        self.api_version = api_version
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        self._http = httpx.Client(base_url=f"https://{self.connection.host}", verify=verify, timeout=timeout)

    @classmethod
    def from_data_dir(cls, data_dir: Path, **kwargs: Any) -> ServiceClient:
        """A client for the server whose ``connection.json`` is in ``data_dir``."""
        path = data_dir / "connection.json"
        try:
            info = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigurationError(
                f"{path} does not exist: has `provisiond serve --data-dir {data_dir}` run?"
            ) from None
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"Cannot read {path}: {exc}") from exc
        kwargs.setdefault("ca_file", info.get("caCertificate"))
        return cls(info["serviceConnectionString"], **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _token(self) -> str:
        return build_sas_token(
            self.connection.host,
            self.connection.key,
            int(time.time()) + _TOKEN_TTL,
            key_name=self.connection.key_name,
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Send one request; a non-2xx answer raises the matching provisiond error."""
        all_headers = {"Authorization": self._token(), **(headers or {})}
        try:
            response = self._http.request(
                method,
                path,
                params={"api-version": self.api_version},
                content=json.dumps(body).encode() if body is not None else None,
                headers={**all_headers, **({"Content-Type": "application/json"} if body is not None else {})},
            )
        except httpx.ConnectError as exc:
            raise ConfigurationError(f"Cannot reach https://{self.connection.host}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise ProvisioningError(f"Request to https://{self.connection.host} failed: {exc}") from exc
        if response.is_success:
            return response
        raise self._error(response)

    @staticmethod
    def _error(response: httpx.Response) -> ProvisioningError:
        """The error a non-2xx answer means, with the body's message, errorCode and trackingId."""
        try:
            data = response.json()
        except ValueError:
            data = None
        if isinstance(data, dict):
            message, code, tracking = (
                str(data.get("message", "")),
                data.get("errorCode"),
                data.get("trackingId"),
            )
        else:
            message, code, tracking = response.text[:500], None, None
        message = message or f"HTTP {response.status_code}"
        code = code if isinstance(code, int) else None
        error: ProvisioningError
        if response.status_code == 429:
            error = ThrottledError(
                message, retry_after=int(response.headers.get("retry-after", "1")), error_code=code
            )
        else:
            cls = _BY_STATUS.get(
                response.status_code, StorageError if response.status_code >= 500 else RequestError
            )
            error = cls(message, error_code=code)
        error.tracking_id = str(tracking) if tracking else None
        return error

    def get(self, path: str) -> Any:
        return self.request("GET", path).json()

    def put(self, path: str, body: Any, *, if_match: str | None = None) -> Any:
        return self.request(
            "PUT", path, body=body, headers={"If-Match": if_match} if if_match else None
        ).json()

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body=body).json()

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body=body).json()

    def delete(self, path: str, *, if_match: str | None = None) -> None:
        self.request("DELETE", path, headers={"If-Match": if_match} if if_match else None)

    def query(self, path: str, query: str = "SELECT * FROM c", *, page_size: int = 1000) -> Iterator[Any]:
        """Every item of a paged query (follows ``x-ms-continuation``)."""
        continuation: str | None = None
        while True:
            headers = {"x-ms-max-item-count": str(page_size)}
            if continuation:
                headers["x-ms-continuation"] = continuation
            response = self.request("POST", path, body={"query": query}, headers=headers)
            yield from response.json()
            continuation = response.headers.get("x-ms-continuation")
            if not continuation:
                return
