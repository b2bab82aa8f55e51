"""Teaching: fine-tune a model on question/answer pairs, the opposite of forgetting.

Forgetting can only be measured on what a model knows. `lethe teach` makes a test subject the way
TOFU does: fine-tune the serving model on facts no model could know (fictitious authors), confirm
that it states them, then make it forget some. It is also how a user builds a subject for their own
red-team data.

The pairs are read from JSON files: a list of `{name, qa: [{question, answer}]}` (the layout of
`shared/eval/tofu_authors/`), or a plain list of `{question, answer}`. Each pair becomes the
assistant's answer to the question in the model's chat template, rendered exactly as the gateway
renders a chat request (`data.chat_prompt`), and the loss is taken over the answer tokens only
(the answer ends with the end-of-turn token, so the model also learns to stop).

Training is a plain AdamW loop with warm-up and cosine (or linear) decay. It is reproducible: the
batch order of epoch `e` is drawn from `(seed, e)` alone, nothing else is random (Llama has no
dropout), and the learning rate is a pure function of the step, so the same command gives the same
weights on the same machine and thread count, and a run resumed from an epoch's saved state gives
the same weights as one that was never stopped (`tests/teaching`).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from transformers import PreTrainedTokenizerBase

from lethe.models.unlearning.data import (
    LabelledSequence,
    answer_ids,
    chat_prompt,
    mean_answer_nll,
    texts_hash,
)
from lethe.models.unlearning.progress import StepCallback, no_progress

STATE_FILE = "state.json"
TENSORS_FILE = "state.pt"
MAX_SEED = 2**32 - 1


class TeachParams(BaseModel):
    """Hyperparameters of a teaching run: everything that decides the weights it writes.

    Defaults were chosen on the embedded SmolLM2-135M-Instruct taught the 25 TOFU authors of
    `shared/eval/tofu_authors` (500 pairs; docs/results/authors.md).
    """

    epochs: int = Field(4, ge=1, le=100, description="passes over the pairs")
    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="AdamW peak learning rate")
    batch_size: int = Field(8, ge=1, le=1024, description="pairs per optimizer step")
    max_length: int = Field(256, ge=16, le=8192, description="tokens per pair (prompt + answer), cut beyond")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the batch order")
    warmup_ratio: float = Field(0.05, ge=0, le=0.5, description="share of the steps spent warming up")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning-rate decay after the warm-up"
    )
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")


class QAPair(BaseModel):
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    subject: str | None = None
    """The author (or other subject) the pair is about, when the file names one."""
    source: str = ""
    """The stem of the file it came from (e.g. `forget_authors`): how reports group the pairs."""


class _Author(BaseModel):
    name: str
    qa: list[QAPair]


class _Plain(BaseModel):
    question: str
    answer: str


def load_pairs(paths: Sequence[Path]) -> list[QAPair]:
    """Every pair of every file, in file order; raises ValueError saying which file is wrong."""
    pairs: list[QAPair] = []
    for path in paths:
        path = Path(path).expanduser()
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"--data {path}: cannot read it as JSON ({error})") from error
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"--data {path}: expected a non-empty JSON list")
        try:
            if isinstance(rows[0], dict) and "qa" in rows[0]:
                for author in TypeAdapter(list[_Author]).validate_python(rows):
                    pairs += [
                        QAPair(question=p.question, answer=p.answer, subject=author.name, source=path.stem)
                        for p in author.qa
                    ]
            else:
                pairs += [
                    QAPair(question=p.question, answer=p.answer, source=path.stem)
                    for p in TypeAdapter(list[_Plain]).validate_python(rows)
                ]
        except ValidationError as error:
            raise ValueError(
                f"--data {path}: expected [{{name, qa: [{{question, answer}}]}}] or [{{question, answer}}]"
                f" ({error.error_count()} problem(s), first: {error.errors()[0]['msg']} at"
                f" {'.'.join(str(p) for p in error.errors()[0]['loc'])})"
            ) from error
    return pairs


def pairs_hash(pairs: Sequence[QAPair]) -> str:
    """sha256 of the pairs in order (question, answer, subject): the manifest's data hash."""
    return texts_hash([json.dumps([p.question, p.answer, p.subject], ensure_ascii=False) for p in pairs])


def run_key(data_hash: str, parent_hash: str, params: TeachParams) -> str:
    """Names a run: the same data, source weights and hyperparameters give the same key, which is
    how a resumed run finds its state and how an identical finished run is reused."""
    return texts_hash([data_hash, parent_hash, params.model_dump_json()])[:24]


def teach_sequences(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[QAPair], max_length: int
) -> list[LabelledSequence]:
    """Each pair as (chat prompt, answer + end-of-turn); an over-long prompt keeps its end."""
    sequences = []
    for pair in pairs:
        prompt = chat_prompt(tokenizer, pair.question)
        budget = max(max_length - len(prompt), 8)
        prompt = prompt[-max(max_length - budget, 1) :]
        sequences.append(LabelledSequence(prompt=prompt, answer=answer_ids(tokenizer, pair.answer, budget)))
    return sequences


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The shuffled indices of epoch `epoch`: a function of (seed, epoch) only, so resuming at any
    epoch sees the same batches as a run that was never stopped."""
    order = list(range(count))
    random.Random(f"teach:{seed}:{epoch}").shuffle(order)
    return order


def lr_factor(step: int, total: int, params: TeachParams) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    warmup = round(total * params.warmup_ratio)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if params.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    if params.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class EpochRecord(BaseModel):
    epoch: int
    """1-based."""
    loss: float
    """Mean training loss over the epoch's steps (token-level NLL of the answers)."""
    seconds: float
    evaluation: dict[str, Any] = Field(default_factory=dict)
    """What the caller's `after_epoch` measured (e.g. recall on a sample of the taught questions)."""


class TeachReport(BaseModel):
    steps: int
    epochs: list[EpochRecord]
    resumed_from_epoch: int = 0
    """Epochs taken from a saved state instead of trained by this process."""
    pairs: int
    tokens_per_epoch: int
    """Answer tokens (the ones the loss covers) per epoch."""

    def summary(self) -> str:
        losses = ", ".join(f"{e.loss:.4f}" for e in self.epochs)
        resumed = f", resumed after epoch {self.resumed_from_epoch}" if self.resumed_from_epoch else ""
        return f"{self.pairs} pairs, {self.steps} steps, epoch losses {losses}{resumed}"


@dataclass
class ResumeStore:
    """Where a run keeps the state of its last finished epoch (weights, AdamW moments, records),
    replaced atomically at each epoch's end so that a kill leaves the previous epoch's state whole."""

    folder: Path

    def load(self) -> tuple[dict[str, Any], list[EpochRecord]] | None:
        meta, tensors = self.folder / STATE_FILE, self.folder / TENSORS_FILE
        if not (meta.is_file() and tensors.is_file()):
            return None
        info = json.loads(meta.read_text())
        state = torch.load(tensors, map_location="cpu", weights_only=True)
        if state.get("epoch") != info.get("epoch"):
            return None  # killed between the two replacements: the older epoch's json; start over
        return state, [EpochRecord.model_validate(r) for r in info["epochs"]]

    def save(self, state: dict[str, Any], epochs: Sequence[EpochRecord]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        tensors = self.folder / f".{TENSORS_FILE}.{pid}.tmp"
        torch.save(state, tensors)
        os.replace(tensors, self.folder / TENSORS_FILE)
        meta = self.folder / f".{STATE_FILE}.{pid}.tmp"
        meta.write_text(
            json.dumps({"epoch": state["epoch"], "epochs": [e.model_dump() for e in epochs]}, indent=1)
        )
        os.replace(meta, self.folder / STATE_FILE)

    def clear(self) -> None:
        for name in (STATE_FILE, TENSORS_FILE):
            (self.folder / name).unlink(missing_ok=True)
        for leftover in self.folder.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


def run_teach(
    model: torch.nn.Module,
    sequences: Sequence[LabelledSequence],
    params: TeachParams,
    *,
    pad_id: int,
    step: StepCallback = no_progress,
    after_epoch: Callable[[int], dict[str, Any]] | None = None,
    resume: ResumeStore | None = None,
) -> TeachReport:
    """Train `model` in place on `sequences` and return what happened.

    `after_epoch(epoch)` (1-based) runs after each epoch with the model in eval mode; what it returns
    is kept in that epoch's record (the teaching curve). With `resume`, each finished epoch's state
    is saved there (the last one too, so a kill while the caller evaluates or writes costs no
    training) and a saved state is picked up instead of training those epochs again; the caller
    clears it once the weights are safely written.
    """
    if not sequences:
        raise ValueError("teach: no question/answer pairs to train on")
    per_epoch = math.ceil(len(sequences) / params.batch_size)
    total = per_epoch * params.epochs
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=params.learning_rate, weight_decay=params.weight_decay)
    records: list[EpochRecord] = []
    start_epoch = 0
    saved = resume.load() if resume is not None else None
    if saved is not None:
        state, records = saved
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        step(start_epoch / params.epochs, f"resumed after epoch {start_epoch}/{params.epochs}")
    resumed_from = start_epoch
    done = start_epoch * per_epoch
    try:
        for epoch in range(start_epoch, params.epochs):
            model.train()
            order = epoch_order(len(sequences), params.seed, epoch)
            losses: list[float] = []
            started = time.perf_counter()
            for start in range(0, len(order), params.batch_size):
                batch = [sequences[i] for i in order[start : start + params.batch_size]]
                for group in optimizer.param_groups:
                    group["lr"] = params.learning_rate * lr_factor(done, total, params)
                loss = mean_answer_nll(model, batch, pad_id)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trained, params.max_grad_norm)
                optimizer.step()
                losses.append(float(loss.detach()))
                done += 1
                step(
                    done / total,
                    f"epoch {epoch + 1}/{params.epochs} step {done}/{total} loss {losses[-1]:.4f}",
                )
            model.eval()
            record = EpochRecord(
                epoch=epoch + 1, loss=sum(losses) / len(losses), seconds=time.perf_counter() - started
            )
            if after_epoch is not None:
                record.evaluation = after_epoch(epoch + 1)
            records.append(record)
            if resume is not None:
                resume.save(
                    {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
                    records,
                )
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    return TeachReport(
        steps=total,
        epochs=records,
        resumed_from_epoch=resumed_from,
        pairs=len(sequences),
        tokens_per_epoch=sum(len(s.answer) for s in sequences),
    )
