"""The admin API: what Azure keeps in its management plane (ARM), served by provisiond under
``/admin`` with the same SAS authentication and the ServiceConfig right.

| Verb | Path | What |
|---|---|---|
| GET, PATCH | /admin/settings | ID scope, default allocation policy, host names |
| GET | /admin/linkedHubs | every linked hub (connection strings stripped) |
| GET, PUT, DELETE | /admin/linkedHubs/{hostName} | one linked hub (``"builtin": true`` on create: a hub provisiond keeps itself) |
| GET | /admin/linkedHubs/{hostName}/devices | the identities provisiond created in a built-in hub (keys stripped) |
| GET, DELETE | /admin/linkedHubs/{hostName}/devices/{deviceId} | one identity, with its twin |
| GET | /admin/certificates | every CA certificate |
| GET, PUT, DELETE | /admin/certificates/{name} | one CA certificate (PUT uploads it, unverified) |
| POST | /admin/certificates/{name}/generateVerificationCode | a fresh proof-of-possession code |
| POST | /admin/certificates/{name}/verify | ``{"certificate": PEM}``: CN = code, signed by the CA |
| GET | /admin/sharedAccessPolicies | every policy (keys stripped) |
| GET, PUT, DELETE | /admin/sharedAccessPolicies/{name} | one policy (keys generated when omitted) |
| POST | /admin/sharedAccessPolicies/{name}/listKeys | the policy with its keys |

PUT and DELETE take If-Match like the service API; PUT without If-Match creates (409 if the
record exists).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import certificates
from ..errors import (
    ConflictError,
    DpsCode,
    InvalidBodyError,
    InvalidIdError,
    PreconditionFailedError,
    RequestError,
)
from ..hub import HubDevice, SymmetricKeyAuth
from ..models import AllocationPolicy, CaCertificate, LinkedHub, Right, SharedAccessPolicy
from ..storage import Collection, Record, WriteMode, utc_now
from .context import SETTINGS_KEY, ServiceContext, context_of
from .enrollments import check_key, generate_key, load_certificate
from .http import ApiHandler, decode_body, handle_errors, json_response

__all__ = ["routes", "validate_id_scope"]

_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*$"
)
_ID_SCOPE = re.compile(r"^0ne[0-9A-Fa-f]{8}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-._]{0,63}$")


def validate_id_scope(value: str) -> str:
    if not _ID_SCOPE.match(value):
        raise InvalidBodyError(f"Invalid ID scope {value[:40]!r}: DPS ID scopes are '0ne' and 8 hex digits.")
    return value


def _validate_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise InvalidIdError(
            f"Invalid {what} {value[:80]!r}: use 1-64 characters from A-Z, a-z, 0-9 and '-._'."
        )
    return value


async def _write(
    ctx: ServiceContext, request: Request, collection: Collection, id: str, doc: bytes, body_etag: str | None
) -> Record:
    if_match = request.headers.get("if-match") or body_etag
    ctx.invalidate()
    try:
        if if_match is None:
            return await ctx.store.write(collection, id, doc, mode=WriteMode.CREATE)
        return await ctx.store.write(collection, id, doc, mode=WriteMode.UPDATE, if_match=if_match)
    except ConflictError:
        raise ConflictError(
            f"The {collection.label} {id!r} already exists; to replace it, send its etag in If-Match (or *)."
        ) from None
    except PreconditionFailedError:
        raise PreconditionFailedError(
            f"The etag in If-Match does not match the stored {collection.label} {id!r}."
        ) from None


async def _delete(ctx: ServiceContext, request: Request, collection: Collection, id: str) -> None:
    ctx.invalidate()
    await ctx.get_or_404(collection, id, DpsCode.NOT_FOUND)
    try:
        await ctx.store.delete(collection, id, if_match=request.headers.get("if-match"))
    except PreconditionFailedError:
        raise PreconditionFailedError(
            f"The etag in If-Match does not match the stored {collection.label} {id!r}."
        ) from None


def _lister(collection: Collection, present: Callable[[Record], Any]) -> ApiHandler:
    """``GET /admin/<collection>``: every record, presented (secrets stripped)."""

    @handle_errors
    async def list_records(request: Request) -> Response:
        ctx = context_of(request)
        await ctx.authorize(request, Right.SERVICE_CONFIG)
        return json_response([present(r) for r in await ctx.store.query_all(collection)])

    return list_records


def _getter(collection: Collection, not_found: int, present: Callable[[Record], Any]) -> ApiHandler:
    """``GET /admin/<collection>/{name}``: one record, presented, with its ETag."""

    @handle_errors
    async def get_record(request: Request) -> Response:
        ctx = context_of(request)
        await ctx.authorize(request, Right.SERVICE_CONFIG)
        record = await ctx.get_or_404(collection, request.path_params["name"], not_found)
        return json_response(present(record), headers={"ETag": record.etag})

    return get_record


# --- settings ----------------------------------------------------------------------------------


class _SettingsPatch(msgspec.Struct, rename="camel", kw_only=True):
    id_scope: str | None = None
    allocation_policy: AllocationPolicy | None = None


@handle_errors
async def get_settings(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    return json_response(await ctx.service_settings())


@handle_errors
async def patch_settings(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    patch = decode_body(await ctx.body(request), _SettingsPatch, "settings")
    current = await ctx.service_settings()
    changes: dict[str, Any] = {}
    if patch.id_scope is not None:
        changes["id_scope"] = validate_id_scope(patch.id_scope)
    if patch.allocation_policy is not None:
        if patch.allocation_policy is AllocationPolicy.CUSTOM:
            raise InvalidBodyError(
                "The service's default allocation policy cannot be custom; set it per enrollment."
            )
        changes["allocation_policy"] = patch.allocation_policy
    updated = msgspec.structs.replace(current, **changes)
    await ctx.store.set_setting(SETTINGS_KEY, msgspec.json.encode(updated).decode())
    ctx.invalidate()
    return json_response(updated)


# --- linked hubs -------------------------------------------------------------------------------


def _present_hub(record: Record, *, secrets: bool = False) -> LinkedHub:
    hub = msgspec.json.decode(record.doc, type=LinkedHub)
    return msgspec.structs.replace(
        hub, etag=record.etag, connection_string=hub.connection_string if secrets else None
    )


@handle_errors
async def put_hub(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    name = request.path_params["name"]
    if not _HOST_NAME.match(name):
        raise InvalidIdError(f"Invalid IoT hub host name {name[:260]!r}.")
    hub = decode_body(await ctx.body(request), LinkedHub, "linked hub")
    if hub.host_name.lower() != name.lower():
        raise InvalidBodyError(
            f"hostName {hub.host_name[:260]!r} in the body differs from {name!r} in the URL."
        )
    weight = hub.allocation_weight
    if weight is not None and not 1 <= weight <= 1000:
        raise InvalidBodyError(f"allocationWeight must be between 1 and 1000, not {weight}.")
    existing = await ctx.store.get(Collection.LINKED_HUBS, name)
    old = msgspec.json.decode(existing.doc, type=LinkedHub) if existing else None
    # A hub is built in when it was (the one made on first start) or when the request asks for
    # one: further built-in hubs keep their identities in provisiond's database too (handy for
    # trying allocation across several hubs without any Azure resource).
    builtin = bool((old and old.builtin) or (old is None and hub.builtin))
    connection_string = hub.connection_string or (old.connection_string if old else None)
    if not builtin and not connection_string:
        raise InvalidBodyError(
            "connectionString is required: how provisiond reaches the hub's identity registry "
            "(HostName=...;SharedAccessKeyName=...;SharedAccessKey=...)."
        )
    doc = msgspec.structs.replace(
        hub,
        etag=None,
        builtin=builtin or None,
        connection_string=connection_string,
        allocation_weight=weight if weight is not None else 1,
        apply_allocation_policy=True if hub.apply_allocation_policy is None else hub.apply_allocation_policy,
    )
    record = await _write(ctx, request, Collection.LINKED_HUBS, name, msgspec.json.encode(doc), hub.etag)
    return json_response(_present_hub(record), headers={"ETag": record.etag})


@handle_errors
async def delete_hub(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    name = request.path_params["name"]
    await ctx.get_or_404(Collection.LINKED_HUBS, name, DpsCode.LINKED_HUB_NOT_FOUND)
    if name.lower() == ctx.settings.builtin_hub.lower():
        raise RequestError(
            f"{name!r} is the built-in hub; it can be excluded from allocation but not unlinked."
        )
    await _delete(ctx, request, Collection.LINKED_HUBS, name)
    return Response(status_code=204)


def _present_device(record: Record) -> HubDevice:
    device = msgspec.json.decode(record.doc, type=HubDevice)
    keys = device.authentication.symmetric_key
    if keys is not None:  # the device's keys are secrets, like enrollment keys
        device = msgspec.structs.replace(
            device,
            authentication=msgspec.structs.replace(device.authentication, symmetric_key=SymmetricKeyAuth()),
        )
    return device


@handle_errors
async def list_hub_devices(request: Request) -> Response:
    """The identities provisiond created in a built-in hub (paged like the query APIs)."""
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    name = request.path_params["name"]
    await ctx.get_or_404(Collection.LINKED_HUBS, name, DpsCode.LINKED_HUB_NOT_FOUND)
    page = await ctx.store.query(
        Collection.HUB_DEVICES,
        filters={"hub": name.lower()},
        limit=1000,
        continuation=request.headers.get("x-ms-continuation") or None,
    )
    headers = {"x-ms-continuation": page.continuation} if page.continuation else None
    return json_response([_present_device(r) for r in page.records], headers=headers)


@handle_errors
async def get_hub_device(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    key = f"{request.path_params['name'].lower()}/{request.path_params['device_id']}"
    record = await ctx.get_or_404(Collection.HUB_DEVICES, key, DpsCode.HUB_DEVICE_NOT_FOUND)
    return json_response(_present_device(record), headers={"ETag": record.etag})


@handle_errors
async def delete_hub_device(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    key = f"{request.path_params['name'].lower()}/{request.path_params['device_id']}"
    await _delete(ctx, request, Collection.HUB_DEVICES, key)
    return Response(status_code=204)


# --- CA certificates -----------------------------------------------------------------------------


class _CertificateUpload(msgspec.Struct, rename="camel", kw_only=True):
    certificate: str
    is_verified: bool = False
    etag: str | None = None


def _present_ca(record: Record) -> CaCertificate:
    return msgspec.structs.replace(msgspec.json.decode(record.doc, type=CaCertificate), etag=record.etag)


@handle_errors
async def put_ca(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    name = _validate_name(request.path_params["name"], "certificate name")
    upload = decode_body(await ctx.body(request), _CertificateUpload, "CA certificate")
    cert = load_certificate(upload.certificate, "certificate")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise InvalidBodyError(
            "The certificate is not a CA certificate (BasicConstraints CA:TRUE is missing)."
        )
    info = certificates.certificate_info(cert)
    now = utc_now()
    doc = CaCertificate(
        name=name,
        certificate=cert.public_bytes(Encoding.PEM).decode("ascii"),
        is_verified=upload.is_verified,
        subject=str(info["subjectName"]),
        thumbprint=str(info["sha1Thumbprint"]),
        sha256_thumbprint=str(info["sha256Thumbprint"]),
        expiry=str(info["notAfterUtc"]),
        created=now,
        updated=now,
    )
    record = await _write(
        ctx, request, Collection.CA_CERTIFICATES, name, msgspec.json.encode(doc), upload.etag
    )
    return json_response(_present_ca(record), headers={"ETag": record.etag})


@handle_errors
async def delete_ca(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    await _delete(ctx, request, Collection.CA_CERTIFICATES, request.path_params["name"])
    return Response(status_code=204)


@handle_errors
async def generate_verification_code(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    name = request.path_params["name"]
    record = await ctx.get_or_404(Collection.CA_CERTIFICATES, name, DpsCode.CA_NOT_FOUND)
    ca = msgspec.json.decode(record.doc, type=CaCertificate)
    code = secrets.token_hex(24).upper()
    doc = msgspec.structs.replace(ca, verification_code=code, updated=utc_now(), etag=None)
    updated = await ctx.store.write(
        Collection.CA_CERTIFICATES,
        name,
        msgspec.json.encode(doc),
        mode=WriteMode.UPDATE,
        if_match=record.etag,
    )
    return json_response(_present_ca(updated), headers={"ETag": updated.etag})


@handle_errors
async def verify_ca(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    name = request.path_params["name"]
    record = await ctx.get_or_404(Collection.CA_CERTIFICATES, name, DpsCode.CA_NOT_FOUND)
    ca_doc = msgspec.json.decode(record.doc, type=CaCertificate)
    proof = load_certificate(
        decode_body(await ctx.body(request), _CertificateUpload, "verification certificate").certificate,
        "certificate",
    )
    if not ca_doc.verification_code:
        raise RequestError(
            f"No verification code was generated for {name!r}; call generateVerificationCode first."
        )
    assert ca_doc.certificate is not None
    ca = certificates.load_pem_chain(ca_doc.certificate)[0]
    cns = proof.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    if cn != ca_doc.verification_code:
        raise InvalidBodyError(
            f"The verification certificate's subject CN {cn[:80]!r} is not the verification code of {name!r}.",
            error_code=DpsCode.VERIFICATION_CODE_MISMATCH,
        )
    try:
        proof.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no common base
        raise InvalidBodyError(
            f"The verification certificate was not signed by CA certificate {name!r}: {exc or 'bad signature'}.",
            error_code=DpsCode.VERIFICATION_SIGNATURE,
        ) from None
    doc = msgspec.structs.replace(
        ca_doc, is_verified=True, verification_code=None, updated=utc_now(), etag=None
    )
    updated = await ctx.store.write(
        Collection.CA_CERTIFICATES,
        name,
        msgspec.json.encode(doc),
        mode=WriteMode.UPDATE,
        if_match=record.etag,
    )
    return json_response(_present_ca(updated), headers={"ETag": updated.etag})


# --- shared access policies ----------------------------------------------------------------------


def _present_policy(record: Record, *, keys: bool = False) -> SharedAccessPolicy:
    policy = msgspec.json.decode(record.doc, type=SharedAccessPolicy)
    if not keys:
        policy = msgspec.structs.replace(policy, primary_key=None, secondary_key=None)
    return msgspec.structs.replace(policy, etag=record.etag)


@handle_errors
async def list_policy_keys(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    record = await ctx.get_or_404(
        Collection.ACCESS_POLICIES, request.path_params["name"], DpsCode.POLICY_NOT_FOUND
    )
    return json_response(_present_policy(record, keys=True), headers={"ETag": record.etag})


async def _config_policies_left(ctx: ServiceContext, without: str) -> int:
    count = 0
    for record in await ctx.store.query_all(Collection.ACCESS_POLICIES):
        policy = msgspec.json.decode(record.doc, type=SharedAccessPolicy)
        if policy.key_name.lower() != without.lower() and Right.SERVICE_CONFIG in (policy.rights or []):
            count += 1
    return count


@handle_errors
async def put_policy(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    name = _validate_name(request.path_params["name"], "policy name")
    policy = decode_body(await ctx.body(request), SharedAccessPolicy, "shared access policy")
    if policy.key_name.lower() != name.lower():
        raise InvalidBodyError(
            f"keyName {policy.key_name[:80]!r} in the body differs from {name!r} in the URL."
        )
    if not policy.rights:
        raise InvalidBodyError("rights must list at least one right: " + ", ".join(r.value for r in Right))
    existing = await ctx.store.get(Collection.ACCESS_POLICIES, name)
    old = msgspec.json.decode(existing.doc, type=SharedAccessPolicy) if existing else None
    if old and Right.SERVICE_CONFIG in (old.rights or []) and Right.SERVICE_CONFIG not in policy.rights:
        if await _config_policies_left(ctx, name) == 0:
            raise ConflictError(
                f"Removing ServiceConfig from {name!r} would leave no policy that can administer the service."
            )
    keys = {}
    for field in ("primary_key", "secondary_key"):
        value = getattr(policy, field) or (getattr(old, field) if old else None) or generate_key()
        keys[field] = value
    doc = SharedAccessPolicy(key_name=name, rights=sorted(set(policy.rights), key=lambda r: r.value), **keys)
    check_key(doc.primary_key or "", "primaryKey")
    check_key(doc.secondary_key or "", "secondaryKey")
    record = await _write(
        ctx, request, Collection.ACCESS_POLICIES, name, msgspec.json.encode(doc), policy.etag
    )
    return json_response(_present_policy(record, keys=True), headers={"ETag": record.etag})


@handle_errors
async def delete_policy(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.SERVICE_CONFIG)
    name = request.path_params["name"]
    record = await ctx.get_or_404(Collection.ACCESS_POLICIES, name, DpsCode.POLICY_NOT_FOUND)
    policy = msgspec.json.decode(record.doc, type=SharedAccessPolicy)
    if Right.SERVICE_CONFIG in (policy.rights or []) and await _config_policies_left(ctx, name) == 0:
        raise ConflictError(f"Deleting {name!r} would leave no policy that can administer the service.")
    await _delete(ctx, request, Collection.ACCESS_POLICIES, name)
    return Response(status_code=204)


def routes() -> list[Route]:
    return [
        Route("/admin/settings", get_settings, methods=["GET"]),
        Route("/admin/settings", patch_settings, methods=["PATCH"]),
        Route("/admin/linkedHubs", _lister(Collection.LINKED_HUBS, _present_hub), methods=["GET"]),
        Route(
            "/admin/linkedHubs/{name}",
            _getter(Collection.LINKED_HUBS, DpsCode.LINKED_HUB_NOT_FOUND, _present_hub),
            methods=["GET"],
        ),
        Route("/admin/linkedHubs/{name}", put_hub, methods=["PUT"]),
        Route("/admin/linkedHubs/{name}", delete_hub, methods=["DELETE"]),
        Route("/admin/linkedHubs/{name}/devices", list_hub_devices, methods=["GET"]),
        Route("/admin/linkedHubs/{name}/devices/{device_id}", get_hub_device, methods=["GET"]),
        Route("/admin/linkedHubs/{name}/devices/{device_id}", delete_hub_device, methods=["DELETE"]),
        Route("/admin/certificates", _lister(Collection.CA_CERTIFICATES, _present_ca), methods=["GET"]),
        Route(
            "/admin/certificates/{name}/generateVerificationCode",
            generate_verification_code,
            methods=["POST"],
        ),
        Route("/admin/certificates/{name}/verify", verify_ca, methods=["POST"]),
        Route(
            "/admin/certificates/{name}",
            _getter(Collection.CA_CERTIFICATES, DpsCode.CA_NOT_FOUND, _present_ca),
            methods=["GET"],
        ),
        Route("/admin/certificates/{name}", put_ca, methods=["PUT"]),
        Route("/admin/certificates/{name}", delete_ca, methods=["DELETE"]),
        Route(
            "/admin/sharedAccessPolicies",
            _lister(Collection.ACCESS_POLICIES, _present_policy),
            methods=["GET"],
        ),
        Route("/admin/sharedAccessPolicies/{name}/listKeys", list_policy_keys, methods=["POST"]),
        Route(
            "/admin/sharedAccessPolicies/{name}",
            _getter(Collection.ACCESS_POLICIES, DpsCode.POLICY_NOT_FOUND, _present_policy),
            methods=["GET"],
        ),
        Route("/admin/sharedAccessPolicies/{name}", put_policy, methods=["PUT"]),
        Route("/admin/sharedAccessPolicies/{name}", delete_policy, methods=["DELETE"]),
    ]
