"""The worker in-process: a real unlearning job end to end on the tiny model, progress and ETA,
cancellation, failures, and a stop request while a job runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lethe.gateway.config import Settings
from lethe.gateway.jobs.worker import Worker
from lethe.gateway.store import Job, SQLiteStore
from lethe.guards.targets import TargetSpec
from lethe.models.checkpoints import CheckpointStore
from lethe.models.unlearning.progress import UnlearnCancelled
from tests.jobs.conftest import HARRY, QUICK_FLAT

SPEC = {"method": "flat", "targets": ["Harry Potter"], "params": QUICK_FLAT, "from_checkpoint": None}


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    return Settings(home=tmp_path, model=tiny_model_dir, torch_threads=2, worker_heartbeat_seconds=0.2)


@pytest.fixture
def store(settings: Settings) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(settings.home / "lethe.db")
    opened.create_target(TargetSpec(**HARRY))
    yield opened
    opened.close()


def wait_for(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_real_unlearning_job_runs_to_a_checkpoint(settings: Settings, store: SQLiteStore) -> None:
    """The default runner (gateway.unlearning.run_unlearning, evaluation included) on the tiny model."""
    job = store.create_job(SPEC)
    done = Worker(settings, store).run_once()
    assert done is not None and done.id == job.id
    assert done.state == "succeeded", (done.error, done.logs[-20:])
    assert done.progress == 100.0 and done.eta_seconds is None and done.finished_at is not None
    manifests = CheckpointStore(settings.home / "checkpoints").list()
    assert [m.id for m in manifests] == [done.checkpoint_id]
    manifest = manifests[0]
    assert (manifest.method, manifest.targets, manifest.parent) == ("flat", ["Harry Potter"], None)
    assert manifest.evaluation is not None
    assert any("wrote" in line for line in done.logs)
    assert store.serving_checkpoint().checkpoint == "base"  # a job never changes what serves


def test_progress_eta_and_logs_reach_the_job_while_it_runs(settings: Settings, store: SQLiteStore) -> None:
    job = store.create_job(SPEC)
    seen: list[Job] = []

    def run(spec: Any, *, settings: Settings, store: Any, progress: Any, cancelled: Any) -> Any:
        for step in range(1, 21):
            progress.update(step / 20, f"step {step}/20")
            progress.log(f"loss {1 / step:.3f}")
            time.sleep(0.06)
            if step == 10:
                time.sleep(0.6)  # let the throttle pass: the next update is written
            if step == 11:
                seen.append(store.get_job(job.id))
        raise ValueError("no checkpoint in this test")

    writes: list[float] = []
    report = store.report_job

    def counted(*args: Any, **kwargs: Any) -> Any:
        writes.append(time.monotonic())
        return report(*args, **kwargs)

    store.report_job = counted  # type: ignore[method-assign]
    # No heartbeat during these 2 s: a forced heartbeat write inside the pause after step 10 would
    # restart the throttle, and step 11's update, the one read back, would not be written.
    quiet = settings.model_copy(update={"worker_heartbeat_seconds": 30.0, "worker_stale_seconds": 60.0})
    done = Worker(quiet, store, run).run_once()
    midway = seen[0]
    assert midway.state == "running" and 50 <= midway.progress <= 60
    assert midway.message and midway.message.startswith("step 1")
    assert midway.eta_seconds is not None and 0 < midway.eta_seconds < 30
    assert midway.logs and midway.logs[0] == "loss 1.000"
    assert len(writes) < 20 + 20  # throttled (40 calls in ~2 s), heartbeats included
    assert done.state == "failed" and done.error == "ValueError: no checkpoint in this test"
    assert any("Traceback" in line for line in done.logs)


def test_a_cancelled_real_job_ends_cancelled_and_writes_nothing(
    settings: Settings, store: SQLiteStore
) -> None:
    job = store.create_job(SPEC)
    worker = Worker(settings, store)
    canceller = threading.Thread(
        target=lambda: (
            wait_for(lambda: store.get_job(job.id).message is not None),
            store.cancel_job(job.id),
        )
    )
    canceller.start()
    done = worker.run_once()
    canceller.join()
    assert done.state == "cancelled" and done.cancel_requested and done.checkpoint_id is None
    assert CheckpointStore(settings.home / "checkpoints").list() == []


def test_a_stop_request_fails_the_running_job_and_writes_nothing(
    settings: Settings, store: SQLiteStore
) -> None:
    job = store.create_job(SPEC)
    worker = Worker(settings, store)
    threading.Thread(
        target=lambda: (wait_for(lambda: store.get_job(job.id).message is not None), worker.stop_event.set())
    ).start()
    done = worker.run_once()
    assert done.state == "failed" and done.error.startswith("interrupted")
    assert CheckpointStore(settings.home / "checkpoints").list() == []


def test_a_job_taken_from_its_worker_stops(settings: Settings, store: SQLiteStore) -> None:
    """If another worker declared this one dead, its run is told to stop and its ending is ignored."""
    job = store.create_job(SPEC)
    calls = 0

    def run(spec: Any, *, settings: Settings, store: Any, progress: Any, cancelled: Any) -> Any:
        nonlocal calls
        store._db.execute("UPDATE jobs SET state = 'failed', error = 'worker died' WHERE id = ?", (job.id,))
        while not cancelled():
            calls += 1
            time.sleep(0.05)
        raise UnlearnCancelled

    assert Worker(settings, store, run).run_once() is None
    final = store.get_job(job.id)
    assert (final.state, final.error) == ("failed", "worker died") and calls < 40


def test_an_idle_worker_recovers_dead_jobs_and_exits_on_stop(settings: Settings, store: SQLiteStore) -> None:
    job = store.create_job(SPEC)
    store.claim_job("gone:1:x")
    store._db.execute("UPDATE jobs SET heartbeat_at = '2000-01-01T00:00:00+00:00' WHERE id = ?", (job.id,))
    worker = Worker(settings, store, run=lambda *a, **k: pytest.fail("nothing is queued"))
    thread = threading.Thread(target=worker.run_forever)
    thread.start()
    wait_for(lambda: store.get_job(job.id).state == "failed", timeout=10)
    worker.stop_event.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert "worker died" in store.get_job(job.id).error
