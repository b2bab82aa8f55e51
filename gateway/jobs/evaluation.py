"""The before/after evaluation of an unlearning run, in-process on the model in memory.

RWKU probes (forget and neighbour, levels 1-2), TOFU utility questions, MUSE KnowMem questions and
general instructions (fluency) are built and scored exactly as `lethe eval` builds and scores them
(suites, prompts, scoring); only the transport differs: plain batched greedy `generate` instead of
HTTP. Membership inference compares the target's forget texts with retain texts (RWKU's
forget_mia/retain_mia where the target has an RWKU folder; otherwise its documents against the
retain corpus, which differs in style, so only the before/after change of that AUC is meaningful).
Sample sizes keep the cost bounded."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lethe.evaluation import metrics, scoring, suites
from lethe.evaluation.client import Completion
from lethe.evaluation.datasets import RwkuTarget
from lethe.evaluation.records import Probe
from lethe.gateway.jobs.data import ResolvedTarget
from lethe.models.unlearning.data import texts_hash
from lethe.models.unlearning.generation import greedy_answers
from lethe.models.unlearning.mia import MIA_SCORES, membership_scores, mia_aucs
from lethe.models.unlearning.progress import StepCallback, no_progress, sub_step

FORGET_SPLITS = ("forget_level1", "forget_level2")
NEIGHBOUR_SPLITS = ("neighbor_level1", "neighbor_level2")


class EvaluationOptions(BaseModel):
    enabled: bool = True
    samples: int = Field(
        10, ge=1, description="probes per RWKU split (forget/neighbour, levels 1-2) per target"
    )
    utility_samples: int = Field(16, ge=0, description="questions per TOFU utility set (0: none)")
    muse_samples: int = Field(
        16, ge=0, description="MUSE KnowMem questions per split, forget and retain (0: none)"
    )
    instruction_samples: int = Field(
        16, ge=0, description="general instructions whose answers' n-gram entropy is the fluency (0: none)"
    )
    mia_samples: int = Field(24, ge=2, description="texts per side of each membership-inference AUC")
    mia_max_length: int = Field(256, ge=8, description="tokens per membership-inference text")
    max_new_tokens: int = Field(32, ge=1)
    instruction_max_new_tokens: int = Field(
        128, ge=1, description="answer length for the instructions (`lethe eval --instruction-max-tokens`)"
    )
    batch_size: int = Field(16, ge=1)
    seed: int = 0


class Snapshot(BaseModel):
    forget_recall: float | None = None
    """ROUGE-L recall of the gold answers over forget levels 1-2 (pooled)."""
    forget_new_word_recall: float | None = None
    """The same probes' new-word recall (`lethe eval`'s: the gold's words the question does not give),
    here and for the neighbours: ROUGE-L recall also credits an answer for echoing the question."""
    neighbour_recall: float | None = None
    neighbour_new_word_recall: float | None = None
    mia_auc: dict[str, float] = Field(default_factory=dict)


class BeforeAfter(BaseModel):
    before: Snapshot
    after: Snapshot


class Evaluation(BaseModel):
    targets: dict[str, BeforeAfter]
    mean: BeforeAfter
    """Means over the targets (each target weighs the same, as RWKU averages)."""
    utility_recall: dict[str, float | None]
    """TOFU world facts and real authors recall pooled: `before` and `after`."""
    fluency: dict[str, float | None] = Field(default_factory=dict)
    """Mean n-gram entropy of the answers to general instructions, `lethe eval`'s fluency: `before`
    and `after` (empty in manifests written before it was measured)."""
    muse_knowmem_forget: dict[str, float | None] = Field(default_factory=dict)
    """MUSE-Books KnowMem ROUGE-L F1 on its forget questions: `before` and `after`. Harry Potter is
    not a target of an unlearning job here, so both MUSE splits show collateral change."""
    muse_knowmem_retain: dict[str, float | None] = Field(default_factory=dict)
    probes: int
    mia_texts: int
    seconds: float
    """Wall time of both measurements."""
    options: EvaluationOptions


@dataclass(frozen=True)
class _MiaSet:
    forget: list[str]
    retain: list[str]


@dataclass(frozen=True)
class EvaluationPlan:
    """Everything measured before and after; built once so both runs see the same items."""

    probes: list[Probe]
    mia: dict[str, _MiaSet]
    names: dict[str, str]
    """Probe target key (RWKU folder name) -> target name."""
    options: EvaluationOptions


MEASUREMENT_FORMAT = 3
"""Raised when a measurement gains a metric, so that a cached one without it is not reused."""


def plan_key(plan: EvaluationPlan, weights: str) -> str:
    """Identifies a measurement: the weights measured, exactly what was asked of them, and the
    metrics it holds."""
    content = {
        "format": MEASUREMENT_FORMAT,
        "weights": weights,
        "probes": [p.model_dump(mode="json") for p in plan.probes],
        "mia": {name: [m.forget, m.retain] for name, m in plan.mia.items()},
        "options": plan.options.model_dump(mode="json", exclude={"enabled"}),
    }
    return texts_hash([json.dumps(content, sort_keys=True)])


def _sample(texts: Sequence[str], n: int, seed: int) -> list[str]:
    chosen = list(texts)
    random.Random(seed).shuffle(chosen)
    return chosen[:n]


def build_plan(
    targets: Sequence[ResolvedTarget],
    retain_texts: Sequence[str],
    data_dir: Path | None,
    options: EvaluationOptions,
) -> EvaluationPlan:
    probes: list[Probe] = []
    mia: dict[str, _MiaSet] = {}
    names: dict[str, str] = {}
    for target in targets:
        name = target.forget.name
        folder = target.rwku_folder
        if folder is not None:
            selection = _selection(
                options,
                options.samples,
                [RwkuTarget(folder=folder.name, name=name, intro="", passages=[])],
            )
            probes += suites.rwku_probes(folder.parent.parent, selection)
            names[folder.name] = name
            forget_mia = [r["text"] for r in _json_rows(folder / "forget_mia.json")]
            retain_mia = [r["text"] for r in _json_rows(folder / "retain_mia.json")]
        else:
            forget_mia, retain_mia = list(target.forget.documents), list(retain_texts)
        if forget_mia and retain_mia:
            mia[name] = _MiaSet(
                forget=_sample(forget_mia, options.mia_samples, options.seed),
                retain=_sample(retain_mia, options.mia_samples, options.seed),
            )
    general = (
        (options.utility_samples, "tofu", suites.tofu_probes),
        (options.muse_samples, "muse_books", suites.muse_probes),
        (options.instruction_samples, "general", suites.instruction_probes),
    )
    for sample, folder, builder in general:
        if sample and data_dir is not None and (data_dir / folder).is_dir():
            probes += builder(data_dir, _selection(options, sample))
    return EvaluationPlan(probes=probes, mia=mia, names=names, options=options)


def _selection(
    options: EvaluationOptions, sample: int, targets: Sequence[RwkuTarget] = ()
) -> suites.Selection:
    return suites.Selection(
        suites=["rwku"] if targets else [],
        targets=list(targets),
        levels=[1, 2],
        sample=sample,
        max_tokens=options.max_new_tokens,
        instruction_max_tokens=options.instruction_max_new_tokens,
    )


def _json_rows(path: Path) -> list[dict[str, str]]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


class Measurement(BaseModel):
    per_target: dict[str, Snapshot]
    utility_recall: float | None
    fluency: float | None = None
    muse_knowmem: dict[str, float | None] = Field(default_factory=dict)
    """MUSE split (`forget`, `retain`) -> KnowMem ROUGE-L F1."""


def measure(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan: EvaluationPlan,
    *,
    step: StepCallback = no_progress,
) -> Measurement:
    """Greedy answers scored as `lethe eval` scores them, and membership-inference AUCs."""
    mia_texts = sum(len(m.forget) + len(m.retain) for m in plan.mia.values())
    answer_share = len(plan.probes) / max(len(plan.probes) + mia_texts, 1)
    answers = _answers(
        model, tokenizer, plan.probes, plan.options.batch_size, sub_step(step, 0.0, answer_share)
    )
    records = [
        scoring.score_answer(p, Completion(output=a)) for p, a in zip(plan.probes, answers, strict=True)
    ]
    summary = scoring.summarise(records)
    per_target = {name: Snapshot() for name in {*plan.names.values(), *plan.mia}}
    for folder, splits in summary.rwku_targets.items():
        snapshot = per_target[plan.names[folder]]
        forget = [splits[s] for s in FORGET_SPLITS if s in splits]
        neighbours = [splits[s] for s in NEIGHBOUR_SPLITS if s in splits]
        snapshot.forget_recall = scoring.pooled(forget)
        snapshot.forget_new_word_recall = scoring.pooled(forget, "new_word_recall")
        snapshot.neighbour_recall = scoring.pooled(neighbours)
        snapshot.neighbour_new_word_recall = scoring.pooled(neighbours, "new_word_recall")
    mia_step = sub_step(step, answer_share, 1.0)
    for index, (name, texts) in enumerate(plan.mia.items()):
        scores = membership_scores(
            model,
            tokenizer,
            texts.forget + texts.retain,
            max_length=plan.options.mia_max_length,
            step=sub_step(mia_step, index / len(plan.mia), (index + 1) / len(plan.mia)),
        )
        per_target[name].mia_auc = mia_aucs(scores[: len(texts.forget)], scores[len(texts.forget) :])
    instructions = summary.utility.get("instructions")
    return Measurement(
        per_target=per_target,
        utility_recall=scoring.pooled(summary.utility.values()),
        fluency=instructions.entropy if instructions is not None else None,
        muse_knowmem={
            split: summary.muse[f"knowmem_{split}"].rouge_l_f1
            for split in suites.MUSE_SPLITS
            if f"knowmem_{split}" in summary.muse
        },
    )


def _answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    probes: Sequence[Probe],
    batch_size: int,
    step: StepCallback,
) -> list[str]:
    """Greedy answers, one pass per answer length: instructions are answered at length, QA probes
    briefly. Progress is shared by the tokens each pass may generate."""
    answers = [""] * len(probes)
    total = sum(p.max_tokens for p in probes) or 1
    done = 0
    for length in sorted({p.max_tokens for p in probes}):
        indices = [i for i, p in enumerate(probes) if p.max_tokens == length]
        share = length * len(indices)
        part = greedy_answers(
            model,
            tokenizer,
            [probes[i].prompt for i in indices],
            max_new_tokens=length,
            batch_size=batch_size,
            step=sub_step(step, done / total, (done + share) / total),
        )
        for index, answer in zip(indices, part, strict=True):
            answers[index] = answer
        done += share
    return answers


def mean_snapshot(snapshots: Sequence[Snapshot]) -> Snapshot:
    """Each target weighs the same, as RWKU averages."""
    return Snapshot(
        forget_recall=metrics.mean(s.forget_recall for s in snapshots),
        forget_new_word_recall=metrics.mean(s.forget_new_word_recall for s in snapshots),
        neighbour_recall=metrics.mean(s.neighbour_recall for s in snapshots),
        neighbour_new_word_recall=metrics.mean(s.neighbour_new_word_recall for s in snapshots),
        mia_auc={
            name: value
            for name in MIA_SCORES
            if (value := metrics.mean(s.mia_auc.get(name) for s in snapshots)) is not None
        },
    )


def _before_after(
    before: Measurement, after: Measurement, value: Callable[[Measurement], float | None]
) -> dict[str, float | None]:
    return {"before": value(before), "after": value(after)}


def combine(plan: EvaluationPlan, before: Measurement, after: Measurement, seconds: float) -> Evaluation:
    targets = {
        name: BeforeAfter(before=before.per_target[name], after=after.per_target[name])
        for name in before.per_target
    }
    return Evaluation(
        targets=targets,
        mean=BeforeAfter(
            before=mean_snapshot([t.before for t in targets.values()]),
            after=mean_snapshot([t.after for t in targets.values()]),
        ),
        utility_recall=_before_after(before, after, lambda m: m.utility_recall),
        fluency=_before_after(before, after, lambda m: m.fluency),
        muse_knowmem_forget=_before_after(before, after, lambda m: m.muse_knowmem.get("forget")),
        muse_knowmem_retain=_before_after(before, after, lambda m: m.muse_knowmem.get("retain")),
        probes=len(plan.probes),
        mia_texts=sum(len(m.forget) + len(m.retain) for m in plan.mia.values()),
        seconds=seconds,
        options=plan.options,
    )
