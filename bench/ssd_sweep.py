"""Per-target SSD at several (alpha, lambda) settings on the same Fisher importances.

The Fishers are the expensive part of SSD and do not depend on alpha or lambda, so they are
computed once (retain, then one per RWKU target, as `lethe unlearn ssd` computes them) and each
setting only re-applies the dampening to the original weights and measures the result with the
automatic evaluation of `lethe unlearn` (fewer probes per split, no MIA, to keep a setting under a
minute). The first row measures the undampened model on the same probes.

    python bench/ssd_sweep.py [--forget-samples 320] [--retain-samples 64] [--neighbours 0] [--probes 5] \
        50,1 150,1 500,1 50,25
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:
    from lethe.gateway.jobs.evaluation import Measurement


def _setting(value: str) -> tuple[float, float]:
    alpha, lambda_ = value.split(",")
    return float(alpha), float(lambda_)


def _scores(measured: Measurement) -> str:
    """Forget and neighbour recall (means over targets) and TOFU recall, as table cells."""
    snapshots = measured.per_target.values()
    forget = [s.forget_recall for s in snapshots if s.forget_recall is not None]
    neighbour = [s.neighbour_recall for s in snapshots if s.neighbour_recall is not None]
    return (
        f"{sum(forget) / len(forget):.3f} | {sum(neighbour) / len(neighbour):.3f} |"
        f" {measured.utility_recall or 0:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("settings", nargs="+", type=_setting, metavar="ALPHA,LAMBDA")
    parser.add_argument("--forget-samples", type=int, default=320, help="forget sequences, all targets")
    parser.add_argument("--retain-samples", type=int, default=64)
    parser.add_argument("--neighbours", type=int, default=0, help="neighbours per target (see SSDParams)")
    parser.add_argument("--probes", type=int, default=5, help="probes per RWKU split and target")
    parser.add_argument("--data-dir", default=None, help="evaluation data (default: $LETHE_EVAL_DATA)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lethe.evaluation.datasets import resolve_data_dir
    from lethe.gateway.config import Settings
    from lethe.gateway.jobs.data import is_rwku_folder, resolve_targets, retain_corpus
    from lethe.gateway.jobs.evaluation import EvaluationOptions, build_plan, measure
    from lethe.gateway.store import open_store
    from lethe.models.embedded import embedded_checkpoint
    from lethe.models.unlearning.data import retain_texts, ssd_sequences
    from lethe.models.unlearning.neighbours import NEIGHBOUR_ANSWER_TOKENS, neighbour_retain
    from lethe.models.unlearning.spec import SSDParams
    from lethe.models.unlearning.ssd import dampen, select_parameters, ssd_importances

    data = resolve_data_dir(args.data_dir)
    path = embedded_checkpoint(Settings().home)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    folders = [f.name for f in sorted((data / "rwku").iterdir()) if is_rwku_folder(str(f))]
    store = open_store(Settings(database=Path("/tmp/lethe-bench-ssd-sweep.db")))
    try:
        targets = resolve_targets(folders, store, data)
    finally:
        store.close()
    retain = retain_corpus(data)
    params = SSDParams(
        forget_samples=args.forget_samples, retain_samples=args.retain_samples, neighbours=args.neighbours
    )
    sets = [t.forget for t in targets]
    started = time.perf_counter()
    neighbours = neighbour_retain(
        model, tokenizer, sets, per_target=params.neighbours, max_new_tokens=NEIGHBOUR_ANSWER_TOKENS
    )
    if neighbours:
        print(f"{len(neighbours)} neighbour descriptions: {time.perf_counter() - started:.0f} s")
    forget, kept = ssd_sequences(tokenizer, sets, retain, params, neighbours)
    candidates = select_parameters(model, params.module_patterns())

    started = time.perf_counter()
    retain_importance, lazily = ssd_importances(
        model, candidates, forget, kept, params, pad_id=tokenizer.pad_token_id
    )
    forget_importances = list(lazily)
    print(
        f"Fishers of {sum(map(len, kept))} retain and {sum(map(len, forget))} forget sequences:"
        f" {time.perf_counter() - started:.0f} s"
    )

    original = {name: p.detach().clone() for name, p in candidates.items()}
    options = EvaluationOptions(samples=args.probes, utility_samples=8, muse_samples=0, instruction_samples=0)
    plan = dataclasses.replace(build_plan(targets, retain_texts(retain), data, options), mia={})
    print("| alpha, lambda | weights dampened (mean factor) | forget | neighbour | TOFU |")
    print("|---|---|---|---|---|")
    print(f"| before | - | {_scores(measure(model, tokenizer, plan))} |", flush=True)
    for alpha, lambda_ in args.settings:
        with torch.no_grad():
            for name, p in candidates.items():
                p.copy_(original[name])
        report = dampen(candidates, forget_importances, retain_importance, alpha=alpha, lambda_=lambda_)
        factor = "-" if report.mean_factor is None else f"{report.mean_factor:.2g}"
        scores = _scores(measure(model, tokenizer, plan))
        print(f"| {alpha:g}, {lambda_:g} | {report.dampened:,} ({factor}) | {scores} |", flush=True)


if __name__ == "__main__":
    main()
