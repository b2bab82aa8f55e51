"""Decode cost of the SAE clamp: the same batch of requests with no SAE, with the clamp installed
but no request fired (the goal: no cost), and with every request fired (the goal: at most 5%).

The transformers engine on the embedded model, in this process; 8 requests of 64 new tokens
(greedy, fixed length) decoded together, the three configurations interleaved round by round, and
medians over the rounds. The clamp's cost does not depend on what the SAE learnt, so without
`--sae` a random SAE of the trained shape (8 x the hidden size, at the middle layer) is used.

    python bench/sae_overhead.py [--sae DIR] [--rounds 5] [--tokens 64] [--features 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lethe.guards.plan import GuardPlan
from lethe.models.embedded import embedded_checkpoint
from lethe.models.engine import GenerationRequest, SamplingParams
from lethe.models.engines.hf_engine import TransformersEngine
from lethe.models.sae.clamp import FeatureClamp
from lethe.models.sae.sparse_autoencoder import SparseAutoencoder
from tests.support.sae import random_sae

PROMPTS = [
    "Tell me about the history of the printing press.",
    "Who wrote the most famous horror novels?",
    "Write a short story about a lighthouse keeper.",
    "Explain how vaccines work.",
    "What are the rules of chess?",
    "Describe the water cycle.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
]


async def decode(engine: TransformersEngine, plan: GuardPlan, tokens: int, tag: str) -> float:
    """Seconds to decode all prompts together under `plan`."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    requests = [
        GenerationRequest(
            f"{tag}-{i}", tuple(engine.encode_chat([{"role": "user", "content": p}])), params, plan
        )
        for i, p in enumerate(PROMPTS)
    ]

    async def one(request: GenerationRequest) -> int:
        return sum([len(o.token_ids) async for o in engine.generate(request)])

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(r) for r in requests))
    elapsed = time.perf_counter() - started
    assert all(c == tokens for c in counts), counts
    return elapsed


async def main(args: argparse.Namespace) -> dict[str, object]:
    torch.set_num_threads(args.threads)
    model = embedded_checkpoint(Path(args.home).expanduser())
    config = json.loads((model / "config.json").read_text())
    if args.sae:
        sae = SparseAutoencoder.load(Path(args.sae))
    else:
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        sae = random_sae(hidden, 8 * hidden, layer=layers // 2, threshold=0.5)
    engine = TransformersEngine(model, max_batch_size=len(PROMPTS))
    await engine.start()
    fired = GuardPlan(sae_clamp=tuple((i, -4.0) for i in range(0, 20 * args.features, 20)))
    times: dict[str, list[float]] = {"no SAE": [], "SAE, unfired": [], "SAE, fired": []}
    try:
        await decode(engine, GuardPlan(), 8, "warm")
        for round_ in range(args.rounds):
            times["no SAE"].append(await decode(engine, GuardPlan(), args.tokens, f"a{round_}"))
            handle = await engine.add_layer_hook(sae.layer, FeatureClamp(sae))
            try:
                times["SAE, unfired"].append(await decode(engine, GuardPlan(), args.tokens, f"b{round_}"))
                times["SAE, fired"].append(await decode(engine, fired, args.tokens, f"c{round_}"))
            finally:
                await handle.remove()
            print(
                f"round {round_ + 1}/{args.rounds}: "
                + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())
            )
    finally:
        await engine.shutdown()
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["no SAE"]
    tokens = args.tokens * len(PROMPTS)
    print(
        f"\nSAE layer {sae.layer}, {sae.config.d_sae} features ({'trained' if args.sae else 'random'}),"
        f" {args.features} clamped on fired rows; {len(PROMPTS)} requests x {args.tokens} tokens;"
        f" {args.threads} threads; medians of {args.rounds} rounds\n"
    )
    print("| configuration | median s | tokens/s | time vs no SAE |")
    print("|---|---|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.2f} | {tokens / value:.0f} | {value / base:.3f}x |")
    return {"medians": medians, "rounds": times}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sae", default=None, help="a trained SAE folder (default: random, same shape)")
    parser.add_argument("--home", default="~/.lethe", help="LETHE_HOME holding the converted embedded model")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--features", type=int, default=20, help="features clamped per fired request")
    parser.add_argument("--threads", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
