"""Server-sent events as OpenAI streams them: `data: {json}` events, `data: [DONE]` at the end, and
an `error` event (never a silently truncated stream) when something fails after the first byte,
and a comment line now and then so that proxies do not close a stream that is slow to start."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse

from lethe.gateway.api.errors import as_api_error


def sse(payload: BaseModel | dict[str, Any], **dump: Any) -> str:
    data = payload.model_dump(mode="json", **dump) if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_KEEP_ALIVE = ": keep-alive\n\n"
KEEP_ALIVE_SECONDS = 15.0
"""A comment line after this long without an event (nginx and most load balancers time out at 60 s)."""

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""No proxy may cache or buffer a token stream (`X-Accel-Buffering` is nginx's switch)."""


async def sse_errors_closed(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once streaming has started the status is sent; any failure becomes an `error` event, never
    a truncated stream that looks complete (fail closed)."""
    try:
        async for event in events:
            yield event
    except Exception as error:
        yield sse(as_api_error(error).body())
    yield SSE_DONE


async def with_keep_alive(events: AsyncIterator[str], interval: float) -> AsyncIterator[str]:
    """`events`, with a comment line whenever `interval` seconds pass without one."""
    iterator = aiter(events)
    pending: asyncio.Future[str] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield SSE_KEEP_ALIVE
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield event
    finally:
        if pending is not None:
            pending.cancel()


def sse_response(events: AsyncIterator[str], keep_alive: float = KEEP_ALIVE_SECONDS) -> StreamingResponse:
    """The HTTP response of a stream: errors closed, kept alive, never cached or buffered."""
    return StreamingResponse(
        with_keep_alive(sse_errors_closed(events), keep_alive),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )
