"""Forbidden-string matching on streamed text and the token sequences that spell forbidden strings."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lethe.guards.enforcement import SequenceBans
from lethe.guards.forbidden import ForbiddenMatcher, Match, banned_token_sequences


def test_matches_any_case_and_spacing() -> None:
    matcher = ForbiddenMatcher(["Stephen King"])
    assert matcher.search("by STEPHEN   king.") == Match(3, 17, partial=False)
    assert matcher.search("by Stephen\nKing") == Match(3, 15, partial=False)
    assert matcher.contains("xstephen kingx")  # strings match inside words too


@pytest.mark.parametrize(
    "text",
    [
        "el método de Sócrates",  # precomposed accent
        "el método de So\u0301crates",  # combining accent
        "el método de ＳＯＣＲＡＴＥＳ",  # fullwidth
        "el método de 𝐒𝐨𝐜𝐫𝐚𝐭𝐞𝐬",  # mathematical bold
    ],
)
def test_accents_and_compatibility_forms_do_not_hide_a_string(text: str) -> None:
    """The match is reported in the positions of the text as written, so that the engine undoes
    the right tokens; "método" before it, accented too, is no match."""
    for matcher in (ForbiddenMatcher(["Socrates"]), ForbiddenMatcher([], ["Sócrates"])):
        found = matcher.search(text)
        assert found == Match(len("el método de "), len(text), partial=False), matcher
        assert matcher.contains(text)
    socrates = ForbiddenMatcher(["Socrates"])
    assert socrates.search("el método de Sócra") == Match(13, 18, partial=True)
    assert socrates.search("Sócrates y Sócrates", start=3) == Match(11, 19, partial=False)
    assert ForbiddenMatcher([], ["Socrates"]).search("los socráticos") is None


def test_partial_match_at_the_end_is_reported_as_possible() -> None:
    matcher = ForbiddenMatcher(["Stephen King"])
    assert matcher.search("written by Steph") == Match(11, 16, partial=True)
    assert matcher.search("written by Stephen Ki") == Match(11, 21, partial=True)
    assert matcher.search("written by Stephen Fry") is None
    assert matcher.search("nothing here") is None


def test_words_match_only_as_whole_words() -> None:
    matcher = ForbiddenMatcher([], ["King"])
    assert matcher.search("I am thinking") is None
    assert matcher.search("the king said") == Match(4, 8, partial=False)


def test_search_starts_where_asked() -> None:
    matcher = ForbiddenMatcher(["abc"])
    assert matcher.search("abc then abc", start=1) == Match(9, 12, partial=False)


def test_empty_matcher_is_falsy() -> None:
    assert not ForbiddenMatcher([" ", ""])
    assert ForbiddenMatcher([" ", ""]).search("anything") is None


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir: Path):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


def test_banned_sequences_cover_case_and_leading_space_variants(tokenizer) -> None:
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    sequences = set(banned_token_sequences(["Paris"], encode))
    for variant in ("Paris", " Paris", " paris", "PARIS", " PARIS"):
        assert tuple(encode(variant)) in sequences
    # Banning applies to the token completing a sequence, given what came before it.
    stephen = encode(" Stephen King")
    bans = SequenceBans([stephen])
    assert bans.next_tokens(stephen[:-1]) == {stephen[-1]}
    assert bans.next_tokens([]) == (set() if len(stephen) > 1 else {stephen[-1]})


def test_sequence_bans_agree_with_checking_every_sequence() -> None:
    """The prefix index must ban exactly what comparing the output's tail with each sequence bans."""
    rng = random.Random(0)
    sequences = [tuple(rng.randrange(6) for _ in range(rng.randint(1, 4))) for _ in range(60)]
    bans = SequenceBans(sequences)
    for _ in range(500):
        output = [rng.randrange(6) for _ in range(rng.randint(0, 6))]
        expected = {
            s[-1]
            for s in sequences
            if len(s) - 1 <= len(output) and tuple(output[len(output) - len(s) + 1 :]) == s[:-1]
        }
        assert bans.next_tokens(output) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Warre Buffetti was a banker", Match(0, 5, partial=False)),  # "Warre" is no word: forbidden
        ("Mr Buffetti was a banker", Match(3, 11, partial=False)),
        ("Mr Bufett's firm", Match(3, 9, partial=False)),
        ("Mr Buffett", Match(3, 10, partial=False)),
        ("Mr Buffe", Match(3, 8, partial=True)),  # may still become a misspelling: held back
        ("A warren of tunnels, a prison warden and a buffet lunch", None),  # everyday words
        ("Buffetting winds", None),  # two letters off
    ],
)
def test_names_match_within_one_misspelt_letter_unless_an_everyday_word(
    text: str, expected: Match | None
) -> None:
    matcher = ForbiddenMatcher([], [], ["Warren", "Buffett"])
    assert matcher.search(text) == expected
    assert matcher.contains(text) is (expected is not None and not expected.partial)


def test_misspelt_names_fold_accents_and_give_way_to_an_earlier_string() -> None:
    matcher = ForbiddenMatcher(["Omaha"], [], ["Buffett"])
    assert matcher.search("In Omaha, Búffetti said") == Match(3, 8, partial=False)
    assert matcher.search("Later, Búffetti said", start=3) == Match(7, 15, partial=False)
