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

import threading
from collections.abc import Mapping, Sequence
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
        self._lock = threading.Lock()  # the capturing hook is per call: one call at a time

    def encode(self, plain: Sequence[str] = (), chat: Sequence[str] = ()) -> list[list[int]]:
        """Token ids of plain texts, then of chat requests (as a user turn in the chat template)."""
        return [*(self.encode_text(text) for text in plain), *(self.encode_chat([("user", t)]) for t in chat)]

    def encode_chat(self, turns: Sequence[tuple[str, str]]) -> list[int]:
        """A conversation of (role, content) turns in the chat template, ready for the answer."""
        messages = [{"role": role, "content": content} for role, content in turns]
        return self.encode_text(
            self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )

    def encode_text(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def read(self, plain: Sequence[str], chat: Sequence[str] = (), budget: int | None = None) -> torch.Tensor:
        """[tokens, hidden] for all texts together, until `budget` tokens are read: the chat requests
        first (a target's examples and its name, short and the most telling), then the prose."""
        texts = self.encode((), chat) + self.encode(plain)
        if budget is not None:
            kept, total = [], 0
            for ids in texts:
                if total >= budget:
                    break
                kept.append(ids[: budget - total + 1])
                total += len(kept[-1]) - 1
            texts = kept
        each = self.read_each(texts)
        return torch.cat(each) if each else torch.zeros(0, self._decoder.config.hidden_size)

    @torch.inference_mode()
    def read_each(
        self, texts: Sequence[TokenIds], max_tokens: int = 512, batch: int = 8
    ) -> list[torch.Tensor]:
        """[tokens - 1, hidden] per text of more than one token (the first `max_tokens` of each), in
        the order given. Texts of similar length are read together, padded on the right: under
        causal attention a token never sees the padding after it, so no mask is needed."""
        kept = [(i, list(ids[:max_tokens])) for i, ids in enumerate(texts) if len(ids) > 1]
        kept.sort(key=lambda item: len(item[1]))
        captured: list[torch.Tensor] = []
        read: dict[int, torch.Tensor] = {}

        def keep(module: torch.nn.Module, args: object, output: object) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            assert isinstance(hidden, torch.Tensor)
            captured.append(hidden.float())

        with self._lock:
            handle = self._decoder.layers[self._layer].register_forward_hook(keep)
            try:
                for start in range(0, len(kept), batch):
                    group = kept[start : start + batch]
                    width = len(group[-1][1])
                    padded = torch.tensor([ids + [ids[-1]] * (width - len(ids)) for _, ids in group])
                    captured.clear()
                    self._decoder(input_ids=padded)
                    for row, (index, ids) in enumerate(group):
                        read[index] = captured[0][row, 1 : len(ids)]
            finally:
                handle.remove()
        return [read[index] for index in sorted(read)]


def firing(sae: SparseAutoencoder, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature: the share of tokens on which it fires, and its mean activation where it fires
    (outlier tokens left out, as the clamp leaves them alone)."""
    residual = residual[sae.inliers(residual)]
    activations = sae.encode(residual)
    fires = activations > 0
    counts = fires.sum(dim=0)
    rates = counts.float() / max(len(residual), 1)
    means = activations.sum(dim=0) / counts.clamp(min=1)
    return rates, means


def firing_shares(
    sae: SparseAutoencoder, residual: torch.Tensor, feature_sets: Mapping[str, Sequence[int]]
) -> dict[str, float]:
    """For each named set of features, the share of a text's tokens on which any of them fires
    (outlier tokens left out); the text is encoded once for all the sets."""
    residual = residual[sae.inliers(residual)]
    if not len(residual):
        return dict.fromkeys(feature_sets, 0.0)
    fires = sae.encode(residual) > 0
    return {
        name: float(fires[:, list(indices)].any(dim=1).float().mean()) if indices else 0.0
        for name, indices in feature_sets.items()
    }


def firing_share(sae: SparseAutoencoder, residual: torch.Tensor, indices: Sequence[int]) -> float:
    """The share of a text's tokens on which any of the features `indices` fires."""
    return firing_shares(sae, residual, {"": indices})[""]


def _random_control(
    count: int, means: torch.Tensor, chosen: list[int], target_id: str
) -> tuple[list[int], torch.Tensor]:
    """`count` features drawn at random from the whole SAE (seeded by the target id), each clamped
    at the mean activation of the features the frequency choice took where it has none of its own:
    the control that shows what choosing the features adds."""
    generator = torch.Generator().manual_seed(
        int.from_bytes(target_id.encode()[-8:].ljust(8, b"\0"), "little")
    )
    drawn = [int(i) for i in torch.randperm(len(means), generator=generator)[:count]]
    fallback = float(means[chosen].mean())
    return drawn, torch.where(means > 0, means, torch.full_like(means, fallback))


def select_features(
    sae: SparseAutoencoder,
    forget: torch.Tensor,
    retain: Sequence[torch.Tensor],
    target_id: str,
    target_version: int,
    config: SelectionConfig,
) -> TargetFeatures:
    """The features of `forget` (the target's residual stream) to clamp: firing on at least
    `min_forget_rate` of its tokens and at most `max_retain_rate` of the tokens of `retain` (general
    texts, one tensor each), most frequent first, at most `max_features`. The detection threshold is
    the largest share of any retain text's tokens on which a chosen feature fires, and at least
    `min_detect_share`: a prompt must look more like the target than any general text did."""
    retain_rates, _ = firing(sae, torch.cat(list(retain)) if retain else torch.zeros(0, sae.config.d_in))
    rates, means = firing(sae, forget)
    eligible = (rates >= config.min_forget_rate) & (retain_rates <= config.max_retain_rate)
    order = torch.argsort(rates - retain_rates, descending=True)
    chosen = [int(i) for i in order if eligible[i]][: config.max_features]
    if config.strategy == "random" and chosen:
        chosen, means = _random_control(len(chosen), means, chosen, target_id)
    retain_share = max((firing_share(sae, text, chosen) for text in retain), default=0.0)
    return TargetFeatures(
        target_id=target_id,
        sae=sae.fingerprint,
        layer=sae.layer,
        target_version=target_version,
        forget_tokens=len(forget),
        detect_share=min(1.0, max(retain_share + 1e-6, config.min_detect_share)),
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
