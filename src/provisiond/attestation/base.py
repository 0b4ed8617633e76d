"""The seam between the registrar and the attestation types.

Theory of operation
-------------------
A device proves who it is with one *credential*, and the credential's shape says which
attestors may check it (:class:`Credential`): a SAS token (symmetric key, or the answer to a
TPM challenge), the certificate chain of the TLS handshake (X.509), or, without a token, the
TPM's endorsement and storage root keys (a request for a TPM challenge).

Each attestation type has one :class:`Attestor`. :func:`attest` runs them as DPS decides:

1. The attestors that verify the credential's shape are the candidates, in the order they are
   given; the first is the *primary* one. It parses the credential (every check that needs no
   enrollment: a token's audience and expiry, the chain's leaf CN, the TPM keys' structure), so
   a malformed credential is refused before anything is read.
2. The individual enrollment of the registration id decides first: the candidate whose
   ``type`` is the enrollment's attestation type checks it (the primary one otherwise, which
   refuses an enrollment of another type). An individual enrollment wins over groups, and a
   disabled one denies later (the registrar records ``disabled``).
3. Without one, the primary attestor looks for a group (symmetric key: the group whose derived
   key signed the token; X.509: the first group certificate met walking the chain up).

The result is a :class:`Match`: the enrollment, the attestation type, the credential the
device's hub identity gets (:data:`IdentityCredential`: keys, or the thumbprint of the
certificate it presented) and what the registration result says about the attestation
(``x509``, ``symmetricKey``, ``tpm``).

Attestors read through small protocols (:class:`EnrollmentSource`, :class:`CaSource`,
:class:`ChallengeStore`) that the service implements over its store
(:mod:`provisiond.service.sources`); this package imports nothing from ``storage`` or
``service``. Adding an attestation type means one attestor (and its enrollment model in
:mod:`provisiond.models`); see docs/architecture.md.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, TypeAlias, TypeVar

import msgspec

from ..errors import AuthenticationError, DpsCode
from ..models import AttestationType, CaCertificate, EnrollmentGroup, IndividualEnrollment
from ..protocol.messages import (
    SymmetricKeyRegistrationResult,
    TpmAttestationRequest,
    TpmRegistrationResult,
    X509RegistrationResult,
)

__all__ = [
    "Attestor",
    "CaSource",
    "CertificateCredential",
    "ChallengeStore",
    "Credential",
    "EnrollmentSource",
    "Evidence",
    "IdentityCredential",
    "IssuedChallenge",
    "KeyCredential",
    "Match",
    "PendingChallenge",
    "attest",
    "require_type",
]

#: What a request without any credential is told.
NO_CREDENTIAL = (
    "No credential: send a SharedAccessSignature token (symmetric key), or present the device "
    "certificate and its chain in the TLS handshake (X.509)."
)


class Credential(enum.Enum):
    """The shape of what a device presented (the first that applies)."""

    SAS_TOKEN = "SAS token"  # an Authorization value: a symmetric key's, or a TPM's answer
    CERTIFICATE = "client certificate"  # the chain of the TLS handshake, and no token
    TPM_KEYS = "TPM keys"  # tpm.endorsementKey (and storageRootKey) in the body, nothing else


class Evidence(msgspec.Struct, frozen=True, kw_only=True):
    """What a device presented, whatever transport carried it."""

    id_scope: str
    registration_id: str
    authorization: str | None = None
    client_chain: Sequence[bytes] = ()
    #: The request body's ``tpm`` (EK and SRK), if any.
    tpm: TpmAttestationRequest | None = None
    #: A register (which uses a TPM challenge up), not a poll or a status lookup.
    registering: bool = False
    #: The enrollment group the device last registered through, if any (a hint: it is tried
    #: first). The caller reads it with the registration record it needs anyway.
    last_group: str | None = None
    #: Unix seconds, from the registrar's clock (token expiry, certificate validity, challenges).
    now: float

    @property
    def credential(self) -> Credential | None:
        if self.authorization:
            return Credential.SAS_TOKEN
        if self.client_chain:
            return Credential.CERTIFICATE
        if self.tpm is not None:
            return Credential.TPM_KEYS
        return None

    @property
    def moment(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.now, dt.UTC)


# --- what a match implies for the hub identity ---------------------------------------------------


class KeyCredential(msgspec.Struct, frozen=True):
    """The identity authenticates with symmetric keys (IoT Hub's ``sas``): the enrollment's, the
    keys derived from its group's, or fresh keys a TPM receives wrapped."""

    primary: str | None
    secondary: str | None


class CertificateCredential(msgspec.Struct, frozen=True):
    """The identity authenticates with the certificate the device presented (SHA-256
    thumbprint, upper-case hex); ``from_group``: matched through an enrollment group (a hub
    may then make it ``certificateAuthority``)."""

    sha256_thumbprint: str
    from_group: bool


IdentityCredential: TypeAlias = KeyCredential | CertificateCredential


class Match(msgspec.Struct, frozen=True, kw_only=True):
    """A device proved an enrollment's credential."""

    enrollment: IndividualEnrollment | EnrollmentGroup
    attestation: AttestationType
    #: The credential of the device's identity in its hub.
    identity_credential: IdentityCredential
    #: The registration result's attestation parts (``tpm`` only when assigned).
    x509: X509RegistrationResult | None = None
    symmetric_key: SymmetricKeyRegistrationResult | None = None
    tpm: TpmRegistrationResult | None = None

    @property
    def individual(self) -> IndividualEnrollment | None:
        return self.enrollment if isinstance(self.enrollment, IndividualEnrollment) else None

    @property
    def group(self) -> EnrollmentGroup | None:
        return self.enrollment if isinstance(self.enrollment, EnrollmentGroup) else None

    @property
    def label(self) -> str:
        if isinstance(self.enrollment, IndividualEnrollment):
            return f"individual enrollment {self.enrollment.registration_id!r}"
        return f"enrollment group {self.enrollment.enrollment_group_id!r}"


# --- what attestors read through ------------------------------------------------------------------


class EnrollmentSource(Protocol):
    """Enrollments as the attestors need them."""

    async def individual(self, registration_id: str) -> IndividualEnrollment | None:
        """The individual enrollment of ``registration_id`` (case-insensitive), or ``None``."""

    async def groups(self, attestation: AttestationType) -> list[EnrollmentGroup]:
        """Every enrollment group of one attestation type, in id order (a list the caller may
        reorder). It may be a copy up to a second old (the service caches groups)."""


class CaSource(Protocol):
    async def ca_certificates(self, names: Iterable[str]) -> dict[str, CaCertificate]:
        """The CA certificates among ``names`` that exist, keyed by lower-cased name."""


class PendingChallenge(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    """A TPM challenge issued to a registration id: the EK and SRK it was made for and the
    HMAC key it wraps (base64), its lifetime (Unix seconds), and whether a register used it.
    (A msgspec struct: a :class:`ChallengeStore` may keep it as its JSON.)"""

    endorsement_key: str
    storage_root_key: str
    key: str
    issued: float
    expires: float
    used: bool = False


class IssuedChallenge(msgspec.Struct, frozen=True):
    """A pending challenge as read, with the version its single use is conditional on."""

    challenge: PendingChallenge
    version: str


class ChallengeStore(Protocol):
    """Pending TPM challenges, shared by every node (the answer may reach another node)."""

    async def issue(self, registration_id: str, challenge: PendingChallenge) -> None:
        """Store ``challenge`` as the registration id's pending one (replacing an older one)."""

    async def read(self, registration_id: str) -> IssuedChallenge | None:
        """The pending challenge, or ``None``."""

    async def use(self, registration_id: str, issued: IssuedChallenge) -> bool:
        """Mark the challenge used if it is still the one read (same version): ``False`` when
        another register used it, or a new challenge replaced it, in between."""


# --- the attestors ---------------------------------------------------------------------------------

ParsedT = TypeVar("ParsedT")


class Attestor(Protocol[ParsedT]):
    """One attestation type on the service side (see the module docstring)."""

    #: The enrollments it checks (their ``attestation.type``).
    type: AttestationType
    #: The credential shapes it checks.
    credentials: tuple[Credential, ...]

    def parse(self, evidence: Evidence) -> ParsedT:
        """Every check of the credential that needs no enrollment.

        :raises AuthenticationError: the credential is malformed, expired or for another id.
        :raises InvalidBodyError: the request's own data (a TPM key) is malformed.
        """
        ...

    async def individual(
        self, parsed: ParsedT, evidence: Evidence, enrollment: IndividualEnrollment
    ) -> Match:
        """Check the credential against the registration id's individual enrollment.

        :raises AuthenticationError: another attestation type, or the credential is not its.
        :raises TpmChallengeRequired: TPM keys without a token (the challenge is issued).
        """
        ...

    async def group(self, parsed: ParsedT, evidence: Evidence) -> Match:
        """Find the enrollment group whose credential the device proved.

        :raises AuthenticationError: none.
        """
        ...


def require_type(
    enrollment: IndividualEnrollment, attestation: AttestationType, what: str, code: DpsCode
) -> None:
    """Refuse an individual enrollment of another attestation type than the credential's."""
    if enrollment.attestation.type is not attestation:
        raise AuthenticationError(
            f"The individual enrollment {enrollment.registration_id!r} uses "
            f"{enrollment.attestation.type.value} attestation, not {what}.",
            error_code=code,
        )


async def attest(
    evidence: Evidence, attestors: Sequence[Attestor[Any]], enrollments: EnrollmentSource
) -> Match:
    """Attest a device and match it to an enrollment (see the module docstring).

    :raises AuthenticationError: no credential, or one that matches no enrollment.
    :raises TpmChallengeRequired: a TPM's first request (the challenge is in the exception).
    """
    shape = evidence.credential
    candidates = [a for a in attestors if shape in a.credentials]
    if not candidates:
        raise AuthenticationError(NO_CREDENTIAL, error_code=DpsCode.UNAUTHENTICATED)
    primary = candidates[0]
    parsed = primary.parse(evidence)
    enrollment = await enrollments.individual(evidence.registration_id)
    if enrollment is None:
        return await primary.group(parsed, evidence)
    chosen = next((a for a in candidates if a.type is enrollment.attestation.type), primary)
    if chosen is not primary:
        parsed = chosen.parse(evidence)
    return await chosen.individual(parsed, evidence, enrollment)
