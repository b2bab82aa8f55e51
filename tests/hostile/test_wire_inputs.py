"""Findings 2, 3, 4 and part of 11 of issue 21: inputs that reached a 500 (a seed beyond 64 bits,
token ids outside the vocabulary, a lone surrogate) are 400s naming the parameter; a stream that
fails after its first byte always ends in an error event; a request may ask for only so many
sequences and tokens; the admin API is not described in the public schema, and the schema, the
docs and the metrics can be put behind a key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lethe.models.engines.hf_engine import TransformersEngine
from tests.hostile.support import ADMIN, USER, FailingEngine, build_app


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> FailingEngine:
    return FailingEngine(tiny_model_dir)


@pytest.fixture(scope="module")
def client(
    engine: FailingEngine, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    app = build_app(
        tmp_path_factory.mktemp("home"),
        tiny_model_dir,
        engine,
        max_sequences_per_request=8,
        max_tokens_per_request=400,
    )
    with TestClient(app, headers=USER) as started:
        yield started


@pytest.fixture
def failing(engine: FailingEngine) -> Iterator[FailingEngine]:
    yield engine
    engine.failure = "none"


def chat(model: str, **overrides: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, **overrides}


def assert_400(response: Any, param: str | None) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    return error


def events(response: Any) -> list[Any]:
    lines = [line.removeprefix("data: ") for line in response.text.split("\n") if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


# ------------------------------------------------------------------ finding 2: seed and streams


@pytest.mark.parametrize("seed", [2**70, -(2**70), 2**63, -(2**63) - 1])
@pytest.mark.parametrize("stream", [False, True])
def test_a_seed_beyond_64_bits_is_400(
    client: TestClient, tiny_model_dir: Path, seed: int, stream: bool
) -> None:
    model = tiny_model_dir.name
    assert_400(client.post("/v1/chat/completions", json=chat(model, seed=seed, stream=stream)), "seed")
    completion = {"model": model, "prompt": "Hi", "max_tokens": 2, "seed": seed, "stream": stream}
    assert_400(client.post("/v1/completions", json=completion), "seed")


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)])
def test_the_64_bit_extremes_are_served(client: TestClient, tiny_model_dir: Path, seed: int) -> None:
    """Each choice derives its own seed from the request's: at the extremes it wraps around."""
    response = client.post("/v1/chat/completions", json=chat(tiny_model_dir.name, seed=seed, n=3))
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 3


@pytest.mark.parametrize("failure", ["mid_stream", "unsendable_text"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_that_fails_after_its_first_byte_ends_in_an_error_event(
    client: TestClient, failing: FailingEngine, tiny_model_dir: Path, failure: str, path: str
) -> None:
    failing.failure = failure  # type: ignore[assignment]
    body = (
        chat(tiny_model_dir.name, stream=True, max_tokens=8, ignore_eos=True)
        if path.endswith("chat/completions")
        else {
            "model": tiny_model_dir.name,
            "prompt": "Hi",
            "max_tokens": 8,
            "ignore_eos": True,
            "stream": True,
        }
    )
    response = client.post(path, json=body)
    assert response.status_code == 200
    received = events(response)
    assert received[-1] == "[DONE]", response.text
    assert received[-2]["error"]["type"] == "server_error", response.text
    assert "\ud800" not in response.text


# ------------------------------------------------------------------ finding 3: token ids


@pytest.mark.parametrize(
    "prompt",
    [[49152], [1, 2, 10**9], [-1], [2**70], [-(2**70)], [[1, 2], [3, 49152]], [[5], [2**64]]],
)
@pytest.mark.parametrize("stream", [False, True])
def test_token_ids_outside_the_vocabulary_are_400(
    client: TestClient, engine: TransformersEngine, tiny_model_dir: Path, prompt: Any, stream: bool
) -> None:
    assert engine.vocab_size == 49152
    response = client.post(
        "/v1/completions",
        json={"model": tiny_model_dir.name, "prompt": prompt, "max_tokens": 2, "stream": stream},
    )
    assert "vocabulary" in assert_400(response, "prompt")["message"]


def test_the_last_token_id_of_the_vocabulary_is_served(client: TestClient, tiny_model_dir: Path) -> None:
    response = client.post(
        "/v1/completions", json={"model": tiny_model_dir.name, "prompt": [0, 49151], "max_tokens": 2}
    )
    assert response.status_code == 200, response.text


# ------------------------------------------------------------------ finding 4: lone surrogates


def raw(text: str) -> bytes:
    """`text` as a JSON body, with escapes spelled as they are (json.dumps would refuse a lone surrogate)."""
    return text.encode()


SURROGATE_BODIES = [
    (
        "/v1/chat/completions",
        '{"model": "M", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        '{"model": "M", "messages": [{"role": "user", "content": "\\udfff"}]}',
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        '{"model": "M", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\uDBFF"}]}]}',
        "messages.0.content.0.text",
    ),
    (
        "/v1/chat/completions",
        '{"model": "M\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
        "model",
    ),
    (
        "/v1/chat/completions",
        '{"model": "M", "stop": ["\\ud800"], "messages": [{"role": "user", "content": "x"}]}',
        "stop.0",
    ),
    (
        "/v1/chat/completions",
        '{"model": "M", "user": "\\ud800", "messages": [{"role": "user", "content": "x"}]}',
        "user",
    ),
    (
        "/v1/chat/completions",
        '{"model": "M", "\\ud800": 1, "messages": [{"role": "user", "content": "x"}]}',
        "<key>",
    ),
    ("/v1/completions", '{"model": "M", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", '{"model": "M", "prompt": ["ok", "\\ud800"]}', "prompt.1"),
    ("/admin/targets", '{"name": "Harry \\ud800"}', "name"),
    ("/admin/targets", '{"name": "Harry Potter", "documents": ["a \\udc00 b"]}', "documents.0"),
    ("/admin/jobs", '{"method": "\\ud800"}', "method"),
]


@pytest.mark.parametrize(("path", "body", "param"), SURROGATE_BODIES)
def test_a_lone_surrogate_in_any_text_field_is_400(
    client: TestClient, tiny_model_dir: Path, path: str, body: str, param: str
) -> None:
    headers = {**(ADMIN if path.startswith("/admin") else USER), "Content-Type": "application/json"}
    response = client.post(
        path, content=raw(body.replace('"M"', f'"{tiny_model_dir.name}"')), headers=headers
    )
    error = assert_400(response, param)
    assert "surrogate" in error["message"]


def test_a_surrogate_encoded_as_utf8_bytes_is_400(client: TestClient, tiny_model_dir: Path) -> None:
    body = (
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi \xed\xa0\x80"}]}'
        % tiny_model_dir.name.encode()
    )
    response = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert_400(response, None)


def test_surrogate_pairs_and_escaped_backslashes_are_fine(client: TestClient, tiny_model_dir: Path) -> None:
    for content in ("\\ud83d\\ude00", "\\\\ud800"):  # an emoji as a pair; a backslash, then text
        body = '{"model": "MODEL", "messages": [{"role": "user", "content": "TEXT"}], "max_tokens": 2}'
        body = body.replace("MODEL", tiny_model_dir.name).replace("TEXT", content)
        response = client.post(
            "/v1/chat/completions", content=raw(body), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 200, response.text


# ------------------------------------------------------------------ finding 11: request size, schema, keys


def test_a_request_may_ask_for_so_many_sequences(client: TestClient, tiny_model_dir: Path) -> None:
    """The client's app allows 8 sequences: 3 prompts x n=3 is one too many, on either endpoint."""
    model = tiny_model_dir.name
    response = client.post(
        "/v1/completions", json={"model": model, "prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1}
    )
    error = assert_400(response, "n")
    assert error["code"] == "too_many_sequences"
    assert "9 sequences" in error["message"]
    response = client.post("/v1/completions", json={"model": model, "prompt": [[1]] * 9, "max_tokens": 1})
    assert assert_400(response, "prompt")["code"] == "too_many_sequences"
    assert (
        assert_400(client.post("/v1/chat/completions", json=chat(model, n=9)), "n")["code"]
        == "too_many_sequences"
    )
    response = client.post(
        "/v1/completions", json={"model": model, "prompt": ["a", "b"], "n": 4, "max_tokens": 1}
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 8


def test_a_completions_request_may_ask_for_so_many_tokens(client: TestClient, tiny_model_dir: Path) -> None:
    """The client's app allows 400 tokens: 2 prompts x n=2 x (1 + 100) is 404."""
    model = tiny_model_dir.name
    body = {"model": model, "prompt": [[1], [2]], "n": 2, "max_tokens": 100}
    error = assert_400(client.post("/v1/completions", json=body), "max_tokens")
    assert error["code"] == "too_many_tokens"
    assert client.post("/v1/completions", json={**body, "max_tokens": 2}).status_code == 200


def test_the_public_schema_leaves_the_admin_api_out(client: TestClient) -> None:
    public = client.get("/openapi.json", headers={})
    assert public.status_code == 200
    assert "/v1/chat/completions" in public.json()["paths"]
    assert not [path for path in public.json()["paths"] if path.startswith("/admin")]
    assert client.get("/docs", headers={}).status_code == 200
    assert client.get("/admin/openapi.json").status_code == 401  # a user key does not open it
    admin = client.get("/admin/openapi.json", headers=ADMIN)
    assert admin.status_code == 200
    assert "/admin/targets" in admin.json()["paths"]
    assert not [path for path in admin.json()["paths"] if not path.startswith("/admin")]


def test_schema_docs_and_metrics_can_require_a_key(tiny_model_dir: Path, tmp_path: Path) -> None:
    app = build_app(tmp_path, tiny_model_dir, docs_require_key=True, metrics_require_key=True)
    with TestClient(app) as client:
        for path in ("/openapi.json", "/metrics"):
            response = client.get(path)
            assert response.status_code == 401, path
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.get(path, headers=USER).status_code == 200, path
            assert client.get(path, headers=ADMIN).status_code == 200, path
        assert not [
            p for p in client.get("/openapi.json", headers=USER).json()["paths"] if p.startswith("/admin")
        ]
        assert client.get("/docs").status_code == 404
        assert client.get("/redoc").status_code == 404
        assert client.get("/healthz").status_code == 200
