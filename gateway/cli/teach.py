"""`lethe teach`: fine-tune the served model on question/answer pairs into a new checkpoint.

    lethe teach --data pairs.json [--data more.json] [--epochs 5 --learning-rate 2e-4 ...]
    lethe teach --authors            # the taught subject: every author of <eval data>/tofu_authors

The model is measured before and after (ROUGE-L recall of the gold answers to the taught
questions, and the TOFU utility sets and instruction fluency as `lethe unlearn` measures them), and
after each epoch on a fixed sample of the taught questions (the teaching curve). Everything lands
in the checkpoint's manifest (method `teach`).

Runs are keyed by (data, source weights, hyperparameters): a finished run with the same key is
reused instead of trained again (`--force` trains anyway), and an interrupted one resumes from its
last finished epoch, kept under LETHE_HOME/teach-runs/<key>/ until the checkpoint is written.
`run_teaching` is the whole run without the terminal, for a job kind to call.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from lethe.gateway.cli.param_flags import add_param_flags, param_values
from lethe.models.unlearning.teach import TeachParams

if TYPE_CHECKING:
    from lethe.gateway.config import Settings
    from lethe.gateway.jobs.runner import ProgressSink
    from lethe.models.checkpoints import CheckpointManifest, CheckpointStore
    from lethe.models.unlearning.teach import QAPair

AUTHORS_FOLDER = "tofu_authors"
AUTHORS_FILES = ("forget_authors.json", "retain_authors.json")
BASE = "base"
RUNS_FOLDER = "teach-runs"
EVAL_CACHE = ".eval-cache"
EVAL_DATA_ENV = "LETHE_EVAL_DATA"
"""Shared with `lethe unlearn`: a source's utility measurement is reused by either command."""
EXIT_BAD_REQUEST = 2
_STAGES = {"load": (0.0, 0.02), "before": (0.02, 0.08), "teach": (0.08, 0.92), "after": (0.92, 0.99)}


class TeachEvaluation(BaseModel):
    """What is measured around a teaching run (none of it changes the weights)."""

    enabled: bool = True
    curve_samples: int = Field(
        100, ge=0, description="taught questions answered before training and after each epoch (0: none)"
    )
    curve_utility: bool = Field(
        False,
        description="also measure the utility sets and fluency after each epoch (costs as much as the"
        " before/after measurement, once per epoch)",
    )
    final_samples: int | None = Field(
        None, ge=1, description="taught questions answered after training (default: all)"
    )
    utility_samples: int = Field(100, ge=0, description="questions per TOFU utility set (0: none)")
    instruction_samples: int = Field(
        32, ge=0, description="general instructions whose answers' n-gram entropy is the fluency"
    )
    max_new_tokens: int = Field(
        96, ge=1, description="answer length for the taught questions (the longest TOFU answer is 82)"
    )
    batch_size: int = Field(16, ge=1)
    seed: int = 0


def eval_data_dir(flag: Path | None) -> Path | None:
    """The evaluation data folder: the flag, else $LETHE_EVAL_DATA; None when neither is set."""
    value = flag or os.environ.get(EVAL_DATA_ENV)
    return Path(value).expanduser() if value else None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def recall_by_group(pairs: Sequence[QAPair], answers: Sequence[str]) -> dict[str, Any]:
    """Mean ROUGE-L recall of the gold answers (`lethe eval`'s TOFU scoring: rouge-score tokens, Porter
    stemmer), overall, per source file and per subject."""
    from lethe.evaluation import metrics

    scores = [metrics.rouge_l(p.answer, a).recall for p, a in zip(pairs, answers, strict=True)]

    def means(key: Callable[[QAPair], str | None]) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for pair, score in zip(pairs, scores, strict=True):
            if (name := key(pair)) is not None:
                groups.setdefault(name, []).append(score)
        return {name: round(sum(v) / len(v), 4) for name, v in groups.items()}

    return {
        "n": len(pairs),
        "recall": round(sum(scores) / len(scores), 4) if scores else None,
        "by_source": means(lambda p: p.source or None),
        "by_subject": means(lambda p: p.subject),
    }


def _sample(pairs: Sequence[QAPair], n: int | None, seed: int) -> list[QAPair]:
    if n is None or n >= len(pairs):
        return list(pairs)
    indices = sorted(random.Random(f"teach-eval:{seed}").sample(range(len(pairs)), n))
    return [pairs[i] for i in indices]


def run_teaching(
    data: Sequence[Path],
    params: TeachParams,
    *,
    settings: Settings,
    progress: ProgressSink,
    cancelled: Callable[[], bool] = lambda: False,
    checkpoints: CheckpointStore | None = None,
    from_checkpoint: str | None = None,
    data_dir: Path | None = None,
    evaluation: TeachEvaluation | None = None,
    force: bool = False,
) -> tuple[CheckpointManifest, bool]:
    """Teach the pairs of `data` to the source model (`from_checkpoint`, else the base model) and
    write a checkpoint; returns its manifest and whether an identical earlier run was reused.
    Raises ValueError for bad data or an unknown checkpoint, UnlearnCancelled when cancelled."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lethe.gateway.jobs.evaluation import EvaluationOptions, Measurement, build_plan, measure, plan_key
    from lethe.models.checkpoints import CheckpointManifest, CheckpointStore, new_checkpoint_id, weights_hash
    from lethe.models.loading import resolve_model_path
    from lethe.models.unlearning.generation import greedy_answers
    from lethe.models.unlearning.progress import UnlearnCancelled, sub_step
    from lethe.models.unlearning.teach import (
        ResumeStore,
        load_pairs,
        pairs_hash,
        run_key,
        run_teach,
        teach_sequences,
    )

    evaluation = evaluation or TeachEvaluation()
    data_dir = data_dir or eval_data_dir(None)
    checkpoints = checkpoints or CheckpointStore(settings.home / "checkpoints")
    pairs = load_pairs(data)
    if not pairs:
        raise ValueError("no question/answer pairs in --data")
    data_hash = pairs_hash(pairs)

    parent: CheckpointManifest | None = None
    if from_checkpoint not in (None, BASE):
        try:
            parent = checkpoints.get(from_checkpoint)
        except KeyError:
            known = ", ".join(m.id for m in checkpoints.list()) or "none"
            raise ValueError(f"unknown checkpoint {from_checkpoint!r} (known: {known})") from None
        source_path, parent_hash, base_model = (
            checkpoints.path(parent.id),
            parent.weights_hash,
            parent.base_model,
        )
    else:
        source_path = resolve_model_path(settings.engine_config())
        parent_hash, base_model = weights_hash(source_path), str(source_path)

    params_json = params.model_dump(mode="json")
    if not force:
        for earlier in reversed(checkpoints.list()):
            if (
                earlier.method == "teach"
                and earlier.data_hash == data_hash
                and earlier.parent_hash == parent_hash
                and earlier.params.get("teach") == params_json
            ):
                progress.log(f"reusing {earlier.id}: same data, source weights and hyperparameters")
                progress.update(1.0, f"reused checkpoint {earlier.id}")
                return earlier, True

    def step(fraction: float, message: str) -> None:
        if cancelled():
            raise UnlearnCancelled("cancelled; nothing was written")
        progress.update(min(max(fraction, 0.0), 1.0), message)

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    step(0.0, f"loading {source_path}")
    tokenizer = AutoTokenizer.from_pretrained(source_path)
    model = AutoModelForCausalLM.from_pretrained(source_path, dtype=torch.float32)
    model.eval()
    timings["load"] = time.perf_counter() - started
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    progress.log(
        f"source: {parent.id if parent else source_path} ({timings['load']:.1f} s to load);"
        f" {len(pairs)} pairs from {', '.join(str(p) for p in data)}"
    )

    curve_pairs = _sample(pairs, evaluation.curve_samples, evaluation.seed) if evaluation.enabled else []
    final_pairs = _sample(pairs, evaluation.final_samples, evaluation.seed) if evaluation.enabled else []

    def taught_recall(chosen: Sequence[QAPair], report: Callable[[float, str], None]) -> dict[str, Any]:
        answers = greedy_answers(
            model,
            tokenizer,
            [p.question for p in chosen],
            max_new_tokens=evaluation.max_new_tokens,
            batch_size=evaluation.batch_size,
            step=report,
        )
        return recall_by_group(chosen, answers)

    plan = None
    if (
        data_dir is not None
        and evaluation.enabled
        and (evaluation.utility_samples or evaluation.instruction_samples)
    ):
        options = EvaluationOptions(
            utility_samples=evaluation.utility_samples,
            muse_samples=0,
            instruction_samples=evaluation.instruction_samples,
            batch_size=evaluation.batch_size,
            seed=evaluation.seed,
        )
        plan = build_plan([], [], data_dir, options)
        if not plan.probes:
            plan = None

    def utility(report: Callable[[float, str], None], cache_for: str | None = None) -> dict[str, Any]:
        if plan is None:
            return {}
        cache = checkpoints.root / EVAL_CACHE / f"{plan_key(plan, cache_for)}.json" if cache_for else None
        if cache is not None and cache.is_file():
            measured = Measurement.model_validate_json(cache.read_text())
        else:
            measured = measure(model, tokenizer, plan, step=report)
            if cache is not None:
                cache.parent.mkdir(exist_ok=True)
                temp = cache.with_suffix(f".{os.getpid()}.tmp")
                temp.write_text(measured.model_dump_json())
                os.replace(temp, cache)
        return {"utility_recall": measured.utility_recall, "fluency": measured.fluency}

    before: dict[str, Any] = {}
    if evaluation.enabled:
        started = time.perf_counter()
        stage = sub_step(step, *_STAGES["before"])
        if curve_pairs:
            before["taught"] = taught_recall(curve_pairs, sub_step(stage, 0.0, 0.5))
        before |= utility(sub_step(stage, 0.5, 1.0), cache_for=parent_hash)
        timings["evaluation_before"] = time.perf_counter() - started
        progress.log(f"before: {_brief(before)} ({timings['evaluation_before']:.0f} s)")

    sequences = teach_sequences(tokenizer, pairs, params.max_length)
    teach_step = sub_step(step, *_STAGES["teach"])

    def after_epoch(epoch: int) -> dict[str, Any]:
        measured: dict[str, Any] = {}
        if curve_pairs:
            measured["taught"] = taught_recall(curve_pairs, lambda _f, _m: None)
        if evaluation.curve_utility:
            measured |= utility(lambda _f, _m: None)
        if measured:
            progress.log(f"epoch {epoch}: {_brief(measured)}")
        return measured

    key = run_key(data_hash, parent_hash, params)
    resume = ResumeStore(settings.home / RUNS_FOLDER / key)
    started = time.perf_counter()
    report = run_teach(
        model, sequences, params, pad_id=pad_id, step=teach_step, after_epoch=after_epoch, resume=resume
    )
    timings["teach"] = time.perf_counter() - started
    progress.log(f"teach: {report.summary()} ({timings['teach']:.0f} s)")

    after: dict[str, Any] = {}
    if evaluation.enabled:
        started = time.perf_counter()
        stage = sub_step(step, *_STAGES["after"])
        after["taught"] = taught_recall(final_pairs, sub_step(stage, 0.0, 0.7))
        after |= utility(sub_step(stage, 0.7, 1.0))
        timings["evaluation_after"] = time.perf_counter() - started
        progress.log(f"after: {_brief(after)} ({timings['evaluation_after']:.0f} s)")

    step(0.99, "writing the checkpoint")
    started = time.perf_counter()
    subjects = sorted({p.subject for p in pairs if p.subject})
    from lethe.models.unlearning.data import texts_hash

    manifest = CheckpointManifest(
        id=new_checkpoint_id(),
        parent=parent.id if parent else None,
        parent_hash=parent_hash,
        base_model=base_model,
        method="teach",
        params={
            "teach": params_json,
            "data": [str(Path(p).expanduser()) for p in data],
            "evaluation": evaluation.model_dump(mode="json"),
        },
        targets=[],
        forget_hash=texts_hash([]),
        retain_hash=texts_hash([]),
        data_hash=data_hash,
        created=datetime.now(UTC),
        timings=timings,
        peak_rss_mb=_peak_rss_mb(),
        method_report={**report.model_dump(mode="json"), "subjects": subjects, "run_key": key},
        evaluation={"before": before, "after": after} if evaluation.enabled else None,
    )
    if cancelled():
        raise UnlearnCancelled("cancelled; nothing was written")
    manifest = checkpoints.write(model, tokenizer, manifest)
    resume.clear()
    timings["write"] = time.perf_counter() - started
    progress.log(f"wrote {checkpoints.path(manifest.id)} in {timings['write']:.1f} s")
    progress.update(1.0, f"wrote checkpoint {manifest.id}")
    return manifest, False


def _brief(measured: dict[str, Any]) -> str:
    parts = []
    taught = measured.get("taught")
    if taught:
        sources = ", ".join(f"{k} {v:.3f}" for k, v in taught["by_source"].items())
        parts.append(f"taught recall {taught['recall']:.3f} over {taught['n']} ({sources})")
    if measured.get("utility_recall") is not None:
        parts.append(f"utility recall {measured['utility_recall']:.3f}")
    if measured.get("fluency") is not None:
        parts.append(f"fluency {measured['fluency']:.3f}")
    return "; ".join(parts) or "nothing measured"


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "teach",
        help="fine-tune the model on question/answer pairs into a new checkpoint (build a test subject)",
        description="Fine-tune the served model on question/answer pairs (JSON: [{name, qa: [{question,"
        " answer}]}] as in tofu_authors, or [{question, answer}]), loss on the answers in the chat template,"
        " measure it before, after and per epoch, and write a checkpoint under LETHE_HOME/checkpoints."
        " A finished run with the same data, source and hyperparameters is reused; an interrupted one"
        " resumes from its last finished epoch.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--data", type=Path, action="append", metavar="FILE", help="question/answer JSON file (repeatable)"
    )
    what.add_argument(
        "--authors",
        action="store_true",
        help=f"teach every author of <eval data>/{AUTHORS_FOLDER} (forget and retain): the taught subject",
    )
    parser.add_argument(
        "--from-checkpoint",
        metavar="ID",
        help="source checkpoint id, or 'base' (default: the checkpoint the gateway serves, else the base)",
    )
    parser.add_argument("--out", type=Path, help="checkpoint store folder (default: LETHE_HOME/checkpoints)")
    parser.add_argument("--model", type=Path, help="base model folder (LETHE_MODEL; default: embedded)")
    parser.add_argument(
        "--eval-data",
        "--data-dir",
        dest="eval_data",
        type=Path,
        help="evaluation data folder (default: $LETHE_EVAL_DATA): tofu_authors for --authors, the TOFU"
        " utility sets and instructions for the before/after figures (without it, only the taught"
        " questions are measured)",
    )
    parser.add_argument("--force", action="store_true", help="train even if an identical run exists")
    evaluation = parser.add_argument_group("evaluation (does not change the weights)")
    evaluation.add_argument("--no-eval", action="store_true", help="skip every measurement")
    evaluation.add_argument(
        "--curve-utility",
        dest="eval__curve_utility",
        action="store_true",
        default=None,
        help=TeachEvaluation.model_fields["curve_utility"].description,
    )
    for name in (
        "curve_samples",
        "final_samples",
        "utility_samples",
        "instruction_samples",
        "max_new_tokens",
    ):
        field = TeachEvaluation.model_fields[name]
        flag = "eval-max-tokens" if name == "max_new_tokens" else name.replace("_", "-")
        evaluation.add_argument(
            f"--{flag}",
            dest=f"eval__{name}",
            type=int,
            metavar="N",
            help=f"{field.description} [default: {field.default}]",
        )
    add_param_flags(parser, TeachParams, "hyperparameters")
    parser.set_defaults(run=run)


def authors_files(data_dir: Path | None) -> list[Path]:
    if data_dir is None:
        raise ValueError(f"--authors needs the evaluation data: pass --eval-data or set ${EVAL_DATA_ENV}")
    folder = data_dir / AUTHORS_FOLDER
    files = [folder / name for name in AUTHORS_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(
            f"--authors: {', '.join(missing)} not found; pass --eval-data or set LETHE_EVAL_DATA to the"
            " folder that holds tofu_authors/"
        )
    return files


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from rich.console import Console

    from lethe.gateway.cli.progress import RichProgress
    from lethe.gateway.config import Settings
    from lethe.models.checkpoints import CheckpointStore
    from lethe.models.unlearning.progress import UnlearnCancelled

    console = Console(stderr=True)
    try:
        params = TeachParams(**param_values(args))
        evaluation = TeachEvaluation(enabled=not args.no_eval, **param_values(args, "eval__"))
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        console.print(f"[red]error:[/red] invalid arguments: {problems}")
        return EXIT_BAD_REQUEST
    settings = Settings(**({"model": args.model} if args.model else {}))
    data_dir = eval_data_dir(args.eval_data)
    from_checkpoint = args.from_checkpoint
    if from_checkpoint is None and args.out is None:
        from_checkpoint = _serving(settings)
    try:
        data = authors_files(data_dir) if args.authors else list(args.data)
        checkpoints = CheckpointStore(args.out or settings.home / "checkpoints")
        with RichProgress(console) as progress:
            manifest, reused = run_teaching(
                data,
                params,
                settings=settings,
                progress=progress,
                checkpoints=checkpoints,
                from_checkpoint=from_checkpoint,
                data_dir=data_dir,
                evaluation=evaluation,
                force=args.force,
            )
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}")
        return EXIT_BAD_REQUEST
    except UnlearnCancelled as error:
        console.print(f"[yellow]{error}[/yellow]")
        return 1
    print_teach_summary(Console(stderr=True), manifest, checkpoints.path(manifest.id), reused)
    json.dump({"id": manifest.id, "path": str(checkpoints.path(manifest.id)), "reused": reused}, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _serving(settings: Settings) -> str | None:
    """The checkpoint the gateway serves, as `lethe unlearn` starts from it (None: the base model)."""
    from lethe.gateway.store import BASE_CHECKPOINT, open_store

    store = open_store(settings)
    try:
        serving = store.serving_checkpoint().checkpoint
    finally:
        store.close()
    return None if serving == BASE_CHECKPOINT else serving


def print_teach_summary(console: Any, manifest: CheckpointManifest, path: Path, reused: bool) -> None:
    console.print(f"checkpoint [bold]{manifest.id}[/bold] at {path}" + (" (reused)" if reused else ""))
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in manifest.timings.items())
    console.print(f"timings: {timings}; peak RSS {manifest.peak_rss_mb or 0:.0f} MB")
    for epoch in manifest.method_report.get("epochs", []):
        console.print(f"epoch {epoch['epoch']}: loss {epoch['loss']:.4f}; {_brief(epoch['evaluation'])}")
    if manifest.evaluation:
        console.print(f"before: {_brief(manifest.evaluation['before'])}")
        console.print(f"after:  {_brief(manifest.evaluation['after'])}")
