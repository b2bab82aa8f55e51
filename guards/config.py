"""The operator's knobs of a guard: how detection decides which targets a request touches, and
how strongly a fired target restricts decoding. Kept apart from the code that uses them, so that
the gateway's settings (`LETHE_DETECTION__*`, `LETHE_GUARD__*`) can hold them without loading faiss
or numpy."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DetectionConfig(BaseModel):
    """Thresholds and knobs of detection; the defaults are the calibrated ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    identity_threshold: float = Field(
        0.68, ge=-1, le=1, description="Cosine to a name, alias or description sentence that fires a target."
    )
    content_threshold: float = Field(
        0.84, ge=-1, le=1, description="Cosine to a document sentence or example that fires a target."
    )
    partial_threshold: float = Field(
        0.44,
        ge=-1,
        le=1,
        description="Cosine, with the name masked, to a description or content anchor that confirms a "
        "given-name or surname match.",
    )
    classifier_threshold: float = Field(
        0.70, ge=0, le=1, description="Classifier probability that fires a target."
    )
    use_classifier: bool = Field(True, description="Train classifiers for targets with enough examples.")
    classifier_min_examples: int = Field(4, ge=1, description="Examples a target needs to get a classifier.")
    classifier_l2: float = Field(1.0, gt=0, description="L2 penalty of the classifier's logistic regression.")
    partial_names: bool = Field(True, description="Match given names and surnames of multi-word names alone.")
    document_names: bool = Field(
        True, description="Match the full and birth names that open the target's documents as aliases."
    )
    fuzzy_min_chars: int = Field(
        6, ge=1, description="Letters a name needs before a misspelling is forgiven."
    )
    fuzzy_two_edits_min_chars: int = Field(11, ge=1, description="Letters a name needs for two misspellings.")
    fuzzy_single_word_min_chars: int = Field(
        8, ge=1, description="Letters a one-word name needs before it is matched fuzzily at all."
    )
    anchor_max_words: int = Field(48, ge=4, description="Longest anchor, in words; longer sentences are cut.")
    max_content_anchors: int = Field(1024, ge=1, description="Document and example anchors kept per target.")
    query_chunk_words: int = Field(48, ge=4, description="Longest piece of a prompt embedded as one vector.")
    max_query_chunks: int = Field(16, ge=1, description="Pieces of a prompt embedded (the last ones).")
    search_k: int = Field(16, ge=1, description="Nearest anchors fetched from the index per piece.")
    hnsw_min_anchors: int = Field(
        20_000, ge=1, description="Anchors from which an approximate HNSW index replaces exact search."
    )
    hnsw_neighbors: int = Field(16, ge=4, description="HNSW graph degree (M).")
    hnsw_ef_search: int = Field(64, ge=1, description="HNSW search breadth.")
    history_messages: int = Field(
        8, ge=1, description="Latest conversation messages embedded; names are matched in all of them."
    )
    generated_window_chars: int = Field(
        600, ge=50, description="Tail of the generated text examined by each `detect_generated` call."
    )

    def anchor_settings(self) -> tuple[object, ...]:
        """The settings compiled anchors depend on: a detector built with others must recompile."""
        return (
            self.anchor_max_words,
            self.max_content_anchors,
            self.use_classifier,
            self.classifier_min_examples,
            self.classifier_l2,
        )


class GuardConfig(BaseModel):
    """Knobs of restriction; `lethe eval` measures their effect on the dev data."""

    key_terms: int = Field(default=300, ge=0, description="Most document key terms forbidden per target.")
    key_term_min_count: int = Field(default=1, ge=1, description="Times a term must recur in the documents.")
    misspelt_name_min_chars: int = Field(
        default=6,
        ge=1,
        description="Letters a word of a fired target's name needs before its one-letter misspellings "
        "are forbidden too.",
    )
    penalty: float = Field(default=4.0, ge=0.0, description="Logit penalty on semantically close tokens.")
    penalty_similarity: float = Field(
        default=0.6, ge=0.0, le=1.0, description="Input-embedding cosine from which a token counts as close."
    )
    sae_clamp_multiple: float = Field(
        default=4.0,
        gt=0.0,
        description="Where a fired target's SAE feature fires, it is set to minus this many times its "
        "own mean activation on the target's text (a scale per feature: residual norms differ).",
    )
    refusal: str = Field(
        default="I'm sorry, but I can't help with that request.",
        description="The answer of the refuse policy.",
    )
