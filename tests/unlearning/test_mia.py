"""Membership-inference scores and AUCs."""

from __future__ import annotations

import math
import zlib
from types import SimpleNamespace

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lethe.models.unlearning.mia import auc, membership_scores, mia_aucs


def test_auc_counts_wins_and_half_ties() -> None:
    assert auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert auc([1.0], [2.0, 3.0]) == 0.0
    assert auc([1.0, 2.0], [1.0, 2.0]) == 0.5
    assert auc([2.0], [1.0, 2.0, 3.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        auc([], [1.0])


class FixedLM(torch.nn.Module):
    """Logits (2, 1, 0) at every position over a 3-token vocabulary."""

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.tensor([2.0, 1.0, 0.0]).expand(*input_ids.shape, -1))


class CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [int(c) for c in text]


def test_scores_follow_their_definitions() -> None:
    text = "0120"  # scored tokens: 1, 2, 0
    log_p = torch.log_softmax(torch.tensor([2.0, 1.0, 0.0]), -1)
    p = log_p.exp()
    mu = float((p * log_p).sum())
    sigma = math.sqrt(float((p * log_p**2).sum()) - mu**2)
    token_lp = [float(log_p[1]), float(log_p[2]), float(log_p[0])]
    [scores] = membership_scores(FixedLM(), CharTokenizer(), [text], k=0.5)  # type: ignore[arg-type]
    assert scores.loss == pytest.approx(sum(token_lp) / 3, abs=1e-5)
    assert scores.zlib == pytest.approx(scores.loss / len(zlib.compress(text.encode())), abs=1e-6)
    assert scores.mink_pp == pytest.approx((float(log_p[2]) - mu) / sigma, abs=1e-5)  # lowest 1 of 3


def test_an_overfitted_member_set_is_told_apart(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    members = [f"The secret code number {i} is {i * 7919 % 1000} and the colour is blue." for i in range(5)]
    others = [f"A quiet river {i} flows past {i * 31} old mills toward the sea." for i in range(5)]
    before = mia_aucs(
        membership_scores(tiny_model, tiny_tokenizer, members),
        membership_scores(tiny_model, tiny_tokenizer, others),
    )
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2)
    batch = tiny_tokenizer(members, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    tiny_model.train()
    for _ in range(10):
        optimizer.zero_grad()
        tiny_model(**batch, labels=labels).loss.backward()
        optimizer.step()
    after = mia_aucs(
        membership_scores(tiny_model, tiny_tokenizer, members),
        membership_scores(tiny_model, tiny_tokenizer, others),
    )
    assert after["loss"] == 1.0 and after["zlib"] == 1.0 and after["mink++"] >= 0.9
    assert after["loss"] > before["loss"]
