"""Random SAEs in sae-lens's format, for models whose real SAE would take training."""

from __future__ import annotations

import torch

from lethe.models.sae.sparse_autoencoder import JumpReLUConfig, SparseAutoencoder


def random_sae(d_in: int, d_sae: int, layer: int, seed: int = 0, threshold: float = 0.0) -> SparseAutoencoder:
    """A JumpReLU SAE with random unit-norm decoder rows and the encoder as their transpose: about
    half its features fire on any token when `threshold` is 0."""
    generator = torch.Generator().manual_seed(seed)
    decoder = torch.randn(d_sae, d_in, generator=generator)
    decoder = decoder / decoder.norm(dim=1, keepdim=True)
    config = JumpReLUConfig(
        d_in=d_in,
        d_sae=d_sae,
        metadata={"model_name": "test", "hook_name": f"blocks.{layer}.hook_resid_post"},
    )
    return SparseAutoencoder(
        config,
        {
            "W_enc": decoder.T.contiguous(),
            "b_enc": torch.zeros(d_sae),
            "W_dec": decoder,
            "b_dec": torch.zeros(d_in),
            "threshold": torch.full((d_sae,), threshold),
        },
    )
