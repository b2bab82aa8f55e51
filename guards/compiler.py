"""Compiling registered targets into what the engine enforces: forbidden strings, token bans and
semantic penalties per target, merged into one small plan for the targets a request fires."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lethe.guards.config import GuardConfig
from lethe.guards.features import TargetFeatures
from lethe.guards.forbidden import banned_token_sequences, spelling_variants
from lethe.guards.key_terms import key_terms
from lethe.guards.plan import GuardPlan
from lethe.guards.targets import Policy, Target, term_problem

Encode = Callable[[str], list[int]]


class UnenforceableTarget(ValueError):
    """A target the guard cannot enforce: one of its forbidden strings would match everywhere
    (it folds to nothing) or hides invisible characters. The admin API refuses such strings; one can
    still come from an old or hand-edited store, and then the gateway fails closed."""

    def __init__(self, target_id: str, field: str, text: str, problem: str) -> None:
        super().__init__(f"target {target_id}: {field} {text!r} {problem}")
        self.target_id = target_id


@dataclass(frozen=True)
class Vocabulary:
    """The model's vocabulary as the semantic penalty sees it."""

    embeddings: np.ndarray
    """Centred, row-normalised input embeddings [vocab, hidden]."""
    words: np.ndarray
    """Boolean [vocab]: the token is a whole word of letters (sub-word pieces and punctuation have
    embeddings close to everything and must neither anchor nor receive the penalty)."""

    @classmethod
    def build(cls, embeddings: np.ndarray, token_texts: Sequence[str]) -> Vocabulary:
        words = np.array([len(t.strip()) >= 4 and t.strip().isalpha() for t in token_texts], dtype=bool)
        rows = min(len(embeddings), len(words))
        return cls(embeddings[:rows], words[:rows])


@dataclass(frozen=True)
class CompiledTarget:
    target_id: str
    policy: Policy
    forbidden_strings: tuple[str, ...]
    forbidden_words: tuple[str, ...]
    forbidden_names: tuple[str, ...]
    banned_sequences: tuple[tuple[int, ...], ...]
    penalized_tokens: tuple[int, ...]
    sae_clamp: tuple[tuple[int, float], ...] = ()


def _close_tokens(anchor_ids: set[int], vocabulary: Vocabulary | None, threshold: float) -> tuple[int, ...]:
    """Whole-word tokens whose input embedding is within `threshold` cosine of a whole-word anchor."""
    if vocabulary is None:
        return ()
    anchors = sorted(i for i in anchor_ids if i < len(vocabulary.words) and vocabulary.words[i])
    if not anchors:
        return ()
    similarity = (vocabulary.embeddings[anchors] @ vocabulary.embeddings.T).max(axis=0)
    return tuple(int(i) for i in np.flatnonzero((similarity >= threshold) & vocabulary.words))


def _common_word(term: str, encode: Encode) -> bool:
    """A one-word term whose lower-case form is a single vocabulary token is an everyday word
    ("Writing", "American"): forbidding it would cripple answers while hiding nothing specific."""
    return " " not in term and not term.isdigit() and len(encode(" " + term.lower())) == 1


def _name_words(strings: Sequence[str], min_chars: int) -> tuple[str, ...]:
    """The long words of a target's names and aliases, which a fired request may not write
    misspelt either: kept from the name, the model writes "Warre Buffetti". A word this long is
    seldom one letter away from another word, and the matcher lets everyday words through."""
    words = (word.strip(".,'’") for string in strings for word in string.split())
    return tuple(dict.fromkeys(word for word in words if len(word) >= min_chars and word.isalpha()))


def compile_target(
    target: Target,
    encode: Encode,
    vocabulary: Vocabulary | None,
    config: GuardConfig,
    features: TargetFeatures | None = None,
) -> CompiledTarget:
    """Everything about one target that does not depend on the request, computed at registration.
    Raises UnenforceableTarget rather than compile a string that would match everywhere; key terms
    mined from the documents that could not be forbidden strings are left out. `features` are the
    target's SAE features under the served SAE, if any; they are clamped unless the target asks for
    decoding restrictions only, and a target that asks for the clamp only gets no decoding
    restriction at all (not even its name matched in answers), so that each mechanism can be
    measured alone."""
    for field, texts in (
        ("name", [target.name]),
        ("alias", target.aliases),
        ("forbidden string", target.forbidden),
    ):
        for text in texts:
            if (problem := term_problem(text)) is not None:
                raise UnenforceableTarget(target.id, field, text, problem)
    clamp = features.clamp(config.sae_clamp_multiple) if features and target.suppression != "decoding" else ()
    if target.suppression == "sae":
        return CompiledTarget(
            target_id=target.id,
            policy=target.policy,
            forbidden_strings=(),
            forbidden_words=(),
            forbidden_names=(),
            banned_sequences=(),
            penalized_tokens=(),
            sae_clamp=clamp,
        )
    strings = tuple(dict.fromkeys([target.name, *target.aliases, *target.forbidden]))
    registered = {s.casefold() for s in strings}
    words = tuple(
        term
        for term in key_terms(target.documents, config.key_terms, config.key_term_min_count)
        if term.casefold() not in registered and term_problem(term) is None and not _common_word(term, encode)
    )
    sequences = banned_token_sequences([*strings, *words], encode)
    # Anchors are the words of the forbidden texts that are one token each: the first piece of a
    # longer word (" Step" of " Stephen") is near everything that starts alike.
    anchors = {
        tokens[0]
        for text in (*strings, *words)
        for word in text.split()
        if not _common_word(word, encode)
        for tokens in (encode(v) for v in spelling_variants(word))
        if len(tokens) == 1
    }
    return CompiledTarget(
        target_id=target.id,
        policy=target.policy,
        sae_clamp=clamp,
        forbidden_strings=strings,
        forbidden_words=words,
        forbidden_names=_name_words([target.name, *target.aliases], config.misspelt_name_min_chars),
        banned_sequences=sequences,
        penalized_tokens=_close_tokens(anchors, vocabulary, config.penalty_similarity),
    )


def plan_for(fired: Sequence[CompiledTarget], config: GuardConfig) -> GuardPlan:
    """The union of the fired targets' restrictions (an empty plan when nothing fired)."""
    if not fired:
        return GuardPlan()
    return GuardPlan(
        target_ids=tuple(t.target_id for t in fired),
        banned_sequences=tuple(sorted({s for t in fired for s in t.banned_sequences})),
        forbidden_strings=tuple(dict.fromkeys(s for t in fired for s in t.forbidden_strings)),
        forbidden_words=tuple(dict.fromkeys(w for t in fired for w in t.forbidden_words)),
        forbidden_names=tuple(dict.fromkeys(w for t in fired for w in t.forbidden_names)),
        penalized_tokens=tuple(sorted({i for t in fired for i in t.penalized_tokens})),
        penalty=config.penalty,
        sae_clamp=_merged_clamp(fired),
    )


def _merged_clamp(fired: Sequence[CompiledTarget]) -> tuple[tuple[int, float], ...]:
    """One value per feature: where two fired targets share a feature, the stronger clamp."""
    values: dict[int, float] = {}
    for target in fired:
        for feature, value in target.sae_clamp:
            values[feature] = min(value, values.get(feature, value))
    return tuple(sorted(values.items()))
