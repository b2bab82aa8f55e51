"""Detection with the SAE as a second detector, on RWKU: recall per level and per attack type and
false positives on neighbours and general instructions, for the prompt detector alone, the SAE
detector alone, and either.

The 10 RWKU targets are registered as `lethe eval` registers them (name, intro, passages); their
features are chosen as the gateway chooses them (`SAEService`: the built-in general text, the
default selection settings); every probe is read in the chat template, as the gateway reads a
prompt. No server: the detectors are called directly, so the figures are detection only.

    python bench/sae_detection.py --sae DIR [--eval-data DIR] [--home LETHE_HOME] [--instructions 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sae_rwku import add_flags, rwku_setup
from lethe.evaluation import datasets, prompts, suites
from lethe.gateway.runtime.sae_service import SAEDetector
from lethe.guards.config import DetectionConfig
from lethe.guards.detection import TargetDetector
from lethe.guards.embedding import default_embedder


def main(args: argparse.Namespace) -> dict[str, object]:
    setup = rwku_setup(args)
    data_dir, rwku, service, targets, features = (
        setup.data_dir,
        setup.rwku,
        setup.service,
        setup.targets,
        setup.features,
    )
    by_folder, choose_seconds = setup.by_folder, setup.choose_seconds
    prompt_detector = TargetDetector.build(targets, default_embedder(), DetectionConfig())
    sae_detector = SAEDetector(service, {k: v for k, v in features.items() if v.features})

    selection = suites.Selection(
        suites=["rwku"],
        targets=rwku,
        levels=[1, 2, 3],
        sample=args.sample,
        max_tokens=32,
        instruction_max_tokens=32,
    )
    probes = suites.rwku_probes(data_dir, selection)
    instructions = [
        prompts.instruction_prompt(row.instruction)
        for row in datasets.instruction_rows(data_dir)[: args.instructions]
    ]
    counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    seconds: list[float] = []

    def tally(group: str, fired: dict[str, bool]) -> None:
        for detector, hit in fired.items():
            counts[group][detector][0] += hit
            counts[group][detector][1] += 1

    for probe in probes:
        own = by_folder[probe.target]
        by_prompt = {d.target_id for d in prompt_detector.detect_conversation([probe.prompt])}
        started = time.perf_counter()
        by_sae = {d.target_id for d in sae_detector.detect_conversation([probe.prompt])}
        seconds.append(time.perf_counter() - started)
        if probe.split.startswith("forget"):
            hits = {"prompt": own in by_prompt, "sae": own in by_sae, "either": own in by_prompt | by_sae}
            tally(f"forget L{probe.level}", hits)
            if probe.attack:
                tally(f"L3 {probe.attack}", hits)
        else:  # a neighbour probe: its own target firing is a false positive
            tally(
                "neighbours: own target fires",
                {"prompt": own in by_prompt, "sae": own in by_sae, "either": own in by_prompt | by_sae},
            )
            tally(
                "neighbours: any target fires",
                {"prompt": bool(by_prompt), "sae": bool(by_sae), "either": bool(by_prompt | by_sae)},
            )
    for text in instructions:
        by_prompt = bool(prompt_detector.detect_conversation([text]))
        by_sae = bool(sae_detector.detect_conversation([text]))
        tally(
            "instructions: any target fires",
            {"prompt": by_prompt, "sae": by_sae, "either": by_prompt or by_sae},
        )

    chosen = {t.name: len(features[t.id].features) if t.id in features else 0 for t in targets}
    thresholds = {t.name: round(features[t.id].detect_share, 3) for t in targets if t.id in features}
    print(f"SAE {args.sae}: layer {service.card.layer}, {service.card.features} features")
    print(f"features chosen per target ({choose_seconds:.0f} s for all): {chosen}")
    print(f"detection shares: {thresholds}")
    seconds.sort()
    print(
        f"SAE detection per prompt: p50 {1000 * seconds[len(seconds) // 2]:.0f} ms, "
        f"p95 {1000 * seconds[int(len(seconds) * 0.95)]:.0f} ms\n"
    )
    print("| probes | n | prompt detector | SAE detector | either |")
    print("|---|---|---|---|---|")
    table = {}
    for group in sorted(counts, key=lambda g: (not g.startswith("forget"), g)):
        row = {d: hit / n for d, (hit, n) in counts[group].items()}
        table[group] = {"n": counts[group]["prompt"][1], **row}
        print(
            f"| {group} | {counts[group]['prompt'][1]} | "
            + " | ".join(f"{100 * row[d]:.1f}%" for d in ("prompt", "sae", "either"))
            + " |"
        )
    result = {"chosen": chosen, "thresholds": thresholds, "table": table, "choose_seconds": choose_seconds}
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_flags(parser, sample=None)
    parser.add_argument(
        "--instructions", type=int, default=200, help="general instructions for false positives"
    )
    parser.add_argument("--output", default=None, help="write the table as JSON here too")
    main(parser.parse_args())
