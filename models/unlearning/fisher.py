"""Diagonal Fisher importance: the mean squared gradient of the token-level LM loss, per parameter.

As in the SSD reference code (which follows Avalanche), the importance of a parameter on a data
set is the average over mini-batches of the squared gradient of the batch loss. With batches of one
sequence that is the diagonal of the empirical Fisher information over sequences; larger batches
(the reference's choice) are several times faster on a CPU and estimate the same quantity with
less of the per-sequence variance, identically for forget and retain data.
Only the parameters asked for get gradients, so that the embedding's large gradient is not paid for
when it is not a candidate.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from lethe.models.unlearning.data import LabelledSequence, mean_answer_nll
from lethe.models.unlearning.progress import StepCallback, no_progress


@contextmanager
def gradients_only_for(model: torch.nn.Module, params: Mapping[str, torch.nn.Parameter]) -> Iterator[None]:
    """Turn `requires_grad` off for every parameter but `params` for the duration, then restore it."""
    wanted = {id(p) for p in params.values()}
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(before[name])
            p.grad = None


def diagonal_fisher(
    model: torch.nn.Module,
    sequences: Sequence[LabelledSequence],
    params: Mapping[str, torch.nn.Parameter],
    *,
    pad_id: int,
    batch_size: int = 1,
    step: StepCallback = no_progress,
    label: str = "Fisher",
) -> dict[str, torch.Tensor]:
    """E[(d loss / d theta)^2] over mini-batches of `batch_size` sequences."""
    if not sequences:
        raise ValueError(f"{label}: no sequences to estimate importance from")
    importances = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        # Gradients on even when the caller is under no_grad (dampening reads importances lazily).
        with torch.enable_grad(), gradients_only_for(model, params):
            starts = range(0, len(sequences), batch_size)
            for start in starts:
                for p in params.values():
                    p.grad = None
                mean_answer_nll(model, sequences[start : start + batch_size], pad_id).backward()
                for name, p in params.items():
                    if p.grad is not None:
                        importances[name].add_(p.grad.float().pow(2))
                done = min(start + batch_size, len(sequences))
                step(done / len(sequences), f"{label} {done}/{len(sequences)}")
    finally:
        model.train(was_training)
    for importance in importances.values():
        importance.div_(len(starts))
    return importances
