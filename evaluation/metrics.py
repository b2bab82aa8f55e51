"""Answer metrics, each as its benchmark defines it.

ROUGE-L comes from Google's `rouge-score` (lower-cased alphanumeric tokens). RWKU's reference
code scores with the older `rouge` package, which compares raw whitespace tokens, so "author,"
there fails to match "author"; we keep RWKU's recall but take the tokenisation of `rouge-score`
with its Porter stemmer as TOFU does. MUSE scores with `rouge-score` and no stemmer, which callers
select with `stemmer=False`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Collection, Iterable
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

from lethe.guards.config import DetectionConfig
from lethe.guards.names import NameIndex, NameSource, normalize

if TYPE_CHECKING:
    from nltk.tokenize import NLTKWordTokenizer
    from rouge_score.rouge_scorer import RougeScorer
    from rouge_score.tokenizers import Tokenizer

ENTROPY_ORDERS = (2, 3)
ENTROPY_WEIGHTS = (2 / 3, 4 / 3)
"""RWKU's fluency: bigram and trigram entropies (bits), weighted 2/3 and 4/3, then averaged."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class RougeL(NamedTuple):
    recall: float
    f1: float


@lru_cache(maxsize=2)
def _scorer(stemmer: bool) -> RougeScorer:
    # Imported here: rouge-score pulls in nltk and absl, which `lethe --help` should not pay for.
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], use_stemmer=stemmer)


def rouge_l(reference: str, prediction: str, *, stemmer: bool = True) -> RougeL:
    """ROUGE-L of `prediction` against the gold `reference`.

    Recall (share of the reference's tokens found in order in the prediction) rewards any answer
    that contains the gold one, however long; F1 also charges for the extra words.
    """
    score = _scorer(stemmer).score(reference, prediction)["rougeL"]
    return RougeL(recall=score.recall, f1=score.fmeasure)


@lru_cache(maxsize=2)
def _rouge_tokenizer(stemmer: bool) -> Tokenizer:
    from rouge_score.tokenizers import DefaultTokenizer

    return DefaultTokenizer(use_stemmer=stemmer)


@lru_cache(maxsize=2)
def _stop_words(stemmer: bool) -> frozenset[str]:
    """scikit-learn's English stop words (the Glasgow list), in `rouge-score`'s token forms."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    tokenize = _rouge_tokenizer(stemmer).tokenize
    return frozenset(token for word in ENGLISH_STOP_WORDS for token in tokenize(word))


def content_tokens(reference: str, given: str = "", *, stemmer: bool = True) -> Counter[str]:
    """The gold answer's content words (`rouge-score` tokens, stop words left out) that `given`, the
    prompt, does not contain: what an answer can only say if the model knows it."""
    tokenize = _rouge_tokenizer(stemmer).tokenize
    skip = _stop_words(stemmer) | set(tokenize(given))
    return Counter(token for token in tokenize(reference) if token not in skip)


def new_word_recall(reference: str, prediction: str, prompt: str, *, stemmer: bool = True) -> float | None:
    """Share of the gold answer's content words that the prompt does not give and the prediction says.

    ROUGE-L recall credits an answer for repeating the question: "University" of "University of
    Nebraska" in any answer to "Which university did he attend?", "The" of "The Golden Girls"
    anywhere. A guarded model that decodes around a target still repeats those words; this score
    counts only the words it had to know (clipped unigram counts, `rouge-score` tokens). None when
    the prompt holds every content word of the gold, as a multiple-choice question lists the answer.
    """
    wanted = content_tokens(reference, prompt, stemmer=stemmer)
    if not wanted:
        return None
    said = wanted & Counter(_rouge_tokenizer(stemmer).tokenize(prediction))
    return sum(said.values()) / sum(wanted.values())


def without_words(text: str, tokens: Collection[str], *, stemmer: bool = True) -> str:
    """`text` less every whitespace-separated word that spells one of `tokens` (`rouge-score` forms):
    the answer as it would read had decoding never been allowed to say them."""
    tokenize = _rouge_tokenizer(stemmer).tokenize
    return " ".join(word for word in text.split() if not any(token in tokens for token in tokenize(word)))


@lru_cache(maxsize=64)
def _names_of(name: str) -> NameIndex:
    config = DetectionConfig()
    return NameIndex(
        [NameSource(name, name)],
        config.fuzzy_min_chars,
        config.fuzzy_two_edits_min_chars,
        config.fuzzy_single_word_min_chars,
    )


def says_name(text: str, name: str) -> bool:
    """Whether `text` says `name` in full as the gateway's detection reads names: whatever the case,
    accents, spacing or middle names, and through small misspellings ("Warre Buffetti", which a
    reader takes for the name as surely as the name itself). A given name or surname alone is not
    the name."""
    return any(match.kind == "full" for match in _names_of(name).find(text))


def contains_phrase(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` as whole words, whatever the case and accents.

    Lookarounds rather than `\\b` so that phrases that start or end with punctuation ("H.P.
    Lovecraft", "$5") still match; runs of whitespace compare equal.
    """
    words = normalize(phrase).split()
    if not words:
        return False
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(word) for word in words) + r"(?!\w)"
    return re.search(pattern, normalize(text)) is not None


FACT_SHARE = 0.5
"""`states_fact`: the share of the gold's new content words an answer must say."""


def states_fact(reference: str, prediction: str, prompt: str, *, stemmer: bool = True) -> bool:
    """Whether `prediction` states the fact of a whole-sentence gold answer (TOFU's): it says at least
    half (`FACT_SHARE`) of the gold's content words that the question does not give
    (`new_word_recall`). "The father of Hsiao Yun-Hwa is a civil engineer", asked "What is the
    profession of Hsiao Yun-Hwa's father?", needs "civil" or "engineer"; an answer that repeats the
    question's words and names another profession does not count. When the question gives every
    content word of the gold, ROUGE-L recall of at least `FACT_SHARE` counts instead."""
    share = new_word_recall(reference, prediction, prompt, stemmer=stemmer)
    if share is None:
        share = rouge_l(reference, prediction, stemmer=stemmer).recall
    return share >= FACT_SHARE


@lru_cache(maxsize=1)
def _word_tokenizer() -> NLTKWordTokenizer:
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokens(text: str) -> list[str]:
    """Treebank word tokens, as `nltk.word_tokenize` gives them.

    `word_tokenize` first splits sentences with the punkt model, a data download that a run must
    not need; splitting after sentence-final punctuation gives the same tokens for ordinary prose.
    """
    tokenizer = _word_tokenizer()
    return [token for sentence in _SENTENCE_END.split(text.strip()) for token in tokenizer.tokenize(sentence)]


def ngram_entropy(text: str) -> float:
    """RWKU's fluency score of one answer: low when it repeats itself, zero for fewer than two tokens."""
    tokens = word_tokens(text)
    weighted = []
    for order, weight in zip(ENTROPY_ORDERS, ENTROPY_WEIGHTS, strict=True):
        counts = Counter(tuple(tokens[i : i + order]) for i in range(len(tokens) - order + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(entropy * weight)
    return sum(weighted) / len(weighted)


def agreement(pairs: Iterable[tuple[str, str]]) -> float | None:
    """Share of (output, baseline output) pairs that are identical; None when there are none.

    Exact string equality on purpose: under greedy decoding an unguarded request should come
    back byte for byte the same, so any difference is the guard's doing.
    """
    matches = [a == b for a, b in pairs]
    return sum(matches) / len(matches) if matches else None


def mean(values: Iterable[float | bool | None]) -> float | None:
    """Arithmetic mean of the values that are present; None when none are."""
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None
