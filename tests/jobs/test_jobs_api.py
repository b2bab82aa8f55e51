"""The job API over HTTP (real app, tiny model): submit, read, list, cancel, validation, auth, audit."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.jobs.conftest import ADMIN, HARRY, QUICK_FLAT, USER, build_app
from tests.support.paths import REPO


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    return error


def submit(client: TestClient, **spec: Any) -> dict[str, Any]:
    body = {"method": "flat", "targets": ["Harry Potter"], "params": QUICK_FLAT, **spec}
    response = client.post("/admin/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def harry(client: TestClient) -> dict[str, Any]:
    response = client.post("/admin/targets", json=HARRY)
    assert response.status_code == 201, response.text
    return response.json()


def test_submit_read_list_cancel(client: TestClient, harry: dict[str, Any]) -> None:
    job = submit(client)
    assert job["id"].startswith("job_") and job["object"] == "unlearning.job"
    assert (job["state"], job["progress"], job["cancel_requested"]) == ("queued", 0, False)
    assert job["spec"] == {
        "method": "flat",
        "targets": ["Harry Potter"],
        "params": QUICK_FLAT,
        "from_checkpoint": None,
    }
    assert job["created_at"].endswith("Z") and job["started_at"] is None and job["logs"] == []
    assert client.get(f"/admin/jobs/{job['id']}").json() == job

    second = submit(client, method="ssd", params={"alpha": 5, "lambda": 0.5})
    listing = client.get("/admin/jobs").json()
    assert [j["id"] for j in listing["data"]] == [second["id"], job["id"]]  # newest first
    first_page = client.get("/admin/jobs", params={"limit": 1}).json()
    assert first_page["has_more"] and [j["id"] for j in first_page["data"]] == [second["id"]]
    rest = client.get("/admin/jobs", params={"after": first_page["next_cursor"]}).json()
    assert [j["id"] for j in rest["data"]] == [job["id"]] and not rest["has_more"]

    cancelled = client.post(f"/admin/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled" and cancelled.json()["finished_at"] is not None
    assert client.post(f"/admin/jobs/{job['id']}/cancel").json() == cancelled.json()  # idempotent
    queued = client.get("/admin/jobs", params={"state": "queued"}).json()["data"]
    assert [j["id"] for j in queued] == [second["id"]]
    assert [j["id"] for j in client.get("/admin/jobs", params={"state": "cancelled"}).json()["data"]] == [
        job["id"]
    ]


def test_finished_jobs_cannot_be_cancelled(client: TestClient, app: FastAPI, harry: dict[str, Any]) -> None:
    job = submit(client)
    store = app.state.store
    assert store.claim_job("w1").id == job["id"]
    store.finish_job(job["id"], "w1", "failed", error="boom")
    error = assert_error(client.post(f"/admin/jobs/{job['id']}/cancel"), 409)
    assert error["code"] == "job_finished" and "failed" in error["message"]


def test_running_jobs_are_asked_to_stop(client: TestClient, app: FastAPI, harry: dict[str, Any]) -> None:
    job = submit(client)
    app.state.store.claim_job("w1")
    asked = client.post(f"/admin/jobs/{job['id']}/cancel").json()
    assert (asked["state"], asked["cancel_requested"], asked["worker_id"]) == ("running", True, "w1")


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"method": "retrain", "targets": ["Harry Potter"]}, "method", None),
        ({"method": "flat", "targets": []}, "targets", None),
        ({"method": "flat"}, "targets", "missing_required_parameter"),
        ({"method": "flat", "targets": ["Harry Potter"], "epochs": 3}, "epochs", "unknown_parameter"),
        ({"method": "flat", "targets": ["Harry Potter"], "params": {"epochs": 0}}, "params.epochs", None),
        (
            {"method": "flat", "targets": ["Harry Potter"], "params": {"learning_rate": "fast"}},
            "params.learning_rate",
            None,
        ),
        ({"method": "ssd", "targets": ["Harry Potter"], "params": {"alpha": -1}}, "params.alpha", None),
        (
            {"method": "ssd", "targets": ["Harry Potter"], "params": {"divergence": "kl"}},
            "params.divergence",
            "unknown_parameter",
        ),
        ({"method": "flat", "targets": ["Voldemort"]}, "targets[0]", "invalid_value"),
        ({"method": "flat", "targets": ["Harry Potter", "Nobody"]}, "targets[1]", "invalid_value"),
        (
            {"method": "flat", "targets": ["Harry Potter"], "from_checkpoint": "ckpt-nope"},
            "from_checkpoint",
            "checkpoint_not_found",
        ),
    ],
)
def test_bad_jobs_are_refused_at_submission(
    client: TestClient, harry: dict[str, Any], body: dict[str, Any], param: str, code: str | None
) -> None:
    error = assert_error(client.post("/admin/jobs", json=body), 400, param)
    if code is not None:
        assert error["code"] == code
    if param.startswith("targets[") and code == "invalid_value":
        assert "Voldemort" in error["message"] or "Nobody" in error["message"]
    assert client.get("/admin/jobs").json()["data"] == []


def test_base_is_a_valid_starting_checkpoint(client: TestClient, harry: dict[str, Any]) -> None:
    assert submit(client, from_checkpoint="base")["spec"]["from_checkpoint"] is None


def test_a_job_starts_from_the_checkpoint_serving_at_submission(
    home_with_checkpoints: tuple[Path, str, str], tiny_model_dir: Path
) -> None:
    """After a promote, a job that names no checkpoint builds on the promoted weights, not on the
    base model (whose answers the promoted checkpoint was made to forget)."""
    home, first, _ = home_with_checkpoints
    with TestClient(build_app(home, tiny_model_dir), headers=ADMIN) as client:
        assert client.post("/admin/targets", json=HARRY).status_code == 201
        assert submit(client)["spec"]["from_checkpoint"] is None
        assert client.post(f"/admin/checkpoints/{first}/promote").status_code == 200
        assert submit(client)["spec"]["from_checkpoint"] == first


def test_unknown_jobs_are_404(client: TestClient) -> None:
    assert assert_error(client.get("/admin/jobs/job_nope"), 404)["code"] == "job_not_found"
    assert assert_error(client.post("/admin/jobs/job_nope/cancel"), 404)["code"] == "job_not_found"
    assert_error(client.get("/admin/jobs", params={"state": "done"}), 400, "state")
    assert_error(client.get("/admin/jobs", params={"after": "x"}), 400, "after")


ROUTES = [
    ("POST", "/admin/jobs"),
    ("GET", "/admin/jobs"),
    ("GET", "/admin/jobs/job_x"),
    ("POST", "/admin/jobs/job_x/cancel"),
    ("GET", "/admin/checkpoints"),
    ("GET", "/admin/checkpoints/base"),
    ("POST", "/admin/checkpoints/base/promote"),
    ("POST", "/admin/checkpoints/base/rollback"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("headers", [USER, {}, {"Authorization": "Bearer wrong"}])
def test_only_the_admin_key_opens_jobs_and_checkpoints(
    app: FastAPI, method: str, path: str, headers: dict[str, str]
) -> None:
    with TestClient(app) as client:
        body = {"method": "flat", "targets": ["Harry Potter"]}
        error = assert_error(client.request(method, path, json=body, headers=headers), 401)
        assert error["type"] == "authentication_error"
        assert client.get("/admin/jobs", headers=ADMIN).json()["data"] == []
        assert client.get("/v1/models", headers=USER).json()["data"][0]["checkpoint"] == "base"


def test_job_changes_are_audited(client: TestClient, harry: dict[str, Any]) -> None:
    job = submit(client)
    client.post(f"/admin/jobs/{job['id']}/cancel")
    trail = client.get("/admin/audit", params={"kind": "admin"}).json()["data"]
    assert [(r["action"], r["detail"].get("job_id")) for r in trail[:2]] == [
        ("job.cancel", job["id"]),
        ("job.create", job["id"]),
    ]
    assert trail[1]["detail"]["method"] == "flat" and trail[1]["detail"]["targets"] == ["Harry Potter"]


def test_job_metrics(client: TestClient, app: FastAPI, harry: dict[str, Any]) -> None:
    submit(client)
    failed = submit(client)
    submit(client)
    store = app.state.store
    store.claim_job("w1")  # the oldest
    store.claim_job("w1")
    store.finish_job(failed["id"], "w1", "failed", error="boom")
    text = client.get("/metrics").text
    assert 'lethe_jobs{state="queued"} 1.0' in text
    assert 'lethe_jobs{state="running"} 1.0' in text
    assert 'lethe_jobs{state="failed"} 1.0' in text
    assert "lethe_job_failures_total 1.0" in text
    assert 'lethe_serving_checkpoint_info{checkpoint="base"} 1.0' in text
    # Every metric the alert rules use exists.
    rules = (REPO / "deploy" / "alerts.yml").read_text()
    for name in set(re.findall(r"\b(lethe_[a-z_]+)", rules)):
        assert f"# TYPE {name.removesuffix('_bucket')} " in text, name
