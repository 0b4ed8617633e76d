"""Who may connect to a built-in hub: the checks of an MQTT CONNECT against the device's
identity, with the return code IoT Hub answers each failure with.

=====================================================  ====================================
what is wrong                                          CONNACK return code
=====================================================  ====================================
the client id is not the user name's device id         2 identifier rejected
a module identity (not served)                         2 identifier rejected
the password is not a SAS token, or not for            4 bad user name or password
``{host}/devices/{deviceId}``, or not UTF-8
no such device; a wrong key or certificate; an         5 not authorized
expired token; no credential at all
the identity is disabled                               3 server unavailable
=====================================================  ====================================

Return code 3 for a disabled device is what the official SDKs read as "device disabled": the C
SDK reports ``IOTHUB_CLIENT_CONNECTION_DEVICE_DISABLED`` for it
(``iothubtransport_mqtt_common.c``, the CONNACK handler), and the Java SDK documents its
``MqttServerUnavailableException`` as "may be encountered when trying to connect to a disabled
device". 2 and 4 are "bad credential, do not retry" for the C SDK; 5 is "bad credential" that it
may retry (a token that expired). The Python SDK raises ``CredentialError`` for 4 and 5.

Credentials, by the identity's ``authentication.type`` (iothub.md §5):

* ``sas``: the password is a device SAS token, ``sr={host}/devices/{deviceId}`` (the host
  compared without regard to case, the device id exactly; quoted as any SDK quotes it), no
  ``skn``, signed with the identity's primary or secondary key, not expired (with the service's
  clock skew). The session lasts until the token expires, as IoT Hub's does.
* ``selfSigned``: no password; the client certificate's SHA-1 or SHA-256 thumbprint is the
  identity's primary or secondary thumbprint, and it is within its validity dates (the TLS
  handshake proved the device holds its key).
* ``certificateAuthority``: no password; the certificate's subject CN is the device id, and it
  chains (through the intermediates the device presented) to a **verified** CA certificate of
  provisiond (``/admin/certificates``, proof of possession done), as IoT Hub requires a
  verified CA in the hub.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote

import msgspec
from cryptography import x509

from ..attestation import x509 as x509_checks
from ..certificates import load_certificate, sha1_thumbprint, sha256_thumbprint
from ..errors import AuthenticationError
from ..hub.models import AuthenticationType, DeviceStatus, HubDevice
from ..models import CaCertificate
from ..protocol.mqtt import ConnectReturnCode
from ..protocol.sas import SasToken, parse_sas_token, verify_signature
from ..storage import Collection, Store

__all__ = ["Authenticated", "HubAuthenticator", "Refused"]

#: Seconds the verified CA certificates are reused between CONNECTs. A chain that none of them
#: anchors reads them again, so a CA verified meanwhile counts at once; one deleted meanwhile
#: may count for this long.
_CA_CACHE_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A CONNECT that may proceed: how the device authenticated (``sas`` or ``x509``, the
    ``iothub-connection-auth-method`` type) and when its token expires (Unix seconds; None for
    certificates)."""

    method: str
    expires: float | None


@dataclass(frozen=True, slots=True)
class Refused:
    code: ConnectReturnCode
    reason: str


class HubAuthenticator:
    """Checks CONNECT credentials against identities (the verified CA certificates it reads are
    reused for :data:`_CA_CACHE_SECONDS`)."""

    def __init__(self, store: Store, *, clock_skew: int) -> None:
        self._store = store
        self._clock_skew = clock_skew
        self._cas: tuple[float, list[x509.Certificate]] | None = None

    async def authenticate(
        self,
        device: HubDevice | None,
        *,
        hub: str,
        device_id: str,
        password: bytes | None,
        chain: Sequence[bytes],
        now: float,
    ) -> Authenticated | Refused:
        """Whether ``device`` (the identity ``{hub}/{device_id}``, None when there is none) may
        connect with this password or client certificate chain."""
        token: SasToken | None = None
        if password is not None:
            try:
                token = parse_sas_token(password.decode("utf-8"))
            except UnicodeDecodeError:
                return Refused(ConnectReturnCode.BAD_USERNAME_OR_PASSWORD, "the password is not UTF-8")
            except AuthenticationError as exc:
                return Refused(ConnectReturnCode.BAD_USERNAME_OR_PASSWORD, exc.message)
            refusal = _check_audience(token, hub, device_id)
            if refusal is not None:
                return refusal
        elif not chain:
            return Refused(
                ConnectReturnCode.NOT_AUTHORIZED,
                "no credential: a SAS token as the password, or a client certificate in the TLS handshake",
            )
        if device is None:
            return Refused(ConnectReturnCode.NOT_AUTHORIZED, f"no device {device_id!r} in hub {hub}")
        if device.status is DeviceStatus.DISABLED:
            return Refused(ConnectReturnCode.SERVER_UNAVAILABLE, f"device {device_id!r} is disabled")
        kind = device.authentication.type
        if token is not None:
            return self._check_token(device, token, now)
        if kind is AuthenticationType.SELF_SIGNED:
            return _check_thumbprint(device, chain, now)
        if kind is AuthenticationType.CERTIFICATE_AUTHORITY:
            return await self._check_ca(device_id, chain, now)
        return Refused(
            ConnectReturnCode.NOT_AUTHORIZED,
            f"device {device_id!r} authenticates with {kind.value!r}: it needs a SAS token as the password",
        )

    def _check_token(self, device: HubDevice, token: SasToken, now: float) -> Authenticated | Refused:
        keys = device.authentication.symmetric_key
        if device.authentication.type is not AuthenticationType.SAS or keys is None:
            return Refused(
                ConnectReturnCode.NOT_AUTHORIZED,
                f"device {device.device_id!r} authenticates with {device.authentication.type.value!r} "
                "certificates, not a SAS token",
            )
        if not any(verify_signature(token, key) for key in (keys.primary_key, keys.secondary_key) if key):
            return Refused(
                ConnectReturnCode.NOT_AUTHORIZED,
                "the SAS token's signature matches neither of the device's keys",
            )
        if token.expiry + self._clock_skew < now:
            return Refused(
                ConnectReturnCode.NOT_AUTHORIZED, f"the SAS token expired {int(now) - token.expiry} s ago"
            )
        return Authenticated("sas", float(token.expiry + self._clock_skew))

    async def _check_ca(self, device_id: str, chain: Sequence[bytes], now: float) -> Authenticated | Refused:
        try:
            presented = x509_checks.parse_presented_chain(chain)
        except AuthenticationError as exc:
            return Refused(ConnectReturnCode.NOT_AUTHORIZED, exc.message)
        if x509_checks.common_name(presented.leaf) != device_id:
            return Refused(
                ConnectReturnCode.NOT_AUTHORIZED,
                f"the certificate's subject CN {x509_checks.common_name(presented.leaf)!r} is not the device id",
            )
        cas, fresh = await self._verified_cas()
        found = x509_checks.find_anchor(presented, [(ca, ca) for ca in cas])
        if found is None and not fresh:
            cas, _ = await self._verified_cas(reload=True)
            found = x509_checks.find_anchor(presented, [(ca, ca) for ca in cas])
        if found is None:
            return Refused(
                ConnectReturnCode.NOT_AUTHORIZED,
                "the certificate does not chain to a verified CA certificate (upload the CA to "
                "/admin/certificates and prove possession)",
            )
        try:
            x509_checks.verify_chain(presented, found[1], _utc(now))
        except AuthenticationError as exc:
            return Refused(ConnectReturnCode.NOT_AUTHORIZED, exc.message)
        return Authenticated("x509", None)

    async def _verified_cas(self, *, reload: bool = False) -> tuple[list[x509.Certificate], bool]:
        """The verified CA certificates, and whether they were read just now."""
        cached = self._cas
        if not reload and cached is not None and time.monotonic() - cached[0] < _CA_CACHE_SECONDS:
            return cached[1], False
        cas = []
        for record in await self._store.query_all(Collection.CA_CERTIFICATES):
            ca = msgspec.json.decode(record.doc, type=CaCertificate)
            if ca.is_verified and ca.certificate:
                try:
                    cas.append(load_certificate(ca.certificate))
                except ValueError:
                    continue
        self._cas = (time.monotonic(), cas)
        return cas, True


def _check_audience(token: SasToken, hub: str, device_id: str) -> Refused | None:
    """The token must be for ``{hub}/devices/{device_id}`` and carry no policy name."""
    host, sep, rest = token.resource.partition("/")
    if token.key_name:
        return Refused(
            ConnectReturnCode.BAD_USERNAME_OR_PASSWORD,
            f"the SAS token names the policy {token.key_name[:64]!r}; a device signs with its own key",
        )
    # ``resource`` is already URL-decoded once (sr is encoded once, as the Python SDK does); the
    # device id in it may have been encoded once more before that (as encodeURIComponent of
    # the id, then of the whole URI), so both readings count. Decoding only twice refused
    # an id with "%" and two hex digits ("d%20x" became "d x").
    wanted = f"devices/{device_id}"
    if not sep or host.lower() != hub.lower() or wanted not in (rest, unquote(rest)):
        return Refused(
            ConnectReturnCode.BAD_USERNAME_OR_PASSWORD,
            f"the SAS token is for {token.resource[:200]!r}, not {hub}/devices/{device_id}",
        )
    return None


def _check_thumbprint(device: HubDevice, chain: Sequence[bytes], now: float) -> Authenticated | Refused:
    try:
        presented = x509_checks.parse_presented_chain(chain)
    except AuthenticationError as exc:
        return Refused(ConnectReturnCode.NOT_AUTHORIZED, exc.message)
    prints = device.authentication.x509_thumbprint
    enrolled = (
        {p.upper() for p in (prints.primary_thumbprint, prints.secondary_thumbprint) if p}
        if prints
        else set()
    )
    leaf = presented.leaf
    if not enrolled & {sha1_thumbprint(leaf), sha256_thumbprint(leaf)}:
        return Refused(
            ConnectReturnCode.NOT_AUTHORIZED,
            f"the certificate (SHA-256 {sha256_thumbprint(leaf)}) is not the device's (thumbprint mismatch)",
        )
    try:
        x509_checks.verify_self_signed(leaf, _utc(now))
    except AuthenticationError as exc:
        return Refused(ConnectReturnCode.NOT_AUTHORIZED, exc.message)
    return Authenticated("x509", None)


def _utc(now: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(now, dt.UTC)
