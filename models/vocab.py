"""The model's input embedding matrix, read straight from the checkpoint for guard compilation.

Reading it from the safetensors file (instead of from a loaded engine) works the same for every
engine, including vLLM whose weights live in another process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

_NAMES = ("model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight")


def input_embeddings(model_path: Path) -> np.ndarray:
    """Centred, row-normalised float32 [vocab, hidden] input embeddings of the checkpoint.

    Centring matters: raw input embeddings share a large common direction, under which every
    token looks close to every other (cosine > 0.5 for a third of the vocabulary)."""
    files = sorted(model_path.glob("*.safetensors"))
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_path / weight_map[name] for name in _NAMES if name in weight_map]
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            stored = set(handle.keys())  # safe_open supports keys() but not `in`
            for name in _NAMES:
                if name in stored:
                    matrix = handle.get_tensor(name).float().numpy()
                    matrix = matrix - matrix.mean(axis=0)
                    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
                    return matrix / np.maximum(norms, 1e-8)
    raise FileNotFoundError(f"no input embedding matrix among {', '.join(_NAMES)} in {model_path}")
