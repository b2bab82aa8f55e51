"""Requests pinned to the weights they started on, so a promote never cuts one off."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from lethe.gateway.runtime.switcher import ModelSwitcher


class ServingLeases:
    """Pure ASGI middleware: pin the serving context current at arrival into the request's scope
    (`request.state.serving`) and hold its lease until the response is finished, streaming or not."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        switcher: ModelSwitcher | None = None
        if scope["type"] == "http" and "app" in scope:
            switcher = getattr(scope["app"].state, "switcher", None)
        if switcher is None:
            await self.app(scope, receive, send)
            return
        ctx = switcher.current
        scope.setdefault("state", {})["serving"] = ctx
        ctx.lease.acquire()
        try:
            await self.app(scope, receive, send)
        finally:
            ctx.lease.release()
