"""The diagonal Fisher on a toy model whose gradient is known in closed form."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lethe.models.unlearning.data import LabelledSequence
from lethe.models.unlearning.fisher import diagonal_fisher


class BiasOnlyLM(torch.nn.Module):
    """Logits = one bias vector at every position, whatever the input: the answer loss of a sequence
    is mean_t -log softmax(b)[y_t], whose gradient is softmax(b) - mean_t onehot(y_t)."""

    def __init__(self, bias: list[float]) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(bias))
        self.unused = torch.nn.Parameter(torch.zeros(2))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def test_fisher_is_the_mean_squared_per_sequence_gradient() -> None:
    model = BiasOnlyLM([0.5, -1.0, 2.0])
    sequences = [
        LabelledSequence(prompt=[0], answer=[2, 2]),  # mean one-hot (0, 0, 1)
        LabelledSequence(prompt=[1, 0], answer=[0, 1]),  # mean one-hot (0.5, 0.5, 0)
    ]
    p = torch.softmax(model.bias.detach(), -1)
    expected = ((p - torch.tensor([0.0, 0.0, 1.0])) ** 2 + (p - torch.tensor([0.5, 0.5, 0.0])) ** 2) / 2
    importance = diagonal_fisher(model, sequences, {"bias": model.bias}, pad_id=0)
    assert set(importance) == {"bias"}
    assert torch.allclose(importance["bias"], expected, atol=1e-6)


def test_fisher_restores_gradient_flags_and_reports_progress() -> None:
    model = BiasOnlyLM([0.0, 0.0, 0.0])
    model.unused.requires_grad_(False)
    seen: list[float] = []
    diagonal_fisher(
        model,
        [LabelledSequence(prompt=[0], answer=[1])] * 3,
        {"bias": model.bias},
        pad_id=0,
        step=lambda fraction, _message: seen.append(fraction),
    )
    assert model.bias.requires_grad and not model.unused.requires_grad
    assert model.bias.grad is None
    assert seen == [1 / 3, 2 / 3, 1.0]


def test_batched_fisher_squares_the_batch_gradient() -> None:
    model = BiasOnlyLM([0.5, -1.0, 2.0])
    sequences = [LabelledSequence(prompt=[0], answer=[2, 2]), LabelledSequence(prompt=[0], answer=[0, 1])]
    p = torch.softmax(model.bias.detach(), -1)
    # one batch: the loss is the mean over its four answer tokens, whose mean one-hot is (.25, .25, .5)
    expected = (p - torch.tensor([0.25, 0.25, 0.5])) ** 2
    importance = diagonal_fisher(model, sequences, {"bias": model.bias}, pad_id=0, batch_size=2)
    assert torch.allclose(importance["bias"], expected, atol=1e-6)
