"""Target detection: the decision logic on a small bag-of-words embedder, and a few checks with the
real MiniLM on hand-written prompts."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import pytest
from pydantic import ValidationError

from lethe.guards.config import DetectionConfig
from lethe.guards.detection import Detection, Evidence, TargetDetector
from lethe.guards.embedding import CachingEmbedder
from lethe.guards.names import NameMatch, normalized_words
from tests.support.targets import target


class BagOfWords:
    """Each word a fixed random direction, a text the normalised sum of its words: texts sharing
    words are close, texts sharing none are nearly orthogonal. Counts what it is asked to embed."""

    dimension = 256

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.encoded += texts
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in normalized_words(text):
                vectors[row] += np.random.default_rng(zlib.crc32(word.encode())).standard_normal(
                    self.dimension
                )
            vectors[row] /= max(float(np.linalg.norm(vectors[row])), 1e-9)
        return vectors


BLAIR = target(
    "blair",
    "Tony Blair",
    description="Tony Blair is a British politician who was Prime Minister of the United Kingdom.",
    documents=[
        "Blair led the Labour Party to a landslide victory in 1997. He supported the invasion of Iraq."
    ],
)
CURIE = target(
    "curie",
    "Marie Curie",
    aliases=["Maria Sklodowska"],
    documents=["Curie discovered polonium and radium with her husband Pierre."],
)


def fired(detections: Sequence[Detection]) -> dict[str, str]:
    return {detection.target_id: detection.reason for detection in detections}


@pytest.fixture
def embedder() -> BagOfWords:
    return BagOfWords()


@pytest.fixture
def detector(embedder: BagOfWords) -> TargetDetector:
    return TargetDetector.build([BLAIR, CURIE], embedder)


def test_a_name_or_alias_fires_with_score_one_less_a_tenth_per_misspelling(detector: TargetDetector) -> None:
    assert detector.detect("What did Tony Blair say?") == [
        Detection(target_id="blair", score=1.0, reason="name")
    ]
    (misspelt,) = detector.detect("tell me about maria sklodowksa")
    assert (misspelt.target_id, misspelt.reason, round(misspelt.score, 6)) == ("curie", "name", 0.9)


def test_nothing_fires_on_unrelated_text(detector: TargetDetector) -> None:
    assert detector.detect("Give me a recipe for banana bread.") == []
    assert detector.detect("") == []


def test_a_text_close_to_a_document_sentence_fires_by_embedding(detector: TargetDetector) -> None:
    assert fired(detector.detect("He supported the invasion of Iraq.")) == {"blair": "embedding"}


def test_a_partial_name_needs_the_rest_of_the_text_to_be_about_the_target(detector: TargetDetector) -> None:
    assert fired(detector.detect("Why did Blair support the invasion of Iraq?")) == {"blair": "name"}
    assert detector.detect("Blair is a common first name in Scotland.") == []
    (evidence,) = [e for e in detector.explain("Blair is a common first name.") if e.target_id == "blair"]
    assert evidence.match is not None and evidence.match.kind == "partial"


def test_disabled_targets_never_fire(embedder: BagOfWords) -> None:
    detector = TargetDetector.build([BLAIR, CURIE.model_copy(update={"enabled": False})], embedder)
    assert detector.target_ids == ("blair",)
    assert detector.detect("Marie Curie discovered polonium and radium with her husband Pierre.") == []


def test_conversation_history_counts(detector: TargetDetector) -> None:
    messages = [
        "Let's talk about Marie Curie.",
        "Sure, what would you like to know?",
        "What did she discover?",
    ]
    assert fired(detector.detect_conversation(messages)) == {"curie": "name"}
    assert detector.detect_conversation(messages[1:]) == []


def test_older_messages_count_by_name_only(embedder: BagOfWords) -> None:
    detector = TargetDetector.build([BLAIR], embedder, DetectionConfig(history_messages=1))
    close_but_unnamed = "He supported the invasion of Iraq."
    assert fired(detector.detect_conversation([close_but_unnamed, "Thanks!"])) == {}
    assert fired(detector.detect_conversation(["Thanks!", close_but_unnamed])) == {"blair": "embedding"}
    assert fired(detector.detect_conversation(["Tony Blair?", "Thanks!"])) == {"blair": "name"}


def test_generated_text_is_read_by_its_tail(detector: TargetDetector) -> None:
    config = detector.config
    filler = "the weather was mild and the fields were green. " * (config.generated_window_chars // 40)
    assert fired(detector.detect_generated("The answer is Tony Blair, " + filler)) == {}
    assert fired(detector.detect_generated(filler + "so the answer is Tony Blair")) == {"blair": "name"}


def test_rebuilding_reuses_unchanged_targets(embedder: BagOfWords) -> None:
    first = TargetDetector.build([BLAIR, CURIE], embedder)
    embedder.encoded.clear()
    edited = CURIE.model_copy(update={"description": "A physicist and chemist.", "version": 2})
    second = TargetDetector.build([BLAIR, edited], embedder, previous=first)
    assert "A physicist and chemist." in embedder.encoded
    assert not {"Tony Blair", BLAIR.description} & set(embedder.encoded)
    assert fired(second.detect("Tony Blair")) == {"blair": "name"}
    embedder.encoded.clear()
    TargetDetector.build([BLAIR, edited], embedder, DetectionConfig(anchor_max_words=20), previous=second)
    assert len(embedder.encoded) > 1  # other anchor settings: everything is compiled again


def test_a_target_with_examples_gets_a_classifier(embedder: BagOfWords) -> None:
    examples = [
        "Which spells does the young wizard learn first?",
        "Explain the rules of the wizard sport with brooms.",
        "Who teaches potions at the wizard school?",
        "What house is the wizard boy sorted into?",
        "Describe the wizard school's great hall.",
    ]
    wizard = target("wizard", "The Merlinus Chronicles", examples=examples)
    strict = DetectionConfig(identity_threshold=0.99, content_threshold=0.99)
    detector = TargetDetector.build([wizard, BLAIR], embedder, strict)
    assert detector.stats()["classifiers"] == 1
    assert fired(detector.detect("Which wizard teaches at the school?")) == {"wizard": "classifier"}
    assert detector.detect("What is the capital of France?") == []
    without = TargetDetector.build([wizard], embedder, strict.model_copy(update={"use_classifier": False}))
    assert without.stats()["classifiers"] == 0


def test_content_anchors_are_capped_evenly_but_classifiers_see_every_example(embedder: BagOfWords) -> None:
    documents = [f"Fact number {i} about the saga." for i in range(50)]
    examples = [f"Question {i} about the saga?" for i in range(6)]
    saga = target("saga", "The Long Saga", documents=documents, examples=examples)
    detector = TargetDetector.build([saga], embedder, DetectionConfig(max_content_anchors=10))
    assert detector.stats()["anchors"] == 1 + 10
    assert detector.stats()["classifiers"] == 1


def test_the_approximate_index_finds_the_same(embedder: BagOfWords) -> None:
    exact = TargetDetector.build([BLAIR, CURIE], embedder)
    approximate = TargetDetector.build([BLAIR, CURIE], embedder, DetectionConfig(hnsw_min_anchors=1))
    assert approximate.stats()["index"] == "IndexHNSWFlat"
    for text in ["He supported the invasion of Iraq.", "Curie discovered polonium.", "banana bread"]:
        assert approximate.detect(text) == exact.detect(text)


def test_no_targets(embedder: BagOfWords) -> None:
    detector = TargetDetector.build([], embedder)
    assert detector.detect("Tony Blair") == []
    assert detector.detect_conversation(["Tony Blair"]) == []
    assert detector.stats()["anchors"] == 0


def test_the_caching_embedder_embeds_each_text_once_within_its_capacity(embedder: BagOfWords) -> None:
    cached = CachingEmbedder(embedder, max_entries=2)
    first = cached.encode(["a b", "c d", "a b"])
    assert embedder.encoded == ["a b", "c d"]
    assert np.array_equal(first[0], first[2]) and first.dtype == np.float32
    cached.encode(["c d", "e f"])  # "a b" is now the least recently used, and is dropped
    cached.encode(["a b"])
    assert embedder.encoded == ["a b", "c d", "e f", "a b"]
    assert cached.encode([]).shape == (0, embedder.dimension)


def test_config_is_validated_and_frozen() -> None:
    with pytest.raises(ValidationError):
        DetectionConfig(identity_threshold=1.5)
    with pytest.raises(ValidationError):
        DetectionConfig(unknown_knob=1)
    config = DetectionConfig()
    with pytest.raises(ValidationError):
        config.identity_threshold = 0.1


def test_evidence_decides_name_before_classifier_before_embedding() -> None:
    config = DetectionConfig()
    partial = NameMatch("t", "partial", 0, "Blair", (0, 5))
    strong = Evidence("t", names=0.95, classifier=0.99)
    assert strong.decide(config) == Detection(target_id="t", score=0.99, reason="classifier")
    assert Evidence("t", match=partial, unnamed=0.9, classifier=0.99).decide(config).reason == "name"
    assert Evidence("t", match=partial, unnamed=0.1).decide(config) is None
    assert Evidence("t", content=0.95).decide(config) == Detection(
        target_id="t", score=0.95, reason="embedding"
    )


LOVELACE = target(
    "lovelace",
    "Ada Lovelace",
    description="Ada Lovelace was an English mathematician, regarded as the first computer programmer.",
    documents=[
        "Augusta Ada King, Countess of Lovelace (born Augusta Ada Byron; 10 December 1815 - 27 November "
        "1852) was an English mathematician and writer. She is chiefly known for her work on Charles "
        "Babbage's proposed mechanical general-purpose computer, the Analytical Engine. Her notes on the "
        "engine include what is recognised as the first algorithm intended to be carried out by a machine. "
        "She was the only legitimate child of the poet Lord Byron."
    ],
)
CURIE_IN_FULL = target(
    "curie",
    "Marie Curie",
    description="Marie Curie was a Polish and naturalised-French physicist and chemist who pioneered "
    "research on radioactivity.",
    documents=[
        "Marie Curie was the first woman to win a Nobel Prize. She discovered the elements polonium and "
        "radium together with her husband Pierre Curie."
    ],
)
ALGORITHM = "Her notes on the engine include the first algorithm intended to be carried out by a machine."


@pytest.fixture(scope="module")
def minilm_detector() -> TargetDetector:
    """The embedded model on hand-written targets and prompts (none from the evaluation data)."""
    from lethe.guards.embedding import default_embedder

    return TargetDetector.build([LOVELACE, CURIE_IN_FULL], default_embedder())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Who was Ada Lovelace?", {"lovelace": "name"}),
        ("What did Lovelace write about the Analytical Engine?", {"lovelace": "name"}),
        ("Who was Augusta Ada Byron?", {"lovelace": "name"}),
        (ALGORITHM, {"lovelace": "embedding"}),
        ("Give me a recipe for pancakes.", {}),
        ("Lovelace Road is closed for repairs today.", {}),
        ("What did Pierre Curie study?", {}),
    ],
)
def test_minilm_prompts(minilm_detector: TargetDetector, text: str, expected: dict[str, str]) -> None:
    assert fired(minilm_detector.detect(text)) == expected


def test_minilm_conversation_and_generated_text(minilm_detector: TargetDetector) -> None:
    conversation = ["Tell me about Marie Curie.", "She was a physicist.", "Which elements did she find?"]
    assert fired(minilm_detector.detect_conversation(conversation)) == {"curie": "name"}
    answer = "The first program for the Analytical Engine was published in 1843 by Ada Lovelace"
    assert fired(minilm_detector.detect_generated(answer)) == {"lovelace": "name"}
