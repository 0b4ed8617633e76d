"""A small client for provisiond's service and admin REST API (what the CLI uses).

It signs every request with a SAS token made from a connection string
(``HostName=host:port;SharedAccessKeyName=...;SharedAccessKey=...``) and turns DPS error bodies
back into the :mod:`provisiond.errors` classes, keeping the service's message and error code.

Typed operations take and return the models of :mod:`provisiond.models`, under the names the
service's management layer (:mod:`provisiond.service.management`) gives them::

    with ServiceClient.from_data_dir(Path("data")) as service:
        enrollment = service.enrollments.create(IndividualEnrollment(registration_id="dev-1", ...))
        service.enrollments.modify("dev-1", lambda e: msgspec.structs.replace(e, device_id="d1"))
        for group in service.groups.query("SELECT * FROM enrollmentGroups"): ...

``get``/``put``/``post``/``patch``/``delete``/``query`` send and return plain JSON for any path.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from .errors import (
    AuthenticationError,
    AuthorizationError,
    ConfigurationError,
    ConflictError,
    GatewayTimeoutError,
    MethodNotAllowedError,
    NotFoundError,
    PreconditionFailedError,
    ProvisioningError,
    RequestError,
    StorageError,
    ThrottledError,
)
from .hub.c2d import Enqueued
from .hub.events import StoredEvent
from .hub.methods import DEFAULT_RESPONSE_TIMEOUT, CloudToDeviceMethodResult
from .models import (
    AttestationMechanism,
    BulkEnrollmentGroupOperation,
    BulkEnrollmentOperation,
    BulkEnrollmentOperationResult,
    BulkOperationMode,
    CaCertificate,
    CertificateUpload,
    Deprovision,
    DeviceRegistrationState,
    EnrollmentGroup,
    HubWriterReport,
    IndividualEnrollment,
    LinkedHub,
    QuerySpecification,
    ServiceSettings,
    ServiceSettingsPatch,
    SharedAccessPolicy,
)
from .protocol.sas import build_sas_token

__all__ = [
    "API_VERSION",
    "ConnectionString",
    "EnrollmentsClient",
    "HubMessagesClient",
    "HubsClient",
    "CertificatesClient",
    "PoliciesClient",
    "RegistrationsClient",
    "ServiceClient",
    "SettingsClient",
]

T = TypeVar("T")
E = TypeVar("E", IndividualEnrollment, EnrollmentGroup)

API_VERSION = "2021-10-01"
_TOKEN_TTL = 3600
#: Tries of a read-modify-write whose write found the etag moved on (412).
_RMW_ATTEMPTS = 3
_BY_STATUS: dict[int, type[ProvisioningError]] = {
    400: RequestError,
    401: AuthenticationError,
    403: AuthorizationError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    409: ConflictError,
    412: PreconditionFailedError,
    504: GatewayTimeoutError,
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
        self.enrollments = EnrollmentsClient(self, "/enrollments", IndividualEnrollment)
        self.groups = EnrollmentsClient(self, "/enrollmentGroups", EnrollmentGroup)
        self.registrations = RegistrationsClient(self)
        self.hubs = HubsClient(self)
        self.certificates = CertificatesClient(self)
        self.policies = PoliciesClient(self)
        self.settings = SettingsClient(self)
        self.hub_messages = HubMessagesClient(self)

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
        content: bytes | None = None,
        timeout: float | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Send one request (``body`` as JSON, or ``content`` as it is; ``timeout``: seconds to
        wait for the answer, instead of the client's); a non-2xx answer raises the matching
        provisiond error."""
        all_headers = {"Authorization": self._token(), **(headers or {})}
        if body is not None:
            content = _encode(body)
            all_headers.setdefault("Content-Type", "application/json")
        try:
            response = self._http.request(
                method,
                path,
                params={"api-version": self.api_version, **(params or {})},
                content=content,
                headers=all_headers,
                timeout=httpx.Timeout(self._http.timeout.connect, read=timeout)
                if timeout
                else httpx.USE_CLIENT_DEFAULT,
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

    @contextlib.contextmanager
    def stream(
        self, path: str, params: dict[str, str], *, read_timeout: float | None
    ) -> Iterator[httpx.Response]:
        """A long-lived GET whose answer is read as it comes (``response.iter_lines()``);
        ``read_timeout`` bounds the wait for each chunk. A non-2xx answer raises the matching
        provisiond error; a connection that fails raises :class:`httpx.TransportError`."""
        timeout = httpx.Timeout(self._http.timeout.connect, read=read_timeout)
        with self._http.stream(
            "GET",
            path,
            params={"api-version": self.api_version, **params},
            headers={"Authorization": self._token()},
            timeout=timeout,
        ) as response:
            if not response.is_success:
                response.read()
                raise self._error(response)
            yield response

    def call(
        self,
        method: str,
        path: str,
        type_: type[T],
        *,
        body: Any = None,
        if_match: str | None = None,
    ) -> T:
        """Send one request and decode its answer as ``type_`` (a model)."""
        headers = {"If-Match": if_match} if if_match else None
        return msgspec.json.decode(self.request(method, path, body=body, headers=headers).content, type=type_)

    def paged(self, path: str, query: str, type_: type[T], *, page_size: int = 1000) -> Iterator[T]:
        """Every item of a paged query, decoded as ``type_`` (follows ``x-ms-continuation``)."""
        continuation: str | None = None
        while True:
            headers = {"x-ms-max-item-count": str(page_size)}
            if continuation:
                headers["x-ms-continuation"] = continuation
            response = self.request("POST", path, body=QuerySpecification(query=query), headers=headers)
            yield from msgspec.json.decode(response.content, type=list[type_])  # type: ignore[valid-type]
            continuation = response.headers.get("x-ms-continuation")
            if not continuation:
                return

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

    def delete(
        self, path: str, *, if_match: str | None = None, deprovision: Deprovision | None = None
    ) -> None:
        """DELETE ``path``; ``deprovision``: also disable or delete the identities the deleted
        registration records named (enrollments, groups, registrations; provisiond's)."""
        self.request(
            "DELETE",
            path,
            headers={"If-Match": if_match} if if_match else None,
            params={"deprovision": deprovision.value} if deprovision else None,
        )

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


def _encode(body: Any) -> bytes:
    """A request body: a model as msgspec encodes it (camelCase, unset fields left out), plain
    JSON data as :func:`json.dumps` does."""
    if isinstance(body, msgspec.Struct):
        return msgspec.json.encode(body)
    return json.dumps(body).encode()


def seg(value: str) -> str:
    """One URL path segment (ids may hold ':' and '.', never '/')."""
    return quote(value, safe="")


def _modify(read: Callable[[], T], write: Callable[[T, str], T], etag_of: Callable[[T], str | None]) -> T:
    """Read, change and write back on the etag that was read (``*`` when the service gave
    none); when someone else wrote in between (412), start over with a fresh read, a few times."""
    for attempt in range(_RMW_ATTEMPTS):
        current = read()
        try:
            return write(current, etag_of(current) or "*")
        except PreconditionFailedError:
            if attempt + 1 == _RMW_ATTEMPTS:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


class EnrollmentsClient(Generic[E]):
    """Individual enrollments (``service.enrollments``) or enrollment groups
    (``service.groups``): the service API's twelve enrollment operations, typed."""

    def __init__(self, client: ServiceClient, path: str, model: type[E]) -> None:
        self._client = client
        self.path = path
        self.model: type[E] = model

    def id_of(self, enrollment: E) -> str:
        if isinstance(enrollment, IndividualEnrollment):
            return enrollment.registration_id
        return enrollment.enrollment_group_id

    def item(self, id: str) -> str:
        return f"{self.path}/{seg(id)}"

    def get(self, id: str) -> E:
        """The enrollment, secrets stripped."""
        return self._client.call("GET", self.item(id), self.model)

    def put(self, enrollment: E, *, if_match: str | None = None) -> E:
        """Create (no ``if_match``, no ``etag``) or update; the answer shows symmetric keys."""
        return self._client.call(
            "PUT", self.item(self.id_of(enrollment)), self.model, body=enrollment, if_match=if_match
        )

    def create(self, enrollment: E) -> E:
        return self.put(msgspec.structs.replace(enrollment, etag=None))

    def modify(self, id: str, change: Callable[[E], E]) -> E:
        """Read, ``change``, write back on the etag read (see :func:`_modify`). Secrets a read
        leaves out are kept by the service."""
        return _modify(
            lambda: self.get(id),
            lambda current, etag: self.put(change(current), if_match=etag),
            lambda e: e.etag,
        )

    def delete(self, id: str, *, if_match: str | None = None, deprovision: Deprovision | None = None) -> None:
        """Delete the enrollment (an individual one with its registration record); with
        ``deprovision``, the identities its records named are disabled or deleted too."""
        self._client.delete(self.item(id), if_match=if_match, deprovision=deprovision)

    def attestation_mechanism(self, id: str) -> AttestationMechanism:
        """The attestation with its secrets (keys, certificates)."""
        return self._client.call("POST", f"{self.item(id)}/attestationmechanism", AttestationMechanism)

    def query(self, query: str = "SELECT * FROM c", *, page_size: int = 1000) -> Iterator[E]:
        return self._client.paged(f"{self.path}/query", query, self.model, page_size=page_size)

    def bulk(self, mode: BulkOperationMode, items: list[E]) -> BulkEnrollmentOperationResult:
        body: BulkEnrollmentOperation | BulkEnrollmentGroupOperation
        if self.model is IndividualEnrollment:
            body = BulkEnrollmentOperation(enrollments=items, mode=mode)  # type: ignore[arg-type]
        else:
            body = BulkEnrollmentGroupOperation(enrollment_groups=items, mode=mode)  # type: ignore[arg-type]
        return self._client.call("POST", self.path, BulkEnrollmentOperationResult, body=body)


class RegistrationsClient:
    """Device registration records (``service.registrations``)."""

    def __init__(self, client: ServiceClient) -> None:
        self._client = client

    def get(self, registration_id: str) -> DeviceRegistrationState:
        return self._client.call("GET", f"/registrations/{seg(registration_id)}", DeviceRegistrationState)

    def delete(
        self, registration_id: str, *, if_match: str | None = None, deprovision: Deprovision | None = None
    ) -> None:
        """Delete the record; with ``deprovision``, its identity is disabled or deleted too."""
        self._client.delete(
            f"/registrations/{seg(registration_id)}", if_match=if_match, deprovision=deprovision
        )

    def query(
        self, group_id: str, query: str = "SELECT * FROM registrations", *, page_size: int = 1000
    ) -> Iterator[DeviceRegistrationState]:
        """The records of the devices of enrollment group ``group_id``."""
        path = f"/registrations/{seg(group_id)}/query"
        return self._client.paged(path, query, DeviceRegistrationState, page_size=page_size)


class HubsClient:
    """Linked IoT hubs (``service.hubs``; provisiond's admin API)."""

    def __init__(self, client: ServiceClient) -> None:
        self._client = client

    @staticmethod
    def item(host: str) -> str:
        return f"/admin/linkedHubs/{seg(host)}"

    def list(self) -> list[LinkedHub]:
        return self._client.call("GET", "/admin/linkedHubs", list[LinkedHub])

    def get(self, host: str) -> LinkedHub:
        return self._client.call("GET", self.item(host), LinkedHub)

    def put(self, hub: LinkedHub, *, if_match: str | None = None) -> LinkedHub:
        return self._client.call("PUT", self.item(hub.host_name), LinkedHub, body=hub, if_match=if_match)

    def modify(self, host: str, change: Callable[[LinkedHub], LinkedHub]) -> LinkedHub:
        return _modify(
            lambda: self.get(host), lambda hub, etag: self.put(change(hub), if_match=etag), lambda h: h.etag
        )

    def writer(self, host: str) -> HubWriterReport:
        """The hub writer's figures for the remote hub ``host`` (budget, queued, written,
        throttled, retried, failed), summed over the nodes."""
        return self._client.call("GET", f"{self.item(host)}/writer", HubWriterReport)

    def delete(self, host: str, *, if_match: str | None = None) -> None:
        self._client.delete(self.item(host), if_match=if_match)


class HubMessagesClient:
    """The built-in hubs' telemetry and cloud-to-device messages (``service.hub_messages``;
    provisiond's admin API, :mod:`provisiond.service.hub_ops`)."""

    #: Seconds a broken events stream is retried for before :meth:`events` gives up.
    RECONNECT_FOR = 30.0

    def __init__(self, client: ServiceClient) -> None:
        self._client = client

    def events(
        self,
        hub: str,
        *,
        device_id: str | None = None,
        after: int | None = None,
        enqueued_time: str | None = None,
        quiet_timeout: float | None = None,
    ) -> Generator[StoredEvent, None, None]:
        """The hub's telemetry as it arrives: from ``after`` (a seq), else from
        ``enqueued_time`` (ISO 8601 or Unix ms), else from now on. Ends after
        ``quiet_timeout`` seconds without an event (None: never). A connection that breaks
        (the server restarts) is resumed after the last event seen, for up to
        :attr:`RECONNECT_FOR` seconds; then the error is raised."""
        params: dict[str, str] = {}
        if device_id:
            params["deviceId"] = device_id
        if quiet_timeout:
            params["timeout"] = str(max(1, round(quiet_timeout)))
        if after is not None:
            params["after"] = str(after)
        elif enqueued_time:
            params["enqueuedTime"] = enqueued_time
        failing_since: float | None = None
        while True:
            try:
                with self._client.stream(
                    f"{HubsClient.item(hub)}/events", params, read_timeout=_EVENTS_READ_TIMEOUT
                ) as response:
                    failing_since = None
                    for line in response.iter_lines():
                        if not line.strip():
                            continue
                        if line.startswith('{"cursor":'):  # the server's cursor lines
                            params["after"] = str(msgspec.json.decode(line, type=_Cursor).cursor)
                            continue
                        event = msgspec.json.decode(line, type=StoredEvent)
                        params["after"] = str(event.seq)
                        yield event
                    return  # the server ended the stream: quiet_timeout
            except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > self.RECONNECT_FOR:
                    raise ConfigurationError(
                        f"The events stream of https://{self._client.connection.host} broke and "
                        f"did not come back within {self.RECONNECT_FOR:.0f} s: {exc}"
                    ) from exc
                time.sleep(1.0)

    def send_c2d(
        self,
        hub: str,
        device_id: str,
        body: bytes,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        user_id: str | None = None,
        ack: str | None = None,
        expiry: str | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        properties: dict[str, str] | None = None,
    ) -> Enqueued:
        """Queue a cloud-to-device message for ``device_id`` (IoT Hub's bounds:
        :mod:`provisiond.hub.c2d`)."""
        fields = {
            "iothub-messageid": message_id,
            "iothub-correlationid": correlation_id,
            "iothub-userid": user_id,
            "iothub-ack": ack,
            "iothub-expiry": expiry,
            "iothub-contenttype": content_type,
            "iothub-contentencoding": content_encoding,
        }
        headers = {name: value for name, value in fields.items() if value is not None}
        headers.update({f"iothub-app-{name}": value for name, value in (properties or {}).items()})
        headers["Content-Type"] = "application/octet-stream"
        path = f"{HubsClient.item(hub)}/devices/{seg(device_id)}/messages/deviceBound"
        response = self._client.request("POST", path, content=body, headers=headers)
        return msgspec.json.decode(response.content, type=Enqueued)

    def invoke_method(
        self,
        hub: str,
        device_id: str,
        method_name: str,
        payload: Any = None,
        *,
        response_timeout: int | None = None,
        connect_timeout: int | None = None,
    ) -> CloudToDeviceMethodResult:
        """Invoke direct method ``method_name`` on ``device_id`` and return the device's
        ``status`` and ``payload`` (IoT Hub's rules and errors: :mod:`provisiond.hub.methods`;
        404103 DeviceNotOnline raises :class:`NotFoundError`, 504101 GatewayTimeout
        :class:`GatewayTimeoutError`)."""
        request: dict[str, Any] = {"methodName": method_name, "payload": payload}
        if response_timeout is not None:
            request["responseTimeoutInSeconds"] = response_timeout
        if connect_timeout is not None:
            request["connectTimeoutInSeconds"] = connect_timeout
        waits = (response_timeout or DEFAULT_RESPONSE_TIMEOUT) + (connect_timeout or 0)
        path = f"{HubsClient.item(hub)}/devices/{seg(device_id)}/methods"
        response = self._client.request("POST", path, body=request, timeout=waits + 30.0)
        return msgspec.json.decode(response.content, type=CloudToDeviceMethodResult)


class _Cursor(msgspec.Struct):
    cursor: int


#: Seconds without a byte after which an events stream counts as broken (the server sends a
#: cursor line every 10 s of quiet).
_EVENTS_READ_TIMEOUT = 45.0


class CertificatesClient:
    """CA certificates and their proof of possession (``service.certificates``; admin API)."""

    def __init__(self, client: ServiceClient) -> None:
        self._client = client

    @staticmethod
    def item(name: str, action: str = "") -> str:
        return f"/admin/certificates/{seg(name)}" + (f"/{action}" if action else "")

    def list(self) -> list[CaCertificate]:
        return self._client.call("GET", "/admin/certificates", list[CaCertificate])

    def get(self, name: str) -> CaCertificate:
        return self._client.call("GET", self.item(name), CaCertificate)

    def upload(self, name: str, upload: CertificateUpload, *, if_match: str | None = None) -> CaCertificate:
        return self._client.call("PUT", self.item(name), CaCertificate, body=upload, if_match=if_match)

    def generate_verification_code(self, name: str) -> CaCertificate:
        return self._client.call("POST", self.item(name, "generateVerificationCode"), CaCertificate)

    def verify(self, name: str, certificate: str) -> CaCertificate:
        """Verify ``name`` with a certificate whose subject CN is its verification code."""
        body = CertificateUpload(certificate=certificate)
        return self._client.call("POST", self.item(name, "verify"), CaCertificate, body=body)

    def delete(self, name: str, *, if_match: str | None = None) -> None:
        self._client.delete(self.item(name), if_match=if_match)


class PoliciesClient:
    """Shared access policies (``service.policies``; admin API)."""

    def __init__(self, client: ServiceClient) -> None:
        self._client = client

    @staticmethod
    def item(name: str, action: str = "") -> str:
        return f"/admin/sharedAccessPolicies/{seg(name)}" + (f"/{action}" if action else "")

    def list(self) -> list[SharedAccessPolicy]:
        """Every policy, keys stripped."""
        return self._client.call("GET", "/admin/sharedAccessPolicies", list[SharedAccessPolicy])

    def get(self, name: str, *, keys: bool = False) -> SharedAccessPolicy:
        """One policy; its keys only when asked (``listKeys``)."""
        if keys:
            return self._client.call("POST", self.item(name, "listKeys"), SharedAccessPolicy)
        return self._client.call("GET", self.item(name), SharedAccessPolicy)

    def put(self, policy: SharedAccessPolicy, *, if_match: str | None = None) -> SharedAccessPolicy:
        """Create or update; the answer shows the keys."""
        path = self.item(policy.key_name)
        return self._client.call("PUT", path, SharedAccessPolicy, body=policy, if_match=if_match)

    def modify(
        self, name: str, change: Callable[[SharedAccessPolicy], SharedAccessPolicy]
    ) -> SharedAccessPolicy:
        return _modify(
            lambda: self.get(name), lambda p, etag: self.put(change(p), if_match=etag), lambda p: p.etag
        )

    def delete(self, name: str, *, if_match: str | None = None) -> None:
        self._client.delete(self.item(name), if_match=if_match)


class SettingsClient:
    """The service settings (``service.settings``; admin API)."""

    def __init__(self, client: ServiceClient) -> None:
        self._client = client

    def get(self) -> ServiceSettings:
        return self._client.call("GET", "/admin/settings", ServiceSettings)

    def update(self, patch: ServiceSettingsPatch) -> ServiceSettings:
        return self._client.call("PATCH", "/admin/settings", ServiceSettings, body=patch)
