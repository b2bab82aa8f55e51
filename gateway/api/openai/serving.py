"""What the chat and completions endpoints share: parameter checks, fan-out of `n` choices over the
engine and disconnect handling."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, TypeVar

from fastapi import Depends
from starlette.requests import Request

from lethe.gateway.api.errors import APIError
from lethe.gateway.api.openai.protocol import Usage
from lethe.gateway.runtime.context import ServingContext
from lethe.gateway.runtime.guard_runtime import GuardRuntime
from lethe.gateway.runtime.guarded_generation import GuardTally, guarded_stream, refusal_stream
from lethe.gateway.store import AuditRecord
from lethe.guards.index import NOTHING_FIRED, Decision, GuardIndex
from lethe.models.engine import GenerationOutput, GenerationRequest, SamplingParams

T = TypeVar("T")


@dataclass
class GuardedChoices:
    """The choices of one prompt and the guard decision they run under."""

    request_id: str
    prompt: str
    index: GuardIndex | None
    decision: Decision
    requests: list[GenerationRequest]
    tallies: list[GuardTally]


async def guard_decision(ctx: ServingContext, texts: Sequence[str]) -> tuple[GuardIndex | None, Decision]:
    """Which targets the conversation touches, under the index current at the request's start."""
    if ctx.guard is None:
        return None, NOTHING_FIRED
    index = ctx.guard.index
    if index.unenforceable:  # fail closed: which requests touch such a target cannot be known
        raise APIError(
            503,
            "A registered forget target cannot be enforced, so no request is answered until the "
            "operator fixes or deletes it (the gateway's log names it).",
            type_="server_error",
            code="guard_unavailable",
        )
    return index, await GuardRuntime.check_conversation(index, texts)


def choice_streams(ctx: ServingContext, batch: GuardedChoices) -> list[AsyncIterator[GenerationOutput]]:
    if batch.decision.refuse:
        refusal = batch.index.config.refusal if batch.index else ""
        tokens = len(ctx.engine.encode_text(refusal))
        for tally in batch.tallies:
            tally.target_ids, tally.refused = batch.decision.target_ids, True
        return [refusal_stream(r, refusal, tokens) for r in batch.requests]
    if batch.index is None:
        return [ctx.engine.generate(r) for r in batch.requests]
    return [
        guarded_stream(ctx.engine, batch.index, r, batch.decision, tally)
        for r, tally in zip(batch.requests, batch.tallies, strict=True)
    ]


def audit_later(ctx: ServingContext, batch: GuardedChoices) -> None:
    """Record a request on which targets fired, off the response path (never in the response)."""
    fired = tuple(dict.fromkeys(t for tally in batch.tallies for t in tally.target_ids))
    if not fired or ctx.store is None:
        return
    record = AuditRecord(
        kind="request",
        action="refuse" if any(t.refused for t in batch.tallies) else "steer",
        target_ids=list(fired),
        request_id=batch.request_id,
        suppressed_tokens=sum(t.suppressed_tokens for t in batch.tallies),
        prompt=batch.prompt,
    )
    task = asyncio.create_task(ctx.store.append_audit_async(record))
    ctx.background.add(task)
    task.add_done_callback(ctx.background.discard)


def serving_context(request: Request) -> ServingContext:
    """FastAPI dependency: the context pinned when the request arrived (gateway/api/leases.py), so
    that a request finishes on the engine it started on even if other weights are promoted."""
    pinned: ServingContext | None = getattr(request.state, "serving", None)
    return pinned if pinned is not None else request.app.state.switcher.current


Serving = Annotated[ServingContext, Depends(serving_context)]


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


def check_sequences(ctx: ServingContext, prompts: int, n: int) -> None:
    """A request may ask for at most `max_sequences_per_request` sequences (prompts x n)."""
    limit = ctx.settings.max_sequences_per_request
    if prompts * n > limit:
        raise APIError(
            400,
            f"This request asks for {prompts * n} sequences ({prompts} prompt(s) x n={n}); at most "
            f"{limit} per request are allowed. Send fewer prompts or a smaller n.",
            param="n" if n > 1 else "prompt",
            code="too_many_sequences",
        )


def check_tokens(ctx: ServingContext, tokens: int) -> None:
    """A request may ask for at most `max_tokens_per_request` tokens over all its sequences (each
    sequence's prompt and max_tokens)."""
    limit = ctx.settings.max_tokens_per_request
    if tokens > limit:
        raise APIError(
            400,
            f"This request asks for at least {tokens} tokens over all its sequences (prompt and "
            f"max_tokens of each); at most {limit} per request are allowed.",
            param="max_tokens",
            code="too_many_tokens",
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


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` of a request seeded with `seed`: still a signed 64-bit integer
    (it wraps around), which is what both engines' generators accept."""
    return (seed + choice + 2**63) % 2**64 - 2**63


async def guarded_choices(
    ctx: ServingContext,
    request_id: str,
    texts: Sequence[str],
    prompt_ids: Sequence[int],
    params: SamplingParams,
    n: int,
) -> GuardedChoices:
    """One engine request per choice under the guard decision for `texts`; a fixed seed gives each
    choice its own derived seed."""
    index, decision = await guard_decision(ctx, texts)
    if decision.plan.sae_clamp:
        ctx.metrics.sae_clamped.inc(n)
    requests = [
        GenerationRequest(
            f"{request_id}-{choice}",
            tuple(prompt_ids),
            params if params.seed is None else replace(params, seed=choice_seed(params.seed, choice)),
            decision.plan,
        )
        for choice in range(n)
    ]
    return GuardedChoices(
        request_id, "\n".join(texts), index, decision, requests, [GuardTally() for _ in requests]
    )


async def merged_outputs(
    ctx: ServingContext, batches: Sequence[GuardedChoices], route: str, started: float
) -> AsyncIterator[tuple[int, GenerationOutput]]:
    """Interleave the increments of all choices as they come; leaving early aborts all of them.
    Choices are numbered across batches in order."""
    queue: asyncio.Queue[tuple[int, GenerationOutput | BaseException | None]] = asyncio.Queue()
    streams = [stream for batch in batches for stream in choice_streams(ctx, batch)]

    async def pump(index: int, stream: AsyncIterator[GenerationOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
            await queue.put((index, None))
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            await queue.put((index, error))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    first = True
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, BaseException):  # as_api_error() tells the client
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
        for batch in batches:
            audit_later(ctx, batch)


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
