"""Selective Synaptic Dampening (Foster et al., 2023) for causal language models.

Rule, as the reference implementation (if-loops/selective-synaptic-dampening, `ssd.py`,
`modify_weight`) applies it with exponent 1 and lower bound 1: parameters with
I_forget > alpha * I_retain are multiplied by min(lambda * I_retain / I_forget, 1); all others keep
their value. Deviation: the reference's "original" importance is taken on the full training set;
we have no training set for a served model, so it is taken on a retain corpus.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from pydantic import BaseModel

from models.unlearning.data import LabelledSequence
from models.unlearning.fisher import diagonal_fisher
from models.unlearning.progress import StepCallback, no_progress, sub_step
from models.unlearning.spec import SSDParams


class SSDReport(BaseModel):
    """What the dampening touched: counts over the candidate parameters."""

    candidates: int
    """Scalar weights considered (those matched by the module patterns)."""
    dampened: int
    """Scalar weights selected by the rule and multiplied by a factor below 1 (or equal, at the bound)."""
    mean_factor: float | None
    """Mean multiplier over the dampened weights."""
    per_tensor: dict[str, int]
    """Dampened weights per parameter tensor (tensors with none are left out)."""

    def summary(self) -> str:
        factor = "-" if self.mean_factor is None else f"{self.mean_factor:.3f}"
        share = self.dampened / max(self.candidates, 1)
        return (
            f"dampened {self.dampened:,} of {self.candidates:,} weights ({share:.4%}), mean factor {factor}"
        )


def select_parameters(model: torch.nn.Module, patterns: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """Named parameters whose name matches any pattern (`re.search`); an empty match is an error."""
    compiled = [re.compile(pattern) for pattern in patterns]
    chosen = {name: p for name, p in model.named_parameters() if any(c.search(name) for c in compiled)}
    if not chosen:
        raise ValueError(f"no parameter name matches the SSD module patterns {list(patterns)}")
    return chosen


@torch.no_grad()
def dampen(
    params: Mapping[str, torch.nn.Parameter],
    forget_importance: Mapping[str, torch.Tensor],
    retain_importance: Mapping[str, torch.Tensor],
    *,
    alpha: float,
    lambda_: float,
) -> SSDReport:
    """Apply the SSD rule in place."""
    dampened, factor_sum, per_tensor = 0, 0.0, {}
    for name, p in params.items():
        forget, retain = forget_importance[name], retain_importance[name]
        selected = forget > alpha * retain
        count = int(selected.sum())
        if not count:
            continue
        factor = (lambda_ * retain[selected] / forget[selected]).clamp(max=1.0)
        p[selected] = p[selected] * factor.to(p.dtype)
        dampened += count
        factor_sum += float(factor.sum())
        per_tensor[name] = count
    return SSDReport(
        candidates=sum(p.numel() for p in params.values()),
        dampened=dampened,
        mean_factor=factor_sum / dampened if dampened else None,
        per_tensor=per_tensor,
    )


def run_ssd(
    model: torch.nn.Module,
    forget: Sequence[LabelledSequence],
    retain: Sequence[LabelledSequence],
    params: SSDParams,
    *,
    pad_id: int,
    step: StepCallback = no_progress,
) -> SSDReport:
    """Importances on both sets (the forget share of the work weighted by its size), then dampening."""
    candidates = select_parameters(model, params.module_patterns())
    split = len(forget) / (len(forget) + len(retain))
    forget_importance = diagonal_fisher(
        model,
        forget,
        candidates,
        pad_id=pad_id,
        batch_size=params.batch_size,
        step=sub_step(step, 0.0, split),
        label="forget Fisher",
    )
    retain_importance = diagonal_fisher(
        model,
        retain,
        candidates,
        pad_id=pad_id,
        batch_size=params.batch_size,
        step=sub_step(step, split, 1.0),
        label="retain Fisher",
    )
    report = dampen(
        candidates, forget_importance, retain_importance, alpha=params.alpha, lambda_=params.lambda_
    )
    step(1.0, f"dampened {report.dampened:,} of {report.candidates:,} weights")
    return report
