"""Crash isolation: the engine's child process killed mid-stream under a real `lethe serve`.

In-flight requests end with a 503 `engine_unavailable` (a stream with an error event, then
`[DONE]`), /healthz answers 503 while a new engine starts on the serving checkpoint, and the
gateway serves again, without a restart of its own, within the engine's start time plus 5 s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.server import LiveServer, start_server

pytestmark = pytest.mark.e2e

LONG = 1900
"""Tokens to ask for: still generating when the engine is killed (the tiny model's context is 2048)."""


def engine_child(server: LiveServer) -> int:
    """The pid of the newest engine process, as the gateway logs it when the engine is ready."""
    found = re.findall(r"engine process (\d+) serving", server.log.read_text())
    assert found, server.log.read_text()[-2000:]
    return int(found[-1])


def chat(server: LiveServer, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": server.model,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


def start_seconds(log: Path) -> float:
    found = re.search(r"engine ready: .* in ([\d.]+) s", log.read_text())
    assert found, log.read_text()[-2000:]
    return float(found.group(1))


def test_killed_engine_fails_requests_and_restarts(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(tiny_model_dir, tmp_path, tmp_path / "serve.log", LETHE_ENGINE_PROCESS="true")
    try:
        first_pid = engine_child(server)
        blocking: dict[str, httpx.Response] = {}

        def non_streaming() -> None:
            blocking["response"] = httpx.post(
                f"{server.base_url}/chat/completions",
                json=chat(server, LONG, stream=False),
                headers=server.headers(),
                timeout=60,
            )

        waiter = threading.Thread(target=non_streaming)
        waiter.start()
        time.sleep(0.3)  # the non-streaming request is decoding when the engine dies, too
        events: list[str] = []
        with httpx.stream(
            "POST",
            f"{server.base_url}/chat/completions",
            json=chat(server, LONG, stream=True),
            headers=server.headers(),
            timeout=30,
        ) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data:") and '"content":"' in line and '"content":""' not in line:
                    break
            os.kill(first_pid, signal.SIGKILL)
            killed = time.monotonic()
            events = [line for line in lines if line.startswith("data:")]
        ended = time.monotonic() - killed
        health = httpx.get(f"{server.root_url}/healthz", timeout=5)
        assert health.status_code == 503, health.text

        # The stream ended at once, with an error event and then [DONE]; no hang.
        assert ended < 5, ended
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == "engine_unavailable", error
        waiter.join(30)
        assert blocking["response"].status_code == 503, blocking["response"].text
        assert blocking["response"].json()["error"]["code"] == "engine_unavailable"

        # Back without a gateway restart, on a new engine process.
        budget = start_seconds(server.log) + 5
        while True:
            response = httpx.post(
                f"{server.base_url}/chat/completions",
                json=chat(server, 4, stream=False),
                headers=server.headers(),
                timeout=30,
            )
            if response.status_code == 200:
                break
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "engine_unavailable"
            assert time.monotonic() - killed < budget, f"not back within {budget:.1f} s"
            time.sleep(0.2)
        back = time.monotonic() - killed
        assert back < budget, (back, budget)
        assert response.json()["choices"][0]["message"]["content"]
        assert httpx.get(f"{server.root_url}/healthz", timeout=5).status_code == 200
        assert server.process.poll() is None
        assert engine_child(server) != first_pid
        metrics = httpx.get(f"{server.root_url}/metrics", timeout=10).text
        assert 'lethe_engine_restarts_total{result="ok"} 1.0' in metrics
    finally:
        server.stop()
