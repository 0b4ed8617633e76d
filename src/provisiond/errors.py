"""The whole exception tree of provisiond. No other module defines exceptions.

::

    ProvisioningError                      root; carries the DPS wire mapping
    ├── RequestError                       400: the request itself is wrong
    │   ├── InvalidBodyError               400004: body is not JSON / fields of the wrong type
    │   │   └── TwinLimitError             400004: a twin breaks IoT Hub's limits (twin_limits.py)
    │   ├── InvalidIdError                 400005: a registration/group/hub id breaks the id rules
    │   ├── MissingApiVersionError         400001: no api-version query parameter
    │   ├── BodyTooLargeError              413-ish, answered as 400 like DPS (400007)
    │   ├── InvalidQueryError              400008: unsupported query text
    │   └── MethodNotAllowedError          405: the path exists, the method does not
    ├── AuthenticationError                401: no, malformed, expired or forged credential
    │   └── TpmChallengeRequired           401 answered with a TPM challenge, not an error body
    ├── AuthorizationError                 403: a valid credential without the right
    ├── NotFoundError (LookupError)        404: a record does not exist
    │   └── DeviceNotOnlineError           404103: a built-in hub's device is not connected
    ├── ConflictError                      409: the record already exists
    ├── PreconditionFailedError            412: If-Match does not match the stored etag
    ├── ThrottledError                     429: rate limit; carries retry_after
    ├── HubError                           a linked IoT hub refused a registry call (400209 to the device)
    │   ├── HubUnavailableError            no answer, 5xx, timeouts: a retry may succeed
    │   │   └── HubThrottledError          429 from the hub; carries retry_after
    │   ├── HubDeviceNotFoundError         404 DeviceNotFound
    │   ├── HubDeviceExistsError           409 DeviceAlreadyExists
    │   └── HubPreconditionFailedError     412: the identity's etag changed
    ├── StorageError                       500: the database failed (after translation)
    │   └── DatabaseUnavailableError       503: unreachable, failing over, locked; carries retry_after
    ├── GatewayTimeoutError                504: a built-in hub's device did not answer in time
    ├── ConfigurationError                 startup problems (bad flags, unreadable PKI); never on the wire
    ├── ProtocolError                      abstract: a protocol rule was broken (h11 style)
    │   ├── LocalProtocolError             we broke it: the API was misused (a bug on our side)
    │   └── RemoteProtocolError            the peer broke it: malformed or impossible answer
    │       └── AmqpProtocolError          an AMQP 1.0 peer broke it; carries the AMQP error condition
    ├── RegistrationError                  device side: the service answered register with an error
    │   ├── RegistrationFailedError        the registration ended failed/disabled (carries the result)
    │   └── ServiceResponseError           an HTTP-ish error status from the service (status, body)
    ├── TransportError                     device side: the connection to the service failed
    │   ├── ConnectError                   could not connect / TLS handshake failed
    │   └── TimeoutError                   no answer in time (also a builtin TimeoutError subclass)
    └── TpmError                           a TPM structure is malformed, or a TPM command failed
        ├── TpmFormatError (ValueError)    bytes that are not the TPM structure they claim to be (400004)
        └── TpmCommandError                device side: the TPM (or its TCTI) failed a command; carries rc

Outside the tree, :class:`InsufficientData` is not an error but the sans-io codecs' signal
"need more bytes" (mqttproto's); it never leaves a protocol machine.

Each class carries ``http_status`` and ``error_code`` (HTTP status x 1000 + detail, as DPS
answers), so that endpoint adapters read attributes instead of keeping lookup tables.
The CLI reads ``exit_code``.

The built-in IoT hubs answer in IoT Hub's terms instead (their REST API and their MQTT
responses): each class also carries ``iothub_code``, an :class:`IotHubCode` (IoT Hub's number,
same scheme, and its name such as ``DeviceNotFound``); a raise site that knows better passes an
``IotHubCode`` as ``error_code`` (``NotFoundError(msg, error_code=IotHubCode.DEVICE_NOT_FOUND)``),
which sets both.
"""

from __future__ import annotations

import builtins
import enum
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .models import RegistrationStatus

__all__ = [
    "DpsCode",
    "HubDeviceExistsError",
    "HubDeviceNotFoundError",
    "HubError",
    "HubPreconditionFailedError",
    "HubThrottledError",
    "HubUnavailableError",
    "IotHubCode",
    "AmqpProtocolError",
    "AuthenticationError",
    "AuthorizationError",
    "BodyTooLargeError",
    "ConfigurationError",
    "ConflictError",
    "ConnectError",
    "DatabaseUnavailableError",
    "DeviceNotOnlineError",
    "GatewayTimeoutError",
    "InsufficientData",
    "InvalidBodyError",
    "InvalidIdError",
    "InvalidQueryError",
    "LocalProtocolError",
    "MessageTooLargeError",
    "MethodNotAllowedError",
    "MissingApiVersionError",
    "NotFoundError",
    "PreconditionFailedError",
    "ProtocolError",
    "ProvisioningError",
    "RegistrationError",
    "RegistrationFailedError",
    "RemoteProtocolError",
    "ServiceResponseError",
    "RequestError",
    "StorageError",
    "ThrottledError",
    "TimeoutError",
    "TpmChallengeRequired",
    "TpmCommandError",
    "TpmError",
    "TpmFormatError",
    "TransportError",
    "TwinLimitError",
]


class DpsCode(enum.IntEnum):
    """Every DPS ``errorCode`` provisiond answers with, each exactly once: the HTTP status times
    1000 plus a detail (DPS's scheme; the SDKs derive the status from ``errorCode // 1000``).
    ``template`` says what the code means; error messages at the raise sites add the specifics
    (which enrollment, which field), and :meth:`message` fills a template's ``{fields}``.
    The codes in use are listed, with their causes, in docs/service-api.md and docs/device-api.md.
    """

    template: str

    def __new__(cls, value: int, template: str) -> DpsCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.template = template
        return member

    @property
    def http_status(self) -> int:
        return int(self) // 1000

    def message(self, **fields: object) -> str:
        return self.template.format(**fields)

    # 400: the request is malformed
    BAD_REQUEST = 400000, "The request is malformed: {detail}"
    API_VERSION = 400001, "The api-version query parameter is missing or not a date from 2018 on."
    INVALID_BODY = 400004, "The request body is not valid: {detail}"
    INVALID_ID = 400005, "Invalid {what} {value!r}: ids use 1-128 characters from A-Z, a-z, 0-9 and '-._:'."
    BODY_TOO_LARGE = 400007, "The request body exceeds the {limit}-byte limit."
    INVALID_QUERY = 400008, "The query is not one provisiond understands: {detail}"
    VERIFICATION_CODE_MISMATCH = (
        400011,
        "The verification certificate's subject CN is not the verification code.",
    )
    VERIFICATION_SIGNATURE = 400012, "The verification certificate was not signed by the CA certificate."
    CUSTOM_ALLOCATION_FAILED = 400207, "Custom allocation failed: {detail}"
    NO_HUB = 400208, "No IoT hub can be allocated: {detail}"
    HUB_FAILED = 400209, "The IoT hub could not take the identity: {detail}"
    HUB_CREDENTIAL_REJECTED = 400210, "The IoT hub refused the connection string's credential: {detail}"
    HUB_UNREACHABLE = 400211, "The IoT hub's registry could not be read with the connection string: {detail}"
    # 401: the credential is missing, malformed, expired, forged or for another resource
    UNAUTHENTICATED = 401000, "No credential, or an unusable one."
    TOKEN_INVALID = 401002, "The SAS token's signature does not match a key."
    TOKEN_EXPIRED = 401003, "The SAS token expired."
    TOKEN_AUDIENCE = 401004, "The SAS token (or ID scope) is for another resource."
    UNKNOWN_POLICY = 401005, "No shared access policy has the token's key name."
    X509_CN_MISMATCH = 401010, "The device certificate's subject CN is not the registration id."
    X509_CHAIN_INVALID = 401011, "The presented certificate chain matches no enrollment, or does not verify."
    X509_EXPIRED = 401012, "A certificate of the presented chain is expired or not yet valid."
    X509_NO_CERTIFICATE = 401013, "No client certificate was presented."
    TPM_NOT_ENROLLED = 401020, "No TPM enrollment has this registration id."
    TPM_KEY_MISMATCH = 401021, "The endorsement or storage root key is not the enrolled one."
    TPM_CHALLENGE_INVALID = 401022, "No usable TPM challenge: none issued, expired, or used."
    ENROLLMENT_DISABLED = 401101, "The matching enrollment or enrollment group is disabled."
    # 403: a valid credential without the right
    FORBIDDEN = 403000, "The credential does not allow this operation."
    MISSING_RIGHT = 403001, "The shared access policy lacks the {right} right."
    # 404: a record does not exist
    NOT_FOUND = 404000, "No such resource."
    HUB_DEVICE_NOT_FOUND = 404001, "No such device identity in the hub."
    HUB_DEVICE_NOT_ONLINE = 404103, "The hub's device is not connected, or not subscribed to direct methods."
    ENROLLMENT_NOT_FOUND = 404201, "No such individual enrollment."
    REGISTRATION_NOT_FOUND = 404202, "No such device registration record."
    GROUP_NOT_FOUND = 404203, "No such enrollment group."
    LINKED_HUB_NOT_FOUND = 404204, "No such linked IoT hub."
    CA_NOT_FOUND = 404205, "No such CA certificate."
    POLICY_NOT_FOUND = 404206, "No such shared access policy."
    OPERATION_NOT_FOUND = 404207, "No such registration operation."
    # 405
    METHOD_NOT_ALLOWED = 405000, "The path does not take this method."
    # 409: the record exists, or changed under concurrent writes
    CONFLICT = 409000, "The record already exists, or kept changing under concurrent writes."
    ENROLLMENT_EXISTS = 409201, "The enrollment already exists; update it with its etag."
    REGISTRATION_CONTENDED = 409202, "The registration kept changing under concurrent writes; retry."
    # 412: If-Match
    PRECONDITION_FAILED = 412000, "The etag in If-Match does not match the stored record."
    ETAG_MISMATCH = 412001, "The etag in If-Match does not match the stored record."
    # 431: the request head is too large (refused by the HTTP front, before any handler)
    HEAD_TOO_LARGE = 431000, "The request head (request line and headers) exceeds the {limit}-byte limit."
    # 429: rate limits (with Retry-After)
    THROTTLED = 429000, "Over a rate limit."
    DEVICE_RATE_LIMIT = 429001, "The device is over its per-device request limit."
    NODE_RATE_LIMIT = 429002, "The service node is over its rate limit for device requests."
    FAILED_ATTESTATION_LIMIT = 429003, "The source address is over its budget of failed attestations."
    # 5xx
    INTERNAL = 500000, "Internal error; the service log has the details under the tracking id."
    STORAGE = 500001, "The database failed."
    DATABASE_UNAVAILABLE = 503000, "The database cannot be reached; retry after the delay given."
    GATEWAY_TIMEOUT = 504101, "A built-in hub's device did not answer in time."


class IotHubCode(enum.IntEnum):
    """The error codes a built-in IoT hub answers with, IoT Hub's own: the number (HTTP status
    x 1000 + detail, as DPS's) and IoT Hub's name for it (``iothub_name``), which its REST API
    puts in the ``iothub-errorcode`` header and in ``Message: "ErrorCode:{name};..."`` (the
    Node.js service SDK reads the name; iothub.md §3.6), and its MQTT responses put in the
    ``errorCode`` of their JSON body (the number; §1.6). Numbers and names are those of
    Microsoft's C# service SDK (``IotHubServiceErrorCode``) and IoT Hub's error documentation.
    """

    iothub_name: str

    def __new__(cls, value: int, iothub_name: str) -> IotHubCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.iothub_name = iothub_name
        return member

    @property
    def http_status(self) -> int:
        return int(self) // 1000

    INVALID_PROTOCOL_VERSION = 400001, "InvalidProtocolVersion"
    INVALID_OPERATION = 400003, "InvalidOperation"
    ARGUMENT_INVALID = 400004, "ArgumentInvalid"
    ARGUMENT_NULL = 400005, "ArgumentNull"
    IOTHUB_FORMAT_ERROR = 400006, "IotHubFormatError"
    UNAUTHORIZED = 401002, "IotHubUnauthorizedAccess"
    QUOTA_EXCEEDED = 403002, "IotHubQuotaExceeded"
    DEVICE_MAXIMUM_QUEUE_DEPTH_EXCEEDED = 403004, "DeviceMaximumQueueDepthExceeded"
    DEVICE_NOT_FOUND = 404001, "DeviceNotFound"
    DEVICE_NOT_ONLINE = 404103, "DeviceNotOnline"
    DEVICE_ALREADY_EXISTS = 409001, "DeviceAlreadyExists"
    PRECONDITION_FAILED = 412001, "PreconditionFailed"
    MESSAGE_TOO_LARGE = 413001, "MessageTooLarge"
    THROTTLING = 429001, "ThrottlingException"
    SERVER_ERROR = 500001, "ServerError"
    SERVICE_UNAVAILABLE = 503001, "ServiceUnavailable"
    GATEWAY_TIMEOUT = 504101, "GatewayTimeout"


class ProvisioningError(Exception):
    """Root of every error provisiond raises on purpose."""

    http_status: ClassVar[int] = 500
    error_code: ClassVar[int] = DpsCode.INTERNAL
    #: The IoT Hub code a built-in hub answers this error with (its status may differ from
    #: ``http_status``: IoT Hub answers a missing right with 401, not 403).
    iothub_code: ClassVar[IotHubCode] = IotHubCode.SERVER_ERROR
    exit_code: ClassVar[int] = 1
    #: The ``trackingId`` of the DPS error body this error was read from (a client's view of a
    #: service's answer); None for errors raised here.
    tracking_id: str | None = None

    def __init__(self, message: str, *, error_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if error_code is not None:
            # Instance override of the class default (a more specific DPS detail code, or an IoT
            # Hub code); a code of another status than the class's is our bug (the wire would
            # contradict itself).
            assert (
                not isinstance(error_code, DpsCode | IotHubCode) or error_code.http_status == self.http_status
            ), f"{type(self).__name__} ({self.http_status}) raised with {error_code.name}"
            self.error_code = error_code  # type: ignore[misc]
            if isinstance(error_code, IotHubCode):
                self.iothub_code = error_code  # type: ignore[misc]


class RequestError(ProvisioningError):
    """The request is malformed: bad JSON, bad field types, bad ids, bad parameters."""

    http_status = 400
    error_code = DpsCode.BAD_REQUEST
    iothub_code = IotHubCode.ARGUMENT_INVALID


class InvalidBodyError(RequestError):
    """The body is not JSON, or a field has the wrong type or value."""

    error_code = DpsCode.INVALID_BODY


class TwinLimitError(InvalidBodyError):
    """A twin (an enrollment's initial twin, a webhook's) breaks IoT Hub's twin limits: key
    rules, value ranges, depth or size. The message names the rule and where it broke."""


class InvalidIdError(RequestError):
    """An id (registration, enrollment group, hub, certificate, policy) breaks the id rules."""

    error_code = DpsCode.INVALID_ID


class MissingApiVersionError(RequestError):
    """The request has no ``api-version`` query parameter, or one that is not a date."""

    error_code = DpsCode.API_VERSION
    iothub_code = IotHubCode.INVALID_PROTOCOL_VERSION


class BodyTooLargeError(RequestError):
    """The body is larger than the service accepts (96 KB, DPS's message size limit)."""

    error_code = DpsCode.BODY_TOO_LARGE
    iothub_code = IotHubCode.MESSAGE_TOO_LARGE


class InvalidQueryError(RequestError):
    """The query text is not one provisiond understands."""

    error_code = DpsCode.INVALID_QUERY


class MethodNotAllowedError(RequestError):
    """The path exists but does not take this method."""

    http_status = 405
    error_code = DpsCode.METHOD_NOT_ALLOWED


class AuthenticationError(ProvisioningError):
    """The credential is missing, malformed, expired, forged, or for another resource."""

    http_status = 401
    error_code = DpsCode.UNAUTHENTICATED
    iothub_code = IotHubCode.UNAUTHORIZED


class AuthorizationError(ProvisioningError):
    """The credential is valid but its policy lacks the right the operation needs."""

    http_status = 403
    error_code = DpsCode.FORBIDDEN
    iothub_code = IotHubCode.UNAUTHORIZED


class NotFoundError(ProvisioningError, LookupError):
    """The record the request names does not exist."""

    http_status = 404
    error_code = DpsCode.NOT_FOUND
    iothub_code = IotHubCode.DEVICE_NOT_FOUND


class DeviceNotOnlineError(NotFoundError):
    """A built-in hub's device is not connected (or has not subscribed to direct methods): IoT
    Hub's 404103 ``DeviceNotOnline``. The admin API answers it with the same number in its DPS
    body (not NotFoundError's 404000), so that a caller can tell "not connected" from "no such
    device" (404001) as it can on the hub's own API; ``provisiond hub invoke-method`` promises it."""

    error_code = DpsCode.HUB_DEVICE_NOT_ONLINE
    iothub_code = IotHubCode.DEVICE_NOT_ONLINE


class ConflictError(ProvisioningError):
    """The record already exists (a create without If-Match on an existing id)."""

    http_status = 409
    error_code = DpsCode.CONFLICT
    iothub_code = IotHubCode.DEVICE_ALREADY_EXISTS


class PreconditionFailedError(ProvisioningError):
    """If-Match names an etag that is not the stored one (RFC 7232)."""

    http_status = 412
    error_code = DpsCode.PRECONDITION_FAILED
    iothub_code = IotHubCode.PRECONDITION_FAILED


class ThrottledError(ProvisioningError):
    """A rate limit was hit; the caller should come back after ``retry_after`` seconds."""

    http_status = 429
    error_code = DpsCode.THROTTLED

    def __init__(self, message: str, *, retry_after: int, error_code: int | None = None) -> None:
        super().__init__(message, error_code=error_code)
        self.retry_after = retry_after

    iothub_code = IotHubCode.THROTTLING


class HubError(ProvisioningError):
    """A linked IoT hub refused (or failed) a registry call: its registry REST API, or the
    built-in hub's identities. Translated once, where the hub's answer is read
    (:mod:`provisiond.hub.remote`). A device sees it as a failed registration (errorCode 400209,
    the hub's error in the message); an operator call that reached the hub sees it as a 400.

    :param hub: the hub's host name. :param status: the hub's HTTP status (``None``: no answer).
    :param code: the hub's ``ErrorCode`` (``DeviceNotFound``, ``ThrottlingBacklogTimeout``, ...).
    """

    http_status = 400
    error_code = DpsCode.HUB_FAILED
    #: Whether a retry may succeed (the hub writer backs off and retries; otherwise it
    #: compensates and fails the registration).
    transient: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        hub: str | None = None,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        error_code: int | None = None,
    ) -> None:
        super().__init__(message, error_code=error_code)
        self.hub = hub
        self.status = status
        self.code = code
        self.retry_after = retry_after


class HubUnavailableError(HubError):
    """The hub did not answer (connection refused or reset, TLS failure, timeout) or answered
    5xx or 408: a retry after a while may succeed."""

    transient = True


class HubThrottledError(HubUnavailableError):
    """The hub throttled the call (429, ``ThrottlingException``, ``ThrottlingBacklogTimeout``);
    ``retry_after`` is the hub's Retry-After (or its message's "Wait N seconds")."""


class HubDeviceNotFoundError(HubError):
    """The hub has no such device identity (404 ``DeviceNotFound``)."""


class HubDeviceExistsError(HubError):
    """The hub already has the device identity a create asked for (409 ``DeviceAlreadyExists``)."""


class HubPreconditionFailedError(HubError):
    """The identity's etag is not the one a conditional call gave (412): someone else wrote it."""


class StorageError(ProvisioningError):
    """The database failed in a way the caller cannot fix (translated from the driver)."""

    http_status = 500
    error_code = DpsCode.STORAGE


class DatabaseUnavailableError(StorageError):
    """The database cannot be reached now (down, failing over, every connection busy, a lock
    held too long), but may be soon. Nothing was acknowledged (a write whose answer was lost may
    still have landed), and the caller should retry after ``retry_after`` seconds (503 +
    Retry-After, retryable for every DPS SDK). Raised by the stores at their driver boundary,
    never decided by a handler."""

    http_status = 503
    error_code = DpsCode.DATABASE_UNAVAILABLE

    def __init__(self, message: str, *, retry_after: int = 2, error_code: int | None = None) -> None:
        super().__init__(message, error_code=error_code)
        self.retry_after = retry_after

    iothub_code = IotHubCode.SERVICE_UNAVAILABLE


class GatewayTimeoutError(ProvisioningError):
    """A built-in hub's device did not answer in time (a direct method past its response
    timeout): IoT Hub's 504101 ``GatewayTimeout``."""

    http_status = 504
    error_code = DpsCode.GATEWAY_TIMEOUT
    iothub_code = IotHubCode.GATEWAY_TIMEOUT


class ConfigurationError(ProvisioningError):
    """The service cannot start as configured (bad flag, unreadable file, bad database URL)."""

    exit_code = 2


class ProtocolError(ProvisioningError):
    """A protocol rule was broken. Abstract: raise :class:`LocalProtocolError` (our side misused
    the API) or :class:`RemoteProtocolError` (the peer sent something malformed or impossible)."""

    def __init__(self, message: str, *, error_code: int | None = None) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract: raise LocalProtocolError or RemoteProtocolError")
        super().__init__(message, error_code=error_code)


class LocalProtocolError(ProtocolError):
    """Our side broke the protocol: a driver sent the flow something it did not ask for (a bug)."""


class MessageTooLargeError(LocalProtocolError):
    """A message our side would send is larger than the peer's link accepts (its
    max-message-size); nothing was sent. The one local protocol error a driver is expected to
    handle: the peer chose the limit (the AMQP endpoint detaches the link with
    ``amqp:link:message-size-exceeded``)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: an answer that is not JSON, lacks required fields, or carries
    a status that is impossible where it appears (``unassigned`` in a 2xx)."""


class AmqpProtocolError(RemoteProtocolError):
    """An AMQP 1.0 peer sent something malformed or out of order. ``condition`` is the AMQP
    error condition (a symbol such as ``amqp:decode-error``) the connection, session or link is
    closed with, so that the peer learns why."""

    def __init__(self, message: str, *, condition: str = "amqp:decode-error") -> None:
        super().__init__(message)
        self.condition = condition


class InsufficientData(Exception):
    """Not an error: a sans-io decoder reached the end of its input before the end of the value
    (need more bytes). Protocol machines catch it and wait; it never reaches a caller."""


class RegistrationError(ProvisioningError):
    """Device side: the service refused or failed the registration."""


class RegistrationFailedError(RegistrationError):
    """The registration reached a terminal status other than ``assigned`` (failed, disabled).

    ``result`` is the service's ``registrationState`` (with ``errorCode``/``errorMessage``) when it
    sent one; ``status`` is the terminal status.
    """

    def __init__(
        self, message: str, *, status: RegistrationStatus, result: Any = None, error_code: int | None = None
    ) -> None:
        super().__init__(message, error_code=error_code)
        self.status = status
        self.result = result


class ServiceResponseError(RegistrationError):
    """The service answered with an error status (4xx/5xx) the client does not retry, or kept
    answering with a retryable one until the client gave up.

    ``status_code`` is the HTTP (or HTTP-like, for MQTT/AMQP) status; ``body`` the DPS error body.
    """

    def __init__(self, message: str, *, status_code: int, body: dict[str, Any] | None = None) -> None:
        code = body.get("errorCode") if body else None
        super().__init__(message, error_code=code if isinstance(code, int) else status_code * 1000)
        self.status_code = status_code
        self.body = body or {}
        self.tracking_id: str | None = self.body.get("trackingId")


class TransportError(ProvisioningError):
    """Device side: the connection to the service failed."""


class ConnectError(TransportError):
    """Could not connect, or the TLS handshake failed (wrong CA, refused certificate)."""


class TimeoutError(TransportError, builtins.TimeoutError):  # shadows the builtin on purpose, like httpx
    """The service did not answer in time."""


class TpmChallengeRequired(AuthenticationError):
    """Not a failure of the device: a TPM register without a token gets a challenge. Endpoints
    answer it with the challenge body (device-protocol.md §2.3: ``message``,
    ``authenticationKey``, ``keyName``, no ``status``) instead of an error body.

    ``authentication_key`` is the base64 activation blob; ``key_name`` the SAS ``skn`` to use.
    """

    def __init__(self, message: str, *, authentication_key: str, key_name: str = "registration") -> None:
        super().__init__(message)
        self.authentication_key = authentication_key
        self.key_name = key_name


class TpmError(ProvisioningError):
    """A TPM structure is malformed, or a TPM command failed."""


class TpmFormatError(TpmError, ValueError):
    """Bytes that are not the TPM structure they claim to be (an EK that is not a TPM2B_PUBLIC
    RSA-2048 endorsement key, a truncated activation blob); the message says what is wrong."""

    http_status = 400
    error_code = DpsCode.INVALID_BODY


class TpmCommandError(TpmError):
    """Device side: the TPM, or the TCTI that reaches it, failed a command. ``rc`` is the TSS2
    response code when there is one (e.g. TPM_RC_INTEGRITY for a blob made for another TPM)."""

    def __init__(self, message: str, *, rc: int | None = None) -> None:
        super().__init__(message)
        self.rc = rc
