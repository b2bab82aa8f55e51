"""A target's SAE features: which sparse-autoencoder features stand for the target in the served
model, chosen at registration (lethe.models.sae.features) and stored with the target so that every
replica clamps the same ones.

Plain data here, since guards import nothing of the models: a selection names the SAE it indexes (its
fingerprint) and the target version it was chosen from, and is ignored once either changes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SelectionConfig(BaseModel):
    """How a target's features are chosen (LETHE_SAE_FEATURES__MAX_FEATURES=...)."""

    strategy: Literal["frequency", "random"] = Field(
        default="frequency",
        description="frequency: the features that fire on the target's text and not on general text; "
        "random: as many features drawn at random from the whole SAE, a control for measuring what the "
        "choice adds (never for serving).",
    )
    max_features: int = Field(default=20, ge=1, description="Most features clamped per target.")
    min_forget_rate: float = Field(
        default=0.01, gt=0, le=1, description="Share of the target's tokens a feature must fire on."
    )
    max_retain_rate: float = Field(
        default=0.002, ge=0, le=1, description="Most a feature may fire on general chat tokens."
    )
    max_forget_tokens: int = Field(
        default=4096,
        ge=16,
        description="Most tokens of a target's own text read to choose its features (its documents in "
        "order, then its examples): a target with hundreds of documents is chosen in seconds.",
    )
    min_detect_share: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="SAE detection: the least share of a prompt's tokens on which a target's features "
        "must fire for it to fire the target (raised per target above every general text's share).",
    )


class SAEFeature(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=0, description="The feature's index in the SAE.")
    mean_activation: float = Field(
        gt=0, description="Its mean activation on the target's text where it fires; the clamp scales to it."
    )
    forget_rate: float = Field(ge=0, le=1, description="Share of the target's tokens on which it fires.")
    retain_rate: float = Field(ge=0, le=1, description="Share of general chat tokens on which it fires.")


class TargetFeatures(BaseModel):
    """The features chosen for one version of one target under one SAE."""

    model_config = ConfigDict(frozen=True)

    target_id: str
    sae: str = Field(description="Fingerprint of the SAE the indices refer to.")
    layer: int = Field(ge=0, description="The decoder layer the SAE reads.")
    target_version: int = Field(ge=1, description="The target version the features were chosen from.")
    forget_tokens: int = Field(ge=0, description="Tokens of the target's text the choice was made on.")
    features: tuple[SAEFeature, ...] = ()
    detect_share: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="SAE detection fires the target on a prompt when at least this share of its tokens "
        "has one of the features firing.",
    )

    def clamp(self, multiple: float) -> tuple[tuple[int, float], ...]:
        """(feature, value) pairs: each feature set to `-multiple` times its own mean activation."""
        return tuple((f.index, -multiple * f.mean_activation) for f in self.features)
