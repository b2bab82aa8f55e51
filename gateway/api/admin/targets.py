"""The operator's API under /admin: register, inspect, change and remove forget targets, and read
the audit trail.

Only the admin key opens it (LETHE_ADMIN_KEY, or the key generated into LETHE_HOME/admin.key).
The keys of LETHE_API_KEYS never do, and the admin key does not open /v1 unless it is also listed
there: handing a client a key must never hand it the list of what the model is made to forget.

Every successful write is followed by awaiting the store watcher's check (which rebuilds the guard
index) before the response leaves, so the next request is served under the new targets. A failing
check fails the admin call (500) although the change is stored: the operator must learn that the
change may not be in force.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal, ParamSpec, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from lethe.gateway.api.admin.common import After, IfMatch, Limit, StoreDep, call_store
from lethe.gateway.api.auth import require_admin_key
from lethe.gateway.api.errors import APIError
from lethe.gateway.runtime.store_watcher import StoreWatcher
from lethe.gateway.store import AuditKind, AuditRecord, Page
from lethe.guards.features import TargetFeatures
from lethe.guards.targets import Target, TargetPatch, TargetSpec

Params = ParamSpec("Params")
Result = TypeVar("Result")


class TargetDeleted(BaseModel):
    id: str
    object: Literal["target.deleted"] = "target.deleted"
    deleted: Literal[True] = True


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


def _watcher(request: Request) -> StoreWatcher:
    return request.app.state.watcher


Watcher = Annotated[StoreWatcher, Depends(_watcher)]


async def _write(
    watcher: StoreWatcher, function: Callable[Params, Result], *args: Params.args, **kwargs: Params.kwargs
) -> Result:
    """A store write, then the watcher's check: awaited before the response leaves, so that the
    operator's next request is already served under the change."""
    result = await call_store(function, *args, **kwargs)
    await watcher.check()
    return result


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin_key)], tags=["admin"])


@router.post("/targets", status_code=201)
async def create_target(spec: TargetSpec, store: StoreDep, watcher: Watcher) -> Target:
    return await _write(watcher, store.create_target, spec)


@router.get("/targets")
async def list_targets(store: StoreDep, limit: Limit = 50, after: After = None) -> Page[Target]:
    return await call_store(store.list_targets, limit, after)


class TargetDetail(Target):
    sae_features: list[TargetFeatures] = Field(
        default_factory=list,
        description="The SAE features chosen for this version of the target, one entry per SAE (empty "
        "until the gateway serving an SAE has chosen them, a few seconds after a change).",
    )


@router.get("/targets/{target_id}")
async def get_target(target_id: str, store: StoreDep) -> TargetDetail:
    target = await call_store(store.get_target, target_id)
    features = await call_store(store.target_features, None, target_id)
    return TargetDetail(**target.model_dump(), sae_features=features)


@router.patch("/targets/{target_id}")
async def update_target(
    target_id: str, patch: TargetPatch, store: StoreDep, watcher: Watcher, if_match: IfMatch = None
) -> Target:
    """Fields left out or sent as null keep their value."""
    return await _write(watcher, store.update_target, target_id, patch, _expected_version(if_match))


@router.delete("/targets/{target_id}")
async def delete_target(
    target_id: str, store: StoreDep, watcher: Watcher, if_match: IfMatch = None
) -> TargetDeleted:
    await _write(watcher, store.delete_target, target_id, _expected_version(if_match))
    return TargetDeleted(id=target_id)


@router.get("/audit")
async def list_audit(
    store: StoreDep,
    limit: Limit = 50,
    after: After = None,
    kind: AuditKind | None = None,
    target_id: str | None = None,
) -> Page[AuditRecord]:
    """Newest first."""
    return await call_store(store.list_audit, limit, after, kind, target_id)
