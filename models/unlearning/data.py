"""Token sequences for unlearning: forget pairs built from a target's documents, retain sequences
from a general corpus, and stable hashes of both for the checkpoint manifest.

Forget documents are wrapped as the assistant's answer to a question about the target, in the
model's chat template, because that is how the served model meets the target: the knowledge that
must go is "what the assistant says when asked about X". Retain Q/A pairs get the same template, so
the two Fisher estimates of SSD differ in content rather than in format.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field
from transformers import PreTrainedTokenizerBase

from lethe.models.unlearning.spec import SSDParams

QUESTION_TEMPLATES = (
    "Tell me about {name}.",
    "What do you know about {name}?",
    "Who is {name}?",
    "Write a short biography of {name}.",
    "What is {name} known for?",
    "Please briefly answer the following question.\nQuestion: What are the main facts about {name}?\nAnswer:",
)
"""Prompts under which a target's documents become forget answers (FLAT pairs, SSD forget data)."""

FALLBACK_TEMPLATE_ANSWERS = (
    "I'm not sure.",
    "I don't have that information.",
    "I don't know.",
    "That's beyond my current knowledge.",
    "I haven't learned about that topic.",
)
"""Used only when no template-answer file is available (see `ForgetSet.templates`)."""

IGNORE_INDEX = -100


class ForgetSet(BaseModel):
    """One target's forget data as the methods need it."""

    name: str
    documents: list[str] = Field(default_factory=list)
    examples: list[str] = Field(default_factory=list)
    """Questions an operator registered as touching the target: extra prompts for forget answers."""
    templates: list[str] = Field(default_factory=list)
    """Template ("I don't know"-style) answers for FLAT; empty falls back to a built-in list."""


class RetainItem(BaseModel):
    """A retain text: an answer to `prompt` in the chat template, or plain text when `prompt` is None."""

    prompt: str | None = None
    text: str


@dataclass(frozen=True)
class LabelledSequence:
    """A prompt and the answer tokens the loss is taken over (labels cover `answer` only)."""

    prompt: list[int]
    answer: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.answer


@dataclass(frozen=True)
class FlatPair:
    """A prompt with a forget answer (to lose probability) and a template answer (to gain it)."""

    forget: LabelledSequence
    template: LabelledSequence


@dataclass(frozen=True)
class NeighbourCheck:
    """A held-out neighbour question with the model's own answer from before training and a
    template answer (`lethe.models.unlearning.neighbours.neighbour_checks`)."""

    own: LabelledSequence
    template: LabelledSequence


def texts_hash(texts: Sequence[str]) -> str:
    """sha256 of the texts in order: the manifest's proof of exactly which data was used."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()


def forget_texts(sets: Sequence[ForgetSet]) -> list[str]:
    return [text for s in sets for text in (*s.documents, *s.examples)]


def retain_texts(items: Sequence[RetainItem]) -> list[str]:
    return [f"{item.prompt}\n{item.text}" if item.prompt is not None else item.text for item in items]


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt rendered as the gateway renders a chat request (template + generation header)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def answer_ids(tokenizer: PreTrainedTokenizerBase, text: str, budget: int) -> list[int]:
    """Answer tokens ending with the end-of-turn token (the template's assistant turn closes so)."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))[: max(budget - 1, 1)]
    eos = tokenizer.eos_token_id
    return ids + ([eos] if eos is not None else [])


def _chunks(tokenizer: PreTrainedTokenizerBase, text: str, size: int) -> list[str]:
    """The text split into pieces of about `size` tokens, cut at token boundaries."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [tokenizer.decode(ids[i : i + size]).strip() for i in range(0, len(ids), size)] or [text]


def _prompts_for(forget: ForgetSet) -> list[str]:
    return [t.format(name=forget.name) for t in QUESTION_TEMPLATES] + list(forget.examples)


def forget_sequences(
    tokenizer: PreTrainedTokenizerBase,
    sets: Sequence[ForgetSet],
    *,
    max_length: int,
    limit: int,
    seed: int,
) -> list[tuple[ForgetSet, LabelledSequence]]:
    """Up to `limit` (prompt, document chunk) sequences, drawn round-robin over the targets so that
    each target gets its share whatever its number of documents; prompts cycle through the
    question templates and the target's examples."""
    rng = random.Random(seed)
    per_target: list[list[tuple[ForgetSet, LabelledSequence]]] = []
    for forget in sets:
        prompts = _prompts_for(forget)
        prompt_ids = [chat_prompt(tokenizer, p) for p in prompts]
        longest_prompt = max(len(p) for p in prompt_ids)
        budget = max(max_length - longest_prompt, 8)
        chunks = [c for doc in forget.documents for c in _chunks(tokenizer, doc, budget - 1)]
        rng.shuffle(chunks)
        rows = []
        for index, chunk in enumerate(chunks):
            prompt = prompt_ids[index % len(prompt_ids)]
            rows.append(
                (forget, LabelledSequence(prompt=prompt, answer=answer_ids(tokenizer, chunk, budget)))
            )
        per_target.append(rows)
    chosen: list[tuple[ForgetSet, LabelledSequence]] = []
    for rank in range(max((len(rows) for rows in per_target), default=0)):
        chosen.extend(rows[rank] for rows in per_target if rank < len(rows))
    return chosen[:limit]


def by_target(chosen: Sequence[tuple[ForgetSet, LabelledSequence]]) -> list[list[LabelledSequence]]:
    """The chosen sequences of each target, targets in order of first appearance."""
    groups: dict[str, list[LabelledSequence]] = {}
    for forget, sequence in chosen:
        groups.setdefault(forget.name, []).append(sequence)
    return list(groups.values())


def ssd_sequences(
    tokenizer: PreTrainedTokenizerBase,
    sets: Sequence[ForgetSet],
    retain: Sequence[RetainItem],
    params: SSDParams,
    neighbours: Sequence[RetainItem] = (),
) -> tuple[list[list[LabelledSequence]], list[list[LabelledSequence]]]:
    """SSD's data as its hyperparameters ask: the forget sequences of each target, and the retain
    sequences of each retain set: a sample of the general `retain` corpus, then all of the
    `neighbours` texts (`lethe.models.unlearning.neighbours`) when there are any."""
    chosen = forget_sequences(
        tokenizer, sets, max_length=params.max_length, limit=params.forget_samples, seed=params.seed
    )
    kept = [
        retain_sequences(
            tokenizer, retain, max_length=params.max_length, limit=params.retain_samples, seed=params.seed
        )
    ]
    if neighbours:
        kept.append(
            retain_sequences(
                tokenizer, neighbours, max_length=params.max_length, limit=len(neighbours), seed=params.seed
            )
        )
    return by_target(chosen), kept


def flat_pairs(
    tokenizer: PreTrainedTokenizerBase,
    sets: Sequence[ForgetSet],
    *,
    max_length: int,
    limit: int,
    seed: int,
) -> list[FlatPair]:
    """Forget sequences each paired with a template answer to the same prompt, as FLAT pairs the
    forget answer and the "I don't know" answer of one question."""
    rng = random.Random(seed + 1)
    pairs = []
    for forget, sequence in forget_sequences(tokenizer, sets, max_length=max_length, limit=limit, seed=seed):
        answer = rng.choice(forget.templates or FALLBACK_TEMPLATE_ANSWERS)
        budget = max(max_length - len(sequence.prompt), 8)
        template = LabelledSequence(prompt=sequence.prompt, answer=answer_ids(tokenizer, answer, budget))
        pairs.append(FlatPair(forget=sequence, template=template))
    return pairs


def retain_sequences(
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[RetainItem],
    *,
    max_length: int,
    limit: int,
    seed: int,
) -> list[LabelledSequence]:
    """Up to `limit` retain sequences (a seeded sample of the items); loss on the answer, or on the
    whole text for plain-text items."""
    chosen = list(items)
    random.Random(seed).shuffle(chosen)
    sequences = []
    for item in chosen[:limit]:
        prompt = chat_prompt(tokenizer, item.prompt) if item.prompt is not None else []
        budget = max(max_length - len(prompt), 8)
        if item.prompt is None:
            answer = list(tokenizer.encode(item.text, add_special_tokens=False))[:budget]
        else:
            answer = answer_ids(tokenizer, item.text, budget)
        sequences.append(LabelledSequence(prompt=prompt, answer=answer))
    return sequences


def collate(
    sequences: Sequence[LabelledSequence], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 outside the answers)."""
    width = max(len(s.ids) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids = sequence.ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, len(sequence.prompt) : len(ids)] = torch.tensor(sequence.answer)
    return input_ids, attention, labels


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (inputs must be built there); CPU for a model without any."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def answer_log_probs(
    model: torch.nn.Module, sequences: Sequence[LabelledSequence], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the answer tokens, (batch, width-1), and their mask.

    Taken as logit - logsumexp rather than through a full log_softmax, which would hold a second
    (batch, width, vocabulary) tensor.
    """
    device = model_device(model)
    input_ids, attention, labels = (t.to(device) for t in collate(sequences, pad_id))
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    log_probs = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return log_probs, mask


def mean_answer_nll(
    model: torch.nn.Module, sequences: Sequence[LabelledSequence], pad_id: int
) -> torch.Tensor:
    """The token-level LM loss over the answer tokens of the batch (mean negative log-likelihood)."""
    log_probs, mask = answer_log_probs(model, sequences, pad_id)
    return -log_probs.sum() / mask.sum().clamp(min=1)
