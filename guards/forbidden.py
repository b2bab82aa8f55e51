"""Forbidden strings: matching them in streamed text, and the token sequences that can spell them.

The invariant is on text, not tokens: a forbidden string must never reach the client whatever the
tokenization, case, spacing or accents the model chooses. Token-level bans (cheap, applied to the
logits) prevent most matches before they happen; the text matcher catches the rest and asks the
engine to undo the tokens that completed a match.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import regex

from lethe.guards.names import common_words, normalize

Encode = Callable[[str], list[int]]


def _pattern_for(string: str) -> str:
    """Case-insensitive literal of `string`'s folded form whose internal whitespace may be any run
    of whitespace. A word that folds to nothing (a combining accent on its own) is refused: its
    pattern would match the empty string, that is everywhere, and empty every answer."""
    words = [normalize(word) for word in string.split()]
    if not words or not all(words):
        raise ValueError(f"the forbidden string {string!r} folds to an empty pattern")
    return r"\s+".join(regex.escape(word) for word in words)


def _folded(text: str) -> tuple[str, list[int]]:
    """`text` folded as name matching folds it ("Sócrates", "ＳＯＣＲＡＴＥＳ" -> "socrates"), and for
    each folded character the index of the character of `text` it comes from. Folding may drop a
    character (a combining accent) or expand one ("ﬁ" -> "fi")."""
    pieces: list[str] = []
    origin: list[int] = []
    for index, char in enumerate(text):
        folded = normalize(char) if not char.isascii() else char
        pieces.append(folded)
        origin += [index] * len(folded)
    return "".join(pieces), origin


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
    also parts of ordinary words ("thinking") that must stay sayable; `names` match as whole words
    within one misspelt letter, except where the word written is an everyday word ("Buffet" for
    "Buffett", "warden" for "Warren").
    """

    def __init__(self, strings: Iterable[str], words: Iterable[str] = (), names: Iterable[str] = ()) -> None:
        strings = {s.strip() for s in strings if s.strip()}
        words = {w.strip() for w in words if w.strip()} - strings
        alternatives = [_pattern_for(s) for s in sorted(strings, key=len, reverse=True)]
        alternatives += [rf"(?<!\w){_pattern_for(w)}(?!\w)" for w in sorted(words, key=len, reverse=True)]
        self._pattern = regex.compile("|".join(alternatives), regex.IGNORECASE) if alternatives else None
        misspelt = [
            rf"(?:{_pattern_for(n)}){{e<=1:\p{{L}}}}" for n in sorted({n.strip() for n in names} - {""})
        ]
        self._names = (
            regex.compile(rf"(?<!\w)(?:{'|'.join(misspelt)})(?!\w)", regex.IGNORECASE) if misspelt else None
        )

    def __bool__(self) -> bool:
        return self._pattern is not None or self._names is not None

    def search(self, text: str, start: int = 0) -> Match | None:
        """The earliest match at or after `start`. Plain ASCII text, the usual case, is searched as
        it is; otherwise the text from the character before `start` (which the whole-word test
        reads) is searched folded, and the match mapped back onto `text`."""
        offset = max(0, start - 1)
        if text[offset:].isascii():
            return self._earliest(text, start)
        folded, origin = _folded(text[offset:])
        found = self._earliest(folded, bisect.bisect_left(origin, start - offset))
        if found is None:
            return None
        end = origin[found.end - 1] + 1 + offset if found.end < len(folded) else len(text)
        return Match(origin[found.start] + offset, end, found.partial)

    def contains(self, text: str) -> bool:
        """Whether `text` holds a complete forbidden string (for checks and tests)."""
        folded = _folded(text)[0]
        position = 0
        while (found := self._earliest(folded, position)) is not None:
            if not found.partial:
                return True
            position = found.start + 1
        return False

    def _earliest(self, text: str, position: int) -> Match | None:
        found = [
            match for match in (self._string(text, position), self._misspelt_name(text, position)) if match
        ]
        return min(found, key=lambda match: (match.start, match.partial)) if found else None

    def _string(self, text: str, position: int) -> Match | None:
        if self._pattern is None:
            return None
        found = self._pattern.search(text, pos=position, partial=True)
        if found is None or found.start() == len(text):  # an empty partial at the very end holds nothing
            return None
        return Match(found.start(), found.end(), bool(found.partial))

    def _misspelt_name(self, text: str, position: int) -> Match | None:
        if self._names is None:
            return None
        while (found := self._names.search(text, pos=position, partial=True)) is not None:
            if found.start() == len(text):
                return None
            if found.partial or normalize(found.group()) not in common_words():
                return Match(found.start(), found.end(), bool(found.partial))
            position = max(found.end(), position + 1)
        return None


@lru_cache(maxsize=256)
def matcher_for(
    strings: tuple[str, ...], words: tuple[str, ...], names: tuple[str, ...] = ()
) -> ForbiddenMatcher:
    """A compiled matcher, shared by every request with the same plan (compiling one pattern over
    every registered string per request would cost more than the request's decode steps)."""
    return ForbiddenMatcher(strings, words, names)


def spelling_variants(string: str) -> set[str]:
    """The surface forms a model most often produces for a string: cases, with and without a
    leading space (byte-level BPE tokenizes " Paris" and "Paris" differently)."""
    forms = {string, string.lower(), string.upper(), string.title(), string.capitalize()}
    return {prefix + form for form in forms for prefix in ("", " ")}


def banned_token_sequences(strings: Sequence[str], encode: Encode) -> tuple[tuple[int, ...], ...]:
    """Token sequences that spell the strings' common variants, for the decode-time ban."""
    sequences = {tuple(encode(variant)) for string in strings for variant in spelling_variants(string)}
    return tuple(sorted(s for s in sequences if s))
