"""How long-running weight edits report progress and learn that they must stop.

A method calls `step(fraction, message)` between units of work; the caller's callback may raise
`UnlearnCancelled`, which unwinds the method before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable

StepCallback = Callable[[float, str], None]
"""`step(fraction_done_in_[0,1], message)`."""


class UnlearnCancelled(Exception):
    """The job was cancelled; nothing was written."""


def no_progress(_fraction: float, _message: str) -> None:
    """A `StepCallback` for callers that do not watch."""


def sub_step(step: StepCallback, start: float, end: float) -> StepCallback:
    """A callback that maps a stage's own [0,1] onto [start, end] of the whole job."""

    def report(fraction: float, message: str) -> None:
        step(start + (end - start) * min(max(fraction, 0.0), 1.0), message)

    return report
