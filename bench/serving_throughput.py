"""Gateway (engine in-process, engine in its child process) vs bare `model.generate`, side by side.

8 concurrent chat requests x 64 new tokens (greedy, fixed length via `ignore_eos`) through two
`lethe serve` processes over HTTP, one with the transformers engine in-process
(LETHE_ENGINE_PROCESS=false) and one with it in its own process (the default), against the same 8
prompts as one left-padded `model.generate` call in this process; then the same at concurrency 1
(one request; its time to first token against a bare single `generate` of one token). The legs
alternate, repetition by repetition, so machine noise hits them alike; the figures are medians.

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


def bare_first_token(model: torch.nn.Module, batch: dict[str, torch.Tensor], pad_id: int) -> float:
    """Time to one new token of a bare `generate` (prefill and one step): the floor of a TTFT."""
    return bare_run(model, batch, 1, pad_id)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="model folder (default: the embedded SmolLM2)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every engine (and of bare)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or embedded_checkpoint(Settings().home)
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def encode(questions: list[str]) -> dict[str, torch.Tensor]:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q in questions
        ]
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    batch, single = encode(prompts), encode(prompts[:1])
    pad = tokenizer.pad_token_id
    modes = {"in-process": "false", "child process": "true"}
    walls: dict[str, list[float]] = {name: [] for name in [*modes, "bare"]}
    single_walls: dict[str, list[float]] = {name: [] for name in [*modes, "bare"]}
    ttfts: dict[str, list[float]] = {name: [] for name in [*modes, "bare"]}

    with tempfile.TemporaryDirectory() as logs:
        servers: dict[str, LiveServer] = {}
        try:
            for name, flag in modes.items():
                servers[name] = start_server(
                    model_dir,
                    Settings().home,
                    Path(logs) / f"server-{flag}.log",
                    LETHE_MAX_BATCH_SIZE="16",
                    LETHE_ENGINE_PROCESS=flag,
                    LETHE_TORCH_THREADS=str(args.threads),
                )
                asyncio.run(gateway_run(servers[name], prompts[:1], 4))  # warm-up
            bare_run(model, batch, 4, pad)
            for repeat in range(args.repeats):
                line = []
                for name, server in servers.items():
                    wall, _ = asyncio.run(gateway_run(server, prompts, args.tokens))
                    walls[name].append(wall)
                    one, firsts = asyncio.run(gateway_run(server, prompts[:1], args.tokens))
                    single_walls[name].append(one)
                    ttfts[name] += firsts
                    line.append(f"{name} {wall:.2f} s / {one:.2f} s")
                walls["bare"].append(bare_run(model, batch, args.tokens, pad))
                single_walls["bare"].append(bare_run(model, single, args.tokens, pad))
                ttfts["bare"].append(bare_first_token(model, single, pad))
                line.append(f"bare generate {walls['bare'][-1]:.2f} s / {single_walls['bare'][-1]:.2f} s")
                print(f"repeat {repeat + 1} ({args.requests} concurrent / 1):", ", ".join(line), flush=True)
        finally:
            for server in servers.values():
                server.stop()

    total = args.requests * args.tokens
    rate = {name: total / statistics.median(values) for name, values in walls.items()}
    single_rate = {name: args.tokens / statistics.median(values) for name, values in single_walls.items()}
    print()
    print(
        f"model: {model_dir.name}; {args.requests} concurrent requests x {args.tokens} tokens, then 1 x"
        f" {args.tokens}; {args.repeats} repeats; torch threads {args.threads}"
    )
    print(
        f"| | tok/s, {args.requests} concurrent (median) | ratio to bare | tok/s, concurrency 1 |"
        " ratio to bare | TTFT p50, concurrency 1 | TTFT p95 |"
    )
    print("|---|---|---|---|---|---|---|")
    labels = {
        "in-process": "gateway, engine in-process (HTTP, streaming)",
        "child process": "gateway, engine in its child process (HTTP, streaming)",
        "bare": "bare `model.generate` (batched / single; TTFT: one-token generate)",
    }
    for name, label in labels.items():
        p50, p95 = (percentile(ttfts[name], q) * 1000 for q in (0.5, 0.95))
        print(
            f"| {label} | {rate[name]:.1f} | {rate[name] / rate['bare']:.2f}x | {single_rate[name]:.1f} |"
            f" {single_rate[name] / single_rate['bare']:.2f}x | {p50:.0f} ms | {p95:.0f} ms |"
        )
    print(
        f"child process / in-process: {rate['child process'] / rate['in-process']:.2f}x"
        f" ({args.requests} concurrent), {single_rate['child process'] / single_rate['in-process']:.2f}x"
        " (concurrency 1); goals: gateway >= 0.90x bare, TTFT p50 within 20 ms of bare"
    )


if __name__ == "__main__":
    main()
