"""Wall time and peak memory of SSD and of one FLAT epoch on the embedded model, and how both grow
with the number of forget documents.

Each measurement runs in a fresh process (`--one`), so that its peak resident set size
(`resource.getrusage(...).ru_maxrss`, which covers Python and torch allocations alike) is its own;
the table also shows the RSS right after loading the model, so the method's own share is visible.
Forget documents are RWKU passages taken round-robin over the targets, one sequence each; SSD's
retain set is fixed (`--retain`), so its cost grows only through the forget side.

    python bench/unlearning_cost.py [--docs 8 16 32] [--retain 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_one(method: str, docs: int, retain: int, max_length: int, threads: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lethe.gateway.config import Settings
    from lethe.gateway.jobs.data import default_data_dir, is_rwku_folder, resolve_targets, retain_corpus
    from lethe.gateway.store import open_store
    from lethe.models.embedded import embedded_checkpoint
    from lethe.models.unlearning.data import flat_pairs, ssd_sequences
    from lethe.models.unlearning.flat import run_flat
    from lethe.models.unlearning.spec import FLATParams, SSDParams
    from lethe.models.unlearning.ssd import run_ssd

    torch.set_num_threads(threads)
    data = default_data_dir()  # where `lethe unlearn` reads it: $LETHE_EVAL_DATA
    path = embedded_checkpoint(Settings().home)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    folders = [f.name for f in sorted((data / "rwku").iterdir()) if is_rwku_folder(str(f))]
    store = open_store(Settings(database=Path("/tmp/lethe-bench-unlearning.db")))
    sets = [t.forget for t in resolve_targets(folders, store, data)]
    store.close()
    pad_id = tokenizer.pad_token_id
    loaded_rss = _rss_mb()
    started = time.perf_counter()
    if method == "ssd":
        params = SSDParams(forget_samples=docs, retain_samples=retain, max_length=max_length)
        forget, kept = ssd_sequences(tokenizer, sets, retain_corpus(data), params)
        run_ssd(model, forget, kept, params, pad_id=pad_id)
    else:
        params = FLATParams(forget_samples=docs, max_length=max_length, epochs=1)
        pairs = flat_pairs(tokenizer, sets, max_length=max_length, limit=docs, seed=0)
        run_flat(model, pairs, params, pad_id=pad_id)
    return {"seconds": time.perf_counter() - started, "loaded_rss_mb": loaded_rss, "peak_rss_mb": _rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--retain", type=int, default=64, help="SSD retain sequences (fixed)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["ssd", "flat"], choices=["ssd", "flat"])
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "DOCS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = measure_one(args.one[0], int(args.one[1]), args.retain, args.max_length, args.threads)
        print(json.dumps(result))
        return
    rows = []
    for method in args.methods:
        for docs in args.docs:
            command = [
                sys.executable,
                __file__,
                "--one",
                method,
                str(docs),
                "--retain",
                str(args.retain),
                "--max-length",
                str(args.max_length),
                "--threads",
                str(args.threads),
            ]
            child = subprocess.run(command, capture_output=True, text=True)
            if child.returncode != 0:
                sys.exit(f"{method} with {docs} documents failed:\n{child.stderr[-3000:]}")
            result = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append((method, docs, result))
            print(f"{method} {docs} docs: {result}", file=sys.stderr, flush=True)
    print(
        f"\nmax_length {args.max_length}, {args.threads} torch threads, SSD retain {args.retain} sequences\n"
    )
    print("| method | forget docs | wall time (s) | s per sequence | RSS after load (MB) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for method, docs, r in rows:
        name = "SSD (both Fisher passes + dampening)" if method == "ssd" else "FLAT, one epoch"
        sequences = docs + (args.retain if method == "ssd" else 0)
        print(
            f"| {name} | {docs} | {r['seconds']:.1f} | {r['seconds'] / sequences:.2f} |"
            f" {r['loaded_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
