"""The guard plan: what one request must not say, as small serialisable data.

A plan crosses process boundaries (vLLM reads it from `SamplingParams.extra_args`), so it holds
token-id sequences and target ids only; anything large is looked up by target id where it is used.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class GuardPlan(BaseModel):
    """Per-request restrictions an engine applies at every decode step."""

    model_config = ConfigDict(frozen=True)

    target_ids: tuple[str, ...] = Field(default=(), description="Registered targets this request fired.")
    banned_sequences: tuple[tuple[int, ...], ...] = Field(
        default=(), description="Token sequences that must never be completed in the output."
    )
    forbidden_strings: tuple[str, ...] = Field(
        default=(), description="Strings that must never appear in the output text, in any case or spacing."
    )
    forbidden_words: tuple[str, ...] = Field(
        default=(), description="Like forbidden_strings, but matched as whole words only."
    )
    forbidden_names: tuple[str, ...] = Field(
        default=(),
        description="Words of the fired targets' names, forbidden as whole words also when misspelt "
        "by one letter, unless the word written is an everyday word.",
    )
    penalized_tokens: tuple[int, ...] = Field(
        default=(), description="Tokens close in meaning to the forbidden content (semantic penalty)."
    )
    penalty: float = Field(default=0.0, ge=0.0, description="Logit penalty subtracted from penalized_tokens.")
    sae_clamp: tuple[tuple[int, float], ...] = Field(
        default=(),
        description="(SAE feature, value) pairs: where the feature fires, the engine's SAE hook sets "
        "it to the value (negative) and keeps the rest of the residual stream as it was.",
    )

    def is_empty(self) -> bool:
        """No decoding restriction (the SAE clamp acts inside the model, not on the logits)."""
        return not (
            self.banned_sequences
            or self.forbidden_strings
            or self.forbidden_words
            or self.forbidden_names
            or (self.penalized_tokens and self.penalty)
        )
