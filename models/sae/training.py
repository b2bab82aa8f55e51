"""Train a BatchTopK sparse autoencoder on one layer of the served model's residual stream.

sae-lens is not used: it imports TransformerLens and wandb at import time.

The pieces, in the order `train_and_report` runs them:

- `training_texts`: local text only (the evaluation data's non-probe texts, the user's files, and
  optionally the model's own answers), chat-formatted as the gateway renders requests.
- `split_texts`: a seeded 5% of the texts is held out for the quality report.
- `collect_activations`: the output of `model.model.layers[L]` for every token but each text's
  first (whose norm is an outlier), float32, under `torch.inference_mode()`.
- `train_sae`: BatchTopK (the k x batch largest ReLU pre-activations of the whole batch are kept;
  a running threshold, the EMA of the smallest kept one, makes it a JumpReLU SAE at inference),
  Adam with warm-up and a linear decay over the last fifth, unit-norm decoder rows, AuxK on dead
  features. Inputs are scaled to mean norm sqrt(d_in) while training; the scale is folded into the
  saved weights (the decoder rows stay unit norm, activations are in residual-stream units), so
  `normalize_activations` stays "none". A checkpoint under `<out>/.training/` survives a kill.
- `evaluate_sae`: explained variance, L0 and dead share on held-out tokens, and the next-token
  loss with the reconstruction spliced in at the layer, against the model as is and with the
  layer's output zero-ablated.

Every text's first position is left alone by the splice and the ablation as it is by training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from pydantic import BaseModel, Field
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lethe.models.sae.sparse_autoencoder import JumpReLUConfig, SAEMetadata, SparseAutoencoder

STATE_FOLDER = ".training"
STATE_FILE = "state.pt"
ACTS_FILE = "acts.pt"
ANSWERS_FILE = "answers.json"
REPORT_FILE = "report.json"
HELD_OUT_SHARE = 0.05
MAX_LENGTH = 1024
"""Tokens per text; longer plain texts are cut into pieces of about this length."""
ANSWER_TOKENS = 64
DEAD_SAMPLE_TOKENS = 50_000
"""Training tokens encoded, besides the held-out ones, to count the features that never fire."""
OUTLIER_FACTOR = 10.0
"""Tokens whose residual norm passes this many times the median are neither trained on nor spliced.
Some plain texts (no BOS) make their second token an attention sink as well as their first: at
SmolLM2's layer 12, four such tokens among 50,000, of norm 40-150 times the median, held 73% of the
variance, and an SAE trained with them spent itself on them."""


class Progress(Protocol):
    """What the trainer reports to (`lethe.gateway.cli.progress.RichProgress` implements it)."""

    def update(self, fraction: float, message: str) -> None: ...

    def log(self, line: str) -> None: ...


class NoProgress:
    def update(self, fraction: float, message: str) -> None:
        pass

    def log(self, line: str) -> None:
        pass


class _Stage:
    """Maps a stage's own [0, 1] onto [start, end] of the whole run."""

    def __init__(self, progress: Progress, start: float, end: float) -> None:
        self.progress, self.start, self.end = progress, start, end

    def update(self, fraction: float, message: str) -> None:
        self.progress.update(self.start + (self.end - self.start) * min(max(fraction, 0.0), 1.0), message)

    def log(self, line: str) -> None:
        self.progress.log(line)


# ------------------------------------------------------------------------------------------ texts
class SourceText(NamedTuple):
    source: str
    text: str


def _chat(tokenizer: PreTrainedTokenizerBase, user: str, assistant: str | None = None) -> str:
    if not getattr(tokenizer, "chat_template", None):
        return user if assistant is None else f"{user}\n{assistant}"
    messages = [{"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=assistant is None)


def _pieces(tokenizer: PreTrainedTokenizerBase, text: str, size: int) -> list[str]:
    """A plain text cut into pieces of about `size` tokens (at token boundaries)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= size:
        return [text]
    return [tokenizer.decode(ids[i : i + size]) for i in range(0, len(ids), size)]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not readable JSON ({error})") from None


def eval_data_texts(tokenizer: PreTrainedTokenizerBase, folder: Path) -> list[SourceText]:
    """The evaluation data's texts that are not probes: general instructions (user turns), RWKU
    passages (plain), TOFU world facts and real authors and the TOFU fictitious authors' pairs
    (user/assistant exchanges)."""
    texts: list[SourceText] = []
    instructions = folder / "general" / "instructions.json"
    if instructions.is_file():
        texts += [SourceText("general", _chat(tokenizer, r["instruction"])) for r in _read_json(instructions)]
    for passage in sorted(folder.glob("rwku/*/passage.json")):
        for row in _read_json(passage):
            texts += [SourceText("rwku", piece) for piece in _pieces(tokenizer, row["text"], MAX_LENGTH - 24)]
    for name in ("world_facts_perturbed", "real_authors_perturbed"):
        path = folder / "tofu" / f"{name}.json"
        if path.is_file():
            texts += [
                SourceText("tofu", _chat(tokenizer, r["question"], r["answer"])) for r in _read_json(path)
            ]
    for path in sorted(folder.glob("tofu_authors/*.json")):
        for author in _read_json(path):
            texts += [
                SourceText("tofu_authors", _chat(tokenizer, qa["question"], qa["answer"]))
                for qa in author["qa"]
            ]
    return texts


def file_texts(tokenizer: PreTrainedTokenizerBase, path: Path) -> list[SourceText]:
    """A `--text` file: a JSON list of strings, else the whole file as one document (cut into
    pieces of the context length when longer)."""
    if not path.is_file():
        raise ValueError(f"--text {path}: no such file")
    try:
        raw = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--text {path}: not a readable text file ({error})") from None
    documents: list[str] = [raw]
    if path.suffix == ".json":
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
            documents = parsed
    return [
        SourceText(path.name, piece)
        for document in documents
        if document.strip()
        for piece in _pieces(tokenizer, document, MAX_LENGTH - 24)
    ]


def training_texts(
    tokenizer: PreTrainedTokenizerBase,
    *,
    eval_data: Path | None = None,
    text_files: Sequence[Path] = (),
    model: PreTrainedModel | None = None,
    answers: int = 0,
    progress: Progress | None = None,
) -> list[SourceText]:
    """Every training text: the evaluation data's (a), the user's files (b), and the model's own
    greedy answers to the first `answers` general instructions (c). ValueError when there are
    none or a source is unreadable."""
    texts: list[SourceText] = []
    if eval_data is not None:
        if not eval_data.is_dir():
            raise ValueError(
                f"evaluation data folder {eval_data} does not exist (--eval-data or LETHE_EVAL_DATA)"
            )
        texts += eval_data_texts(tokenizer, eval_data)
    for path in text_files:
        texts += file_texts(tokenizer, path)
    if not texts:
        raise ValueError(
            "no training texts: pass --eval-data DIR (or set LETHE_EVAL_DATA) or --text FILE"
            + (f"; {eval_data} holds none of general/, rwku/, tofu/, tofu_authors/" if eval_data else "")
        )
    if answers > 0:
        texts += answer_texts(model, tokenizer, eval_data, answers, progress)
    return texts


def answer_texts(
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    eval_data: Path | None,
    answers: int,
    progress: Progress | None = None,
) -> list[SourceText]:
    """The model's greedy answers (64 new tokens at most) to the first `answers` general
    instructions, as user/assistant exchanges."""
    instructions = eval_data / "general" / "instructions.json" if eval_data else None
    if instructions is None or not instructions.is_file():
        raise ValueError("--answers needs the general instructions of the evaluation data (--eval-data)")
    if model is None:
        raise ValueError("--answers needs the model")
    from lethe.models.unlearning.generation import greedy_answers

    prompts = [r["instruction"] for r in _read_json(instructions)][:answers]
    step = progress.update if progress is not None else (lambda _f, _m: None)
    replies = greedy_answers(model, tokenizer, prompts, max_new_tokens=ANSWER_TOKENS, step=step)
    return [SourceText("answers", _chat(tokenizer, p, a)) for p, a in zip(prompts, replies, strict=True)]


def split_texts(
    texts: Sequence[SourceText], seed: int, share: float = HELD_OUT_SHARE
) -> tuple[list[SourceText], list[SourceText]]:
    """(train, held out): a seeded shuffle, `share` of the texts (at least one) held out."""
    if len(texts) < 2:
        raise ValueError("at least two texts are needed (one is held out for the quality report)")
    order = list(range(len(texts)))
    random.Random(f"sae-split:{seed}").shuffle(order)
    held = max(1, round(len(texts) * share))
    return [texts[i] for i in order[held:]], [texts[i] for i in order[:held]]


# ------------------------------------------------------------------------------------ activations
def _token_ids(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> list[int]:
    # Chat-formatted texts carry their own special tokens; plain ones get what the tokenizer adds.
    bos = tokenizer.bos_token
    special = not (bos and text.startswith(bos))
    return list(tokenizer.encode(text, add_special_tokens=special))[:max_length]


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _batches(lengths: Sequence[int], batch_tokens: int) -> Iterator[list[int]]:
    """Indices grouped by similar length, each group under `batch_tokens` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    group: list[int] = []
    for index in order:
        if group and lengths[index] * (len(group) + 1) > batch_tokens:
            yield group
            group = []
        group.append(index)
    if group:
        yield group


def _padded(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _StopForward(Exception):
    pass


def collect_layers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    max_tokens: int | None = None,
    max_length: int = MAX_LENGTH,
    batch_tokens: int = 4096,
    progress: Progress | None = None,
) -> dict[int, torch.Tensor]:
    """`collect_activations` for several layers in one pass (the forward stops after the deepest).
    With `max_tokens`, only the first texts (in order) that give that many tokens are run."""
    sequences = [_token_ids(tokenizer, text, max_length) for text in texts]
    if max_tokens is not None:
        kept, total = [], 0
        for sequence in sequences:
            if total >= max_tokens:
                break
            kept.append(sequence)
            total += max(len(sequence) - 1, 0)
        sequences = kept
    sequences = [s for s in sequences if len(s) > 1]
    starts = [0]
    for sequence in sequences:
        starts.append(starts[-1] + len(sequence) - 1)
    d_in = model.config.hidden_size
    out = {layer: torch.empty((starts[-1], d_in), dtype=torch.float32) for layer in layers}
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def hook_for(layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[layer] = _hidden(output)
            if layer == deepest:
                raise _StopForward

        return hook

    blocks = model.model.layers
    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in set(layers)]
    device = next(model.parameters()).device
    done = 0
    try:
        with torch.inference_mode():
            for group in _batches([len(s) for s in sequences], batch_tokens):
                ids, mask = _padded([sequences[i] for i in group], _pad_id(tokenizer))
                with suppress(_StopForward):
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                for layer in layers:
                    hidden = captured[layer].float().cpu()
                    for row, index in enumerate(group):
                        out[layer][starts[index] : starts[index + 1]] = hidden[row, 1 : len(sequences[index])]
                done += sum(len(sequences[i]) - 1 for i in group)
                if progress is not None:
                    progress.update(done / max(starts[-1], 1), f"activations: {done:,}/{starts[-1]:,} tokens")
    finally:
        for handle in handles:
            handle.remove()
    if max_tokens is not None:
        out = {layer: acts[:max_tokens] for layer, acts in out.items()}
    return out


def collect_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    layer: int,
    **options: Any,
) -> torch.Tensor:
    """Residual-stream vectors [n_tokens, d_in] (float32) after `model.model.layers[layer]`, every
    token of every text but its first, texts in order (see `collect_layers` for the options)."""
    return collect_layers(model, tokenizer, texts, [layer], **options)[layer]


def outlier_norm(acts: torch.Tensor) -> float:
    """The norm above which a token is an outlier (`OUTLIER_FACTOR` x the median)."""
    return OUTLIER_FACTOR * acts.norm(dim=-1).median().item() if len(acts) else math.inf


def drop_outliers(acts: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, int]:
    """The tokens of norm at most `max_norm`, and how many were dropped."""
    keep = acts.norm(dim=-1) <= max_norm
    dropped = int((~keep).sum())
    return (acts[keep] if dropped else acts), dropped


# --------------------------------------------------------------------------------------- training
class TrainConfig(BaseModel):
    """A training run's hyperparameters (the run's identity, with the data, for resuming)."""

    layer: int = Field(ge=0)
    expansion: int = Field(8, ge=1, description="d_sae = expansion x d_in")
    k: int = Field(32, ge=1, description="mean active features per token (BatchTopK)")
    lr: float = Field(4e-4, gt=0)
    batch_size: int = Field(4096, ge=1, description="tokens per step")
    tokens: int = Field(
        2_000_000, ge=1, description="training tokens (passes over the activations as needed)"
    )
    seed: int = 0
    warmup_steps: int = Field(100, ge=0, description="linear warm-up, at most a tenth of the steps")
    decay_share: float = Field(
        0.2, ge=0, le=1, description="linear decay to 0 over this last share of the steps"
    )
    aux_coefficient: float = Field(1 / 32, ge=0, description="AuxK loss weight (TopK paper)")
    dead_after_tokens: int = Field(
        100_000, ge=1, description="a feature not active for this many tokens is dead"
    )
    threshold_lr: float = Field(0.01, gt=0, le=1, description="EMA rate of the BatchTopK threshold")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints of a resumable run")

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / self.batch_size))

    def key(self, data_key: str) -> str:
        payload = json.dumps({"config": self.model_dump(exclude={"checkpoint_every"}), "data": data_key})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class _BatchTopK(nn.Module):
    """The trained parameters, on inputs scaled by `scale`."""

    def __init__(self, d_in: int, d_sae: int, generator: torch.Generator) -> None:
        super().__init__()
        w_dec = torch.randn(d_sae, d_in, generator=generator)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))


def _coo(
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """A sparse matrix from entries in row-major order (so already coalesced)."""
    return torch.sparse_coo_tensor(
        torch.stack([rows, cols]), values, shape, is_coalesced=True, check_invariants=False
    )


class _SelectedPre(torch.autograd.Function):
    """The pre-activations `(xc @ W_enc + b_enc)[rows, cols]`, given as `values` (computed densely
    without a graph), with a gradient that costs entries x d_in instead of a dense batch x d_sae
    matmul; entries are in row-major order."""

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        xc: torch.Tensor,
        w_enc: torch.Tensor,
        b_enc: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(xc, w_enc, rows, cols)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc, w_enc, rows, cols = ctx.saved_tensors
        g = _coo(rows, cols, grad, (xc.shape[0], w_enc.shape[1]))
        grad_xc = torch.sparse.mm(g, w_enc.T.contiguous())
        grad_w_enc = torch.sparse.mm(g.t().coalesce(), xc).T
        grad_b_enc = torch.zeros(w_enc.shape[1], dtype=grad.dtype).index_add_(0, cols, grad)
        return None, grad_xc, grad_w_enc, grad_b_enc, None, None


class _SparseDecode(torch.autograd.Function):
    """`S @ W_dec` for S sparse (values at rows, cols in row-major order)."""

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        w_dec: torch.Tensor,
        n_rows: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(values, rows, cols, w_dec)
        ctx.n_rows = n_rows
        return torch.sparse.mm(_coo(rows, cols, values, (n_rows, w_dec.shape[0])), w_dec)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, rows, cols, w_dec = ctx.saved_tensors
        s = _coo(rows, cols, values, (ctx.n_rows, w_dec.shape[0]))
        grad_values = (grad @ w_dec.T)[rows, cols]
        grad_w_dec = torch.sparse.mm(s.t().coalesce(), grad)
        return grad_values, None, None, grad_w_dec, None


def _batch_top(
    pre: torch.Tensor, count: int, floor: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `count` largest positive entries of `pre` [batch, n] as (values, rows, cols), row-major.
    Entries under `floor` (a lower bound of the answer's smallest; 0 for none) are not sorted."""
    flat = pre.flatten()
    candidates = (flat > floor).nonzero().flatten()
    if floor <= 0 or len(candidates) < count:
        candidates = (flat > 0).nonzero().flatten()
    if len(candidates) > count:
        candidates = candidates[flat[candidates].topk(count, sorted=False).indices]
    index = candidates.sort().values
    return flat[index], index // pre.shape[1], index % pre.shape[1]


class TrainResult(BaseModel):
    steps: int
    tokens: int
    seconds: float
    threshold: float
    scale: float
    train_fve: float
    """Explained variance of the last 10% of training batches (running)."""
    resumed_at: int | None = None


def _atomic_save(obj: Any, path: Path) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, temp)
    os.replace(temp, path)


def train_sae(
    acts: torch.Tensor,
    config: TrainConfig,
    *,
    state_dir: Path | None = None,
    data_key: str = "",
    stop_after: int | None = None,
    progress: Progress | None = None,
) -> tuple[SparseAutoencoder, TrainResult] | None:
    """Train on `acts` [n, d_in]; the SAE for the raw residual stream and how training went.

    With `state_dir`, a checkpoint is written there every `checkpoint_every` steps and a run with
    the same config and `data_key` resumes from it. `stop_after` stops after that many steps of
    this call (checkpointed; None is returned): a kill, simulated."""
    progress = progress or NoProgress()
    n, d_in = acts.shape
    d_sae = config.expansion * d_in
    if n < config.batch_size:
        raise ValueError(f"{n} activation tokens, fewer than one batch of {config.batch_size}")
    steps, batch, k = config.steps, config.batch_size, config.k
    k_aux = max(1, d_in // 2)
    warmup = min(config.warmup_steps, steps // 10)
    decay_from = steps - int(steps * config.decay_share)
    per_epoch = n // batch
    run_key = config.key(data_key)

    generator = torch.Generator().manual_seed(config.seed)
    sae = _BatchTopK(d_in, d_sae, generator)
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr, betas=(0.9, 0.999))
    scale = math.sqrt(d_in) / acts.norm(dim=-1).mean().item()
    threshold: float | None = None
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    fve_window: list[tuple[float, float]] = []
    step, seconds, resumed_at = 0, 0.0, None
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(dim=0) * scale)

    state_path = state_dir / STATE_FILE if state_dir is not None else None
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["run_key"] != run_key:
            raise ValueError(
                f"{state_dir} holds the checkpoint of a different run (other data or hyperparameters);"
                " remove it to start over, or choose another --output"
            )
        sae.load_state_dict(state["sae"])
        optimizer.load_state_dict(state["optimizer"])
        step, seconds, threshold = state["step"], state["seconds"], state["threshold"]
        since_fired, fve_window, scale = state["since_fired"], state["fve_window"], state["scale"]
        torch.set_rng_state(state["rng"])
        resumed_at = step
        progress.log(f"resumed from step {step}/{steps} ({state_path})")

    def save_state() -> None:
        assert state_dir is not None
        state_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "run_key": run_key,
            "sae": sae.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "seconds": seconds,
            "threshold": threshold,
            "since_fired": since_fired,
            "fve_window": fve_window,
            "scale": scale,
            "rng": torch.get_rng_state(),
        }
        _atomic_save(state, state_dir / STATE_FILE)

    permutation: torch.Tensor | None = None
    epoch_of_permutation = -1
    started, ran = time.perf_counter(), 0
    while step < steps:
        epoch, position = divmod(step, per_epoch)
        if epoch != epoch_of_permutation:
            permutation = torch.randperm(
                n, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch)
            )
            epoch_of_permutation = epoch
        assert permutation is not None
        x = acts[permutation[position * batch : (position + 1) * batch]] * scale

        lr = config.lr * min(1.0, (step + 1) / warmup if warmup else 1.0)
        if step >= decay_from:
            lr *= (steps - step) / max(steps - decay_from, 1)
        for group in optimizer.param_groups:
            group["lr"] = lr

        xc = x - sae.b_dec
        with torch.no_grad():
            pre = xc @ sae.W_enc + sae.b_enc
            floor = threshold * 0.5 if threshold is not None else 0.0
            values, rows, cols = _batch_top(pre, k * batch, floor)
        values = _SelectedPre.apply(values, xc, sae.W_enc, sae.b_enc, rows, cols)
        x_hat = _SparseDecode.apply(values, rows, cols, sae.W_dec, batch) + sae.b_dec
        error = x_hat - x
        mse = error.pow(2).sum(dim=-1).mean()
        loss = mse

        with torch.no_grad():
            fired = torch.zeros(d_sae, dtype=torch.bool)
            fired[cols] = True
            since_fired += batch
            since_fired[fired] = 0
            smallest = values.min().item() if len(values) else 0.0
            threshold = (
                smallest
                if threshold is None
                else (1 - config.threshold_lr) * threshold + (config.threshold_lr * smallest)
            )
        dead = (since_fired >= config.dead_after_tokens).nonzero().flatten()
        if len(dead) and config.aux_coefficient > 0:
            # AuxK: the dead features' k_aux largest pre-activations per token reconstruct the error.
            with torch.no_grad():
                dead_pre = pre[:, dead]
                top = dead_pre.topk(min(k_aux, len(dead)), dim=-1)
                keep = top.values > 0
                aux_rows = torch.arange(batch).unsqueeze(1).expand_as(top.indices)[keep]
                aux_cols = top.indices[keep]
                order = (aux_rows * len(dead) + aux_cols).sort().indices
                aux_rows, aux_cols = aux_rows[order], aux_cols[order]
                aux_values = dead_pre[aux_rows, aux_cols]
            if len(aux_values):
                aux_values = _SelectedPre.apply(
                    aux_values, xc, sae.W_enc[:, dead], sae.b_enc[dead], aux_rows, aux_cols
                )
                aux_hat = _SparseDecode.apply(aux_values, aux_rows, aux_cols, sae.W_dec[dead], batch)
                aux = (aux_hat + error.detach()).pow(2).sum(dim=-1).mean()  # reconstructs x - x_hat
                loss = loss + config.aux_coefficient * min(len(dead) / k_aux, 1.0) * aux

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            grad = sae.W_dec.grad
            assert grad is not None
            grad -= (grad * sae.W_dec).sum(dim=-1, keepdim=True) * sae.W_dec
        optimizer.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
            total = (x - x.mean(dim=0)).pow(2).sum().item()
        fve_window = [*fve_window, (mse.item() * batch, total)][-max(1, steps // 10) :]
        step += 1
        ran += 1
        now = time.perf_counter()
        seconds += now - started
        started = now
        if step % 10 == 0 or step == steps:
            fve = 1 - sum(e for e, _ in fve_window) / max(sum(t for _, t in fve_window), 1e-12)
            dead_share = (since_fired >= config.dead_after_tokens).float().mean().item()
            progress.update(
                step / steps, f"step {step}/{steps}: FVE {fve:.3f}, dead {dead_share:.1%}, lr {lr:.1e}"
            )
        if (
            state_dir is not None
            and step < steps
            and (step % config.checkpoint_every == 0 or ran == stop_after)
        ):
            save_state()
        if stop_after is not None and ran >= stop_after and step < steps:
            progress.log(f"stopped after step {step}/{steps}; a rerun resumes from {state_dir}")
            return None

    assert threshold is not None
    with torch.no_grad():
        # Fold the input scale in: pre-activations and features divide by it, the decoder rows stay
        # unit norm, so an activation is the length of its row's contribution to the residual.
        weights = {
            "W_enc": sae.W_enc.detach().clone(),
            "b_enc": sae.b_enc.detach() / scale,
            "W_dec": sae.W_dec.detach().clone(),
            "b_dec": sae.b_dec.detach() / scale,
            "threshold": torch.full((d_sae,), threshold / scale),
        }
    fve = 1 - sum(e for e, _ in fve_window) / max(sum(t for _, t in fve_window), 1e-12)
    result = TrainResult(
        steps=steps,
        tokens=steps * batch,
        seconds=round(seconds, 2),
        threshold=threshold / scale,
        scale=scale,
        train_fve=round(fve, 4),
        resumed_at=resumed_at,
    )
    config_out = JumpReLUConfig(
        d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=_hook_name(config.layer))
    )
    return SparseAutoencoder(config_out, weights), result


def _hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


# ------------------------------------------------------------------------------------- evaluation
class LossReport(BaseModel):
    tokens: int
    original: float
    spliced: float
    zero_ablated: float
    spliced_ratio: float
    """spliced / original: 1.0 is a perfect splice."""
    recovered: float
    """(zero_ablated - spliced) / (zero_ablated - original): sae-lens's "CE loss score"."""


class QualityReport(BaseModel):
    model: str
    layer: int
    hook_name: str
    d_in: int
    d_sae: int
    expansion: int
    k: int
    batch_size: int
    lr: float
    seed: int
    steps: int
    tokens_trained: int
    tokens_collected: int
    tokens_held_out: int
    texts: dict[str, int]
    """Training texts per source, and `held_out`."""
    training_seconds: float
    collection_seconds: float
    outlier_norm: float
    """Tokens of a larger residual norm (`OUTLIER_FACTOR` x the median) were left out and not spliced."""
    outliers_dropped: dict[str, int]
    threshold: float
    train_fve: float
    fve: float
    l0: float
    dead_share: float
    dead_features: int
    loss: LossReport


@contextmanager
def _replace_layer_output(
    model: PreTrainedModel,
    layer: int,
    replace: Callable[[torch.Tensor], torch.Tensor],
    max_norm: float = math.inf,
):
    """Every position of `model.model.layers[layer]`'s output but the first and those of norm over
    `max_norm` goes through `replace` (as training saw them)."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        hidden = _hidden(output)
        rest = hidden[:, 1:].float()
        keep = (rest.norm(dim=-1, keepdim=True) <= max_norm) if math.isfinite(max_norm) else True
        new = hidden.clone()
        new[:, 1:] = torch.where(keep, replace(rest), rest).to(hidden.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def lm_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_tokens: int | None = None,
    batch_tokens: int = 4096,
) -> tuple[float, int]:
    """Mean next-token cross-entropy over the texts (the first ones up to `max_tokens` predicted
    tokens), and the number of tokens it averages."""
    sequences, total = [], 0
    for text in texts:
        ids = _token_ids(tokenizer, text, MAX_LENGTH)
        if len(ids) < 2:
            continue
        if max_tokens is not None and total >= max_tokens:
            break
        sequences.append(ids)
        total += len(ids) - 1
    device = next(model.parameters()).device
    loss_sum, count = 0.0, 0
    with torch.inference_mode():
        for group in _batches([len(s) for s in sequences], batch_tokens):
            ids, mask = _padded([sequences[i] for i in group], _pad_id(tokenizer))
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            labels = ids.masked_fill(mask == 0, -100)[:, 1:].to(device)
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            )
            loss_sum += losses.item()
            count += int((labels != -100).sum())
    return loss_sum / max(count, 1), count


def _encode_chunks(
    sae: SparseAutoencoder, acts: torch.Tensor, chunk: int = 4096
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(acts), chunk):
        x = acts[start : start + chunk]
        yield x, sae.encode(x)


def evaluate_sae(
    sae: SparseAutoencoder,
    held_out: torch.Tensor,
    *,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    held_out_texts: Sequence[str],
    train_sample: torch.Tensor | None = None,
    loss_tokens: int | None = 8192,
    original_loss: tuple[float, int] | None = None,
    max_norm: float = math.inf,
) -> dict[str, Any]:
    """FVE, L0 and dead share on held-out activations (the saved JumpReLU, as serving sees it),
    and the next-token loss spliced and zero-ablated at the SAE's layer."""
    mean = held_out.mean(dim=0)
    error = total = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.config.d_sae, dtype=torch.bool)
    with torch.inference_mode():
        for x, features in _encode_chunks(sae, held_out):
            error += (sae.decode(features) - x).pow(2).sum().item()
            total += (x - mean).pow(2).sum().item()
            active = features > 0
            l0 += active.sum().item()
            fired |= active.any(dim=0)
        if train_sample is not None:
            for _x, features in _encode_chunks(sae, train_sample):
                fired |= (features > 0).any(dim=0)
    original = original_loss or lm_loss(model, tokenizer, held_out_texts, max_tokens=loss_tokens)
    with _replace_layer_output(model, sae.layer, lambda h: sae.decode(sae.encode(h)), max_norm):
        spliced, _ = lm_loss(model, tokenizer, held_out_texts, max_tokens=loss_tokens)
    with _replace_layer_output(model, sae.layer, torch.zeros_like, max_norm):
        zero, _ = lm_loss(model, tokenizer, held_out_texts, max_tokens=loss_tokens)
    base = original[0]
    return {
        "fve": round(1 - error / max(total, 1e-12), 4),
        "l0": round(l0 / max(len(held_out), 1), 2),
        "dead_share": round(1 - fired.float().mean().item(), 4),
        "dead_features": int((~fired).sum()),
        "loss": LossReport(
            tokens=original[1],
            original=round(base, 4),
            spliced=round(spliced, 4),
            zero_ablated=round(zero, 4),
            spliced_ratio=round(spliced / base, 4),
            recovered=round((zero - spliced) / (zero - base), 4) if zero != base else 0.0,
        ),
    }


# ----------------------------------------------------------------------------------- the whole run
def _texts_key(texts: Sequence[SourceText]) -> str:
    digest = hashlib.sha256()
    for item in texts:
        digest.update(item.source.encode() + b"\0" + item.text.encode() + b"\0")
    return digest.hexdigest()[:16]


def _sample(acts: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if len(acts) <= n:
        return acts
    return acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(seed))[:n]]


def _counts(texts: Sequence[SourceText]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in texts:
        counts[item.source] = counts.get(item.source, 0) + 1
    return counts


def cached_answer_texts(
    out: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eval_data: Path | None,
    answers: int,
    *,
    model_name: str,
    progress: Progress | None = None,
) -> list[SourceText]:
    """`answer_texts`, kept in `<out>/.training/answers.json`: a resumed run reads them back rather
    than generating them again."""
    cache = out / STATE_FOLDER / ANSWERS_FILE
    instructions = eval_data / "general" / "instructions.json" if eval_data else None
    content = instructions.read_bytes() if instructions is not None and instructions.is_file() else b""
    key = f"{model_name}:{answers}:{hashlib.sha256(content).hexdigest()[:16]}"
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    if saved.get("key") == key:
        if progress is not None:
            progress.log(f"the model's answers read back from {cache}")
        return [SourceText(*t) for t in saved["texts"]]
    generated = answer_texts(model, tokenizer, eval_data, answers, progress)
    cache.parent.mkdir(parents=True, exist_ok=True)
    temp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps({"key": key, "texts": generated}))
    os.replace(temp, cache)
    return generated


def train_and_report(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: Sequence[SourceText],
    held_out: Sequence[SourceText],
    config: TrainConfig,
    out: Path,
    *,
    model_name: str,
    collect_tokens: int | None = None,
    loss_tokens: int | None = 8192,
    stop_after: int | None = None,
    progress: Progress | None = None,
) -> QualityReport | None:
    """Collect (or read back) the activations, train (resuming a checkpoint), write the SAE and
    `report.json` into `out`, remove `out/.training`; None when `stop_after` stopped it."""
    progress = progress or NoProgress()
    state_dir = out / STATE_FOLDER
    state_dir.mkdir(parents=True, exist_ok=True)
    data_key = hashlib.sha256(
        json.dumps(
            [model_name, config.layer, _texts_key(train), _texts_key(held_out), collect_tokens, MAX_LENGTH]
        ).encode()
    ).hexdigest()[:16]
    acts_path = state_dir / ACTS_FILE
    cached = torch.load(acts_path, weights_only=True) if acts_path.is_file() else None
    if cached is not None and cached["key"] == data_key:
        acts, held, collection_seconds = cached["train"], cached["held_out"], cached["seconds"]
        max_norm, dropped = cached["max_norm"], cached["dropped"]
        progress.log(f"activations read back from {acts_path} ({len(acts):,} tokens)")
    else:
        started = time.perf_counter()
        stage = _Stage(progress, 0.0, 0.3)
        acts = collect_activations(
            model, tokenizer, [t.text for t in train], config.layer, max_tokens=collect_tokens, progress=stage
        )
        held = collect_activations(model, tokenizer, [t.text for t in held_out], config.layer)
        collection_seconds = round(time.perf_counter() - started, 2)
        max_norm = outlier_norm(acts)
        acts, dropped_train = drop_outliers(acts, max_norm)
        held, dropped_held = drop_outliers(held, max_norm)
        dropped = {"train": dropped_train, "held_out": dropped_held}
        _atomic_save(
            {
                "key": data_key,
                "train": acts,
                "held_out": held,
                "seconds": collection_seconds,
                "max_norm": max_norm,
                "dropped": dropped,
            },
            acts_path,
        )
        progress.log(
            f"activations: {len(acts):,} training and {len(held):,} held-out tokens at layer {config.layer}"
            f" ({collection_seconds:.0f} s); outliers of norm over {max_norm:.0f} left out: {dropped}"
        )
    trained = train_sae(
        acts,
        config,
        state_dir=state_dir,
        data_key=data_key,
        stop_after=stop_after,
        progress=_Stage(progress, 0.3, 0.9),
    )
    if trained is None:
        return None
    sae, result = trained
    sae.config.metadata = SAEMetadata(
        model_name=model_name,
        hook_name=_hook_name(config.layer),
        context_size=MAX_LENGTH,
        prepend_bos=False,
        exclude_first_token=True,
        outlier_norm=max_norm,
        training="batchtopk",
        k=config.k,
    )
    progress.update(0.9, "evaluating on the held-out texts")
    measured = evaluate_sae(
        sae,
        held,
        model=model,
        tokenizer=tokenizer,
        held_out_texts=[t.text for t in held_out],
        train_sample=_sample(acts, DEAD_SAMPLE_TOKENS, config.seed),
        loss_tokens=loss_tokens,
        max_norm=max_norm,
    )
    report = QualityReport(
        model=model_name,
        layer=config.layer,
        hook_name=_hook_name(config.layer),
        d_in=sae.config.d_in,
        d_sae=sae.config.d_sae,
        expansion=config.expansion,
        k=config.k,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        steps=result.steps,
        tokens_trained=result.tokens,
        tokens_collected=len(acts),
        tokens_held_out=len(held),
        texts={**_counts(train), "held_out": len(held_out)},
        training_seconds=result.seconds,
        collection_seconds=collection_seconds,
        outlier_norm=round(max_norm, 2),
        outliers_dropped=dropped,
        threshold=round(result.threshold, 6),
        train_fve=result.train_fve,
        **measured,
    )
    sae.save(out)
    (out / REPORT_FILE).write_text(report.model_dump_json(indent=2))
    for path in state_dir.iterdir():
        path.unlink()
    state_dir.rmdir()
    progress.update(1.0, f"wrote {out}")
    return report


class SweepRow(BaseModel):
    layer: int
    fve: float
    l0: float
    dead_share: float
    spliced_ratio: float
    recovered: float
    train_fve: float
    training_seconds: float
    outliers_dropped: int
    """Training tokens over `OUTLIER_FACTOR` x the median norm, left out."""


def sweep(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: Sequence[SourceText],
    held_out: Sequence[SourceText],
    layers: Sequence[int],
    template: TrainConfig,
    *,
    collect_tokens: int | None = 50_000,
    loss_tokens: int | None = 4096,
    progress: Progress | None = None,
) -> tuple[list[SweepRow], dict[str, Any]]:
    """A brief SAE per layer (`train_sae` and `evaluate_sae`, as `lethe sae train` runs them, on
    one shared collection pass); the rows and what they were measured on."""
    progress = progress or NoProgress()
    started = time.perf_counter()
    acts = collect_layers(
        model,
        tokenizer,
        [t.text for t in train],
        layers,
        max_tokens=collect_tokens,
        progress=_Stage(progress, 0.0, 0.3),
    )
    held = collect_layers(model, tokenizer, [t.text for t in held_out], layers)
    collection_seconds = time.perf_counter() - started
    progress.log(f"activations: {len(acts[layers[0]]):,} tokens per layer ({collection_seconds:.0f} s)")
    original = lm_loss(model, tokenizer, [t.text for t in held_out], max_tokens=loss_tokens)
    rows = []
    for number, layer in enumerate(layers):
        config = template.model_copy(update={"layer": layer})
        share = 0.7 / len(layers)
        max_norm = outlier_norm(acts[layer])
        layer_acts, dropped = drop_outliers(acts[layer], max_norm)
        layer_held, _ = drop_outliers(held[layer], max_norm)
        trained = train_sae(
            layer_acts, config, progress=_Stage(progress, 0.3 + number * share, 0.3 + (number + 1) * share)
        )
        assert trained is not None
        sae, result = trained
        measured = evaluate_sae(
            sae,
            layer_held,
            model=model,
            tokenizer=tokenizer,
            held_out_texts=[t.text for t in held_out],
            train_sample=_sample(layer_acts, DEAD_SAMPLE_TOKENS, config.seed),
            loss_tokens=loss_tokens,
            original_loss=original,
            max_norm=max_norm,
        )
        row = SweepRow(
            layer=layer,
            fve=measured["fve"],
            l0=measured["l0"],
            dead_share=measured["dead_share"],
            spliced_ratio=measured["loss"].spliced_ratio,
            recovered=measured["loss"].recovered,
            train_fve=result.train_fve,
            training_seconds=result.seconds,
            outliers_dropped=dropped,
        )
        progress.log(
            f"layer {layer}: FVE {row.fve:.3f}, L0 {row.l0:.1f}, dead {row.dead_share:.1%},"
            f" spliced/original loss {row.spliced_ratio:.3f}"
        )
        rows.append(row)
    info = {
        "tokens_collected": len(acts[layers[0]]),
        "tokens_held_out": len(held[layers[0]]),
        "loss_tokens": original[1],
        "original_loss": round(original[0], 4),
        "collection_seconds": round(collection_seconds, 1),
        "config": template.model_dump(exclude={"layer", "checkpoint_every"}),
    }
    progress.update(1.0, "sweep done")
    return rows, info
