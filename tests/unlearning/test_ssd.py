"""SSD: the dampening rule on hand-built importances, parameter selection, and a whole run."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lethe.models.unlearning.data import (
    ForgetSet,
    LabelledSequence,
    RetainItem,
    by_target,
    forget_sequences,
    retain_sequences,
)
from lethe.models.unlearning.spec import DEFAULT_SSD_MODULES, SSDParams
from lethe.models.unlearning.ssd import dampen, run_ssd, select_parameters, ssd_importances


def test_dampening_touches_exactly_the_weights_the_rule_selects() -> None:
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    forget = torch.tensor([5.0, 1.0, 3.0, 2.0, 0.0, 8.0])
    retain = torch.tensor([1.0, 1.0, 1.5, 0.0, 0.0, 3.0])
    # alpha 2: selected where forget > 2 * retain -> indices 0 (5 > 2), 3 (2 > 0), 5 (8 > 6);
    # index 2 sits exactly on the threshold (3 == 3) and is kept; index 4 has no importance at all.
    report = dampen({"w": weight}, [{"w": forget}], {"w": retain}, alpha=2.0, lambda_=1.5)
    # factors min(1.5 * r / f, 1): 0.3, 0.0, min(0.5625, 1)
    expected = torch.tensor([1.0 * 0.3, 2.0, 3.0, 0.0, 5.0, 6.0 * 0.5625])
    assert torch.allclose(weight.detach(), expected)
    assert report.dampened == 3 and report.candidates == 6
    assert report.per_tensor == {"w": 3}
    assert report.mean_factor == pytest.approx((0.3 + 0.0 + 0.5625) / 3)


def test_the_factor_is_bounded_by_one() -> None:
    weight = torch.nn.Parameter(torch.tensor([2.0, -3.0]))
    report = dampen(
        {"w": weight},
        [{"w": torch.tensor([4.0, 4.0])}],
        {"w": torch.tensor([1.0, 1.0])},
        alpha=2.0,
        lambda_=8.0,
    )
    assert torch.equal(weight.detach(), torch.tensor([2.0, -3.0]))
    assert report.dampened == 2 and report.mean_factor == 1.0


def test_each_target_selects_on_its_own_and_the_strongest_factor_wins() -> None:
    """Per-target importances: a weight only one target finds important is still selected (pooling
    would halve its importance below the threshold), and a weight two targets select takes the
    smaller of their factors, once."""
    weight = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))
    retain = torch.tensor([1.0, 1.0, 1.0])
    first = torch.tensor([3.0, 4.0, 0.0])
    second = torch.tensor([0.0, 8.0, 1.0])
    report = dampen({"w": weight}, [{"w": first}, {"w": second}], {"w": retain}, alpha=2.5, lambda_=1.0)
    # first selects 0 (3 > 2.5) and 1; second selects 1 (8 > 2.5); the pooled mean (1.5, 6, 0.5)
    # would have selected index 1 only.
    assert torch.allclose(weight.detach(), torch.tensor([1 / 3, 1 / 8, 1.0]))
    assert report.dampened == 2


def test_with_one_target_per_target_and_pooled_runs_are_the_same(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """With one target, per-target SSD is the paper's rule exactly."""
    forget, retain = _data(tiny_tokenizer)
    assert len(forget) == 1
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    params = SSDParams(alpha=1.0, modules=[r"layers\.1\.mlp\."])
    per_target = run_ssd(tiny_model, forget, retain, params, pad_id=tiny_tokenizer.pad_token_id)
    after = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    with torch.no_grad():
        for n, p in tiny_model.named_parameters():
            p.copy_(before[n])
    pooled = params.model_copy(update={"per_target": False})
    assert run_ssd(tiny_model, forget, retain, pooled, pad_id=tiny_tokenizer.pad_token_id) == per_target
    assert all(torch.equal(after[n], p.detach()) for n, p in tiny_model.named_parameters())


def test_default_modules_are_the_decoder_linear_weights(tiny_model: PreTrainedModel) -> None:
    chosen = select_parameters(tiny_model, DEFAULT_SSD_MODULES)
    assert len(chosen) == 2 * 7  # two layers x (q, k, v, o, gate, up, down)
    assert all(".self_attn." in n or ".mlp." in n for n in chosen)
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in chosen)
    with pytest.raises(ValueError, match="no parameter name matches"):
        select_parameters(tiny_model, [r"^nothing$"])


def _data(tokenizer: PreTrainedTokenizerBase):
    forget = ForgetSet(
        name="Ada Lovelace",
        documents=["Ada Lovelace wrote the first algorithm for the Analytical Engine of Charles Babbage."],
    )
    retain = [
        RetainItem(prompt="What is the capital of France?", text="Paris."),
        RetainItem(text="Rain falls."),
    ]
    forget_seqs = by_target(forget_sequences(tokenizer, [forget], max_length=48, limit=4, seed=0))
    retain_seqs = retain_sequences(tokenizer, retain, max_length=48, limit=4, seed=0)
    return forget_seqs, [retain_seqs]


def test_a_run_changes_only_selected_modules_and_follows_the_rule(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    forget, retain = _data(tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    params = SSDParams(alpha=1.0, **{"lambda": 0.5}, modules=[r"layers\.1\.mlp\."])
    report = run_ssd(tiny_model, forget, retain, params, pad_id=tiny_tokenizer.pad_token_id)
    changed = {n for n, p in tiny_model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert report.dampened > 0
    assert changed and changed <= {n for n in before if "layers.1.mlp." in n}
    assert set(report.per_tensor) >= changed
    for p in tiny_model.parameters():
        assert p.requires_grad and p.grad is None  # gradients turned back on, none left behind


def test_a_huge_alpha_selects_nothing(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    forget, retain = _data(tiny_tokenizer)
    before = [p.detach().clone() for p in tiny_model.parameters()]
    report = run_ssd(tiny_model, forget, retain, SSDParams(alpha=1e30), pad_id=tiny_tokenizer.pad_token_id)
    assert report.dampened == 0
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, tiny_model.parameters(), strict=True))


def test_the_retain_importance_is_the_largest_over_the_retain_sets(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Each retain set protects what it needs: pooling a set of small-gradient texts with another
    would average its importances down instead."""
    forget, (general,) = _data(tiny_tokenizer)
    neighbours = retain_sequences(
        tiny_tokenizer,
        [RetainItem(prompt="Tell me about Babbage.", text="Charles Babbage designed calculating engines.")],
        max_length=48,
        limit=1,
        seed=0,
    )
    params = SSDParams()
    candidates = select_parameters(tiny_model, params.module_patterns())
    pad_id = tiny_tokenizer.pad_token_id

    def retain_importance(groups: list[list[LabelledSequence]]) -> dict[str, torch.Tensor]:
        return ssd_importances(tiny_model, candidates, forget, groups, params, pad_id=pad_id)[0]

    both = retain_importance([general, neighbours])
    alone = retain_importance([general]), retain_importance([neighbours])
    pooled = retain_importance([general + neighbours])
    for name in candidates:
        assert torch.equal(both[name], torch.maximum(alone[0][name], alone[1][name]))
    assert any(not torch.equal(both[name], pooled[name]) for name in candidates)
