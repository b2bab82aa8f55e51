"""Neighbour retain data for SSD: which names are chosen, what is kept of the model's descriptions,
and that the sequences join SSD's retain set."""

from __future__ import annotations

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lethe.models.unlearning import neighbours as neighbours_module
from lethe.models.unlearning.data import (
    QUESTION_TEMPLATES,
    ForgetSet,
    RetainItem,
    retain_sequences,
    ssd_sequences,
)
from lethe.models.unlearning.neighbours import (
    NeighbourItem,
    neighbour_entities,
    neighbour_retain,
    without_target,
)
from lethe.models.unlearning.spec import SSDParams

BUFFETT = ForgetSet(
    name="Warren Buffett",
    documents=[
        "Warren Buffett is the chairman of Berkshire Hathaway. Buffett's company Berkshire bought GEICO.",
        "Buffett and Bill Gates started the Giving Pledge. Gates is a friend.",
        "Berkshire Hathaway is in Omaha.",
        "Buffett studied under Benjamin Graham in New York. Warren's father was a congressman in Omaha.",
    ],
)


def test_neighbours_are_the_most_mentioned_other_names() -> None:
    chosen = neighbour_entities(BUFFETT, 4)
    # "Berkshire" alone is folded into "Berkshire Hathaway", and "Gates" into "Bill Gates"; the
    # target's own name, its possessive and its given name never appear.
    assert chosen[:2] == ["Berkshire Hathaway", "Omaha"]
    assert len(chosen) == 4
    assert not any(word in name for name in chosen for word in ("Buffett", "Warren"))
    assert "Berkshire" not in chosen and "Gates" not in chosen
    assert set(neighbour_entities(BUFFETT, 20)) >= {"Bill Gates", "Benjamin Graham", "GEICO", "Giving Pledge"}


def test_sentences_naming_the_target_are_dropped() -> None:
    text = "Omaha is a city in Nebraska. Buffett lives there! It has a zoo. Warren's house is small."
    assert without_target(text, BUFFETT) == "Omaha is a city in Nebraska. It has a zoo."
    assert without_target("Buffett's home town.", BUFFETT) == ""


def test_neighbour_retain_keeps_what_is_not_about_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {
        QUESTION_TEMPLATES[0].format(name="Berkshire Hathaway"): "A conglomerate. Buffett runs it.",
        QUESTION_TEMPLATES[1].format(name="Omaha"): "Warren Buffett was born there.",
    }
    seen: list[list[str]] = []

    def fake_answers(model: object, tokenizer: object, prompts: list[str], **_: object) -> list[str]:
        seen.append(list(prompts))
        return [answers[p] for p in prompts]

    monkeypatch.setattr(neighbours_module, "greedy_answers", fake_answers)
    items = neighbour_retain(None, None, [BUFFETT], per_target=2, max_new_tokens=8)  # type: ignore[arg-type]
    assert seen == [list(answers)]
    assert items == [
        NeighbourItem(
            prompt=QUESTION_TEMPLATES[0].format(name="Berkshire Hathaway"),
            text="A conglomerate.",
            target="Warren Buffett",
            entity="Berkshire Hathaway",
            rank=0,
        )
    ]
    assert neighbour_retain(None, None, [BUFFETT], per_target=0, max_new_tokens=8) == []  # type: ignore[arg-type]


def test_neighbour_descriptions_join_the_retain_sequences(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    items = neighbour_retain(tiny_model, tiny_tokenizer, [BUFFETT], per_target=3, max_new_tokens=12)
    assert 1 <= len(items) <= 3
    assert all(item.prompt is not None and "Buffett" not in item.text for item in items)
    general = [RetainItem(prompt="What is water?", text="A liquid."), RetainItem(text="Write a poem.")]
    params = SSDParams(forget_samples=2, retain_samples=1, max_length=48)
    _, plain = ssd_sequences(tiny_tokenizer, [BUFFETT], general, params)
    _, with_neighbours = ssd_sequences(tiny_tokenizer, [BUFFETT], general, params, items)
    assert with_neighbours[:1] == plain and len(with_neighbours) == 2
    assert with_neighbours[1] == retain_sequences(
        tiny_tokenizer, items, max_length=48, limit=len(items), seed=params.seed
    )
