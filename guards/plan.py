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

    def is_empty(self) -> bool:
        return not self.banned_sequences
