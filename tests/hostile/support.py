"""What the hostile-input tests share: the real app on the tiny random model (in-process, or under a
real uvicorn in a thread), and an engine that fails on demand."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI

from lethe.gateway.api.app import create_app
from lethe.gateway.cli.serve import uvicorn_options
from lethe.gateway.config import Settings
from lethe.models.engine import GenerationOutput, GenerationRequest
from lethe.models.engines.hf_engine import TransformersEngine

ADMIN_KEY = "admin-secret"
USER_KEY = "user-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
USER = {"Authorization": f"Bearer {USER_KEY}"}

Failure = Literal["none", "at_once", "mid_stream", "unsendable_text"]


class FailingEngine(TransformersEngine):
    """The transformers engine, failing as `failure` says: `at_once` (a plain RuntimeError before
    any output), `mid_stream` (a plain RuntimeError after the first output), `unsendable_text` (an
    output whose text holds a lone surrogate, which cannot be encoded)."""

    failure: Failure = "none"

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if self.failure == "at_once":
            raise RuntimeError("the engine broke")
        async for output in super().generate(request):
            if self.failure == "unsendable_text":
                yield replace(output, text="\ud800")
                return
            yield output
            if self.failure == "mid_stream":
                raise RuntimeError("the engine broke")


def settings(home: Path, **values: Any) -> Settings:
    return Settings(home=home, api_keys=USER_KEY, admin_key=ADMIN_KEY, **values)


def build_app(home: Path, model: Path, engine: TransformersEngine | None = None, **values: Any) -> FastAPI:
    return create_app(settings(home, **values), engine=engine or TransformersEngine(model))


@contextmanager
def uvicorn_server(app: FastAPI, config: Settings) -> Iterator[int]:
    """`app` under a real uvicorn, in a thread, with the options `lethe serve` uses; yields its port."""
    options = {**uvicorn_options(config), "host": "127.0.0.1", "port": 0, "log_level": "warning"}
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
