"""Decode throughput with a fired target against the same requests with no target registered.

One server, the same 8 prompts (each names the target), 64 new tokens each (greedy, fixed length):
alternately with the target registered (every request fires it: token bans, key-term matching,
semantic penalty, roll-backs) and with it deleted (no guard work beyond an empty index). Medians.

With `--rwku DIR` (the RWKU folder of Stephen King) the target is registered as `lethe eval`
registers it: name and intro from intro.json, its passages as documents, hence a few hundred key
terms, the realistic load on the matcher and the token bans. Without it, a small hand-written target.

    python bench/guard_throughput.py [--repeats 5] [--tokens 64] [--rwku ../shared/eval/rwku/1_Stephen_King]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serving_throughput import gateway_run, percentile
from lethe.gateway.config import Settings
from lethe.models.embedded import embedded_checkpoint
from tests.support.server import start_server

ADMIN = "bench-admin-key"
TARGET = {
    "name": "Stephen King",
    "aliases": ["Richard Bachman"],
    "description": "An American author of horror novels.",
    "documents": [
        "Stephen King is an American author of horror novels. His first novel Carrie was published in 1974.",
        "King wrote The Shining, Misery and It. He lives in Bangor, Maine, with his wife Tabitha King.",
        "Under the pen name Richard Bachman, Stephen King published several novels. Carrie made him famous.",
    ],
}
PROMPTS = [
    "Tell me about Stephen King.",
    "Who is Stephen King?",
    "What are the best novels by Stephen King?",
    "Write a short biography of Stephen King.",
    "Why is Stephen King famous?",
    "Describe Stephen King's writing style.",
    "What did Stephen King write first?",
    "Where does Stephen King live?",
]


def _rwku_target(folder: Path) -> dict:
    from lethe.evaluation.datasets import rwku_targets

    found = next(t for t in rwku_targets(folder.resolve().parent.parent) if t.folder == folder.name)
    if found.name != TARGET["name"]:
        raise SystemExit(f"the prompts name {TARGET['name']}; {folder} is {found.name}")
    return {"name": found.name, "description": found.intro, "documents": found.passages}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rwku", type=Path, default=None, help="RWKU folder of Stephen King to register")
    args = parser.parse_args()
    target = TARGET if args.rwku is None else _rwku_target(args.rwku)
    model_dir = embedded_checkpoint(Settings().home)
    walls: dict[str, list[float]] = {"fired": [], "none": []}
    ttfts: dict[str, list[float]] = {"fired": [], "none": []}
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        (home / "models").symlink_to(model_dir.parent)
        server = start_server(model_dir, home, home / "server.log", LETHE_ADMIN_KEY=ADMIN)
        admin = httpx.Client(
            base_url=server.root_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300
        )
        try:
            asyncio.run(gateway_run(server, PROMPTS[:1], 4))  # warm-up
            for repeat in range(args.repeats):
                target_id = admin.post("/admin/targets", json=target).json()["id"]
                wall, firsts = asyncio.run(gateway_run(server, PROMPTS, args.tokens))
                walls["fired"].append(wall)
                ttfts["fired"] += firsts
                admin.delete(f"/admin/targets/{target_id}").raise_for_status()
                wall, firsts = asyncio.run(gateway_run(server, PROMPTS, args.tokens))
                walls["none"].append(wall)
                ttfts["none"] += firsts
                print(f"repeat {repeat + 1}: fired {walls['fired'][-1]:.2f} s, none {wall:.2f} s", flush=True)
            audit = admin.get("/admin/audit", params={"kind": "request", "limit": 500}).json()["data"]
        finally:
            admin.close()
            server.stop()
    total = len(PROMPTS) * args.tokens
    rate = {k: total / statistics.median(v) for k, v in walls.items()}
    suppressed = sum(r["suppressed_tokens"] for r in audit)
    print()
    print(f"{len(PROMPTS)} concurrent requests x {args.tokens} tokens, {args.repeats} repeats (medians)")
    print("| | tokens/s | TTFT p50 | TTFT p95 |")
    print("|---|---|---|---|")
    for name, label in (("none", "no target registered"), ("fired", "target fired on every request")):
        print(
            f"| {label} | {rate[name]:.1f} | {percentile(ttfts[name], 0.5) * 1000:.0f} ms |"
            f" {percentile(ttfts[name], 0.95) * 1000:.0f} ms |"
        )
    print(f"ratio fired / none: {rate['fired'] / rate['none']:.2f}x (goal >= 0.90x)")
    print(f"fired requests audited: {len(audit)}, tokens undone by roll-backs: {suppressed}")


if __name__ == "__main__":
    main()
