"""Where the forget and retain data of an unlearning job come from.

Targets are the gateway's registered targets, by id or name, or RWKU targets of the evaluation data
folder by name (convenient when nothing is registered: documents = passage.json); which one a name
means is decided by `lethe.gateway.jobs.validation.find_targets`, never by reading it as a path.
Retain data and the "I don't know" templates come from the evaluation data folder
(`LETHE_EVAL_DATA`, the `eval_data` setting; none by default); a production gateway may not have
it, so what is missing is reported and, where a method cannot do without it, refused with a
message that says what to provide.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lethe.evaluation import datasets
from lethe.gateway.config import Settings
from lethe.gateway.jobs.validation import find_targets
from lethe.gateway.store import Store
from lethe.models.unlearning.data import ForgetSet, RetainItem

TOFU_RETAIN_SETS = ("world_facts", "real_authors")


def default_data_dir() -> Path | None:
    """The evaluation data folder the settings name (`LETHE_EVAL_DATA`), or None."""
    return Settings().eval_data


@dataclass(frozen=True)
class ResolvedTarget:
    """A target's forget data, and its RWKU folder when probes exist for it (for the evaluation)."""

    forget: ForgetSet
    rwku_folder: Path | None


def is_rwku_folder(value: str) -> bool:
    """Whether a folder (a path the caller chose, not a job's target) looks like an RWKU target."""
    folder = Path(value).expanduser()
    return folder.is_dir() and (folder / "intro.json").is_file() and (folder / "passage.json").is_file()


def _templates(rwku_folder: Path | None, data_dir: Path | None) -> list[str]:
    """RWKU's per-target "I don't know" answers where present, else TOFU's generic ones."""
    for path in (
        (rwku_folder / "idk_target.json") if rwku_folder else None,
        (data_dir / "tofu" / "idontknow.json") if data_dir else None,
    ):
        if path is not None and path.is_file():
            return [str(t) for t in json.loads(path.read_text(encoding="utf-8"))]
    return []


def resolve_targets(names: list[str], store: Store, data_dir: Path | None) -> list[ResolvedTarget]:
    """Each name as `find_targets` finds it, with its forget data; raises JobSpecError (a
    ValueError) naming the first item at fault."""
    return [
        ResolvedTarget(
            forget=ForgetSet(
                name=target.name,
                documents=target.documents,
                examples=target.examples,
                templates=_templates(target.rwku_folder, data_dir),
            ),
            rwku_folder=target.rwku_folder,
        )
        for target in find_targets(names, store, data_dir)
    ]


def retain_corpus(data_dir: Path | None) -> list[RetainItem]:
    """General knowledge to keep: TOFU world facts and real authors (Q/A in the chat template) and
    the general instructions (plain text). Empty when there is no data folder or it is absent."""
    items: list[RetainItem] = []
    if data_dir is None:
        return items
    for name in TOFU_RETAIN_SETS:
        path = data_dir / "tofu" / f"{name}_perturbed.json"
        if path.is_file():
            items += [
                RetainItem(prompt=r.question, text=r.answer) for r in datasets.tofu_rows(data_dir, name)
            ]
    if (data_dir / "general" / "instructions.json").is_file():
        items += [RetainItem(text=r.instruction) for r in datasets.instruction_rows(data_dir)]
    return items
