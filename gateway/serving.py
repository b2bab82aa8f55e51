"""What the chat and completions endpoints share: parameter checks, fan-out of `n` choices over the
engine, disconnect handling and SSE framing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request

from gateway.config import Settings
from gateway.errors import APIError
from gateway.metrics import Metrics
from gateway.protocol import Usage
from guards.plan import GuardPlan
from models.engine import Engine, EngineError, GenerationOutput, GenerationRequest, SamplingParams

T = TypeVar("T")


@dataclass
class ServingContext:
    """Everything a request handler needs, built once in the app's lifespan."""

    engine: Engine
    settings: Settings
    metrics: Metrics
    model_name: str
    created: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(ctx: ServingContext, model: str) -> None:
    if model != ctx.model_name:
        raise APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")


def check_engine(ctx: ServingContext) -> None:
    if not ctx.engine.is_healthy():
        raise APIError(
            503, "The engine is not ready to serve.", type_="server_error", code="engine_unavailable"
        )


def sampling_params(
    ctx: ServingContext,
    *,
    prompt_tokens: int,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    presence_penalty: float,
    frequency_penalty: float,
    stop: Sequence[str],
    seed: int | None,
    logprobs: int | None,
    ignore_eos: bool,
    n: int,
) -> SamplingParams:
    """Check what depends on the model (context length, `n`) and build the engine's parameters."""
    context = ctx.engine.max_context
    if n > ctx.settings.max_n:
        raise APIError(400, f"n: at most {ctx.settings.max_n} choices per request are allowed.", param="n")
    if prompt_tokens >= context or (max_tokens is not None and prompt_tokens + max_tokens > context):
        requested = prompt_tokens + (max_tokens or 0)
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested {requested} "
            f"tokens ({prompt_tokens} in the prompt, {max_tokens or 0} in the completion). "
            "Please reduce the length of the prompt or the completion.",
            param="max_tokens" if max_tokens and prompt_tokens < context else "messages",
            code="context_length_exceeded",
        )
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else context - prompt_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        seed=seed,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        stop=tuple(stop),
        logprobs=logprobs,
        ignore_eos=ignore_eos,
    )


def choice_requests(
    base_id: str, prompt_ids: Sequence[int], params: SamplingParams, n: int, plan: GuardPlan
) -> list[GenerationRequest]:
    """One engine request per choice; a fixed seed gives each choice its own derived seed."""
    return [
        GenerationRequest(
            f"{base_id}-{index}",
            tuple(prompt_ids),
            params if params.seed is None else replace(params, seed=params.seed + index),
            plan,
        )
        for index in range(n)
    ]


async def merged_outputs(
    ctx: ServingContext, requests: Sequence[GenerationRequest], route: str, started: float
) -> AsyncIterator[tuple[int, GenerationOutput]]:
    """Interleave the increments of several choices as they come; leaving early aborts all of them."""
    queue: asyncio.Queue[tuple[int, GenerationOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, request: GenerationRequest) -> None:
        try:
            async for output in ctx.engine.generate(request):
                await queue.put((index, output))
            await queue.put((index, None))
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            await queue.put((index, error))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    first = True
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, EngineError):
                raise APIError(500, f"Generation failed: {item}", type_="server_error", code="engine_error")
            if isinstance(item, BaseException):
                raise item
            if first:
                ctx.metrics.ttft.labels(route).observe(time.perf_counter() - started)
                first = False
            ctx.metrics.generated_tokens.inc(len(item.token_ids))
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run a non-streaming generation, cancelling it if the client goes away before the answer."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise APIError(499, "The client closed the request.", code="client_closed_request")
    finally:
        watcher.cancel()
        task.cancel()


def sse(payload: BaseModel | dict[str, Any], **dump: Any) -> str:
    data = payload.model_dump(mode="json", **dump) if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_errors_closed(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once streaming has started the status is sent; a failure becomes an `error` event, never
    a truncated stream that looks complete (fail closed)."""
    try:
        async for event in events:
            yield event
    except APIError as error:
        yield sse(error.body())
    except EngineError as error:
        yield sse(APIError(500, f"Generation failed: {error}", type_="server_error").body())
    yield SSE_DONE
