"""How fired answers read: whether a suppression leaves answers that say something else, or
degenerate ones. Reads `lethe eval` runs' results.json and reports, for the forget probes on
which the guard fired (the clamp acts on those only):

* words: mean words of the answer (as the server sent it, before the benchmark's cut);
* empty-ish: share of answers with fewer than two alphabetic words ("The:::");
* repeated: share of words equal to the word before them;
* distinct-2: distinct word bigrams over all bigrams, pooled;
* entropy: RWKU's weighted bigram/trigram entropy per answer, averaged (as `lethe eval` scores
  fluency on instructions).

Every run is measured on the same probes: the forget probes that fired in any of the runs given
that registered targets (a run without targets, the baseline, has none fired).

    python bench/fired_answers.py RUN/results.json [RUN/results.json ...]
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lethe.evaluation.metrics import ngram_entropy

WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def measures(outputs: list[str]) -> dict[str, float]:
    words = [text.split() for text in outputs]
    pairs = [pair for ws in words for pair in itertools.pairwise(ws)]
    repeated = sum(a == b for a, b in pairs)
    return {
        "n": len(outputs),
        "words": sum(map(len, words)) / max(len(words), 1),
        "empty-ish": sum(len(WORD.findall(text)) < 2 for text in outputs) / max(len(outputs), 1),
        "repeated": repeated / max(len(pairs), 1),
        "distinct-2": len(set(pairs)) / max(len(pairs), 1),
        "entropy": sum(ngram_entropy(text) for text in outputs) / max(len(outputs), 1),
    }


def main(paths: list[str]) -> None:
    runs = {path: json.loads(Path(path).read_text()) for path in paths}
    fired = {
        r["id"]
        for run in runs.values()
        if run["info"]["registration"] == "registered"
        for r in run["records"]
        if r["split"].startswith("forget") and r["fired"]
    }
    print(f"{len(fired)} forget probes fired in at least one run\n")
    print("| run | answers | words | empty-ish | repeated | distinct-2 | entropy |")
    print("|---|---|---|---|---|---|---|")
    for path, run in runs.items():
        outputs = [r["output"] or "" for r in run["records"] if r["id"] in fired and r["error"] is None]
        row = measures(outputs)
        print(
            f"| {path} | {row['n']} | {row['words']:.1f} | {100 * row['empty-ish']:.1f}% | "
            f"{100 * row['repeated']:.1f}% | {row['distinct-2']:.3f} | {row['entropy']:.3f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
