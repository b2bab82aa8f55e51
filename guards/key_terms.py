"""Key terms of a target's documents: the names, titles and years that state the knowledge.

GUARD takes its forbidden tokens from the retrieved forget answers; a target registered with
documents has no answers, but the answers to questions about it are overwhelmingly the proper
nouns and years its documents mention (a debut novel, a birthplace, a founding year). Those are
the terms a fired request must not produce. The words of a longer name count on their own too: a
model that may not say "Mona Lisa" still answers "the Mona" when asked to complete "the ___ Lisa".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

import regex

# A run of capitalised words, allowing a few lower-case joiners inside ("Order of the Phoenix").
_PROPER_RUN = regex.compile(
    r"\b\p{Lu}[\p{L}'’\-]+(?:\s+(?:(?:of|the|de|da|von|van|la|le|du|del)\s+)*\p{Lu}[\p{L}'’\-]+)*"
)
_YEAR = regex.compile(r"\b(?:1[0-9]{3}|20[0-9]{2})\b")
# Capitalised only because they start a sentence or are too common to carry knowledge.
_COMMON_WORDS = """
a an and are as at be but by for from had has have he her his i if in is it its my no not of on or our she so
that the their them then there these they this those to was we were what when where which while who why will
with you your after also although before during however many most one other some such since until early later
first last new old born called known according despite following see further external links references notes
reading views another scholars isbn retrieved archived january february march april may june july august
september october november december
"""
_COMMON = frozenset(_COMMON_WORDS.split())


def _clean(term: str) -> str:
    words = term.split()
    while words and words[0].lower() in _COMMON:
        words = words[1:]
    while words and words[-1].lower() in _COMMON:
        words = words[:-1]
    return " ".join(words).strip("'’-")


def _worth_forbidding(term: str) -> bool:
    return len(term) >= 3 and term.lower() not in _COMMON


def proper_phrases(document: str) -> Iterator[str]:
    """The proper-noun phrases of a document, in order, without the common words around them."""
    for found in _PROPER_RUN.finditer(document):
        term = _clean(found.group())
        if _worth_forbidding(term):
            yield term


def key_terms(documents: Iterable[str], limit: int = 300, min_count: int = 1) -> list[str]:
    """The most repeated proper-noun phrases, their words, and years across the documents, most
    frequent first."""
    counts: Counter[str] = Counter()
    for document in documents:
        for term in proper_phrases(document):
            counts[term] += 1
            if " " in term:
                counts.update(word for word in (_clean(w) for w in term.split()) if _worth_forbidding(word))
        counts.update(_YEAR.findall(document))
    ranked = sorted((term for term, n in counts.items() if n >= min_count), key=lambda t: (-counts[t], t))
    return ranked[:limit]
