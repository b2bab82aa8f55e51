"""`lethe serve --engine vllm` as a process: vLLM's engine core is a child process, and stopping the
gateway (SIGTERM, as an orchestrator does) must leave no process behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import openai
import pytest

from tests.support.engines import require_vllm
from tests.support.processes import alive, descendants
from tests.support.server import start_server

pytestmark = pytest.mark.e2e


def test_sigterm_stops_the_engine_core_too(tiny_model_dir: Path, tmp_path: Path) -> None:
    require_vllm()
    server = start_server(tiny_model_dir, tmp_path, tmp_path / "server.log", LETHE_ENGINE="vllm")
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
        reply = client.completions.create(model=server.model, prompt="Hello", max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens == 4
        children = descendants(server.process.pid)
        assert children, "vLLM's engine core should run as a child process"
        os.kill(server.process.pid, signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught as its exit status.
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "Application shutdown complete" in log
    # multiprocessing's resource tracker leaves by itself once its parent's pipe closes: allow it a moment.
    deadline = time.monotonic() + 15
    while [pid for pid in children if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if alive(pid)], log[-3000:]
