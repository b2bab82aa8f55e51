"""FLAT pairs and training steps on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lethe.models.unlearning.data import (
    IGNORE_INDEX,
    ForgetSet,
    NeighbourCheck,
    RetainItem,
    collate,
    flat_pairs,
    mean_answer_nll,
    retain_sequences,
)
from lethe.models.unlearning.divergences import flat_loss
from lethe.models.unlearning.flat import answer_probabilities, neighbour_preference, run_flat
from lethe.models.unlearning.generation import greedy_answers
from lethe.models.unlearning.neighbours import CHECK_ANSWER_TOKENS, NeighbourItem, neighbour_checks
from lethe.models.unlearning.spec import FLATParams

FORGET = ForgetSet(
    name="Ada Lovelace",
    documents=[
        "Ada Lovelace wrote the first algorithm for the Analytical Engine.",
        "Her father was Lord Byron and her mother was Anne Milbanke.",
    ],
    examples=["Who wrote notes on the Analytical Engine?"],
    templates=["I don't know.", "I'm not sure about that."],
)


def test_pairs_share_the_prompt_and_label_only_answers(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    pairs = flat_pairs(tiny_tokenizer, [FORGET], max_length=160, limit=8, seed=0)
    assert len(pairs) == 2  # one per document chunk
    for pair in pairs:
        assert pair.forget.prompt == pair.template.prompt
        assert tiny_tokenizer.decode(pair.template.answer, skip_special_tokens=True) in FORGET.templates
        assert len(pair.forget.ids) <= 160
    _ids, attention, labels = collate([pairs[0].forget, pairs[0].template], tiny_tokenizer.pad_token_id)
    prompt = len(pairs[0].forget.prompt)
    assert (labels[:, :prompt] == IGNORE_INDEX).all()
    assert labels[0, prompt : len(pairs[0].forget.ids)].tolist() == pairs[0].forget.answer
    assert attention[1].sum() == len(pairs[0].template.ids)


def _loss(model: PreTrainedModel, pairs, pad_id: int) -> float:
    with torch.no_grad():
        template, forget = answer_probabilities(model, pairs, pad_id)
    return float(flat_loss(template, forget, "tv"))


def test_training_lowers_the_loss_and_the_forget_probability(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    pad_id = tiny_tokenizer.pad_token_id
    pairs = flat_pairs(tiny_tokenizer, [FORGET], max_length=160, limit=8, seed=0)
    with torch.no_grad():
        template_before, forget_before = answer_probabilities(tiny_model, pairs, pad_id)
    loss_before = _loss(tiny_model, pairs, pad_id)
    report = run_flat(
        tiny_model,
        pairs,
        FLATParams(epochs=4, learning_rate=3e-3, batch_size=2, warmup_ratio=0),
        pad_id=pad_id,
    )
    with torch.no_grad():
        template_after, forget_after = answer_probabilities(tiny_model, pairs, pad_id)
    assert report.steps == 4
    assert _loss(tiny_model, pairs, pad_id) < loss_before
    assert forget_after.mean() < forget_before.mean()
    assert template_after.mean() > template_before.mean()
    # The report's first figures are the untrained model's, so it shows the move.
    assert report.forget_prob[0] == pytest.approx(float(forget_before.mean()), rel=1e-4)
    assert report.forget_prob[1] < report.forget_prob[0]
    assert report.template_prob[1] > report.template_prob[0]


def test_neighbour_retain_loss_keeps_the_neighbours(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """The same FLAT run from the same weights, with and without the neighbours' descriptions: with
    them the model ends more likely to say what it said about the neighbours, and the report shows
    that loss."""
    pad_id = tiny_tokenizer.pad_token_id
    pairs = flat_pairs(tiny_tokenizer, [FORGET], max_length=160, limit=8, seed=0)
    neighbours = retain_sequences(
        tiny_tokenizer,
        [
            RetainItem(prompt="Who is Charles Babbage?", text="A mathematician who designed engines."),
            RetainItem(prompt="What is the Analytical Engine?", text="A mechanical computer design."),
        ],
        max_length=160,
        limit=2,
        seed=0,
    )
    params = FLATParams(epochs=4, learning_rate=3e-3, batch_size=2, warmup_ratio=0, retain_weight=2.0)
    final_nll = {}
    for kept in ((), neighbours):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        report = run_flat(model, pairs, params, pad_id=pad_id, retain=kept)
        assert (report.retain_loss is not None) == bool(kept)
        with torch.no_grad():
            final_nll[bool(kept)] = float(mean_answer_nll(model, neighbours, pad_id))
    assert final_nll[True] < final_nll[False]
    assert "retain loss" in report.summary()


def _checks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[NeighbourCheck]:
    """Questions about Ada Lovelace's neighbours, each with the untrained model's own greedy answer
    and a template answer, as the job holds them out."""
    prompts = ["Who is Charles Babbage?", "What is the Analytical Engine?", "Tell me about Lord Byron."]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=8)
    items = [
        NeighbourItem(prompt=p, text=a, target=FORGET.name, entity=p.split()[-1], rank=2)
        for p, a in zip(prompts, answers, strict=True)
    ]
    return neighbour_checks(tokenizer, items, [FORGET], seed=0)


def test_the_stopping_check_keeps_the_weights_of_the_last_check_that_passed(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Training that makes the template win on held-out neighbour questions stops at the first check
    below the floor and returns the weights of the check before: the same weights as an unchecked
    run of the same schedule after that many steps."""
    pad_id = tiny_tokenizer.pad_token_id
    pairs = flat_pairs(tiny_tokenizer, [FORGET], max_length=160, limit=8, seed=0)
    params = FLATParams(epochs=8, learning_rate=3e-3, batch_size=1, warmup_ratio=0, check_every=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    checks = _checks(model, tiny_tokenizer)
    assert neighbour_preference(model, checks, pad_id) == 1.0  # its own answers beat "I don't know"

    unchecked = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    weights_by_step: dict[int, list[torch.Tensor]] = {}

    def record(fraction: float, message: str) -> None:
        weights_by_step[round(fraction * 16)] = [p.detach().clone() for p in unchecked.parameters()]

    plain = run_flat(unchecked, pairs, params, pad_id=pad_id, step=record)
    assert plain.steps == 16 and plain.neighbour_preference == [] and plain.stopped_at is None
    assert neighbour_preference(unchecked, checks, pad_id) < 1.0  # the template spread to them

    report = run_flat(
        model, pairs, params.model_copy(update={"keep_neighbours": 1.0}), pad_id=pad_id, checks=checks
    )
    assert report.stopped_at is not None and report.stopped_at == report.steps
    steps = [step for step, _ in report.neighbour_preference]
    assert steps == list(range(0, report.stopped_at + 1, 2))
    shares = [share for _, share in report.neighbour_preference]
    assert shares[:-1] == [1.0] * (len(shares) - 1) and shares[-1] < 1.0
    assert report.kept_step == report.stopped_at - 2
    assert neighbour_preference(model, checks, pad_id) == 1.0
    kept = weights_by_step.get(report.kept_step) or list(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).parameters()
    )
    for trained, expected in zip(model.parameters(), kept, strict=True):
        torch.testing.assert_close(trained.detach(), expected)
    assert f"kept the weights of step {report.kept_step}" in report.summary()


def test_a_check_scores_the_start_of_the_own_answer_against_a_flat_template(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    text = "A poet. " * 40
    item = NeighbourItem(
        prompt="Who is Lord Byron?", text=text, target=FORGET.name, entity="Lord Byron", rank=0
    )
    [check] = neighbour_checks(tiny_tokenizer, [item], [FORGET], seed=0)
    assert check.own.prompt == check.template.prompt
    assert len(check.own.answer) == CHECK_ANSWER_TOKENS  # the start of the answer, then end of turn
    assert text.startswith(tiny_tokenizer.decode(check.own.answer[:-1]))
    assert tiny_tokenizer.decode(check.template.answer, skip_special_tokens=True) in FORGET.templates


def test_keep_neighbours_without_held_out_questions_is_refused(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    pairs = flat_pairs(tiny_tokenizer, [FORGET], max_length=160, limit=8, seed=0)
    with pytest.raises(ValueError, match="held-out neighbour questions"):
        run_flat(tiny_model, pairs, FLATParams(keep_neighbours=0.9), pad_id=tiny_tokenizer.pad_token_id)
