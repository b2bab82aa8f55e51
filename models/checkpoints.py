"""Unlearned checkpoints on disk: `<root>/<id>/` holds safetensors weights, the tokenizer, the
config and `manifest.json` (where it came from, how it was made, what it did).

A checkpoint is built in a hidden temporary folder beside the others and renamed into place once
complete, so a crash never leaves a half-written checkpoint that `list()` or a promotion would
trust; temporary folders left by dead writers are removed when a store is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import AwareDatetime, BaseModel, Field

MANIFEST = "manifest.json"
TEMP_PREFIX = ".tmp-"
_HASH_CHUNK = 1 << 22


class CheckpointManifest(BaseModel):
    id: str
    parent: str | None = Field(description="Source checkpoint id; None when made from the base model.")
    parent_hash: str = Field(description="sha256 of the source's weights files.")
    weights_hash: str = Field("", description="sha256 of this checkpoint's weights files.")
    base_model: str = Field("", description="The base model folder the chain started from.")
    method: str
    params: dict[str, Any]
    targets: list[str]
    forget_hash: str
    retain_hash: str
    data_hash: str | None = Field(
        None, description="sha256 of the taught question/answer pairs (method `teach`); None otherwise."
    )
    created: AwareDatetime
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")
    peak_rss_mb: float | None = None
    method_report: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] | None = None


def new_checkpoint_id() -> str:
    """Sortable by creation time, unique across concurrent writers."""
    return f"ckpt-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def weights_hash(folder: Path) -> str:
    """sha256 over the folder's safetensors files, in name order (names included)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no safetensors weights")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CheckpointStore:
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_stale()

    def _clean_stale(self) -> None:
        """Remove temporary folders whose writer process is gone (the pid is in the name)."""
        for folder in self.root.glob(f"{TEMP_PREFIX}*"):
            try:
                pid = int(folder.name.rsplit("-", 1)[1])
            except (IndexError, ValueError):
                pid = -1
            if pid <= 0 or not _pid_alive(pid):
                shutil.rmtree(folder, ignore_errors=True)

    def list(self) -> list[CheckpointManifest]:
        """Complete checkpoints, oldest first."""
        manifests = []
        for folder in self.root.iterdir():
            if folder.name.startswith(".") or not (folder / MANIFEST).is_file():
                continue
            manifests.append(CheckpointManifest.model_validate_json((folder / MANIFEST).read_text()))
        return sorted(manifests, key=lambda m: (m.created, m.id))

    def get(self, checkpoint_id: str) -> CheckpointManifest:
        path = self._folder(checkpoint_id) / MANIFEST
        if not path.is_file():
            raise KeyError(checkpoint_id)
        return CheckpointManifest.model_validate_json(path.read_text())

    def path(self, checkpoint_id: str) -> Path:
        """The folder to load with `from_pretrained` (model and tokenizer)."""
        self.get(checkpoint_id)
        return self._folder(checkpoint_id)

    def _folder(self, checkpoint_id: str) -> Path:
        if (
            not checkpoint_id
            or "/" in checkpoint_id
            or "\\" in checkpoint_id
            or checkpoint_id.startswith(".")
        ):
            raise KeyError(checkpoint_id)
        return self.root / checkpoint_id

    @contextmanager
    def staging(self, checkpoint_id: str) -> Iterator[Path]:
        """A temporary folder to write a checkpoint into; on a clean exit it must hold the
        manifest and is renamed to `<root>/<id>`; on an exception it is removed."""
        final = self._folder(checkpoint_id)
        if final.exists():
            raise FileExistsError(f"checkpoint {checkpoint_id} already exists")
        temp = self.root / f"{TEMP_PREFIX}{checkpoint_id}-{os.getpid()}"
        temp.mkdir()
        try:
            yield temp
            if not (temp / MANIFEST).is_file():
                raise RuntimeError(f"checkpoint {checkpoint_id} was staged without a {MANIFEST}")
            _fsync_tree(temp)
            os.rename(temp, final)
            _fsync_dir(self.root)
        finally:
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)

    def write(self, model: Any, tokenizer: Any, manifest: CheckpointManifest) -> CheckpointManifest:
        """Save model, tokenizer and manifest atomically; returns the manifest with `weights_hash`."""
        with self.staging(manifest.id) as folder:
            model.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            manifest = manifest.model_copy(update={"weights_hash": weights_hash(folder)})
            (folder / MANIFEST).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
        return manifest


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
