"""Retain data about the target's neighbours: what the model itself says about the people, works
and places that the target's documents name.

General retain text (short world facts, instructions) does not exercise what a model knows about
the entities closest to a target, so SSD takes those weights for the target's own and dampens
them, and FLAT's refusals spread to questions about them: a model that forgets Stephen King can
lose "The Shining" with him. The documents name those neighbours, and the model's own
descriptions of them are text that SSD's retain Fisher and FLAT's retain loss can hold on to. No
evaluation data is read, and sentences that mention the target are dropped. Measured on ten RWKU
targets (README), this protects the neighbours, but on the embedded model it protects much of the
forget knowledge along with them.

The next neighbours down the list, never trained on, are FLAT's stopping check
(`neighbour_checks`): a question about one of them pairs the model's answer from before training
with the template answer, and FLAT has gone too far once the template wins on many of them.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import regex
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lethe.guards.key_terms import proper_phrases
from lethe.models.unlearning.data import (
    FALLBACK_TEMPLATE_ANSWERS,
    QUESTION_TEMPLATES,
    ForgetSet,
    LabelledSequence,
    NeighbourCheck,
    RetainItem,
    answer_ids,
    chat_prompt,
)
from lethe.models.unlearning.generation import greedy_answers
from lethe.models.unlearning.progress import StepCallback, no_progress

NEIGHBOUR_ANSWER_TOKENS = 96
"""Long enough for a few facts, short enough that a greedy answer has not started repeating itself."""

HELD_OUT_NEIGHBOURS = 8
"""Neighbours per target, after the trained ones, that FLAT's stopping check asks about."""

CHECK_ANSWER_TOKENS = 48
"""Answer tokens a stopping check scores: enough to tell an answer from a refusal, and half the cost
of whole descriptions (80 questions: ~30 s on 2 cores, about two training steps)."""

_SENTENCE_END = regex.compile(r"(?<=[.!?])\s+")
_WORD = regex.compile(r"\p{L}+")
_POSSESSIVE = regex.compile(r"['’]s$")


def _words(text: str) -> set[str]:
    return {word.casefold() for word in _WORD.findall(text)}


def _own_words(forget: ForgetSet) -> set[str]:
    """The target's name words that identify it (not "da", "of", initials)."""
    return {word for word in _words(forget.name) if len(word) >= 3}


def neighbour_entities(forget: ForgetSet, limit: int) -> list[str]:
    """The names most often mentioned in the target's documents, other than the target's own: the
    neighbours whose knowledge must survive. Of two names where one holds the other's words
    ("Berkshire", "Berkshire Hathaway"), only the longer is kept."""
    own = _own_words(forget)
    counts: Counter[str] = Counter()
    for document in forget.documents:
        for phrase in proper_phrases(document):
            name = _POSSESSIVE.sub("", phrase)
            if len(name) >= 3 and not _words(name) & own:
                counts[name] += 1
    chosen: list[str] = []
    for name, _ in counts.most_common():
        words = _words(name)
        if any(words <= _words(kept) for kept in chosen):
            continue
        chosen = [kept for kept in chosen if not _words(kept) <= words] + [name]
        if len(chosen) >= limit:
            break
    return chosen[:limit]


def without_target(text: str, forget: ForgetSet) -> str:
    """`text` without the sentences that mention any word of the target's name."""
    own = _own_words(forget)
    kept = [sentence for sentence in _SENTENCE_END.split(text.strip()) if not _words(sentence) & own]
    return " ".join(kept).strip()


class NeighbourItem(RetainItem):
    """A neighbour's description, with whose neighbour it is and its rank in `neighbour_entities`."""

    target: str
    entity: str
    rank: int


def neighbour_retain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sets: Sequence[ForgetSet],
    *,
    per_target: int,
    max_new_tokens: int,
    step: StepCallback = no_progress,
) -> list[NeighbourItem]:
    """The model's greedy answers about each target's `per_target` neighbours, with the sentences
    that mention the target removed (answers left empty are dropped), in target order. The
    questions are the ones forget answers are taught under (`QUESTION_TEMPLATES`), so that the
    retain data differs from the forget data in whom it is about, not in how it is asked."""
    prompts: list[tuple[ForgetSet, str, int, str]] = [
        (forget, entity, rank, QUESTION_TEMPLATES[rank % len(QUESTION_TEMPLATES)].format(name=entity))
        for forget in sets
        for rank, entity in enumerate(neighbour_entities(forget, per_target))
    ]
    if not prompts:
        return []
    answers = greedy_answers(
        model, tokenizer, [prompt for *_, prompt in prompts], max_new_tokens=max_new_tokens, step=step
    )
    items = []
    for (forget, entity, rank, prompt), answer in zip(prompts, answers, strict=True):
        text = without_target(answer, forget)
        if text:
            item = NeighbourItem(prompt=prompt, text=text, target=forget.name, entity=entity, rank=rank)
            items.append(item)
    return items


def neighbour_checks(
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[NeighbourItem],
    sets: Sequence[ForgetSet],
    *,
    seed: int,
) -> list[NeighbourCheck]:
    """Each held-out description (its first `CHECK_ANSWER_TOKENS`) against one of the template
    answers FLAT trains its target's forget questions towards, to the same question. Those
    templates name the target ("I'm not sure about Stephen King."). A first version that put the
    neighbour's name in the template and scored whole descriptions separated the earlier
    checkpoints less well (README)."""
    rng = random.Random(seed + 2)
    templates = {forget.name: forget.templates or list(FALLBACK_TEMPLATE_ANSWERS) for forget in sets}
    checks = []
    for item in items:
        assert item.prompt is not None
        prompt = chat_prompt(tokenizer, item.prompt)
        checks.append(
            NeighbourCheck(
                own=LabelledSequence(
                    prompt=prompt, answer=answer_ids(tokenizer, item.text, CHECK_ANSWER_TOKENS)
                ),
                template=LabelledSequence(
                    prompt=prompt,
                    answer=answer_ids(tokenizer, rng.choice(templates[item.target]), CHECK_ANSWER_TOKENS),
                ),
            )
        )
    return checks
