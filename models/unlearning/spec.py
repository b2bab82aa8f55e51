"""What an unlearning job asks for: the method, its targets and its hyperparameters.

A job is one model per method (`SSDJob`, `FLATJob`), told apart by `method`: `UnlearnSpec` is that
discriminated union, so a request is validated once, where it arrives (the job API's body, the
`lethe unlearn` arguments, a stored job read back by the worker), and the admin API's schema names
every hyperparameter. Numbers must be finite and inside the documented ranges; module patterns must
compile. What needs the store, the evaluation data or the model (targets that exist, a starting
checkpoint, patterns that match a parameter) is checked by `lethe.gateway.jobs.validation`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

DEFAULT_SSD_MODULES = [r"^model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+\.weight$"]
"""Linear weights of the decoder blocks. The embedding is left out: it is tied to the output head on
SmolLM2, so dampening one of its rows silences a token everywhere, which is not selective; norms
are left out because their importance is shared by every input."""


MAX_TARGETS = 64
"""Most targets one job may name."""
MAX_SAMPLES = 10_000
"""Most forget or retain sequences a job may ask for (the largest measured run used 384)."""
MAX_SEED = 2**32 - 1


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"not a regular expression: {error}") from None
    return pattern


ModulePattern = Annotated[str, StringConstraints(min_length=1, max_length=1000), AfterValidator(_compiles)]
"""A regular expression (`re.search`) over parameter names, compiled when the job is submitted."""
TargetName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=512)]
"""A registered target's id or name, or the name (or folder name) of an RWKU evaluation target; never
a path."""


def _seed_field(description: str) -> Any:
    return Field(0, ge=0, le=MAX_SEED, description=description)


def _neighbours_field() -> Any:
    """One definition for both methods (a FieldInfo is not shared between models)."""
    return Field(
        0,
        ge=0,
        le=64,
        description="per target, the names its documents mention most whose descriptions by the model"
        " become retain data (0: none; see models.unlearning.neighbours)",
    )


class _Params(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid", allow_inf_nan=False)


class SSDParams(_Params):
    """Selective Synaptic Dampening (Foster et al. 2023): a parameter whose forget importance
    exceeds `alpha` times its retain importance is multiplied by min(lambda * I_retain / I_forget, 1).

    Defaults were tuned on the embedded model (one RWKU target): the paper's alpha 10 dampened 0.7%
    of the decoder weights and cost 15% of neighbour recall; alpha 50 forgot as much and kept it."""

    alpha: float = Field(
        50.0, gt=0, description="selection weighting: dampen where I_forget > alpha * I_retain"
    )
    lambda_: float = Field(
        1.0,
        alias="lambda",
        gt=0,
        description="dampening constant: factor min(lambda * I_retain / I_forget, 1)",
    )
    modules: list[ModulePattern] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="regular expressions over parameter names to consider (default: decoder linear weights);"
        " each must match a parameter of the model the job edits",
    )
    forget_samples: int = Field(
        32, ge=1, le=MAX_SAMPLES, description="forget sequences for the forget Fisher (all targets)"
    )
    per_target: bool = Field(
        True,
        description="one forget Fisher per target, each weight dampened by the strongest target's factor"
        " (off: one Fisher over every target's data)",
    )
    retain_samples: int = Field(
        64, ge=1, le=MAX_SAMPLES, description="retain sequences for the retain Fisher"
    )
    neighbours: int = _neighbours_field()
    max_length: int = Field(256, ge=8, le=4096, description="tokens per sequence")
    batch_size: int = Field(4, ge=1, le=256, description="sequences per Fisher mini-batch (1: per-sequence)")
    seed: int = _seed_field("seed of the sample selection")

    def module_patterns(self) -> list[str]:
        return self.modules if self.modules is not None else DEFAULT_SSD_MODULES


class FLATParams(_Params):
    """FLAT (Loss Adjustment with only Forget data, ICLR 2025): fine-tune so that template answers
    ("I don't know") gain probability and the forget answers lose it, through the variational
    form of an f-divergence between the two.

    Defaults were tuned on the embedded model (one RWKU target): forget-only training generalises
    the template answer to unrelated questions quickly (at 2e-5 x 16 steps TOFU recall fell from
    0.55 to 0.19), so the default is the reference's 1e-5 and a short epoch."""

    divergence: Literal["tv", "kl", "js", "pearson"] = Field("tv", description="f-divergence of the loss")
    epochs: int = Field(1, ge=1, le=100, description="passes over the forget pairs")
    learning_rate: float = Field(1e-5, gt=0, le=1.0, description="AdamW learning rate")
    batch_size: int = Field(4, ge=1, le=256, description="forget pairs per optimiser step")
    max_length: int = Field(256, ge=16, le=4096, description="tokens per prompt + answer")
    forget_samples: int = Field(
        32, ge=1, le=MAX_SAMPLES, description="(prompt, forget answer) pairs per epoch (all targets)"
    )
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay")
    warmup_ratio: float = Field(
        0.1, ge=0, le=1, description="share of steps with a linear learning-rate warm-up"
    )
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="gradient clipping norm")
    neighbours: int = _neighbours_field()
    retain_weight: float = Field(
        1.0,
        ge=0,
        le=1000,
        description="weight of the language-modelling loss on the neighbours' descriptions",
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
    seed: int = _seed_field("seed of sampling, template choice and shuffling")


class _Job(BaseModel):
    """What every job kind has: its targets and the checkpoint it starts from."""

    model_config = ConfigDict(extra="forbid")

    method: str
    targets: list[TargetName] = Field(
        min_length=1,
        max_length=MAX_TARGETS,
        description="registered target ids or names, or names of RWKU targets in the evaluation data"
        " (LETHE_EVAL_DATA); never paths; each once",
    )
    params: BaseModel
    from_checkpoint: str | None = Field(
        None,
        description="checkpoint id to start from: `base` for the base model; omitted, the job API and"
        " `lethe unlearn` fix it to the checkpoint serving at submission",
    )


class SSDJob(_Job):
    """Selective Synaptic Dampening of the source model's weights."""

    method: Literal["ssd"]
    params: SSDParams = Field(default_factory=SSDParams)


class FLATJob(_Job):
    """FLAT fine-tuning of the source model on the targets' forget data."""

    method: Literal["flat"]
    params: FLATParams = Field(default_factory=FLATParams)


UnlearnJob = SSDJob | FLATJob
UnlearnSpec = Annotated[UnlearnJob, Field(discriminator="method")]
"""One unlearning job, validated by its `method`; a new kind of job joins this union."""
_UNLEARN_SPEC: TypeAdapter[UnlearnJob] = TypeAdapter(UnlearnSpec)


def parse_spec(data: Any) -> UnlearnJob:
    """A job from its JSON-like form (the API body, a stored job); raises pydantic.ValidationError."""
    return _UNLEARN_SPEC.validate_python(data)


def stored_spec(spec: UnlearnJob) -> dict[str, Any]:
    """The job as stored and shown: `params` holds the hyperparameters that were given (by their
    public names), so that `parse_spec` reads it back to the same job."""
    stored = spec.model_dump(mode="json")
    stored["params"] = spec.params.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return stored
