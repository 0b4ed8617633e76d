"""The DPS service (data-plane) REST API, 2021-10-01: the fifteen operations.

| Verb | Path | Right |
|---|---|---|
| GET/PUT/DELETE | /enrollments/{id} | EnrollmentRead / EnrollmentWrite |
| POST | /enrollments/{id}/attestationmechanism | EnrollmentRead |
| POST | /enrollments/query | EnrollmentRead |
| POST | /enrollments (bulk) | EnrollmentWrite |
| same six | /enrollmentGroups/... | same |
| GET/DELETE | /registrations/{id} | RegistrationStatusRead / RegistrationStatusWrite |
| POST | /registrations/{groupId}/query | RegistrationStatusRead |

PUT is create-or-update with DPS's etag rules: without If-Match (header, or the body's
``etag``) it creates, and an existing record is a 409; with If-Match it updates, and a stale
etag is a 412 (``*`` matches any existing record).
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import (
    ConflictError,
    DpsCode,
    InvalidBodyError,
    NotFoundError,
    PreconditionFailedError,
    ProvisioningError,
    RequestError,
)
from ..models import (
    BulkEnrollmentGroupOperation,
    BulkEnrollmentOperation,
    BulkEnrollmentOperationError,
    BulkEnrollmentOperationResult,
    BulkOperationMode,
    DeviceRegistrationState,
    IndividualEnrollment,
    QuerySpecification,
    Right,
)
from ..storage import Collection, Delete, Record, Write, WriteMode, etags_match
from . import enrollments as en
from .context import ServiceContext, context_of
from .http import decode_body, handle_errors, json_response
from .query import ENROLLMENT_FIELDS, GROUP_FIELDS, REGISTRATION_FIELDS, parse_query

__all__ = ["routes"]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 10_000
_WRITE_RETRIES = 3


def _page_size(request: Request) -> int:
    raw = request.headers.get("x-ms-max-item-count")
    if raw is None or raw.strip() == "":
        return DEFAULT_PAGE_SIZE
    try:
        size = int(raw)
    except ValueError:
        raise RequestError(f"x-ms-max-item-count {raw[:20]!r} is not an integer.") from None
    if size <= 0:
        return DEFAULT_PAGE_SIZE
    return min(size, MAX_PAGE_SIZE)


def _etag_headers(record: Record) -> dict[str, str]:
    return {"ETag": record.etag}


def _registration_state(record: Record) -> DeviceRegistrationState:
    state = msgspec.json.decode(record.doc, type=DeviceRegistrationState)
    return msgspec.structs.replace(
        state,
        registration_id=record.id,
        etag=record.etag,
        created_date_time_utc=state.created_date_time_utc or record.created,
        last_updated_date_time_utc=record.updated,
    )


async def _with_registration_states(
    ctx: ServiceContext, records: list[Record], shown: en.Shown = en.Shown.READ
) -> list[IndividualEnrollment]:
    """Individual enrollments with their registrationState joined in (DPS's GET has it; its
    query leaves it out, Azure/azure-iot-sdk-csharp#3478: provisiond returns it in both)."""
    states = await ctx.store.get_many(Collection.REGISTRATIONS, [r.id for r in records])
    out = []
    for record in records:
        state = states.get(Collection.REGISTRATIONS.key(record.id))
        extra: dict[str, Any] = {"registration_state": _registration_state(state)} if state else {}
        out.append(en.present(en.INDIVIDUAL, record, shown=shown, extra=extra))
    return out


def _kind_of(request: Request) -> en.EnrollmentKind[Any]:
    return en.INDIVIDUAL if request.url.path.lower().startswith("/enrollments") else en.GROUP


@handle_errors
async def get_enrollment(request: Request) -> Response:
    ctx = context_of(request)
    kind = _kind_of(request)
    await ctx.authorize(request, Right.ENROLLMENT_READ)
    record = await ctx.get_or_404(kind.collection, request.path_params["id"], kind.not_found_code)
    if kind is en.INDIVIDUAL:
        [item] = await _with_registration_states(ctx, [record])
        return json_response(item, headers=_etag_headers(record))
    return json_response(en.present(kind, record), headers=_etag_headers(record))


@handle_errors
async def put_enrollment(request: Request) -> Response:
    ctx = context_of(request)
    kind = _kind_of(request)
    await ctx.authorize(request, Right.ENROLLMENT_WRITE)
    url_id = en.validate_id(request.path_params["id"], kind.id_field)
    enrollment = decode_body(await ctx.body(request), kind.model, kind.label)
    if_match = request.headers.get("if-match") or enrollment.etag
    hubs = await ctx.linked_hubs()
    for attempt in range(_WRITE_RETRIES):
        existing = await ctx.store.get(kind.collection, url_id)
        doc, index = en.prepare(kind, enrollment, url_id, existing, linked_hubs=hubs)
        if if_match is None:
            if existing is not None:
                raise ConflictError(
                    f"The {kind.label} {existing.id!r} already exists; to update it, send its etag in "
                    "If-Match (or If-Match: *).",
                    error_code=DpsCode.ENROLLMENT_EXISTS,
                )
            record = await ctx.store.write(kind.collection, url_id, doc, index=index, mode=WriteMode.CREATE)
        else:
            # "*" means "whatever is there": condition the write on the etag we just read, so
            # that the secrets we carried over are the ones we overwrite.
            condition = existing.etag if (if_match.strip() == "*" and existing is not None) else if_match
            try:
                record = await ctx.store.write(
                    kind.collection, url_id, doc, index=index, mode=WriteMode.UPDATE, if_match=condition
                )
            except PreconditionFailedError:
                if if_match.strip() == "*" and existing is not None and attempt + 1 < _WRITE_RETRIES:
                    continue
                raise PreconditionFailedError(
                    f"The etag in If-Match does not match the stored {kind.label} {url_id!r}"
                    + ("" if existing is not None else " (it does not exist)")
                    + "; read it again and retry.",
                    error_code=DpsCode.ETAG_MISMATCH,
                ) from None
        # DPS answers a create or update with the symmetric keys (generated or given).
        if kind is en.INDIVIDUAL:
            [item] = await _with_registration_states(ctx, [record], en.Shown.WRITE)
            return json_response(item, headers=_etag_headers(record))
        return json_response(en.present(kind, record, shown=en.Shown.WRITE), headers=_etag_headers(record))
    raise AssertionError("unreachable")  # pragma: no cover


@handle_errors
async def delete_enrollment(request: Request) -> Response:
    ctx = context_of(request)
    kind = _kind_of(request)
    await ctx.authorize(request, Right.ENROLLMENT_WRITE)
    if kind is en.INDIVIDUAL:
        await _delete_individual(ctx, request.path_params["id"], request.headers.get("if-match"))
    else:  # a group's registration records stay, as DPS keeps them
        await _delete(ctx, kind.collection, request, kind.not_found_code)
    return Response(status_code=204)


async def _delete_individual(ctx: ServiceContext, id: str, if_match: str | None) -> None:
    """Delete an individual enrollment and, as DPS does, its registration record, in one
    transaction (the hub identity stays: deprovisioning it is a separate step, as with DPS)."""
    for _ in range(_WRITE_RETRIES):
        enrollment = await ctx.get_or_404(Collection.ENROLLMENTS, id, en.INDIVIDUAL.not_found_code)
        if if_match is not None and not etags_match(if_match, enrollment.etag):
            raise PreconditionFailedError(
                f"The etag in If-Match does not match the stored individual enrollment {id!r}.",
                error_code=DpsCode.ETAG_MISMATCH,
            )
        record = await ctx.store.get(Collection.REGISTRATIONS, id)
        items: list[tuple[Collection, Write | Delete]] = [
            (Collection.ENROLLMENTS, Delete(id, enrollment.etag))
        ]
        if record is not None:
            items.append((Collection.REGISTRATIONS, Delete(id, record.etag)))
        try:
            await ctx.store.write_atomic(items)
            return
        except (PreconditionFailedError, NotFoundError):
            continue  # one of them changed meanwhile: read both again
    raise ConflictError(
        f"The individual enrollment {id!r} kept changing under concurrent writes; retry.",
        error_code=DpsCode.CONFLICT,
    )


async def _delete(ctx: ServiceContext, collection: Collection, request: Request, not_found: int) -> None:
    id = request.path_params["id"]
    if_match = request.headers.get("if-match")
    await ctx.get_or_404(collection, id, not_found)
    try:
        await ctx.store.delete(collection, id, if_match=if_match)
    except PreconditionFailedError:
        raise PreconditionFailedError(
            f"The etag in If-Match does not match the stored {collection.label} {id!r}.",
            error_code=DpsCode.ETAG_MISMATCH,
        ) from None


@handle_errors
async def attestation_mechanism(request: Request) -> Response:
    ctx = context_of(request)
    kind = _kind_of(request)
    await ctx.authorize(request, Right.ENROLLMENT_READ)
    record = await ctx.get_or_404(kind.collection, request.path_params["id"], kind.not_found_code)
    return json_response(en.present(kind, record, shown=en.Shown.ALL).attestation)


async def _query_spec(ctx: ServiceContext, request: Request) -> QuerySpecification:
    body = await ctx.body(request)
    if not body.strip():
        return QuerySpecification(query="SELECT * FROM c")
    return decode_body(body, QuerySpecification, "query specification")


def _page_headers(continuation: str | None, size: int, item_type: str) -> dict[str, str]:
    headers = {"x-ms-max-item-count": str(size), "x-ms-item-type": item_type}
    if continuation:
        headers["x-ms-continuation"] = continuation
    return headers


@handle_errors
async def query_enrollments(request: Request) -> Response:
    ctx = context_of(request)
    kind = _kind_of(request)
    await ctx.authorize(request, Right.ENROLLMENT_READ)
    spec = await _query_spec(ctx, request)
    filters = parse_query(spec.query, ENROLLMENT_FIELDS if kind is en.INDIVIDUAL else GROUP_FIELDS)
    size = _page_size(request)
    item_type = "Enrollment" if kind is en.INDIVIDUAL else "EnrollmentGroup"
    if filters is None:
        return json_response([], headers=_page_headers(None, size, item_type))
    page = await ctx.store.query(
        kind.collection,
        filters=filters,
        limit=size,
        continuation=request.headers.get("x-ms-continuation") or None,
    )
    items: list[Any]
    if kind is en.INDIVIDUAL:
        items = await _with_registration_states(ctx, page.records)
    else:
        items = [en.present(kind, r) for r in page.records]
    return json_response(items, headers=_page_headers(page.continuation, size, item_type))


@handle_errors
async def bulk_enrollments(request: Request) -> Response:
    ctx = context_of(request)
    kind = _kind_of(request)
    await ctx.authorize(request, Right.ENROLLMENT_WRITE)
    body = await ctx.body(request)
    items: list[Any]
    if kind is en.INDIVIDUAL:
        op = decode_body(body, BulkEnrollmentOperation, "bulk enrollment operation")
        items, mode = list(op.enrollments), op.mode
    else:
        gop = decode_body(body, BulkEnrollmentGroupOperation, "bulk enrollment group operation")
        items, mode = list(gop.enrollment_groups), gop.mode
    ids = [kind.id_of(item) for item in items]
    existing = await ctx.store.get_many(kind.collection, ids)
    hubs = await ctx.linked_hubs() if mode is not BulkOperationMode.DELETE else {}
    outcomes: list[Record | ProvisioningError | None] = [None] * len(items)
    writes: list[Write | Delete] = []
    positions: list[int] = []
    seen: set[str] = set()
    for i, (item, id) in enumerate(zip(items, ids, strict=True)):
        key = kind.collection.key(id)
        try:
            if key in seen:
                raise InvalidBodyError(
                    f"{kind.id_field} {id!r} appears more than once in this bulk operation."
                )
            seen.add(key)
            en.validate_id(id, kind.id_field)
            if mode is BulkOperationMode.DELETE:
                writes.append(Delete(id, if_match=item.etag))
            else:
                doc, index = en.prepare(kind, item, id, existing.get(key), linked_hubs=hubs)
                write_mode, if_match = {
                    BulkOperationMode.CREATE: (WriteMode.CREATE, None),
                    BulkOperationMode.UPDATE: (WriteMode.UPSERT, None),
                    BulkOperationMode.UPDATE_IF_MATCH_ETAG: (WriteMode.UPDATE, item.etag or "*"),
                }[mode]
                writes.append(Write(id, doc, index, write_mode, if_match))
            positions.append(i)
        except ProvisioningError as exc:
            outcomes[i] = exc
    results = await ctx.store.write_many(kind.collection, writes)
    for pos, written in zip(positions, results, strict=True):
        outcomes[pos] = written
    if kind is en.INDIVIDUAL and mode is BulkOperationMode.DELETE:
        # As DELETE /enrollments/{id} does: the deleted enrollments' registration records go too
        # (a second batch here, not one transaction per item).
        gone = [w.id for w, r in zip(writes, results, strict=True) if isinstance(r, Record)]
        if gone:
            await ctx.store.write_many(Collection.REGISTRATIONS, [Delete(id) for id in gone])
    errors = []
    for id, result in zip(ids, outcomes, strict=True):
        if isinstance(result, ProvisioningError):
            errors.append(
                BulkEnrollmentOperationError(
                    error_code=result.error_code,
                    error_status=result.message,
                    **({"registration_id": id} if kind is en.INDIVIDUAL else {"enrollment_group_id": id}),
                )
            )
    return json_response(BulkEnrollmentOperationResult(is_successful=not errors, errors=errors))


@handle_errors
async def get_registration(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.REGISTRATION_STATUS_READ)
    record = await ctx.get_or_404(
        Collection.REGISTRATIONS, request.path_params["id"], DpsCode.REGISTRATION_NOT_FOUND
    )
    return json_response(_registration_state(record), headers=_etag_headers(record))


@handle_errors
async def delete_registration(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.REGISTRATION_STATUS_WRITE)
    await _delete(ctx, Collection.REGISTRATIONS, request, DpsCode.REGISTRATION_NOT_FOUND)
    return Response(status_code=204)


@handle_errors
async def query_registrations(request: Request) -> Response:
    """Registration records of one enrollment group (DPS's only registration query), optionally
    narrowed by a query body (provisiond's extension)."""
    ctx = context_of(request)
    await ctx.authorize(request, Right.REGISTRATION_STATUS_READ)
    group_id = request.path_params["id"]
    await ctx.get_or_404(Collection.ENROLLMENT_GROUPS, group_id, en.GROUP.not_found_code)
    body = await ctx.body(request)
    filters: dict[str, str] | None = {}
    if body.strip():
        filters = parse_query(
            decode_body(body, QuerySpecification, "query specification").query, REGISTRATION_FIELDS
        )
    size = _page_size(request)
    if filters is None or filters.get("enrollment_group_id", group_id.lower()) != group_id.lower():
        return json_response([], headers=_page_headers(None, size, "DeviceRegistration"))
    filters["enrollment_group_id"] = group_id.lower()
    page = await ctx.store.query(
        Collection.REGISTRATIONS,
        filters=filters,
        limit=size,
        continuation=request.headers.get("x-ms-continuation") or None,
    )
    states = [_registration_state(r) for r in page.records]
    return json_response(states, headers=_page_headers(page.continuation, size, "DeviceRegistration"))


def routes() -> list[Route]:
    out = []
    for prefix in ("/enrollments", "/enrollmentGroups"):
        out += [
            Route(f"{prefix}/query", query_enrollments, methods=["POST"]),
            Route(prefix, bulk_enrollments, methods=["POST"]),
            Route(f"{prefix}/{{id}}/attestationmechanism", attestation_mechanism, methods=["POST"]),
            Route(f"{prefix}/{{id}}", get_enrollment, methods=["GET"]),
            Route(f"{prefix}/{{id}}", put_enrollment, methods=["PUT"]),
            Route(f"{prefix}/{{id}}", delete_enrollment, methods=["DELETE"]),
        ]
    out += [
        Route("/registrations/{id}/query", query_registrations, methods=["POST"]),
        Route("/registrations/{id}", get_registration, methods=["GET"]),
        Route("/registrations/{id}", delete_registration, methods=["DELETE"]),
    ]
    return out
