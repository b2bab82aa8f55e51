"""The FastAPI application: wiring of settings, engine, routes, middleware and lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import StreamingResponse

from gateway.admin import TargetsChanged, admin
from gateway.admin_key import load_admin_key
from gateway.auth import check_api_key
from gateway.config import Settings
from gateway.errors import install_error_handlers
from gateway.guard_service import DetectorFactory, GuardService
from gateway.limits import BodySizeLimit
from gateway.metrics import Metrics, MetricsMiddleware
from gateway.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from gateway.serving import ServingContext, check_model
from gateway.serving_chat import create_chat_completion
from gateway.serving_completions import create_completion
from gateway.store import open_store
from guards.compiler import GuardConfig
from models.engine import Engine

logger = logging.getLogger(__name__)


def resolve_model_path(settings: Settings) -> Path:
    """The folder to serve: `--model`, or the embedded SmolLM2 converted once under LETHE_HOME."""
    if settings.model is not None:
        path = settings.model.expanduser()
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {path}: not a Hugging Face model folder (no config.json)")
        return path
    from models.embedded import embedded_checkpoint

    return embedded_checkpoint(settings.home)


def build_engine(settings: Settings) -> Engine:
    from models.hf_engine import TransformersEngine

    path = resolve_model_path(settings)
    return TransformersEngine(
        path,
        model_name=settings.served_model_name or path.name,
        max_batch_size=settings.max_batch_size,
        max_prefill_tokens=settings.max_prefill_tokens,
    )


def _context(request: Request) -> ServingContext:
    return request.app.state.serving


v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])


@v1.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    ctx = _context(request)
    return ModelList(data=[ModelCard(id=ctx.model_name, created=ctx.created)])


@v1.get("/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    ctx = _context(request)
    check_model(ctx, model_id)
    return ModelCard(id=ctx.model_name, created=ctx.created)


@v1.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> ChatCompletionResponse | StreamingResponse:
    return await create_chat_completion(_context(request), body, request)


@v1.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> CompletionResponse | StreamingResponse:
    return await create_completion(_context(request), body, request)


ops = APIRouter()


@ops.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    healthy = request.app.state.serving.engine.is_healthy()
    return JSONResponse({"status": "ok" if healthy else "unavailable"}, status_code=200 if healthy else 503)


@ops.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app; the engine (built from settings unless given) starts and stops with it."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            app.state.admin_key = load_admin_key(settings)
            app.state.store = open_store(settings)
            stack.callback(app.state.store.close)
            serving_engine = engine or build_engine(settings)
            started = time.perf_counter()
            await serving_engine.start()
            stack.push_async_callback(serving_engine.shutdown)
            metrics.watch_engine(serving_engine)
            logger.info(
                "engine ready: %s in %.1f s", serving_engine.model_name, time.perf_counter() - started
            )
            guard = GuardService(app.state.store, serving_engine, DetectorFactory(), GuardConfig())
            await guard.start()
            stack.push_async_callback(guard.stop)
            app.state.on_targets_changed.append(guard.reload)
            app.state.serving = ServingContext(
                engine=serving_engine,
                settings=settings,
                metrics=metrics,
                model_name=serving_engine.model_name,
                created=int(time.time()),
                guard=guard,
                store=app.state.store,
            )
            yield

    app = FastAPI(title="Lethe", version="0.1.0", lifespan=lifespan)
    app.state.api_keys = settings.api_key_set()
    app.state.metrics = metrics
    app.state.on_targets_changed: list[TargetsChanged] = []
    install_error_handlers(app)
    app.include_router(v1)
    app.include_router(ops)
    app.include_router(admin)
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_body_bytes, max_admin_bytes=settings.max_admin_body_bytes
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
