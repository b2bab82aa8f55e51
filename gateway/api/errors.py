"""OpenAI-style errors: every failure a client sees is `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lethe.gateway.runtime.guard_runtime import GuardFailure
from lethe.models.engine import EngineError

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

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


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
    if isinstance(error, EngineError):
        return APIError(500, f"Generation failed: {error}", type_="server_error", code="engine_error")
    logger.error("unexpected error", exc_info=error)
    return APIError(500, "The server had an error while processing your request.", type_="server_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_, code = _STATUS_TYPES.get(exc.status_code, ("invalid_request_error", None))
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return APIError(exc.status_code, detail, type_=type_, code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.warning("request %s %s failed", request.method, request.url.path)
        return as_api_error(exc).response()
