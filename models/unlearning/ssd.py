"""Selective Synaptic Dampening (Foster et al., 2023) for causal language models.

Rule, as the reference implementation (if-loops/selective-synaptic-dampening, `ssd.py`,
`modify_weight`) applies it with exponent 1 and lower bound 1: parameters with
I_forget > alpha * I_retain are multiplied by min(lambda * I_retain / I_forget, 1); all others keep
their value. Deviation: the reference's "original" importance is taken on the full training set;
we have no training set for a served model, so it is taken on a retain corpus.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from pydantic import BaseModel

from lethe.models.unlearning.data import LabelledSequence
from lethe.models.unlearning.fisher import diagonal_fisher
from lethe.models.unlearning.progress import StepCallback, no_progress, sub_step
from lethe.models.unlearning.spec import SSDParams


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
    forget_importances: Iterable[Mapping[str, torch.Tensor]],
    retain_importance: Mapping[str, torch.Tensor],
    *,
    alpha: float,
    lambda_: float,
) -> SSDReport:
    """Apply the SSD rule in place, once for each forget importance (one per target): a weight that
    several targets select takes the smallest factor any of them gives it, so a weight shared by
    two targets is dampened as much as the stronger one asks, not twice. The weights change only
    after every importance has been read (they may be computed lazily, on the original weights)."""
    factors = {name: torch.ones_like(p, dtype=torch.float32) for name, p in params.items()}
    selected = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in params.items()}
    for forget_importance in forget_importances:
        for name in params:
            forget, retain = forget_importance[name], retain_importance[name]
            chosen = forget > alpha * retain
            if chosen.any():
                factor = (lambda_ * retain[chosen] / forget[chosen]).clamp(max=1.0)
                factors[name][chosen] = torch.minimum(factors[name][chosen], factor)
                selected[name] |= chosen
    dampened, factor_sum, per_tensor = 0, 0.0, {}
    for name, p in params.items():
        mask = selected[name]
        count = int(mask.sum())
        if not count:
            continue
        factor = factors[name][mask]
        p[mask] = p[mask] * factor.to(p.dtype)
        dampened += count
        factor_sum += float(factor.sum())
        per_tensor[name] = count
    return SSDReport(
        candidates=sum(p.numel() for p in params.values()),
        dampened=dampened,
        mean_factor=factor_sum / dampened if dampened else None,
        per_tensor=per_tensor,
    )


def ssd_importances(
    model: torch.nn.Module,
    candidates: Mapping[str, torch.nn.Parameter],
    forget: Sequence[Sequence[LabelledSequence]],
    retain: Sequence[Sequence[LabelledSequence]],
    params: SSDParams,
    *,
    pad_id: int,
    step: StepCallback = no_progress,
) -> tuple[dict[str, torch.Tensor], Iterator[dict[str, torch.Tensor]]]:
    """The retain importance (computed now), and the forget importance of each target's sequences,
    computed as the iterator is read (`forget` holds one group per target; with `per_target` off
    they are pooled into one). Progress covers both, in proportion to their sequences.

    Per target is the default because a pooled forget Fisher over many targets is an average in
    which each target's own important weights are diluted by the others': on ten RWKU targets at
    once the pooled rule selected a few thousand weights and forgot nothing.

    `retain` holds one group per retain set (the general corpus, the neighbours' descriptions), and
    a weight's retain importance is its largest over the sets, for the same reason: a Fisher is a
    mean over sequences, and the model's own fluent descriptions have small gradients, so pooled
    with the general corpus they lowered every weight's retain importance and SSD dampened more
    (363,204 weights instead of 194,562 at alpha 50 on ten RWKU targets), not less."""
    groups = [list(g) for g in forget if g]
    if not params.per_target:
        groups = [[s for g in groups for s in g]]
    retain_groups = [list(g) for g in retain if g]
    retained = sum(len(g) for g in retain_groups)
    total = retained + sum(len(g) for g in groups)

    def fishers(
        chosen: list[list[LabelledSequence]], done: int, kind: str
    ) -> Iterator[dict[str, torch.Tensor]]:
        for number, group in enumerate(chosen, 1):
            yield diagonal_fisher(
                model,
                group,
                candidates,
                pad_id=pad_id,
                batch_size=params.batch_size,
                step=sub_step(step, done / total, (done + len(group)) / total),
                label=f"{kind} Fisher {number}/{len(chosen)}",
            )
            done += len(group)

    retain_importance: dict[str, torch.Tensor] = {}
    for importance in fishers(retain_groups, 0, "retain"):
        for name, value in importance.items():
            known = retain_importance.get(name)
            retain_importance[name] = value if known is None else torch.maximum(known, value)
    return retain_importance, fishers(groups, retained, "forget")


def run_ssd(
    model: torch.nn.Module,
    forget: Sequence[Sequence[LabelledSequence]],
    retain: Sequence[Sequence[LabelledSequence]],
    params: SSDParams,
    *,
    pad_id: int,
    step: StepCallback = no_progress,
) -> SSDReport:
    """Importances (`ssd_importances`), then dampening; each forget importance is read once, by the
    dampening, so only one is held at a time."""
    candidates = select_parameters(model, params.module_patterns())
    retain_importance, forget_importances = ssd_importances(
        model, candidates, forget, retain, params, pad_id=pad_id, step=step
    )
    report = dampen(
        candidates, forget_importances, retain_importance, alpha=params.alpha, lambda_=params.lambda_
    )
    step(1.0, f"dampened {report.dampened:,} of {report.candidates:,} weights")
    return report
