"""Wire shapes of the OpenAI API subset Lethe serves, kept apart from the serving logic.

Requests forbid unknown fields: a parameter we would silently ignore is a parameter a client
believes is in force. Parameters OpenAI defines but we do not implement are accepted only at
their neutral value (null, false, empty), because some SDKs always send them.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from lethe.gateway.api.errors import UnsupportedParameter

UNSUPPORTED_CHAT_PARAMETERS = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "service_tier",
    "store",
    "metadata",
    "web_search_options",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
)
UNSUPPORTED_COMPLETION_PARAMETERS = ("logit_bias", "suffix", "best_of")


def _reject_unsupported(data: Any, names: tuple[str, ...]) -> Any:
    if not isinstance(data, dict):
        return data
    cleaned = dict(data)
    for name in names:
        if name in cleaned:
            value = cleaned.pop(name)
            neutral = value in (None, False, [], {}, "") or (name == "best_of" and value == 1)
            if not neutral:
                raise UnsupportedParameter(name)
    return cleaned


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _SamplingFields(_Request):
    """Parameters both endpoints share, with OpenAI's documented ranges."""

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1, description="A signed 64-bit integer.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    ignore_eos: bool = Field(default=False, description="vLLM extension: generate exactly max_tokens tokens.")

    @model_validator(mode="after")
    def _check_stop(self) -> _SamplingFields:
        stops = self.stop_list()
        if len(stops) > 4:
            raise ValueError("stop: at most 4 stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop: stop sequences must not be empty")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return _reject_unsupported(data, UNSUPPORTED_CHAT_PARAMETERS)

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(union_mode="left_to_right")
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return _reject_unsupported(data, UNSUPPORTED_COMPLETION_PARAMETERS)

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: strings or token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ValueError("prompt: must not be empty")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


# --------------------------------------------------------------------- responses


def now() -> int:
    return int(time.time())


class _Response(BaseModel):
    """Responses omit optional, non-nullable fields they do not carry instead of sending null (the spec's
    rule); fields the spec requires but allows to be null are always sent."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_empty_optionals(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in self.omit_if_none:
            if data.get(name, 0) is None:
                del data[name]
        return data


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(_Response):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Response):
    omit_if_none = frozenset({"role", "content"})
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(_Response):
    omit_if_none = frozenset({"usage"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(_Response):
    omit_if_none = frozenset({"usage"})
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    omit_if_none: ClassVar[frozenset[str]] = frozenset({"sae"})

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lethe"
    checkpoint: str = "base"
    """Lethe's extension: which checkpoint serves under this id (`base`: the model it was started on;
    otherwise the id of a promoted unlearning checkpoint). The id stays the served model name."""
    sae: SAEInfo | None = None
    """Lethe's extension: the sparse autoencoder whose features are clamped on fired requests."""


class SAEInfo(_Response):
    name: str
    fingerprint: str
    layer: int
    features: int
    architecture: str


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail
