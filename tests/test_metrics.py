"""`/metrics` exposes what an operator alerts on, labelled by route template and status."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.server import LiveServer

pytestmark = pytest.mark.e2e


def samples(server: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.root_url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_requests_latency_ttft_and_tokens_are_counted(live_server: LiveServer) -> None:
    before = samples(live_server)
    body = {
        "model": live_server.model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "ignore_eos": True,
    }
    assert (
        httpx.post(
            f"{live_server.base_url}/chat/completions", json=body, headers=live_server.headers()
        ).status_code
        == 200
    )
    httpx.post(
        f"{live_server.base_url}/chat/completions",
        json={**body, "temperature": 9},
        headers=live_server.headers(),
    )
    after = samples(live_server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    route = "/v1/chat/completions"
    assert delta("lethe_requests_total", route=route, status="200") == 1
    assert delta("lethe_requests_total", route=route, status="400") == 1
    assert delta("lethe_request_duration_seconds_count", route=route) == 2
    assert delta("lethe_time_to_first_token_seconds_count", route=route) == 1
    assert delta("lethe_generated_tokens_total") == 5
    assert after[("lethe_requests_in_flight", ())] == 0
    assert after[("lethe_engine_up", ())] == 1
