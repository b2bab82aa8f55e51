"""What every request body must pass before any handler parses it: a size limit, and text that can be
encoded (no lone surrogate).

A body over the limit gets a 413 only once the body has been read (and thrown away), up to
`drain_bound()`: a client still sending when the answer comes, and whose connection then closes,
may see a reset instead of the 413 (a client that sent `Connection: close` always would). Beyond
that bound the 413 goes out at once and the connection closes. The client timeout of `lethe serve`
(LETHE_CLIENT_TIMEOUT_SECONDS) bounds how long a slow body can hold a connection either way.

JSON may spell a lone UTF-16 surrogate as an escape (`"\\ud800"`), and Python's JSON parser turns
it into a string that no later step can encode (tokenizers, the store, the response): every such
body is a 400 naming the field, for /v1 and /admin alike.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lethe.gateway.api.errors import APIError

MIN_DRAIN_BYTES = 64 * 2**20
"""A body over the limit is read and discarded up to 4 x the limit, or this much if more."""

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
"""Where a body may spell a surrogate; only then is it parsed here to look for a lone one (an
escaped backslash before the `u` matches too, and is then found harmless)."""


def drain_bound(limit: int) -> int:
    return max(4 * limit, MIN_DRAIN_BYTES)


def _lone_surrogate_at(value: Any) -> tuple[str, ...] | None:
    """The path of the first key or string of a parsed JSON value that holds a lone surrogate
    (walked without recursion: the parser accepts deeper nesting than a recursive walk could)."""
    pending: list[tuple[tuple[str, ...], Any]] = [((), value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            if any("\ud800" <= char <= "\udfff" for char in item):
                return path
        elif isinstance(item, dict):
            for key in item:
                if any("\ud800" <= char <= "\udfff" for char in key):
                    return (*path, "<key>")
            pending.extend(((*path, key), inner) for key, inner in reversed(item.items()))
        elif isinstance(item, list):
            pending.extend(((*path, str(index)), inner) for index, inner in reversed(list(enumerate(item))))
    return None


def text_problem(body: bytes) -> APIError | None:
    """A 400 for a body whose text cannot be encoded: bytes that are not UTF-8 (including an
    encoded surrogate), or a JSON escape of a lone surrogate."""
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as error:
            return APIError(
                400,
                f"The request body is not valid UTF-8 (byte {error.start}).",
                code="invalid_encoding",
            )
    if _SURROGATE_ESCAPE.search(body) is None:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not JSON (or nested too deep): the route's own parsing answers
    path = _lone_surrogate_at(parsed)
    if path is None:
        return None
    param = ".".join(path) or None
    return APIError(
        400,
        f"{param or 'body'}: contains a lone UTF-16 surrogate (for example \\ud800 without its pair), "
        "which is not valid Unicode text.",
        param=param,
        code="invalid_encoding",
    )


class BodySizeLimit:
    """Answer 413 for bodies over `max_bytes` (`max_admin_bytes` under /admin), declared
    (Content-Length) or streamed (chunked), and 400 for a body with text that cannot be encoded.
    The body is read here, then replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_admin_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_admin_bytes = max_admin_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        # Target registrations carry whole documents; user requests do not need that much.
        limit = self.max_admin_bytes if scope["path"].startswith("/admin/") else self.max_bytes
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            if headers.get(b"expect", b"").lower() == b"100-continue":
                # The client waits for a go-ahead before sending: answer without asking for the body.
                await _reject(send, limit, close=True)
                return
            complete = int(declared) <= drain_bound(limit) and await _drain(receive, drain_bound(limit))
            await _reject(send, limit, close=not complete)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                more = message.get("more_body", False)
                complete = not more or await _drain(receive, drain_bound(limit) - size)
                await _reject(send, limit, close=not complete)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = text_problem(body)
        if problem is not None:
            await problem.response()(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _drain(receive: Receive, budget: int) -> bool:
    """Read and discard the rest of the body, up to `budget` bytes; whether it was all read."""
    while budget >= 0:
        message = await receive()
        if message["type"] != "http.request":
            return False
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return budget >= 0
    return False


async def _reject(send: Send, limit: int, *, close: bool) -> None:
    error = APIError(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the rest of the body was not read: this connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
