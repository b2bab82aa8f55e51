"""`lethe sae train` on the tiny random model: the trainer learns, the saved SAE loads and fires
about k features per token, a killed and resumed run ends where an uninterrupted one does, the
report, and the error exits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lethe.gateway.cli.main import main
from lethe.models.sae.sparse_autoencoder import JumpReLUConfig, SparseAutoencoder
from lethe.models.sae.training import (
    REPORT_FILE,
    STATE_FOLDER,
    QualityReport,
    TrainConfig,
    _SelectedPre,
    _SparseDecode,
    collect_activations,
    drop_outliers,
    eval_data_texts,
    outlier_norm,
    train_sae,
)
from tests.evaluation.synthetic_data import write_eval_data

LAYER = 0
"""Of the tiny model's two: `hidden_states[-1]` is after the final norm, the other layers' are not."""
FAST = TrainConfig(layer=LAYER, expansion=4, k=8, batch_size=256, tokens=256 * 400, lr=1e-3)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _documents(n: int = 60) -> list[str]:
    words = ["river", "stone", "lantern", "harbor", "quiet", "maple", "orbit", "copper", "violet"]
    words += ["meadow", "signal", "ember"]
    return [" ".join(words[(i * 7 + j * (i % 5 + 1)) % len(words)] for j in range(40)) for i in range(n)]


@pytest.fixture(scope="module")
def acts(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> torch.Tensor:
    model, tokenizer = tiny
    return collect_activations(model, tokenizer, _documents(), LAYER)


def _fve(sae: SparseAutoencoder, x: torch.Tensor) -> float:
    error = (sae.decode(sae.encode(x)) - x).pow(2).sum()
    return 1 - (error / (x - x.mean(dim=0)).pow(2).sum()).item()


def test_activations_are_the_layer_output_without_each_texts_first_token(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = tiny
    texts = ["a short one", "and a somewhat longer text than the first"]
    got = collect_activations(model, tokenizer, texts, LAYER, batch_tokens=8)  # one text per batch
    expected = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.inference_mode():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1]
        expected.append(hidden[0, 1:])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-4, rtol=1e-4)


def test_sparse_gradients_match_dense_autograd() -> None:
    generator = torch.Generator().manual_seed(0)
    xc = torch.randn(6, 5, generator=generator, requires_grad=True)
    w_enc = torch.randn(5, 7, generator=generator, requires_grad=True)
    b_enc = torch.randn(7, generator=generator, requires_grad=True)
    w_dec = torch.randn(7, 5, generator=generator, requires_grad=True)
    mask = torch.rand(6, 7, generator=generator) < 0.4
    rows, cols = mask.nonzero(as_tuple=True)  # row-major

    def dense() -> torch.Tensor:
        return ((xc @ w_enc + b_enc) * mask) @ w_dec

    def sparse() -> torch.Tensor:
        with torch.no_grad():
            values = (xc @ w_enc + b_enc)[rows, cols]
        values = _SelectedPre.apply(values, xc, w_enc, b_enc, rows, cols)
        return _SparseDecode.apply(values, rows, cols, w_dec, 6)

    grads = []
    for forward in (dense, sparse):
        out = forward()
        (out * torch.arange(30.0).view(6, 5)).sum().backward()
        grads.append([t.grad.clone() for t in (xc, w_enc, b_enc, w_dec)])
        for t in (xc, w_enc, b_enc, w_dec):
            t.grad = None
    for expected, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_training_explains_the_variance_and_fires_about_k_features(acts: torch.Tensor) -> None:
    trained = train_sae(acts, FAST)
    assert trained is not None
    sae, result = trained
    untrained = train_sae(acts, FAST.model_copy(update={"tokens": 256, "lr": 1e-9}))
    assert untrained is not None
    print(f"FVE untrained {_fve(untrained[0], acts):.3f}, trained {_fve(sae, acts):.3f}")
    assert _fve(untrained[0], acts) < 0.25  # the mean and the tied random dictionary
    assert _fve(sae, acts) > 0.7
    assert result.train_fve > 0.5
    l0 = (sae.encode(acts) > 0).sum(dim=-1).float().mean().item()
    assert FAST.k / 2 <= l0 <= FAST.k * 2
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(sae.config.d_sae))


def test_attention_sink_tokens_are_left_out(acts: torch.Tensor) -> None:
    sink = acts[:3] * 100  # the massive activations some texts give their second token
    mixed = torch.cat([acts, sink])
    kept, dropped = drop_outliers(mixed, outlier_norm(mixed))
    assert dropped == 3 and torch.equal(kept, acts)


def test_a_killed_run_resumes_to_the_same_weights(acts: torch.Tensor, tmp_path: Path) -> None:
    config = FAST.model_copy(update={"tokens": 256 * 60, "checkpoint_every": 25})
    whole = train_sae(acts, config)
    assert whole is not None
    state = tmp_path / STATE_FOLDER
    assert train_sae(acts, config, state_dir=state, stop_after=37) is None
    assert (state / "state.pt").is_file()
    resumed = train_sae(acts, config, state_dir=state)
    assert resumed is not None and resumed[1].resumed_at == 37
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        torch.testing.assert_close(getattr(resumed[0], name), getattr(whole[0], name), atol=1e-6, rtol=1e-6)
    # a checkpoint of other hyperparameters is refused, not silently mixed in
    assert train_sae(acts, config, state_dir=state, stop_after=5) is None
    with pytest.raises(ValueError, match="different run"):
        train_sae(acts, config.model_copy(update={"k": 4}), state_dir=state)


def test_train_command_writes_a_loadable_sae_and_its_report(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LETHE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LETHE_EVAL_DATA", raising=False)
    eval_data = write_eval_data(tmp_path / "eval")
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(_documents()))
    argv = [
        "sae",
        "train",
        "--model",
        str(tiny_model_dir),
        "--layer",
        str(LAYER),
        "--eval-data",
        str(eval_data),
    ]
    argv += ["--text", str(texts), "--tokens", str(256 * 120), "--batch-size", "256", "--expansion", "4"]
    argv += ["--k", "8", "--lr", "1e-3", "--loss-tokens", "256", "--threads", "1"]
    # killed once: the rerun resumes and reads the activations back
    assert main([*argv, "--stop-after", "30"]) == 0
    out = tmp_path / "home" / "saes" / f"{tiny_model_dir.name}-L{LAYER}-x4-k8"
    assert {p.name for p in (out / STATE_FOLDER).iterdir()} == {"state.pt", "acts.pt"}
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "fraction of variance explained" in printed and "spliced / original" in printed

    assert not (out / STATE_FOLDER).exists()
    sae = SparseAutoencoder.load(out)
    assert isinstance(sae.config, JumpReLUConfig) and sae.config.normalize_activations == "none"
    assert sae.layer == LAYER and sae.config.metadata.model_name == tiny_model_dir.name
    report = QualityReport.model_validate_json((out / REPORT_FILE).read_text())
    assert (
        report.layer == LAYER and report.k == 8 and report.expansion == 4 and report.d_sae == 4 * report.d_in
    )
    assert report.steps == 120 and report.tokens_trained == 256 * 120 and report.training_seconds > 0
    assert 0 < report.fve <= 1 and report.l0 > 0 and 0 <= report.dead_share <= 1
    assert report.loss.original > 0 and report.loss.spliced > 0 and report.loss.zero_ablated > 0
    assert report.loss.spliced_ratio == pytest.approx(report.loss.spliced / report.loss.original, abs=1e-3)
    assert report.texts["held_out"] >= 1 and {"general", "rwku", "tofu", "texts.json"} <= set(report.texts)


def test_eval_data_texts_are_chat_formatted_and_not_probes(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase], tmp_path: Path
) -> None:
    _, tokenizer = tiny
    texts = eval_data_texts(tokenizer, write_eval_data(tmp_path / "eval"))
    by_source = {source for source, _ in texts}
    assert {"general", "rwku", "tofu"} <= by_source
    assert all(text.startswith("<|im_start|>") for source, text in texts if source != "rwku")
    assert all(not text.startswith("<|im_start|>") for source, text in texts if source == "rwku")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eval-data", "{missing}"], "no such folder"),
        ([], "no training texts"),
        (["--text", "{missing}/t.txt"], "no such file"),
        (["--layer", "7"], "out of range"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    extra: list[str],
    message: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LETHE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LETHE_EVAL_DATA", raising=False)
    extra = [arg.format(missing=tmp_path / "missing") for arg in extra]
    argv = ["sae", "train", "--model", str(tiny_model_dir), "--layer", str(LAYER), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert "Traceback" not in err[0]
