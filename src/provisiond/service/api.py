"""The DPS service (data-plane) REST API, 2021-10-01: the fifteen operations, each parse (path,
headers, body), call (:mod:`provisiond.service.management`), render.

| Verb | Path | Right |
|---|---|---|
| GET/PUT/DELETE | /enrollments/{id} | EnrollmentRead / EnrollmentWrite |
| POST | /enrollments/{id}/attestationmechanism | EnrollmentRead |
| POST | /enrollments/query | EnrollmentRead |
| POST | /enrollments (bulk) | EnrollmentWrite |
| same six | /enrollmentGroups/... | same |
| GET/DELETE | /registrations/{id} | RegistrationStatusRead / RegistrationStatusWrite |
| POST | /registrations/{groupId}/query | RegistrationStatusRead |

DELETE of an enrollment, an enrollment group or a registration record takes provisiond's
``?deprovision=disable|delete``: the identities the deleted records named are disabled or
deleted in their hubs too (DPS, and provisiond without it, leave them; docs/hubs.md).

PUT is create-or-update with DPS's etag rules: without If-Match (header, or the body's
``etag``) it creates, and an existing record is a 409; with If-Match it updates, and a stale
etag is a 412 (``*`` matches any existing record).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import RequestError
from ..models import (
    BulkEnrollmentGroupOperation,
    BulkEnrollmentOperationBody,
    Deprovision,
    QuerySpecification,
    Right,
)
from .context import ServiceContext, context_of
from .http import decode_body, handle_errors, json_response
from .management import Page
from .management.enrollments import EnrollmentOperations, IndividualEnrollments

__all__ = ["routes"]


def _page_size(request: Request) -> int | None:
    """``x-ms-max-item-count``: None when absent or empty (the management layer's default)."""
    raw = request.headers.get("x-ms-max-item-count")
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise RequestError(f"x-ms-max-item-count {raw[:20]!r} is not an integer.") from None


def _continuation(request: Request) -> str | None:
    return request.headers.get("x-ms-continuation") or None


def _deprovision(request: Request) -> Deprovision | None:
    """``?deprovision=disable|delete`` (provisiond's): what a delete does to the identities."""
    raw = request.query_params.get("deprovision")
    if raw is None:
        return None
    try:
        return Deprovision(raw.strip().lower())
    except ValueError:
        raise RequestError(
            f"deprovision {raw[:20]!r} is not one of disable, delete (or leave it out: the "
            "identities stay in their hubs, as with DPS)."
        ) from None


def _etag(item: Any) -> dict[str, str]:
    return {"ETag": item.etag}


def _page(page: Page[Any], item_type: str) -> Response:
    headers = {"x-ms-max-item-count": str(page.size), "x-ms-item-type": item_type}
    if page.continuation:
        headers["x-ms-continuation"] = page.continuation
    return json_response(page.items, headers=headers)


def _operations(request: Request) -> tuple[ServiceContext, EnrollmentOperations[Any]]:
    ctx = context_of(request)
    individual = request.url.path.lower().startswith("/enrollments")
    return ctx, ctx.management.enrollments if individual else ctx.management.groups


async def _query_text(ctx: ServiceContext, request: Request) -> str | None:
    """The query of the body's query specification; None for an empty body."""
    body = await ctx.body(request)
    if not body.strip():
        return None
    return decode_body(body, QuerySpecification, "query specification").query


@handle_errors
async def get_enrollment(request: Request) -> Response:
    ctx, enrollments = _operations(request)
    await ctx.authorize(request, Right.ENROLLMENT_READ)
    item = await enrollments.get(request.path_params["id"])
    return json_response(item, headers=_etag(item))


@handle_errors
async def put_enrollment(request: Request) -> Response:
    ctx, enrollments = _operations(request)
    await ctx.authorize(request, Right.ENROLLMENT_WRITE)
    id = enrollments.validate_id(request.path_params["id"])
    kind = enrollments.kind
    enrollment = decode_body(await ctx.body(request), kind.body, kind.label)
    item = await enrollments.put(id, enrollment, if_match=request.headers.get("if-match"))
    return json_response(item, headers=_etag(item))


@handle_errors
async def delete_enrollment(request: Request) -> Response:
    ctx, enrollments = _operations(request)
    await ctx.authorize(request, Right.ENROLLMENT_WRITE)
    await enrollments.delete(
        request.path_params["id"], if_match=request.headers.get("if-match"), deprovision=_deprovision(request)
    )
    return Response(status_code=204)


@handle_errors
async def attestation_mechanism(request: Request) -> Response:
    ctx, enrollments = _operations(request)
    await ctx.authorize(request, Right.ENROLLMENT_READ)
    return json_response(await enrollments.attestation_mechanism(request.path_params["id"]))


@handle_errors
async def query_enrollments(request: Request) -> Response:
    ctx, enrollments = _operations(request)
    await ctx.authorize(request, Right.ENROLLMENT_READ)
    query = await _query_text(ctx, request)
    page = await enrollments.query(query, size=_page_size(request), continuation=_continuation(request))
    return _page(page, "Enrollment" if isinstance(enrollments, IndividualEnrollments) else "EnrollmentGroup")


@handle_errors
async def bulk_enrollments(request: Request) -> Response:
    ctx, enrollments = _operations(request)
    await ctx.authorize(request, Right.ENROLLMENT_WRITE)
    if "deprovision" in request.query_params:
        # Refused, not ignored: a caller who asked to deprovision must not believe it happened.
        raise RequestError(
            "A bulk operation takes no deprovision option: delete the enrollments one by one with "
            "?deprovision=disable|delete, or deprovision their registrations afterwards."
        )
    body = await ctx.body(request)
    if isinstance(enrollments, IndividualEnrollments):
        op = decode_body(body, BulkEnrollmentOperationBody, "bulk enrollment operation")
        return json_response(await enrollments.bulk(op.mode, op.enrollments))
    gop = decode_body(body, BulkEnrollmentGroupOperation, "bulk enrollment group operation")
    return json_response(await enrollments.bulk(gop.mode, gop.enrollment_groups))


@handle_errors
async def get_registration(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.REGISTRATION_STATUS_READ)
    state = await ctx.management.registrations.get(request.path_params["id"])
    return json_response(state, headers=_etag(state))


@handle_errors
async def delete_registration(request: Request) -> Response:
    ctx = context_of(request)
    await ctx.authorize(request, Right.REGISTRATION_STATUS_WRITE)
    await ctx.management.registrations.delete(
        request.path_params["id"], if_match=request.headers.get("if-match"), deprovision=_deprovision(request)
    )
    return Response(status_code=204)


@handle_errors
async def query_registrations(request: Request) -> Response:
    """Registration records of one enrollment group (DPS's only registration query), optionally
    narrowed by a query body (provisiond's extension)."""
    ctx = context_of(request)
    await ctx.authorize(request, Right.REGISTRATION_STATUS_READ)
    page = await ctx.management.registrations.query(
        request.path_params["id"],
        await _query_text(ctx, request),
        size=_page_size(request),
        continuation=_continuation(request),
    )
    return _page(page, "DeviceRegistration")


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
