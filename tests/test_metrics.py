"""`/metrics` exposes what an operator alerts on, labelled by route template and status: on a real
server, and in process for the HTTP middleware (prometheus-fastapi-instrumentator feeding our
metrics): streaming measured to the last byte and never buffered, `/metrics` not counted, the
route label the template, one registry per app."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.responses import PlainTextResponse, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_fastapi_instrumentator.routing import get_route_name
from starlette.requests import Request

from lethe.gateway.api import ops
from lethe.gateway.api.app import create_app
from lethe.gateway.config import Settings
from lethe.gateway.runtime.telemetry import Metrics, MetricsMiddleware
from tests.support.server import LiveServer


def samples(server: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.root_url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.e2e
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


def values(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class StreamProbe:
    """A streaming route that sends one chunk, then waits until the client has that chunk (a
    middleware that buffered the body would never deliver it: the test would time out), then
    sends the rest after a pause."""

    pause = 0.3

    def __init__(self) -> None:
        self.first_chunk_arrived = asyncio.Event()

    async def chunks(self) -> AsyncIterator[bytes]:
        yield b"first "
        await asyncio.wait_for(self.first_chunk_arrived.wait(), timeout=5)
        await asyncio.sleep(self.pause)
        yield b"last"


def small_app(metrics: Metrics, probe: StreamProbe) -> FastAPI:
    """Our middleware on a few routes shaped like the gateway's: a prefixed router, a path
    parameter, a stream, an error, and our own `/metrics`."""
    app = FastAPI()
    app.state.metrics = metrics
    api = APIRouter(prefix="/v1")

    @api.get("/items/{item_id}")
    async def item(item_id: str) -> PlainTextResponse:
        return PlainTextResponse(item_id, status_code=404 if item_id == "missing" else 200)

    @api.post("/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(probe.chunks(), media_type="text/event-stream")

    @api.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/metrics")
    async def exposition() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode())

    app.include_router(api)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


async def call(app: FastAPI, method: str, path: str, on_message: Any = None) -> list[dict[str, Any]]:
    """One request straight through the ASGI app, recording what it sends and when."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    sent: list[dict[str, Any]] = []
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append({**message, "at": time.perf_counter()})
        if on_message is not None:
            on_message(message)

    await app(scope, receive, send)
    return sent


def test_a_stream_is_passed_through_unbuffered_and_measured_to_its_last_byte() -> None:
    metrics = Metrics()
    probe = StreamProbe()
    app = small_app(metrics, probe)
    seen_in_flight: list[float] = []
    counted_before_the_end: list[float] = []

    def on_message(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body") == b"first ":
            seen_in_flight.append(values(metrics)[("lethe_requests_in_flight", ())])
            key = ("lethe_requests_total", (("route", "/v1/stream"), ("status", "200")))
            counted_before_the_end.append(values(metrics).get(key, 0.0))
            probe.first_chunk_arrived.set()

    async def run() -> tuple[float, list[dict[str, Any]]]:
        started = time.perf_counter()
        sent = await call(app, "POST", "/v1/stream", on_message)
        return started, sent

    started, sent = asyncio.run(run())
    bodies = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
    assert [m["body"] for m in bodies] == [b"first ", b"last"]
    assert bodies[1]["at"] - bodies[0]["at"] >= probe.pause
    assert seen_in_flight == [1.0] and counted_before_the_end == [0.0]

    after = values(metrics)
    assert after[("lethe_requests_total", (("route", "/v1/stream"), ("status", "200")))] == 1
    assert after[("lethe_request_duration_seconds_count", (("route", "/v1/stream"),))] == 1
    duration = after[("lethe_request_duration_seconds_sum", (("route", "/v1/stream"),))]
    assert probe.pause <= duration <= bodies[-1]["at"] - started + 0.05
    assert after[("lethe_requests_in_flight", ())] == 0


def test_routes_statuses_errors_and_metrics_itself() -> None:
    metrics = Metrics()
    app = small_app(metrics, StreamProbe())

    async def run() -> None:
        await call(app, "GET", "/v1/items/a")
        await call(app, "GET", "/v1/items/b")
        await call(app, "GET", "/v1/items/missing")
        await call(app, "GET", "/nowhere")
        with pytest.raises(RuntimeError):
            await call(app, "GET", "/v1/boom")
        await call(app, "GET", "/metrics")

    asyncio.run(run())
    counted = {
        labels: value for (name, labels), value in values(metrics).items() if name == "lethe_requests_total"
    }
    assert counted == {
        (("route", "/v1/items/{item_id}"), ("status", "200")): 2,
        (("route", "/v1/items/{item_id}"), ("status", "404")): 1,
        (("route", "unmatched"), ("status", "404")): 1,
        (("route", "/v1/boom"), ("status", "500")): 1,
    }
    assert values(metrics)[("lethe_requests_in_flight", ())] == 0


def test_each_app_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    apps = [small_app(first, StreamProbe()), small_app(second, StreamProbe())]

    async def run() -> None:
        for app in apps:
            await call(app, "GET", "/v1/items/a")
        await call(apps[0], "GET", "/v1/items/a")

    asyncio.run(run())
    key = ("lethe_requests_total", (("route", "/v1/items/{item_id}"), ("status", "200")))
    assert values(first)[key] == 2 and values(second)[key] == 1


def test_the_library_resolves_every_gateway_route_to_its_template(tmp_path: Path) -> None:
    """The route label comes from the route FastAPI ran; the library resolves the same template
    from the route table (it decides what to exclude, here `/metrics`), for every route."""
    app = create_app(Settings(home=tmp_path))
    assert app.user_middleware[0].cls is MetricsMiddleware  # outermost: sees every request
    assert any(route.path == "/metrics" for route in ops.router.routes)
    routes = {route.path: route.methods for route in app.routes if isinstance(route, APIRoute)}
    assert "/v1/chat/completions" in routes and "/admin/checkpoints/{checkpoint_id}/promote" in routes
    assert "/v1/models/{model_id:path}" in routes
    for template, methods in routes.items():
        concrete = re.sub(r"\{[^}]+\}", "some-id", template)
        for method in methods:
            scope = {"type": "http", "method": method, "path": concrete, "root_path": "", "app": app}
            assert get_route_name(Request(scope), should_include_root_path=False) == template
