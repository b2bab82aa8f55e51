"""Greedy answers from a model in-process, prompts rendered as the gateway renders a chat request.

The before/after evaluation of an unlearning run uses this rather than a server: the model is
already in memory and starting one would cost more than the answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lethe.models.unlearning.data import chat_prompt, model_device
from lethe.models.unlearning.progress import StepCallback, no_progress


@torch.no_grad()
def greedy_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    step: StepCallback = no_progress,
) -> list[str]:
    """One greedy answer per prompt (left-padded batches of similar lengths, to waste little)."""
    model.eval()
    encoded = [chat_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = [""] * len(prompts)
    device = model_device(model)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for row, index in enumerate(rows):
            ids = encoded[index]
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
        )
        for row, index in enumerate(rows):
            answers[index] = tokenizer.decode(output[row, width:], skip_special_tokens=True)
        step(
            min(start + batch_size, len(order)) / len(order),
            f"answers {min(start + batch_size, len(order))}/{len(order)}",
        )
    return answers
