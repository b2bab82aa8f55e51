"""The SAE format (sae-lens's on disk), the clamp's arithmetic, and feature choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lethe.guards.features import SelectionConfig
from lethe.guards.plan import GuardPlan
from lethe.models.engine import GenerationRequest, SamplingParams
from lethe.models.sae.clamp import FeatureClamp
from lethe.models.sae.features import firing, firing_share, select_features
from lethe.models.sae.sparse_autoencoder import CONFIG_FILE, SparseAutoencoder, TopKConfig
from tests.support.sae import random_sae


def row(clamp: tuple[tuple[int, float], ...] = ()) -> GenerationRequest:
    return GenerationRequest("r", (1, 2), SamplingParams(max_tokens=1), GuardPlan(sae_clamp=clamp))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    sae = random_sae(16, 64, layer=3, threshold=0.1)
    sae.save(tmp_path)
    loaded = SparseAutoencoder.load(tmp_path)
    assert loaded.layer == 3 and loaded.config.architecture == "jumprelu"
    assert loaded.fingerprint == sae.fingerprint
    x = torch.randn(5, 16)
    assert torch.equal(loaded.encode(x), sae.encode(x))


@pytest.mark.parametrize(
    "layout",
    [
        {"meta": {"hook_name": "blocks.3.hook_resid_post"}},  # sae-lens 6.0 to 6.x
        {"metadata": {"hook_name": "blocks.3.hook_resid_post", "model_name": "gemma-2-2b"}},
        {"hook_name": "blocks.3.hook_resid_post", "hook_layer": 3},  # sae-lens 5
    ],
)
def test_reads_each_sae_lens_config_layout(tmp_path: Path, layout: dict[str, object]) -> None:
    random_sae(16, 64, layer=3).save(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config.pop("metadata")
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, **layout}))
    assert SparseAutoencoder.load(tmp_path).layer == 3


def test_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cfg\.json"):
        SparseAutoencoder.load(tmp_path)
    random_sae(16, 64, layer=3).save(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(
        json.dumps({**config, "metadata": {"hook_name": "blocks.3.attn.hook_z"}})
    )
    with pytest.raises(ValueError, match="hook_resid_post"):
        _ = SparseAutoencoder.load(tmp_path).layer
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "d_sae": 65}))
    with pytest.raises(ValueError, match="shape"):
        SparseAutoencoder.load(tmp_path)


def test_clamp_changes_exactly_the_firing_selected_features() -> None:
    sae = random_sae(16, 64, layer=0)
    stream = torch.randn(7, 16, generator=torch.Generator().manual_seed(1))
    clamp = ((1, -3.0), (5, -2.0), (9, -4.0))
    out = FeatureClamp(sae).apply(stream, clamp)

    before = sae.encode(stream)
    indices = [f for f, _ in clamp]
    # The reconstruction error is kept: out - decode(clamped features) == stream - decode(features).
    clamped = before.clone()
    for feature, value in clamp:
        clamped[:, feature] = torch.where(before[:, feature] > 0, torch.tensor(value), before[:, feature])
    assert torch.allclose(out - sae.decode(clamped), stream - sae.decode(before), atol=1e-5)
    # Tokens where no selected feature fires are untouched, byte for byte.
    silent = (before[:, indices] == 0).all(dim=1)
    assert torch.equal(out[silent], stream[silent])
    assert not torch.equal(out, stream)


def test_clamp_touches_only_rows_that_ask_for_it() -> None:
    clamp = FeatureClamp(random_sae(16, 64, layer=0))
    hidden = torch.randn(3, 4, 16)
    assert clamp(hidden, [row(), row(), row()]) is None
    out = clamp(hidden, [row(), row(((0, -5.0), (1, -5.0))), row()])
    assert out is not None
    assert torch.equal(out[0], hidden[0]) and torch.equal(out[2], hidden[2])
    assert not torch.equal(out[1], hidden[1])


def test_topk_sae_fires_by_rank() -> None:
    base = random_sae(16, 64, layer=0)
    config = TopKConfig(d_in=16, d_sae=64, k=4, metadata=base.config.metadata)
    weights = {name: getattr(base, name) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    sae = SparseAutoencoder(config, weights)
    features = sae.encode(torch.randn(5, 16))
    assert ((features > 0).sum(dim=1) <= 4).all()
    out = FeatureClamp(sae).apply(torch.randn(5, 16), [(0, -1.0)])
    assert out.shape == (5, 16)


def test_selection_prefers_features_silent_on_retain_text() -> None:
    sae = random_sae(8, 8, layer=0)
    sae.W_enc, sae.W_dec = torch.eye(8), torch.eye(8)  # feature i is coordinate i's positive part
    forget = torch.zeros(100, 8)
    forget[:, 0] = 2.0  # feature 0: every forget token, and common on retain text
    forget[:40, 1] = 3.0  # feature 1: 40% of forget tokens, silent on retain text
    forget[:5, 2] = 1.0  # feature 2: 5%, silent on retain text
    forget[:, 3] = -1.0  # feature 3: never fires
    general, chat = torch.zeros(60, 8), torch.zeros(40, 8)
    general[:50, 0] = 1.0
    chat[:1, 2] = 1.0  # feature 2 fires on one token of 40 of one general text: 1% overall
    config = SelectionConfig(min_forget_rate=0.03, max_retain_rate=0.02, min_detect_share=0.01)
    chosen = select_features(sae, forget, [general, chat], "t", 2, config)
    assert [f.index for f in chosen.features] == [1, 2]
    assert chosen.features[0].mean_activation == pytest.approx(3.0)
    assert chosen.features[0].forget_rate == pytest.approx(0.4)
    assert chosen.features[1].retain_rate == pytest.approx(0.01)
    assert (chosen.target_id, chosen.target_version, chosen.forget_tokens) == ("t", 2, 100)
    assert chosen.clamp(4.0) == ((1, -12.0), (2, -4.0))
    # Detection must beat every general text: feature 2 fired on 1 token of 40 of one of them.
    assert chosen.detect_share == pytest.approx(1 / 40, abs=1e-5)
    assert firing_share(sae, forget, [1, 2]) == pytest.approx(0.4)
    capped = select_features(
        sae, forget, [general, chat], "t", 2, config.model_copy(update={"max_features": 1})
    )
    assert [f.index for f in capped.features] == [1]
    assert capped.detect_share == pytest.approx(0.01)  # feature 1 fires on no general text: the floor


def test_random_control_takes_as_many_features_at_random() -> None:
    sae = random_sae(8, 64, layer=0)
    forget = torch.randn(200, 8, generator=torch.Generator().manual_seed(3))
    config = SelectionConfig(min_forget_rate=0.01, max_retain_rate=1.0, max_features=5)
    chosen = select_features(sae, forget, [], "t", 1, config)
    control = select_features(sae, forget, [], "t", 1, config.model_copy(update={"strategy": "random"}))
    again = select_features(sae, forget, [], "t", 1, config.model_copy(update={"strategy": "random"}))
    assert len(control.features) == len(chosen.features) == 5
    assert [f.index for f in control.features] != [f.index for f in chosen.features]
    assert control == again  # seeded by the target
    assert all(f.mean_activation > 0 for f in control.features)


def test_clamp_leaves_attention_sinks_alone() -> None:
    sae = random_sae(16, 64, layer=0)
    sae.config.metadata.outlier_norm = 50.0
    stream = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    stream[0] *= 100  # an attention sink: far longer than anything the SAE was trained on
    clamp = tuple((i, -5.0) for i in range(64))
    out = FeatureClamp(sae).apply(stream, clamp)
    assert torch.equal(out[0], stream[0])
    assert not torch.equal(out[1:], stream[1:])
    rates, _ = firing(sae, stream)
    assert rates.max() <= 1.0 and firing_share(sae, stream[:1], list(range(64))) == 0.0
