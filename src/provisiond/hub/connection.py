"""How provisiond reaches a linked hub's service REST API, as DPS does: the hub's connection
string (a shared access policy's), the SAS tokens made from it, the TLS trust, IoT Hub's error
bodies, and the check made when a hub is linked.

A connection string is ``HostName={host}[:{port}];SharedAccessKeyName={policy};SharedAccessKey={key}``
(the hub's "iothubowner", or a policy with the RegistryRead, RegistryWrite and ServiceConnect
rights). It is a secret: :class:`HubConnection` never shows the key (``repr`` included), and
no message made here quotes it. Tokens are IoT Hub's service tokens: ``sr`` is the hub's host
name, ``skn`` the policy (iothub.md §3.1).

:func:`check_credential` is what linking a hub runs: ``GET /statistics/devices`` with the policy
(a read, RegistryRead), so that a wrong key, a policy without rights, a hub that cannot be
reached or a certificate that does not verify is refused when the hub is linked, with the hub's
own answer, rather than on the first device's assignment.
"""

from __future__ import annotations

import base64
import binascii
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from cryptography import x509

from ..errors import DpsCode, InvalidBodyError, RequestError
from ..models import LinkedHub
from ..protocol.sas import build_sas_token
from ..protocol.topics import ascii_digits

__all__ = [
    "API_VERSION",
    "HubConnection",
    "check_credential",
    "hub_error_parts",
    "hub_error_text",
    "parse_ca_certificate",
    "tls_context",
]

log = logging.getLogger("provisiond.hub")

#: The registry REST API version the official service SDKs send (iothub.md §3.2).
API_VERSION = "2021-04-12"
#: Seconds the link check waits for the hub (connect, TLS, answer).
CHECK_TIMEOUT = 10.0
#: Seconds a service token made here lasts.
TOKEN_TTL = 3600
_PARTS = {"hostname", "sharedaccesskeyname", "sharedaccesskey"}
#: How much of a hub's error text a message quotes.
_SNIPPET = 300


@dataclass(frozen=True)
class HubConnection:
    """A parsed hub connection string. ``key`` never shows in ``repr``."""

    host: str
    port: int | None
    key_name: str
    key: str = field(repr=False)

    @classmethod
    def parse(cls, text: str, *, host: str | None = None) -> HubConnection:
        """Parse a service connection string; ``host``: the linked hub's host name, which its
        ``HostName`` must name (a port may follow).

        :raises InvalidBodyError: a part is missing, unknown or malformed, or the host differs
            (the message names the part, never the key).
        """
        parts: dict[str, str] = {}
        for item in text.strip().strip(";").split(";"):
            name, sep, value = item.partition("=")
            name = name.strip().lower()
            if not sep or not name:
                raise InvalidBodyError("connectionString: every part is Name=value, separated by ';'.")
            if name not in _PARTS:
                hint = " (a device's connection string: link the hub with a shared access policy's)"
                raise InvalidBodyError(
                    f"connectionString has an unknown part {name[:40]!r}"
                    + (hint if name in ("deviceid", "moduleid") else "")
                    + "; it takes HostName, SharedAccessKeyName and SharedAccessKey."
                )
            parts[name] = value.strip()
        missing = [
            n for n in ("HostName", "SharedAccessKeyName", "SharedAccessKey") if not parts.get(n.lower())
        ]
        if missing:
            raise InvalidBodyError(f"connectionString lacks {', '.join(missing)}.")
        name, _, port_text = parts["hostname"].partition(":")
        port = None
        if port_text:
            if not ascii_digits(port_text) or not 0 < int(port_text) < 65536:
                raise InvalidBodyError(f"connectionString: HostName's port {port_text[:10]!r} is not a port.")
            port = int(port_text)
        if host is not None and name.lower() != host.lower():
            raise InvalidBodyError(
                f"connectionString is for {name[:260]!r}, not for the linked hub {host!r}."
            )
        key = parts["sharedaccesskey"]
        try:
            if not base64.b64decode(key, validate=True):
                raise ValueError
        except (binascii.Error, ValueError):
            raise InvalidBodyError("connectionString: SharedAccessKey is not a base64 key.") from None
        return cls(name, port, parts["sharedaccesskeyname"], key)

    @property
    def authority(self) -> str:
        """``host`` or ``host:port``: where the REST API is."""
        return self.host if self.port is None else f"{self.host}:{self.port}"

    def token(self, now: float | None = None, *, ttl: int = TOKEN_TTL) -> str:
        """A service SAS token for the hub, valid ``ttl`` seconds from ``now``."""
        expiry = int(time.time() if now is None else now) + ttl
        return build_sas_token(self.host, self.key, expiry, key_name=self.key_name)


def parse_ca_certificate(pem: str) -> str:
    """``pem`` if it holds at least one PEM certificate (what a hub's TLS must chain to).

    :raises InvalidBodyError: it does not.
    """
    try:
        certificates = x509.load_pem_x509_certificates(pem.encode())
        ssl.create_default_context(cadata=pem)
    except (ValueError, ssl.SSLError, UnicodeEncodeError):
        certificates = []
    if not certificates:
        raise InvalidBodyError("caCertificate is not a PEM certificate (-----BEGIN CERTIFICATE-----).")
    return pem


def tls_context(ca_certificate: str | None) -> ssl.SSLContext:
    """The TLS context for a hub: its ``caCertificate`` alone when it has one (a private CA),
    else the system's trust store; host names are checked either way."""
    if ca_certificate:
        return ssl.create_default_context(cadata=ca_certificate)
    return ssl.create_default_context()


def hub_error_parts(response: httpx.Response) -> tuple[str | None, str, str]:
    """IoT Hub's error as its answer gives it: the ``iothub-errorcode`` header or the code in
    the body's ``Message`` (``ErrorCode:{code};{text}``) or ``errorCode``, the text (the whole
    answer when it is not a JSON object), and the tracking id of ``ExceptionMessage``. Shared by
    the link check (:func:`hub_error_text`) and the registry client
    (:func:`provisiond.hub.remote.hub_error`)."""
    code = response.headers.get("iothub-errorcode")
    text = ""
    tracking = ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = body.get("Message") or body.get("message") or ""
        text = message if isinstance(message, str) else ""
        if text.startswith("ErrorCode:"):
            body_code, _, text = text[len("ErrorCode:") :].partition(";")
            code = code or body_code.strip()
        if code is None and isinstance(body.get("errorCode"), (str, int)):
            code = str(body["errorCode"])
        exception = str(body.get("ExceptionMessage") or "")
        if exception.startswith("Tracking ID:"):
            tracking = exception.split("-TimeStamp:", 1)[0][len("Tracking ID:") :].strip()
    elif response.text:
        text = response.text
    return code, text.strip(), tracking


def hub_error_text(response: httpx.Response) -> str:
    """IoT Hub's error (:func:`hub_error_parts`) in one line: the status, the code (or the
    reason phrase), the text, and the tracking id."""
    code, text, tracking = hub_error_parts(response)
    described = f"{response.status_code} {code or response.reason_phrase}".strip()
    if text:
        described += f": {text[:_SNIPPET]}"
    if tracking:
        described += f" (tracking id {tracking[:64]})"
    return described


def _verification_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind ``exc``, if that is what it is."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


async def check_credential(
    hub: LinkedHub,
    connection: HubConnection,
    *,
    wait: float = CHECK_TIMEOUT,
    clock: Callable[[], float] = time.time,
) -> None:
    """Read the hub's device statistics with its connection string's policy.

    :raises RequestError: 400210, the hub refused the credential (its status and error named);
        400211, the hub could not be reached, its TLS certificate did not verify, or it answered
        something that is not IoT Hub's.
    """
    url = f"https://{connection.authority}/statistics/devices"
    headers = {"Authorization": connection.token(clock()), "Accept": "application/json"}
    where = f"IoT hub {hub.host_name!r} at {connection.authority}"
    try:
        async with httpx.AsyncClient(
            verify=tls_context(hub.ca_certificate), timeout=wait, trust_env=False
        ) as client:
            response = await client.get(url, params={"api-version": API_VERSION}, headers=headers)
    except httpx.ConnectError as exc:
        cause = _verification_error(exc)
        if cause is not None:
            why = f"its TLS certificate does not verify ({cause.verify_message})"
            fix = (
                "give the CA it chains to as caCertificate"
                if not hub.ca_certificate
                else "check caCertificate"
            )
            raise RequestError(f"{where}: {why}; {fix}.", error_code=DpsCode.HUB_UNREACHABLE) from None
        raise RequestError(f"{where} cannot be reached: {exc}.", error_code=DpsCode.HUB_UNREACHABLE) from None
    except httpx.TimeoutException:
        raise RequestError(
            f"{where} did not answer within {wait:g} s.", error_code=DpsCode.HUB_UNREACHABLE
        ) from None
    except httpx.HTTPError as exc:
        raise RequestError(f"{where} failed: {exc}.", error_code=DpsCode.HUB_UNREACHABLE) from None
    if response.status_code in (401, 403):
        raise RequestError(
            f"{where} refused the credential of policy {connection.key_name!r}: {hub_error_text(response)}.",
            error_code=DpsCode.HUB_CREDENTIAL_REJECTED,
        )
    if response.status_code != 200:
        raise RequestError(
            f"{where} did not answer its registry statistics (GET /statistics/devices): "
            f"{hub_error_text(response)}.",
            error_code=DpsCode.HUB_UNREACHABLE,
        )
    try:
        statistics = response.json()
    except ValueError:
        statistics = None
    if not isinstance(statistics, dict) or "totalDeviceCount" not in statistics:
        raise RequestError(
            f"{where} answered GET /statistics/devices with something that is not IoT Hub's registry statistics.",
            error_code=DpsCode.HUB_UNREACHABLE,
        )
    log.info(
        "linked hub %s: policy %s can read its registry (%s devices)",
        hub.host_name,
        connection.key_name,
        statistics.get("totalDeviceCount"),
    )
