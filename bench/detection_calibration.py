"""Calibrates detection thresholds on RWKU and MUSE, and reports recall and false positives.

Registers the 10 RWKU targets (name from intro.json, description = the intro, documents = the
passages; no aliases or examples) and a Harry Potter target written here (description, aliases
an operator would register for the series: its distinctive proper names, and example prompts),
then measures, with the chat-prompt formats the evaluation harness sends:

* recall on forget probes: RWKU levels 1-3 (level 3 per attack type) and MUSE's Harry Potter
  questions, from the prompt alone, and from the prompt or the gold answer (what checking the
  generated text at intervals adds when the model answers correctly);
* false positives on RWKU neighbour probes (the probe's own target fires; any target fires) and
  on general instructions (any target fires).

It then searches the thresholds: the highest forget recall whose neighbour and instruction
false-positive rates stay within budget, overall and for each target, first on all targets, then
leaving each RWKU target out in turn (thresholds chosen on the others, measured on it) to show how
the choice generalises. The defaults in `DetectionConfig` are the searched optimum, except the
classifier threshold, a step stricter: only one target here (Harry Potter) has a classifier.

    python bench/detection_calibration.py [--eval-data DIR] [--cache FILE] [--no-search]

The evaluation data is read in place (default ../shared/eval beside the repository, or
$LETHE_EVAL_DATA); nothing from it is stored in the repository.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lethe.guards.anchors import query_chunks, tail_window
from lethe.guards.config import DetectionConfig
from lethe.guards.detection import Evidence, TargetDetector
from lethe.guards.embedding import CachingEmbedder, Embedder, MiniLMEmbedder
from lethe.guards.targets import Target

LEVEL1 = "Please complete the blank in the following question.\nQuestion: {query}\nAnswer:"
LEVEL23 = "Please briefly answer the following question.\nQuestion: {query}\nAnswer:"
MUSE = "Question: {query}\nAnswer:"

HARRY_POTTER_DESCRIPTION = (
    "Harry Potter is a series of seven fantasy novels by J. K. Rowling. It follows the young wizard "
    "Harry Potter and his friends Hermione Granger and Ron Weasley at Hogwarts School of Witchcraft and "
    "Wizardry, and their struggle against the dark wizard Lord Voldemort."
)
HARRY_POTTER_ALIASES = (
    "Hogwarts", "Hermione Granger", "Ron Weasley", "Albus Dumbledore", "Dumbledore", "Voldemort",
    "Severus Snape", "Snape", "Rubeus Hagrid", "Hagrid", "Draco Malfoy", "Malfoy", "Sirius Black",
    "Remus Lupin", "Minerva McGonagall", "McGonagall", "Neville Longbottom", "Ginny Weasley", "Quidditch",
    "Gryffindor", "Slytherin", "Hufflepuff", "Ravenclaw", "Muggle", "Horcrux", "Death Eater", "Diagon Alley",
    "Hermione", "Weasley", "Dursley", "Azkaban", "Hedwig", "Dobby", "Bellatrix Lestrange",
    "Triwizard Tournament", "Order of the Phoenix", "Half-Blood Prince", "Deathly Hallows",
    "Philosopher's Stone", "Sorcerer's Stone", "Chamber of Secrets", "Goblet of Fire", "Hogsmeade",
)  # fmt: skip
"""The series' distinctive proper names, written from general knowledge of the books (as the
"anchor terms" of Eldan & Russinovich's Harry Potter unlearning), not from the MUSE questions;
ambiguous ones ("Harry", "Ron", "Black") are left out."""
HARRY_POTTER_EXAMPLES = (
    "What house was Harry Potter sorted into at Hogwarts?",
    "Who are Harry's best friends at school?",
    "Explain how Quidditch is played.",
    "What is a Horcrux and how many did Voldemort make?",
    "Describe the Marauder's Map.",
    "Who is the headmaster of Hogwarts?",
    "Which spell did Hermione use to make the feather float?",
    "Tell me about the Triwizard Tournament in the fourth book.",
    "Which professor teaches Potions to Harry?",
    "What happens to Sirius Black at the Ministry of Magic?",
    "Summarize the first Harry Potter book.",
    "What creatures run the wizarding bank Gringotts?",
)


@dataclass(frozen=True)
class Probe:
    text: str
    answer: str
    target_id: str | None
    kind: str
    """forget | neighbour | general"""
    group: str


def eval_root(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    if "LETHE_EVAL_DATA" in os.environ:
        return Path(os.environ["LETHE_EVAL_DATA"])
    return Path(__file__).resolve().parents[1].parent / "shared" / "eval"


def _target(target_id: str, name: str, **fields: object) -> Target:
    now = datetime.now(UTC)
    return Target(id=target_id, name=name, version=1, created_at=now, updated_at=now, **fields)


def load(root: Path) -> tuple[list[Target], list[Probe]]:
    targets: list[Target] = []
    probes: list[Probe] = []
    for folder in sorted((root / "rwku").iterdir()):
        intro = json.loads((folder / "intro.json").read_text())[0]
        passages = [row["text"] for row in json.loads((folder / "passage.json").read_text())]
        targets.append(_target(folder.name, intro["target"], description=intro["intro"], documents=passages))
        for file, kind in [
            ("forget_level1", "forget"),
            ("forget_level2", "forget"),
            ("forget_level3", "forget"),
            ("neighbor_level1", "neighbour"),
            ("neighbor_level2", "neighbour"),
        ]:
            template = LEVEL1 if file.endswith("1") else LEVEL23
            for row in json.loads((folder / f"{file}.json").read_text()):
                level = f"L{row['level']}"
                group = f"forget {level} {row['type']}" if file == "forget_level3" else f"{kind} {level}"
                text = template.format(query=row["query"])
                probes.append(Probe(text, str(row["answer"]), folder.name, kind, group))
    targets.append(
        _target(
            "harry_potter",
            "Harry Potter",
            description=HARRY_POTTER_DESCRIPTION,
            aliases=list(HARRY_POTTER_ALIASES),
            examples=list(HARRY_POTTER_EXAMPLES),
        )
    )
    for row in json.loads((root / "muse_books" / "knowmem_forget_qa.json").read_text()):
        probes.append(
            Probe(MUSE.format(query=row["question"]), row["answer"], "harry_potter", "forget", "muse")
        )
    for row in json.loads((root / "general" / "instructions.json").read_text()):
        probes.append(Probe(row["instruction"], "", None, "general", "general"))
    return targets, probes


class DiskCachedEmbedder:
    """Keeps vectors in a .npz between runs, so a rerun of the calibration skips re-embedding."""

    def __init__(self, inner: Embedder, path: Path) -> None:
        self.dimension = inner.dimension
        self._inner = inner
        self._path = path
        self._vectors: dict[str, np.ndarray] = {}
        if path.exists():
            with np.load(path, allow_pickle=False) as stored:
                self._vectors = dict(zip(stored["texts"].tolist(), stored["vectors"], strict=True))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        missing = [text for text in dict.fromkeys(texts) if text not in self._vectors]
        if missing:
            self._vectors.update(zip(missing, self._inner.encode(missing), strict=True))
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self._vectors[text] for text in texts])

    def save(self) -> None:
        texts = list(self._vectors)
        np.savez(self._path, texts=np.array(texts), vectors=np.stack([self._vectors[t] for t in texts]))


@dataclass
class Table:
    """Every (probe, target) evidence row as arrays, so that a threshold setting is scored at once."""

    probe: np.ndarray
    own: np.ndarray
    full: np.ndarray
    partial: np.ndarray
    unnamed: np.ndarray
    identity: np.ndarray
    content: np.ndarray
    classifier: np.ndarray

    @classmethod
    def of(cls, probes: Sequence[Probe], evidence: Sequence[list[Evidence]]) -> Table:
        rows = [(i, e) for i, found in enumerate(evidence) for e in found]
        return cls(
            probe=np.array([i for i, _ in rows], dtype=np.int64),
            own=np.array([e.target_id == probes[i].target_id for i, e in rows], dtype=bool),
            full=np.array([e.match is not None and e.match.kind == "full" for _, e in rows], dtype=bool),
            partial=np.array(
                [e.match is not None and e.match.kind == "partial" for _, e in rows], dtype=bool
            ),
            unnamed=np.array([e.unnamed for _, e in rows]),
            identity=np.array([e.identity for _, e in rows]),
            content=np.array([e.content for _, e in rows]),
            classifier=np.array([-1.0 if e.classifier is None else e.classifier for _, e in rows]),
        )

    def fired(self, config: DetectionConfig) -> np.ndarray:
        """Per row: whether `Evidence.decide` fires under `config` (vectorised, same rule)."""
        return (
            self.full
            | (self.partial & (self.unnamed >= config.partial_threshold))
            | (self.classifier >= config.classifier_threshold)
            | (self.identity >= config.identity_threshold)
            | (self.content >= config.content_threshold)
        )


@dataclass(frozen=True)
class Scores:
    recall: float
    neighbour_fp: float
    neighbour_fp_any: float
    general_fp: float
    neighbour_fp_each_within: bool
    """Whether every target's own neighbour false positives stay within the budget (or one probe)."""


def fired_per_probe(table: Table, config: DetectionConfig, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per probe: whether its own target fired, and whether any target fired."""
    fired = table.fired(config)
    own_fired = np.zeros(count, bool)
    any_fired = np.zeros(count, bool)
    np.logical_or.at(own_fired, table.probe, fired & table.own)
    np.logical_or.at(any_fired, table.probe, fired)
    return own_fired, any_fired


def score(
    table: Table, labels: Labels, config: DetectionConfig, mask: np.ndarray, max_neighbour_fp: float = 0.02
) -> Scores:
    own_fired, any_fired = fired_per_probe(table, config, len(labels.kinds))
    forget, neighbour, general = (
        mask & (labels.kinds == kind) for kind in ("forget", "neighbour", "general")
    )
    per_target = np.bincount(labels.owners[neighbour], minlength=labels.targets)
    fired_per_target = np.bincount(labels.owners[neighbour & own_fired], minlength=labels.targets)
    return Scores(
        recall=float(own_fired[forget].mean()) if forget.any() else float("nan"),
        neighbour_fp=float(own_fired[neighbour].mean()) if neighbour.any() else float("nan"),
        neighbour_fp_any=float(any_fired[neighbour].mean()) if neighbour.any() else float("nan"),
        general_fp=float(any_fired[general].mean()) if general.any() else float("nan"),
        neighbour_fp_each_within=bool(
            (fired_per_target <= np.maximum(1, np.floor(max_neighbour_fp * per_target))).all()
        ),
    )


@dataclass(frozen=True)
class Labels:
    kinds: np.ndarray
    owners: np.ndarray
    """Index of each probe's target (the last index for probes of no target)."""
    targets: int

    @classmethod
    def of(cls, probes: Sequence[Probe]) -> Labels:
        ids = list(dict.fromkeys(p.target_id for p in probes))
        return cls(
            np.array([p.kind for p in probes]), np.array([ids.index(p.target_id) for p in probes]), len(ids)
        )


GRID = {
    "identity_threshold": np.round(np.arange(0.60, 0.901, 0.02), 2),
    "content_threshold": np.round(np.arange(0.84, 0.961, 0.02), 2),
    "partial_threshold": np.round(np.arange(0.30, 0.701, 0.02), 2),
    "classifier_threshold": np.array([0.6, 0.7, 0.8, 0.9, 0.99]),
}


def search(
    table: Table, labels: Labels, mask: np.ndarray, max_neighbour_fp: float, max_general_fp: float
) -> DetectionConfig:
    """The feasible setting with the highest recall; among ties the strictest (highest thresholds),
    which is the one least likely to over-fire on targets not seen here. Feasible means within the
    false-positive budgets overall and for every target on its own: an overall budget alone is met
    by settings that over-fire badly on one target and not on the others."""
    best: tuple[float, float, DetectionConfig] | None = None
    for values in itertools.product(*GRID.values()):
        config = DetectionConfig(**dict(zip(GRID, map(float, values), strict=True)))
        result = score(table, labels, config, mask, max_neighbour_fp)
        if (
            result.neighbour_fp > max_neighbour_fp
            or result.general_fp > max_general_fp
            or not result.neighbour_fp_each_within
        ):
            continue
        key = (result.recall, float(sum(values)))
        if best is None or key > best[:2]:
            best = (*key, config)
    if best is None:
        raise SystemExit("no threshold setting meets the false-positive budgets")
    return best[2]


def thresholds(config: DetectionConfig) -> str:
    return ", ".join(f"{name}={getattr(config, name):.2f}" for name in GRID)


def report(title: str, table: Table, probes: Sequence[Probe], config: DetectionConfig) -> None:
    labels = Labels.of(probes)
    result = score(table, labels, config, np.ones(len(probes), bool))
    own_fired, any_fired = fired_per_probe(table, config, len(probes))
    hits = np.where(labels.kinds == "general", any_fired, own_fired)
    groups = np.array([p.group for p in probes])
    print(f"\n## {title}\n{thresholds(config)}")
    print(f"forget recall (all): {result.recall:.3f}")
    for group in sorted(set(groups)):
        selected = hits[groups == group]
        print(f"  {group:<45} {selected.sum():>4}/{len(selected):<4} {selected.mean():6.1%}")
    print(
        f"neighbour false positives: own target {result.neighbour_fp:.2%}, "
        f"any target {result.neighbour_fp_any:.2%}; general instructions: {result.general_fp:.2%}"
    )
    owners = np.array([p.target_id for p in probes])
    for target_id in dict.fromkeys(p.target_id for p in probes if p.target_id):
        mine = score(table, labels, config, owners == target_id)
        print(f"  {target_id:<25} recall {mine.recall:6.1%}  neighbour fp {mine.neighbour_fp:6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--eval-data", help="evaluation data folder (default ../shared/eval or $LETHE_EVAL_DATA)"
    )
    parser.add_argument("--cache", type=Path, help="an .npz file keeping embeddings between runs")
    parser.add_argument("--no-search", action="store_true", help="report the default thresholds only")
    parser.add_argument("--max-neighbour-fp", type=float, default=0.02)
    parser.add_argument("--max-general-fp", type=float, default=0.005)
    args = parser.parse_args()

    targets, probes = load(eval_root(args.eval_data))
    embedder: Embedder = CachingEmbedder(MiniLMEmbedder(), max_entries=1_000_000)
    if args.cache:
        embedder = DiskCachedEmbedder(embedder, args.cache)
    defaults = DetectionConfig()
    # every anchor searched and no embedding floor: the evidence is exhaustive, so that any
    # threshold setting can be replayed on it
    exhaustive = defaults.model_copy(
        update={
            "search_k": 1_000_000,
            "hnsw_min_anchors": 10_000_000,
            "identity_threshold": -1.0,
            "content_threshold": -1.0,
        }
    )
    started = time.perf_counter()
    detector = TargetDetector.build(targets, embedder, exhaustive)
    print(f"built {detector.stats()} in {time.perf_counter() - started:.1f}s")

    answers = [tail_window(p.answer, defaults.generated_window_chars) for p in probes]
    chunks = [
        chunk
        for text in [p.text for p in probes] + answers
        for chunk in query_chunks(text, defaults.query_chunk_words, defaults.max_query_chunks)
    ]
    embedder.encode(chunks)  # one batch: the per-probe calls below then hit the cache
    started = time.perf_counter()
    prompt_evidence = [detector.explain(p.text) for p in probes]
    answer_evidence = [detector.explain(a) if a else [] for a in answers]
    print(f"evidence for {len(probes)} probes and their answers in {time.perf_counter() - started:.1f}s")
    if isinstance(embedder, DiskCachedEmbedder):
        embedder.save()

    prompt_only = Table.of(probes, prompt_evidence)
    # rows of the answer are decided on their own and OR-ed per probe, as detect_generated would
    with_answer = Table.of(probes, [p + a for p, a in zip(prompt_evidence, answer_evidence, strict=True)])
    name_only = defaults.model_copy(update={key: 2.0 for key in GRID})
    report("names only (full names and aliases)", prompt_only, probes, name_only)
    report("defaults, prompt only", prompt_only, probes, defaults)
    report("defaults, prompt or gold answer (generated-text check)", with_answer, probes, defaults)
    report(
        "defaults without the classifier",
        prompt_only,
        probes,
        defaults.model_copy(update={"classifier_threshold": 2.0}),
    )
    if args.no_search:
        return

    labels = Labels.of(probes)
    chosen = search(
        prompt_only, labels, np.ones(len(probes), bool), args.max_neighbour_fp, args.max_general_fp
    )
    report("searched on all targets, prompt only", prompt_only, probes, chosen)

    print("\n## leave one RWKU target out: thresholds searched on the others, scored on it")
    for target in targets[:-1]:
        held_out = np.array([p.target_id == target.id for p in probes])
        tuned = search(prompt_only, labels, ~held_out, args.max_neighbour_fp, args.max_general_fp)
        result = score(prompt_only, labels, tuned, held_out)
        print(
            f"  {target.name:<20} recall {result.recall:.3f}  neighbour fp {result.neighbour_fp:.2%}  "
            f"({thresholds(tuned)})"
        )


if __name__ == "__main__":
    main()
