"""Concurrent streams share decode steps; abandoned requests stop consuming the engine."""

from __future__ import annotations

import asyncio
import itertools
import re
import time

import httpx
import openai
import pytest

from tests.support.server import LiveServer

pytestmark = pytest.mark.e2e


def test_eight_concurrent_streams_complete_interleaved(embedded_server: LiveServer) -> None:
    client = openai.AsyncOpenAI(
        base_url=embedded_server.base_url, api_key=embedded_server.api_key, max_retries=0
    )
    arrivals: list[int] = []

    async def one(index: int) -> str:
        stream = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": f"Count from {index} to {index + 20}."}],
            max_tokens=24,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        finish = None
        async for chunk in stream:
            arrivals.append(index)
            finish = chunk.choices[0].finish_reason or finish
        return finish

    async def run() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(8)))

    assert asyncio.run(run()) == ["length"] * 8
    # Interleaved: while one stream is between its first and last chunk, others deliver chunks too.
    first, last = arrivals.index(0), len(arrivals) - 1 - arrivals[::-1].index(0)
    assert len(set(arrivals[first : last + 1])) > 1
    switches = sum(1 for a, b in itertools.pairwise(arrivals) if a != b)
    assert switches >= 8 * 5


def _running(server: LiveServer) -> float:
    text = httpx.get(f"{server.root_url}/metrics", timeout=10).text
    return float(re.search(r"^lethe_engine_running_sequences (\S+)$", text, re.M).group(1))


def _wait_idle(server: LiveServer) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _running(server) == 0:
            return True
        time.sleep(0.05)
    return False


def _long_request(server: LiveServer, stream: bool) -> dict[str, object]:
    return {
        "model": server.model,
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 1900,
        "ignore_eos": True,
        "stream": stream,
    }


def test_streaming_client_disconnect_cancels_generation(live_server: LiveServer) -> None:
    with httpx.stream(
        "POST",
        f"{live_server.base_url}/chat/completions",
        json=_long_request(live_server, stream=True),
        headers=live_server.headers(),
        timeout=30,
    ) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert _running(live_server) == 1
    assert _wait_idle(live_server)


def test_non_streaming_client_disconnect_cancels_generation(live_server: LiveServer) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{live_server.base_url}/chat/completions",
            json=_long_request(live_server, stream=False),
            headers=live_server.headers(),
            timeout=httpx.Timeout(30, read=0.5),
        )
    assert _wait_idle(live_server)
