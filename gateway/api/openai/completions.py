"""`POST /v1/completions` (the legacy text endpoint; prompts are strings or token ids)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import StreamingResponse

from lethe.gateway.api.errors import APIError
from lethe.gateway.api.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    now,
)
from lethe.gateway.api.openai.serving import (
    GuardedChoices,
    Serving,
    cancel_on_disconnect,
    check_engine,
    check_model,
    check_sequences,
    check_tokens,
    guarded_choices,
    merged_outputs,
    new_id,
    sampling_params,
    usage,
)
from lethe.gateway.api.streaming import sse, sse_response
from lethe.gateway.runtime.context import ServingContext
from lethe.models.engine import GenerationOutput

ROUTE = "/v1/completions"


class _Choice:
    """Accumulates one choice's text and legacy-format log-probabilities."""

    def __init__(self, prefix: str, with_logprobs: bool) -> None:
        self.text = prefix
        self.logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        self.with_logprobs = with_logprobs
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    def add(self, ctx: ServingContext, output: GenerationOutput) -> CompletionLogprobs | None:
        """Record an increment; return the log-probabilities of just this increment."""
        self.completion_tokens = output.completion_tokens
        self.finish_reason = output.finish_reason or self.finish_reason
        increment = None
        if self.with_logprobs:
            increment = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
            offset = len(self.text)
            for item in output.logprobs:
                token = ctx.engine.decode_token(item.token_id)
                for target in (increment, self.logprobs):
                    target.tokens.append(token)
                    target.token_logprobs.append(item.logprob)
                    target.top_logprobs.append({ctx.engine.decode_token(t): v for t, v in item.top})
                    target.text_offset.append(offset)
                offset += len(token)
        self.text += output.text
        return increment


async def _prepare(
    ctx: ServingContext, body: CompletionRequest
) -> tuple[str, list[GuardedChoices], list[str], int]:
    check_model(ctx, body.model)
    check_engine(ctx)
    if body.echo and body.logprobs is not None:
        raise APIError(
            400, "echo: echo together with logprobs is not supported by this server.", param="echo"
        )
    try:
        prompts = body.prompts()
    except ValueError as error:
        raise APIError(400, str(error), param="prompt") from error
    check_sequences(ctx, len(prompts), body.n)
    max_tokens = body.max_tokens if body.max_tokens is not None else 16  # the API's documented default
    vocabulary = ctx.engine.vocab_size
    request_id = new_id("cmpl")
    batches: list[GuardedChoices] = []
    echoes: list[str] = []
    prompt_tokens = 0
    for number, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            prompt_ids = ctx.engine.encode_text(prompt)
            echo_text = prompt
        else:
            if any(not 0 <= t < vocabulary for t in prompt):
                raise APIError(
                    400,
                    f"prompt: token ids must be between 0 and {vocabulary - 1}, the model's vocabulary.",
                    param="prompt",
                    code="invalid_value",
                )
            prompt_ids = list(prompt)
            echo_text = "".join(ctx.engine.decode_token(t) for t in prompt_ids)
        if not prompt_ids:
            raise APIError(400, "prompt: must contain at least one token.", param="prompt")
        params = sampling_params(
            ctx,
            prompt_tokens=len(prompt_ids),
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            stop=body.stop_list(),
            seed=body.seed,
            logprobs=body.logprobs,
            ignore_eos=body.ignore_eos,
            n=body.n,
        )
        batches.append(
            await guarded_choices(ctx, f"{request_id}-{number}", [echo_text], prompt_ids, params, body.n)
        )
        echoes += [echo_text if body.echo else ""] * body.n
        prompt_tokens += len(prompt_ids)
        check_tokens(ctx, body.n * (prompt_tokens + (number + 1) * max_tokens))
    ctx.metrics.prompt_tokens.inc(prompt_tokens)
    return request_id, batches, echoes, prompt_tokens


router = APIRouter()


@router.post(ROUTE, response_model=None)
async def create_completion(
    body: CompletionRequest, request: Request, ctx: Serving
) -> CompletionResponse | StreamingResponse:
    started = time.perf_counter()
    request_id, batches, echoes, prompt_tokens = await _prepare(ctx, body)
    if body.stream:
        return sse_response(_stream(ctx, body, request_id, batches, echoes, prompt_tokens, started))
    return await cancel_on_disconnect(
        request, _complete(ctx, body, request_id, batches, echoes, prompt_tokens, started)
    )


async def _complete(
    ctx: ServingContext,
    body: CompletionRequest,
    request_id: str,
    batches: list[GuardedChoices],
    echoes: list[str],
    prompt_tokens: int,
    started: float,
) -> CompletionResponse:
    choices = [_Choice(echo, body.logprobs is not None) for echo in echoes]
    async for index, output in merged_outputs(ctx, batches, ROUTE, started):
        choices[index].add(ctx, output)
    return CompletionResponse(
        id=request_id,
        model=ctx.model_name,
        choices=[
            CompletionChoice(
                index=index,
                text=choice.text,
                logprobs=choice.logprobs if choice.with_logprobs else None,
                finish_reason=choice.finish_reason or "stop",  # type: ignore[arg-type]
            )
            for index, choice in enumerate(choices)
        ],
        usage=usage(prompt_tokens, sum(c.completion_tokens for c in choices)),
    )


async def _stream(
    ctx: ServingContext,
    body: CompletionRequest,
    request_id: str,
    batches: list[GuardedChoices],
    echoes: list[str],
    prompt_tokens: int,
    started: float,
) -> AsyncIterator[str]:
    created = now()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    choices = [_Choice("", body.logprobs is not None) for _ in echoes]

    def chunk(index: int, text: str, logprobs: CompletionLogprobs | None, finish: str | None) -> str:
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)  # type: ignore[arg-type]
        return sse(CompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=[choice]))

    for index, echo in enumerate(echoes):
        if echo:
            yield chunk(index, echo, None, None)
    async for index, output in merged_outputs(ctx, batches, ROUTE, started):
        increment = choices[index].add(ctx, output)
        if output.text or output.finish_reason is not None or increment is not None:
            yield chunk(index, output.text, increment, output.finish_reason)
    if include_usage:
        total = usage(prompt_tokens, sum(c.completion_tokens for c in choices))
        yield sse(
            CompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=[], usage=total)
        )
