"""The SAE feature clamp: a layer hook that, on the rows of requests whose plan names SAE features
(`GuardPlan.sae_clamp`, filled for fired targets), sets each named feature to its clamp value on the
tokens where it fires, and leaves everything else of the residual stream as it was.

As in SAEBench's unlearning evaluation and Dynamic SAE Guardrails, the SAE's reconstruction error is
added back, so the change to the residual stream is exactly `sum_i (value_i - a_i) * W_dec[i]` over
the selected features i that fire: the SAE's imperfect reconstruction of everything else never
reaches the model. A feature that does not fire on a token is left alone (clamping it too would push
every token away from the concept, the over-correction Farrell et al. report for dense steering).
Rows with nothing to clamp are not touched, and a batch with nothing to clamp is returned as None,
so requests that fired nothing decode exactly as without an SAE. Attention-sink tokens (norm above
the SAE's `outlier_norm`, which training left out) are never touched either.

The hook holds the encoder columns and decoder rows of every feature (a plan may name any of them)
and pickles with them to vLLM's worker process once, when it is installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lethe.models.engine import GenerationRequest
from lethe.models.sae.sparse_autoencoder import SparseAutoencoder, TopKConfig


class FeatureClamp:
    """A `LayerHook` for `SparseAutoencoder.layer`."""

    def __init__(self, sae: SparseAutoencoder) -> None:
        self.sae = sae

    def __call__(self, hidden: torch.Tensor, rows: Sequence[GenerationRequest]) -> torch.Tensor | None:
        clamped: torch.Tensor | None = None
        for row, request in enumerate(rows):
            if not request.plan.sae_clamp:
                continue
            if clamped is None:
                clamped = hidden.clone()
            clamped[row] = self.apply(hidden[row], request.plan.sae_clamp)
        return clamped

    def apply(self, stream: torch.Tensor, clamp: Sequence[tuple[int, float]]) -> torch.Tensor:
        """`stream` [tokens, d_in] with the features of `clamp` set to their values where they fire."""
        indices = torch.tensor([feature for feature, _ in clamp], dtype=torch.long)
        values = torch.tensor([value for _, value in clamp], dtype=torch.float32)
        activations = self._activations(stream, indices)
        fires = (activations > 0) & self.sae.inliers(stream).unsqueeze(-1)
        delta = torch.where(fires, values - activations, torch.zeros_like(activations))
        return (stream.float() + delta @ self.sae.W_dec[indices]).to(stream.dtype)

    def _activations(self, stream: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The selected features' activations [tokens, len(indices)]. A TopK SAE decides which features
        fire from all of them, so it encodes in full; JumpReLU and ReLU SAEs need only the
        selected columns of the encoder."""
        sae = self.sae
        if isinstance(sae.config, TopKConfig):
            return sae.encode(stream)[:, indices]
        shift = sae.b_dec if sae.config.apply_b_dec_to_input else 0.0
        pre = (stream.float() - shift) @ sae.W_enc[:, indices] + sae.b_enc[indices]
        return pre.relu() * (pre > sae.threshold[indices])
