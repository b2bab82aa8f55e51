"""The operator's API for offline unlearning: submit, watch and cancel jobs (run by `lethe worker`,
never inside a request); the checkpoints they write are gateway/api/admin/checkpoints.py.

A job's body is validated once, as it arrives, by its kind's model (`method` picks `SSDJob` or
`FLATJob`: finite hyperparameters in range, compiled module patterns, at most 64 targets); then
`lethe.gateway.jobs.validation` checks what needs the store, the checkpoints, the evaluation data
and the model's parameter names, so that a job that cannot run is a 400 now, naming the item at
fault (`params.alpha`, `params.modules[0]`, `targets[2]`, `from_checkpoint`), rather than a failed
job later. A promote loads the checkpoint next to the serving weights and swaps them without
dropping a request (gateway/runtime/switcher.py); the change is stored, audited, and followed by
the other replicas.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import TypeAdapter

from lethe.gateway.api.admin.common import After, Limit, call_store
from lethe.gateway.api.auth import require_admin_key
from lethe.gateway.api.errors import APIError
from lethe.gateway.jobs.validation import JobSpec, JobSpecError, check_job, starting_checkpoint
from lethe.gateway.runtime.switcher import ModelSwitcher
from lethe.gateway.store import BASE_CHECKPOINT, Job, JobState, Page, Store
from lethe.models.unlearning.spec import UnlearnJob, stored_spec

StateFilter = Annotated[JobState | None, Query(description="Only jobs in this state.")]

_KINDS = frozenset(TypeAdapter(JobSpec).json_schema()["discriminator"]["mapping"])
"""The `method` of each kind of job: pydantic puts it in the location of an error inside that kind."""


def _location(error: dict[str, Any]) -> dict[str, Any]:
    """An error in a job body located as a client names the field: without the kind pydantic adds
    (`params.alpha`, not `ssd.params.alpha`), with list positions in brackets (`targets[2]`), and a
    missing or unknown kind located at `method`."""
    location = list(error.get("loc", ()))
    if location[:1] == ["body"] and len(location) > 1 and location[1] in _KINDS:
        del location[1]
    if location == ["body"] and error.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        location.append("method")
        if error["type"] == "union_tag_not_found":
            error = {**error, "type": "missing"}
    named: list[Any] = []
    for part in location:
        if isinstance(part, int) and named:
            named[-1] = f"{named[-1]}[{part}]"
        else:
            named.append(part)
    return {**error, "loc": tuple(named)}


class _JobRoute(APIRoute):
    """Reports request validation errors with `_location`'s names."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as error:
                errors = [_location(e) for e in error.errors()]
                raise RequestValidationError(errors, body=error.body) from None

        return route


router = APIRouter(
    prefix="/admin", dependencies=[Depends(require_admin_key)], tags=["admin"], route_class=_JobRoute
)


def _store(request: Request) -> Store:
    return request.app.state.store


def _switcher(request: Request) -> ModelSwitcher:
    return request.app.state.switcher


def _check(spec: UnlearnJob, request: Request) -> None:
    """Everything a worker would refuse, refused now; blocking (runs off the event loop)."""
    switcher = _switcher(request)
    try:
        check_job(
            spec,
            store=_store(request),
            data_dir=switcher.current.settings.eval_data,
            catalog=switcher.catalog(),
            base_model=lambda: switcher.resolve(BASE_CHECKPOINT),
        )
    except JobSpecError as error:
        raise APIError(400, str(error), param=error.param, code=error.code) from error


@router.post("/jobs", status_code=201)
async def create_job(spec: JobSpec, request: Request) -> Job:
    """Queue an unlearning job; a worker picks it up. Bad hyperparameters, unknown or repeated targets,
    module patterns that match nothing and unknown starting checkpoints are refused here with a 400
    naming the item. Without `from_checkpoint` the job starts from the checkpoint serving now."""
    serving = _switcher(request).current.checkpoint
    spec = spec.model_copy(update={"from_checkpoint": starting_checkpoint(spec.from_checkpoint, serving)})
    await asyncio.to_thread(_check, spec, request)
    return await call_store(_store(request).create_job, stored_spec(spec))


@router.get("/jobs")
async def list_jobs(
    request: Request, limit: Limit = 50, after: After = None, state: StateFilter = None
) -> Page[Job]:
    """Newest first."""
    return await call_store(_store(request).list_jobs, limit, after, state)


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> Job:
    return await call_store(_store(request).get_job, job_id)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> Job:
    """A queued job is cancelled at once; a running one stops at its next progress check (its state
    becomes `cancelled` then, and nothing is written). A finished job is a 409."""
    return await call_store(_store(request).cancel_job, job_id)
