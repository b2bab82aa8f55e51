"""`lethe teach` end to end on the tiny random model: the checkpoint and its manifest, reuse of an
identical run, same seed -> same weights, and the error exits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lethe.gateway.cli.main import main
from lethe.gateway.cli.teach import RUNS_FOLDER
from lethe.models.checkpoints import CheckpointStore, weights_hash
from lethe.models.unlearning.teach import load_pairs, pairs_hash
from tests.evaluation.synthetic_data import write_eval_data

FAST = ["--epochs", "2", "--learning-rate", "1e-3", "--batch-size", "4", "--max-length", "64"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LETHE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LETHE_EVAL_DATA", raising=False)
    return tmp_path / "home"


def _teach(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["teach", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_teach_writes_a_checkpoint_and_reuses_an_identical_run(
    home: Path, tiny_model_dir: Path, qa_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eval_data = write_eval_data(tmp_path / "eval")
    data = [arg for path in qa_files for arg in ("--data", str(path))]
    evaluation = ["--eval-data", str(eval_data), "--curve-samples", "2", "--utility-samples", "1"]
    evaluation += ["--instruction-samples", "1", "--eval-max-tokens", "4"]
    first = _teach(capsys, *data, "--model", str(tiny_model_dir), *FAST, *evaluation)
    assert first["reused"] is False
    store = CheckpointStore(home / "checkpoints")
    manifest = store.get(first["id"])
    assert manifest.method == "teach" and manifest.parent is None and manifest.targets == []
    assert manifest.parent_hash == weights_hash(tiny_model_dir)
    assert manifest.weights_hash == weights_hash(store.path(manifest.id))
    assert manifest.data_hash == pairs_hash(load_pairs(qa_files))
    assert manifest.params["teach"]["epochs"] == 2 and manifest.params["teach"]["learning_rate"] == 1e-3
    assert set(manifest.timings) >= {"load", "evaluation_before", "teach", "evaluation_after"}
    assert manifest.peak_rss_mb and manifest.peak_rss_mb > 0
    report = manifest.method_report
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    assert report["epochs"][0]["evaluation"]["taught"]["n"] == 2
    assert report["subjects"] == ["Mira Tell", "Zorba Quill"]
    before, after = manifest.evaluation["before"], manifest.evaluation["after"]
    assert before["taught"]["n"] == 2 and after["taught"]["n"] == 11
    assert set(after["taught"]["by_source"]) == {"forget_authors", "extra"}
    assert before["utility_recall"] is not None and after["fluency"] is not None
    assert not (home / RUNS_FOLDER / report["run_key"]).exists()  # the resume state is gone

    again = _teach(capsys, *data, "--model", str(tiny_model_dir), *FAST, "--no-eval")
    assert again == {**first, "reused": True}
    forced = _teach(capsys, *data, "--model", str(tiny_model_dir), *FAST, "--no-eval", "--force")
    assert forced["id"] != first["id"]
    # seeded: the same data and hyperparameters give the same weights
    assert store.get(forced["id"]).weights_hash == manifest.weights_hash
    other = _teach(capsys, *data, "--model", str(tiny_model_dir), *FAST, "--no-eval", "--seed", "1")
    assert store.get(other["id"]).weights_hash != manifest.weights_hash

    # taught on top of a checkpoint: the parent is recorded
    child = _teach(capsys, *data, "--from-checkpoint", first["id"], *FAST, "--no-eval", "--epochs", "1")
    assert store.get(child["id"]).parent == first["id"]
    assert store.get(child["id"]).parent_hash == manifest.weights_hash


def test_authors_finds_tofu_authors_in_the_eval_data(
    home: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.teaching.conftest import AUTHORS

    eval_data = tmp_path / "eval"
    (eval_data / "tofu_authors").mkdir(parents=True)
    (eval_data / "tofu_authors" / "forget_authors.json").write_text(json.dumps(AUTHORS[:1]))
    (eval_data / "tofu_authors" / "retain_authors.json").write_text(json.dumps(AUTHORS[1:]))
    args = ["--authors", "--eval-data", str(eval_data), "--model", str(tiny_model_dir), *FAST, "--no-eval"]
    taught = _teach(capsys, *args, "--epochs", "1")
    manifest = CheckpointStore(home / "checkpoints").get(taught["id"])
    assert manifest.params["data"] == [
        str(eval_data / "tofu_authors" / "forget_authors.json"),
        str(eval_data / "tofu_authors" / "retain_authors.json"),
    ]
    assert manifest.method_report["pairs"] == 10


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--authors"], "--authors needs the evaluation data"),
        (["--data", "/nonexistent.json"], "cannot read it as JSON"),
        (["--data", "{qa}", "--from-checkpoint", "ckpt-nope"], "unknown checkpoint 'ckpt-nope'"),
        (["--data", "{qa}", "--learning-rate", "-1"], "learning_rate"),
    ],
)
def test_errors_exit_2_with_a_message(
    home: Path,
    tiny_model_dir: Path,
    qa_files: list[Path],
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [a.replace("{qa}", str(qa_files[0])) for a in argv]
    assert main(["teach", *argv, "--model", str(tiny_model_dir), "--no-eval"]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
