"""FLAT fine-tuning (Loss Adjustment with only Forget data; Wang et al., ICLR 2025).

Each step takes a batch of forget pairs (one prompt with its forget answer and a template answer)
and minimises `divergences.flat_loss` between the mean token probabilities of the two answers;
as in the paper, no retain data is used by default. Extension: with `neighbours`, each step also
takes a batch of the model's own descriptions of the target's neighbours
(`lethe.models.unlearning.neighbours`) and adds `retain_weight` times their language-modelling loss,
because forget-only training teaches "I don't know" to every question shaped like the forget
prompts, the neighbours' included. With `keep_neighbours`, training stops when that spread shows on
held-out neighbour questions (`NeighbourGuard`), instead of after a step count tuned on the
evaluation's probes. Deviations from the reference code (UCSC-REAL/FLAT): the mean token
probability is taken over answer tokens only (the reference averages over the padded width, so
questions and padding count as zeros and long padding shrinks the signal); AdamW with linear
warm-up and decay in a plain loop instead of the HF Trainer with DeepSpeed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from pydantic import BaseModel

from lethe.models.unlearning.data import (
    FlatPair,
    LabelledSequence,
    NeighbourCheck,
    answer_log_probs,
    mean_answer_nll,
)
from lethe.models.unlearning.divergences import flat_loss
from lethe.models.unlearning.progress import StepCallback, no_progress
from lethe.models.unlearning.spec import FLATParams


class FLATReport(BaseModel):
    steps: int
    epoch_losses: list[float]
    """Mean loss over each epoch's steps."""
    forget_prob: tuple[float, float]
    """Mean forget-answer token probability over the batch of the first step (measured before any
    update) and of the last step: how far training moved it, even within a single epoch."""
    template_prob: tuple[float, float]
    retain_loss: tuple[float, float] | None = None
    """Language-modelling loss on the neighbours' descriptions at the first and last step, when used."""
    neighbour_preference: list[tuple[int, float]] = []
    """(step, share of held-out neighbour questions whose own answer beats the template) at each
    stopping check, step 0 before training."""
    stopped_at: int | None = None
    """The step whose check fell below `keep_neighbours`; the weights are those of the check before."""

    @property
    def kept_step(self) -> int:
        """The last step whose update is in the returned weights."""
        return self.neighbour_preference[-2][0] if self.stopped_at is not None else self.steps

    def summary(self) -> str:
        losses = ", ".join(f"{loss:.4f}" for loss in self.epoch_losses)
        retain = ""
        if self.retain_loss:
            retain = f", retain loss {self.retain_loss[0]:.4f} -> {self.retain_loss[1]:.4f}"
        checks = ""
        if self.neighbour_preference:
            shares = " ".join(f"{step}:{share:.3f}" for step, share in self.neighbour_preference)
            checks = f"; neighbour preference by step {shares}"
            if self.stopped_at is not None:
                checks += f"; stopped at step {self.stopped_at}, kept the weights of step {self.kept_step}"
        return (
            f"{self.steps} steps, epoch losses {losses}; forget-answer token probability"
            f" {self.forget_prob[0]:.4f} -> {self.forget_prob[1]:.4f}, template {self.template_prob[0]:.4f}"
            f" -> {self.template_prob[1]:.4f}{retain}{checks}"
        )


def mean_token_probs(
    model: torch.nn.Module, sequences: Sequence[LabelledSequence], pad_id: int
) -> torch.Tensor:
    """Per sequence, the mean probability of its answer tokens (FLAT's answer score)."""
    log_probs, mask = answer_log_probs(model, sequences, pad_id)
    return (log_probs.exp() * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def answer_probabilities(
    model: torch.nn.Module, pairs: Sequence[FlatPair], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: mean token probability of the template answer and of the forget answer, from one
    forward pass over both."""
    mean_prob = mean_token_probs(model, [p.template for p in pairs] + [p.forget for p in pairs], pad_id)
    return mean_prob[: len(pairs)], mean_prob[len(pairs) :]


@torch.no_grad()
def neighbour_preference(
    model: torch.nn.Module, checks: Sequence[NeighbourCheck], pad_id: int, batch_size: int = 16
) -> float:
    """The share of `checks` on which the model's own earlier answer scores above the template."""
    wins = 0
    for start in range(0, len(checks), batch_size):
        batch = checks[start : start + batch_size]
        probs = mean_token_probs(model, [c.own for c in batch] + [c.template for c in batch], pad_id)
        wins += int((probs[: len(batch)] > probs[len(batch) :]).sum())
    return wins / len(checks)


class NeighbourGuard:
    """FLAT's stopping check. Forget-only training makes the template answer win on questions it
    was never trained on; on ten RWKU targets, the share of held-out neighbour questions where the
    model still prefers its own answer ranked seven checkpoints as the evaluation's neighbour
    recall did, but for two close pairs (README). When the share falls below `keep` times its
    value before training, the weights of the last check that passed are put back. That copy
    costs one more set of the trained weights in memory."""

    def __init__(
        self, model: torch.nn.Module, checks: Sequence[NeighbourCheck], keep: float, pad_id: int
    ) -> None:
        self.model, self.checks, self.pad_id = model, checks, pad_id
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.saved = [p.detach().clone() for p in self.parameters]
        self.history = [(0, self._share())]
        self.floor = keep * self.history[0][1]

    def _share(self) -> float:
        training = self.model.training
        self.model.eval()
        try:
            return neighbour_preference(self.model, self.checks, self.pad_id)
        finally:
            self.model.train(training)

    @torch.no_grad()
    def passes(self, step: int) -> bool:
        """Check after `step`: keep a copy of the weights if they pass, restore the last copy if not."""
        self.history.append((step, self._share()))
        ok = self.history[-1][1] >= self.floor
        for parameter, saved in zip(self.parameters, self.saved, strict=True):
            if ok:
                saved.copy_(parameter)
            else:
                parameter.copy_(saved)
        return ok


def _schedule(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(total - warmup, 1))


def run_flat(
    model: torch.nn.Module,
    pairs: Sequence[FlatPair],
    params: FLATParams,
    *,
    pad_id: int,
    retain: Sequence[LabelledSequence] = (),
    checks: Sequence[NeighbourCheck] = (),
    step: StepCallback = no_progress,
) -> FLATReport:
    """Train `model` in place; `retain` (the neighbours' descriptions) adds its weighted loss to each
    step, its batches taken in turn; `checks` are the held-out neighbour questions of
    `params.keep_neighbours`."""
    if not pairs:
        raise ValueError("FLAT: no forget pairs to train on")
    if params.keep_neighbours is not None and not checks:
        raise ValueError(
            "FLAT: keep_neighbours needs held-out neighbour questions, and the targets' documents name"
            " no other people, works or places beyond the trained neighbours"
        )
    rng = random.Random(params.seed)
    per_epoch = math.ceil(len(pairs) / params.batch_size)
    total = per_epoch * params.epochs
    warmup = round(total * params.warmup_ratio)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=params.learning_rate,
        weight_decay=params.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, warmup))
    model.train()
    epoch_losses: list[float] = []
    first: tuple[float, float] | None = None
    last = (0.0, 0.0)
    retain_losses: list[float] = []
    done = 0
    stopped_at = None
    guard = (
        NeighbourGuard(model, checks, params.keep_neighbours, pad_id)
        if params.keep_neighbours is not None
        else None
    )
    try:
        for epoch in range(params.epochs):
            order = list(pairs)
            rng.shuffle(order)
            losses = []
            for start in range(0, len(order), params.batch_size):
                batch = order[start : start + params.batch_size]
                template_prob, forget_prob = answer_probabilities(model, batch, pad_id)
                loss = flat_loss(template_prob, forget_prob, params.divergence)
                if retain:
                    begin = done * params.batch_size % len(retain)
                    kept = [retain[(begin + i) % len(retain)] for i in range(params.batch_size)]
                    retain_loss = mean_answer_nll(model, kept, pad_id)
                    retain_losses.append(float(retain_loss.detach()))
                    loss = loss + params.retain_weight * retain_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), params.max_grad_norm)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                last = (float(forget_prob.detach().mean()), float(template_prob.detach().mean()))
                first = first or last
                done += 1
                passed = True
                if guard is not None and (done % params.check_every == 0 or done == total):
                    passed = guard.passes(done)
                message = f"epoch {epoch + 1}/{params.epochs} step {done}/{total} loss {losses[-1]:.4f}"
                if guard:
                    message += f", neighbour preference {guard.history[-1][1]:.3f}"
                step(done / total, message)
                if not passed:
                    stopped_at = done
                    break
            epoch_losses.append(sum(losses) / len(losses))
            if stopped_at is not None:
                break
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    assert first is not None
    return FLATReport(
        steps=done,
        epoch_losses=epoch_losses,
        forget_prob=(first[0], last[0]),
        template_prob=(first[1], last[1]),
        retain_loss=(retain_losses[0], retain_losses[-1]) if retain_losses else None,
        neighbour_preference=guard.history if guard else [],
        stopped_at=stopped_at,
    )
