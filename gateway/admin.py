"""The operator's API under /admin: register, inspect, change and remove forget targets, and read
the audit trail.

Only the admin key opens it (LETHE_ADMIN_KEY, or the key generated into LETHE_HOME/admin.key).
The keys of LETHE_API_KEYS never do, and the admin key does not open /v1 unless it is also listed
there: handing a client a key must never hand it the list of what the model is made to forget.

Every successful write is followed by awaiting each callback in `app.state.on_targets_changed`
before the response leaves, so the next request is served under the new targets. A failing
callback fails the admin call (500) although the change is stored: the operator must learn that
the change may not be in force.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated, Literal, ParamSpec, TypeVar

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel

from gateway.errors import APIError
from gateway.store import (
    AuditKind,
    AuditRecord,
    DuplicateTargetName,
    InvalidCursor,
    JobFinished,
    JobNotFound,
    NothingToRollBack,
    NotServing,
    Page,
    ServingChanged,
    Store,
    StoreError,
    TargetNotFound,
    VersionMismatch,
)
from guards.targets import Target, TargetPatch, TargetSpec

TargetsChanged = Callable[[], Awaitable[None]]
"""What `app.state.on_targets_changed` holds: coroutine functions awaited after every target change."""

Params = ParamSpec("Params")
Result = TypeVar("Result")

Limit = Annotated[int, Query(ge=1, le=500, description="Items per page.")]
After = Annotated[str | None, Query(description="`next_cursor` of the previous page.")]
IfMatch = Annotated[
    str | None, Header(description="The version the change is based on; another current version is a 412.")
]

# (status, type, param, code) of each refusal of the store.
_REFUSALS: dict[type[StoreError], tuple[int, str, str | None, str]] = {
    TargetNotFound: (404, "not_found_error", None, "target_not_found"),
    DuplicateTargetName: (409, "invalid_request_error", "name", "target_name_conflict"),
    VersionMismatch: (412, "invalid_request_error", "If-Match", "version_mismatch"),
    InvalidCursor: (400, "invalid_request_error", "after", "invalid_cursor"),
    JobNotFound: (404, "not_found_error", None, "job_not_found"),
    JobFinished: (409, "invalid_request_error", None, "job_finished"),
    ServingChanged: (409, "invalid_request_error", None, "serving_checkpoint_changed"),
    NotServing: (409, "invalid_request_error", None, "checkpoint_not_serving"),
    NothingToRollBack: (409, "invalid_request_error", None, "nothing_to_roll_back"),
}


def refusal(error: StoreError) -> APIError:
    """The API error for a store refusal."""
    status, type_, param, code = _REFUSALS[type(error)]
    return APIError(status, str(error), type_=type_, param=param, code=code)


def require_admin_key(request: Request) -> None:
    """FastAPI dependency: `Authorization: Bearer <admin key>`, compared in constant time."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    key: str = request.app.state.admin_key
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(
            401,
            "The admin API needs the admin key: 'Authorization: Bearer <LETHE_ADMIN_KEY>'.",
            type_="authentication_error",
            code="invalid_admin_key",
        )


class TargetDeleted(BaseModel):
    id: str
    object: Literal["target.deleted"] = "target.deleted"
    deleted: Literal[True] = True


def _store(request: Request) -> Store:
    return request.app.state.store


def _expected_version(if_match: str | None) -> int | None:
    """Accept the version bare (`3`) or as an entity tag (`"3"`, `W/"3"`); `*` matches any version."""
    if if_match is None or if_match.strip() == "*":
        return None
    value = if_match.strip().removeprefix("W/").strip('"')
    if not (value.isascii() and value.isdigit()):
        raise APIError(
            400,
            "If-Match: expected the target's version, e.g. 'If-Match: 3'.",
            param="If-Match",
            code="invalid_value",
        )
    return int(value)


async def _call(function: Callable[Params, Result], *args: Params.args, **kwargs: Params.kwargs) -> Result:
    """Run a blocking store call off the event loop and turn its refusals into API errors."""
    try:
        return await asyncio.to_thread(function, *args, **kwargs)
    except StoreError as error:
        raise refusal(error) from error


async def _write(
    request: Request, function: Callable[Params, Result], *args: Params.args, **kwargs: Params.kwargs
) -> Result:
    """A store write, then every change callback: awaited before the response leaves, so that the
    operator's next request is already served under the change."""
    result = await _call(function, *args, **kwargs)
    callbacks: list[TargetsChanged] = request.app.state.on_targets_changed
    for callback in callbacks:
        await callback()
    return result


admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin_key)], tags=["admin"])


@admin.post("/targets", status_code=201)
async def create_target(spec: TargetSpec, request: Request) -> Target:
    return await _write(request, _store(request).create_target, spec)


@admin.get("/targets")
async def list_targets(request: Request, limit: Limit = 50, after: After = None) -> Page[Target]:
    return await _call(_store(request).list_targets, limit, after)


@admin.get("/targets/{target_id}")
async def get_target(target_id: str, request: Request) -> Target:
    return await _call(_store(request).get_target, target_id)


@admin.patch("/targets/{target_id}")
async def update_target(
    target_id: str, patch: TargetPatch, request: Request, if_match: IfMatch = None
) -> Target:
    """Fields left out or sent as null keep their value."""
    return await _write(request, _store(request).update_target, target_id, patch, _expected_version(if_match))


@admin.delete("/targets/{target_id}")
async def delete_target(target_id: str, request: Request, if_match: IfMatch = None) -> TargetDeleted:
    await _write(request, _store(request).delete_target, target_id, _expected_version(if_match))
    return TargetDeleted(id=target_id)


@admin.get("/audit")
async def list_audit(
    request: Request,
    limit: Limit = 50,
    after: After = None,
    kind: AuditKind | None = None,
    target_id: str | None = None,
) -> Page[AuditRecord]:
    """Newest first."""
    return await _call(_store(request).list_audit, limit, after, kind, target_id)
