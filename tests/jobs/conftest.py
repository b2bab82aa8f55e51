"""Fixtures for the job and checkpoint tests: tiny checkpoints that answer differently, an admin
client on the real app, and helpers to watch jobs."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from lethe.gateway.api.app import create_app
from lethe.gateway.config import Settings
from lethe.models.checkpoints import CheckpointManifest, CheckpointStore, new_checkpoint_id, weights_hash
from lethe.models.engines.hf_engine import TransformersEngine
from tests.support.paths import TEST_HOME
from tests.support.tiny_model import build_tiny_model

ADMIN_KEY = "admin-secret"
USER_KEY = "user-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
USER = {"Authorization": f"Bearer {USER_KEY}"}


@pytest.fixture(scope="session")
def other_tiny_dirs(embedded_model_dir: Path) -> tuple[Path, Path]:
    """Two more tiny random models (other seeds): weights that answer differently from the base."""
    return (
        build_tiny_model(embedded_model_dir, TEST_HOME / "models" / "tiny-random-llama-seed1", seed=1),
        build_tiny_model(embedded_model_dir, TEST_HOME / "models" / "tiny-random-llama-seed2", seed=2),
    )


def write_checkpoint(home: Path, source: Path, parent: Path, targets: list[str] | None = None) -> str:
    """A real checkpoint under `home`/checkpoints holding the weights of `source`."""
    checkpoints = CheckpointStore(home / "checkpoints")
    manifest = CheckpointManifest(
        id=new_checkpoint_id(),
        parent=None,
        parent_hash=weights_hash(parent),
        base_model=str(parent),
        method="flat",
        params={"epochs": 1},
        targets=targets or ["Harry Potter"],
        forget_hash="0" * 64,
        retain_hash="0" * 64,
        created=datetime.now(UTC),
    )
    model = AutoModelForCausalLM.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return checkpoints.write(model, tokenizer, manifest).id


@pytest.fixture
def home_with_checkpoints(
    tmp_path: Path, tiny_model_dir: Path, other_tiny_dirs: tuple[Path, Path]
) -> tuple[Path, str, str]:
    """A LETHE_HOME whose checkpoint store holds two checkpoints (seed 1 and seed 2 weights)."""
    first = write_checkpoint(tmp_path, other_tiny_dirs[0], tiny_model_dir)
    second = write_checkpoint(tmp_path, other_tiny_dirs[1], tiny_model_dir)
    return tmp_path, first, second


def build_app(home: Path, model: Path, **settings: Any) -> FastAPI:
    values = {"home": home, "model": model, "api_keys": USER_KEY, "admin_key": ADMIN_KEY, **settings}
    return create_app(Settings(**values), engine=TransformersEngine(model))


@pytest.fixture
def app(tmp_path: Path, tiny_model_dir: Path) -> FastAPI:
    return build_app(tmp_path, tiny_model_dir)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, headers=ADMIN) as started:
        yield started


HARRY = {
    "name": "Harry Potter",
    "documents": [
        "Harry Potter is a wizard who went to Hogwarts with Ron Weasley and Hermione Granger. "
        "He fought Lord Voldemort and lived in a cupboard under the stairs at Privet Drive."
    ],
}

QUICK_FLAT = {"epochs": 1, "forget_samples": 4, "batch_size": 2, "max_length": 64}
"""FLAT hyperparameters small enough for the tiny model to finish in a second or two."""
