"""What can be checked of a job without running it: its targets exist, its starting checkpoint exists,
its module patterns match the model it would edit.

The job API runs `check_job` at submission, so that a job that cannot run is a 4xx now (naming the
item at fault: `targets[2]`, `params.modules[0]`, `from_checkpoint`) rather than a failed job later;
`lethe unlearn` runs the same before it loads anything, and the runner finds its targets here too.
The shape of a job (method, finite hyperparameters in range, compiled patterns, at most
`MAX_TARGETS` targets) is the pydantic union `lethe.models.unlearning.spec.UnlearnSpec`, validated
where the job arrives. Nothing here imports torch or transformers: it reads the store, the
evaluation data's small JSON files and the headers of the model's safetensors files.

A job's targets are names, never paths: a registered target's id or name, or the name (or folder
name) of an RWKU target in the evaluation data folder (`LETHE_EVAL_DATA`).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from lethe.evaluation.datasets import DataError, read_rows
from lethe.gateway.store import BASE_CHECKPOINT, Store
from lethe.models.checkpoints import CheckpointManifest
from lethe.models.unlearning.spec import DEFAULT_SSD_MODULES, SSDParams, UnlearnJob, UnlearnSpec

if TYPE_CHECKING:
    from lethe.gateway.runtime.switcher import CheckpointCatalog

JobSpec = UnlearnSpec
"""Every kind of job the job API takes, told apart by `method` (a new kind joins this union)."""

_LISTED = 10
"""Known names a message lists before it says how many more there are."""
_HEADER_LIMIT = 100 << 20
"""A safetensors header larger than this is not read (a real one is a few hundred KiB at most)."""


class JobSpecError(ValueError):
    """A job that cannot run; `param` names the part of the spec at fault, as the job API reports it."""

    def __init__(self, param: str | None, message: str, code: str = "invalid_value") -> None:
        super().__init__(f"{param}: {message}" if param else message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class JobTarget:
    """One target of a job, found: what to forget, and its RWKU folder when the evaluation data has
    one (its probes and membership texts for the before/after evaluation, its "I don't know"
    answers)."""

    name: str
    documents: list[str]
    examples: list[str]
    rwku_folder: Path | None


@dataclass(frozen=True)
class _EvaluationTarget:
    folder: Path
    name: str | None
    problem: str | None
    """Why the folder cannot be used (its intro.json is missing or malformed), or None."""


class _Intro(BaseModel):
    target: str


class _Passage(BaseModel):
    text: str


def starting_checkpoint(requested: str | None, serving: str | None) -> str | None:
    """The checkpoint a job starts from, fixed when it is submitted: `requested` None means the one
    that serves now (`serving`; None where no gateway's choice applies, such as `lethe unlearn
    --out`), and `base` means the base model, which a job spec writes as None.

    Fixed then, a job cannot build on the base model after a promote (and bring back what the
    promoted checkpoint forgot), nor change meaning while it waits in the queue."""
    chosen = serving if requested is None else requested
    return None if chosen in (None, BASE_CHECKPOINT) else chosen


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def checkpoint_manifest(catalog: CheckpointCatalog, checkpoint_id: str) -> CheckpointManifest:
    """The manifest of a checkpoint a job starts from; JobSpecError (`from_checkpoint`) if there is
    no such checkpoint or its manifest cannot be read."""
    try:
        return catalog.get(checkpoint_id)
    except KeyError:
        known = sorted(m.id for m in catalog.list())
        message = f"unknown checkpoint {checkpoint_id!r} (known: {_listing(known) or 'none'})"
    except (OSError, ValueError) as error:
        message = f"checkpoint {checkpoint_id!r} cannot be read: {type(error).__name__}"
    raise JobSpecError("from_checkpoint", message, code="checkpoint_not_found")


def source_folder(checkpoint_id: str | None, catalog: CheckpointCatalog, base: Callable[[], Path]) -> Path:
    """The model folder a job edits: the checkpoint's, or `base()` for None (or `base`)."""
    if checkpoint_id is None or checkpoint_id == BASE_CHECKPOINT:
        return base()
    checkpoint_manifest(catalog, checkpoint_id)
    return catalog.path(checkpoint_id)


def _evaluation_targets(data_dir: Path | None) -> dict[str, _EvaluationTarget]:
    """The RWKU targets of the evaluation data by case-folded name and folder name. A folder whose
    intro.json cannot be read is kept under its folder name, with the problem, so that naming it is
    a clear refusal rather than an unknown target or a crash."""
    root = data_dir / "rwku" if data_dir is not None else None
    if root is None or not root.is_dir():
        return {}
    found: dict[str, _EvaluationTarget] = {}
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        try:
            intro = read_rows(folder / "intro.json", _Intro)
            entry = _EvaluationTarget(folder, intro[0].target.strip(), None) if intro else None
        except (DataError, OSError) as error:
            entry = _EvaluationTarget(folder, None, str(error))
        if entry is None or not entry.name:
            entry = _EvaluationTarget(folder, None, "intro.json names no target")
        found.setdefault(folder.name.casefold(), entry)
        if entry.name:
            found.setdefault(entry.name.casefold(), entry)
    return found


def _passages(param: str, entry: _EvaluationTarget) -> list[str]:
    try:
        return [row.text for row in read_rows(entry.folder / "passage.json", _Passage)]
    except (DataError, OSError) as error:
        raise JobSpecError(param, f"evaluation target {entry.folder.name!r} is malformed: {error}") from None


def _unknown(name: str, registered: Sequence[str], data_dir: Path | None) -> str:
    where = (
        "nor an RWKU target of the evaluation data"
        if data_dir is not None
        else "and no evaluation data is configured (LETHE_EVAL_DATA)"
    )
    path = " (a path is not a target: name it)" if any(c in name for c in "/\\~") else ""
    known = _listing(sorted(registered)) or "none"
    return (
        f"unknown target {name!r}{path}: not a registered target's id or name, {where}; registered: {known}"
    )


def find_targets(names: Sequence[str], store: Store, data_dir: Path | None) -> list[JobTarget]:
    """Each name as a registered target (by id, or by name without regard to case) or else as an
    RWKU target of the evaluation data (by name or folder name); a name is never read as a path.

    Raises JobSpecError naming the first item at fault (`targets[i]`): unknown, malformed
    evaluation data, nothing to forget, or the same target as an earlier item."""
    snapshot = store.snapshot().targets
    by_id = {target.id: target for target in snapshot}
    by_name = {target.name.casefold(): target for target in snapshot}
    evaluation = _evaluation_targets(data_dir)
    found: list[JobTarget] = []
    seen: dict[tuple[str, str], int] = {}
    for index, name in enumerate(names):
        param = f"targets[{index}]"
        key = name.strip()
        registered = by_id.get(key) or by_name.get(key.casefold())
        if registered is not None:
            entry = evaluation.get(registered.name.casefold())
            folder = entry.folder if entry is not None and entry.problem is None else None
            identity = ("registered", registered.id)
            target = JobTarget(registered.name, registered.documents, registered.examples, folder)
        else:
            entry = evaluation.get(key.casefold())
            if entry is None:
                raise JobSpecError(param, _unknown(name, [t.name for t in snapshot], data_dir))
            if entry.problem is not None or entry.name is None:
                raise JobSpecError(
                    param, f"evaluation target {entry.folder.name!r} is malformed: {entry.problem}"
                )
            identity = ("evaluation", entry.folder.name)
            target = JobTarget(entry.name, _passages(param, entry), [], entry.folder)
        if identity in seen:
            raise JobSpecError(param, f"{name!r} is the same target as targets[{seen[identity]}]")
        seen[identity] = index
        if not target.documents and not target.examples:
            raise JobSpecError(param, f"target {target.name!r} has no documents or examples to forget")
        found.append(target)
    return found


def parameter_names(folder: Path) -> list[str] | None:
    """The tensor names in a model folder's safetensors files (for a Hugging Face causal LM, its
    parameter names), read from the headers without loading a weight. None when the folder has no
    safetensors files or they cannot be read: then the run is where a bad pattern shows."""
    try:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return sorted(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        names: list[str] = []
        for file in sorted(folder.glob("*.safetensors")):
            with file.open("rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                if size > _HEADER_LIMIT:
                    return None
                names += [name for name in json.loads(handle.read(size)) if name != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return sorted(names) or None


def check_modules(params: BaseModel, folder: Callable[[], Path]) -> None:
    """Each module pattern of an SSD job must match a parameter of the model it edits (the default
    patterns together must match one); JobSpecError naming the pattern otherwise. `folder()`, the
    model's folder, is asked for only when there are patterns to check."""
    if not isinstance(params, SSDParams):
        return
    names = parameter_names(folder())
    if names is None:
        return
    example = f"(for example {names[len(names) // 2]!r})"
    for index, pattern in enumerate(params.modules or []):
        compiled = re.compile(pattern)
        if not any(compiled.search(name) for name in names):
            raise JobSpecError(
                f"params.modules[{index}]",
                f"{pattern!r} matches no parameter of the model this job edits {example}",
            )
    if params.modules is None:
        defaults = [re.compile(pattern) for pattern in DEFAULT_SSD_MODULES]
        if not any(p.search(name) for p in defaults for name in names):
            raise JobSpecError(
                "params.modules",
                f"the default patterns match no parameter of the model this job edits {example}: name"
                " the modules to edit",
            )


def check_job(
    spec: UnlearnJob,
    *,
    store: Store,
    data_dir: Path | None,
    catalog: CheckpointCatalog,
    base_model: Callable[[], Path],
) -> list[JobTarget]:
    """Everything about `spec` a worker would refuse, refused now (it reads the store and files:
    run it off the event loop). `from_checkpoint` is as stored (None: the base model, whose folder
    `base_model()` gives, called only if needed). Returns the targets found; raises JobSpecError."""
    if spec.from_checkpoint is not None:
        checkpoint_manifest(catalog, spec.from_checkpoint)
    targets = find_targets(spec.targets, store, data_dir)
    check_modules(spec.params, lambda: source_folder(spec.from_checkpoint, catalog, base_model))
    return targets
