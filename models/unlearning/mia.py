"""Membership-inference scores and AUCs: do the forget texts still look like training data?

Scores follow the reference code that RWKU and MUSE use (Min-K%++, Zhang et al. 2024), each
oriented so that higher means "more likely a member":
- LOSS: the mean token log-likelihood (minus the LM loss);
- zlib: that log-likelihood divided by the zlib-compressed length of the text in bytes;
- Min-K%++: per token, (log p(x_t) - mu_t) / sigma_t, with mu_t and sigma_t the mean and standard
  deviation of log p over the vocabulary under the model's own distribution at that position;
  the score is the mean of the lowest k% of these.
The AUC is that of telling forget texts (positives) from retain texts by the score: near 0.5 when
the model treats them alike, above when the forget texts look more familiar. Unlearning should
lower it.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from lethe.models.unlearning.data import model_device
from lethe.models.unlearning.progress import StepCallback, no_progress

MIA_SCORES = ("loss", "zlib", "mink++")


class MembershipScores(BaseModel):
    loss: float
    zlib: float
    mink_pp: float

    def get(self, name: str) -> float:
        return {"loss": self.loss, "zlib": self.zlib, "mink++": self.mink_pp}[name]


@torch.no_grad()
def membership_scores(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int = 512,
    k: float = 0.2,
    step: StepCallback = no_progress,
) -> list[MembershipScores]:
    """Scores of each text, one forward pass per text (texts vary widely in length)."""
    model.eval()
    scores = []
    for index, text in enumerate(texts):
        ids = tokenizer.encode(text, add_special_tokens=False)[:max_length]
        if len(ids) < 2:
            raise ValueError(f"text {index} has fewer than two tokens: nothing to score")
        input_ids = torch.tensor([ids], device=model_device(model))
        logits = model(input_ids=input_ids).logits[0, :-1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        targets = input_ids[0, 1:]
        token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        probs = log_probs.exp()
        mu = (probs * log_probs).sum(-1)
        sigma = ((probs * log_probs.square()).sum(-1) - mu.square()).clamp(min=1e-12).sqrt()
        normalised = (token_log_probs - mu) / sigma
        lowest = torch.sort(normalised).values[: max(1, int(len(normalised) * k))]
        log_likelihood = float(token_log_probs.mean())
        scores.append(
            MembershipScores(
                loss=log_likelihood,
                zlib=log_likelihood / len(zlib.compress(text.encode("utf-8"))),
                mink_pp=float(lowest.mean()),
            )
        )
        step((index + 1) / len(texts), f"membership scores {index + 1}/{len(texts)}")
    return scores


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney statistic)."""
    if not positives or not negatives:
        raise ValueError("AUC needs at least one positive and one negative score")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def mia_aucs(forget: Sequence[MembershipScores], retain: Sequence[MembershipScores]) -> dict[str, float]:
    """AUC of each score at telling forget texts (members) from retain texts."""
    return {name: auc([s.get(name) for s in forget], [s.get(name) for s in retain]) for name in MIA_SCORES}
