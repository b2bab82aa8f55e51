"""Detection latency and memory with 10, 100, 1,000 and 10,000 registered targets.

Targets are synthesised deterministically (invented names, template descriptions and documents,
about seven anchors each), so the figures are reproducible and independent of the evaluation
data. For each size the detector is built once; then `detect` runs on a fixed mix of prompts
(everyday requests, and questions naming a registered target), each prompt embedded afresh, and
the script reports p50/p95 per prompt, the part of it spent in the embedding model, the faiss
index's size and the growth of the process's resident memory. At the largest size it also builds
the exact index (faiss `IndexFlatIP`) beside the default approximate one (`IndexHNSWFlat`) to
show what the approximate index buys, and how often the two disagree.

    python bench/detection_latency.py [--sizes 10 100 1000 10000] [--calls 300] [--threads 1 2]

Embedding the anchors of 10,000 targets (~70,000 sentences) takes several minutes on two cores.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lethe.guards.classifier import NEUTRAL_PROMPTS
from lethe.guards.config import DetectionConfig
from lethe.guards.detection import TargetDetector
from lethe.guards.embedding import Embedder, MiniLMEmbedder
from lethe.guards.targets import Target

SYLLABLES = [
    "ka",
    "ro",
    "mi",
    "len",
    "dor",
    "vash",
    "tal",
    "bri",
    "sen",
    "oth",
    "quen",
    "mar",
    "lu",
    "fae",
    "zin",
    "pol",
    "ar",
    "eth",
    "um",
    "gra",
    "vel",
    "nor",
    "ish",
    "tav",
]
PROFESSIONS = ["novelist", "painter", "physicist", "footballer", "composer", "senator", "chef", "architect"]
NATIONALITIES = ["Chilean", "Norwegian", "Kenyan", "Canadian", "Vietnamese", "Portuguese", "Icelandic"]
WORKS = ["a trilogy of harbour novels", "a mural cycle", "a theory of glass", "two league titles", "an opera"]
CITIES = ["Valparaiso", "Bergen", "Mombasa", "Halifax", "Hue", "Porto", "Akureyri"]


class SwitchableCache:
    """Remembers anchor vectors, so that each size is built without embedding again (and the
    memory growth measured is the detector's, not the cache's), but embeds every timed prompt
    afresh: a cache hit would time a dictionary lookup instead of the model."""

    def __init__(self, inner: Embedder) -> None:
        self.dimension = inner.dimension
        self._inner = inner
        self._vectors: dict[str, np.ndarray] = {}
        self.caching = True

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not self.caching:
            return self._inner.encode(texts)
        missing = [text for text in dict.fromkeys(texts) if text not in self._vectors]
        if missing:
            self._vectors.update(zip(missing, self._inner.encode(missing), strict=True))
        return np.stack([self._vectors[text] for text in texts]) if texts else self._inner.encode([])


def invented_name(rng: random.Random) -> str:
    def word(syllables: int) -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()

    return f"{word(2)} {word(3)}"


def synthetic_targets(count: int) -> list[Target]:
    rng = random.Random(0)
    now = datetime.now(UTC)
    targets = []
    for number in range(count):
        name = invented_name(rng)
        given, surname = name.split()
        profession, nationality = rng.choice(PROFESSIONS), rng.choice(NATIONALITIES)
        work, city, year = rng.choice(WORKS), rng.choice(CITIES), rng.randint(1900, 1995)
        targets.append(
            Target(
                id=f"t{number:05d}",
                name=name,
                aliases=[f"{given[0]}. {surname}"],
                description=f"{name} is a {nationality} {profession} best known for {work}.",
                documents=[
                    f"{name} was born in {city} in {year}. {surname} trained as a {profession} and worked "
                    f"in {city} for many years. {surname}'s best known achievement is {work}, which won "
                    f"national awards. Later in life {surname} taught younger colleagues."
                ],
                version=1,
                created_at=now,
                updated_at=now,
            )
        )
    return targets


def prompts(targets: Sequence[Target]) -> list[str]:
    rng = random.Random(1)
    named = [
        f"What is {target.name} best known for?"
        for target in rng.sample(list(targets), min(10, len(targets)))
    ]
    return [*NEUTRAL_PROMPTS[:40], *named]


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def measure(
    detector: TargetDetector, embedder: MiniLMEmbedder, texts: Sequence[str], calls: int
) -> dict[str, float]:
    for text in texts[:5]:
        detector.detect(text)
    totals, encodes = [], []
    for call in range(calls):
        text = texts[call % len(texts)]
        started = time.perf_counter()
        detector.detect(text)
        totals.append(time.perf_counter() - started)
        started = time.perf_counter()
        embedder.encode([text])
        encodes.append(time.perf_counter() - started)
    return {
        "p50_ms": 1000 * statistics.median(totals),
        "p95_ms": 1000 * float(np.percentile(totals, 95)),
        "encode_p50_ms": 1000 * statistics.median(encodes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads to time with")
    args = parser.parse_args()

    model = MiniLMEmbedder()
    embedder = SwitchableCache(model)
    everything = synthetic_targets(max(args.sizes))
    config = DetectionConfig()
    started = time.perf_counter()
    TargetDetector.build(everything, embedder, config)  # embeds every anchor once, outside the measurements
    print(f"embedded the anchors of {len(everything):,} targets in {time.perf_counter() - started:.0f}s")
    print(f"{args.calls} detect calls per size and thread count, prompts embedded afresh")
    print("build s: compiling with every anchor already embedded (names, classifiers, faiss index)\n")
    columns = ["targets", "anchors", "index", "build s", "index MB", "RSS growth MB", "threads"]
    columns += ["p50 ms", "p95 ms", "embedding p50 ms"]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for size in sorted(args.sizes):
        variants = [("default", config)]
        if size == max(args.sizes):
            variants.append(("exact", config.model_copy(update={"hnsw_min_anchors": 10**9})))
        detections: dict[str, list[list[str]]] = {}
        for label, variant in variants:
            gc.collect()
            before = rss_bytes()
            embedder.caching = True
            started = time.perf_counter()
            detector = TargetDetector.build(everything[:size], embedder, variant)
            build_seconds = time.perf_counter() - started
            embedder.caching = False
            gc.collect()
            grown = rss_bytes() - before
            stats = detector.stats()
            texts = prompts(everything[:size])
            detections[label] = [sorted(d.target_id for d in detector.detect(text)) for text in texts]
            for threads in args.threads:
                torch.set_num_threads(threads)
                figures = measure(detector, model, texts, args.calls)
                print(
                    f"| {size:,} | {stats['anchors']:,} | {stats['index']} | {build_seconds:.1f} | "
                    f"{int(stats['index_bytes']) / 2**20:.1f} | {grown / 2**20:.1f} | {threads} | "
                    f"{figures['p50_ms']:.1f} | {figures['p95_ms']:.1f} | {figures['encode_p50_ms']:.1f} |",
                    flush=True,
                )
            del detector
        if len(detections) == 2:
            agree = np.mean([a == b for a, b in zip(detections["default"], detections["exact"], strict=True)])
            print(
                f"\napproximate vs exact index at {size:,} targets: same detections on {agree:.0%} of prompts"
            )


if __name__ == "__main__":
    main()
