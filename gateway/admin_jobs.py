"""The operator's API for offline unlearning: submit, watch and cancel jobs (run by `lethe worker`,
never inside a request), list the checkpoints they write, and promote or roll back the checkpoint
that serves.

Jobs are validated completely at submission (method, hyperparameters, targets, starting
checkpoint), so that a job that cannot run is a 4xx now rather than a failed job later. A promote
loads the checkpoint next to the serving weights and swaps them without dropping a request
(gateway/switching.py); the change is stored, audited, and followed by the other replicas.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field, ValidationError

from gateway.admin import After, Limit, _call, refusal, require_admin_key
from gateway.errors import APIError
from gateway.store import BASE_CHECKPOINT, Job, JobState, Page, ServingCheckpoint, Store, StoreError
from gateway.switching import CheckpointLoadFailed, CheckpointNotFound, ModelSwitcher
from models.unlearning.spec import UnlearnSpec

StateFilter = Annotated[JobState | None, Query(description="Only jobs in this state.")]


class CheckpointInfo(BaseModel):
    """A checkpoint that can serve: `base` (the model the gateway was started on) or one written by
    an unlearning job, with its manifest (parent, method, hyperparameters, data hashes, evaluation)."""

    id: str
    object: Literal["checkpoint"] = "checkpoint"
    serving: bool = Field(description="Whether this is the checkpoint the store names as serving.")
    manifest: dict[str, Any] | None = Field(default=None, description="None for `base`.")


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointInfo]
    serving: str = Field(description="The serving checkpoint's id.")


jobs_admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin_key)], tags=["admin"])


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


async def _switching(switch: Awaitable[ServingCheckpoint]) -> ServingCheckpoint:
    try:
        return await switch
    except StoreError as error:
        raise refusal(error) from error
    except (CheckpointNotFound, CheckpointLoadFailed) as error:
        raise _checkpoint_error(error) from error


def _checkpoint_error(error: Exception) -> APIError:
    if isinstance(error, CheckpointNotFound):
        return APIError(404, str(error), type_="not_found_error", code="checkpoint_not_found")
    return APIError(500, str(error), type_="server_error", code="checkpoint_load_failed")


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
    from gateway.unlearning import validate_spec

    try:
        validate_spec(spec, _store(request))
    except ValueError as error:
        message = str(error)
        param = "targets" if "target" in message.lower() else None
        raise APIError(400, message, param=param, code="invalid_value") from error


@jobs_admin.post("/jobs", status_code=201)
async def create_job(spec: UnlearnSpec, request: Request) -> Job:
    """Queue an unlearning job; a worker picks it up. Bad hyperparameters, unknown targets and unknown
    starting checkpoints are refused here with a 400 naming the parameter."""
    if spec.from_checkpoint is None:
        # "The model the gateway serves" is fixed now: a job must not build on the base model after
        # a promote (and bring back what the promoted checkpoint forgot), nor change meaning later.
        spec = spec.model_copy(update={"from_checkpoint": request.app.state.serving.checkpoint})
    if spec.from_checkpoint == BASE_CHECKPOINT:
        spec = spec.model_copy(update={"from_checkpoint": None})
    await asyncio.to_thread(_validate, spec, request)
    return await _call(_store(request).create_job, spec.model_dump(mode="json"))


@jobs_admin.get("/jobs")
async def list_jobs(
    request: Request, limit: Limit = 50, after: After = None, state: StateFilter = None
) -> Page[Job]:
    """Newest first."""
    return await _call(_store(request).list_jobs, limit, after, state)


@jobs_admin.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> Job:
    return await _call(_store(request).get_job, job_id)


@jobs_admin.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> Job:
    """A queued job is cancelled at once; a running one stops at its next progress check (its state
    becomes `cancelled` then, and nothing is written). A finished job is a 409."""
    return await _call(_store(request).cancel_job, job_id)


def _checkpoints(request: Request) -> CheckpointList:
    serving = _store(request).serving_checkpoint().checkpoint
    manifests = _switcher(request).catalog().list()
    return CheckpointList(
        serving=serving,
        data=[
            CheckpointInfo(id=BASE_CHECKPOINT, serving=serving == BASE_CHECKPOINT),
            *(
                CheckpointInfo(id=m.id, serving=serving == m.id, manifest=m.model_dump(mode="json"))
                for m in manifests
            ),
        ],
    )


@jobs_admin.get("/checkpoints")
async def list_checkpoints(request: Request) -> CheckpointList:
    """`base` first, then the checkpoints unlearning jobs wrote."""
    return await asyncio.to_thread(_checkpoints, request)


@jobs_admin.get("/checkpoints/{checkpoint_id}")
async def get_checkpoint(checkpoint_id: str, request: Request) -> CheckpointInfo:
    listing = await asyncio.to_thread(_checkpoints, request)
    for checkpoint in listing.data:
        if checkpoint.id == checkpoint_id:
            return checkpoint
    raise _checkpoint_error(CheckpointNotFound(checkpoint_id))


@jobs_admin.post("/checkpoints/{checkpoint_id}/promote")
async def promote_checkpoint(checkpoint_id: str, request: Request) -> ServingCheckpoint:
    """Serve `checkpoint_id` (`base` for the original model): it is loaded next to the serving
    weights, then swapped in; requests in flight finish on the old weights and the next request
    uses the new ones. Other replicas follow within a second."""
    return await _switching(_switcher(request).promote(checkpoint_id))


@jobs_admin.post("/checkpoints/{checkpoint_id}/rollback")
async def rollback_checkpoint(checkpoint_id: str, request: Request) -> ServingCheckpoint:
    """`checkpoint_id` must be serving; the gateway goes back to what served before it was promoted."""
    return await _switching(_switcher(request).rollback(checkpoint_id))
