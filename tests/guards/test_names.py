"""Name and alias matching: robust to case, punctuation, spacing and misspellings, and not to
ordinary words, relatives or namesakes."""

from __future__ import annotations

import pytest

from lethe.guards.names import NameIndex, NameSource, normalized_words, partial_names


@pytest.fixture(scope="module")
def index() -> NameIndex:
    return NameIndex(
        [
            NameSource("king", "Stephen King"),
            NameSource("khan", "Genghis Khan", ["Temüjin"]),
            NameSource("leonardo", "Leonardo da Vinci"),
            NameSource("buffett", "Warren Buffett"),
            NameSource("blair", "Tony Blair"),
            NameSource("socrates", "Socrates"),
            NameSource("potter", "Harry Potter", ["Hogwarts", "Muggle", "J. K. Rowling"]),
        ],
        fuzzy_min_chars=6,
        fuzzy_two_edits_min_chars=11,
        fuzzy_single_word_min_chars=8,
    )


def found(index: NameIndex, text: str) -> dict[str, tuple[str, int]]:
    return {match.key: (match.kind, match.edits) for match in index.find(text)}


@pytest.mark.parametrize(
    "text",
    [
        "Who is Stephen King?",
        "STEPHEN KING!!!",
        "stephen-king's novels",
        "Stephen  King",
        "the StephenKing fan club",
    ],
)
def test_case_punctuation_and_spacing_do_not_matter(index: NameIndex, text: str) -> None:
    assert found(index, text)["king"] == ("full", 0)


@pytest.mark.parametrize(
    ("text", "key", "edits"),
    [
        ("stephen kign", "king", 1),
        ("Stehpen Kign", "king", 2),
        ("Warren Buffet's letters", "buffett", 1),
        ("What did Socrats teach?", "socrates", 1),
        ("Hogwart castle", "potter", 1),
    ],
)
def test_small_misspellings_match(index: NameIndex, text: str, key: str, edits: int) -> None:
    assert found(index, text)[key] == ("full", edits)


@pytest.mark.parametrize(
    "text",
    [
        "I can juggle three balls.",  # one edit from the alias "Muggle", but a word of its own
        "A buffet lunch for twenty.",  # a word, not a misspelt surname
        "Kingdom of Heaven",  # a name inside a longer word
        "Stephen Hawking's theories",  # a namesake: a given name alone, followed by another surname
    ],
)
def test_ordinary_words_and_namesakes_do_not_match(index: NameIndex, text: str) -> None:
    assert found(index, text) == {}


def test_accents_plurals_and_initials(index: NameIndex) -> None:
    assert found(index, "When was Temujin born?")["khan"] == ("full", 0)
    assert found(index, "Are Muggles aware of magic?")["potter"] == ("full", 0)
    assert found(index, "books by JK Rowling")["potter"] == ("full", 0)
    assert found(index, "Leonardo DaVinci and Leonardo da-Vinci")["leonardo"] == ("full", 0)


def test_given_name_or_surname_alone_is_a_partial_match(index: NameIndex) -> None:
    assert found(index, "What did Blair do in 1997?")["blair"] == ("partial", 0)
    assert found(index, "Prime Minister Blair resigned.")["blair"] == ("partial", 0)
    assert found(index, "Leonardo's notebooks")["leonardo"] == ("partial", 0)


def test_a_partial_match_inside_someone_elses_name_is_vetoed(index: NameIndex) -> None:
    assert "khan" not in found(index, "Who did Kublai Khan succeed as Khagan?")
    assert "khan" not in found(index, "In 1206, ___ Khan founded the empire.")
    assert "buffett" not in found(index, "Senator Elizabeth Warren spoke today.")


def test_the_targets_own_name_with_middle_names_is_a_full_match(index: NameIndex) -> None:
    assert found(index, "Stephen Edwin King was born in 1947.")["king"] == ("full", 0)
    assert found(index, "Leonardo di ser Piero da Vinci")["leonardo"] == ("full", 0)


def test_full_match_outranks_partial_and_spans_point_at_the_text(index: NameIndex) -> None:
    text = "Blair met Tony Blair."
    (match,) = index.find(text)
    assert match.kind == "full"
    assert text[match.span[0] : match.span[1]] == "Tony Blair"


def test_partial_names() -> None:
    assert partial_names("Leonardo da Vinci") == ["leonardo", "vinci"]
    assert partial_names("Stephen King") == ["stephen", "king"]
    assert partial_names("Socrates") == []
    assert partial_names("Ada Lovelace") == ["lovelace"]  # short given names are left out
    assert normalized_words("Temüjin's ÉCOLE, ___") == ["temujin", "s", "ecole"]


def test_many_names_stay_independent() -> None:
    sources = [NameSource(f"t{i}", f"Person{i} Surname{i}") for i in range(2000)]
    index = NameIndex(sources, 6, 11, 8)
    assert found(index, "a letter from person1234 surname1234") == {"t1234": ("full", 0)}
