"""From answers to numbers: scoring each answer, then the means that the report tabulates.

Summaries are always recomputed from the records, for this run and for a `--compare` baseline
alike, so a baseline file written by an older version is summarised the same way as today's run.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from lethe.evaluation import metrics, prompts
from lethe.evaluation.client import Completion
from lethe.evaluation.records import GroupScore, Probe, ProbeResult, Scores, Summary

KNOWN_FLOOR = 0.05
"""Below this unguarded score a target counts as never known ("near zero"): forget level-1/2
ROUGE-L recall for an RWKU target, forget KnowMem F1 for MUSE. The data README puts the embedded
model at about 0.12 over all 100 RWKU targets; under 0.05 its answers share no more than an
incidental word with the gold, so a drop after registration cannot be told from noise.
"""

FORGET_SPLITS = ("forget", "knowmem_forget")
"""Splits whose probes ask about a forget target (the others must not fire one)."""

NEIGHBOUR_SPLIT = "neighbor"
"""Prefix of RWKU's neighbour splits: questions about what surrounds a target."""

STEMMED_SUITES = {"rwku": True, "muse": False, "utility": True, "authors": True}
"""MUSE scores without a stemmer; RWKU and TOFU recall (utility and authors) with it (see metrics)."""

AUTHOR_SPLITS = ("forget_unseen", "forget_seen", "forget_indirect", "retain_unseen", "retain_seen")
"""The authors suite's groups, in report order (`forget_indirect` is derived, see `is_indirect`)."""


_WORD = re.compile(r"\w+")


def answered_by_subject(probe: Probe) -> bool:
    """Whether a neighbour probe's gold answer is the forget target's name or part of it: RWKU asks
    Leonardo da Vinci's neighbours "The Mona Lisa is by Italian artist ___ da Vinci" and Paris
    Hilton's "Carter Reum is known for his marriage to ___ Hilton". A guard that never lets the
    target's name through must score zero there, so the report also shows neighbours without them."""
    if probe.subject is None or probe.answer is None or not probe.split.startswith(NEIGHBOUR_SPLIT):
        return False
    answer = {word.casefold() for word in _WORD.findall(probe.answer)}
    return bool(answer) and answer <= {word.casefold() for word in _WORD.findall(probe.subject)}


def is_indirect(probe: Probe) -> bool:
    """An authors-suite forget question that does not name its author: no word of the name (split at
    spaces, hyphens and punctuation, any case) in the prompt. TOFU's first question of each author
    describes them instead ("the author born in Taipei on 05/11/1991...")."""
    if probe.suite != "authors" or not probe.split.startswith("forget") or probe.subject is None:
        return False
    prompt = {word.casefold() for word in _WORD.findall(probe.prompt)}
    return not any(word.casefold() in prompt for word in _WORD.findall(probe.subject))


def _contains(probe: Probe, answer: str, text: str) -> bool:
    if probe.suite == "authors":
        return metrics.states_fact(answer, text, probe.prompt, stemmer=STEMMED_SUITES[probe.suite])
    return metrics.contains_phrase(text, answer)


def _detected(probe: Probe, fired: list[str] | None) -> bool | None:
    if fired is None:
        return None
    if probe.subject is not None and probe.split.startswith(FORGET_SPLITS):
        return probe.subject in fired
    return bool(fired)


def score_answer(probe: Probe, completion: Completion, fired: list[str] | None = None) -> ProbeResult:
    """Score one answer; `fired` names the targets the server's guard fired on it, if known."""
    text = prompts.cut_at_stops(completion.output, probe.stop)
    scores = Scores()
    if completion.error is None:
        if probe.answer is not None:
            rouge = metrics.rouge_l(probe.answer, text, stemmer=STEMMED_SUITES[probe.suite])
            scores = Scores(
                rouge_l_recall=rouge.recall,
                rouge_l_f1=rouge.f1,
                new_word_recall=metrics.new_word_recall(
                    probe.answer, text, probe.prompt, stemmer=STEMMED_SUITES[probe.suite]
                ),
                contains_answer=_contains(probe, probe.answer, text),
                names_subject=(
                    metrics.says_name(text, probe.subject)
                    if probe.subject is not None and probe.split.startswith(FORGET_SPLITS)
                    else None
                ),
            )
        else:
            scores = Scores(entropy=metrics.ngram_entropy(text))
        scores.detected = _detected(probe, fired)
    return ProbeResult(
        **probe.model_dump(),
        output=completion.output,
        scored_text=text,
        finish_reason=completion.finish_reason,
        error=completion.error,
        fired=fired,
        scores=scores,
    )


def rescore(record: ProbeResult) -> ProbeResult:
    """`record` scored again from its prompt, answer and output: a baseline written by an older
    version gains the metrics added since and is scored exactly as this run is."""
    probe = Probe.model_validate(record.model_dump(include=set(Probe.model_fields)))
    completion = Completion(output=record.output, finish_reason=record.finish_reason, error=record.error)
    return score_answer(probe, completion, record.fired)


def group_score(
    records: Sequence[ProbeResult], baseline: Mapping[str, ProbeResult] | None = None
) -> GroupScore:
    """Means over the records that got an answer; failed requests are only counted."""
    ok = [r for r in records if r.error is None]
    agreement = None
    if baseline is not None:
        agreement = metrics.agreement(
            (r.output, baseline[r.id].output) for r in ok if r.id in baseline and baseline[r.id].error is None
        )
    return GroupScore(
        n=len(records),
        errors=len(records) - len(ok),
        rouge_l_recall=metrics.mean(r.scores.rouge_l_recall for r in ok),
        rouge_l_f1=metrics.mean(r.scores.rouge_l_f1 for r in ok),
        new_word_recall=metrics.mean(r.scores.new_word_recall for r in ok),
        contain_rate=metrics.mean(r.scores.contains_answer for r in ok),
        name_share=metrics.mean(r.scores.names_subject for r in ok),
        entropy=metrics.mean(r.scores.entropy for r in ok),
        detection_rate=metrics.mean(r.scores.detected for r in ok),
        agreement=agreement,
    )


def macro_mean(groups: Iterable[GroupScore]) -> GroupScore:
    """Each group weighs the same, whatever its size: RWKU's average over targets."""
    groups = list(groups)
    fields = (
        "rouge_l_recall",
        "rouge_l_f1",
        "new_word_recall",
        "contain_rate",
        "name_share",
        "entropy",
        "detection_rate",
        "agreement",
    )
    return GroupScore(
        n=sum(g.n for g in groups),
        errors=sum(g.errors for g in groups),
        **{f: metrics.mean(getattr(g, f) for g in groups) for f in fields},
    )


def pooled(groups: Iterable[GroupScore], field: str = "rouge_l_recall") -> float | None:
    """A mean over the union of several groups, each weighted by its answered probes."""
    weighted = [(getattr(g, field), g.n - g.errors) for g in groups if getattr(g, field) is not None]
    total = sum(n for _, n in weighted)
    return sum(value * n for value, n in weighted) / total if total else None


def _by(records: Iterable[ProbeResult], key: str) -> dict[str, list[ProbeResult]]:
    groups: dict[str, list[ProbeResult]] = defaultdict(list)
    for record in records:
        groups[getattr(record, key)].append(record)
    return dict(groups)


def _author_groups(records: Sequence[ProbeResult]) -> dict[str, list[ProbeResult]]:
    """Split -> records, with `forget_indirect` added (those records also stay in their own half)."""
    groups = _by(records, "split")
    indirect = [r for r in records if is_indirect(r)]
    if indirect:
        groups["forget_indirect"] = indirect
    return {split: groups[split] for split in AUTHOR_SPLITS if split in groups}


def _authors_relative(
    current: Mapping[str, GroupScore], records: Sequence[ProbeResult], by_id: Mapping[str, ProbeResult]
) -> dict[str, float | None]:
    """Per split, this run's recall over the baseline's on the same probes (None when the baseline's
    is zero or missing)."""
    base = {
        split: group_score([by_id[r.id] for r in rows if r.id in by_id])
        for split, rows in _author_groups(records).items()
    }
    relative: dict[str, float | None] = {}
    for split, group in current.items():
        before = base[split].rouge_l_recall if split in base else None
        relative[split] = (
            group.rouge_l_recall / before if group.rouge_l_recall is not None and before else None
        )
    return relative


def unknown_targets(summary: Summary) -> list[str]:
    """RWKU targets whose unguarded forget level-1/2 recall is under `KNOWN_FLOOR`."""
    unknown = []
    for target, splits in summary.rwku_targets.items():
        recall = pooled(splits[s] for s in ("forget_level1", "forget_level2") if s in splits)
        if recall is not None and recall < KNOWN_FLOOR:
            unknown.append(target)
    return unknown


def summarise(
    records: Sequence[ProbeResult],
    baseline: Sequence[ProbeResult] | None = None,
    *,
    is_baseline: bool = False,
) -> Summary:
    """Tables of means. `baseline` adds agreement and decides which targets were never known;
    without one, `is_baseline` says that this run itself measured the unguarded model."""
    by_id = {r.id: r for r in baseline} if baseline is not None else None
    suites = _by(records, "suite")
    rwku = suites.get("rwku", [])
    targets = {
        target: {split: group_score(rows, by_id) for split, rows in _by(target_rows, "split").items()}
        for target, target_rows in _by(rwku, "target").items()
    }
    splits = sorted({split for per_target in targets.values() for split in per_target})
    level3 = [r for r in rwku if r.attack is not None]
    others = [r for r in rwku if r.split.startswith(NEIGHBOUR_SPLIT) and not answered_by_subject(r)]
    summary = Summary(
        rwku_targets=targets,
        rwku_subjects={r.target: r.subject for r in rwku if r.target and r.subject},
        rwku_overall={s: macro_mean(t[s] for t in targets.values() if s in t) for s in splits},
        rwku_attacks={a: group_score(rows, by_id) for a, rows in sorted(_by(level3, "attack").items())},
        rwku_neighbours_not_named={
            split: macro_mean(group_score(rows, by_id) for rows in _by(split_rows, "target").values())
            for split, split_rows in sorted(_by(others, "split").items())
        },
        muse={s: group_score(rows, by_id) for s, rows in _by(suites.get("muse", []), "split").items()},
        utility={s: group_score(rows, by_id) for s, rows in _by(suites.get("utility", []), "split").items()},
    )
    authors = suites.get("authors", [])
    if authors:
        summary.authors = {split: group_score(rows, by_id) for split, rows in _author_groups(authors).items()}
        summary.author_scores = {
            name: {split: group_score(rows, by_id) for split, rows in _author_groups(author_rows).items()}
            for name, author_rows in _by(authors, "target").items()
        }
        if by_id is not None:
            summary.authors_relative = _authors_relative(summary.authors, authors, by_id)
    unguarded = summarise(baseline) if baseline is not None else summary if is_baseline else None
    if unguarded is not None:
        summary.unknown_targets = [t for t in unknown_targets(unguarded) if t in targets]
        muse_forget = unguarded.muse.get("knowmem_forget")
        if summary.muse and muse_forget is not None and muse_forget.rouge_l_f1 is not None:
            summary.muse_never_known = muse_forget.rouge_l_f1 < KNOWN_FLOOR
    return summary
