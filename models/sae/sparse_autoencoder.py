"""Sparse autoencoders in sae-lens's on-disk format, so that published SAEs (Gemma Scope, Llama
Scope) and the ones `lethe sae train` writes load the same way.

A folder holds `cfg.json` and `sae_weights.safetensors` with `W_enc [d_in, d_sae]`, `b_enc
[d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]` and, for JumpReLU, `threshold [d_sae]`. The config
says the architecture (which picks how features are computed) and the hook it reads: sae-lens 6
keeps `hook_name` under `metadata`, sae-lens 5 at the top level; both are read. Lethe hooks the
residual stream after a decoder layer, `blocks.{L}.hook_resid_post` in TransformerLens's names,
which is the output of `model.layers[L]` in transformers and vLLM.

sae-lens itself is not a dependency: it imports TransformerLens and wandb at import time, which
a gateway that only applies an SAE must not carry. This module reads and writes its format.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from safetensors.torch import load_file, save_file

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"

_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")


class SAEMetadata(BaseModel):
    """sae-lens's `metadata` block (the fields Lethe reads; the others are kept as they are)."""

    model_config = ConfigDict(extra="allow")

    model_name: str | None = None
    hook_name: str | None = None
    outlier_norm: float | None = Field(
        default=None,
        description="Residual vectors longer than this (attention sinks) were left out of training "
        "(`lethe sae train` records it): the SAE says nothing meaningful about them.",
    )


class _SAEConfigBase(BaseModel):
    model_config = ConfigDict(extra="allow")

    d_in: int = Field(gt=0)
    d_sae: int = Field(gt=0)
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: Literal["none"] = Field(
        default="none",
        description="Lethe serves SAEs whose input is the raw residual stream; fold any scaling "
        "factor into the weights first (sae-lens: `fold_activation_norm_scaling_factor`).",
    )
    metadata: SAEMetadata = Field(default_factory=SAEMetadata)
    hook_name: str | None = Field(default=None, description="sae-lens 5 kept the hook name here.")

    @property
    def hook(self) -> str:
        name = self.metadata.hook_name or self.hook_name
        if name is None:
            raise ValueError("the SAE config names no hook (metadata.hook_name)")
        return name

    @property
    def layer(self) -> int:
        """The decoder layer whose output the SAE reads."""
        found = _HOOK.match(self.hook)
        if found is None:
            raise ValueError(
                f"Lethe applies SAEs on the residual stream after a layer (blocks.L.hook_resid_post); "
                f"this one reads {self.hook!r}"
            )
        return int(found.group(1))


class JumpReLUConfig(_SAEConfigBase):
    """A feature is active where its pre-activation passes its own threshold (what sae-lens saves a
    BatchTopK SAE as, and Gemma Scope's architecture)."""

    architecture: Literal["jumprelu"] = "jumprelu"


class StandardConfig(_SAEConfigBase):
    """ReLU features (the L1-trained SAEs of sae-lens's first releases)."""

    architecture: Literal["standard"] = "standard"


class TopKConfig(_SAEConfigBase):
    """The k largest pre-activations of each token."""

    architecture: Literal["topk"] = "topk"
    k: int = Field(gt=0)


SAEConfig = Annotated[JumpReLUConfig | StandardConfig | TopKConfig, Field(discriminator="architecture")]
_CONFIG = TypeAdapter(SAEConfig)


class SparseAutoencoder:
    """An SAE's weights for inference: encode the residual stream into features, decode back."""

    def __init__(
        self, config: JumpReLUConfig | StandardConfig | TopKConfig, weights: dict[str, torch.Tensor]
    ) -> None:
        self.config = config
        self.W_enc = weights["W_enc"].float()
        self.b_enc = weights["b_enc"].float()
        self.W_dec = weights["W_dec"].float()
        self.b_dec = weights["b_dec"].float()
        threshold = weights.get("threshold")
        if isinstance(config, JumpReLUConfig) and threshold is None:
            raise ValueError("a jumprelu SAE needs a `threshold` tensor")
        self.threshold = (threshold if threshold is not None else torch.zeros(config.d_sae)).float()
        expected = {
            "W_enc": (config.d_in, config.d_sae),
            "b_enc": (config.d_sae,),
            "W_dec": (config.d_sae, config.d_in),
            "b_dec": (config.d_in,),
            "threshold": (config.d_sae,),
        }
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"SAE tensor {name} has shape {tuple(getattr(self, name).shape)}, cfg.json says {shape}"
                )

    @property
    def layer(self) -> int:
        return self.config.layer

    def inliers(self, residual: torch.Tensor) -> torch.Tensor:
        """Boolean [...]: the vectors the SAE was trained on the like of (not outliers by norm)."""
        bound = self.config.metadata.outlier_norm
        if bound is None:
            return torch.ones(residual.shape[:-1], dtype=torch.bool)
        return residual.float().norm(dim=-1) <= bound

    def pre_activations(self, residual: torch.Tensor) -> torch.Tensor:
        shift = self.b_dec if self.config.apply_b_dec_to_input else 0.0
        return (residual.float() - shift) @ self.W_enc + self.b_enc

    def encode(self, residual: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] of residual-stream vectors [..., d_in]."""
        pre = self.pre_activations(residual)
        if isinstance(self.config, TopKConfig):
            top = pre.relu().topk(self.config.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        return pre.relu() * (pre > self.threshold)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.W_dec + self.b_dec

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the weights: feature selections stored with a target name the SAE they index."""
        digest = hashlib.sha256()
        for tensor in (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold):
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def check_fits(self, model_path: Path) -> None:
        """Raise ValueError unless the model has the SAE's layer and its width."""
        config = json.loads((model_path / "config.json").read_text())
        hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
        if hidden != self.config.d_in:
            raise ValueError(f"the SAE reads vectors of {self.config.d_in}, the model's are {hidden} wide")
        if layers is not None and not 0 <= self.layer < layers:
            raise ValueError(f"the SAE reads layer {self.layer}, the model has {layers} layers")

    # ------------------------------------------------------------------- disk
    @classmethod
    def load(cls, folder: Path) -> SparseAutoencoder:
        config_path = folder / CONFIG_FILE
        weights_path = folder / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: an SAE folder holds {CONFIG_FILE} and {WEIGHTS_FILE}"
                )
        raw: dict[str, Any] = json.loads(config_path.read_text())
        if "meta" in raw and "metadata" not in raw:  # sae-lens 6.0 to 6.x wrote `meta`
            raw["metadata"] = raw.pop("meta")
        return cls(_CONFIG.validate_python(raw), load_file(str(weights_path)))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        weights = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if isinstance(self.config, JumpReLUConfig):
            weights["threshold"] = self.threshold
        save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(self.config.model_dump_json(indent=2, exclude_none=True))
