"""The one watcher of the store in a gateway: it notices what other processes changed (targets
registered through another replica, a checkpoint promoted elsewhere) and tells the parts that
follow it.

Both things it reads are cheap (the targets' revision counter and the serving-checkpoint row), so
one poll serves every listener; each listener compares the value with what it already holds and
does nothing when they agree. A write made through this gateway's own admin API calls `check()`
and awaits it, so the next request is served under the change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from lethe.gateway.store import ServingCheckpoint, Store

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
"""How often a replica looks for changes made elsewhere."""

TargetsListener = Callable[[int], Awaitable[None]]
"""Called with the store's targets revision."""
ServingListener = Callable[[ServingCheckpoint], Awaitable[None]]
"""Called with the checkpoint the store names as serving."""


class StoreWatcher:
    def __init__(self, store: Store, *, interval: float = POLL_SECONDS) -> None:
        self._store = store
        self._interval = interval
        self._targets: list[TargetsListener] = []
        self._serving: list[ServingListener] = []
        self._task: asyncio.Task[None] | None = None

    def on_targets(self, listener: TargetsListener) -> None:
        self._targets.append(listener)

    def on_serving(self, listener: ServingListener) -> None:
        self._serving.append(listener)

    async def check(self) -> None:
        """Read the store once and await every listener; a listener's failure propagates."""
        revision = await asyncio.to_thread(self._store.revision)
        for targets in self._targets:
            await targets(revision)
        if self._serving:
            serving = await asyncio.to_thread(self._store.serving_checkpoint)
            for listener in self._serving:
                await listener(serving)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except Exception:  # keep serving what we serve; the next poll tries again
                logger.exception("following the store failed")
