from lethe.guards.key_terms import key_terms

DOCS = [
    "Carrie was published in 1974. In Maine, King wrote Carrie and The Shining.",
    "He lived in Maine in 1974. The Shining followed Carrie. However, nothing else.",
]


def test_repeated_proper_nouns_and_years_rank_first() -> None:
    terms = key_terms(DOCS, min_count=2)
    assert terms[:4] == ["Carrie", "1974", "Maine", "Shining"]
    assert "However" not in terms and "He" not in terms and "The" not in terms


def test_terms_seen_once_are_left_out_and_limit_applies() -> None:
    assert "King" not in key_terms(DOCS, min_count=2)
    assert len(key_terms(DOCS, limit=2)) == 2
    assert "King" in key_terms(DOCS, min_count=1)


def test_words_of_a_longer_name_are_terms_of_their_own() -> None:
    terms = key_terms(["She painted the Mona Lisa in Florence for the House of Medici."])
    assert {"Mona Lisa", "Mona", "Lisa", "House of Medici", "Medici"} <= set(terms)
    assert "of" not in terms and "House" in terms
