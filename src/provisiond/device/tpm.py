"""TPM 2.0 attestation for the device client, on ``tpm2-pytss`` (the ``tpm`` extra).

::

    from provisiond.device import ProvisioningDeviceClient
    from provisiond.device.tpm import TpmSecurity

    with TpmSecurity(tcti="device:/dev/tpmrm0") as security:          # or "swtpm:host=127.0.0.1,port=2321"
        print(security.registration_id, security.endorsement_key_b64)  # enroll these
        with ProvisioningDeviceClient.create(endpoint, id_scope, security, ca_file=ca) as client:
            result = client.register()

What it does with the TPM (device-protocol.md §5.4, §5.5), as the official SDKs do:

* reads the endorsement key (EK) at the persistent handle ``0x81010001`` and the storage root
  key (SRK) at ``0x81000001``, creating and persisting them from the standard templates when
  missing (:data:`~provisiond.protocol.tpm.EK_TEMPLATE`, :data:`~provisiond.protocol.tpm.SRK_TEMPLATE`);
* answers the service's challenge: ActivateCredential (SRK, EK, in a PolicySecret(ENDORSEMENT)
  session) recovers the inner wrapper key, Import and Load bring in the HMAC identity key, which
  is persisted at ``0x81000100`` (an older one is evicted first);
* signs SAS tokens with TPM2_HMAC under that key, and, once assigned, imports the hub key the
  result wraps (``registrationState.tpm.authenticationKey``) the same way, so that the device
  signs its IoT hub tokens in the TPM too (:meth:`TpmSecurity.sign`).

The TPM is chosen by a TCTI string, as tpm2-tools take it: ``device:/dev/tpmrm0`` (the kernel's
resource manager; the default), ``swtpm:host=127.0.0.1,port=2321`` or
``mssim:host=127.0.0.1,port=2321`` (simulators on loopback), ``tabrmd:`` (the access broker).
Without a resource manager (simulators) the provider flushes every transient object and session
it creates. Calls block (a TPM is slow); the async client runs the long ones in a worker thread.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from ..errors import ConfigurationError, TpmCommandError, TpmFormatError
from ..protocol import tpm
from ..protocol.messages import TpmAttestationRequest, TpmChallenge
from ..protocol.registration import RegistrationResult
from ..protocol.sas import signed_sas_token
from .security import SAS_KEY_NAME, SecurityProvider

try:
    from tpm2_pytss import ESAPI, TSS2_Exception
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_SE
    from tpm2_pytss.types import (
        TPM2B_DATA,
        TPM2B_ENCRYPTED_SECRET,
        TPM2B_ID_OBJECT,
        TPM2B_PRIVATE,
        TPM2B_PUBLIC,
        TPMT_SYM_DEF,
        TPMT_SYM_DEF_OBJECT,
        TPMU_SYM_KEY_BITS,
        TPMU_SYM_MODE,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

__all__ = ["DEFAULT_TCTI", "TpmSecurity", "read_endorsement_key"]

logger = logging.getLogger(__name__)

#: The kernel's TPM resource manager, what tpm2-tools use by default on Linux.
DEFAULT_TCTI = "device:/dev/tpmrm0"
#: TPM2B_MAX_BUFFER: longer data is HMACed in a sequence.
_MAX_BUFFER = 1024


def _require_pytss() -> None:
    if _IMPORT_ERROR is not None:
        raise ConfigurationError(
            "TPM support needs tpm2-pytss: pip install 'provisiond[tpm]' (it builds against the TSS2 "
            f"libraries: apt-get install libtss2-dev) ({_IMPORT_ERROR})."
        )


@contextlib.contextmanager
def _step(what: str, hint: str = "") -> Iterator[None]:
    """Translate the TSS's exceptions into TpmCommandError, naming the step (httpx style)."""
    try:
        yield
    except TSS2_Exception as exc:
        rc = int(exc.rc)
        text = f"The TPM failed {what}: {exc} (rc 0x{rc:x})."
        from_tpm = rc >> 16 == 0  # not the TSS's own (layered) codes
        warning = not rc & 0x80 and rc & 0x900 == 0x900  # e.g. out of object memory: not the blob's fault
        if hint and from_tpm and not warning:
            # Integrity, value or size errors; swtpm answers TPM_RC_FAILURE to a bad OAEP secret.
            text += f" {hint}"
        raise TpmCommandError(text, rc=rc) from exc


_BLOB_HINT = (
    "The activation blob was not made for this TPM's endorsement and storage root keys, or it was "
    "altered on the way."
)


class TpmSecurity(SecurityProvider):
    """TPM 2.0 attestation: the device proves it holds the enrolled EK (device-protocol.md §2.3).

    :param tcti: how to reach the TPM (see the module docstring); default ``device:/dev/tpmrm0``.
    :param registration_id: default: the id the SDKs derive from the EK (lower-case base32 of
        SHA-256 of its TPM2B_PUBLIC).
    :raises ConfigurationError: tpm2-pytss is not installed.
    :raises TpmCommandError: the TPM cannot be reached, or refused to create or read the keys.
    :raises TpmFormatError: the key persisted at the EK's (or SRK's) handle is not an RSA-2048
        endorsement (storage) key.
    """

    answers_challenges = True

    def __init__(self, *, tcti: str = DEFAULT_TCTI, registration_id: str | None = None) -> None:
        _require_pytss()
        self.tcti = tcti
        self._lock = threading.RLock()
        self._activated = False
        self._key_name = SAS_KEY_NAME
        try:
            self._esapi: Any = ESAPI(tcti)
        except TSS2_Exception as exc:
            raise TpmCommandError(
                f"Cannot reach a TPM through the TCTI {tcti!r} ({exc}): is the TPM (or the simulator) there, "
                "and may this user open it?",
                rc=int(exc.rc),
            ) from exc
        try:
            self._ek = self._persistent_key(tpm.EK_HANDLE, tpm.EK_TEMPLATE, ESYS_TR.ENDORSEMENT, "EK")
            self._srk = self._persistent_key(tpm.SRK_HANDLE, tpm.SRK_TEMPLATE, ESYS_TR.OWNER, "SRK")
            tpm.endorsement_key(self._ek, f"endorsement key at 0x{tpm.EK_HANDLE:08x}")
            tpm.storage_root_key(self._srk, f"storage root key at 0x{tpm.SRK_HANDLE:08x}")
        except BaseException:
            self.close()
            raise
        self._registration_id = registration_id or tpm.registration_id(self._ek)
        if not self._registration_id.strip():
            raise ValueError("The registration id must not be empty.")

    # --- identity ------------------------------------------------------------------------------

    @property
    def registration_id(self) -> str:
        return self._registration_id

    @property
    def endorsement_key(self) -> bytes:
        """The EK's TPM2B_PUBLIC (what an enrollment holds, base64)."""
        return self._ek

    @property
    def storage_root_key(self) -> bytes:
        """The SRK's TPM2B_PUBLIC."""
        return self._srk

    @property
    def endorsement_key_b64(self) -> str:
        return base64.b64encode(self._ek).decode("ascii")

    @property
    def storage_root_key_b64(self) -> str:
        return base64.b64encode(self._srk).decode("ascii")

    # --- the SecurityProvider seams ------------------------------------------------------------

    def begin_registration(self) -> TpmAttestationRequest:
        # A new registration starts with a new challenge: the first register goes without a token.
        self._activated = False
        return TpmAttestationRequest(
            endorsement_key=self.endorsement_key_b64, storage_root_key=self.storage_root_key_b64
        )

    def answer_challenge(self, challenge: TpmChallenge) -> None:
        blob = tpm.ActivationBlob.from_b64(challenge.authentication_key)
        self._import(blob, "the challenge's")
        self._key_name = challenge.key_name or SAS_KEY_NAME
        self._activated = True

    def sas_token(self, resource: str, expiry: int) -> str | None:
        if not self._activated:
            return None  # the first register of a registration: the service answers with a challenge
        return signed_sas_token(resource, expiry, self.sign, key_name=self._key_name)

    def complete_registration(self, result: RegistrationResult) -> None:
        """Import the hub key of ``registrationState.tpm.authenticationKey`` (when the service
        sent one) at the identity key's handle, as the SDKs do."""
        self._activated = False
        state = result.registration_state
        blob = state.tpm.authentication_key if state is not None and state.tpm is not None else None
        if blob:
            self._import(tpm.ActivationBlob.from_b64(blob), "the registration result's")
            logger.info("imported the hub key of %s into the TPM", self._registration_id)

    # --- TPM operations ------------------------------------------------------------------------

    def sign(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` in the TPM, with the key persisted at ``0x81000100`` (the
        challenge's key while registering, the hub key once assigned).

        :raises TpmCommandError: no key there, or the TPM failed.
        """
        with self._lock, _step(f"to sign with the identity key at 0x{tpm.IDENTITY_KEY_HANDLE:08x}"):
            e = self._esapi
            key = e.tr_from_tpmpublic(tpm.IDENTITY_KEY_HANDLE)
            try:
                if len(data) <= _MAX_BUFFER:
                    return bytes(e.hmac(key, data, TPM2_ALG.SHA256))
                # Longer than TPM2B_MAX_BUFFER: an HMAC sequence (as the .NET SDK does).
                chunks = [data[i : i + _MAX_BUFFER] for i in range(0, len(data), _MAX_BUFFER)]
                sequence = e.hmac_start(key, b"", TPM2_ALG.SHA256)
                e.tr_set_auth(sequence, b"")
                for chunk in chunks[:-1]:
                    e.sequence_update(sequence, chunk)
                digest, _ = e.sequence_complete(sequence, chunks[-1], ESYS_TR.NULL)
                return bytes(digest)
            finally:
                e.tr_close(key)

    def close(self) -> None:
        """Close the connection to the TPM (the persisted keys stay). Idempotent."""
        with self._lock:
            esapi, self._esapi = getattr(self, "_esapi", None), None
        if esapi is not None:
            esapi.close()

    def __enter__(self) -> TpmSecurity:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TpmSecurity registration_id={self._registration_id!r} tcti={self.tcti!r}>"

    # --- internals -------------------------------------------------------------------------------

    def _exists(self, handle: int) -> bool:
        more, data = self._esapi.get_capability(TPM2_CAP.HANDLES, handle, 1)
        handles = list(data.data.handles)
        return bool(handles) and int(handles[0]) == handle

    def _persistent_key(self, handle: int, template: tpm.PublicArea, hierarchy: Any, label: str) -> bytes:
        """The TPM2B_PUBLIC of the key at ``handle``, created from ``template`` if missing."""
        e = self._esapi
        with self._lock, _step(f"to read or create the {label} at 0x{handle:08x}"):
            if not self._exists(handle):
                logger.info("creating the %s at 0x%08x (standard template)", label, handle)
                in_public, _ = TPM2B_PUBLIC.unmarshal(template.tpm2b())
                transient, *_ = e.create_primary(None, in_public, hierarchy)
                try:
                    persistent = e.evict_control(ESYS_TR.OWNER, transient, handle)
                    e.tr_close(persistent)
                finally:
                    e.flush_context(transient)
            key = e.tr_from_tpmpublic(handle)
            try:
                public, _, _ = e.read_public(key)
            finally:
                e.tr_close(key)
            return bytes(public.marshal())

    def _import(self, blob: tpm.ActivationBlob, which: str) -> None:
        """ActivateCredential, Import, Load, and persist at the identity key's handle."""
        try:
            blob.object_public_area()
        except TpmFormatError as exc:
            raise TpmFormatError(f"{which.capitalize()} activation blob: {exc.message}") from None
        e = self._esapi
        with self._lock:
            ek = e.tr_from_tpmpublic(tpm.EK_HANDLE)
            srk = e.tr_from_tpmpublic(tpm.SRK_HANDLE)
            try:
                with _step(f"to activate {which} credential (TPM2_ActivateCredential)", _BLOB_HINT):
                    session = e.start_auth_session(
                        ESYS_TR.NONE,
                        ESYS_TR.NONE,
                        TPM2_SE.POLICY,
                        TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                        TPM2_ALG.SHA256,
                    )
                    try:
                        e.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
                        credential = e.activate_credential(
                            srk,
                            ek,
                            TPM2B_ID_OBJECT(credential=blob.credential_blob),
                            TPM2B_ENCRYPTED_SECRET(secret=blob.secret),
                            session1=ESYS_TR.PASSWORD,
                            session2=session,
                        )
                    finally:
                        with contextlib.suppress(TSS2_Exception):
                            e.flush_context(session)
                public, _ = TPM2B_PUBLIC.unmarshal(
                    len(blob.object_public).to_bytes(2, "big") + blob.object_public
                )
                with _step(f"to import {which} key (TPM2_Import)", _BLOB_HINT):
                    private = e.import_(
                        srk,
                        TPM2B_DATA(bytes(credential)),
                        public,
                        TPM2B_PRIVATE(blob.duplicate),
                        TPM2B_ENCRYPTED_SECRET(secret=blob.in_sym_seed),
                        TPMT_SYM_DEF_OBJECT(
                            algorithm=TPM2_ALG.AES,
                            keyBits=TPMU_SYM_KEY_BITS(aes=128),
                            mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
                        ),
                    )
                with _step(f"to load {which} key (TPM2_Load)", _BLOB_HINT):
                    loaded = e.load(srk, private, public)
                try:
                    self._persist_identity(loaded)
                finally:
                    e.flush_context(loaded)
            finally:
                e.tr_close(ek)
                e.tr_close(srk)

    def _persist_identity(self, loaded: Any) -> None:
        e = self._esapi
        handle = tpm.IDENTITY_KEY_HANDLE
        with _step(f"to persist the identity key at 0x{handle:08x} (TPM2_EvictControl)"):
            if self._exists(handle):
                old = e.tr_from_tpmpublic(handle)
                e.evict_control(ESYS_TR.OWNER, old, handle)  # evicts the older key
                with contextlib.suppress(TSS2_Exception):  # ESAPI keeps the TR (and its Name) otherwise
                    e.tr_close(old)
            persistent = e.evict_control(ESYS_TR.OWNER, loaded, handle)
            e.tr_close(persistent)


def read_endorsement_key(tcti: str = DEFAULT_TCTI) -> tuple[bytes, bytes]:
    """The TPM2B_PUBLIC of the EK and the SRK of the TPM at ``tcti`` (created and persisted from
    the standard templates if missing), for enrolling the device."""
    with TpmSecurity(tcti=tcti) as security:
        return security.endorsement_key, security.storage_root_key
