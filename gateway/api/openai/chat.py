"""`POST /v1/chat/completions`: the route, the choices' assembly and their stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import StreamingResponse

from lethe.gateway.api.openai.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ChatTokenLogprob,
    TopLogprob,
    now,
)
from lethe.gateway.api.openai.serving import (
    GuardedChoices,
    Serving,
    cancel_on_disconnect,
    check_engine,
    check_model,
    check_sequences,
    guarded_choices,
    merged_outputs,
    new_id,
    sampling_params,
    usage,
)
from lethe.gateway.api.streaming import sse, sse_response
from lethe.gateway.runtime.context import ServingContext
from lethe.models.engine import Engine, TokenLogprob

ROUTE = "/v1/chat/completions"


def chat_logprobs(engine: Engine, logprobs: tuple[TokenLogprob, ...]) -> list[ChatTokenLogprob]:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = engine.decode_token(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    return [
        ChatTokenLogprob(
            **entry(item.token_id, item.logprob).model_dump(),
            top_logprobs=[entry(token_id, value) for token_id, value in item.top],
        )
        for item in logprobs
    ]


async def _prepare(ctx: ServingContext, body: ChatCompletionRequest) -> GuardedChoices:
    check_model(ctx, body.model)
    check_engine(ctx)
    check_sequences(ctx, 1, body.n)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]
    prompt_ids = ctx.engine.encode_chat(messages)
    params = sampling_params(
        ctx,
        prompt_tokens=len(prompt_ids),
        max_tokens=body.max_new_tokens(),
        temperature=body.temperature,
        top_p=body.top_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        stop=body.stop_list(),
        seed=body.seed,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        ignore_eos=body.ignore_eos,
        n=body.n,
    )
    ctx.metrics.prompt_tokens.inc(len(prompt_ids))
    texts = [m["content"] for m in messages]
    return await guarded_choices(ctx, new_id("chatcmpl"), texts, prompt_ids, params, body.n)


router = APIRouter()


@router.post(ROUTE, response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, ctx: Serving
) -> ChatCompletionResponse | StreamingResponse:
    started = time.perf_counter()
    batch = await _prepare(ctx, body)
    if body.stream:
        return sse_response(_stream(ctx, body, batch, started))
    return await cancel_on_disconnect(request, _complete(ctx, body, batch, started))


async def _complete(
    ctx: ServingContext, body: ChatCompletionRequest, batch: GuardedChoices, started: float
) -> ChatCompletionResponse:
    requests = batch.requests
    texts = [""] * len(requests)
    logprobs: list[list[ChatTokenLogprob]] = [[] for _ in requests]
    finish = ["stop"] * len(requests)
    completion_tokens = [0] * len(requests)
    async for index, output in merged_outputs(ctx, [batch], ROUTE, started):
        texts[index] += output.text
        if body.logprobs:
            logprobs[index].extend(chat_logprobs(ctx.engine, output.logprobs))
        completion_tokens[index] = output.completion_tokens
        if output.finish_reason is not None:
            finish[index] = output.finish_reason
    return ChatCompletionResponse(
        id=batch.request_id,
        model=ctx.model_name,
        choices=[
            ChatChoice(
                index=index,
                message=ChatResponseMessage(content=texts[index]),
                logprobs=ChatChoiceLogprobs(content=logprobs[index]) if body.logprobs else None,
                finish_reason=finish[index],  # type: ignore[arg-type]
            )
            for index in range(len(requests))
        ],
        usage=usage(len(requests[0].prompt_ids), sum(completion_tokens)),
    )


async def _stream(
    ctx: ServingContext, body: ChatCompletionRequest, batch: GuardedChoices, started: float
) -> AsyncIterator[str]:
    request_id, requests = batch.request_id, batch.requests
    created = now()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[ChatChunkChoice]) -> str:
        payload = ChatCompletionChunk(id=request_id, created=created, model=ctx.model_name, choices=choices)
        data = payload.model_dump(mode="json")
        if include_usage:
            data["usage"] = None  # every chunk but the last carries an explicit null, as OpenAI sends
        return sse(data)

    for index in range(len(requests)):
        yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
    completion_tokens = [0] * len(requests)
    async for index, output in merged_outputs(ctx, [batch], ROUTE, started):
        completion_tokens[index] = output.completion_tokens
        if not output.text and output.finish_reason is None and not body.logprobs:
            continue  # text held back (partial character or possible stop string): nothing to say yet
        yield chunk(
            [
                ChatChunkChoice(
                    index=index,
                    delta=ChatDelta(content=output.text) if output.text else ChatDelta(),
                    logprobs=ChatChoiceLogprobs(content=chat_logprobs(ctx.engine, output.logprobs))
                    if body.logprobs
                    else None,
                    finish_reason=output.finish_reason,
                )
            ]
        )
    if include_usage:
        final = ChatCompletionChunk(
            id=request_id,
            created=created,
            model=ctx.model_name,
            choices=[],
            usage=usage(len(requests[0].prompt_ids), sum(completion_tokens)),
        )
        yield sse(final)
