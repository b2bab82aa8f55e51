"""FLAT's f-divergence losses against hand computation, and the direction they push."""

from __future__ import annotations

import math

import pytest
import torch

from lethe.models.unlearning.divergences import flat_loss


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize(
    ("divergence", "expected"),
    [
        # -g(P_template) + f*(g(P_forget)) with P_template = 0.3, P_forget = 0.6
        ("tv", -math.tanh(0.3) / 2 + math.tanh(0.6) / 2),
        ("kl", -0.3 + math.exp(0.6 - 1)),
        ("js", -(math.log(2) - _softplus(-0.3)) + _softplus(0.6) - math.log(2)),
        ("pearson", -0.3 + 0.6**2 / 4 + 0.6),
    ],
)
def test_loss_matches_hand_computation(divergence: str, expected: float) -> None:
    loss = flat_loss(torch.tensor(0.3), torch.tensor(0.6), divergence)  # type: ignore[arg-type]
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_batches_are_averaged_before_the_activation() -> None:
    batch = flat_loss(torch.tensor([0.1, 0.5]), torch.tensor([0.2, 1.0]), "kl")
    assert float(batch) == pytest.approx(-0.3 + math.exp(0.6 - 1), abs=1e-6)


@pytest.mark.parametrize("divergence", ["tv", "kl", "js", "pearson"])
def test_descent_raises_template_and_lowers_forget_probability(divergence: str) -> None:
    template = torch.tensor([0.2, 0.4], requires_grad=True)
    forget = torch.tensor([0.7, 0.5], requires_grad=True)
    flat_loss(template, forget, divergence).backward()  # type: ignore[arg-type]
    assert (template.grad < 0).all() and (forget.grad > 0).all()
