"""Promote and roll back checkpoints on real `lethe serve` processes (tiny models): a streaming request
in flight finishes on the old weights, requests during the switch all succeed, the next request
uses the new weights, /v1/models names the checkpoint, and a second replica follows."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.jobs.conftest import ADMIN, ADMIN_KEY
from tests.support.openapi import validate
from tests.support.server import LiveServer, start_server

pytestmark = pytest.mark.e2e

PROMPT = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


def serve(model: Path, home: Path, log: Path) -> LiveServer:
    return start_server(model, home, log, LETHE_ADMIN_KEY=ADMIN_KEY)


@pytest.fixture
def servers(
    tiny_model_dir: Path,
    home_with_checkpoints: tuple[Path, str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LiveServer, LiveServer, str, str]]:
    """Two replicas sharing one home (store and checkpoints), both serving the base tiny model."""
    home, first, second = home_with_checkpoints
    logs = tmp_path_factory.mktemp("promote-logs")
    one = serve(tiny_model_dir, home, logs / "one.log")
    try:
        two = serve(tiny_model_dir, home, logs / "two.log")
    except BaseException:
        one.stop()
        raise
    yield one, two, first, second
    one.stop()
    two.stop()


def answer(server: LiveServer, max_tokens: int = 24) -> str:
    response = httpx.post(
        f"{server.base_url}/chat/completions",
        headers=server.headers(),
        json={"model": server.model, "messages": PROMPT, "temperature": 0, "max_tokens": max_tokens},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def admin(server: LiveServer, method: str, path: str) -> httpx.Response:
    return httpx.request(method, f"{server.root_url}{path}", headers=ADMIN, timeout=120)


def model_card(server: LiveServer) -> dict[str, Any]:
    listing = httpx.get(f"{server.base_url}/models", headers=server.headers(), timeout=10).json()
    validate("ListModelsResponse", listing)
    (card,) = listing["data"]
    return card


def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


LONG = 1200


@contextmanager
def hammering(server: LiveServer, pause: float = 0.0) -> Iterator[list[int]]:
    """Two threads sending short completions, each `pause` seconds apart, for as long as the block
    runs; yields the status codes as they arrive."""
    statuses: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                response = client.post(
                    f"{server.base_url}/completions",
                    headers=server.headers(),
                    json={"model": server.model, "prompt": "Once upon a time", "max_tokens": 4},
                )
                statuses.append(response.status_code)
                time.sleep(pause)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        yield statuses
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)


def test_promote_keeps_requests_in_flight_on_the_old_weights(
    servers: tuple[LiveServer, LiveServer, str, str],
) -> None:
    server, replica, first, second = servers
    assert model_card(server) == {
        "id": server.model,
        "object": "model",
        "created": model_card(server)["created"],
        "owned_by": "lethe",
        "checkpoint": "base",
    }
    listed = admin(server, "GET", "/admin/checkpoints").json()
    assert [c["id"] for c in listed["data"]] == ["base", first, second]
    assert [c["serving"] for c in listed["data"]] == [True, False, False] and listed["serving"] == "base"
    assert listed["data"][1]["manifest"]["targets"] == ["Harry Potter"]

    base_short = answer(server)
    base_long = answer(server, LONG)

    # A long stream starts on the base weights ...
    chunks: list[str] = []
    first_chunk = threading.Event()
    stream_done: list[float] = []

    def stream() -> None:
        body = {
            "model": server.model,
            "messages": PROMPT,
            "temperature": 0,
            "max_tokens": LONG,
            "stream": True,
        }
        with httpx.stream(
            "POST", f"{server.base_url}/chat/completions", headers=server.headers(), json=body, timeout=300
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    chunks.append(delta)
                    first_chunk.set()
                time.sleep(0.002)  # a slowish reader: the stream stays open well past the promote
        stream_done.append(time.monotonic())

    streamer = threading.Thread(target=stream)
    streamer.start()
    # ... while short requests keep arriving throughout the switch.
    with hammering(server) as statuses:
        assert first_chunk.wait(60)
        promoted = admin(server, "POST", f"/admin/checkpoints/{first}/promote")
        promoted_at = time.monotonic()
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["checkpoint"] == first and promoted.json()["previous"] == "base"

        # The next request is served by the new weights, under the same model id.
        first_short = answer(server)
        assert first_short != base_short
        card = model_card(server)
        assert (card["id"], card["checkpoint"]) == (server.model, first)

        streamer.join(timeout=300)
    assert stream_done and stream_done[0] > promoted_at, "the stream must still be open at the promote"
    assert "".join(chunks) == base_long  # finished on the old weights, token for token
    assert statuses and set(statuses) == {200}, statuses  # nothing dropped during the switch

    # The replica follows the store within a second or so.
    wait_for(lambda: model_card(replica)["checkpoint"] == first)
    assert answer(replica) == first_short

    # The old engine is shut down once its last request is done.
    wait_for(lambda: "retired the engine of checkpoint base" in server.log.read_text())
    metrics = httpx.get(f"{server.root_url}/metrics", timeout=10).text
    assert f'lethe_serving_checkpoint_info{{checkpoint="{first}"}} 1.0' in metrics
    assert 'lethe_checkpoint_switches_total{action="promote",result="ok"} 1.0' in metrics
    assert "lethe_serving_checkpoint_behind 0.0" in metrics


def test_rollback_walks_back_the_promotions(servers: tuple[LiveServer, LiveServer, str, str]) -> None:
    server, replica, first, second = servers
    base_short = answer(server)
    assert admin(server, "POST", f"/admin/checkpoints/{first}/promote").status_code == 200
    first_short = answer(server)
    promoted = admin(replica, "POST", f"/admin/checkpoints/{second}/promote")  # through the other replica
    assert promoted.status_code == 200, promoted.text
    second_short = answer(replica)
    assert len({base_short, first_short, second_short}) == 3
    wait_for(lambda: model_card(server)["checkpoint"] == second)
    assert answer(server) == second_short

    refused = admin(server, "POST", f"/admin/checkpoints/{first}/rollback")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "checkpoint_not_serving"

    back = admin(server, "POST", f"/admin/checkpoints/{second}/rollback")
    assert back.status_code == 200, back.text
    assert (back.json()["checkpoint"], back.json()["previous"]) == (first, second)
    assert answer(server) == first_short and model_card(server)["checkpoint"] == first
    assert admin(server, "POST", f"/admin/checkpoints/{first}/rollback").json()["checkpoint"] == "base"
    assert answer(server) == base_short and model_card(server)["checkpoint"] == "base"
    nothing = admin(server, "POST", "/admin/checkpoints/base/rollback")
    assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "nothing_to_roll_back"
    wait_for(lambda: model_card(replica)["checkpoint"] == "base")
    assert answer(replica) == base_short

    missing = admin(server, "POST", "/admin/checkpoints/ckpt-nope/promote")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "checkpoint_not_found"
    assert admin(server, "GET", "/admin/checkpoints/ckpt-nope").status_code == 404
    assert admin(server, "GET", f"/admin/checkpoints/{first}").json()["serving"] is False

    trail = admin(server, "GET", "/admin/audit?kind=admin").json()["data"]
    assert [(r["action"], r["detail"]["checkpoint"]) for r in trail] == [
        ("checkpoint.rollback", "base"),
        ("checkpoint.rollback", first),
        ("checkpoint.promote", second),
        ("checkpoint.promote", first),
    ]


def test_a_restarted_gateway_serves_the_promoted_checkpoint(
    tiny_model_dir: Path, home_with_checkpoints: tuple[Path, str, str], tmp_path: Path
) -> None:
    home, first, _ = home_with_checkpoints
    server = serve(tiny_model_dir, home, tmp_path / "first.log")
    try:
        assert admin(server, "POST", f"/admin/checkpoints/{first}/promote").status_code == 200
        promoted = answer(server)
    finally:
        server.stop()
    again = serve(tiny_model_dir, home, tmp_path / "second.log")
    try:
        assert model_card(again)["checkpoint"] == first
        assert answer(again) == promoted
    finally:
        again.stop()
