"""The operator's API for offline unlearning: submit, watch and cancel jobs (run by `lethe worker`,
never inside a request); the checkpoints they write are gateway/api/admin/checkpoints.py.

Jobs are validated completely at submission (method, hyperparameters, targets, starting
checkpoint), so that a job that cannot run is a 4xx now rather than a failed job later. A promote
loads the checkpoint next to the serving weights and swaps them without dropping a request
(gateway/runtime/switcher.py); the change is stored, audited, and followed by the other replicas.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError

from lethe.gateway.api.admin.common import After, Limit, call_store
from lethe.gateway.api.auth import require_admin_key
from lethe.gateway.api.errors import APIError
from lethe.gateway.runtime.switcher import CheckpointNotFound, ModelSwitcher
from lethe.gateway.store import BASE_CHECKPOINT, Job, JobState, Page, Store
from lethe.models.unlearning.spec import UnlearnSpec

StateFilter = Annotated[JobState | None, Query(description="Only jobs in this state.")]


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin_key)], tags=["admin"])


def _store(request: Request) -> Store:
    return request.app.state.store


def _switcher(request: Request) -> ModelSwitcher:
    return request.app.state.switcher


def _params_error(spec: UnlearnSpec, error: ValidationError) -> APIError:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first.get("loc", ()))
    param = f"params.{location}" if location else "params"
    if first.get("type") == "extra_forbidden":
        message = f"{param}: not a hyperparameter of {spec.method}"
    else:
        message = f"{param}: {first.get('msg', 'invalid value').removeprefix('Value error, ')}"
    return APIError(400, message, param=param, code="invalid_hyperparameter")


def _validate(spec: UnlearnSpec, request: Request) -> None:
    """Everything a worker would refuse, refused now; blocking (runs off the event loop)."""
    try:
        spec.method_params()
    except ValidationError as error:
        raise _params_error(spec, error) from error
    if spec.from_checkpoint is not None:
        try:
            _switcher(request).resolve(spec.from_checkpoint)
        except CheckpointNotFound as error:
            raise APIError(400, str(error), param="from_checkpoint", code="checkpoint_not_found") from error
    from lethe.gateway.jobs.runner import validate_spec

    try:
        validate_spec(spec, _store(request))
    except ValueError as error:
        message = str(error)
        param = "targets" if "target" in message.lower() else None
        raise APIError(400, message, param=param, code="invalid_value") from error


@router.post("/jobs", status_code=201)
async def create_job(spec: UnlearnSpec, request: Request) -> Job:
    """Queue an unlearning job; a worker picks it up. Bad hyperparameters, unknown targets and unknown
    starting checkpoints are refused here with a 400 naming the parameter."""
    if spec.from_checkpoint is None:
        # "The model the gateway serves" is fixed now: a job must not build on the base model after
        # a promote (and bring back what the promoted checkpoint forgot), nor change meaning later.
        spec = spec.model_copy(update={"from_checkpoint": _switcher(request).current.checkpoint})
    if spec.from_checkpoint == BASE_CHECKPOINT:
        spec = spec.model_copy(update={"from_checkpoint": None})
    await asyncio.to_thread(_validate, spec, request)
    return await call_store(_store(request).create_job, spec.model_dump(mode="json"))


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
