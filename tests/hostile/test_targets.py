"""Finding 1 and part of 11 of issue 21: a target string that folds to nothing (or hides invisible
characters) is refused at the edge and by the compiler, and a store that holds one anyway makes the
gateway fail closed instead of emptying every answer; booleans of the admin API are strict."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lethe.gateway.store import open_store
from lethe.guards.compiler import UnenforceableTarget, compile_target
from lethe.guards.config import GuardConfig
from lethe.guards.forbidden import ForbiddenMatcher
from lethe.guards.targets import TargetSpec
from tests.hostile.support import ADMIN, USER, build_app, settings
from tests.support.targets import target

BAD_STRINGS = [
    "\u0301",  # a combining accent alone: folds to the empty string
    "\u0301\u0301\u0301",
    "x",  # one letter
    "É",  # one letter once folded
    "!!",  # no letter at all
    "Harry\u0000Potter",  # NUL
    "Harry\u200bPotter",  # zero-width space
    "Harry\u200dPotter",  # zero-width joiner
    "\u202eHarry Potter",  # right-to-left override
    "Harry\u2066Potter",  # left-to-right isolate
    "Harry\tPotter",  # a control character
    "\ufeffHarry",  # byte-order mark
]


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with TestClient(build_app(tmp_path_factory.mktemp("home"), tiny_model_dir), headers=ADMIN) as started:
        yield started


def assert_400(response: Any, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["message"].startswith(param), error


@pytest.mark.parametrize("bad", BAD_STRINGS)
@pytest.mark.parametrize(
    ("field", "param"), [("name", "name"), ("aliases", "aliases.0"), ("forbidden", "forbidden.0")]
)
def test_a_string_that_cannot_be_forbidden_is_refused_at_the_edge(
    client: TestClient, bad: str, field: str, param: str
) -> None:
    body: dict[str, Any] = {"name": "Harry Potter"}
    body[field] = bad if field == "name" else [bad]
    assert_400(client.post("/admin/targets", json=body), param)
    created = client.post("/admin/targets", json={"name": f"Target {len(bad)} {field} {ord(bad[0])}"})
    assert created.status_code == 201, created.text
    patch: dict[str, Any] = {field: bad if field == "name" else [bad]}
    assert_400(client.patch(f"/admin/targets/{created.json()['id']}", json=patch), param)
    assert client.delete(f"/admin/targets/{created.json()['id']}").status_code == 200


def test_short_but_real_strings_are_accepted(client: TestClient) -> None:
    response = client.post(
        "/admin/targets", json={"name": "Émile Zola", "aliases": ["EZ", "Zola"], "forbidden": ["J'accuse"]}
    )
    assert response.status_code == 201, response.text
    assert client.delete(f"/admin/targets/{response.json()['id']}").status_code == 200


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, "false", None])
def test_booleans_are_strict(client: TestClient, value: Any) -> None:
    assert_400(client.post("/admin/targets", json={"name": "Harry Potter", "enabled": value}), "enabled")
    created = client.post("/admin/targets", json={"name": f"Strict {value!r}"}).json()
    response = client.patch(f"/admin/targets/{created['id']}", json={"enabled": value})
    if value is None:  # null in a patch means "leave it as it is"
        assert response.status_code == 200, response.text
    else:
        assert_400(response, "enabled")
    assert client.get(f"/admin/targets/{created['id']}").json()["enabled"] is True
    client.delete(f"/admin/targets/{created['id']}")


def encode(text: str) -> list[int]:
    return [ord(char) for char in text]


@pytest.mark.parametrize("bad", BAD_STRINGS)
def test_the_compiler_refuses_what_the_edge_refuses(bad: str) -> None:
    """A stored target is read back unchecked (an old or hand-edited database): compiling it fails."""
    for fields in (
        {"name": bad},
        {"name": "Harry Potter", "aliases": [bad]},
        {"name": "Hogwarts", "forbidden": [bad]},
    ):
        with pytest.raises(UnenforceableTarget):
            compile_target(target("t1", **fields), encode, None, GuardConfig())  # type: ignore[arg-type]


def test_the_matcher_refuses_an_empty_pattern() -> None:
    for strings, words, names in (
        (["\u0301"], [], []),
        (["Harry \u0301"], [], []),
        ([], ["\u0301"], []),
        ([], [], ["\u0301"]),
    ):
        with pytest.raises(ValueError, match="empty pattern"):
            ForbiddenMatcher(strings, words, names)


def test_a_stored_target_that_cannot_be_enforced_fails_closed(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A hand-edited store holds a target whose name folds to nothing: every /v1 answer is a 503
    naming the problem (never an empty answer, never an unguarded one); the admin API still works,
    and deleting the target restores service."""
    store = open_store(settings(tmp_path))
    try:
        good = store.create_target(TargetSpec(name="Harry Potter"))
        bad = store.create_target(
            TargetSpec.model_construct(
                name="\u0301",
                aliases=[],
                forbidden=[],
                documents=[],
                examples=[],
                description="",
                policy="steer",
                enabled=True,
            )
        )
    finally:
        store.close()
    chat = {
        "model": tiny_model_dir.name,
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 4,
    }
    with TestClient(build_app(tmp_path, tiny_model_dir)) as client:
        for stream in (False, True):
            response = client.post("/v1/chat/completions", json={**chat, "stream": stream}, headers=USER)
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert error["code"] == "guard_unavailable"
            assert "cannot be enforced" in error["message"]
            assert "\u0301" not in error["message"]  # nothing of the target reaches a user
        completion = {"model": tiny_model_dir.name, "prompt": "Hello", "max_tokens": 2}
        assert client.post("/v1/completions", json=completion, headers=USER).status_code == 503
        assert client.get("/v1/models", headers=USER).status_code == 200
        listed = client.get("/admin/targets", headers=ADMIN).json()["data"]
        assert {t["id"] for t in listed} == {good.id, bad.id}
        assert client.delete(f"/admin/targets/{bad.id}", headers=ADMIN).status_code == 200
        response = client.post("/v1/chat/completions", json=chat, headers=USER)
        assert response.status_code == 200, response.text
