"""Run functions a `lethe worker` subprocess can be pointed at (`--runner tests.jobs.runners:...`)."""

from __future__ import annotations

from typing import Any

from lethe.gateway.jobs.evaluation import EvaluationOptions
from lethe.gateway.jobs.runner import run_unlearning


def without_evaluation(spec: Any, **kwargs: Any) -> Any:
    """The real run_unlearning, minus the before/after evaluation (seconds instead of ~15 s on the
    tiny model); it trains and writes a real checkpoint."""
    return run_unlearning(spec, evaluation=EvaluationOptions(enabled=False), **kwargs)
