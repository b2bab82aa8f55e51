"""What load balancers and Prometheus read: `/healthz` (readiness) and `/metrics`."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter()


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    switcher = getattr(request.app.state, "switcher", None)
    healthy = switcher is not None and switcher.current.engine.is_healthy()
    return JSONResponse({"status": "ok" if healthy else "unavailable"}, status_code=200 if healthy else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    stats = await asyncio.to_thread(request.app.state.store.job_stats)
    request.app.state.metrics.observe_jobs(stats)
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
