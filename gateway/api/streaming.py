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


async def sse_errors_closed(events: AsyncIterator[str]) -> AsyncIterator[bytes]:
    """Once streaming has started the status is sent; any failure, whatever its type, becomes an
    `error` event, never a truncated stream that looks complete (fail closed). Events are encoded
    here, so that text that cannot be sent (a lone surrogate) fails inside this guard too. Only
    cancellation (the client left, the server stops) ends a stream without one."""
    try:
        async for event in events:
            yield event.encode("utf-8")
    except (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:
        failure = error if isinstance(error, Exception) else RuntimeError(repr(error))
        yield sse(as_api_error(failure).body()).encode("utf-8")
    yield SSE_DONE.encode("utf-8")


async def with_keep_alive(events: AsyncIterator[bytes], interval: float) -> AsyncIterator[bytes]:
    """`events`, with a comment line whenever `interval` seconds pass without one."""
    iterator = aiter(events)
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield SSE_KEEP_ALIVE.encode("utf-8")
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
