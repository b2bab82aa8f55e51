"""The FastAPI application: routes, middleware, and the lifespan that wires the store, the store
watcher, the checkpoint switcher and the engine together."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import Depends, FastAPI

from lethe.gateway.api import docs, ops
from lethe.gateway.api.admin import checkpoints as admin_checkpoints
from lethe.gateway.api.admin import jobs as admin_jobs
from lethe.gateway.api.admin import targets as admin_targets
from lethe.gateway.api.admin_key import load_admin_key
from lethe.gateway.api.auth import check_api_key
from lethe.gateway.api.errors import install_error_handlers
from lethe.gateway.api.leases import ServingLeases
from lethe.gateway.api.limits import BodySizeLimit
from lethe.gateway.api.openai import chat, completions, models
from lethe.gateway.config import Settings
from lethe.gateway.runtime.guard_runtime import DetectorFactory, GuardRuntime
from lethe.gateway.runtime.sae_service import SAEService
from lethe.gateway.runtime.store_watcher import StoreWatcher
from lethe.gateway.runtime.switcher import CheckpointCatalog, EngineFactory, ModelSwitcher, checkpoint_catalog
from lethe.gateway.runtime.telemetry import Metrics, MetricsMiddleware
from lethe.gateway.store import open_store
from lethe.models.engine import Engine
from lethe.models.loading import build_engine, resolve_model_path

logger = logging.getLogger(__name__)


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
    engine_config = settings.engine_config()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            app.state.admin_key = load_admin_key(settings)
            app.state.store = store = open_store(settings)
            stack.callback(store.close)
            base_path = engine.model_path if engine is not None else resolve_model_path(engine_config)
            detectors = DetectorFactory(settings.detection)
            sae = None
            if settings.sae is not None:
                sae = SAEService(
                    settings.sae, store, base_path, settings.sae_features, settings.sae_retain_text
                )
                metrics.serve_sae(sae.card)
            app.state.sae = sae
            switcher = ModelSwitcher(
                settings=settings,
                store=store,
                metrics=metrics,
                base_path=base_path,
                model_name=(
                    engine.model_name if engine is not None else settings.served_model_name or base_path.name
                ),
                build_engine=engine_factory or (lambda path, name: build_engine(engine_config, path, name)),
                build_guard=lambda serving_engine: GuardRuntime(
                    store,
                    serving_engine,
                    sae.detector_factory(detectors) if sae and settings.sae_detection else detectors,
                    settings.guard,
                    sae,
                ),
                catalog=checkpoints or (lambda: checkpoint_catalog(settings.home)),
            )
            await switcher.start(engine)
            stack.push_async_callback(switcher.stop)
            app.state.switcher = switcher

            async def refresh_guard(revision: int) -> None:
                guard = switcher.current.guard
                if guard is not None:
                    await guard.refresh(revision)

            app.state.watcher = watcher = StoreWatcher(store)
            watcher.on_targets(refresh_guard)
            if sae is not None:
                watcher.on_targets(sae.refresh)
                sae.start()
                stack.push_async_callback(sae.stop)
            watcher.on_serving(switcher.follow)
            watcher.start()
            stack.push_async_callback(watcher.stop)
            yield

    app = FastAPI(title="Lethe", version="0.1.0", lifespan=lifespan, **docs.fastapi_options(settings))
    app.state.api_keys = settings.api_key_set()
    app.state.metrics = metrics
    install_error_handlers(app)
    user = [Depends(check_api_key)]
    for openai_routes in (models.router, chat.router, completions.router):
        app.include_router(openai_routes, dependencies=user)
    app.include_router(ops.router)
    for admin_routes in (admin_targets.router, admin_jobs.router, admin_checkpoints.router):
        app.include_router(admin_routes)
    docs.install(app, settings)
    app.add_middleware(ServingLeases)
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_body_bytes, max_admin_bytes=settings.max_admin_body_bytes
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
