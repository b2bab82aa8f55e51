"""What gets embedded: targets cut into sentence-sized anchors, and texts cut into query chunks.

MiniLM was trained on sentence pairs of up to 128 tokens: one vector for a whole passage blurs
every fact in it into an average that matches nothing well, and a long prompt truncated at the
model's limit silently loses its end. Both sides are therefore cut at sentence boundaries into
pieces of comparable size before they are embedded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from guards.targets import Target

AnchorKind = Literal["identity", "content"]
"""`identity`: says who or what the target is (name, aliases, description); `content`: knowledge
about it (document sentences, example prompts). They get separate thresholds because a question
close to a fact in a document is weaker evidence than one close to the target's identity: the
documents also mention the target's neighbours."""

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt ft no vs etc inc ltd co corp gen col capt lt sgt rev hon fig al approx "
    "jan feb mar apr jun jul aug sep sept oct nov dec e.g i.e u.s u.k".split()
)
"""Words after which a full stop does not end a sentence; single initials ("J. K.") are handled
separately."""

_BOUNDARY = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9À-Ý])|\n\s*\n|\n(?=\s*[-*•\d])")
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Anchor:
    text: str
    kind: AnchorKind


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, without splitting after abbreviations or initials."""
    sentences: list[str] = []
    start = 0
    for boundary in _BOUNDARY.finditer(text):
        candidate = text[start : boundary.start()].strip()
        last_word = candidate.rsplit(None, 1)[-1] if candidate else ""
        stem = last_word.rstrip(".").lower()
        if last_word.endswith(".") and (stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha())):
            continue
        if candidate:
            sentences.append(candidate)
        start = boundary.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _word_windows(sentence: str, max_words: int) -> Iterator[str]:
    words = _WORD.findall(sentence)
    for start in range(0, len(words), max_words):
        yield " ".join(words[start : start + max_words])


def pack_sentences(text: str, max_words: int, min_words: int = 1) -> list[str]:
    """Consecutive sentences packed into pieces of at most `max_words` words.

    Pieces shorter than `min_words` are merged into their neighbour (a lone "Carrie (1974)." says
    little on its own); a sentence longer than `max_words` is cut into word windows.
    """
    pieces: list[str] = []
    current: list[str] = []
    current_words = 0
    for sentence in split_sentences(text):
        for window in _word_windows(sentence, max_words):
            words = len(window.split())
            if current and current_words + words > max_words and current_words >= min_words:
                pieces.append(" ".join(current))
                current, current_words = [], 0
            current.append(window)
            current_words += words
    if current:
        if pieces and current_words < min_words and len(pieces[-1].split()) + current_words <= max_words:
            pieces[-1] = f"{pieces[-1]} {' '.join(current)}"
        else:
            pieces.append(" ".join(current))
    return pieces


def target_anchors(target: Target, max_words: int, max_content: int) -> list[Anchor]:
    """The texts that stand for `target` in the embedding index, without duplicates.

    A document sentence is one anchor (packed with its neighbours only when very short), so a
    question about one fact meets that fact rather than the average of a passage. At most
    `max_content` content anchors are kept, spread evenly over all of them, so that one target
    with thousands of pages cannot dominate build time and memory.
    """
    identity = [target.name, *target.aliases]
    if target.description:
        identity += pack_sentences(target.description, max_words, min_words=4)
    content = [piece for document in target.documents for piece in pack_sentences(document, max_words, 4)]
    content += target.examples
    if len(content) > max_content:
        step = len(content) / max_content
        content = [content[int(i * step)] for i in range(max_content)]
    anchors: dict[str, Anchor] = {}
    for kind, texts in (("identity", identity), ("content", content)):
        for text in texts:
            anchors.setdefault(text.casefold(), Anchor(text, kind))
    return list(anchors.values())


def query_chunks(text: str, max_words: int, max_chunks: int) -> list[str]:
    """The pieces of a prompt to embed: sentence-aligned, and the last `max_chunks` of them.

    The end of a prompt is kept because that is where a chat template puts the newest turn;
    name matching still reads the whole text.
    """
    return pack_sentences(text, max_words)[-max_chunks:]


def tail_window(text: str, max_chars: int) -> str:
    """The last `max_chars` characters of `text`, starting at a word boundary."""
    if len(text) <= max_chars:
        return text
    window = text[-max_chars:]
    cut = re.search(r"\s", window)
    return window[cut.end() :] if cut else window
