"""How low decoding restrictions can push RWKU forget ROUGE-L recall, read from stored `lethe eval` runs.

ROUGE-L recall counts every word of the gold answer, stop words included ("the" of "The Golden
Girls", "with" of "Life with Elizabeth"), and credits words the question itself gives ("University"
of "University of Nebraska" when asked which university). No ban on what the model knows removes
those. For each RWKU forget probe of each run this scores the answer three ways:

* **as answered**: what `lethe eval` reports;
* **no new gold words**: the answer less every word that spells one of the gold answer's content
  words the prompt does not give. This is what a perfect forbidden-word list would leave, had the
  model answered the same otherwise (it need not: banning a word changes what follows);
* **no gold words**: the answer less every content word of the gold, given or not. What is left
  comes from stop words alone: the floor of any answer written in English.

Means over targets per level, as the README's tables; level 3 also pooled per attack. Last, per
level, how many of the gold answers' new content words the answers say when the probe's own target
fired, against when it did not: what a longer forbidden-word list could still take away.

    python bench/forget_recall_floor.py --baseline eval-runs/baseline/results.json \
        eval-runs/guarded/results.json eval-runs/refuse/results.json
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import fmean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lethe.evaluation import metrics
from lethe.evaluation.records import EvalResults, ProbeResult
from lethe.evaluation.scoring import FORGET_SPLITS, STEMMED_SUITES

Score = Callable[[ProbeResult], float]


def _recall(record: ProbeResult, given: str | None) -> float:
    """ROUGE-L recall of the answer less the gold's content words that `given` does not contain
    (None: remove nothing)."""
    stemmer = STEMMED_SUITES[record.suite]
    assert record.answer is not None
    text = record.scored_text or ""
    if given is not None:
        text = metrics.without_words(text, metrics.content_tokens(record.answer, given, stemmer=stemmer))
    return metrics.rouge_l(record.answer, text, stemmer=stemmer).recall


SCORES: dict[str, Score] = {
    "as answered": lambda record: _recall(record, None),
    "no new gold words": lambda record: _recall(record, record.prompt),
    "no gold words": lambda record: _recall(record, ""),
}


def forget_records(path: Path) -> list[ProbeResult]:
    results = EvalResults.model_validate_json(path.read_text())
    return [
        r
        for r in results.records
        if r.suite == "rwku" and r.split.startswith(FORGET_SPLITS) and r.error is None and r.answer
    ]


def macro_by_level(records: Sequence[ProbeResult], score: Score) -> dict[str, float]:
    """Per level, the mean over targets of each target's mean score."""
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        groups[f"L{record.level}"][record.target or ""].append(score(record))
    return {level: fmean(fmean(v) for v in targets.values()) for level, targets in sorted(groups.items())}


def pooled_by_attack(records: Sequence[ProbeResult], score: Score) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for record in records:
        if record.attack is not None:
            groups[record.attack].append(score(record))
    return {attack: fmean(values) for attack, values in sorted(groups.items())}


def _cell(value: float, baseline: float) -> str:
    return f"{value:.3f} ({100 * (value / baseline - 1):+.0f}%)" if baseline else f"{value:.3f}"


def table(
    title: str,
    baseline: Sequence[ProbeResult],
    run: Sequence[ProbeResult],
    group: Callable[[Sequence[ProbeResult], Score], dict[str, float]],
) -> None:
    reference = group(baseline, SCORES["as answered"])
    columns = {name: group(run, score) for name, score in SCORES.items()}
    print(f"\n{title}\n")
    print("| | baseline | " + " | ".join(SCORES) + " |")
    print("|---" * (len(SCORES) + 2) + "|")
    for key, base in reference.items():
        cells = [_cell(columns[name][key], base) for name in SCORES]
        print(f"| {key} | {base:.3f} | " + " | ".join(cells) + " |")


def new_words_said(records: Sequence[ProbeResult]) -> None:
    """Gold content words the prompt does not give, and how many of them the answers say, split by
    whether the probe's own target fired ("-" in a run without a guard; counted once per token, as
    `new_word_recall` clips)."""
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for record in records:
        assert record.answer is not None
        stemmer = STEMMED_SUITES[record.suite]
        wanted = metrics.content_tokens(record.answer, record.prompt, stemmer=stemmer)
        said = wanted & metrics.content_tokens(record.scored_text or "", stemmer=stemmer)
        fired = {None: "-", True: "yes", False: "no"}[record.scores.detected]
        count = counts[(f"L{record.level}", fired)]
        count[0] += 1
        count[1] += sum(wanted.values())
        count[2] += sum(said.values())
    print("\n| level | own target fired | probes | gold words not in the prompt | said by the answers |")
    print("|---|---|---|---|---|")
    for (level, fired), (probes, wanted, said) in sorted(counts.items()):
        print(f"| {level} | {fired} | {probes} | {wanted} | {said} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="results.json of guarded runs")
    parser.add_argument("--baseline", type=Path, required=True, help="results.json of the unguarded run")
    args = parser.parse_args()
    baseline = forget_records(args.baseline)
    print(f"{args.baseline}: gold words the unguarded answers say")
    new_words_said(baseline)
    for path in args.runs:
        run = forget_records(path)
        table(f"{path}: RWKU forget ROUGE-L recall, mean over targets", baseline, run, macro_by_level)
        table(f"{path}: level 3 per attack, pooled", baseline, run, pooled_by_attack)
        new_words_said(run)


if __name__ == "__main__":
    main()
