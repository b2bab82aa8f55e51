"""Bearer-key checking: the user API (`LETHE_API_KEYS`) and the admin API (the admin key)."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from lethe.gateway.api.errors import APIError


def check_api_key(request: Request) -> None:
    """FastAPI dependency: with keys configured, `/v1/*` needs `Authorization: Bearer <one of them>`."""
    keys: frozenset[str] = request.app.state.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            type_="authentication_error",
            code="invalid_api_key",
        )
    token = token.strip()
    if not any(hmac.compare_digest(token.encode(), key.encode()) for key in keys):
        raise APIError(
            401, "Incorrect API key provided.", type_="authentication_error", code="invalid_api_key"
        )


def require_admin_key(request: Request) -> None:
    """FastAPI dependency: `Authorization: Bearer <admin key>`, compared in constant time."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    key: str = request.app.state.admin_key
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(
            401,
            "The admin API needs the admin key: 'Authorization: Bearer <LETHE_ADMIN_KEY>'.",
            type_="authentication_error",
            code="invalid_admin_key",
        )
