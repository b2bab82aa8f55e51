"""Running an unlearning job: targets and source resolved, data built, the method run with
progress and cancellation, the model evaluated before and after, the checkpoint written atomically.

The job worker and `lethe unlearn` both call `run_unlearning`; the cheap checks it starts with
(targets, starting checkpoint) are `lethe.gateway.jobs.validation`, which the job API runs at
submission without importing this module, so that bad requests get a 4xx before they queue.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lethe.gateway.config import Settings
from lethe.gateway.jobs.data import ResolvedTarget, resolve_targets, retain_corpus
from lethe.gateway.jobs.evaluation import (
    EvaluationOptions,
    EvaluationPlan,
    Measurement,
    build_plan,
    combine,
    measure,
    plan_key,
)
from lethe.gateway.jobs.validation import checkpoint_manifest
from lethe.gateway.store import Store
from lethe.models.checkpoints import CheckpointManifest, CheckpointStore, new_checkpoint_id, weights_hash
from lethe.models.loading import resolve_model_path
from lethe.models.unlearning.data import (
    RetainItem,
    flat_pairs,
    forget_texts,
    retain_sequences,
    retain_texts,
    ssd_sequences,
    texts_hash,
)
from lethe.models.unlearning.flat import FLATReport, run_flat
from lethe.models.unlearning.neighbours import (
    HELD_OUT_NEIGHBOURS,
    NEIGHBOUR_ANSWER_TOKENS,
    NeighbourItem,
    neighbour_checks,
    neighbour_retain,
)
from lethe.models.unlearning.progress import StepCallback, UnlearnCancelled, sub_step
from lethe.models.unlearning.spec import FLATParams, SSDParams, UnlearnJob
from lethe.models.unlearning.ssd import SSDReport, run_ssd

__all__ = ["ProgressSink", "UnlearnCancelled", "run_unlearning"]

EVAL_CACHE = ".eval-cache"
# Share of the job's progress bar per stage (the method dominates; evaluation is bounded).
_STAGES = {"load": (0.0, 0.03), "before": (0.03, 0.18), "method": (0.18, 0.85), "after": (0.85, 0.97)}
_NEIGHBOUR_SHARE = 0.4
"""Of the method's stage, the part that writing the neighbour descriptions takes when asked for."""


class ProgressSink(Protocol):
    def update(self, fraction: float, message: str) -> None:
        """`fraction` of the whole job done, in [0, 1]."""

    def log(self, line: str) -> None: ...


@dataclass(frozen=True)
class _Source:
    path: Path
    parent: CheckpointManifest | None
    parent_hash: str
    base_model: str


def _source(spec: UnlearnJob, settings: Settings, checkpoints: CheckpointStore) -> _Source:
    if spec.from_checkpoint is not None:
        parent = checkpoint_manifest(checkpoints, spec.from_checkpoint)
        return _Source(checkpoints.path(parent.id), parent, parent.weights_hash, parent.base_model)
    path = resolve_model_path(settings.engine_config())
    return _Source(path, None, weights_hash(path), str(path))


def _stepper(progress: ProgressSink, cancelled: Callable[[], bool]) -> StepCallback:
    def step(fraction: float, message: str) -> None:
        if cancelled():
            raise UnlearnCancelled("cancelled; nothing was written")
        progress.update(min(max(fraction, 0.0), 1.0), message)

    return step


def _device(name: str) -> torch.device:
    """The job's device; a GPU that torch cannot see is a clear error before anything is loaded."""
    device = torch.device(name)
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise ValueError(
            f"LETHE_UNLEARN_DEVICE={name}, but torch sees {torch.cuda.device_count()} GPU(s)"
            f" (torch {torch.__version__}); use cpu or a CUDA build of torch"
        )
    return device


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_unlearning(
    spec: UnlearnJob,
    *,
    settings: Settings,
    store: Store,
    progress: ProgressSink,
    cancelled: Callable[[], bool],
    checkpoints: CheckpointStore | None = None,
    data_dir: Path | None = None,
    evaluation: EvaluationOptions | None = None,
) -> CheckpointManifest:
    """Run one job to a written checkpoint and return its manifest.

    `data_dir` is the evaluation data (default: the `eval_data` setting, LETHE_EVAL_DATA). Raises
    ValueError for a job that cannot run (unknown targets or checkpoint, missing retain data for
    SSD) and UnlearnCancelled when `cancelled()` turns true (checked between steps).
    """
    params = spec.params
    data_dir = data_dir or settings.eval_data
    evaluation = evaluation or EvaluationOptions()
    checkpoints = checkpoints or CheckpointStore(settings.home / "checkpoints")
    targets = resolve_targets(spec.targets, store, data_dir)
    source = _source(spec, settings, checkpoints)
    retain = retain_corpus(data_dir)
    if isinstance(params, SSDParams) and not retain:
        raise ValueError(
            f"SSD needs retain data: none found under {data_dir or 'the evaluation data (none configured)'}"
            " (TOFU world facts / real authors, general instructions); set LETHE_EVAL_DATA to a folder"
            " that has them"
        )
    device = _device(settings.unlearn_device)
    step = _stepper(progress, cancelled)
    timings: dict[str, float] = {}
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)

    started = time.perf_counter()
    step(0.0, f"loading {source.path}")
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).to(device)
    model.eval()
    timings["load"] = time.perf_counter() - started
    progress.log(
        f"source: {source.parent.id if source.parent else source.path} ({timings['load']:.1f} s to load,"
        f" on {device})"
    )

    plan = build_plan(targets, retain_texts(retain), data_dir, evaluation) if evaluation.enabled else None
    before = None
    if plan is not None:
        started = time.perf_counter()
        before_step = sub_step(step, *_STAGES["before"])
        before = _measure_source(model, tokenizer, plan, source, checkpoints, before_step)
        timings["evaluation_before"] = time.perf_counter() - started
        progress.log(
            f"evaluated the source: {len(plan.probes)} probes in {timings['evaluation_before']:.0f} s"
        )

    started = time.perf_counter()
    method_step = sub_step(step, *_STAGES["method"])
    held_out_per_target = (
        HELD_OUT_NEIGHBOURS if isinstance(params, FLATParams) and params.keep_neighbours else 0
    )
    described: list[NeighbourItem] = []
    if params.neighbours or held_out_per_target:
        described = neighbour_retain(
            model,
            tokenizer,
            [t.forget for t in targets],
            per_target=params.neighbours + held_out_per_target,
            max_new_tokens=NEIGHBOUR_ANSWER_TOKENS,
            step=sub_step(method_step, 0.0, _NEIGHBOUR_SHARE),
        )
        method_step = sub_step(method_step, _NEIGHBOUR_SHARE, 1.0)
    neighbours = [item for item in described if item.rank < params.neighbours]
    held_out = [item for item in described if item.rank >= params.neighbours]
    if described:
        checked = f", {len(held_out)} held out for the stopping check" if held_out else ""
        progress.log(
            f"{len(neighbours)} neighbour descriptions for the retain data{checked}"
            f" ({time.perf_counter() - started:.0f} s)"
        )
    report = _run_method(model, tokenizer, params, targets, retain, neighbours, held_out, method_step)
    timings["method"] = time.perf_counter() - started
    progress.log(f"{spec.method}: {report.summary()} ({timings['method']:.0f} s)")

    evaluation_summary = None
    if plan is not None and before is not None:
        started = time.perf_counter()
        after = measure(model, tokenizer, plan, step=sub_step(step, *_STAGES["after"]))
        timings["evaluation_after"] = time.perf_counter() - started
        seconds = timings["evaluation_before"] + timings["evaluation_after"]
        evaluation_summary = combine(plan, before, after, seconds).model_dump(mode="json")

    used_retain = [*retain, *described] if isinstance(params, SSDParams) else described
    step(0.97, "writing the checkpoint")
    started = time.perf_counter()
    manifest = CheckpointManifest(
        id=new_checkpoint_id(),
        parent=source.parent.id if source.parent else None,
        parent_hash=source.parent_hash,
        base_model=source.base_model,
        method=spec.method,
        params=params.model_dump(mode="json", by_alias=True),
        targets=[t.forget.name for t in targets],
        forget_hash=texts_hash(forget_texts([t.forget for t in targets])),
        retain_hash=texts_hash(retain_texts(used_retain)),
        created=datetime.now(UTC),
        timings=timings,
        peak_rss_mb=_peak_rss_mb(),
        method_report=report.model_dump(mode="json"),
        evaluation=evaluation_summary,
    )
    if cancelled():
        raise UnlearnCancelled("cancelled; nothing was written")
    manifest = checkpoints.write(model, tokenizer, manifest)
    progress.log(f"wrote {checkpoints.path(manifest.id)} in {time.perf_counter() - started:.1f} s")
    progress.update(1.0, f"wrote checkpoint {manifest.id}")
    return manifest


def _measure_source(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan: EvaluationPlan,
    source: _Source,
    checkpoints: CheckpointStore,
    step: StepCallback,
) -> Measurement:
    """The source model's measurement, reused from an earlier run on the same weights and plan.

    Tuning runs one source many times; its "before" costs as much as its "after", and greedy
    decoding makes it the same every time. Cached under the store's hidden `.eval-cache/`.
    """
    cache = checkpoints.root / EVAL_CACHE / f"{plan_key(plan, source.parent_hash)}.json"
    if cache.is_file():
        return Measurement.model_validate_json(cache.read_text())
    measurement = measure(model, tokenizer, plan, step=step)
    cache.parent.mkdir(exist_ok=True)
    temp = cache.with_suffix(f".{os.getpid()}.tmp")
    temp.write_text(measurement.model_dump_json())
    os.replace(temp, cache)
    return measurement


def _run_method(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    params: SSDParams | FLATParams,
    targets: list[ResolvedTarget],
    retain: list[RetainItem],
    neighbours: list[NeighbourItem],
    held_out: list[NeighbourItem],
    step: StepCallback,
) -> SSDReport | FLATReport:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sets = [t.forget for t in targets]
    if isinstance(params, SSDParams):
        forget, retained = ssd_sequences(tokenizer, sets, retain, params, neighbours)
        return run_ssd(model, forget, retained, params, pad_id=pad_id, step=step)
    pairs = flat_pairs(
        tokenizer, sets, max_length=params.max_length, limit=params.forget_samples, seed=params.seed
    )
    kept = retain_sequences(
        tokenizer, neighbours, max_length=params.max_length, limit=len(neighbours), seed=params.seed
    )
    checks = neighbour_checks(tokenizer, held_out, sets, seed=params.seed)
    return run_flat(model, pairs, params, pad_id=pad_id, retain=kept, checks=checks, step=step)
