"""Each metric against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from lethe.evaluation import metrics


def test_rouge_l_recall_and_f1_of_a_partial_answer() -> None:
    # reference tokens [portland, maine]; prediction [he, was, born, in, portland]: LCS = 1
    score = metrics.rouge_l("Portland, Maine", "He was born in Portland")
    assert score.recall == pytest.approx(1 / 2)
    precision = 1 / 5
    assert score.f1 == pytest.approx(2 * 0.5 * precision / (0.5 + precision))


def test_rouge_l_is_order_sensitive_and_ignores_case_and_punctuation() -> None:
    assert metrics.rouge_l("a b c", "c b a").recall == pytest.approx(1 / 3)
    assert metrics.rouge_l("Richard Bachman", "richard BACHMAN.").recall == 1.0
    assert metrics.rouge_l("Carrie", "").recall == 0.0


def test_rouge_l_stemmer_matches_inflections_only_when_on() -> None:
    # stemmed: [run, quickli] vs [he, run, quickli] -> LCS 2, recall 1, precision 2/3
    stemmed = metrics.rouge_l("running quickly", "he runs quickly", stemmer=True)
    assert stemmed.recall == 1.0
    assert stemmed.f1 == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    # unstemmed: only "quickly" matches -> recall 1/2, precision 1/3
    plain = metrics.rouge_l("running quickly", "he runs quickly", stemmer=False)
    assert plain.recall == pytest.approx(1 / 2)
    assert plain.f1 == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))


@pytest.mark.parametrize(
    ("text", "phrase", "expected"),
    [
        ("He wrote Carrie.", "carrie", True),
        ("Carriers are ships.", "Carrie", False),
        ("It was h.p. lovecraft who wrote it", "H.P. Lovecraft", True),
        ("Born in Portland,\n  Maine.", "Portland, Maine", True),
        ("Maine, Portland", "Portland, Maine", False),
        ("", "Carrie", False),
        ("anything", "  ", False),
        ("El método de Sócrates", "Socrates", True),  # accents do not hide a name
        ("the Socratic method", "Socrates", False),
    ],
)
def test_contains_phrase_on_word_boundaries(text: str, phrase: str, expected: bool) -> None:
    assert metrics.contains_phrase(text, phrase) is expected


def test_word_tokens_follow_the_treebank_rules() -> None:
    assert metrics.word_tokens("I can't go. He said, fine.") == [
        "I",
        "ca",
        "n't",
        "go",
        ".",
        "He",
        "said",
        ",",
        "fine",
        ".",
    ]


def test_ngram_entropy_of_distinct_tokens() -> None:
    # 3 distinct bigrams (log2 3 bits), 2 distinct trigrams (1 bit); weights 2/3 and 4/3, averaged
    expected = (2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2
    assert metrics.ngram_entropy("a b c d") == pytest.approx(expected)


def test_ngram_entropy_of_repetition() -> None:
    assert metrics.ngram_entropy("a a a a") == 0.0
    # bigrams ab, ba, ab -> p = (2/3, 1/3); trigrams aba, bab -> 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert metrics.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)


def test_ngram_entropy_of_too_short_text_is_zero() -> None:
    assert metrics.ngram_entropy("") == 0.0
    assert metrics.ngram_entropy("one") == 0.0


def test_agreement_is_exact_string_equality() -> None:
    assert metrics.agreement([("a", "a"), ("b", "c")]) == 0.5
    assert metrics.agreement([("Paris", "Paris "), ("x", "x"), ("y", "y"), ("z", "z")]) == 0.75
    assert metrics.agreement([]) is None


def test_mean_skips_missing_values_and_counts_booleans() -> None:
    assert metrics.mean([1.0, None, True, False]) == pytest.approx(2 / 3)
    assert metrics.mean([None]) is None


@pytest.mark.parametrize(
    ("gold", "output", "prompt", "expected"),
    [
        # "the" is a stop word: only golden and girl(s) count, and the prompt gives neither
        ("The Golden Girls", "The show was a hit.", "In which sitcom did Rose Nylund appear?", 0.0),
        ("The Golden Girls", "It was The Golden Girl.", "In which sitcom did Rose Nylund appear?", 1.0),
        # the question gives "university": only "Nebraska" is new
        ("University of Nebraska", "The University of Oxford.", "Which university did he attend?", 0.0),
        ("University of Nebraska", "Nebraska, I think.", "Which university did he attend?", 1.0),
        ("Plato and Xenophon", "Plato wrote it down.", "Who recorded his teachings?", 0.5),
        # a multiple-choice prompt lists the answer: nothing left to know
        ("Labour Party", "Labour", "A. Labour Party B. Conservative Party", None),
    ],
)
def test_new_word_recall_counts_the_gold_words_the_prompt_does_not_give(
    gold: str, output: str, prompt: str, expected: float | None
) -> None:
    assert metrics.new_word_recall(gold, output, prompt) == expected


def test_without_words_removes_the_gold_words_an_answer_could_not_have_said() -> None:
    """What `bench/forget_recall_floor.py` leaves of an answer: words spelling a removed token go
    (stemmed and with punctuation attached), everything else stays, so the stop words and the words
    the question gave still score."""
    gold, prompt = "University of Nebraska", "Which university did he attend?"
    new = metrics.content_tokens(gold, prompt)
    assert set(new) == {"nebraska"}
    answer = "He went to the University of Nebraska, as did his father."
    stripped = metrics.without_words(answer, new)
    assert stripped == "He went to the University of as did his father."
    assert metrics.rouge_l(gold, stripped).recall == pytest.approx(2 / 3)
    everything = metrics.content_tokens(gold)
    assert metrics.without_words(answer, everything) == "He went to the of as did his father."
    assert metrics.without_words("Socrates taught Plato's pupils", {"plato"}) == "Socrates taught pupils"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Warren Buffett bought shares.", True),
        ("WARREN  BUFFETT", True),
        ("Warre Buffetti bought shares.", True),  # one letter off in each word
        ("Warren Edward Buffett was born in Omaha.", True),  # middle names
        ("Buffett bought shares.", False),  # a surname alone is not the name
        ("He ate at the buffet with Warren.", False),
    ],
)
def test_says_name_reads_names_as_detection_does(text: str, expected: bool) -> None:
    assert metrics.says_name(text, "Warren Buffett") is expected
