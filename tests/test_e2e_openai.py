"""The real `openai` client against `lethe serve` on the real embedded model, on each engine,
responses checked against the official OpenAI API description."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support.openapi import validate
from tests.support.server import LiveServer

pytestmark = pytest.mark.e2e

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(embedded_any_server: LiveServer) -> openai.OpenAI:
    server = embedded_any_server
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)


def test_models_list(client: openai.OpenAI, embedded_any_server: LiveServer) -> None:
    embedded_server = embedded_any_server
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]
    raw = httpx.get(f"{embedded_server.base_url}/models", headers=embedded_server.headers()).json()
    validate("ListModelsResponse", raw)
    validate("Model", client.models.retrieve("SmolLM2-135M-Instruct").model_dump())


def test_chat_greedy_answers_paris(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=FRANCE, temperature=0)
    assert "Paris" in response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop"
    assert response.id.startswith("chatcmpl-")
    usage = response.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > usage.prompt_tokens
    validate("CreateChatCompletionResponse", response.model_dump(exclude_unset=True))


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=FRANCE, temperature=0, max_tokens=24
    )
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=FRANCE,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_chat_length_limit_and_text_parts(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Write a long story about a dragon."}]},
        ],
        max_completion_tokens=5,
        temperature=0,
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 5


def test_chat_stop_sequence(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=FRANCE, temperature=0, stop=[" Paris"]
    )
    assert response.choices[0].message.content == "The capital of France is"
    assert response.choices[0].finish_reason == "stop"


def test_chat_logprobs_and_n(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=FRANCE,
        max_tokens=6,
        n=3,
        seed=1,
        temperature=1.0,
        logprobs=True,
        top_logprobs=2,
    )
    validate("CreateChatCompletionResponse", response.model_dump(exclude_unset=True))
    assert [c.index for c in response.choices] == [0, 1, 2]
    for choice in response.choices:
        content = choice.logprobs.content
        assert len(content) == 6 == len(choice.logprobs.content)
        assert "".join(item.token for item in content) == choice.message.content
        assert all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in content)
    assert response.usage.completion_tokens == 18
    again = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=FRANCE, max_tokens=6, n=3, seed=1, temperature=1.0
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]


def test_completions(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
        logprobs=2,
    )
    validate("CreateCompletionResponse", response.model_dump(exclude_unset=True))
    choice = response.choices[0]
    assert "Paris" in choice.text
    assert len(choice.logprobs.tokens) == 8 == response.usage.completion_tokens
    assert choice.logprobs.text_offset[0] == 0


def test_completions_streaming_batch_prompts_and_echo(client: openai.OpenAI) -> None:
    prompts = ["The capital of France is", "One, two, three,"]
    stream = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=prompts, max_tokens=6, temperature=0, stream=True
    )
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    whole = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=prompts, max_tokens=6, temperature=0
    )
    assert texts == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    echoed = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=prompts[0], max_tokens=6, temperature=0, echo=True
    )
    assert echoed.choices[0].text == prompts[0] + texts[0]


def test_errors_reach_the_client_as_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=FRANCE)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=FRANCE, temperature=5)
    assert raised.value.body["param"] == "temperature"
    bad_key = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
