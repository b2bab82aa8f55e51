"""Choosing a target's SAE features: the features that fire often on the target's own text and
almost never on general chat text, as SAEBench's unlearning evaluation chooses them (firing
frequency on forget text against retain text), with each feature's mean activation kept so that
the clamp can scale to it.

The retain text is chat-formatted (the chat template around general requests and answers): a
retain set without the template lets the template's own features look specific to the target, and
clamping those damages every answer (what reproductions of Dynamic SAE Guardrails report).

Activations come from a copy of the served checkpoint cut after the SAE's layer (`ResidualReader`):
the engine may be vLLM in another process, and the layers after the SAE's are not needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lethe.guards.features import SAEFeature, SelectionConfig, TargetFeatures
from lethe.guards.targets import Target
from lethe.models.sae.sparse_autoencoder import SparseAutoencoder

TokenIds = Sequence[int]


def forget_texts(target: Target) -> tuple[list[str], list[str]]:
    """A target's own text as (plain prose, chat requests): its documents and description as they
    are, its examples and a question about it as chat requests."""
    plain = [*target.documents, *([target.description] if target.description else [])]
    chat = [*target.examples, *(f"Tell me about {name}." for name in [target.name, *target.aliases])]
    return plain, chat


class ResidualReader:
    """The residual stream after one decoder layer, for plain texts and chat requests (the first
    token of each text is dropped: its norm is an outlier in most models, and an SAE is not trained
    on it)."""

    def __init__(self, model_path: Path, layer: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        model = AutoModelForCausalLM.from_pretrained(str(model_path), torch_dtype=torch.float32)
        layers = model.model.layers
        if not 0 <= layer < len(layers):
            raise ValueError(f"the SAE reads layer {layer}, but the model has {len(layers)} layers")
        model.model.layers = layers[: layer + 1]
        self._decoder = model.model.eval()
        self._layer = layer

    def read(self, plain: Sequence[str], chat: Sequence[str] = ()) -> torch.Tensor:
        """[tokens, hidden] for all texts together; chat requests go through the chat template."""
        chat_texts = [
            self._tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            for text in chat
        ]
        ids = [self._tokenizer.encode(text, add_special_tokens=False) for text in [*plain, *chat_texts]]
        return self.read_ids(ids)

    @torch.inference_mode()
    def read_ids(self, texts: Sequence[TokenIds], max_tokens: int = 512) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def keep(module: torch.nn.Module, args: object, output: object) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            assert isinstance(hidden, torch.Tensor)
            captured.append(hidden[0, 1:].float())

        handle = self._decoder.layers[self._layer].register_forward_hook(keep)
        try:
            for ids in texts:
                if len(ids) > 1:
                    self._decoder(input_ids=torch.tensor([list(ids[:max_tokens])]))
        finally:
            handle.remove()
        if not captured:
            return torch.zeros(0, self._decoder.config.hidden_size)
        return torch.cat(captured)


def firing(sae: SparseAutoencoder, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature: the share of tokens on which it fires, and its mean activation where it fires."""
    activations = sae.encode(residual)
    fires = activations > 0
    counts = fires.sum(dim=0)
    rates = counts.float() / max(len(residual), 1)
    means = activations.sum(dim=0) / counts.clamp(min=1)
    return rates, means


def select_features(
    sae: SparseAutoencoder,
    forget: torch.Tensor,
    retain_rates: torch.Tensor,
    target_id: str,
    target_version: int,
    config: SelectionConfig,
) -> TargetFeatures:
    """The features of `forget` (the target's residual stream) to clamp: firing on at least
    `min_forget_rate` of its tokens and at most `max_retain_rate` of general ones, most frequent
    first, at most `max_features`."""
    rates, means = firing(sae, forget)
    eligible = (rates >= config.min_forget_rate) & (retain_rates <= config.max_retain_rate)
    order = torch.argsort(rates - retain_rates, descending=True)
    chosen = [int(i) for i in order if eligible[i]][: config.max_features]
    return TargetFeatures(
        target_id=target_id,
        sae=sae.fingerprint,
        layer=sae.layer,
        target_version=target_version,
        forget_tokens=len(forget),
        features=tuple(
            SAEFeature(
                index=i,
                mean_activation=float(means[i]),
                forget_rate=float(rates[i]),
                retain_rate=float(retain_rates[i]),
            )
            for i in chosen
        ),
    )
