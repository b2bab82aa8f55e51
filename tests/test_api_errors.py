"""Bad input gets an OpenAI-style 4xx with a message naming the problem, never a 500 or a hang."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support.openapi import validate
from tests.support.server import LiveServer

pytestmark = pytest.mark.e2e


def chat(server: LiveServer, **overrides: Any) -> dict[str, Any]:
    return {
        "model": server.model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        **overrides,
    }


def post(server: LiveServer, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
    headers = {**server.headers(), **kwargs.pop("headers", {})}
    return httpx.post(f"{server.base_url}{path}", json=body, headers=headers, timeout=30, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None = None, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    validate("ErrorResponse", body)
    assert body["error"]["type"]
    if param is not None:
        assert body["error"]["param"] == param
    assert fragment.lower() in body["error"]["message"].lower()


@pytest.mark.parametrize(
    ("overrides", "param", "fragment"),
    [
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": "hello"}, "messages", ""),
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
        ({"temperature": "hot"}, "temperature", ""),
        ({"top_p": 1.5}, "top_p", ""),
        ({"max_tokens": 0}, "max_tokens", ""),
        ({"n": 0}, "n", ""),
        ({"presence_penalty": 5}, "presence_penalty", ""),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"top_logprobs": 3}, "top_logprobs", "logprobs"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", ""),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            None,
            "",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
        ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
        ({"frobnicate": 1}, "frobnicate", "unrecognized"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ],
)
def test_invalid_chat_parameters_are_400(
    live_server: LiveServer, overrides: dict[str, Any], param: str | None, fragment: str
) -> None:
    assert_error(post(live_server, "/chat/completions", chat(live_server, **overrides)), 400, param, fragment)


def test_missing_model_is_named(live_server: LiveServer) -> None:
    body = chat(live_server)
    del body["model"]
    assert_error(post(live_server, "/chat/completions", body), 400, "model", "missing")


def test_neutral_values_of_unsupported_parameters_are_accepted(live_server: LiveServer) -> None:
    """SDKs that always send `tools: null` or `store: false` must still work."""
    response = post(
        live_server, "/chat/completions", chat(live_server, tools=None, store=False, logit_bias=None)
    )
    assert response.status_code == 200, response.text


def test_malformed_json_is_400(live_server: LiveServer) -> None:
    response = httpx.post(
        f"{live_server.base_url}/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={**live_server.headers(), "content-type": "application/json"},
        timeout=30,
    )
    assert_error(response, 400, None, "json")


def test_unknown_model_is_404(live_server: LiveServer) -> None:
    response = post(live_server, "/chat/completions", chat(live_server, model="gpt-17"))
    assert_error(response, 404, "model", "does not exist")
    assert response.json()["error"]["code"] == "model_not_found"


def test_max_tokens_beyond_context_is_400(live_server: LiveServer) -> None:
    response = post(live_server, "/chat/completions", chat(live_server, max_tokens=10**6))
    assert_error(response, 400, "max_tokens", "maximum context length")
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_prompt_beyond_context_is_400(live_server: LiveServer) -> None:
    huge = "word " * 3000  # the tiny model's context is 2048 tokens
    response = post(
        live_server, "/completions", {"model": live_server.model, "prompt": huge, "max_tokens": 1}
    )
    assert_error(response, 400, None, "maximum context length")


def test_oversized_body_is_413(live_server: LiveServer) -> None:
    body = chat(live_server, messages=[{"role": "user", "content": "x" * 1_100_000}])
    assert_error(post(live_server, "/chat/completions", body), 413, None, "too large")


def test_oversized_chunked_body_is_413(live_server: LiveServer) -> None:
    def chunks():
        for _ in range(200):
            yield b"x" * 10_000

    response = httpx.post(
        f"{live_server.base_url}/chat/completions",
        content=chunks(),
        headers={**live_server.headers(), "content-type": "application/json"},
        timeout=30,
    )
    assert_error(response, 413, None, "too large")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}])
def test_v1_needs_a_valid_key(live_server: LiveServer, headers: dict[str, str]) -> None:
    response = httpx.get(f"{live_server.base_url}/models", headers=headers, timeout=10)
    assert_error(response, 401, None, "api key")
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_operational_endpoints_need_no_key(live_server: LiveServer) -> None:
    assert httpx.get(f"{live_server.root_url}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{live_server.root_url}/metrics", timeout=10).status_code == 200


def test_unknown_route_and_wrong_method(live_server: LiveServer) -> None:
    assert_error(httpx.get(f"{live_server.base_url}/nothing", headers=live_server.headers(), timeout=10), 404)
    assert_error(
        httpx.get(f"{live_server.base_url}/chat/completions", headers=live_server.headers(), timeout=10), 405
    )


@pytest.mark.parametrize(
    "prompt",
    [[], [[]], [-1, 5], "", [1.5]],
)
def test_invalid_completion_prompts_are_400(live_server: LiveServer, prompt: Any) -> None:
    response = post(
        live_server, "/completions", {"model": live_server.model, "prompt": prompt, "max_tokens": 2}
    )
    assert_error(response, 400)
