"""The SAE as a second detector: a target fires when its features fire on at least its calibrated
share of the text's tokens, or when the primary detector finds it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lethe.gateway.runtime.sae_service import EitherDetector, SAEDetector, SAEFired, SAEService
from lethe.gateway.store import SQLiteStore
from lethe.guards.features import SAEFeature, SelectionConfig, TargetFeatures
from lethe.guards.targets import TargetSpec
from lethe.models.sae.features import ResidualReader
from tests.support.sae import random_sae


def chosen(target_id: str, threshold: float) -> TargetFeatures:
    feature = SAEFeature(index=0, mean_activation=1.0, forget_rate=0.5, retain_rate=0.0)
    return TargetFeatures(
        target_id=target_id,
        sae="s",
        layer=1,
        target_version=1,
        forget_tokens=10,
        features=(feature,),
        detect_share=threshold,
    )


class Reader:
    def encode_chat(self, turns: Sequence[tuple[str, str]]) -> list[int]:
        return [len(turns)]

    def encode_text(self, text: str) -> list[int]:
        return [len(text)]


@dataclass
class Service:
    shares_by_target: dict[str, float]

    def prepared(self) -> tuple[Reader, list[torch.Tensor]]:
        return Reader(), []

    def shares(self, ids: list[int], features: dict[str, TargetFeatures]) -> dict[str, float]:
        return {t: self.shares_by_target[t] for t in features}


@dataclass(frozen=True)
class Hit:
    target_id: str


class Primary:
    def detect_conversation(self, messages: Sequence[str]) -> list[Hit]:
        return [Hit("named")]

    def detect_generated(self, text: str) -> list[Hit]:
        return []


def test_fires_at_the_calibrated_share_and_joins_the_primary_detector() -> None:
    service = Service({"named": 0.0, "unnamed": 0.3, "quiet": 0.1})
    features = {
        "named": chosen("named", 0.2),
        "unnamed": chosen("unnamed", 0.2),
        "quiet": chosen("quiet", 0.2),
    }
    sae = SAEDetector(service, features)  # type: ignore[arg-type]
    assert [f.target_id for f in sae.detect_generated("text")] == ["unnamed"]
    both = EitherDetector(Primary(), sae)
    assert [f.target_id for f in both.detect_conversation(["who?"])] == ["named", "unnamed"]
    assert [f.target_id for f in both.detect_generated("text")] == ["unnamed"]
    assert SAEDetector(service, {}).detect_conversation(["who?"]) == []  # type: ignore[arg-type]
    assert SAEFired("unnamed", 0.3) in sae.detect_generated("text")


def test_service_chooses_features_that_fire_on_the_targets_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    """On the tiny model with a random SAE: features are chosen for each version, the target's own
    text reaches its detection share, and a deleted target's features go."""
    store = SQLiteStore(tmp_path / "lethe.db")
    random_sae(64, 256, layer=1, threshold=1.5).save(tmp_path / "sae")
    selection = SelectionConfig(max_retain_rate=1.0, min_detect_share=0.01)
    service = SAEService(tmp_path / "sae", store, tiny_model_dir, selection)
    document = "Velmora Quist wrote three novels about the sea and lived in a lighthouse."
    target = store.create_target(TargetSpec(name="Velmora Quist", documents=[document]))
    store.create_target(TargetSpec(name="Orrin Vale", suppression="decoding"))
    assert service.choose_missing() == 1
    assert service.choose_missing() == 0  # nothing new
    [features] = store.target_features(sae=service.card.fingerprint)
    assert features.target_id == target.id and features.features
    reader, _ = service.prepared()
    share = service.shares(reader.encode_text(document), {target.id: features})[target.id]
    assert share > 0
    store.delete_target(target.id)
    assert store.target_features() == []


def test_reader_reads_batched_as_one_by_one_and_keeps_to_its_budget(tiny_model_dir: Path) -> None:
    reader = ResidualReader(tiny_model_dir, layer=1)
    texts = reader.encode(["a short one", "a somewhat longer text about the sea and ships", "x"], ["Hi?"])
    one_by_one = reader.read_each(texts, batch=1)
    batched = reader.read_each(texts, batch=8)
    assert [len(t) for t in batched] == [len(ids) - 1 for ids in texts if len(ids) > 1]
    for single, together in zip(one_by_one, batched, strict=True):
        assert torch.allclose(single, together, atol=1e-4)
    assert len(reader.read(["word " * 200], ["Hi?"], budget=50)) == 50
