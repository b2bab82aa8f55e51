"""The tokenizer side of an engine, the same whichever engine generates: the gateway encodes
prompts and decodes logprob tokens with the checkpoint's own Hugging Face tokenizer, so both engines
see identical token ids for identical requests."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import GenerationConfig, PreTrainedTokenizerBase


class TokenizerMethods:
    """`encode_chat`, `encode_text` and `decode_token` of the Engine protocol, over `self.tokenizer`."""

    tokenizer: PreTrainedTokenizerBase | None = None

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        assert self.tokenizer is not None
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return self.encode_text(text)

    def encode_text(self, text: str) -> list[int]:
        assert self.tokenizer is not None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode_token(self, token_id: int) -> str:
        assert self.tokenizer is not None
        return self.tokenizer.decode([token_id])


def end_of_sequence_ids(
    tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None
) -> frozenset[int]:
    """Every token that ends a sequence: the generation config's list and the tokenizer's own."""
    eos = generation_config.eos_token_id if generation_config else None
    ids = {eos} if isinstance(eos, int) else set(eos or ())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
