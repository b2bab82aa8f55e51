"""The operator's API for the weights that serve: list the checkpoints unlearning jobs wrote, and
promote or roll back the one that serves.

A promote loads the checkpoint next to the serving weights and swaps them without dropping a
request (gateway/runtime/switcher.py); the change is stored, audited, and followed by the other
replicas.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from lethe.gateway.api.admin.common import refusal
from lethe.gateway.api.auth import require_admin_key
from lethe.gateway.api.errors import APIError
from lethe.gateway.runtime.switcher import CheckpointLoadFailed, CheckpointNotFound, ModelSwitcher
from lethe.gateway.store import BASE_CHECKPOINT, ServingCheckpoint, Store, StoreError


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


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin_key)], tags=["admin"])


def _store(request: Request) -> Store:
    return request.app.state.store


def switcher(request: Request) -> ModelSwitcher:
    return request.app.state.switcher


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


def _checkpoints(request: Request) -> CheckpointList:
    serving = _store(request).serving_checkpoint().checkpoint
    manifests = switcher(request).catalog().list()
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


@router.get("/checkpoints")
async def list_checkpoints(request: Request) -> CheckpointList:
    """`base` first, then the checkpoints unlearning jobs wrote."""
    return await asyncio.to_thread(_checkpoints, request)


@router.get("/checkpoints/{checkpoint_id}")
async def get_checkpoint(checkpoint_id: str, request: Request) -> CheckpointInfo:
    listing = await asyncio.to_thread(_checkpoints, request)
    for checkpoint in listing.data:
        if checkpoint.id == checkpoint_id:
            return checkpoint
    raise _checkpoint_error(CheckpointNotFound(checkpoint_id))


@router.post("/checkpoints/{checkpoint_id}/promote")
async def promote_checkpoint(checkpoint_id: str, request: Request) -> ServingCheckpoint:
    """Serve `checkpoint_id` (`base` for the original model): it is loaded next to the serving
    weights, then swapped in; requests in flight finish on the old weights and the next request
    uses the new ones. Other replicas follow within a second."""
    return await _switching(switcher(request).promote(checkpoint_id))


@router.post("/checkpoints/{checkpoint_id}/rollback")
async def rollback_checkpoint(checkpoint_id: str, request: Request) -> ServingCheckpoint:
    """`checkpoint_id` must be serving; the gateway goes back to what served before it was promoted."""
    return await _switching(switcher(request).rollback(checkpoint_id))
