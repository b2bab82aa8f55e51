"""What an unlearning job asks for: the method, its targets and its hyperparameters.

The job API stores `UnlearnSpec` as submitted (params as a plain dict) and validates the params
with `method_params()` both at submission, to answer 4xx, and when the worker runs the job.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_SSD_MODULES = [r"^model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+\.weight$"]
"""Linear weights of the decoder blocks. The embedding is left out: it is tied to the output head on
SmolLM2, so dampening one of its rows silences a token everywhere, which is not selective; norms
are left out because their importance is shared by every input."""


def _neighbours_field() -> Any:
    """One definition for both methods (a FieldInfo is not shared between models)."""
    return Field(
        0,
        ge=0,
        le=64,
        description="per target, the names its documents mention most whose descriptions by the model"
        " become retain data (0: none; see models.unlearning.neighbours)",
    )


class SSDParams(BaseModel):
    """Selective Synaptic Dampening (Foster et al. 2023): a parameter whose forget importance
    exceeds `alpha` times its retain importance is multiplied by min(lambda * I_retain / I_forget, 1).

    Defaults were tuned on the embedded model (one RWKU target): the paper's alpha 10 dampened 0.7%
    of the decoder weights and cost 15% of neighbour recall; alpha 50 forgot as much and kept it."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    alpha: float = Field(
        50.0, gt=0, description="selection weighting: dampen where I_forget > alpha * I_retain"
    )
    lambda_: float = Field(
        1.0,
        alias="lambda",
        gt=0,
        description="dampening constant: factor min(lambda * I_retain / I_forget, 1)",
    )
    modules: list[str] | None = Field(
        None,
        min_length=1,
        description="regular expressions over parameter names to consider (default: decoder linear weights)",
    )
    forget_samples: int = Field(32, ge=1, description="forget sequences for the forget Fisher (all targets)")
    per_target: bool = Field(
        True,
        description="one forget Fisher per target, each weight dampened by the strongest target's factor"
        " (off: one Fisher over every target's data)",
    )
    retain_samples: int = Field(64, ge=1, description="retain sequences for the retain Fisher")
    neighbours: int = _neighbours_field()
    max_length: int = Field(256, ge=8, le=4096, description="tokens per sequence")
    batch_size: int = Field(4, ge=1, le=256, description="sequences per Fisher mini-batch (1: per-sequence)")
    seed: int = Field(0, description="seed of the sample selection")

    def module_patterns(self) -> list[str]:
        return self.modules if self.modules is not None else DEFAULT_SSD_MODULES


class FLATParams(BaseModel):
    """FLAT (Loss Adjustment with only Forget data, ICLR 2025): fine-tune so that template answers
    ("I don't know") gain probability and the forget answers lose it, through the variational
    form of an f-divergence between the two.

    Defaults were tuned on the embedded model (one RWKU target): forget-only training generalises
    the template answer to unrelated questions quickly (at 2e-5 x 16 steps TOFU recall fell from
    0.55 to 0.19), so the default is the reference's 1e-5 and a short epoch."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    divergence: Literal["tv", "kl", "js", "pearson"] = Field("tv", description="f-divergence of the loss")
    epochs: int = Field(1, ge=1, le=100, description="passes over the forget pairs")
    learning_rate: float = Field(1e-5, gt=0, le=1.0, description="AdamW learning rate")
    batch_size: int = Field(4, ge=1, le=256, description="forget pairs per optimiser step")
    max_length: int = Field(256, ge=16, le=4096, description="tokens per prompt + answer")
    forget_samples: int = Field(32, ge=1, description="(prompt, forget answer) pairs per epoch (all targets)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(
        0.1, ge=0, le=1, description="share of steps with a linear learning-rate warm-up"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    neighbours: int = _neighbours_field()
    retain_weight: float = Field(
        1.0, ge=0, description="weight of the language-modelling loss on the neighbours' descriptions"
    )
    keep_neighbours: float | None = Field(
        None,
        gt=0,
        le=1,
        description="stop once the share of held-out neighbour questions on which the model prefers its"
        " own earlier answer to a template answer falls below this fraction of its value before"
        " training, keeping the weights of the last check above it (None: train every step)",
    )
    check_every: int = Field(4, ge=1, le=1000, description="optimiser steps between two stopping checks")
    seed: int = Field(0, description="seed of sampling, template choice and shuffling")


class UnlearnSpec(BaseModel):
    """One unlearning job: `from_checkpoint` None starts from the model the gateway serves."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["ssd", "flat"]
    targets: list[str] = Field(min_length=1, description="target names (or RWKU folder paths)")
    params: dict[str, Any] = Field(default_factory=dict)
    from_checkpoint: str | None = None

    def method_params(self) -> SSDParams | FLATParams:
        """The validated hyperparameters; raises pydantic.ValidationError on bad ones."""
        model = SSDParams if self.method == "ssd" else FLATParams
        return model.model_validate(self.params)
