"""Forbidden strings: matching them in streamed text, and the token sequences that can spell them.

The invariant is on text, not tokens: a forbidden string must never reach the client whatever the
tokenization, case or spacing the model chooses. Token-level bans (cheap, applied to the logits)
prevent most matches before they happen; the text matcher catches the rest and asks the engine to
undo the tokens that completed a match.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import regex

Encode = Callable[[str], list[int]]


def _pattern_for(string: str) -> str:
    """Case-insensitive literal whose internal whitespace may be any run of whitespace."""
    return r"\s+".join(regex.escape(word) for word in string.split())


@dataclass(frozen=True)
class Match:
    start: int
    end: int
    partial: bool
    """True when the text ends inside a possible match: it is not a match yet but may become one."""


class ForbiddenMatcher:
    """Finds the earliest complete or possible (text ends mid-way) occurrence of any forbidden string.

    `strings` match anywhere (a registered name must not appear even inside a longer word);
    `words` match as whole words only, because terms mined from documents ("King", "Maine") are
    also parts of ordinary words ("thinking") that must stay sayable.
    """

    def __init__(self, strings: Iterable[str], words: Iterable[str] = ()) -> None:
        strings = {s.strip() for s in strings if s.strip()}
        words = {w.strip() for w in words if w.strip()} - strings
        alternatives = [_pattern_for(s) for s in sorted(strings, key=len, reverse=True)]
        alternatives += [rf"(?<!\w){_pattern_for(w)}(?!\w)" for w in sorted(words, key=len, reverse=True)]
        self._pattern = regex.compile("|".join(alternatives), regex.IGNORECASE) if alternatives else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def search(self, text: str, start: int = 0) -> Match | None:
        if self._pattern is None:
            return None
        found = self._pattern.search(text, pos=start, partial=True)
        if found is None or found.start() == len(text):  # an empty partial at the very end holds nothing
            return None
        return Match(found.start(), found.end(), bool(found.partial))

    def contains(self, text: str) -> bool:
        """Whether `text` holds a complete forbidden string (for checks and tests)."""
        return self._pattern is not None and self._pattern.search(text) is not None


@lru_cache(maxsize=256)
def matcher_for(strings: tuple[str, ...], words: tuple[str, ...]) -> ForbiddenMatcher:
    """A compiled matcher, shared by every request with the same plan (compiling one pattern over
    every registered string per request would cost more than the request's decode steps)."""
    return ForbiddenMatcher(strings, words)


def spelling_variants(string: str) -> set[str]:
    """The surface forms a model most often produces for a string: cases, with and without a
    leading space (byte-level BPE tokenizes " Paris" and "Paris" differently)."""
    forms = {string, string.lower(), string.upper(), string.title(), string.capitalize()}
    return {prefix + form for form in forms for prefix in ("", " ")}


def banned_token_sequences(strings: Sequence[str], encode: Encode) -> tuple[tuple[int, ...], ...]:
    """Token sequences that spell the strings' common variants, for the decode-time ban."""
    sequences = {tuple(encode(variant)) for string in strings for variant in spelling_variants(string)}
    return tuple(sorted(s for s in sequences if s))
