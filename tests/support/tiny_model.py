"""A tiny random Llama with the real SmolLM2 tokenizer: real shapes and tokenisation, ~0.1 s to run."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def build_tiny_model(tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 32: the smallest vLLM's CPU attention supports
        num_key_value_heads=1,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # The default init gives near-uniform logits (greedy ties, fragile tests) and tied embeddings
    # make the model repeat its input token; these scales give peaked but varied distributions.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 0.4)
        for layer in model.model.layers:
            for weight in layer.parameters():
                if weight.dim() == 2:
                    weight.normal_(0, 0.3)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
