"""Which weights serve: promote and roll back checkpoints without dropping a request, and follow the
serving checkpoint that other replicas set in the store.

A request is served by the `ServingContext` that was current when it arrived: `ServingLeases`
(ASGI middleware, gateway/api/leases.py) pins it into the request's scope and counts it on that
context's lease. A switch loads the new checkpoint into a new engine (and a guard runtime compiled
for it) next to the running one, records the change in the store, then replaces the context in one
assignment. Requests already in flight finish on the old engine; the old engine is shut
down once the old lease has drained (or after LETHE_DRAIN_TIMEOUT_SECONDS). Nothing is ever
rejected for a switch: a request sees either the old context or the new one.

Ordering of a promote: load first, then write the store (compare-and-set on the checkpoint that
was serving when the promote began), then swap. A checkpoint that does not load is refused before
any replica is told about it; two promotes racing on different replicas cannot both win.

An engine that dies while serving (its process killed, out of memory, a native fault) is noticed
within WATCH_SECONDS: requests in flight on it have already failed with a 503, /healthz answers
503 until a new engine on the same checkpoint has started, and the switcher swaps it in as for a
promote, without touching the store (`lethe_engine_restarts_total`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from lethe.gateway.config import Settings
from lethe.gateway.runtime.context import Lease, ServingContext
from lethe.gateway.runtime.guard_runtime import GuardRuntime
from lethe.gateway.runtime.telemetry import Metrics
from lethe.gateway.store import BASE_CHECKPOINT, ServingAction, ServingCheckpoint, Store
from lethe.models.engine import Engine

logger = logging.getLogger(__name__)

EngineFactory = Callable[[Path, str], Engine]
"""Builds an (unstarted) engine on a model folder, serving under the given model name."""
GuardFactory = Callable[[Engine], GuardRuntime]

RETRY_SECONDS = 30.0
"""After failing to load a checkpoint promoted elsewhere, wait this long before trying again."""
WATCH_SECONDS = 0.25
"""How often the serving engine's health is read."""
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits between failed attempts to restart a dead engine (the last one repeats)."""


class CheckpointCatalog(Protocol):
    """What the gateway needs of the checkpoint store (models/checkpoints.py: CheckpointStore)."""

    def list(self) -> list[Any]: ...

    def get(self, checkpoint_id: str) -> Any:
        """The manifest; raises KeyError when there is no such checkpoint."""

    def path(self, checkpoint_id: str) -> Path: ...


def checkpoint_catalog(home: Path) -> CheckpointCatalog:
    """The checkpoints unlearning jobs write, under LETHE_HOME/checkpoints."""
    from lethe.models.checkpoints import CheckpointStore

    return CheckpointStore(home / "checkpoints")


class CheckpointNotFound(LookupError):
    def __init__(self, checkpoint_id: str) -> None:
        super().__init__(f"No checkpoint with id '{checkpoint_id}'.")


class CheckpointLoadFailed(RuntimeError):
    def __init__(self, checkpoint_id: str, error: BaseException) -> None:
        super().__init__(f"Checkpoint '{checkpoint_id}' could not be loaded: {type(error).__name__}: {error}")


class ModelSwitcher:
    """Owns the serving context of one app: builds it at start, swaps it on promote/rollback or when
    the store says another replica switched, and retires replaced engines once drained."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        metrics: Metrics,
        base_path: Path,
        model_name: str,
        build_engine: EngineFactory,
        build_guard: GuardFactory,
        catalog: Callable[[], CheckpointCatalog],
    ) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics
        self._base_path = base_path
        self._model_name = model_name
        self._build_engine = build_engine
        self._build_guard = build_guard
        self._catalog_factory = catalog
        self._catalog: CheckpointCatalog | None = None
        self._drain_timeout = settings.drain_timeout_seconds
        self._current: ServingContext | None = None
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._seen_revision = -1
        self._failed: tuple[str, float] | None = None
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def current(self) -> ServingContext:
        """The context a request arriving now is served by."""
        if self._current is None:
            raise RuntimeError("the switcher has not started")
        return self._current

    def _context(self, engine: Engine, guard: GuardRuntime, checkpoint: str) -> ServingContext:
        if self._current is not None:
            return replaced(self._current, engine, guard, checkpoint)
        return ServingContext(
            engine=engine,
            settings=self._settings,
            metrics=self._metrics,
            model_name=self._model_name,
            created=int(time.time()),
            guard=guard,
            store=self._store,
            checkpoint=checkpoint,
        )

    # ------------------------------------------------------------------ lifecycle
    async def start(self, base_engine: Engine | None = None) -> None:
        """Serve what the store names (the base model until something is promoted)."""
        serving = await asyncio.to_thread(self._store.serving_checkpoint)
        self._seen_revision = serving.revision
        if serving.checkpoint == BASE_CHECKPOINT and base_engine is not None:
            engine = base_engine
        else:
            path = await asyncio.to_thread(self.resolve, serving.checkpoint)
            engine = self._build_engine(path, self._model_name)
        started = time.perf_counter()
        await engine.start()
        try:
            guard = self._build_guard(engine)
            await guard.start()
        except BaseException:
            await engine.shutdown()
            raise
        logger.info(
            "engine ready: %s (checkpoint %s) in %.1f s",
            engine.model_name,
            serving.checkpoint,
            time.perf_counter() - started,
        )
        self._publish(self._context(engine, guard, serving.checkpoint))
        self._watchdog = asyncio.create_task(self._watch(), name="lethe-engine-watchdog")

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        async with self._lock:
            for task in list(self._retiring):
                task.cancel()
            await asyncio.gather(*self._retiring, return_exceptions=True)
            if self._current is not None:
                await self._shutdown(self._current)

    # ------------------------------------------------------------------ checkpoints
    def catalog(self) -> CheckpointCatalog:
        if self._catalog is None:
            self._catalog = self._catalog_factory()
        return self._catalog

    def resolve(self, checkpoint_id: str) -> Path:
        """The model folder of a checkpoint id (`base`: the model the gateway was started on)."""
        if checkpoint_id == BASE_CHECKPOINT:
            return self._base_path
        catalog = self.catalog()
        try:
            catalog.get(checkpoint_id)
        except KeyError as error:
            raise CheckpointNotFound(checkpoint_id) from error
        return catalog.path(checkpoint_id)

    # ------------------------------------------------------------------ switching
    async def promote(self, checkpoint_id: str) -> ServingCheckpoint:
        async with self._lock:
            current = await asyncio.to_thread(self._store.serving_checkpoint)
            return await self._switch(checkpoint_id, "promote", expected=current.checkpoint)

    async def rollback(self, checkpoint_id: str) -> ServingCheckpoint:
        """Back to what served before `checkpoint_id` was last promoted (store refusals propagate)."""
        async with self._lock:
            target = await asyncio.to_thread(self._store.rollback_target, checkpoint_id)
            return await self._switch(target, "rollback", expected=checkpoint_id)

    async def _switch(self, checkpoint_id: str, action: ServingAction, expected: str) -> ServingCheckpoint:
        ctx = self.current
        path = await asyncio.to_thread(self.resolve, checkpoint_id)
        if ctx.checkpoint == checkpoint_id:  # already serving it here: only the store may lag
            serving = await self._record(checkpoint_id, action, expected)
            self._seen_revision = serving.revision
            return serving
        engine, guard = await self._load(checkpoint_id, path)
        try:
            serving = await self._record(checkpoint_id, action, expected)
        except BaseException:
            await engine.shutdown()
            raise
        self._seen_revision = serving.revision
        self._swap(engine, guard, checkpoint_id, action)
        return serving

    async def _record(self, checkpoint_id: str, action: ServingAction, expected: str) -> ServingCheckpoint:
        return await asyncio.to_thread(self._store.set_serving_checkpoint, checkpoint_id, action, expected)

    async def _load(self, checkpoint_id: str, path: Path) -> tuple[Engine, GuardRuntime]:
        started = time.perf_counter()
        engine = self._build_engine(path, self._model_name)
        try:
            await engine.start()
            guard = self._build_guard(engine)
            await guard.start()
        except Exception as error:
            self._metrics.checkpoint_switches.labels("load", "error").inc()
            with contextlib.suppress(Exception):
                await engine.shutdown()
            logger.exception("checkpoint %s failed to load from %s", checkpoint_id, path)
            raise CheckpointLoadFailed(checkpoint_id, error) from error
        logger.info("checkpoint %s loaded in %.1f s", checkpoint_id, time.perf_counter() - started)
        return engine, guard

    def _swap(self, engine: Engine, guard: GuardRuntime, checkpoint_id: str, action: str) -> None:
        """Synchronous on purpose: no request can observe a half-made switch."""
        old = self.current
        self._publish(self._context(engine, guard, checkpoint_id))
        self._metrics.checkpoint_switches.labels(action, "ok").inc()
        logger.info("now serving checkpoint %s (was %s)", checkpoint_id, old.checkpoint)
        task = asyncio.create_task(self._retire(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _publish(self, ctx: ServingContext) -> None:
        self._current = ctx
        self._metrics.watch_engine(ctx.engine)
        self._metrics.serve_checkpoint(ctx.checkpoint)

    async def _retire(self, old: ServingContext) -> None:
        """Shut the replaced engine down once no request holds it any more."""
        try:
            await asyncio.wait_for(old.lease.idle.wait(), self._drain_timeout)
        except TimeoutError:
            logger.warning(
                "checkpoint %s: %d requests still in flight after %.0f s; shutting its engine down",
                old.checkpoint,
                old.lease.active,
                self._drain_timeout,
            )
        await self._shutdown(old)
        logger.info("retired the engine of checkpoint %s", old.checkpoint)

    async def _shutdown(self, ctx: ServingContext) -> None:
        await ctx.engine.shutdown()

    # ------------------------------------------------------------------ engine crashes
    async def _watch(self) -> None:
        """Restart the serving engine whenever it is found dead (backing off while restarts fail)."""
        failures = 0
        while True:
            delay = WATCH_SECONDS
            if failures:
                delay = RESTART_BACKOFF_SECONDS[min(failures, len(RESTART_BACKOFF_SECONDS)) - 1]
            await asyncio.sleep(delay)
            ctx = self._current
            if ctx is None or ctx.engine.is_healthy():
                failures = 0
                continue
            try:
                await self._restart(ctx)
                failures = 0
            except Exception:
                failures += 1
                self._metrics.engine_restarts.labels("error").inc()
                logger.exception(
                    "restarting the engine of checkpoint %s failed (attempt %d)", ctx.checkpoint, failures
                )

    async def _restart(self, dead: ServingContext) -> None:
        async with self._lock:
            if self._current is not dead or dead.engine.is_healthy():
                return  # replaced by a promote meanwhile, or it recovered
            logger.error("the engine serving checkpoint %s is down: starting a new one", dead.checkpoint)
            started = time.perf_counter()
            path = await asyncio.to_thread(self.resolve, dead.checkpoint)
            engine = self._build_engine(path, self._model_name)
            try:
                await engine.start()
                guard = self._build_guard(engine)
                await guard.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await engine.shutdown()
                raise
            self._publish(self._context(engine, guard, dead.checkpoint))
            self._metrics.engine_restarts.labels("ok").inc()
            logger.info(
                "engine restarted on checkpoint %s in %.1f s", dead.checkpoint, time.perf_counter() - started
            )
            task = asyncio.create_task(self._retire(dead))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    # ------------------------------------------------------------------ following other replicas
    async def follow(self, serving: ServingCheckpoint) -> None:
        """Serve what the store names (gateway/runtime/store_watcher.py calls this on every poll)."""
        ctx = self.current
        self._metrics.checkpoint_behind.set(0 if serving.checkpoint == ctx.checkpoint else 1)
        if serving.revision == self._seen_revision:
            return
        async with self._lock:
            ctx = self.current
            serving = await asyncio.to_thread(self._store.serving_checkpoint)
            if serving.checkpoint == ctx.checkpoint:
                self._seen_revision = serving.revision
                self._metrics.checkpoint_behind.set(0)
                return
            if (
                self._failed is not None
                and self._failed[0] == serving.checkpoint
                and time.monotonic() < self._failed[1]
            ):
                return
            logger.info("checkpoint %s was made serving elsewhere: loading it", serving.checkpoint)
            try:
                path = await asyncio.to_thread(self.resolve, serving.checkpoint)
                engine, guard = await self._load(serving.checkpoint, path)
            except Exception:
                self._failed = (serving.checkpoint, time.monotonic() + RETRY_SECONDS)
                logger.exception(
                    "cannot follow to checkpoint %s; still serving %s", serving.checkpoint, ctx.checkpoint
                )
                return
            self._failed = None
            self._seen_revision = serving.revision
            self._swap(engine, guard, serving.checkpoint, "follow")
            self._metrics.checkpoint_behind.set(0)


def replaced(ctx: ServingContext, engine: Engine, guard: GuardRuntime, checkpoint_id: str) -> ServingContext:
    """A copy of `ctx` serving `engine` (with a fresh lease); everything else is shared."""
    return replace(
        ctx, engine=engine, guard=guard, checkpoint=checkpoint_id, lease=Lease(), created=int(time.time())
    )
