"""Where the forget and retain data of an unlearning job come from.

Targets are the gateway's registered targets, looked up by name, or RWKU target folders given by
path (convenient when nothing is registered: documents = passage.json, name = intro.json). Retain
data and the "I don't know" templates come from the evaluation data folder (`LETHE_EVAL_DATA`,
default /work/shared/eval); a production gateway may not have it, so what is missing is reported
and, where a method cannot do without it, refused with a message that says what to provide.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lethe.evaluation import datasets
from lethe.gateway.store import Store
from lethe.models.unlearning.data import ForgetSet, RetainItem

DEFAULT_EVAL_DATA = Path("/work/shared/eval")
TOFU_RETAIN_SETS = ("world_facts", "real_authors")


def default_data_dir() -> Path:
    return Path(os.environ.get(datasets.DATA_DIR_ENV) or DEFAULT_EVAL_DATA).expanduser()


@dataclass(frozen=True)
class ResolvedTarget:
    """A target's forget data, and its RWKU folder when probes exist for it (for the evaluation)."""

    forget: ForgetSet
    rwku_folder: Path | None


def is_rwku_folder(value: str) -> bool:
    folder = Path(value).expanduser()
    return folder.is_dir() and (folder / "intro.json").is_file() and (folder / "passage.json").is_file()


def _rwku_name(folder: Path) -> str:
    return str(json.loads((folder / "intro.json").read_text(encoding="utf-8"))[0]["target"])


def _rwku_by_name(data_dir: Path) -> dict[str, Path]:
    root = data_dir / "rwku"
    if not root.is_dir():
        return {}
    return {_rwku_name(f).casefold(): f for f in root.iterdir() if is_rwku_folder(str(f))}


def _templates(rwku_folder: Path | None, data_dir: Path) -> list[str]:
    """RWKU's per-target "I don't know" answers where present, else TOFU's generic ones."""
    for path in (
        (rwku_folder / "idk_target.json") if rwku_folder else None,
        data_dir / "tofu" / "idontknow.json",
    ):
        if path is not None and path.is_file():
            return [str(t) for t in json.loads(path.read_text(encoding="utf-8"))]
    return []


def resolve_targets(names: list[str], store: Store, data_dir: Path) -> list[ResolvedTarget]:
    """Each name as a registered target (case-insensitive) or an RWKU folder path; raises
    ValueError naming every unknown one."""
    registered = {t.name.casefold(): t for t in store.snapshot().targets}
    rwku = _rwku_by_name(data_dir)
    resolved, unknown = [], []
    for name in names:
        target = registered.get(name.strip().casefold())
        if target is not None:
            folder = rwku.get(target.name.casefold())
            forget = ForgetSet(
                name=target.name,
                documents=target.documents,
                examples=target.examples,
                templates=_templates(folder, data_dir),
            )
        elif is_rwku_folder(name):
            folder = Path(name).expanduser().resolve()
            passages = [str(row["text"]) for row in json.loads((folder / "passage.json").read_text("utf-8"))]
            forget = ForgetSet(
                name=_rwku_name(folder), documents=passages, templates=_templates(folder, data_dir)
            )
        else:
            unknown.append(name)
            continue
        if not forget.documents and not forget.examples:
            raise ValueError(f"target {forget.name!r} has no documents or examples to forget")
        resolved.append(ResolvedTarget(forget=forget, rwku_folder=folder))
    if unknown:
        known = ", ".join(sorted(t.name for t in registered.values())) or "none registered"
        raise ValueError(
            f"unknown target(s): {', '.join(unknown)} (registered: {known}; an RWKU folder path also works)"
        )
    return resolved


def retain_corpus(data_dir: Path) -> list[RetainItem]:
    """General knowledge to keep: TOFU world facts and real authors (Q/A in the chat template) and
    the general instructions (plain text). Empty when the data folder is absent."""
    items: list[RetainItem] = []
    for name in TOFU_RETAIN_SETS:
        path = data_dir / "tofu" / f"{name}_perturbed.json"
        if path.is_file():
            items += [
                RetainItem(prompt=r.question, text=r.answer) for r in datasets.tofu_rows(data_dir, name)
            ]
    if (data_dir / "general" / "instructions.json").is_file():
        items += [RetainItem(text=r.instruction) for r in datasets.instruction_rows(data_dir)]
    return items
