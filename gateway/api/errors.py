"""OpenAI-style errors: every failure a client sees is `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lethe.gateway.runtime.guard_runtime import GuardFailure
from lethe.models.engine import EngineError, EngineUnavailable

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with the status and body a client should see."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # Text that cannot be encoded (a lone surrogate echoed from a request) must not turn an
        # error into a failure to send it.
        content = json.dumps(self.body(), ensure_ascii=False, separators=(",", ":"))
        return Response(
            content.encode("utf-8", "replace"), status_code=self.status, media_type="application/json"
        )


class UnsupportedParameter(ValueError):
    """Raised inside request validation for an OpenAI parameter this server does not implement."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name}: this parameter is not supported by this server")
        self.name = name


_STATUS_TYPES = {
    401: ("authentication_error", "invalid_api_key"),
    404: ("not_found_error", None),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
}


def validation_error(exc: RequestValidationError) -> APIError:
    """Translate pydantic's error list into one readable message naming the offending parameter."""
    first = exc.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(location) or None
    cause = first.get("ctx", {}).get("error")
    if first.get("type") == "json_invalid":
        return APIError(
            400, "We could not parse the JSON body of your request.", param=None, code="invalid_json"
        )
    if isinstance(cause, UnsupportedParameter):
        return APIError(400, str(cause), param=cause.name, code="unsupported_parameter")
    if first.get("type") == "extra_forbidden":
        return APIError(
            400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
        )
    if first.get("type") == "missing":
        return APIError(
            400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    message = first.get("msg", "invalid request")
    message = message.removeprefix("Value error, ")
    named = re.match(r"^([\w.]+): ", message)
    if named and not param:  # a whole-request check names its parameter in the message
        param = named.group(1)
    if param and not message.startswith(param):
        message = f"{param}: {message}"
    return APIError(400, message, param=param, code="invalid_value")


def as_api_error(error: Exception) -> APIError:
    """What a client sees of any failure: its own status for an API error, 503 when the guard could
    not check the request (fail closed), 500 with no internals otherwise."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, GuardFailure):
        return APIError(503, str(error), type_="server_error", code="guard_unavailable")
    if isinstance(error, EngineUnavailable):  # down or restarting: a retry may succeed
        return APIError(
            503, f"The engine is not available: {error}", type_="server_error", code="engine_unavailable"
        )
    if isinstance(error, EngineError):
        return APIError(500, f"Generation failed: {error}", type_="server_error", code="engine_error")
    logger.error("unexpected error", exc_info=error)
    return APIError(500, "The server had an error while processing your request.", type_="server_error")


class UnexpectedErrors:
    """Pure ASGI middleware: an exception no handler took becomes the JSON 500 of `as_api_error`
    here, and goes no further. Starlette's own last-resort handler sends the same response but then
    re-raises, and uvicorn closes the connection on any exception: the client's next request on
    that keep-alive connection would find it reset. Only a response already under way when the
    failure came (its body cut short) still ends the connection, as it must."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = False

        async def sending(message: Message) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as error:
            if started and not finished:
                raise
            logger.warning("request %s %s failed", scope.get("method"), scope.get("path"))
            failure = as_api_error(error)  # logs the traceback of an unexpected error
            if not started:
                await failure.response()(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """The handlers of every error type, and the middleware that keeps unexpected errors from
    closing the connection (added first, so that it sits right around the routes)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        type_, code = _STATUS_TYPES.get(exc.status_code, ("invalid_request_error", None))
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return APIError(exc.status_code, detail, type_=type_, code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse | Response:
        # Reached only by a failure outside UnexpectedErrors (in an outer middleware).
        logger.warning("request %s %s failed", request.method, request.url.path)
        return as_api_error(exc).response()

    app.add_middleware(UnexpectedErrors)
