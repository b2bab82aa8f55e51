"""Prometheus metrics an operator can alert on: traffic, errors, latency, first-token time, load,
unlearning jobs and the serving checkpoint."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator.metrics import Info
from prometheus_fastapi_instrumentator.middleware import PrometheusInstrumentatorMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from lethe.models.engine import Engine

if TYPE_CHECKING:
    from lethe.gateway.runtime.sae_service import SAECard
    from lethe.gateway.store import JobStats

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_METRICS_PATH = "/metrics"
_METRICS_PATH_PATTERN = "^/metrics$"


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
        self.engine_restarts = Counter(
            "lethe_engine_restarts",
            "Restarts of a serving engine that died (its process crashed or was killed), by result ok/error.",
            ["result"],
            registry=self.registry,
        )

        self.jobs = Gauge(
            "lethe_jobs", "Unlearning jobs in the store, by state.", ["state"], registry=self.registry
        )
        self.job_heartbeat_age = Gauge(
            "lethe_job_heartbeat_age_seconds",
            "Seconds since the stalest running job's worker last reported (0 when none runs).",
            registry=self.registry,
        )
        self._job_failures = _JobFailures()
        self.registry.register(self._job_failures)
        self.serving_checkpoint = Gauge(
            "lethe_serving_checkpoint_info",
            "1 for the checkpoint this replica serves ('base': the model it was started on).",
            ["checkpoint"],
            registry=self.registry,
        )
        self.checkpoint_switches = Counter(
            "lethe_checkpoint_switches",
            "Changes of the serving weights on this replica: action promote/rollback/follow (or load) and "
            "result ok/error.",
            ["action", "result"],
            registry=self.registry,
        )
        self.sae = Gauge(
            "lethe_sae_info",
            "1 for the SAE this replica serves (LETHE_SAE), with its layer and number of features.",
            ["name", "fingerprint", "layer", "features"],
            registry=self.registry,
        )
        self.sae_clamped = Counter(
            "lethe_sae_clamped_sequences",
            "Sequences generated with fired targets' SAE features clamped.",
            registry=self.registry,
        )
        self.checkpoint_behind = Gauge(
            "lethe_serving_checkpoint_behind",
            "1 while this replica serves another checkpoint than the one the store names (it could not "
            "load the promoted one).",
            registry=self.registry,
        )

    def serve_checkpoint(self, checkpoint_id: str) -> None:
        self.serving_checkpoint.clear()
        self.serving_checkpoint.labels(checkpoint_id).set(1)

    def serve_sae(self, card: SAECard) -> None:
        self.sae.labels(card.name, card.fingerprint, str(card.layer), str(card.features)).set(1)

    def observe_jobs(self, stats: JobStats) -> None:
        """Set the job metrics from the store's counts (called at scrape time, off the event loop)."""
        for state, count in stats.counts.items():
            self.jobs.labels(state).set(count)
        self._job_failures.value = stats.counts.get("failed", 0)
        age = 0.0
        if stats.oldest_heartbeat is not None:
            age = max(0.0, (datetime.now(UTC) - stats.oldest_heartbeat).total_seconds())
        self.job_heartbeat_age.set(age)

    def watch_engine(self, engine: Engine) -> None:
        """Read engine state at scrape time rather than mirroring it on every step."""
        self.engine_up.set_function(lambda: 1.0 if engine.is_healthy() else 0.0)
        self.running.set_function(lambda: float(engine.load()[0]))
        self.waiting.set_function(lambda: float(engine.load()[1]))


class _JobFailures(Collector):
    """`lethe_job_failures_total`: failed jobs as counted in the store (jobs are never deleted, so the
    count only grows and every replica reports the same), for `increase()` alerts."""

    def __init__(self) -> None:
        self.value = 0

    def collect(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily("lethe_job_failures", "Unlearning jobs that failed.", value=self.value)]


def route_of(scope: Scope) -> str:
    """The route template (`/v1/chat/completions`), never the raw path, to keep label cardinality
    bounded. FastAPI records the route it ran in the scope the middleware shares with it."""
    route = scope.get("route")
    return getattr(route, "path", "unmatched")


class MetricsMiddleware(PrometheusInstrumentatorMiddleware):
    """prometheus-fastapi-instrumentator's pure ASGI middleware (no BaseHTTPMiddleware, no body
    buffering: it only watches `http.response.start` for the status, so streaming and the
    disconnect messages that cancel a generation pass through untouched), feeding our metrics.

    * `lethe_requests_total{route,status}` and `lethe_request_duration_seconds{route}`: one
      instrumentation function per request, run when the app has sent the last byte (the library's
      duration runs to the end of the response, streamed or not); exact status codes, not `2xx`.
    * `lethe_requests_in_flight`: kept here, because the library's in-progress gauge always goes to
      prometheus_client's global registry, and each app has its own (several apps in one process,
      in tests, must not collide).
    * `/metrics` itself is neither counted nor in flight, as before.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        super().__init__(
            app,
            should_group_status_codes=False,
            should_group_untemplated=True,
            excluded_handlers=[_METRICS_PATH_PATTERN],
            instrumentations=[self._observe],
            registry=metrics.registry,
        )
        self.metrics = metrics

    def _observe(self, info: Info) -> None:
        # The route FastAPI ran. The library's own `modified_handler` (matched against the route table
        # before the request runs) agrees on every route (tests/test_metrics.py), but names unmatched
        # paths `none`; this keeps their label `unmatched`.
        route = route_of(info.request.scope)
        self.metrics.requests.labels(route, info.modified_status).inc()
        self.metrics.latency.labels(route).observe(info.modified_duration)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == _METRICS_PATH:
            await super().__call__(scope, receive, send)
            return
        self.metrics.in_flight.inc()
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.metrics.in_flight.dec()
