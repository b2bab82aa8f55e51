"""The per-target sweep's verdict: forget recall at most half, neighbour recall at least 90%."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bench.unlearning_per_target import mean_row, row
from lethe.gateway.jobs.evaluation import BeforeAfter, Evaluation, EvaluationOptions, Snapshot
from lethe.models.checkpoints import CheckpointManifest


def _manifest(forget: tuple[float, float], neighbour: tuple[float, float]) -> CheckpointManifest:
    before = Snapshot(forget_recall=forget[0], neighbour_recall=neighbour[0])
    after = Snapshot(forget_recall=forget[1], neighbour_recall=neighbour[1])
    evaluation = Evaluation(
        targets={"Ada Lovelace": BeforeAfter(before=before, after=after)},
        mean=BeforeAfter(before=before, after=after),
        utility_recall={"before": 0.5, "after": 0.4},
        probes=40,
        mia_texts=0,
        seconds=1.0,
        options=EvaluationOptions(),
    )
    return CheckpointManifest(
        id="ckpt-a",
        parent=None,
        parent_hash="0" * 64,
        method="flat",
        params={},
        targets=["Ada Lovelace"],
        forget_hash="f" * 64,
        retain_hash="r" * 64,
        created=datetime.now(UTC),
        timings={"method": 75.0},
        evaluation=evaluation.model_dump(mode="json"),
    )


@pytest.mark.parametrize(
    ("forget", "neighbour", "meets"),
    [
        ((0.2, 0.1), (0.4, 0.36), True),  # exactly half and exactly 90%
        ((0.2, 0.11), (0.4, 0.4), False),  # forgot less than half
        ((0.2, 0.0), (0.4, 0.3596), False),  # kept 89.9% of the neighbours
        ((0.2, 0.0), (0.0, 0.0), None),  # no neighbour baseline: no verdict
    ],
)
def test_goal_verdict(
    forget: tuple[float, float], neighbour: tuple[float, float], meets: bool | None
) -> None:
    line, _, verdict = row("flat", _manifest(forget, neighbour))
    assert verdict is meets
    assert line.endswith({True: "| yes |", False: "| no |", None: "| - |"}[meets])
    assert "0.50 -> 0.40" in line  # TOFU utility


def test_mean_row_judges_the_means_and_counts_targets_alone() -> None:
    # One target forgets everything but loses its neighbours, the other keeps all and forgets
    # nothing: means 0.2 -> 0.06 (-70%) and 0.4 -> 0.36 (90%) meet the goal, neither target does.
    manifests = [_manifest((0.2, 0.0), (0.4, 0.32)), _manifest((0.2, 0.12), (0.4, 0.4))]
    results = [row("flat", m) for m in manifests]
    line = mean_row("flat", [r for _, r, _ in results], [v for *_, v in results])
    assert "0.200 -> 0.060 (-70%)" in line
    assert "0.400 -> 0.360 (90.0%)" in line
    assert line.endswith("| yes; 0 of 2 alone |")


def test_a_checkpoint_without_evaluation_is_refused() -> None:
    manifest = _manifest((0.2, 0.1), (0.4, 0.4)).model_copy(update={"evaluation": None})
    with pytest.raises(SystemExit, match="--no-eval"):
        row("flat", manifest)
