"""The API's own description and who may read it: `/openapi.json`, `/docs`, `/redoc`,
`/admin/openapi.json`, and the key `/metrics` may ask for.

The public schema describes the user API (/v1) and the operational endpoints only: the admin API
is described at `/admin/openapi.json`, which only the admin key opens. With
`LETHE_DOCS_REQUIRE_KEY`, `/openapi.json` needs a user key or the admin key and the two HTML pages
(which a browser loads without a key) are not served; with `LETHE_METRICS_REQUIRE_KEY`, `/metrics`
needs one of those keys too (Prometheus sends it as its bearer token).
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from lethe.gateway.api.auth import require_admin_key
from lethe.gateway.api.errors import APIError
from lethe.gateway.config import Settings

ADMIN_SCHEMA_PATH = "/admin/openapi.json"
METRICS_PATH = "/metrics"


def fastapi_options(settings: Settings) -> dict[str, Any]:
    """The FastAPI(...) arguments for the built-in schema and documentation pages."""
    if settings.docs_require_key:
        return {"openapi_url": None, "docs_url": None, "redoc_url": None}
    return {}


def _is_admin(route: BaseRoute) -> bool:
    return getattr(route, "path", "").startswith("/admin/")


def key_problem(app: Any, authorization: str) -> APIError | None:
    """None when `authorization` carries a user key (LETHE_API_KEYS) or the admin key, compared in
    constant time; else the 401."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    keys = [*app.state.api_keys, getattr(app.state, "admin_key", "")]
    if scheme.lower() == "bearer" and token:
        matches = [hmac.compare_digest(token.encode(), key.encode()) for key in keys if key]
        if any(matches):
            return None
    return APIError(
        401,
        "This endpoint needs an API key or the admin key: 'Authorization: Bearer YOUR_KEY'.",
        type_="authentication_error",
        code="invalid_api_key",
    )


def require_any_key(request: Request) -> None:
    """FastAPI dependency: a user key or the admin key."""
    problem = key_problem(request.app, request.headers.get("authorization", ""))
    if problem is not None:
        raise problem


class MetricsKey:
    """Pure ASGI middleware: `/metrics` only with a user key or the admin key (its router is not
    this module's, so the check sits in front of it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == METRICS_PATH:
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            problem = key_problem(scope["app"], authorization)
            if problem is not None:
                await problem.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install(app: FastAPI, settings: Settings) -> None:
    """After the routers are included: the public schema without /admin, the admin schema behind
    the admin key, and the key checks the settings ask for."""

    def schema(admin: bool) -> dict[str, Any]:
        return get_openapi(
            title=app.title if not admin else f"{app.title} admin API",
            version=app.version,
            routes=[route for route in app.routes if _is_admin(route) == admin],
        )

    def public_schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = schema(admin=False)
        return app.openapi_schema

    app.openapi = public_schema  # type: ignore[method-assign]
    admin_schema: dict[str, Any] = {}

    @app.get(ADMIN_SCHEMA_PATH, include_in_schema=False, dependencies=[Depends(require_admin_key)])
    async def openapi_admin() -> JSONResponse:
        if not admin_schema:
            admin_schema.update(schema(admin=True))
        return JSONResponse(admin_schema)

    if settings.docs_require_key:

        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_any_key)])
        async def openapi_with_key() -> JSONResponse:
            return JSONResponse(app.openapi())

    if settings.metrics_require_key:
        app.add_middleware(MetricsKey)
