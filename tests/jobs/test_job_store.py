"""The store's job queue and serving checkpoint: atomic claims across processes, ownership of a
job by its worker, dead-worker recovery, compare-and-set promotion and rollback history."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lethe.gateway.store import (
    LOG_TAIL_LINES,
    JobFinished,
    JobNotFound,
    NothingToRollBack,
    NotServing,
    ServingChanged,
    SQLiteStore,
)
from tests.support.paths import REPO

SPEC = {"method": "flat", "targets": ["Harry Potter"], "params": {}, "from_checkpoint": None}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "lethe.db")
    yield opened
    opened.close()


def test_claims_go_oldest_first_and_only_once(store: SQLiteStore) -> None:
    first, second = store.create_job(SPEC), store.create_job(SPEC)
    claimed = store.claim_job("w1")
    assert claimed is not None and claimed.id == first.id
    assert (claimed.state, claimed.worker_id) == ("running", "w1")
    assert claimed.started_at is not None and claimed.heartbeat_at is not None
    assert store.claim_job("w2").id == second.id
    assert store.claim_job("w3") is None


def test_concurrent_workers_in_separate_processes_never_share_a_job(tmp_path: Path) -> None:
    """Four processes claim from one SQLite file as fast as they can: every job once, none lost."""
    path = tmp_path / "lethe.db"
    seeded = SQLiteStore(path)
    ids = {seeded.create_job(SPEC).id for _ in range(60)}
    seeded.close()
    script = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        from lethe.gateway.store import SQLiteStore
        store = SQLiteStore(Path({str(path)!r}))
        got = []
        while (job := store.claim_job(sys.argv[1])) is not None:
            got.append(job.id)
        print(json.dumps(got))
        """
    )
    workers = [
        subprocess.Popen([sys.executable, "-c", script, f"w{i}"], cwd=REPO, stdout=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    claimed = [json.loads(w.communicate(timeout=120)[0]) for w in workers]
    assert all(w.returncode == 0 for w in workers)
    flat = [job_id for got in claimed for job_id in got]
    assert sorted(flat) == sorted(ids)  # each exactly once
    reopened = SQLiteStore(path)
    owners = {job.id: job.worker_id for job in reopened.list_jobs(limit=100).data}
    for index, got in enumerate(claimed):
        assert all(owners[job_id] == f"w{index}" for job_id in got)
    reopened.close()


def test_only_the_claiming_worker_reports_and_finishes(store: SQLiteStore) -> None:
    job = store.create_job(SPEC)
    store.claim_job("w1")
    assert store.report_job(job.id, "w2", progress=0.5) is None
    assert store.finish_job(job.id, "w2", "succeeded", checkpoint_id="ckpt-x") is None
    finish = datetime.now(UTC) + timedelta(seconds=60)
    reported = store.report_job(job.id, "w1", progress=0.25, message="step 1", estimated_finish=finish)
    assert reported is not None
    assert (reported.progress, reported.message) == (25.0, "step 1")
    assert 55 <= reported.eta_seconds <= 60 and reported.estimated_finish is not None
    lines = [f"line {i}" for i in range(LOG_TAIL_LINES + 50)] + ["x" * 5000]
    logged = store.report_job(job.id, "w1", logs=lines)
    assert logged.logs[0] == "line 51" and len(logged.logs) == LOG_TAIL_LINES
    assert len(logged.logs[-1]) == 1000
    done = store.finish_job(job.id, "w1", "succeeded", checkpoint_id="ckpt-x", message="wrote it")
    assert (done.state, done.progress, done.checkpoint_id, done.eta_seconds) == (
        "succeeded",
        100.0,
        "ckpt-x",
        None,
    )
    assert done.finished_at is not None
    assert store.report_job(job.id, "w1", progress=0.9) is None  # finished: no more changes
    assert store.get_job(job.id) == done
    with pytest.raises(JobFinished):
        store.cancel_job(job.id)
    with pytest.raises(JobNotFound):
        store.get_job("job_missing")


def test_stale_running_jobs_are_failed_and_taken_from_their_worker(store: SQLiteStore) -> None:
    stale, fresh = store.create_job(SPEC), store.create_job(SPEC)
    store.claim_job("dead-worker")
    store.claim_job("live-worker")
    store._db.execute(
        "UPDATE jobs SET heartbeat_at = ? WHERE id = ?",
        ((datetime.now(UTC) - timedelta(minutes=5)).isoformat(), stale.id),
    )
    failed = store.fail_stale_jobs(datetime.now(UTC) - timedelta(seconds=30))
    assert [job.id for job in failed] == [stale.id]
    assert (
        failed[0].state == "failed" and "worker died" in failed[0].error and "dead-worker" in failed[0].error
    )
    assert store.get_job(fresh.id).state == "running"
    assert store.report_job(stale.id, "dead-worker", progress=0.9) is None  # a zombie cannot revive it
    assert store.job_stats().counts == {
        "queued": 0,
        "running": 1,
        "succeeded": 0,
        "failed": 1,
        "cancelled": 0,
    }


def test_serving_checkpoint_promote_and_rollback_history(store: SQLiteStore) -> None:
    start = store.serving_checkpoint()
    assert (start.checkpoint, start.previous, start.revision) == ("base", None, 0)
    with pytest.raises(NothingToRollBack):
        store.rollback_target("base")

    a = store.set_serving_checkpoint("ckpt-a", "promote", expected="base")
    assert (a.checkpoint, a.previous, a.revision) == ("ckpt-a", "base", 1)
    with pytest.raises(ServingChanged):  # a promote based on a stale view loses
        store.set_serving_checkpoint("ckpt-b", "promote", expected="base")
    store.set_serving_checkpoint("ckpt-b", "promote", expected="ckpt-a")
    with pytest.raises(NotServing):
        store.rollback_target("ckpt-a")
    assert store.rollback_target("ckpt-b") == "ckpt-a"
    store.set_serving_checkpoint("ckpt-a", "rollback", expected="ckpt-b")
    assert store.rollback_target("ckpt-a") == "base"
    back = store.set_serving_checkpoint("base", "rollback", expected="ckpt-a")
    assert (back.checkpoint, back.previous, back.revision) == ("base", "ckpt-a", 4)
    same = store.set_serving_checkpoint("base", "promote")
    assert same.revision == 4  # no change, no revision

    trail = [(r.action, r.detail) for r in store.list_audit(kind="admin").data]
    assert trail == [
        ("checkpoint.rollback", {"checkpoint": "base", "previous": "ckpt-a"}),
        ("checkpoint.rollback", {"checkpoint": "ckpt-a", "previous": "ckpt-b"}),
        ("checkpoint.promote", {"checkpoint": "ckpt-b", "previous": "ckpt-a"}),
        ("checkpoint.promote", {"checkpoint": "ckpt-a", "previous": "base"}),
    ]
    assert store.revision() == 0  # the targets' revision is untouched (no guard rebuilds)


def test_jobs_and_serving_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "lethe.db"
    first = SQLiteStore(path)
    job = first.create_job(SPEC)
    first.set_serving_checkpoint("ckpt-a", "promote")
    first.close()
    again = SQLiteStore(path)
    assert again.get_job(job.id) == job
    assert again.serving_checkpoint().checkpoint == "ckpt-a"
    again.close()
