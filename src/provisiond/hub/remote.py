"""A linked IoT hub reached through its registry REST API (Azure IoT Hub, or another
provisiond's built-in hub, which serves the same wire): a :class:`~provisiond.hub.base.HubBackend`
over HTTPS with the hub's shared access policy.

Theory of operation
-------------------
Each operation is one call, as the official service SDKs make it (``api-version=2021-04-12``,
``Authorization: SharedAccessSignature sr={host}&sig=...&se=...&skn={policy}``):

- ``GET /devices/{id}`` and ``GET /twins/{id}``: read (404 ``DeviceNotFound``: ``None``);
- ``PUT /devices/{id}``: create (no ``If-Match``), or update in place with ``If-Match: "*"``
  when a read found it; a create that finds it (409 ``DeviceAlreadyExists``: a retry after a
  lost answer) becomes an update;
- ``PUT /twins/{id}`` with ``If-Match: "*"``: replace tags and desired properties;
- ``DELETE /devices/{id}`` with ``If-Match: "*"`` (404: already gone, so ``False``);
- ``POST /devices`` (bulk, :meth:`RemoteHub.put_many`): up to 100 new identities with their
  tags and desired properties in one call (``importMode`` ``create``; IoT Hub answers 400 with
  the per-device errors when some failed).

The hub's answers are translated once, here (:func:`hub_error`): no answer, timeouts, 408 and
5xx are :class:`~provisiond.errors.HubUnavailableError` (a retry may succeed); 429 (and IoT
Hub's ``Throttling*`` codes) :class:`~provisiond.errors.HubThrottledError` with the hub's
Retry-After; 404, 409, 412 their own classes; anything else a permanent
:class:`~provisiond.errors.HubError` naming the hub's status and ``ErrorCode``. The connection
string's key never leaves this module (it signs tokens; it is in no message).
"""

from __future__ import annotations

import re
import ssl
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import httpx
import msgspec

from ..errors import (
    ConfigurationError,
    HubDeviceExistsError,
    HubDeviceNotFoundError,
    HubError,
    HubPreconditionFailedError,
    HubThrottledError,
    HubUnavailableError,
)
from ..models import LinkedHub
from ..protocol.registration import parse_retry_after
from ..protocol.sas import build_sas_token
from .base import IdentitySpec
from .models import (
    AuthenticationType,
    DeviceAuthentication,
    DeviceStatus,
    HubDevice,
    Twin,
    authentication_for,
)

__all__ = ["API_VERSION", "BULK_LIMIT", "HubConnection", "RemoteHub", "hub_error"]

API_VERSION = "2021-04-12"
#: IoT Hub's bulk registry call takes at most this many devices.
BULK_LIMIT = 100
_TOKEN_TTL = 3600
_WAIT = re.compile(r"[Ww]ait (\d+(?:\.\d+)?) ?s")


class HubConnection(msgspec.Struct, frozen=True):
    """A hub's connection string, parsed: ``HostName={host}[:{port}];SharedAccessKeyName=...;
    SharedAccessKey=...``. Tokens are IoT Hub's service tokens (``sr`` the host name, ``skn``
    the policy); the REST API is at ``host[:port]``."""

    host: str
    port: int | None
    key_name: str
    key: str

    @classmethod
    def parse(cls, text: str) -> HubConnection:
        """:raises ConfigurationError: a part is missing or the port is not one (the message
        never shows the key)."""
        parts: dict[str, str] = {}
        for item in text.strip().split(";"):
            name, sep, value = item.partition("=")
            if sep:
                parts[name.strip().lower()] = value.strip()
        missing = [
            n for n in ("HostName", "SharedAccessKeyName", "SharedAccessKey") if not parts.get(n.lower())
        ]
        if missing:
            raise ConfigurationError(f"The hub's connection string lacks {', '.join(missing)}.")
        host, _, port = parts["hostname"].partition(":")
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigurationError(f"The hub's connection string has HostName port {port[:10]!r}.")
        return cls(host, int(port) if port else None, parts["sharedaccesskeyname"], parts["sharedaccesskey"])

    @property
    def authority(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"


def _error_code(response: httpx.Response) -> tuple[str | None, str]:
    """The hub's ``ErrorCode`` and message from its answer (IoT Hub's body is
    ``{"Message": "ErrorCode:DeviceNotFound;...", "ExceptionMessage": "..."}``, its header
    ``iothub-errorcode``)."""
    code = response.headers.get("iothub-errorcode")
    message = ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        raw = body.get("Message") or body.get("message") or ""
        if isinstance(raw, str):
            message = raw
            if raw.startswith("ErrorCode:"):
                head, _, rest = raw[len("ErrorCode:") :].partition(";")
                code = code or head.strip()
                message = rest.strip()
        if code is None and isinstance(body.get("errorCode"), (str, int)):
            code = str(body["errorCode"])
    if not message:
        message = response.text[:200]
    return code, message[:300]


def hub_error(hub: str, response: httpx.Response, what: str) -> HubError:
    """The hub's refusal of ``what``, as the exception the writer acts on."""
    status = response.status_code
    code, message = _error_code(response)
    text = f"IoT hub {hub} refused {what}: {status} {code or ''} {message}".rstrip()
    kwargs: dict[str, Any] = {"hub": hub, "status": status, "code": code}
    if status == 429 or (code or "").startswith("Throttl"):
        retry = parse_retry_after(response.headers.get("retry-after"))
        if retry is None and (wait := _WAIT.search(message)):
            retry = float(wait.group(1))
        return HubThrottledError(text, retry_after=retry, **kwargs)
    if status == 404:
        return HubDeviceNotFoundError(text, **kwargs)
    if status == 409:
        return HubDeviceExistsError(text, **kwargs)
    if status == 412:
        return HubPreconditionFailedError(text, **kwargs)
    if status == 408 or status >= 500:
        return HubUnavailableError(text, **kwargs)
    return HubError(text, **kwargs)


def _device_body(spec: IdentitySpec, *, etag: str | None = None) -> dict[str, Any]:
    auth = authentication_for(spec.credential, spec.hub)
    body: dict[str, Any] = {
        "deviceId": spec.device_id,
        "status": "enabled",
        "authentication": msgspec.to_builtins(auth),
    }
    if auth.type is AuthenticationType.CERTIFICATE_AUTHORITY:
        body["authentication"].setdefault(
            "x509Thumbprint", {"primaryThumbprint": None, "secondaryThumbprint": None}
        )
    if spec.capabilities is not None:
        body["capabilities"] = msgspec.to_builtins(spec.capabilities)
    if etag:
        body["etag"] = etag
    return body


def _device_from(hub: str, body: Any) -> HubDevice:
    """The fields of the hub's ``Device`` JSON that provisiond uses."""
    if not isinstance(body, dict):
        raise HubError(f"IoT hub {hub} answered a device that is not a JSON object.", hub=hub)
    auth = body.get("authentication")
    try:
        authentication = msgspec.convert(auth, DeviceAuthentication)
    except msgspec.ValidationError:
        authentication = DeviceAuthentication(type=AuthenticationType.SAS)
    try:
        status = DeviceStatus(body.get("status") or "enabled")
    except ValueError:
        status = DeviceStatus.ENABLED
    return HubDevice(
        device_id=str(body.get("deviceId")),
        hub=hub,
        authentication=authentication,
        status=status,
        etag=body["etag"] if isinstance(body.get("etag"), str) else None,
    )


def _twin_from(body: Any) -> Twin:
    if not isinstance(body, dict):
        return Twin()
    properties = body.get("properties") or {}
    desired = {k: v for k, v in (properties.get("desired") or {}).items() if not k.startswith("$")}
    reported = {k: v for k, v in (properties.get("reported") or {}).items() if not k.startswith("$")}
    tags = body.get("tags")
    return Twin(tags=tags if isinstance(tags, dict) else {}, desired=desired, reported=reported)


def _twin_body(twin: Twin) -> dict[str, Any]:
    return {"tags": twin.tags, "properties": {"desired": twin.desired}}


class RemoteHub:
    """One linked hub's registry REST API (a :class:`~provisiond.hub.base.HubBackend`).

    :param hub: the linked hub (its ``connectionString``; ``caCertificate``, PEM, to trust for
        its TLS instead of the system's store).
    :param address: where to connect instead of ``https://{HostName}`` (tests, the fault proxy,
        a hub behind a private name); the token's resource is still the host name.
    :raises ConfigurationError: the hub has no usable connection string.
    """

    def __init__(self, hub: LinkedHub, *, address: str | None = None, timeout: float = 10.0) -> None:
        if not hub.connection_string:
            raise ConfigurationError(f"IoT hub {hub.host_name} has no connection string.")
        self.connection = HubConnection.parse(hub.connection_string)
        self.host = hub.host_name.lower()
        verify: ssl.SSLContext | bool = True
        if hub.ca_certificate:
            verify = ssl.create_default_context(cadata=hub.ca_certificate)
        self._http = httpx.AsyncClient(
            base_url=address or f"https://{self.connection.authority}",
            verify=verify,
            timeout=timeout,
            headers={"User-Agent": "provisiond-hub-writer"},
        )
        self._token: tuple[float, str] | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    def _authorization(self) -> str:
        now = time.time()
        if self._token is None or self._token[0] < now + 300:
            expiry = int(now) + _TOKEN_TTL
            token = build_sas_token(
                self.connection.host, self.connection.key, expiry, key_name=self.connection.key_name
            )
            self._token = (expiry, token)
        return self._token[1]

    async def _call(
        self,
        method: str,
        path: str,
        what: str,
        *,
        body: Any = None,
        if_match: str | None = None,
        accept: tuple[int, ...] = (),
    ) -> httpx.Response:
        headers = {"Authorization": self._authorization(), "Accept": "application/json"}
        if if_match is not None:
            headers["If-Match"] = if_match
        content = None
        if body is not None:
            content = msgspec.json.encode(body)
            headers["Content-Type"] = "application/json; charset=utf-8"
        try:
            response = await self._http.request(
                method, path, params={"api-version": API_VERSION}, content=content, headers=headers
            )
        except httpx.TimeoutException as exc:
            raise HubUnavailableError(
                f"IoT hub {self.host} did not answer {what} in time.", hub=self.host
            ) from exc
        except httpx.HTTPError as exc:
            raise HubUnavailableError(
                f"IoT hub {self.host} could not be reached for {what}: {type(exc).__name__} {exc}",
                hub=self.host,
            ) from exc
        if response.status_code >= 400 and response.status_code not in accept:
            raise hub_error(self.host, response, what)
        return response

    @staticmethod
    def _path(kind: str, device_id: str) -> str:
        return f"/{kind}/{urllib.parse.quote(device_id, safe='')}"

    # --- HubBackend --------------------------------------------------------------------------

    async def get_identity(self, hub: str, device_id: str) -> HubDevice | None:
        try:
            response = await self._call(
                "GET", self._path("devices", device_id), f"reading device {device_id!r}"
            )
        except HubDeviceNotFoundError:
            return None
        device = _device_from(self.host, response.json())
        twin = await self.read_twin(hub, device_id)
        return msgspec.structs.replace(device, twin=twin)

    async def put_identity(self, spec: IdentitySpec, *, exists: bool | None = None) -> HubDevice:
        """As :meth:`HubBackend.put_identity`; ``exists`` (a read just said so) saves a call:
        update first (``If-Match: "*"``; a 404 then creates), else create first (a 409 then
        updates)."""
        path, what = self._path("devices", spec.device_id), f"writing device {spec.device_id!r}"
        if exists:
            try:
                response = await self._call("PUT", path, what, body=_device_body(spec), if_match="*")
            except HubDeviceNotFoundError:
                response = await self._call("PUT", path, what, body=_device_body(spec))
            return _device_from(self.host, response.json())
        try:
            response = await self._call("PUT", path, what, body=_device_body(spec))
        except HubDeviceExistsError:
            response = await self._call("PUT", path, what, body=_device_body(spec), if_match="*")
        return _device_from(self.host, response.json())

    async def read_twin(self, hub: str, device_id: str) -> Twin | None:
        try:
            response = await self._call(
                "GET", self._path("twins", device_id), f"reading the twin of {device_id!r}"
            )
        except HubDeviceNotFoundError:
            return None
        return _twin_from(response.json())

    async def apply_twin(self, hub: str, device_id: str, twin: Twin) -> None:
        await self._call(
            "PUT",
            self._path("twins", device_id),
            f"writing the twin of {device_id!r}",
            body=_twin_body(twin),
            if_match="*",
        )

    async def delete_identity(self, hub: str, device_id: str) -> bool:
        try:
            await self._call(
                "DELETE", self._path("devices", device_id), f"deleting device {device_id!r}", if_match="*"
            )
        except HubDeviceNotFoundError:
            return False
        return True

    async def disable_identity(self, hub: str, device_id: str) -> bool:
        path, what = self._path("devices", device_id), f"disabling device {device_id!r}"
        try:
            response = await self._call("GET", path, what)
        except HubDeviceNotFoundError:
            return False
        body = response.json()
        if not isinstance(body, dict):
            raise HubError(f"IoT hub {self.host} answered a device that is not a JSON object.", hub=self.host)
        body["status"] = "disabled"
        try:
            await self._call("PUT", path, what, body=body, if_match="*")
        except HubDeviceNotFoundError:
            return False
        return True

    async def check_access(self) -> None:
        """One read with the policy (``GET /statistics/devices``): linking checks the credential.

        :raises HubError: the hub refused it (401 with its message, unreachable, ...).
        """
        await self._call("GET", "/statistics/devices", "reading its statistics")

    async def put_many(self, items: Sequence[tuple[IdentitySpec, Twin | None]]) -> dict[str, HubError]:
        """Create up to :data:`BULK_LIMIT` identities with their twins' tags and desired
        properties in one bulk registry call (``POST /devices``, ``importMode`` ``create``); the
        devices the hub refused, by device id (the rest are written; one that exists already is
        a :class:`~provisiond.errors.HubDeviceExistsError`).

        :raises HubError: the call as a whole failed (throttled, unreachable, refused).
        """
        if not 0 < len(items) <= BULK_LIMIT:
            raise ValueError(f"a bulk call takes 1 to {BULK_LIMIT} devices")
        body = []
        for spec, twin in items:
            device = _device_body(spec)
            entry: dict[str, Any] = {
                "id": spec.device_id,
                "importMode": "create",
                "status": "enabled",
                "authentication": device["authentication"],
            }
            if "capabilities" in device:
                entry["capabilities"] = device["capabilities"]
            if twin is not None:
                entry["tags"] = twin.tags
                entry["properties"] = {"desired": twin.desired}
            body.append(entry)
        what = f"a bulk write of {len(items)} devices"
        # IoT Hub answers 400 with the same BulkRegistryOperationResult when some devices failed.
        response = await self._call("POST", "/devices", what, body=body, accept=(400,))
        try:
            result = response.json()
        except ValueError:
            result = None
        if not isinstance(result, dict) or (response.status_code == 400 and not result.get("errors")):
            raise (
                hub_error(self.host, response, what)
                if response.status_code == 400
                else HubError(
                    f"IoT hub {self.host} answered {what} with something that is not a bulk result.",
                    hub=self.host,
                )
            )
        refused: dict[str, HubError] = {}
        for error in result.get("errors") or []:
            if isinstance(error, dict) and isinstance(error.get("deviceId"), str):
                code = str(error.get("errorCode") or "")
                text = f"IoT hub {self.host} refused device {error['deviceId']!r}: {code} {error.get('errorStatus') or ''}"
                kind = HubDeviceExistsError if "AlreadyExists" in code or code == "409001" else HubError
                refused[error["deviceId"]] = kind(text.rstrip(), hub=self.host, code=code)
        return refused
