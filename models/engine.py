"""The engine protocol every generation backend implements (transformers today, vLLM next).

The gateway only speaks this protocol. Its shape follows what both backends can do: requests are
token ids plus sampling parameters plus a guard plan (small data a vLLM worker can receive);
results stream back as increments of text and tokens; layer hooks see the whole running batch
with the request of each row, because a hook that must act on some requests only (SAE feature
clamping for a fired target) has to know which row is which.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch

from lethe.guards.plan import GuardPlan

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one sequence. `temperature == 0` means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    """Number of alternatives to report per token; None reports no log-probabilities at all."""
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    plan: GuardPlan = field(default_factory=GuardPlan)


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of a chosen token under the model (before sampling adjustments)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationOutput:
    """One increment of a sequence: the text that became final and the tokens behind it.

    Text is held back while it could still turn into a stop string, a forbidden string or an
    incomplete UTF-8 character; tokens (and their log-probabilities) are reported once their text
    is final, so an undone token is never reported.
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    suppressed_tokens: int = 0
    """Tokens generated and then undone because they completed a forbidden string (cumulative)."""
    suppressed_text: str = ""
    """The text of the tokens undone since the previous output. Never sent to the client, but
    evidence of what the answer was reaching for: the guard fires the target it names."""


class EngineError(RuntimeError):
    """Generation failed inside the engine; the request fails closed."""


class EngineUnavailable(EngineError):
    """The engine is not running (stopped, crashed, or its process died and is being restarted):
    the API answers 503 `engine_unavailable`, and the request may be retried."""


LayerHook = Callable[[torch.Tensor, Sequence[GenerationRequest]], torch.Tensor | None]
"""Called with a decoder layer's output hidden states [batch, tokens, hidden] and the request of
each batch row; returns replacement hidden states or None to leave them unchanged."""


class HookHandle(Protocol):
    async def remove(self) -> None: ...


class Engine(Protocol):
    model_name: str
    model_path: Path
    """The checkpoint folder served (guards read its tokenizer-level data, such as input embeddings)."""
    max_context: int
    vocab_size: int

    async def start(self) -> None:
        """Load and warm up; return when the engine can serve."""

    async def shutdown(self) -> None: ...

    def is_healthy(self) -> bool: ...

    def load(self) -> tuple[int, int]:
        """(sequences being decoded, sequences waiting to be admitted), for load metrics."""

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Apply the model's chat template and tokenize, ready for generation."""

    def encode_text(self, text: str) -> list[int]: ...

    def decode_token(self, token_id: int) -> str:
        """The text of one token on its own, as logprob entries report it."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream a request's increments; leaving the iterator early aborts the generation."""

    async def add_layer_hook(self, layer_index: int, hook: LayerHook) -> HookHandle:
        """Run `hook` on a decoder layer's output from the next forward pass on. The vLLM engine
        runs it in its worker process: the hook must pickle (cloudpickle) and runs in eager mode only."""
