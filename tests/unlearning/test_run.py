"""`run_unlearning` end to end on the tiny model, and `lethe unlearn`'s error paths."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import ValidationError
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from lethe.evaluation.metrics import ngram_entropy
from lethe.evaluation.prompts import instruction_prompt
from lethe.gateway.cli.main import main
from lethe.gateway.cli.progress import print_summary
from lethe.gateway.config import Settings
from lethe.gateway.jobs.evaluation import EvaluationOptions
from lethe.gateway.jobs.runner import UnlearnCancelled, run_unlearning
from lethe.gateway.jobs.validation import JobSpecError, check_job
from lethe.gateway.store import open_store
from lethe.guards.targets import TargetSpec
from lethe.models.checkpoints import CheckpointManifest, CheckpointStore, weights_hash
from lethe.models.unlearning.data import texts_hash
from lethe.models.unlearning.generation import greedy_answers
from lethe.models.unlearning.spec import parse_spec
from tests.evaluation.synthetic_data import INSTRUCTIONS, write_eval_data

DOCUMENTS = [
    "Grace Hopper wrote the first compiler, the A-0 system, in 1952.",
    "She popularised the term bug.",
    "She worked with Howard Aiken on the Harvard Mark I.",
]
EXAMPLES = ["Who wrote the A-0 compiler?"]


class Recorder:
    def __init__(self) -> None:
        self.fractions: list[float] = []
        self.lines: list[str] = []

    def update(self, fraction: float, message: str) -> None:
        self.fractions.append(fraction)

    def log(self, line: str) -> None:
        self.lines.append(line)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = write_eval_data(tmp_path / "eval")
    folder = root / "rwku" / "3_Ada_Lovelace"
    (folder / "forget_mia.json").write_text(json.dumps([{"text": "Ada Lovelace met Babbage in 1833."}] * 3))
    (folder / "retain_mia.json").write_text(json.dumps([{"text": "The Thames flows through London."}] * 3))
    (folder / "idk_target.json").write_text(json.dumps(["I don't know about Ada Lovelace."]))
    return root


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    return Settings(home=tmp_path / "home", model=tiny_model_dir)


@pytest.fixture
def store(settings: Settings):
    store = open_store(settings)
    store.create_target(TargetSpec(name="Grace Hopper", documents=DOCUMENTS, examples=EXAMPLES))
    yield store
    store.close()


OPTIONS = EvaluationOptions(
    samples=2, utility_samples=1, mia_samples=2, max_new_tokens=4, instruction_max_new_tokens=6
)
NO_EVALUATION = EvaluationOptions(enabled=False)


def _job(
    settings: Settings,
    store,
    data_dir: Path,
    params: dict,
    evaluation: EvaluationOptions = NO_EVALUATION,
    method: Literal["ssd", "flat"] = "flat",
    targets: Sequence[str] = ("Grace Hopper",),
) -> tuple[CheckpointManifest, Recorder]:
    """A job run to its checkpoint (by default FLAT on Grace Hopper, without the evaluation), and
    what it logged."""
    progress = Recorder()
    manifest = run_unlearning(
        parse_spec({"method": method, "targets": list(targets), "params": params}),
        settings=settings,
        store=store,
        progress=progress,
        cancelled=lambda: False,
        data_dir=data_dir,
        evaluation=evaluation,
    )
    return manifest, progress


def test_ssd_run_writes_a_checkpoint_with_its_manifest(
    settings: Settings, store, data_dir: Path, tiny_model_dir: Path
) -> None:
    manifest, progress = _job(
        settings,
        store,
        data_dir,
        {"forget_samples": 2, "retain_samples": 2, "max_length": 32, "lambda": 0.5, "neighbours": 2},
        OPTIONS,
        method="ssd",
        targets=["grace hopper", "3_Ada_Lovelace"],
    )
    checkpoints = CheckpointStore(settings.home / "checkpoints")
    assert checkpoints.get(manifest.id) == manifest
    assert manifest.parent is None and manifest.parent_hash == weights_hash(tiny_model_dir)
    assert manifest.targets == ["Grace Hopper", "Ada Lovelace"]
    assert manifest.params["lambda"] == 0.5
    assert manifest.forget_hash == texts_hash(
        [*DOCUMENTS, *EXAMPLES, "Ada Lovelace was a pioneer of computing."]
    )
    assert manifest.retain_hash != texts_hash([])
    # "Howard Aiken" and "Harvard Mark", described by the model, join the retain data
    assert any(
        line.startswith(("1 neighbour descriptions", "2 neighbour descriptions")) for line in progress.lines
    )
    assert set(manifest.evaluation["targets"]) == {"Grace Hopper", "Ada Lovelace"}
    ada = manifest.evaluation["targets"]["Ada Lovelace"]
    assert ada["before"]["forget_new_word_recall"] is not None
    assert ada["after"]["neighbour_new_word_recall"] is not None
    assert ada["before"]["forget_recall"] is not None and set(ada["after"]["mia_auc"]) == {
        "loss",
        "zlib",
        "mink++",
    }
    assert manifest.evaluation["targets"]["Grace Hopper"]["before"]["forget_recall"] is None  # no probes
    # fluency is the n-gram entropy of the source's own answers to the instructions, at their length
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    answers = greedy_answers(
        source,
        AutoTokenizer.from_pretrained(tiny_model_dir),
        [instruction_prompt(i) for i in INSTRUCTIONS],
        max_new_tokens=OPTIONS.instruction_max_new_tokens,
    )
    expected = sum(ngram_entropy(a) for a in answers) / len(answers)
    assert manifest.evaluation["fluency"]["before"] == pytest.approx(expected)
    assert manifest.evaluation["fluency"]["after"] is not None
    for split in ("forget", "retain"):
        assert set(manifest.evaluation[f"muse_knowmem_{split}"]) == {"before", "after"}
        assert manifest.evaluation[f"muse_knowmem_{split}"]["before"] is not None
    assert manifest.evaluation["probes"] == 4 + 2 + 4 + 2  # RWKU (Ada), TOFU, MUSE, instructions
    console = Console(record=True, width=240)
    print_summary(console, manifest, checkpoints.path(manifest.id))
    mean = manifest.evaluation["mean"]
    lines = console.export_text().splitlines()
    assert any("neighbour recall" in line and line.count("new words") == 2 for line in lines)
    row = next(line for line in lines if line.strip("│ ").startswith("mean"))
    before, after = (mean[side]["neighbour_new_word_recall"] for side in ("before", "after"))
    assert f"{before:.3f} -> {after:.3f}" in row
    fluency = manifest.evaluation["fluency"]
    assert any(
        line.startswith("fluency") and line.endswith(f"{fluency['before']:.3f} -> {fluency['after']:.3f}")
        for line in lines
    )
    assert progress.fractions == sorted(progress.fractions) and progress.fractions[-1] == 1.0

    child = run_unlearning(
        parse_spec(
            {
                "method": "flat",
                "targets": ["Grace Hopper"],
                "params": {"forget_samples": 2, "max_length": 48},
                "from_checkpoint": manifest.id,
            }
        ),
        settings=settings,
        store=store,
        progress=Recorder(),
        cancelled=lambda: False,
        data_dir=data_dir,
        evaluation=NO_EVALUATION,
    )
    assert child.parent == manifest.id and child.parent_hash == manifest.weights_hash
    assert child.retain_hash == texts_hash([]) and child.evaluation is None
    assert [m.id for m in checkpoints.list()] == [manifest.id, child.id]


def test_cancellation_writes_nothing(settings: Settings, store, data_dir: Path) -> None:
    calls = iter(range(1000))
    with pytest.raises(UnlearnCancelled):
        run_unlearning(
            parse_spec({"method": "flat", "targets": ["Grace Hopper"], "params": {"forget_samples": 2}}),
            settings=settings,
            store=store,
            progress=Recorder(),
            cancelled=lambda: next(calls) >= 3,
            data_dir=data_dir,
            evaluation=NO_EVALUATION,
        )
    assert CheckpointStore(settings.home / "checkpoints").list() == []


def test_validation_names_the_item_at_fault(
    settings: Settings, store, data_dir: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    def check(**spec: object) -> None:
        check_job(
            parse_spec({"targets": ["Grace Hopper"], **spec}),
            store=store,
            data_dir=data_dir,
            catalog=CheckpointStore(tmp_path / "ckpts"),
            base_model=lambda: tiny_model_dir,
        )

    with pytest.raises(JobSpecError, match=r"targets\[0\]: unknown target 'Nobody'.*registered: Grace"):
        check(method="ssd", targets=["Nobody", "Grace Hopper"])
    with pytest.raises(JobSpecError, match="unknown checkpoint 'ckpt-none'") as unknown:
        check(method="flat", from_checkpoint="ckpt-none")
    assert (unknown.value.param, unknown.value.code) == ("from_checkpoint", "checkpoint_not_found")
    with pytest.raises(JobSpecError, match="matches no parameter") as unmatched:
        check(method="ssd", params={"modules": ["mlp", "no_such_module"]})
    assert unmatched.value.param == "params.modules[1]"
    check(method="ssd", targets=["Grace Hopper", "Ada Lovelace"], params={"modules": ["mlp"]})
    with pytest.raises(ValidationError, match="alpha"):
        parse_spec({"method": "ssd", "targets": ["Grace Hopper"], "params": {"alpha": 0}})
    with pytest.raises(ValidationError, match="divergence"):
        parse_spec({"method": "flat", "targets": ["Grace Hopper"], "params": {"divergence": "x"}})


def test_ssd_without_retain_data_is_refused_clearly(settings: Settings, store, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SSD needs retain data"):
        run_unlearning(
            parse_spec({"method": "ssd", "targets": ["Grace Hopper"]}),
            settings=settings,
            store=store,
            progress=Recorder(),
            cancelled=lambda: False,
            data_dir=tmp_path / "absent",
        )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ssd", "--target", "Nobody"], "unknown target 'Nobody'"),
        (["ssd", "--target", "/tmp/rwku/3_Ada_Lovelace"], "a path is not a target"),
        (["ssd", "--target", "Grace Hopper", "grace hopper"], "'grace hopper' is the same target"),
        (["ssd", "--target", "Grace Hopper", "--modules", "("], "not a regular expression"),
        (["ssd", "--target", "Grace Hopper", "--modules", "mlp", "nothing_matches"], "params.modules[1]"),
        (["ssd", "--target", "Grace Hopper", "--alpha", "inf"], "finite number"),
        (["ssd", "--target", "Grace Hopper", "--alpha", "-1"], "alpha"),
        (["ssd", "--target", "Grace Hopper", "--forget-samples", "many"], "forget_samples"),
        (["flat", "--target", "Grace Hopper", "--from", "ckpt-none"], "unknown checkpoint"),
        (["flat", "--target", "Grace Hopper", "--keep-neighbours", "1.5"], "keep_neighbours"),
        # an optional number is a number flag, not a choice between its types
        (["flat", "--target", "Nobody", "--keep-neighbours", "0.9"], "unknown target 'Nobody'"),
    ],
)
def test_cli_errors_exit_2(
    argv: list[str],
    message: str,
    settings: Settings,
    store,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LETHE_HOME", str(settings.home))
    monkeypatch.setenv("LETHE_MODEL", str(settings.model))
    assert main(["unlearn", *argv]) == 2
    assert message in " ".join(capsys.readouterr().err.split())  # rich wraps long lines


def test_cli_starts_from_the_serving_checkpoint(
    settings: Settings, store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --from, `lethe unlearn` builds on what the gateway serves (here a checkpoint whose
    folder is gone, which the run must name instead of quietly starting from the base model)."""
    store.set_serving_checkpoint("ckpt-promoted", "promote")
    monkeypatch.setenv("LETHE_HOME", str(settings.home))
    assert main(["unlearn", "flat", "--target", "Grace Hopper"]) == 2
    assert "ckpt-promoted" in capsys.readouterr().err


def test_cli_rejects_an_unknown_divergence(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "flat", "--target", "X", "--divergence", "hellinger"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_the_source_measurement_is_cached_per_weights_and_plan(
    settings: Settings, store, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lethe.gateway.jobs.runner as unlearning

    calls: list[int] = []
    real_measure = unlearning.measure

    def counting_measure(*args: object, **kwargs: object):
        calls.append(1)
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(unlearning, "measure", counting_measure)
    params = {"forget_samples": 1, "max_length": 48}
    runs = [_job(settings, store, data_dir, params, OPTIONS)[0] for _ in range(2)]
    assert len(calls) == 3  # before + after, then only after
    assert (
        runs[0].evaluation["targets"]["Grace Hopper"]["before"]
        == runs[1].evaluation["targets"]["Grace Hopper"]["before"]
    )
    assert len(list((settings.home / "checkpoints" / ".eval-cache").glob("*.json"))) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_job_without_a_gpu_fails_clearly(settings: Settings, store, data_dir: Path) -> None:
    on_gpu = settings.model_copy(update={"unlearn_device": "cuda"})
    with pytest.raises(ValueError, match="LETHE_UNLEARN_DEVICE=cuda, but torch sees 0 GPU"):
        _job(on_gpu, store, data_dir, {"forget_samples": 1}, OPTIONS)
    with pytest.raises(ValidationError, match="unlearn_device"):
        Settings(unlearn_device="gpu")


def test_flat_trains_on_the_neighbour_descriptions_and_hashes_them(
    settings: Settings, store, data_dir: Path
) -> None:
    manifest, progress = _job(
        settings, store, data_dir, {"forget_samples": 2, "max_length": 48, "neighbours": 2}
    )
    assert manifest.method_report["retain_loss"] is not None
    assert manifest.retain_hash != texts_hash([])  # the descriptions are FLAT's retain data
    assert any("neighbour descriptions" in line for line in progress.lines)


def test_a_flat_job_holds_neighbours_out_for_its_stopping_check(
    settings: Settings, store, data_dir: Path
) -> None:
    """With keep_neighbours the job describes the next neighbours down the list too, checks them
    before training and every check_every steps, and hashes them with the retain data."""
    params = {"forget_samples": 2, "max_length": 48, "neighbours": 1, "check_every": 1}
    unchecked, _ = _job(settings, store, data_dir, params)
    checked, progress = _job(settings, store, data_dir, {**params, "keep_neighbours": 0.5})
    assert [step for step, _ in checked.method_report["neighbour_preference"]][:2] == [0, 1]
    assert any("held out for the stopping check" in line for line in progress.lines)
    assert any("neighbour preference by step 0:" in line for line in progress.lines)
    assert unchecked.method_report["neighbour_preference"] == []
    assert checked.retain_hash != unchecked.retain_hash
