"""The checkpoint store: atomic writes, listing, stale temporary folders, manifest hashes."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lethe.models.checkpoints import MANIFEST, CheckpointManifest, CheckpointStore, weights_hash


def _manifest(checkpoint_id: str = "ckpt-a") -> CheckpointManifest:
    return CheckpointManifest(
        id=checkpoint_id,
        parent=None,
        parent_hash="0" * 64,
        method="ssd",
        params={"alpha": 10.0},
        targets=["Ada Lovelace"],
        forget_hash="f" * 64,
        retain_hash="r" * 64,
        created=datetime.now(UTC),
    )


def test_written_checkpoint_is_listed_loadable_and_hashed(
    tmp_path: Path, tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    store = CheckpointStore(tmp_path)
    written = store.write(tiny_model, tiny_tokenizer, _manifest())
    folder = store.path("ckpt-a")
    assert written.weights_hash == weights_hash(folder) and len(written.weights_hash) == 64
    assert [m.id for m in store.list()] == ["ckpt-a"]
    assert store.get("ckpt-a") == written
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert all(
        torch.equal(a, b)
        for a, b in zip(reloaded.state_dict().values(), tiny_model.state_dict().values(), strict=True)
    )
    assert (folder / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_weights_hash_changes_with_the_weights(
    tmp_path: Path, tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    store = CheckpointStore(tmp_path)
    first = store.write(tiny_model, tiny_tokenizer, _manifest("ckpt-a"))
    with torch.no_grad():
        next(tiny_model.parameters()).view(-1)[0] += 1.0
    second = store.write(tiny_model, tiny_tokenizer, _manifest("ckpt-b"))
    assert first.weights_hash != second.weights_hash


def test_a_crash_mid_write_leaves_no_visible_checkpoint(
    tmp_path: Path,
    tiny_model: PreTrainedModel,
    tiny_tokenizer: PreTrainedTokenizerBase,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = CheckpointStore(tmp_path)

    def crash(*_args: object, **_kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(tiny_tokenizer, "save_pretrained", crash)  # after the weights were written
    with pytest.raises(OSError, match="disk full"):
        store.write(tiny_model, tiny_tokenizer, _manifest())
    assert store.list() == []
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyError):
        store.get("ckpt-a")


def test_a_killed_writer_leaves_only_a_temp_folder_that_is_ignored_then_cleaned(tmp_path: Path) -> None:
    dead = tmp_path / ".tmp-ckpt-dead-999999999"  # no such pid
    dead.mkdir(parents=True)
    (dead / MANIFEST).write_text(_manifest("ckpt-dead").model_dump_json())
    alive = tmp_path / f".tmp-ckpt-live-{os.getpid()}"
    alive.mkdir()
    store = CheckpointStore(tmp_path)
    assert not dead.exists()
    assert alive.exists()  # a writer that is still running keeps its folder
    assert store.list() == []


def test_staging_without_a_manifest_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(RuntimeError, match=MANIFEST), store.staging("ckpt-x") as folder:
        (folder / "model.safetensors").write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["", "../etc", ".tmp-x", "a/b"])
def test_ids_cannot_escape_the_store(tmp_path: Path, bad: str) -> None:
    with pytest.raises(KeyError):
        CheckpointStore(tmp_path).path(bad)
