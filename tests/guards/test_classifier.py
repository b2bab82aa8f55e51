"""The GUARD classifier's logistic regression: scikit-learn's fit gives the weights of the Newton
solver it replaced, so the detector's calibration and its `classifier_threshold` do not move."""

from __future__ import annotations

import numpy as np
import pytest

from lethe.guards.classifier import LinearHead, probabilities, train_head
from lethe.guards.config import DetectionConfig


def newton_reference(positives: np.ndarray, negatives: np.ndarray, l2: float) -> LinearHead:
    """The hand-written solver `train_head` used before scikit-learn (kept here as the reference):
    class-balanced log-loss plus `l2 / 2 * |w|^2`, intercept unpenalised, Newton's method."""
    features = np.concatenate([positives, negatives]).astype(np.float64)
    features = np.hstack([features, np.ones((len(features), 1))])
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    sample_weights = np.where(
        labels == 1, len(labels) / (2 * len(positives)), len(labels) / (2 * len(negatives))
    )
    penalty = np.full(features.shape[1], l2)
    penalty[-1] = 0.0
    beta = np.zeros(features.shape[1])
    for _ in range(25):
        scores = 1.0 / (1.0 + np.exp(-(features @ beta)))
        gradient = features.T @ (sample_weights * (scores - labels)) + penalty * beta
        curvature = sample_weights * scores * (1.0 - scores)
        hessian = (features.T * curvature) @ features + np.diag(penalty) + 1e-9 * np.eye(len(beta))
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if np.abs(step).max() < 1e-6:
            break
    return LinearHead(weights=beta[:-1].astype(np.float32), bias=float(beta[-1]))


def problem(seed: int, positives: int, negatives: int, dimension: int = 384):
    """Unit vectors like MiniLM's: a handful of examples around one direction against many neutral
    prompts in random directions (linearly separable in 384 dimensions, as the real sets are), and
    queries near the examples, far from them and in between (some on each side of the threshold)."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(dimension)
    centre /= np.linalg.norm(centre)

    def rows(count: int, towards: float) -> np.ndarray:
        vectors = rng.standard_normal((count, dimension)) / np.sqrt(dimension) * 0.6 + towards * centre
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    queries = np.concatenate([rows(100, 1.0), rows(100, 0.0), rows(100, 0.5)])
    return rows(positives, 1.0), rows(negatives, 0.0), queries


@pytest.mark.parametrize(
    ("seed", "positives", "negatives", "l2"),
    [(0, 10, 130, 1.0), (1, 4, 130, 1.0), (2, 40, 130, 0.1), (3, 6, 60, 0.3)],
)
def test_scikit_learn_gives_the_newton_weights(seed: int, positives: int, negatives: int, l2: float) -> None:
    pos, neg, queries = problem(seed, positives, negatives)
    old = newton_reference(pos, neg, l2)
    new = train_head(pos, neg, l2)
    assert new.weights.dtype == np.float32 and new.weights.shape == old.weights.shape
    np.testing.assert_allclose(new.weights, old.weights, atol=1e-4)
    assert new.bias == pytest.approx(old.bias, abs=1e-4)

    old_p = probabilities(queries, old.weights[None, :], np.array([old.bias]))
    new_p = probabilities(queries, new.weights[None, :], np.array([new.bias]))
    np.testing.assert_allclose(new_p, old_p, atol=1e-4)
    threshold = DetectionConfig().classifier_threshold
    assert ((new_p >= threshold) == (old_p >= threshold)).all()
    assert (old_p >= threshold).any() and (old_p < threshold).any()


def test_the_default_penalty_and_threshold_are_unchanged() -> None:
    config = DetectionConfig()
    assert config.classifier_l2 == 1.0
    assert config.classifier_threshold == 0.70


def test_importing_the_detector_does_not_import_scikit_learn() -> None:
    import subprocess
    import sys

    code = "import sys, lethe.guards.detection; print('sklearn' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
