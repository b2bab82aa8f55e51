"""Incremental detokenisation: stop strings, multi-byte characters, forbidden-string hold-back."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lethe.guards.forbidden import ForbiddenMatcher
from lethe.models.decoding.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir: Path):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


def stream(tokenizer, text: str, **kwargs) -> tuple[IncrementalDetokenizer, list[str], list]:
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    chunks, steps = [], []
    for token in tokenizer.encode(text, add_special_tokens=False):
        step = detok.push(token)
        steps.append(step)
        chunks.append(step.text)
        if detok.stopped or step.violation is not None:
            break
    return detok, chunks, steps


@pytest.mark.parametrize(
    "text", ["Hello, world!", "Grüße aus Köln — 東京 🎉 done", "  spaced   out\n\nlines"]
)
def test_streamed_text_equals_whole_decode(tokenizer, text: str) -> None:
    detok, chunks, _ = stream(tokenizer, text)
    assert "".join(chunks) + detok.flush() == text
    assert all("\ufffd" not in c for c in chunks)


def test_stop_string_spanning_tokens_is_cut_and_never_emitted(tokenizer) -> None:
    detok, chunks, _ = stream(tokenizer, "The answer is forty-two, surely.", stop=["forty-two"])
    assert detok.stopped
    assert "".join(chunks) == "The answer is "
    assert detok.text == "The answer is "


def test_text_that_may_become_a_stop_string_is_held_then_released(tokenizer) -> None:
    detok, chunks, _ = stream(tokenizer, "I like forty cats", stop=["forty-two"])
    assert not detok.stopped
    assert "".join(chunks) + detok.flush() == "I like forty cats"


@pytest.mark.parametrize(
    ("text", "spelled"),
    [
        ("It was written by STEPHEN KING in 1974.", "STEP"),
        # byte-level BPE spells "é" over two tokens, which the window decodes back into one character
        ("Écrit en 1974 par Stéphen Kïng, à Bangor.", "Sté"),
    ],
)
def test_forbidden_string_reports_the_token_where_it_began(tokenizer, text: str, spelled: str) -> None:
    detok, chunks, steps = stream(tokenizer, text, forbidden=ForbiddenMatcher(["Stephen King"]))
    violation = steps[-1].violation
    assert violation is not None
    emitted = "".join(chunks)
    assert not ForbiddenMatcher(["Stephen"]).contains(emitted)
    tokens = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(tokens[violation:]).lstrip().startswith(spelled)
    assert spelled not in tokenizer.decode(tokens[:violation])
    detok.rollback(violation)
    assert detok.text == emitted
    assert emitted == tokenizer.decode(tokens[:violation])


def test_possible_forbidden_prefix_is_released_at_the_end(tokenizer) -> None:
    detok, chunks, _ = stream(
        tokenizer, "The author is Stephen", forbidden=ForbiddenMatcher(["Stephen King"])
    )
    assert "".join(chunks) == "The author is"  # held while it may still become the string
    assert detok.flush() == " Stephen"  # a prefix is not the string: released at the end
