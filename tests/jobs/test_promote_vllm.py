"""Promote and roll back a checkpoint on `lethe serve --engine vllm` (tiny models, one server): the
switch starts a second vLLM engine core next to the serving one, requests during the switch all
succeed, the next request answers with the new weights, the gateway keeps answering while the
replaced engine core stops, and its processes are gone once retired (all of them after the server
stops)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.jobs.conftest import ADMIN_KEY
from tests.jobs.test_promote import admin, answer, hammering, model_card, wait_for
from tests.support.engines import require_vllm
from tests.support.processes import alive, descendants
from tests.support.server import LiveServer, start_server

pytestmark = pytest.mark.e2e

require_vllm()

VLLM = {
    "LETHE_ENGINE": "vllm",
    "LETHE_ADMIN_KEY": ADMIN_KEY,
    # Two engine cores live side by side during a switch: keep each small (1 GiB KV cache, the least).
    "LETHE_VLLM_KV_CACHE_GIB": "1",
    "LETHE_VLLM_MAX_MODEL_LEN": "512",
    "LETHE_MAX_PREFILL_TOKENS": "512",
    "LETHE_MAX_BATCH_SIZE": "4",
    "LETHE_DRAIN_TIMEOUT_SECONDS": "60",
}


def engine_processes(pid: int) -> set[int]:
    """The processes below the gateway that belong to a vLLM engine (its engine core and workers).
    multiprocessing's resource tracker is one per gateway process, shared by every engine: it
    stays until the gateway exits, so it is left out."""
    found = set()
    for child in descendants(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in command:
            found.add(child)
    return found


def gone(pids: set[int], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while [pid for pid in pids if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    return not [pid for pid in pids if alive(pid)]


def slowest_answer_while_retiring(server: LiveServer, checkpoint: str) -> float:
    """Ask /v1/models over and over until the engine of `checkpoint` is retired: the longest wait.
    (Stopping a vLLM engine core takes seconds; the gateway must keep answering meanwhile.)"""
    slowest = 0.0
    with httpx.Client(headers=server.headers(), timeout=60) as client:
        deadline = time.monotonic() + 60
        while f"retired the engine of checkpoint {checkpoint}" not in server.log.read_text():
            assert time.monotonic() < deadline, "the replaced engine was not retired"
            started = time.monotonic()
            assert client.get(f"{server.base_url}/models").status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.05)
    return slowest


def test_promote_and_rollback_on_vllm(
    tiny_model_dir: Path, home_with_checkpoints: tuple[Path, str, str], tmp_path: Path
) -> None:
    home, first, _ = home_with_checkpoints
    server = start_server(tiny_model_dir, home, tmp_path / "server.log", **VLLM)
    log = server.log
    try:
        base = answer(server)
        base_core = engine_processes(server.process.pid)
        assert base_core, "vLLM's engine core should run as a child process"

        # 0.1 s apart: leave the two cores some room for loading the checkpoint
        with hammering(server, pause=0.1) as statuses:
            wait_for(lambda: len(statuses) >= 2, timeout=60)
            before = len(statuses)
            promoted = admin(server, "POST", f"/admin/checkpoints/{first}/promote")
            during = len(statuses) - before
        assert promoted.status_code == 200, promoted.text
        assert (promoted.json()["checkpoint"], promoted.json()["previous"]) == (first, "base")
        assert during > 0 and set(statuses) == {200}, statuses  # nothing dropped during the switch
        assert slowest_answer_while_retiring(server, "base") < 2.0
        assert gone(base_core), log.read_text()[-3000:]  # the old engine core and its worker left

        card = model_card(server)
        assert (card["id"], card["checkpoint"]) == (server.model, first)
        assert answer(server) != base
        first_core = engine_processes(server.process.pid)
        assert first_core

        back = admin(server, "POST", f"/admin/checkpoints/{first}/rollback")
        assert back.status_code == 200, back.text
        assert (back.json()["checkpoint"], back.json()["previous"]) == ("base", first)
        assert model_card(server)["checkpoint"] == "base"
        assert answer(server) == base
        wait_for(lambda: f"retired the engine of checkpoint {first}" in log.read_text(), timeout=60)
        assert gone(first_core), log.read_text()[-3000:]
        last = descendants(server.process.pid)
    finally:
        server.stop()
    assert gone(last, timeout=15), log.read_text()[-3000:]  # nothing outlives the gateway
