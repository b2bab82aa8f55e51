"""Which registered targets a request touches.

Three kinds of evidence, from strongest to weakest:

* **name** — the target's name or an alias (also the fuller names its documents open with),
  matched through case, punctuation, spacing and small misspellings (`lethe.guards.names`). A given
  name or surname alone ("Blair", "Leonardo") is a *partial* match, which also appears in texts
  about relatives and namesakes, so it fires only when the text, with that name masked, is still
  close to what is said about the target (`partial_threshold`).
* **classifier** — for targets registered with enough example prompts, a logistic regression on
  sentence embeddings trained from those examples against neutral prompts (`lethe.guards.classifier`).
* **embedding** — cosine similarity between the sentences of the text and the target's anchors
  in a faiss index. Closeness to who the target is (name, aliases, description) and closeness to
  what is known about it (document sentences, examples) have separate thresholds, both high:
  the documents about a person also describe the people and works around them, and questions
  about those neighbours must not fire the target.

Calibration (`bench/detection_calibration.py`, 10 RWKU targets and MUSE's Harry Potter, prompts
alone) puts the defaults at about 96% recall on RWKU levels 1-2, 20-100% on level 3 by attack
type (the low end: questions that avoid the name, "reverse query" and "synonym manipulation"),
62% on MUSE, with 0.6% false positives on neighbour questions and 0.25% on general
instructions. Most of what prompts miss is caught by `detect_generated` once the answer names
the target (about 94% recall when the answer is read too).

A built `TargetDetector` never changes: when targets change a new one is built (reusing the
compiled anchors of unchanged targets through `previous=`) and swapped in whole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict

from lethe.guards.anchors import AnchorKind, lead_names, query_chunks, tail_window, target_anchors
from lethe.guards.classifier import NEUTRAL_PROMPTS, LinearHead, probabilities, train_head
from lethe.guards.config import DetectionConfig
from lethe.guards.embedding import Embedder
from lethe.guards.names import NameIndex, NameMatch, NameSource
from lethe.guards.targets import Target

Reason = Literal["name", "embedding", "classifier"]

_KINDS: tuple[AnchorKind, ...] = ("name", "description", "content")

_MASK = "someone"
"""What a partial name is replaced by to ask whether the rest of the text is about the target."""

_NAME_CACHE = 4096
"""Messages whose name matches a detector remembers."""

_CLASSIFIER_FLOOR = 0.5
"""A classifier below even odds is no evidence at all: it is left out of `explain`, which keeps
the evidence list short when thousands of targets have classifiers."""


class Detection(BaseModel):
    """A fired target. `score` is on the scale of its `reason`: 1 for an exact name match (0.1 less
    per misspelling), the cosine similarity for a confirmed partial name or an embedding, the
    probability for a classifier."""

    model_config = ConfigDict(frozen=True)

    target_id: str
    score: float
    reason: Reason


@dataclass(frozen=True)
class Evidence:
    """Everything detection found about one target in one text, before thresholds: what
    `TargetDetector.explain` returns, and what calibration sweeps thresholds over. Similarities
    are the best cosine between a piece of the text and the target's anchors of each kind."""

    target_id: str
    match: NameMatch | None = None
    names: float = -1.0
    description: float = -1.0
    content: float = -1.0
    unnamed: float = -1.0
    """For a partial name match: closeness of the text, with that name masked, to what is said
    about the target. "Linda and her friends went hiking" shares a first name with Linda
    Hamilton, and MiniLM weighs names heavily; "Someone and her friends went hiking" is not
    about her, while "Someone played Sarah Connor in The Terminator" still is."""
    classifier: float | None = None

    @property
    def identity(self) -> float:
        return max(self.names, self.description)

    def decide(self, config: DetectionConfig) -> Detection | None:
        if self.match is not None and self.match.kind == "full":
            return Detection(target_id=self.target_id, score=1.0 - 0.1 * self.match.edits, reason="name")
        if self.match is not None and self.unnamed >= config.partial_threshold:
            return Detection(target_id=self.target_id, score=self.unnamed, reason="name")
        if self.classifier is not None and self.classifier >= config.classifier_threshold:
            return Detection(target_id=self.target_id, score=self.classifier, reason="classifier")
        if self.identity >= config.identity_threshold or self.content >= config.content_threshold:
            return Detection(
                target_id=self.target_id, score=max(self.identity, self.content), reason="embedding"
            )
        return None

    def merge(self, other: Evidence) -> Evidence:
        """The stronger of two pieces of evidence about the same target, field by field."""
        matches = [match for match in (self.match, other.match) if match is not None]
        classifiers = [score for score in (self.classifier, other.classifier) if score is not None]
        return Evidence(
            target_id=self.target_id,
            match=min(matches, key=lambda match: (match.kind != "full", match.edits)) if matches else None,
            names=max(self.names, other.names),
            description=max(self.description, other.description),
            content=max(self.content, other.content),
            unnamed=max(self.unnamed, other.unnamed),
            classifier=max(classifiers) if classifiers else None,
        )


@dataclass(frozen=True)
class _CompiledTarget:
    """What one target contributes to the index; reused across builds while its content is unchanged."""

    fingerprint: str
    vectors: np.ndarray
    kinds: np.ndarray
    """Per anchor, its kind's position in `_KINDS`."""
    head: LinearHead | None


def _fingerprint(target: Target) -> str:
    content = [target.name, target.aliases, target.description, target.documents, target.examples]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


class TargetDetector:
    """An immutable detector over a fixed set of targets. Thread-safe: detection only reads."""

    def __init__(
        self,
        targets: Sequence[Target],
        compiled: dict[str, _CompiledTarget],
        embedder: Embedder,
        config: DetectionConfig,
        neutral_vectors: np.ndarray | None,
    ) -> None:
        active = [target for target in targets if target.enabled]
        self._config = config
        self._embedder = embedder
        self._neutral_vectors = neutral_vectors
        self._target_ids = tuple(target.id for target in active)
        names = NameIndex(
            (
                NameSource(
                    target.id,
                    target.name,
                    [*target.aliases, *lead_names(target)] if config.document_names else target.aliases,
                    config.partial_names,
                )
                for target in active
            ),
            config.fuzzy_min_chars,
            config.fuzzy_two_edits_min_chars,
            config.fuzzy_single_word_min_chars,
        )
        self._name_phrases = len(names)
        # a conversation resends its history with every turn: each message is matched once per detector
        self._find_names = lru_cache(maxsize=_NAME_CACHE)(lambda text: tuple(names.find(text)))
        self._slot = {target_id: slot for slot, target_id in enumerate(self._target_ids)}
        parts = [compiled[target.id] for target in active]
        sizes = [len(part.vectors) for part in parts]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._owner = np.repeat(np.arange(len(parts)), sizes).astype(np.int64)
        self._kinds = np.concatenate([part.kinds for part in parts]) if parts else np.zeros(0, np.int8)
        self._index, self._vectors = self._build_index(
            np.concatenate([part.vectors for part in parts]) if parts else np.zeros((0, embedder.dimension))
        )
        # from here on each target's vectors are read from the index, so they are held only once
        self._compiled = {
            target.id: replace(part, vectors=self._vectors[begin:end])
            for target, part, begin, end in zip(
                active, parts, self._offsets[:-1], self._offsets[1:], strict=True
            )
        }
        heads = [(slot, part.head) for slot, part in enumerate(parts) if part.head is not None]
        self._head_owner = np.array([slot for slot, _ in heads], dtype=np.int64)
        weights = [head.weights for _, head in heads]
        self._head_weights = np.array(weights, np.float32).reshape(-1, embedder.dimension)
        self._head_biases = np.array([head.bias for _, head in heads], dtype=np.float32)

    @classmethod
    def build(
        cls,
        targets: Sequence[Target],
        embedder: Embedder,
        config: DetectionConfig | None = None,
        *,
        previous: TargetDetector | None = None,
    ) -> TargetDetector:
        """Compile `targets` (disabled ones are left out). With `previous`, the detector this one
        replaces, targets whose content did not change are not embedded again."""
        config = config or DetectionConfig()
        reusable: dict[str, _CompiledTarget] = {}
        neutral_vectors = None
        if (
            previous is not None
            and previous._embedder is embedder
            and previous._config.anchor_settings() == config.anchor_settings()
        ):
            reusable = previous._compiled
            neutral_vectors = previous._neutral_vectors
        compiled: dict[str, _CompiledTarget] = {}
        stale: list[Target] = []
        for target in targets:
            if not target.enabled:
                continue
            known = reusable.get(target.id)
            if known is not None and known.fingerprint == _fingerprint(target):
                compiled[target.id] = known
            else:
                stale.append(target)
        wants_classifier = [target for target in stale if cls._wants_classifier(target, config)]
        if wants_classifier and neutral_vectors is None:
            neutral_vectors = embedder.encode(NEUTRAL_PROMPTS)
        compiled.update(cls._compile(stale, embedder, config, neutral_vectors))
        return cls(targets, compiled, embedder, config, neutral_vectors)

    @staticmethod
    def _wants_classifier(target: Target, config: DetectionConfig) -> bool:
        return config.use_classifier and len(target.examples) >= config.classifier_min_examples

    @classmethod
    def _compile(
        cls,
        targets: Sequence[Target],
        embedder: Embedder,
        config: DetectionConfig,
        neutral_vectors: np.ndarray | None,
    ) -> dict[str, _CompiledTarget]:
        """Embed the anchors of all `targets`, and the examples their classifiers learn from, in one
        batch (batching is what makes encoding fast). Examples are embedded on their own because
        the anchors may keep only a sample of a very long target's content."""
        anchors = [target_anchors(t, config.anchor_max_words, config.max_content_anchors) for t in targets]
        examples = [
            target.examples if neutral_vectors is not None and cls._wants_classifier(target, config) else []
            for target in targets
        ]
        texts: list[str] = []
        for group, own in zip(anchors, examples, strict=True):
            texts += [anchor.text for anchor in group] + own
        vectors = embedder.encode(texts)
        compiled: dict[str, _CompiledTarget] = {}
        start = 0
        for target, group, own in zip(targets, anchors, examples, strict=True):
            anchor_vectors = vectors[start : start + len(group)]
            example_vectors = vectors[start + len(group) : start + len(group) + len(own)]
            start += len(group) + len(own)
            compiled[target.id] = _CompiledTarget(
                fingerprint=_fingerprint(target),
                vectors=anchor_vectors,
                kinds=np.array([_KINDS.index(anchor.kind) for anchor in group], dtype=np.int8),
                head=(
                    train_head(example_vectors, neutral_vectors, config.classifier_l2)
                    if own and neutral_vectors is not None
                    else None
                ),
            )
        return compiled

    def _build_index(self, vectors: np.ndarray) -> tuple[faiss.Index | None, np.ndarray]:
        """Exact inner-product search while it is fast enough, HNSW beyond `hnsw_min_anchors`.

        The anchor vectors are kept once, inside the index: exact re-scoring of candidate targets,
        and the next build's reuse of unchanged targets, read them through a view of the index's
        storage rather than a second copy (which would double the largest part of the memory).
        The view is only reachable through this detector, which keeps the index alive.
        """
        if len(vectors) == 0:
            return None, vectors.astype(np.float32)
        dimension = vectors.shape[1]
        if len(vectors) >= self._config.hnsw_min_anchors:
            index = faiss.IndexHNSWFlat(dimension, self._config.hnsw_neighbors, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self._config.hnsw_ef_search
            storage = faiss.downcast_index(index.storage)
        else:
            index = faiss.IndexFlatIP(dimension)
            storage = index
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        view = faiss.rev_swig_ptr(storage.get_xb(), len(vectors) * dimension).reshape(len(vectors), dimension)
        view.flags.writeable = False
        return index, view

    @property
    def config(self) -> DetectionConfig:
        return self._config

    @property
    def target_ids(self) -> tuple[str, ...]:
        """The targets this detector can fire (the enabled ones)."""
        return self._target_ids

    def stats(self) -> dict[str, int | str]:
        """Sizes, for capacity planning and the latency benchmark."""
        return {
            "targets": len(self._target_ids),
            "anchors": len(self._vectors),
            "name_phrases": self._name_phrases,
            "classifiers": len(self._head_owner),
            "index": type(self._index).__name__ if self._index is not None else "none",
            "index_bytes": int(faiss.serialize_index(self._index).nbytes) if self._index is not None else 0,
        }

    def explain(self, text: str) -> list[Evidence]:
        """The evidence about `text` for every target that is named in it, has an anchor at least
        as close as the lower embedding threshold, or leans towards it by its classifier; the
        thresholds themselves are not applied."""
        return list(self._evidence([text], embedded=1).values())

    def detect(self, text: str) -> list[Detection]:
        """The targets `text` touches, strongest first."""
        return self._decide(self._evidence([text], embedded=1).values())

    def detect_conversation(self, messages: Sequence[str]) -> list[Detection]:
        """The targets a conversation touches: names anywhere in it, meaning in its latest messages.

        Everything said earlier stays in the model's context, so a target named three turns ago
        still governs the answer to "and what was his first novel?". Messages older than the last
        `history_messages` count by full names and aliases only, which keeps a long conversation
        cheap; each message is otherwise judged on its own and the strongest evidence wins.
        """
        return self._decide(self._evidence(messages, embedded=self._config.history_messages).values())

    def detect_generated(self, text_so_far: str) -> list[Detection]:
        """The targets the answer has reached so far, judged on its tail only.

        Called at intervals during decoding, it catches a prompt that reaches a target only
        through the answer ("who wrote Misery?"). Each call reads the last
        `generated_window_chars` characters, so its cost does not grow with the answer; calls
        must come at least that often (in characters) for every stretch of the answer to be read.
        """
        return self.detect(tail_window(text_so_far, self._config.generated_window_chars))

    def _decide(self, evidence: Iterable[Evidence]) -> list[Detection]:
        fired = [detection for found in evidence if (detection := found.decide(self._config)) is not None]
        return sorted(fired, key=lambda detection: (-detection.score, detection.target_id))

    def _evidence(self, texts: Sequence[str], embedded: int) -> dict[str, Evidence]:
        """Evidence about `texts`, per target: names in all of them, meaning in the last `embedded`,
        with one call to the embedding model for everything (it is the expensive part)."""
        found: dict[str, Evidence] = {}
        pieces: list[str] = []
        query_rows: list[int] = []
        unnamed_rows: dict[str, list[int]] = {}
        for position, text in enumerate(texts):
            matches = self._find_names(text)
            for match in matches:
                evidence = Evidence(match.key, match=match)
                found[match.key] = found[match.key].merge(evidence) if match.key in found else evidence
            if position < len(texts) - embedded or self._index is None:
                continue
            chunks = self._chunks(text)
            query_rows += range(len(pieces), len(pieces) + len(chunks))
            pieces += chunks
            for match in matches:
                if match.kind == "partial" and chunks:
                    masked = self._chunks(f"{text[: match.span[0]]}{_MASK}{text[match.span[1] :]}")
                    unnamed_rows.setdefault(match.key, []).extend(
                        range(len(pieces), len(pieces) + len(masked))
                    )
                    pieces += masked
        if not query_rows:
            return found
        vectors = self._embedder.encode(pieces)
        queries = vectors[query_rows]
        similarities, nearest = self._index.search(queries, min(self._config.search_k, len(self._vectors)))
        floor = min(self._config.identity_threshold, self._config.content_threshold)
        candidates = {int(slot) for slot in self._owner[nearest[(nearest >= 0) & (similarities >= floor)]]}
        for slot in candidates | {self._slot[target_id] for target_id in found}:
            target_id = self._target_ids[slot]
            names, description, content = self._similarities(queries, slot)
            unnamed = -1.0
            if target_id in unnamed_rows:
                _, unnamed_description, unnamed_content = self._similarities(
                    vectors[unnamed_rows[target_id]], slot
                )
                unnamed = max(unnamed_description, unnamed_content)
            found[target_id] = replace(
                found.get(target_id, Evidence(target_id)),
                names=names,
                description=description,
                content=content,
                unnamed=unnamed,
            )
        if len(self._head_owner):
            scores = probabilities(queries, self._head_weights, self._head_biases).max(axis=0)
            for slot, score in zip(self._head_owner, scores, strict=True):
                if score >= _CLASSIFIER_FLOOR:
                    target_id = self._target_ids[slot]
                    evidence = found.get(target_id, Evidence(target_id))
                    found[target_id] = replace(evidence, classifier=float(score))
        return found

    def _chunks(self, text: str) -> list[str]:
        return query_chunks(text, self._config.query_chunk_words, self._config.max_query_chunks)

    def _similarities(self, queries: np.ndarray, slot: int) -> tuple[float, float, float]:
        """Best cosine between any of `queries` and the target's anchors, per anchor kind."""
        begin, end = self._offsets[slot], self._offsets[slot + 1]
        best = (queries @ self._vectors[begin:end].T).max(axis=0)
        kinds = self._kinds[begin:end]
        names, description, content = (float(best[kinds == code].max(initial=-1.0)) for code in range(3))
        return names, description, content
