"""The serving context: what a request handler needs, swapped as a whole when other weights are
promoted (gateway/runtime/switcher.py), so a request finishes on the engine it began on."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from lethe.gateway.config import Settings
from lethe.gateway.runtime.guard_runtime import GuardRuntime
from lethe.gateway.runtime.telemetry import Metrics
from lethe.gateway.store import Store
from lethe.models.engine import Engine


def _idle() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


@dataclass
class Lease:
    """How many HTTP requests are being served on one engine; a replaced engine is shut down only
    once its count has fallen to zero (`idle` is set then)."""

    active: int = 0
    idle: asyncio.Event = field(default_factory=_idle)

    def acquire(self) -> None:
        self.active += 1
        self.idle.clear()

    def release(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.idle.set()


@dataclass
class ServingContext:
    """Everything a request handler needs. Built in the app's lifespan and replaced as a whole when
    other weights are promoted: a request keeps the context it started with (see
    gateway/runtime/switcher.py), so it finishes on the engine it began on."""

    engine: Engine
    settings: Settings
    metrics: Metrics
    model_name: str
    created: int
    guard: GuardRuntime | None = None
    store: Store | None = None
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    checkpoint: str = "base"
    """The checkpoint `engine` serves (`base`: the model the gateway was started on)."""
    lease: Lease = field(default_factory=Lease)
