"""SSD, FLAT and greedy answers on each device, same model and data: time, memory, and whether the
GPU selects the same weights as the CPU.

`LETHE_UNLEARN_DEVICE=cuda` runs unlearning jobs on a GPU. This measures what that buys on a
model of the embedded model's shape, and checks that it is the same method: the SSD importances
of the two devices agree to float rounding and select (almost) the same weights. The model folder
needs a config and a tokenizer; without `model.safetensors` the weights are random (seeded), which
costs the same to run. The texts are generated here (a few made-up people), so no evaluation data
is needed.

    python bench/unlearning_devices.py --model-dir DIR [--devices cpu cuda] [--sequences 64] \
        [--flat-steps 8] [--threads N]
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lethe.models.unlearning.data import (
    FlatPair,
    ForgetSet,
    LabelledSequence,
    RetainItem,
    flat_pairs,
    ssd_sequences,
)
from lethe.models.unlearning.flat import run_flat
from lethe.models.unlearning.generation import greedy_answers
from lethe.models.unlearning.spec import FLATParams, SSDParams
from lethe.models.unlearning.ssd import run_ssd, select_parameters

T = TypeVar("T")

PEOPLE = ("Mara Quillfeather", "Oskar Brennwald", "Ines Talavera")
PLACES = ("Lisbon", "Tromsø", "Valparaíso", "Kraków", "Hobart", "Accra")
WORKS = ("The Salt Orchard", "Nine Lanterns", "A Map of Small Rivers", "The Glass Harbour")


def forget_sets(documents: int, seed: int = 0) -> list[ForgetSet]:
    rng = random.Random(seed)
    sets = []
    for name in PEOPLE:
        docs = [
            f"{name} was born in {rng.choice(PLACES)} in {rng.randint(1900, 1990)}. "
            f"{name.split()[0]} wrote {rng.choice(WORKS)}, which won a prize in {rng.randint(1950, 2020)}, "
            f"and later taught in {rng.choice(PLACES)} for {rng.randint(2, 30)} years. " * 3
            for _ in range(documents)
        ]
        sets.append(ForgetSet(name=name, documents=docs))
    return sets


def retain_items(count: int) -> list[RetainItem]:
    return [
        RetainItem(prompt=f"What is {a} plus {b}?", text=f"{a} plus {b} is {a + b}.")
        for a, b in ((i, 2 * i + 1) for i in range(count))
    ]


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(device: torch.device, work: Callable[[], T]) -> tuple[float, T]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, result


@dataclass(frozen=True)
class Workload:
    forget: list[list[LabelledSequence]]
    retain: list[list[LabelledSequence]]
    ssd: SSDParams
    pairs: list[FlatPair]
    flat: FLATParams
    prompts: list[str]
    pad_id: int


def measure(model: PreTrainedModel, tokenizer, work: Workload, device: torch.device) -> tuple[str, dict]:
    """One table row for `model` (already on `device`), and the weights SSD changed there. Each
    figure is one timed run, after one warm-up generation of the same shapes."""
    before = {key: p.detach().clone() for key, p in model.named_parameters()}

    def answer() -> list[str]:
        return greedy_answers(model, tokenizer, work.prompts, max_new_tokens=32, batch_size=len(work.prompts))

    answer()  # warm-up, same shapes: CUDA context, kernels, anything `generate` compiles
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ssd_seconds, report = timed(
        device, lambda: run_ssd(model, work.forget, work.retain, work.ssd, pad_id=work.pad_id)
    )
    changed = {
        key: (p.detach() != before[key]).cpu()
        for key, p in select_parameters(model, work.ssd.module_patterns()).items()
    }
    flat_seconds, _ = timed(device, lambda: run_flat(model, work.pairs, work.flat, pad_id=work.pad_id))
    answer_seconds, answers = timed(device, answer)
    tokens = sum(len(tokenizer.encode(a, add_special_tokens=False)) for a in answers)
    sequences = sum(map(len, work.forget)) + sum(map(len, work.retain))
    steps = -(-len(work.pairs) // work.flat.batch_size)
    row = (
        f"| {device} | {ssd_seconds:.1f} ({ssd_seconds / sequences:.3f}) | {report.dampened:,} |"
        f" {flat_seconds / steps:.2f} | {tokens / answer_seconds:.0f} | {peak_mb(device):.0f} |"
    )
    return row, changed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--sequences", type=int, default=64, help="SSD forget sequences (and as many retain)")
    parser.add_argument("--flat-steps", type=int, default=8, help="FLAT optimiser steps of 4 pairs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if (args.model_dir / "model.safetensors").is_file():
        base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    else:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(args.model_dir), dtype=torch.float32
        )
    original = {name: p.detach().clone() for name, p in base.named_parameters()}
    sets = forget_sets(documents=max(args.sequences // len(PEOPLE), 1))
    ssd = SSDParams(forget_samples=args.sequences, retain_samples=args.sequences)
    forget, retain = ssd_sequences(tokenizer, sets, retain_items(args.sequences), ssd)
    flat = FLATParams(forget_samples=4 * args.flat_steps)
    work = Workload(
        forget=forget,
        retain=retain,
        ssd=ssd,
        pairs=flat_pairs(tokenizer, sets, max_length=flat.max_length, limit=flat.forget_samples, seed=0),
        flat=flat,
        prompts=[f"Tell me about {name}." for name in PEOPLE] * 6,
        pad_id=pad_id,
    )
    parameters = sum(p.numel() for p in base.parameters()) / 1e6
    print(
        f"model: {parameters:.0f} M parameters; SSD {sum(map(len, forget)) + sum(map(len, retain))} sequences"
    )
    print("| device | SSD s (s/sequence) | weights dampened | FLAT s/step | answers tok/s | peak MB |")
    print("|---|---|---|---|---|---|")
    changed: list[dict[str, torch.Tensor]] = []
    for name in args.devices:
        with torch.no_grad():
            for key, p in base.named_parameters():
                p.copy_(original[key])
        device = torch.device(name)
        row, selected = measure(base.to(device), tokenizer, work, device)
        print(row, flush=True)
        changed.append(selected)
        base = base.to("cpu")
    if len(changed) == 2:
        first, second = changed
        both = sum(int((first[k] & second[k]).sum()) for k in first)
        either = sum(int((first[k] | second[k]).sum()) for k in first)
        share = both / max(either, 1)
        print(f"weights SSD changed on both devices / on either: {both:,} / {either:,} ({share:.4f})")


if __name__ == "__main__":
    main()
