"""Gateway vs bare batched `model.generate`, side by side in one run on the same machine.

8 concurrent chat requests x 64 new tokens (greedy, fixed length via `ignore_eos`) through
`lethe serve` over HTTP, against the same 8 prompts as one left-padded `model.generate` call in
this process. The two alternate, repetition by repetition, so machine noise hits both alike; the
figures are medians.

    python bench/serving_throughput.py [--model DIR] [--requests 8] [--tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lethe.gateway.config import Settings
from lethe.models.embedded import embedded_checkpoint
from tests.support.server import LiveServer, start_server

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis to a child.",
    "Give me three tips for learning to cook.",
    "Who was Ada Lovelace?",
    "Describe a sunset over the mountains.",
    "What are the benefits of regular exercise?",
    "Summarise the plot of a detective story.",
]


async def gateway_run(server: LiveServer, prompts: list[str], tokens: int) -> tuple[float, list[float]]:
    """Wall time for all requests, and each request's time to first token."""
    async with httpx.AsyncClient(timeout=600, headers=server.headers()) as client:

        async def one(question: str) -> tuple[float, float]:
            started = time.perf_counter()
            first = None
            body = {
                "model": server.model,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            async with client.stream("POST", f"{server.base_url}/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if first is None and line.startswith("data:") and '"content":""' not in line:
                        first = time.perf_counter() - started
            return first or 0.0, time.perf_counter()

        begin = time.perf_counter()
        results = await asyncio.gather(*(one(q) for q in prompts))
        return max(end for _, end in results) - begin, [ttft for ttft, _ in results]


def bare_run(model: torch.nn.Module, batch: dict[str, torch.Tensor], tokens: int, pad_id: int) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad_id
        )
    elapsed = time.perf_counter() - started
    assert out.shape[1] - batch["input_ids"].shape[1] == tokens
    return elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="model folder (default: the embedded SmolLM2)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model_dir = args.model or embedded_checkpoint(Settings().home)
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in prompts
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    with tempfile.TemporaryDirectory() as logs:
        server = start_server(
            model_dir, Settings().home, Path(logs) / "server.log", LETHE_MAX_BATCH_SIZE="16"
        )
        try:
            asyncio.run(gateway_run(server, prompts[:1], 4))  # warm-up
            bare_run(model, batch, 4, tokenizer.pad_token_id)
            gateway_walls, bare_walls, ttfts = [], [], []
            for repeat in range(args.repeats):
                wall, firsts = asyncio.run(gateway_run(server, prompts, args.tokens))
                gateway_walls.append(wall)
                ttfts += firsts
                bare_walls.append(bare_run(model, batch, args.tokens, tokenizer.pad_token_id))
                print(
                    f"repeat {repeat + 1}: gateway {wall:.2f} s, bare generate {bare_walls[-1]:.2f} s",
                    flush=True,
                )
        finally:
            server.stop()

    total = args.requests * args.tokens
    gateway_tps = total / statistics.median(gateway_walls)
    bare_tps = total / statistics.median(bare_walls)
    print()
    print(
        f"model: {model_dir.name}; {args.requests} concurrent requests x {args.tokens} tokens;"
        f" {args.repeats} repeats"
    )
    print("| | tokens/s (median) | TTFT p50 | TTFT p95 |")
    print("|---|---|---|---|")
    print(
        f"| Lethe gateway (HTTP, streaming) | {gateway_tps:.1f} | {percentile(ttfts, 0.5) * 1000:.0f} ms |"
        f" {percentile(ttfts, 0.95) * 1000:.0f} ms |"
    )
    print(f"| bare batched model.generate | {bare_tps:.1f} | - | - |")
    print(f"ratio gateway / bare: {gateway_tps / bare_tps:.2f}x (goal >= 0.90x)")


if __name__ == "__main__":
    main()
