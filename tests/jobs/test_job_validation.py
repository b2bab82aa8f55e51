"""Hostile job submissions (issue 21, findings 5 and 6): each is a 400 naming the item at fault, never
a 500 and never a queued job that fails later; and the job body is one schema, checked once."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.testclient import TestClient

from lethe.gateway.config import Settings
from lethe.gateway.jobs.validation import JobSpecError, find_targets, parameter_names, starting_checkpoint
from lethe.gateway.store import open_store
from lethe.guards.targets import TargetSpec
from lethe.models.unlearning.spec import MAX_TARGETS, parse_spec, stored_spec
from tests.evaluation.synthetic_data import write_eval_data
from tests.jobs.conftest import ADMIN, HARRY, build_app
from tests.support.paths import REPO


@pytest.fixture
def eval_data(tmp_path: Path) -> Path:
    """The synthetic evaluation data (RWKU targets Ada Lovelace and Alan Turing)."""
    return write_eval_data(tmp_path / "eval")


def break_folders(eval_data: Path) -> None:
    """Two malformed RWKU folders: an intro.json that is not JSON, a passage.json of the wrong shape."""
    broken = eval_data / "rwku" / "7_Broken"
    broken.mkdir()
    (broken / "intro.json").write_text("{not json")
    (broken / "passage.json").write_text("[]")
    half = eval_data / "rwku" / "8_Half_Person"
    half.mkdir()
    (half / "intro.json").write_text(json.dumps([{"target": "Half Person", "intro": "x"}]))
    (half / "passage.json").write_text('"not a list of passages"')


@pytest.fixture
def app(tmp_path: Path, tiny_model_dir: Path, eval_data: Path, monkeypatch: pytest.MonkeyPatch) -> FastAPI:
    monkeypatch.setenv("LETHE_EVAL_DATA", str(eval_data))
    return build_app(tmp_path / "home", tiny_model_dir)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, headers=ADMIN) as started:
        response = started.post("/admin/targets", json=HARRY)
        assert response.status_code == 201, response.text
        yield started


def post(client: TestClient, body: dict[str, Any] | str) -> httpx.Response:
    if isinstance(body, str):  # JSON with Infinity/NaN, which json= cannot send
        return client.post("/admin/jobs", content=body, headers={"Content-Type": "application/json"})
    return client.post("/admin/jobs", json=body)


def refused(response: httpx.Response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error["message"]


def flat(*targets: str, **params: Any) -> dict[str, Any]:
    return {"method": "flat", "targets": list(targets), "params": params}


def ssd(*targets: str, **params: Any) -> dict[str, Any]:
    return {"method": "ssd", "targets": list(targets), "params": params}


@pytest.mark.parametrize(
    ("targets", "param", "words"),
    [
        (["Harry Potter", "~nosuchuser"], "targets[1]", "unknown target '~nosuchuser'"),
        (["/etc/passwd"], "targets[0]", "a path is not a target"),
        (["Harry Potter", "HARRY POTTER"], "targets[1]", "same target as targets[0]"),
        (["Ada Lovelace", "Harry Potter", "3_ada_lovelace"], "targets[2]", "same target as targets[0]"),
        (["Harry Potter"] * (MAX_TARGETS + 1), "targets", "at most 64"),
        (["Harry Potter", " "], "targets[1]", "at least 1 character"),
    ],
)
def test_bad_targets_are_a_400_naming_the_item(
    client: TestClient, targets: list[str], param: str, words: str | None
) -> None:
    message = refused(post(client, flat(*targets)), param)
    assert words is None or words in message, message
    assert client.get("/admin/jobs").json()["data"] == []


def test_an_evaluation_target_is_named_not_given_as_a_path(client: TestClient, eval_data: Path) -> None:
    folder = eval_data / "rwku" / "3_Ada_Lovelace"
    assert "a path is not a target" in refused(post(client, flat(str(folder))), "targets[0]")
    job = post(client, flat("Ada Lovelace", "10_Alan_Turing", "Harry Potter"))
    assert job.status_code == 201, job.text
    assert job.json()["spec"]["targets"] == ["Ada Lovelace", "10_Alan_Turing", "Harry Potter"]


def test_a_malformed_evaluation_folder_is_named_and_blocks_nothing_else(
    client: TestClient, eval_data: Path
) -> None:
    break_folders(eval_data)
    assert "'7_Broken' is malformed" in refused(post(client, flat("Harry Potter", "7_broken")), "targets[1]")
    assert "'8_Half_Person' is malformed" in refused(post(client, flat("Half Person")), "targets[0]")
    assert client.get("/admin/jobs").json()["data"] == []
    for targets in (["Harry Potter"], ["Ada Lovelace"]):
        response = post(client, flat(*targets))
        assert response.status_code == 201, response.text


def test_a_registered_target_is_found_by_id_too(client: TestClient) -> None:
    harry = client.get("/admin/targets").json()["data"][0]
    assert post(client, flat(harry["id"])).status_code == 201
    assert "same target" in refused(post(client, flat(harry["id"], "harry potter")), "targets[1]")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"method": "ssd", "targets": ["Harry Potter"], "params": {"alpha": Infinity}}', "params.alpha"),
        ('{"method": "ssd", "targets": ["Harry Potter"], "params": {"lambda": Infinity}}', "params.lambda"),
        (
            '{"method": "flat", "targets": ["Harry Potter"], "params": {"weight_decay": Infinity}}',
            "params.weight_decay",
        ),
        (
            '{"method": "flat", "targets": ["Harry Potter"], "params": {"max_grad_norm": 1e999}}',
            "params.max_grad_norm",
        ),
        (
            '{"method": "flat", "targets": ["Harry Potter"], "params": {"learning_rate": NaN}}',
            "params.learning_rate",
        ),
        (ssd("Harry Potter", forget_samples=10**9), "params.forget_samples"),
        (ssd("Harry Potter", retain_samples=10**9), "params.retain_samples"),
        (flat("Harry Potter", forget_samples=10**9), "params.forget_samples"),
        (flat("Harry Potter", seed=2**70), "params.seed"),
        (ssd("Harry Potter", modules=["("]), "params.modules[0]"),
        (ssd("Harry Potter", modules=[r"layers\.0\.", "[z-a]"]), "params.modules[1]"),
        (ssd("Harry Potter", modules=[r"layers\.0\.", "^nothing here$"]), "params.modules[1]"),
        (ssd("Harry Potter", modules=[]), "params.modules"),
    ],
)
def test_bad_hyperparameters_are_a_400_naming_them(
    client: TestClient, body: dict[str, Any] | str, param: str
) -> None:
    refused(post(client, body), param)
    assert client.get("/admin/jobs").json()["data"] == []


def test_module_patterns_that_match_the_model_are_taken(client: TestClient) -> None:
    response = post(client, ssd("Harry Potter", modules=[r"layers\.1\.mlp\.", r"self_attn\.q_proj"]))
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["params"] == {"modules": [r"layers\.1\.mlp\.", r"self_attn\.q_proj"]}


def test_the_job_body_is_one_schema_per_method(app: FastAPI) -> None:
    routes = [route for route in app.routes if getattr(route, "path", "").startswith("/admin/jobs")]
    schema = get_openapi(title="jobs", version="0", routes=routes)
    body = schema["paths"]["/admin/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["discriminator"]["propertyName"] == "method"
    assert set(body["discriminator"]["mapping"]) == {"ssd", "flat"}
    components = schema["components"]["schemas"]
    assert components["SSDParams"]["properties"]["forget_samples"]["maximum"] == 10_000
    assert {"alpha", "lambda", "modules"} <= set(components["SSDParams"]["properties"])
    assert components["FLATJob"]["properties"]["targets"]["maxItems"] == MAX_TARGETS


def test_a_stored_job_reads_back_as_the_same_job() -> None:
    """Jobs keep the stored shape they had (params as an object, only what was given), so jobs
    already in a database still load."""
    old = {"method": "ssd", "targets": ["Harry Potter"], "params": {"lambda": 0.5}, "from_checkpoint": None}
    spec = parse_spec(old)
    assert spec.params.lambda_ == 0.5 and spec.params.alpha == 50.0
    assert stored_spec(spec) == old
    assert stored_spec(parse_spec({**old, "params": {}})) == {**old, "params": {}}


def test_starting_checkpoint() -> None:
    assert starting_checkpoint(None, "ckpt-serving") == "ckpt-serving"
    assert starting_checkpoint(None, "base") is None
    assert starting_checkpoint(None, None) is None
    assert starting_checkpoint("base", "ckpt-serving") is None
    assert starting_checkpoint("ckpt-x", "ckpt-serving") == "ckpt-x"


def test_targets_without_evaluation_data(tmp_path: Path) -> None:
    store = open_store(Settings(home=tmp_path))
    try:
        store.create_target(TargetSpec(name="Grace Hopper", documents=["She wrote the A-0 compiler."]))
        store.create_target(TargetSpec(name="Nobody Known", aliases=["N. K."]))
        assert [t.name for t in find_targets([" grace HOPPER "], store, None)] == ["Grace Hopper"]
        with pytest.raises(JobSpecError, match="no evaluation data is configured") as unknown:
            find_targets(["Ada Lovelace"], store, None)
        assert unknown.value.param == "targets[0]"
        with pytest.raises(JobSpecError, match="no documents or examples") as empty:
            find_targets(["Grace Hopper", "Nobody Known"], store, tmp_path / "absent")
        assert empty.value.param == "targets[1]"
    finally:
        store.close()


def test_parameter_names_are_read_without_loading_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    names = parameter_names(tiny_model_dir)
    assert names is not None and "model.layers.0.mlp.up_proj.weight" in names
    assert parameter_names(tmp_path) is None  # no safetensors: the run checks the patterns
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    assert parameter_names(tmp_path) is None


HEAVY = (
    "torch",
    "transformers",
    "lethe.gateway.jobs.runner",
    "lethe.gateway.jobs.data",
    "lethe.models.unlearning.data",
)


def test_the_job_api_imports_neither_torch_training_code_nor_the_runner() -> None:
    """Not at import time, and not later inside a function either."""
    for path in ("gateway/api/admin/jobs.py", "gateway/jobs/validation.py"):
        tree = ast.parse((REPO / path).read_text())
        imported = [
            name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for name in (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            )
        ]
        assert not [m for m in imported if m.startswith(HEAVY)], (path, imported)
    code = (
        "import sys, lethe.gateway.api.admin.jobs;"
        f" heavy = [m for m in {HEAVY[1:]!r} if m in sys.modules]; print(heavy); sys.exit(bool(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
