"""The suites: which probes a run sends, and which forget targets it registers first.

Probe order is fixed (suite, target, split, file order) and `--sample N` takes the first N of
each set, so two runs with the same flags send the same prompts in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from lethe.evaluation import datasets, prompts
from lethe.evaluation.datasets import RwkuTarget
from lethe.evaluation.records import Probe, Suite
from lethe.guards.targets import Policy, Suppression

MUSE_SUBJECT = "Harry Potter"
MUSE_DESCRIPTION = "The Harry Potter book series by J. K. Rowling: its characters, places and events."
MUSE_SPLITS = ("forget", "retain")
TOFU_SETS = ("world_facts", "real_authors")
AUTHORS_SEEN = 10
"""Of each author's question/answer pairs, the first this many are "seen": a forget author's answers
to them are registered as its documents, as an operator would paste a profile; the rest are questions
about facts the guard was never shown."""
DEFAULT_AUTHOR_MAX_TOKENS = 96
"""TOFU answers are whole sentences (the longest in tofu_authors is 82 tokens of SmolLM2)."""

T = TypeVar("T")


class Selection(BaseModel):
    suites: list[Suite]
    targets: list[RwkuTarget]
    levels: list[int]
    sample: int | None
    max_tokens: int
    instruction_max_tokens: int
    authors: list[str] | None = None
    """Name substrings of the forget authors to register and probe (`authors` suite; None: all)."""
    author_max_tokens: int = DEFAULT_AUTHOR_MAX_TOKENS


class TargetSpec(BaseModel):
    """A forget target as the admin API takes it (POST /admin/targets)."""

    name: str
    aliases: list[str] = []
    description: str
    documents: list[str]
    policy: Policy = "steer"
    suppression: Suppression = "both"


def _first(rows: Sequence[T], sample: int | None) -> list[T]:
    return list(rows[:sample] if sample is not None else rows)


def rwku_probes(data_dir: Path, selection: Selection) -> list[Probe]:
    splits = [f"forget_level{lv}" for lv in datasets.RWKU_FORGET_LEVELS if lv in selection.levels]
    splits += [f"neighbor_level{lv}" for lv in datasets.RWKU_NEIGHBOUR_LEVELS if lv in selection.levels]
    probes = []
    for target in selection.targets:
        for split in splits:
            for index, row in enumerate(
                _first(datasets.rwku_rows(data_dir, target, split), selection.sample)
            ):
                attack = prompts.normalise_attack(row.type) if row.level == 3 else None
                probes.append(
                    Probe(
                        id=f"rwku/{target.folder}/{split}/{index}",
                        suite="rwku",
                        split=split,
                        target=target.folder,
                        subject=target.name,
                        level=row.level,
                        attack=attack,
                        prompt=prompts.rwku_prompt(row.query, row.level, attack),
                        answer=row.answer,
                        max_tokens=selection.max_tokens,
                        stop=prompts.RWKU_STOP,
                    )
                )
    return probes


def muse_probes(data_dir: Path, selection: Selection) -> list[Probe]:
    probes = []
    for split in MUSE_SPLITS:
        shots = [(shot.question, shot.answer) for shot in datasets.muse_shots(data_dir, split)]
        for index, row in enumerate(_first(datasets.muse_rows(data_dir, split), selection.sample)):
            probes.append(
                Probe(
                    id=f"muse/knowmem_{split}/{index}",
                    suite="muse",
                    split=f"knowmem_{split}",
                    subject=MUSE_SUBJECT,
                    prompt=prompts.muse_prompt(row.question, shots),
                    answer=row.answer,
                    max_tokens=selection.max_tokens,
                    stop=prompts.MUSE_STOP,
                )
            )
    return probes


def tofu_probes(data_dir: Path, selection: Selection) -> list[Probe]:
    probes = []
    for name in TOFU_SETS:
        for index, row in enumerate(_first(datasets.tofu_rows(data_dir, name), selection.sample)):
            probes.append(
                Probe(
                    id=f"utility/{name}/{index}",
                    suite="utility",
                    split=name,
                    prompt=prompts.tofu_prompt(row.question),
                    answer=row.answer,
                    max_tokens=selection.max_tokens,
                )
            )
    return probes


def instruction_probes(data_dir: Path, selection: Selection) -> list[Probe]:
    """General instructions, without a gold answer: their answers' n-gram entropy is the fluency."""
    return [
        Probe(
            id=f"utility/instructions/{index}",
            suite="utility",
            split="instructions",
            prompt=prompts.instruction_prompt(row.instruction),
            max_tokens=selection.instruction_max_tokens,
        )
        for index, row in enumerate(_first(datasets.instruction_rows(data_dir), selection.sample))
    ]


def utility_probes(data_dir: Path, selection: Selection) -> list[Probe]:
    return tofu_probes(data_dir, selection) + instruction_probes(data_dir, selection)


def forget_authors(data_dir: Path, selection: Selection) -> list[datasets.TofuAuthor]:
    return datasets.select_authors(datasets.tofu_authors(data_dir, "forget"), selection.authors)


def author_split(group: str, index: int) -> str:
    """`forget_seen`, `forget_unseen`, `retain_seen` or `retain_unseen`."""
    return f"{group}_{'seen' if index < AUTHORS_SEEN else 'unseen'}"


def authors_probes(data_dir: Path, selection: Selection) -> list[Probe]:
    """Every question of the chosen forget authors and of all retain authors (the neighbours), bare
    as TOFU asks them; `--sample N` takes the first N of each author's seen and unseen halves."""
    groups = (
        ("forget", forget_authors(data_dir, selection)),
        ("retain", datasets.tofu_authors(data_dir, "retain")),
    )
    probes = []
    for group, authors in groups:
        for author in authors:
            halves = (range(min(AUTHORS_SEEN, len(author.qa))), range(AUTHORS_SEEN, len(author.qa)))
            for indices in halves:
                for index in _first(list(indices), selection.sample):
                    row = author.qa[index]
                    split = author_split(group, index)
                    probes.append(
                        Probe(
                            id=f"authors/{split}/{author.name}/{index}",
                            suite="authors",
                            split=split,
                            target=author.name,
                            subject=author.name,
                            prompt=prompts.tofu_prompt(row.question),
                            answer=row.answer,
                            max_tokens=selection.author_max_tokens,
                        )
                    )
    return probes


def build_probes(data_dir: Path, selection: Selection) -> list[Probe]:
    builders = {
        "rwku": rwku_probes,
        "muse": muse_probes,
        "utility": utility_probes,
        "authors": authors_probes,
    }
    return [probe for suite in selection.suites for probe in builders[suite](data_dir, selection)]


def forget_targets(
    data_dir: Path, selection: Selection, policy: Policy = "steer", suppression: Suppression = "both"
) -> list[TargetSpec]:
    """What the run asks the server to forget: each selected RWKU person, Harry Potter for MUSE, and
    each chosen forget author (its name, and the answers of its seen pairs as documents).

    RWKU targets bring their passages as documents. The MUSE data here has no book text, so the
    Harry Potter target is described by its name and MUSE's own in-context forget shots (never the
    questions that are scored).
    """
    specs = []
    if "rwku" in selection.suites:
        specs += [
            TargetSpec(
                name=t.name, description=t.intro, documents=t.passages, policy=policy, suppression=suppression
            )
            for t in selection.targets
        ]
    if "muse" in selection.suites:
        shots = datasets.muse_shots(data_dir, "forget")
        documents = [f"{shot.question} {shot.answer}" for shot in shots]
        specs.append(
            TargetSpec(
                name=MUSE_SUBJECT,
                description=MUSE_DESCRIPTION,
                documents=documents,
                policy=policy,
                suppression=suppression,
            )
        )
    if "authors" in selection.suites:
        specs += [
            TargetSpec(
                name=author.name,
                description="",
                documents=[row.answer for row in author.qa[:AUTHORS_SEEN]],
                policy=policy,
                suppression=suppression,
            )
            for author in forget_authors(data_dir, selection)
        ]
    return specs
