"""SAE features stored with their target, compiled into plans, and chosen by the mechanism the
target asks for."""

from __future__ import annotations

from pathlib import Path

from lethe.gateway.store import SQLiteStore
from lethe.guards.compiler import compile_target, plan_for
from lethe.guards.config import GuardConfig
from lethe.guards.features import SAEFeature, TargetFeatures
from lethe.guards.targets import TargetPatch, TargetSpec
from tests.support.targets import target


def features(target_id: str, version: int, *indices: int, sae: str = "sae-a") -> TargetFeatures:
    return TargetFeatures(
        target_id=target_id,
        sae=sae,
        layer=3,
        target_version=version,
        forget_tokens=100,
        features=tuple(
            SAEFeature(index=i, mean_activation=2.0, forget_rate=0.5, retain_rate=0.0) for i in indices
        ),
    )


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_store_keeps_features_of_the_current_version_only(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "lethe.db")
    created = store.create_target(TargetSpec(name="Ada Quill"))
    before = store.revision()
    assert store.put_target_features(created.id, features(created.id, 1, 4, 7))
    assert store.revision() == before + 1  # every replica's guard reloads
    assert store.put_target_features(created.id, features(created.id, 1, 5, sae="sae-b"))
    assert [f.sae for f in store.target_features(target_id=created.id)] == ["sae-a", "sae-b"]
    assert [f.features[0].index for f in store.target_features(sae="sae-a")] == [4]

    store.update_target(created.id, TargetPatch(description="a poet"))
    assert store.target_features(target_id=created.id) == []  # chosen from version 1: stale
    assert not store.put_target_features(created.id, features(created.id, 1, 4))  # too late
    assert store.put_target_features(created.id, features(created.id, 2, 6))
    store.delete_target(created.id)
    assert store.target_features() == []
    assert not store.put_target_features(created.id, features(created.id, 2, 6))


def test_suppression_picks_the_mechanisms() -> None:
    config = GuardConfig(sae_clamp_multiple=3.0)
    chosen = features("t1", 1, 4, 7)
    both = compile_target(target("t1", "Ada Quill"), encode, None, config, chosen)
    assert both.sae_clamp == ((4, -6.0), (7, -6.0)) and both.banned_sequences
    decoding = compile_target(target("t1", "Ada Quill", suppression="decoding"), encode, None, config, chosen)
    assert decoding.sae_clamp == () and decoding.banned_sequences
    sae_only = compile_target(target("t1", "Ada Quill", suppression="sae"), encode, None, config, chosen)
    assert sae_only.sae_clamp == both.sae_clamp
    assert not (sae_only.banned_sequences or sae_only.forbidden_strings or sae_only.penalized_tokens)
    unchosen = compile_target(target("t1", "Ada Quill"), encode, None, config, None)
    assert unchosen.sae_clamp == ()


def test_plan_merges_clamps_of_fired_targets() -> None:
    config = GuardConfig(sae_clamp_multiple=1.0)
    first = compile_target(target("t1", "Ada Quill"), encode, None, config, features("t1", 1, 4, 7))
    second_features = features("t2", 1, 7, 9).model_copy(
        update={"features": (SAEFeature(index=7, mean_activation=5.0, forget_rate=0.5, retain_rate=0.0),)}
    )
    second = compile_target(target("t2", "Bo Quill"), encode, None, config, second_features)
    plan = plan_for([first, second], config)
    assert plan.sae_clamp == ((4, -2.0), (7, -5.0))  # one value per feature: the stronger clamp
    assert plan_for([], config).sae_clamp == ()
