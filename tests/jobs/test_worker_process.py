"""Real `lethe worker` and `lethe serve` processes: a worker killed mid-job (SIGKILL) leaves no
checkpoint and its job is failed by the next worker; SIGTERM stops a job cleanly; `lethe serve` runs
a submitted job in its worker child, the result can be promoted, and no worker outlives the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lethe.gateway.jobs.runner import EVAL_CACHE
from lethe.gateway.store import SQLiteStore
from lethe.guards.targets import TargetSpec
from lethe.models.checkpoints import CheckpointStore
from tests.jobs.conftest import ADMIN, ADMIN_KEY, HARRY, QUICK_FLAT
from tests.support.paths import REPO
from tests.support.processes import alive, workers
from tests.support.server import start_server

pytestmark = pytest.mark.e2e

SPEC = {"method": "flat", "targets": ["Harry Potter"], "params": QUICK_FLAT, "from_checkpoint": None}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "lethe.db")
    opened.create_target(TargetSpec(**HARRY))
    yield opened
    opened.close()


def start_worker(home: Path, model: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    environment = {
        **os.environ,
        "LETHE_HOME": str(home),
        "LETHE_MODEL": str(model),
        "LETHE_TORCH_THREADS": "2",
        "LETHE_WORKER_POLL_SECONDS": "0.2",
        "LETHE_WORKER_HEARTBEAT_SECONDS": "0.5",
        "LETHE_WORKER_STALE_SECONDS": "3",
        **env,
    }
    with open(log, "ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "lethe.gateway.cli.main", "worker"],
            cwd=REPO,
            env=environment,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def wait_for(predicate: Any, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_killed_worker_leaves_no_checkpoint_and_its_job_is_failed_on_the_next_start(
    store: SQLiteStore, tmp_path: Path, tiny_model_dir: Path
) -> None:
    job = store.create_job(SPEC)
    log = tmp_path / "worker.log"
    worker = start_worker(tmp_path, tiny_model_dir, log)
    try:
        wait_for(lambda: store.get_job(job.id).progress > 0, what="the job to make progress")
        assert store.get_job(job.id).state == "running"
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert store.get_job(job.id).state == "running"  # nobody knows yet
    checkpoints = CheckpointStore(tmp_path / "checkpoints")
    assert checkpoints.list() == []
    # no partial folder either (the source's evaluation cache, written whole, may be there: without
    # evaluation data the "before" measurement is quick and done before the kill)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name != EVAL_CACHE] == []

    restarted = start_worker(tmp_path, tiny_model_dir, log)
    try:
        wait_for(lambda: store.get_job(job.id).state == "failed", timeout=30, what="the dead job to fail")
        failed = store.get_job(job.id)
        assert failed.error.startswith("worker died") and failed.checkpoint_id is None
        assert store.serving_checkpoint().checkpoint == "base"
        # The restarted worker goes on with new work.
        follow_up = store.create_job(SPEC)
        wait_for(lambda: store.get_job(follow_up.id).state == "running", timeout=30, what="a new claim")
    finally:
        restarted.terminate()
        assert restarted.wait(timeout=60) == 0
    assert store.get_job(follow_up.id).state == "failed"
    assert store.get_job(follow_up.id).error.startswith("interrupted")
    assert CheckpointStore(tmp_path / "checkpoints").list() == []


@pytest.fixture
def gateway(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Any]:
    server = start_server(
        tiny_model_dir,
        tmp_path,
        tmp_path / "serve.log",
        LETHE_ADMIN_KEY=ADMIN_KEY,
        LETHE_WORKER="true",
        LETHE_WORKER_POLL_SECONDS="0.2",
    )
    yield server
    server.stop()


def test_serve_runs_jobs_in_its_worker_and_stops_it(gateway: Any) -> None:
    """The whole operator flow on one `lethe serve`: register, submit, watch, promote the result."""
    (worker_pid,) = workers(gateway.process.pid)
    root = gateway.root_url
    with httpx.Client(base_url=root, headers=ADMIN, timeout=60) as http:
        assert http.post("/admin/targets", json=HARRY).status_code == 201
        job = http.post("/admin/jobs", json=SPEC).json()
        seen_running = False

        def finished() -> bool:
            nonlocal seen_running
            state = http.get(f"/admin/jobs/{job['id']}").json()
            seen_running = seen_running or (state["state"] == "running" and state["progress"] > 0)
            return state["state"] not in ("queued", "running")

        wait_for(finished, timeout=240, what="the job to finish")
        done = http.get(f"/admin/jobs/{job['id']}").json()
        assert done["state"] == "succeeded", done
        assert seen_running and done["worker_id"].split(":")[1] == str(worker_pid)
        checkpoint = done["checkpoint_id"]
        assert checkpoint in [c["id"] for c in http.get("/admin/checkpoints").json()["data"]]
        promoted = http.post(f"/admin/checkpoints/{checkpoint}/promote")
        assert promoted.status_code == 200, promoted.text
        models = httpx.get(f"{gateway.base_url}/models", headers=gateway.headers()).json()
        assert models["data"][0]["checkpoint"] == checkpoint
        chat = httpx.post(
            f"{gateway.base_url}/chat/completions",
            headers=gateway.headers(),
            json={"model": gateway.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
            timeout=60,
        )
        assert chat.status_code == 200, chat.text
    gateway.stop()
    assert gateway.process.returncode is not None
    wait_for(lambda: not alive(worker_pid), timeout=20, what="the worker to exit")


def test_serve_without_a_worker(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(tiny_model_dir, tmp_path, tmp_path / "serve.log", LETHE_WORKER="false")
    try:
        assert workers(server.process.pid) == []
    finally:
        server.stop()


def test_a_worker_exits_when_its_serve_parent_is_killed(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(
        tiny_model_dir, tmp_path, tmp_path / "serve.log", LETHE_WORKER="true", LETHE_WORKER_POLL_SECONDS="0.2"
    )
    (worker_pid,) = workers(server.process.pid)
    server.process.kill()
    server.process.wait()
    wait_for(lambda: not alive(worker_pid), timeout=20, what="the orphaned worker to exit")
