"""Custom allocation: the webhook DPS calls for ``allocationPolicy: custom``.

Contract (service-api.md §8): provisiond POSTs an ``AllocationRequest`` to the enrollment's
``customAllocationDefinition.webhookUrl``, as given (an Azure Function's key is in its query
string; ``apiVersion`` says how the enrollment is serialized, it is not added to the URL)::

    {"individualEnrollment" | "enrollmentGroup": {... secrets stripped ...},
     "deviceRuntimeContext": {"registrationId", "currentIotHubHostName"?, "currentDeviceId"?,
                              "x509"?, "symmetricKey"?, "tpm"?, "payload"?},
     "linkedHubs": ["hub host name", ...]}

and the webhook answers 200 ``{"iotHubHostName", "initialTwin"?, "payload"?}``. The hub must be
one of ``linkedHubs``; the initial twin must keep IoT Hub's twin limits (``twin_limits.py``). Anything else fails the registration with a :class:`WebhookError` whose
message says why (status and the start of the body, timeout, bad JSON, unknown hub); the URL's
query string (the function key) never appears in a message or a log line.

One :class:`AllocationWebhook` per worker process holds one ``httpx.AsyncClient``, created on
first use (in the worker's event loop) and closed by the app's lifespan. TLS is verified against
the system CAs, plus ``--webhook-ca-file`` for a private CA.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx
import msgspec

from ..errors import TwinLimitError
from ..models import EnrollmentGroup, IndividualEnrollment, InitialTwin
from ..protocol import bounded_json
from ..protocol.messages import TpmAttestationRequest, X509RegistrationResult
from ..twin_limits import check_initial_twin

__all__ = [
    "AllocationRequest",
    "AllocationResponse",
    "AllocationWebhook",
    "DeviceRuntimeContext",
    "WebhookError",
    "redact_url",
]

#: How much of a webhook's error body a message quotes.
BODY_SNIPPET = 200
#: The largest answer read from a webhook (an AllocationResponse is small).
MAX_RESPONSE_BYTES = 1024 * 1024


class WebhookError(Exception):
    """The webhook did not allocate; the message says why (URL redacted)."""


class DeviceRuntimeContext(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    registration_id: str
    current_iot_hub_host_name: str | None = None
    current_device_id: str | None = None
    x509: X509RegistrationResult | None = None
    symmetric_key: dict[str, Any] | None = None
    tpm: TpmAttestationRequest | None = None
    payload: Any = None


class AllocationRequest(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    device_runtime_context: DeviceRuntimeContext
    linked_hubs: list[str]
    individual_enrollment: IndividualEnrollment | None = None
    enrollment_group: EnrollmentGroup | None = None


class AllocationResponse(msgspec.Struct, rename="camel", kw_only=True):
    iot_hub_host_name: str | None = None
    initial_twin: InitialTwin | None = None
    payload: Any = None


def redact_url(url: str) -> str:
    """``url`` without credentials: no user info, and the query string replaced by ``[redacted]``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    netloc = parts.netloc.rpartition("@")[2]
    query = "[redacted]" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _scrub(text: str, url: str) -> str:
    """``text`` (an exception's or a body's) with the URL's secrets taken out."""
    text = text.replace(url, redact_url(url))
    parts = urlsplit(url)
    values = [value for _, value in parse_qsl(parts.query, keep_blank_values=True)]
    for secret in sorted((parts.query, parts.password, *values), key=lambda v: -len(v or "")):
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return text


class _RedactUrls(logging.Filter):
    """httpx logs every request's URL at INFO; a webhook's query string holds its key."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) for a in record.args):
            record.args = tuple(redact_url(str(a)) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


_httpx_log = logging.getLogger("httpx")
if not any(isinstance(f, _RedactUrls) for f in _httpx_log.filters):
    _httpx_log.addFilter(_RedactUrls())


class AllocationWebhook:
    """Calls custom allocation webhooks (one per worker; see the module docstring)."""

    def __init__(self, *, timeout: float = 10.0, ca_file: Path | None = None) -> None:
        self.timeout = timeout
        self.ca_file = ca_file
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            context = ssl.create_default_context()
            if self.ca_file is not None:
                context.load_verify_locations(cafile=str(self.ca_file))
            self._client = httpx.AsyncClient(
                verify=context, timeout=self.timeout, follow_redirects=False, trust_env=False
            )
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def allocate(
        self, url: str, request: AllocationRequest, candidates: Sequence[str]
    ) -> AllocationResponse:
        """POST ``request`` to ``url``; the answer, its ``iotHubHostName`` one of ``candidates``.

        :raises WebhookError: no usable answer (the message names the cause, the URL redacted).
        """
        shown = f"Custom allocation webhook {redact_url(url)}"
        if urlsplit(url).scheme not in ("http", "https"):
            raise WebhookError(f"{shown} is not an http(s) URL.")
        try:
            async with asyncio.timeout(self.timeout):
                async with self._http().stream(
                    "POST",
                    url,
                    content=msgspec.json.encode(request),
                    headers={"Content-Type": "application/json", "Accept": "application/json"},
                ) as response:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_RESPONSE_BYTES:
                            raise WebhookError(f"{shown} answered more than {MAX_RESPONSE_BYTES} bytes.")
                    status = response.status_code
        except (TimeoutError, httpx.TimeoutException):
            raise WebhookError(f"{shown} timed out after {self.timeout:g} s.") from None
        except httpx.HTTPError as exc:
            cause = _scrub(str(exc) or type(exc).__name__, url)
            raise WebhookError(f"{shown} could not be reached: {cause}") from None
        text = _scrub(bytes(body).decode("utf-8", "replace"), url)
        if status != 200:
            snippet = " ".join(text[:BODY_SNIPPET].split())
            raise WebhookError(f"{shown} answered {status}: {snippet or '(no body)'}")
        try:
            answer = bounded_json.decode(bytes(body), AllocationResponse)
        except msgspec.ValidationError as exc:
            raise WebhookError(f"{shown} answered an invalid AllocationResponse: {exc}") from None
        except msgspec.DecodeError as exc:
            raise WebhookError(f"{shown} answered invalid JSON: {exc}") from None
        if not answer.iot_hub_host_name:
            raise WebhookError(f"{shown} answered no iotHubHostName.")
        if answer.initial_twin is not None:
            twin = answer.initial_twin
            try:
                check_initial_twin(twin.tags, twin.properties.desired if twin.properties else None)
            except TwinLimitError as exc:
                raise WebhookError(
                    f"{shown} answered an initialTwin beyond IoT Hub's limits: {exc.message}"
                ) from None
        if answer.iot_hub_host_name.lower() not in {c.lower() for c in candidates}:
            raise WebhookError(
                f"{shown} answered iotHubHostName {answer.iot_hub_host_name[:256]!r} which is not one of the "
                f"candidate hubs: {', '.join(candidates)}"
            )
        return answer
