"""The dense control for the SAE clamp: ablate one direction per target at the SAE's layer (the
mean of the target's residual stream minus the mean of general text's, projected out of every
token of a fired request), against the SAE clamp and against nothing, on the same RWKU probes.

Everything runs in this process on the transformers engine (no gateway, so no decoding
restrictions and no detection on the answer): a probe fires the targets the prompt detector finds
in it, and for each configuration the same probes fire. Features and directions come from the same
text as the gateway's choice (`SAEService`). Scored with `lethe eval`'s code; the table is ROUGE-L
recall, mean over targets.

    python bench/sae_dense_control.py --sae DIR [--eval-data DIR] [--home LETHE_HOME] [--sample 10]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.sae_rwku import add_flags, rwku_setup
from lethe.evaluation import suites
from lethe.evaluation.client import Completion
from lethe.evaluation.scoring import score_answer, summarise
from lethe.guards.config import DetectionConfig, GuardConfig
from lethe.guards.detection import TargetDetector
from lethe.guards.embedding import default_embedder
from lethe.guards.plan import GuardPlan
from lethe.models.engine import GenerationRequest, SamplingParams
from lethe.models.engines.hf_engine import TransformersEngine
from lethe.models.sae.clamp import FeatureClamp
from lethe.models.sae.features import forget_texts

SPLITS = ("forget_level1", "forget_level2", "forget_level3", "neighbor_level1", "neighbor_level2")


class DirectionAblation:
    """A layer hook: on rows whose plan names targets, project each target's direction out of
    every token's residual stream."""

    def __init__(self, directions: dict[str, torch.Tensor]) -> None:
        self.directions = {t: d / d.norm() for t, d in directions.items()}

    def __call__(self, hidden: torch.Tensor, rows: Sequence[GenerationRequest]) -> torch.Tensor | None:
        out: torch.Tensor | None = None
        for row, request in enumerate(rows):
            for target_id in request.plan.target_ids:
                direction = self.directions.get(target_id)
                if direction is None:
                    continue
                if out is None:
                    out = hidden.clone()
                stream = out[row].float()
                out[row] = (stream - (stream @ direction)[:, None] * direction).to(hidden.dtype)
        return out


async def answer_all(engine: TransformersEngine, probes: list, plans: list[GuardPlan]) -> list[Completion]:
    async def one(index: int) -> Completion:
        probe = probes[index]
        params = SamplingParams(max_tokens=probe.max_tokens, temperature=0.0, stop=tuple(probe.stop))
        ids = tuple(engine.encode_chat([{"role": "user", "content": probe.prompt}]))
        outputs = [
            o async for o in engine.generate(GenerationRequest(f"p{index}", ids, params, plans[index]))
        ]
        return Completion(output="".join(o.text for o in outputs), finish_reason=outputs[-1].finish_reason)

    semaphore = asyncio.Semaphore(16)

    async def limited(index: int) -> Completion:
        async with semaphore:
            return await one(index)

    return list(await asyncio.gather(*(limited(i) for i in range(len(probes)))))


async def main(args: argparse.Namespace) -> None:
    setup = rwku_setup(args)
    data_dir, model, rwku, service, targets, features = (
        setup.data_dir,
        setup.model,
        setup.rwku,
        setup.service,
        setup.targets,
        setup.features,
    )
    reader, retain = service.prepared()
    general = torch.cat(retain).mean(dim=0)
    directions = {}
    for target in targets:
        plain, chat = forget_texts(target)
        directions[target.id] = reader.read(plain, chat, budget=4096).mean(dim=0) - general
    multiple = GuardConfig().sae_clamp_multiple
    clamps = {t: f.clamp(multiple) for t, f in features.items()}

    selection = suites.Selection(
        suites=["rwku"],
        targets=rwku,
        levels=[1, 2, 3],
        sample=args.sample,
        max_tokens=32,
        instruction_max_tokens=32,
    )
    probes = [p for p in suites.rwku_probes(data_dir, selection) if p.split in SPLITS]
    detector = TargetDetector.build(targets, default_embedder(), DetectionConfig())
    fired = [[d.target_id for d in detector.detect_conversation([p.prompt])] for p in probes]
    names = {t.id: t.name for t in targets}

    engine = TransformersEngine(model, max_batch_size=16)
    await engine.start()
    results = {}
    try:
        for name, hook in (
            ("nothing", None),
            ("SAE clamp", FeatureClamp(service.sae)),
            ("dense direction ablation", DirectionAblation(directions)),
        ):
            plans = [
                GuardPlan(
                    target_ids=tuple(ids),
                    sae_clamp=tuple(sorted({c for t in ids for c in clamps.get(t, ())}))
                    if name == "SAE clamp"
                    else (),
                )
                for ids in fired
            ]
            handle = await engine.add_layer_hook(service.sae.layer, hook) if hook is not None else None
            try:
                completions = await answer_all(engine, probes, plans)
            finally:
                if handle is not None:
                    await handle.remove()
            records = [
                score_answer(p, c, [names[t] for t in ids])
                for p, c, ids in zip(probes, completions, fired, strict=True)
            ]
            results[name] = summarise(records, is_baseline=name == "nothing").rwku_overall
            print(f"{name}: done", flush=True)
    finally:
        await engine.shutdown()
    fired_share = {
        s: sum(bool(f) for p, f in zip(probes, fired, strict=True) if p.split == s) for s in SPLITS
    }
    print(f"\nSAE layer {service.card.layer}; {len(probes)} probes; fired (prompt detector): {fired_share}\n")
    print("| configuration | " + " | ".join(SPLITS) + " |")
    print("|---" * (len(SPLITS) + 1) + "|")
    for name, overall in results.items():
        print(f"| {name} | " + " | ".join(f"{overall[s].rouge_l_recall:.3f}" for s in SPLITS) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_flags(parser, sample=10)
    asyncio.run(main(parser.parse_args()))
