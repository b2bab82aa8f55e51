"""`GET /v1/models` and `GET /v1/models/{model}`: the one model this gateway serves."""

from __future__ import annotations

from fastapi import APIRouter

from lethe.gateway.api.openai.protocol import ModelCard, ModelList, SAEInfo
from lethe.gateway.api.openai.serving import Serving, check_model
from lethe.gateway.runtime.context import ServingContext

router = APIRouter()


def _model_card(ctx: ServingContext) -> ModelCard:
    sae = ctx.guard.sae if ctx.guard is not None else None
    return ModelCard(
        id=ctx.model_name,
        created=ctx.created,
        checkpoint=ctx.checkpoint,
        sae=SAEInfo(**vars(sae.card)) if sae is not None else None,
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(ctx: Serving) -> ModelList:
    return ModelList(data=[_model_card(ctx)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, ctx: Serving) -> ModelCard:
    check_model(ctx, model_id)
    return _model_card(ctx)
