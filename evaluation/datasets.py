"""Reading the evaluation data (`shared/eval`, see its README) by path, typed.

The data stays where it is: the project must not carry a copy, and the held-out halves used to
check the product live elsewhere in the same format, so nothing here knows particular items.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, TypeAdapter

DATA_DIR_ENV = "LETHE_EVAL_DATA"

RWKU_FORGET_LEVELS = (1, 2, 3)
RWKU_NEIGHBOUR_LEVELS = (1, 2)

Row = TypeVar("Row", bound=BaseModel)


class DataError(RuntimeError):
    """The data folder is missing, incomplete or malformed; the message says what to fix."""


class RwkuProbeRow(BaseModel):
    query: str
    answer: str
    level: int
    type: str
    subject: str
    neighbor: str | None = None


class QaRow(BaseModel):
    question: str
    answer: str


class InstructionRow(BaseModel):
    instruction: str


class RwkuTarget(BaseModel):
    folder: str
    name: str
    intro: str
    passages: list[str]


class _Intro(BaseModel):
    target: str
    intro: str


class _Passage(BaseModel):
    text: str


def resolve_data_dir(flag: str | None) -> Path:
    """The data folder: the flag, else $LETHE_EVAL_DATA (there is no default folder)."""
    value = flag or os.environ.get(DATA_DIR_ENV)
    if not value:
        raise DataError(f"no evaluation data folder: pass --data-dir or set ${DATA_DIR_ENV}")
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise DataError(f"evaluation data folder {folder} not found: pass --data-dir or set ${DATA_DIR_ENV}")
    return folder


def read_rows(path: Path, row: type[Row]) -> list[Row]:
    if not path.is_file():
        raise DataError(f"{path} is missing")
    try:
        return TypeAdapter(list[row]).validate_python(json.loads(path.read_text(encoding="utf-8")))
    except ValueError as error:
        raise DataError(f"{path} is malformed: {error}") from error


def _folder_order(folder: Path) -> tuple[int, str]:
    """RWKU folders are `<id>_<Name>`: order them by id so 2 sorts before 10."""
    match = re.match(r"(\d+)_", folder.name)
    return (int(match.group(1)) if match else 1 << 30, folder.name)


def rwku_targets(data_dir: Path) -> list[RwkuTarget]:
    root = data_dir / "rwku"
    if not root.is_dir():
        raise DataError(f"{root} not found")
    targets = []
    for folder in sorted((p for p in root.iterdir() if p.is_dir()), key=_folder_order):
        intro = read_rows(folder / "intro.json", _Intro)[0]
        passages = [p.text for p in read_rows(folder / "passage.json", _Passage)]
        targets.append(
            RwkuTarget(folder=folder.name, name=intro.target, intro=intro.intro, passages=passages)
        )
    return targets


def select_targets(targets: list[RwkuTarget], patterns: list[str] | None) -> list[RwkuTarget]:
    """Targets whose folder or name contains any pattern (case-insensitive); all when no patterns.

    A pattern that selects nothing is an error rather than a silently smaller run.
    """
    if not patterns:
        return targets
    chosen = []
    for pattern in patterns:
        needle = pattern.strip().lower()
        hits = [t for t in targets if needle in t.folder.lower() or needle in t.name.lower()]
        if not hits:
            known = ", ".join(t.folder for t in targets)
            raise DataError(f"--targets {pattern!r} matches no RWKU target (known: {known})")
        chosen.extend(t for t in hits if t not in chosen)
    return sorted(chosen, key=targets.index)


def rwku_rows(data_dir: Path, target: RwkuTarget, split: str) -> list[RwkuProbeRow]:
    return read_rows(data_dir / "rwku" / target.folder / f"{split}.json", RwkuProbeRow)


def muse_rows(data_dir: Path, split: str) -> list[QaRow]:
    """`split` is `forget` or `retain`: the knowmem questions of that set."""
    return read_rows(data_dir / "muse_books" / f"knowmem_{split}_qa.json", QaRow)


def muse_shots(data_dir: Path, split: str) -> list[QaRow]:
    return read_rows(data_dir / "muse_books" / f"knowmem_{split}_qa_icl.json", QaRow)


def tofu_rows(data_dir: Path, name: str) -> list[QaRow]:
    """`name` is `world_facts` or `real_authors`."""
    return read_rows(data_dir / "tofu" / f"{name}_perturbed.json", QaRow)


def instruction_rows(data_dir: Path) -> list[InstructionRow]:
    return read_rows(data_dir / "general" / "instructions.json", InstructionRow)


AUTHORS_FOLDER = "tofu_authors"
AUTHOR_GROUPS = ("forget", "retain")
"""`tofu_authors/<group>_authors.json`: the authors taught and then forgotten, and those kept."""


class TofuAuthor(BaseModel):
    name: str
    qa: list[QaRow]


def tofu_authors(data_dir: Path, group: str) -> list[TofuAuthor]:
    """The fictitious authors of `group` (`forget` or `retain`), each with its question/answer pairs."""
    return read_rows(data_dir / AUTHORS_FOLDER / f"{group}_authors.json", TofuAuthor)


def select_authors(authors: list[TofuAuthor], patterns: list[str] | None) -> list[TofuAuthor]:
    """Authors whose name contains any pattern (case-insensitive); all when no patterns. A pattern
    that selects nobody is an error."""
    if not patterns:
        return authors
    chosen = []
    for pattern in patterns:
        hits = [a for a in authors if pattern.strip().lower() in a.name.lower()]
        if not hits:
            known = ", ".join(a.name for a in authors)
            raise DataError(f"--forget-authors {pattern!r} matches no forget author (known: {known})")
        chosen.extend(a for a in hits if a not in chosen)
    return sorted(chosen, key=authors.index)
