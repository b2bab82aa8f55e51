"""Prometheus metrics an operator can alert on: traffic, errors, latency, first-token time, load."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.engine import Engine

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """One registry per app, so that several apps in one process (tests) keep separate counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lethe_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lethe_request_duration_seconds",
            "Time from request to the last byte of the response.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "lethe_time_to_first_token_seconds",
            "Time from request to the first generated token.",
            ["route"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "lethe_requests_in_flight", "Requests being served right now.", registry=self.registry
        )
        self.prompt_tokens = Counter(
            "lethe_prompt_tokens", "Prompt tokens processed.", registry=self.registry
        )
        self.generated_tokens = Counter("lethe_generated_tokens", "Tokens generated.", registry=self.registry)
        self.engine_up = Gauge("lethe_engine_up", "1 while the engine can serve.", registry=self.registry)
        self.running = Gauge(
            "lethe_engine_running_sequences", "Sequences in the running decode batch.", registry=self.registry
        )
        self.waiting = Gauge(
            "lethe_engine_waiting_sequences",
            "Sequences queued for admission to the batch.",
            registry=self.registry,
        )

    def watch_engine(self, engine: Engine) -> None:
        """Read engine state at scrape time rather than mirroring it on every step."""
        self.engine_up.set_function(lambda: 1.0 if engine.is_healthy() else 0.0)
        self.running.set_function(lambda: float(engine.load()[0]))
        self.waiting.set_function(lambda: float(engine.load()[1]))


def route_of(scope: Scope) -> str:
    """The route template (`/v1/chat/completions`), never the raw path, to keep label cardinality
    bounded. The router records the matched route in the scope it shares with us."""
    route = scope.get("route")
    return getattr(route, "path", "unmatched")


class MetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware): it must not get in the way of streaming or of
    the disconnect messages that cancel a generation."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        self.metrics.in_flight.inc()

        async def send_and_observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_observe)
        finally:
            self.metrics.in_flight.dec()
            route = route_of(scope)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
