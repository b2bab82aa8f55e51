"""What gets embedded: targets cut into sentence-sized anchors, and texts cut into query chunks.

MiniLM was trained on sentence pairs of up to 128 tokens: one vector for a whole passage blurs
every fact in it into an average that matches nothing well, and a long prompt truncated at the
model's limit silently loses its end. Both sides are therefore embedded sentence by sentence.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from lethe.guards.targets import Target

AnchorKind = Literal["name", "description", "content"]
"""`name`: the name and aliases; `description`: sentences saying who or what the target is;
`content`: knowledge about it (document sentences, example prompts). They are weighed apart:
closeness to a fact in a document is weaker evidence than closeness to the target's identity,
because documents also describe the target's neighbours; and a text sharing only a first name
with the target is close to its name anchor but not to anything said about it.
"""

_ABBREVIATIONS = frozenset(
    """
    mr mrs ms dr prof sr jr st mt ft no vs etc inc ltd co corp gen col capt lt sgt rev hon fig al approx
    jan feb mar apr jun jul aug sep sept oct nov dec e.g i.e u.s u.k
    """.split()  # noqa: SIM905 (a word list reads better as words)
)
"""Words after which a full stop does not end a sentence; single initials ("J. K.") are handled
separately."""

_BOUNDARY = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9À-Ý])|\n\s*\n|\n(?=\s*[-*•\d])")
_WORD = re.compile(r"\S+")
_MIN_QUERY_WORDS = 3
_MIN_ANCHOR_WORDS = 4


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


def sentence_pieces(text: str, max_words: int, min_words: int) -> list[str]:
    """One piece per sentence of `text`: a sentence shorter than `min_words` joins the one before
    it (a lone "Carrie (1974)." or "Answer:" says little), one longer than `max_words` is cut into
    word windows."""
    pieces: list[str] = []
    for sentence in split_sentences(text):
        for window in _word_windows(sentence, max_words):
            if pieces and len(window.split()) < min_words:
                pieces[-1] = f"{pieces[-1]} {window}"
            else:
                pieces.append(window)
    return pieces


_LEAD_NAME = re.compile(
    r"^\s*(?P<name>[A-Z][\w'’.-]*(?:\s+(?:[A-Z][\w'’.-]*|da|de|di|del|der|van|von|ser|bin|ibn|al))+)\s*"
    r"(?:,[^,(]{1,60})?\((?:[^)]*?\b(?:born|née|né)\s+(?P<born>[A-Z][\w'’-]*(?:\s+[A-Z][\w'’-]*)*))?"
)


_MONTHS = frozenset(
    "january february march april may june july august september october november december".split()  # noqa: SIM905
)


def lead_names(target: Target) -> list[str]:
    """Fuller names of the target read from the opening of its documents.

    Encyclopedic documents open with the subject's full name, perhaps a title, and in parentheses
    a birth name: "Genghis Khan (born Temüjin; ...)", "Sir Anthony Charles Lynton Blair (born 6 May
    1953)", "Augusta Ada King, Countess of Lovelace (born Augusta Ada Byron; ...)". A
    question using those forms is about the target just as much as one using its registered name.
    A lead counts only when it shares a word with the registered name, so a document that opens
    with someone else is ignored.
    """
    own = {word.casefold() for word in target.name.split() if len(word) > 2}
    names: list[str] = []
    for document in target.documents:
        lead = _LEAD_NAME.match(document)
        if lead is None or not own & {word.casefold() for word in lead["name"].split()}:
            continue
        names.append(lead["name"])
        born = lead["born"]
        if (
            born
            and born.split()[0].casefold() not in _MONTHS
            and not own >= {w.casefold() for w in born.split()}
        ):
            names.append(born)
    return [name for name in dict.fromkeys(names) if name.casefold() != target.name.casefold()]


def target_anchors(target: Target, max_words: int, max_content: int) -> list[Anchor]:
    """The texts that stand for `target` in the embedding index, without duplicates.

    A document sentence is one anchor (joined to the one before only when very short), so a
    question about one fact meets that fact rather than the average of a passage. At most
    `max_content` content anchors are kept, spread evenly over all of them, so that one target
    with thousands of pages cannot dominate build time and memory.
    """
    names = [target.name, *target.aliases]
    description = sentence_pieces(target.description, max_words, _MIN_ANCHOR_WORDS)
    content = [
        piece
        for document in target.documents
        for piece in sentence_pieces(document, max_words, _MIN_ANCHOR_WORDS)
    ]
    content += target.examples
    if len(content) > max_content:
        step = len(content) / max_content
        content = [content[int(i * step)] for i in range(max_content)]
    anchors: dict[str, Anchor] = {}
    for kind, texts in (("name", names), ("description", description), ("content", content)):
        for text in texts:
            anchors.setdefault(text.casefold(), Anchor(text, kind))
    return list(anchors.values())


def query_chunks(text: str, max_words: int, max_chunks: int) -> list[str]:
    """The pieces of a prompt to embed: one per sentence, and the last `max_chunks` of them.

    A question embedded together with the instruction around it ("Please briefly answer the
    following question.") lands between the two, and loses its similarity to the one fact it asks
    about. The end of a prompt is kept because that is where a chat template puts the newest
    turn; name matching reads all of it.
    """
    return sentence_pieces(text, max_words, _MIN_QUERY_WORDS)[-max_chunks:]


def tail_window(text: str, max_chars: int) -> str:
    """The last `max_chars` characters of `text`, starting at a word boundary."""
    if len(text) <= max_chars:
        return text
    window = text[-max_chars:]
    cut = re.search(r"\s", window)
    return window[cut.end() :] if cut else window
